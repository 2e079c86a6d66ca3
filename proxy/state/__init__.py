"""State for plugins: counters, key-value and records over memory, SQLite and Redis.

One :class:`StateHub` per process, held by the runtime across config reloads, so
in-memory limits and caches survive a reload. Plugins ask it for a backend by
name; ``"auto"`` picks Redis when ``state.redis`` is configured::

    counters = runtime.state.counters()             # redis if configured, else memory
    cache = runtime.state.kv("cache", max_bytes=...)  # redis if configured, else sqlite
    ledger = runtime.state.records("usage")         # <state.dir>/usage.db
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Literal

from ..config import StateConfig
from ..errors import StateUnavailable
from .base import KV, Counters, Decision, Limit, LimitStatus, Records, SumStatus, Table, settle_after_lost_answer
from .memory import MemoryCounters, MemoryKV
from .sqlite import SQLiteKV, SQLiteRecords

__all__ = [
    "KV", "Counters", "Decision", "Limit", "LimitStatus", "Records", "StateHub", "SumStatus", "Table",
    "check_backends", "settle_after_lost_answer",
]

log = logging.getLogger("sluice.state")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: default bound of a memory KV namespace
DEFAULT_MEMORY_KV_BYTES = 64 * 1024 * 1024


def check_backends(sluice: Any, **fields: str) -> None:
    """For a plugin's ``check``: each field (its name in the plugin's config, its value) set to ``redis``
    needs ``state.redis``, so ``sluice check``, a start and a reload refuse the file, naming the field,
    rather than the plugin failing once it starts."""
    for name, value in fields.items():
        if value == "redis" and sluice.state.redis is None:
            raise ValueError(f"{name}: 'redis' needs state.redis in the config")


class StateHub:
    """The process's state backends, built lazily and shared by every plugin instance."""

    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.dir = Path(config.dir)
        #: the redis.asyncio client when ``state.redis`` is configured (after ``start``)
        self.redis: Any = None
        self.guard: Any = None
        self._memory_counters: MemoryCounters | None = None
        self._redis_counters: Counters | None = None
        self._kv: dict[tuple[str, str], KV] = {}
        self._records: dict[str, SQLiteRecords] = {}
        self._started = False
        #: told (records name, table, rows) when a records writer gives rows up (the server counts them)
        self.on_records_dropped: Callable[[str, str, int], None] | None = None

    @property
    def has_redis(self) -> bool:
        return self.config.redis is not None

    async def start(self) -> None:
        """Create the state directory and the Redis client (connections open on first use)."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        if self.config.redis is not None:
            from .redis import RedisGuard, connect

            self.redis = connect(self.config.redis)
            self.guard = RedisGuard(self.redis, self.config.redis)

    def _need_redis(self) -> Any:
        if self.config.redis is None:
            raise ValueError("backend 'redis' needs state.redis in the config")
        if self.guard is None:
            raise RuntimeError("StateHub.start() has not run")
        return self.guard

    def counters(self, backend: Literal["auto", "memory", "redis"] = "auto") -> Counters:
        """Rate-limit and budget counters. ``memory`` is one instance per hub (per process)."""
        if backend == "auto":
            backend = "redis" if self.has_redis else "memory"
        if backend == "memory":
            if self._memory_counters is None:
                self._memory_counters = MemoryCounters()
            return self._memory_counters
        if backend == "redis":
            guard = self._need_redis()
            if self._redis_counters is None:
                from .redis import RedisCounters

                cfg = self.config.redis
                self._redis_counters = RedisCounters(guard, cfg.key_prefix, cluster=cfg.cluster)
            return self._redis_counters
        raise ValueError(f"unknown counters backend {backend!r} (memory, redis, auto)")

    def kv(self, namespace: str, backend: Literal["auto", "memory", "sqlite", "redis"] = "auto",
           max_bytes: int | None = None) -> KV:
        """A key-value namespace; the same object for the same (namespace, backend)."""
        if not _NAME.match(namespace):
            raise ValueError(f"invalid namespace {namespace!r}")
        if backend == "auto":
            backend = "redis" if self.has_redis else "sqlite"
        key = (namespace, backend)
        found = self._kv.get(key)
        if found is not None:
            if max_bytes is not None and isinstance(found, (MemoryKV, SQLiteKV)):
                found.max_bytes = max_bytes  # a reload's new bound applies (SQLite's writer reads it per write)
            return found
        kv: KV
        if backend == "memory":
            kv = MemoryKV(max_bytes or DEFAULT_MEMORY_KV_BYTES)
        elif backend == "sqlite":
            kv = SQLiteKV(self.dir / "kv.db", namespace, timeout_ms=self.config.sqlite_timeout_ms, max_bytes=max_bytes)
        elif backend == "redis":
            from .redis import RedisKV

            kv = RedisKV(self._need_redis(), self.config.redis.key_prefix, namespace)
        else:
            raise ValueError(f"unknown kv backend {backend!r} (memory, sqlite, redis, auto)")
        self._kv[key] = kv
        return kv

    def records(self, name: str = "sluice") -> Records:
        """Append-only tables in ``<state.dir>/<name>.db``, written by a background thread."""
        if not _NAME.match(name):
            raise ValueError(f"invalid records name {name!r}")
        rec = self._records.get(name)
        if rec is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            rec = self._records[name] = SQLiteRecords(
                self.dir / f"{name}.db",
                timeout_ms=self.config.sqlite_timeout_ms,
                batch_size=self.config.batch_size,
                flush_interval_ms=self.config.flush_interval_ms,
            )

            def dropped(table: str, n: int) -> None:
                if self.on_records_dropped is not None:
                    self.on_records_dropped(name, table, n)

            rec.on_dropped = dropped
        return rec

    async def check(self) -> dict[str, Any]:
        """Backend health for /readyz: ``{"sqlite": "ok"|"down", "redis": "ok"|"down"|"breaker_open"}``.

        ``redis`` is present only when configured. Every value is ``"ok"`` when healthy.
        """
        out: dict[str, Any] = {}
        if self.guard is not None:
            try:
                await self.guard.call(self.redis.ping)
                out["redis"] = "ok"
            except StateUnavailable:
                out["redis"] = "breaker_open" if self.guard.is_open else "down"
        try:
            await asyncio.wait_for(asyncio.to_thread(_probe_dir, self.dir), self.config.sqlite_timeout_ms / 1000)
            # a records file that cannot be opened, or whose write the file refused lately: usage or keys are lost
            out["sqlite"] = "down" if any(r.failing_now() for r in self._records.values()) else "ok"
        except (OSError, asyncio.TimeoutError):
            out["sqlite"] = "down"
        return out

    async def close(self) -> None:
        """Flush and close every records file and KV, then the Redis client."""
        for rec in list(self._records.values()):
            try:
                await rec.close()
            except StateUnavailable:
                log.error("state: records %s did not flush in time", rec.path.name)
        self._records.clear()
        for kv in list(self._kv.values()):
            await kv.close()
        self._kv.clear()
        if self._redis_counters is not None:
            await self._redis_counters.close()  # its pending releases: their leases' TTL frees them
        if self.redis is not None:
            from .redis import close_client

            try:
                await close_client(self.redis)
            except Exception as e:  # closing a dead connection must not abort shutdown
                log.debug("state: redis close: %s", type(e).__name__)
            self.redis = None
            self.guard = None
            self._redis_counters = None
        self._started = False


def _probe_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise OSError("not a directory")
    # a name of this process's and thread's own: workers sharing state.dir removed each other's probe file
    probe = path / f".sluice-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        # a block's worth, written through: an empty file takes no space, and a full disk passed the probe
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
