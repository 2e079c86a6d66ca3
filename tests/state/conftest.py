"""Fixtures for state tests: a real redis-server for the session, a fake clock.

``redis_server`` is meant to be promoted to tests/conftest.py (the plugin tests need it too).
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from proxy.state.redis_server import RedisServer


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as rs:
        yield rs


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"
