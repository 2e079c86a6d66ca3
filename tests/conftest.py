"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
from typing import AsyncIterator, Iterator

import pytest

from proxy.testing import FakeUpstream, RedisServer

IN_CI = bool(os.environ.get("CI"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # outside CI a machine without redis-server skips those tests; in CI they run and fail loudly
    if shutil.which("redis-server") is None and not IN_CI:
        for item in items:
            if "redis" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="redis-server is not installed (scripts/test installs it)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped Redis-backed test fails the run."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else []) if "redis" in getattr(r, "keywords", {})]
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} Redis-backed tests were skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session (tests that stop it use their own)."""
    with RedisServer() as rs:
        yield rs


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up
