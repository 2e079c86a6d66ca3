"""Records: batched off the loop, durable after flush and close, readable after reopening."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from proxy import StateUnavailable
from proxy.config import StateConfig
from proxy.state import StateHub, Table
from proxy.state.sqlite import SQLiteRecords

USAGE = Table("usage", {"id": str, "model": str, "tokens": int, "cost": float}, pk="id", indexes=[("model",)])
LOG = Table("log", {"ts": float, "line": str})


async def test_rows_are_durable_across_close_and_reopen(tmp_path):
    rec = SQLiteRecords(tmp_path / "ledger.db", batch_size=7, flush_interval_ms=60000)
    rec.ensure(USAGE)
    for i in range(50):
        rec.append("usage", {"id": f"r{i}", "model": "m", "tokens": i, "cost": i / 10})
    await rec.close()
    assert rec.written == 50 and rec.dropped == 0

    again = SQLiteRecords(tmp_path / "ledger.db")
    try:
        rows = await again.query("SELECT COUNT(*) AS n, SUM(tokens) AS t FROM usage")
        assert rows == [{"n": 50, "t": sum(range(50))}]
        idx = await again.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage'")
        assert any("model" in r["name"] for r in idx)
    finally:
        await again.close()


async def test_flush_makes_pending_rows_visible_to_other_connections(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=10_000, flush_interval_ms=60000)
    try:
        rec.ensure(LOG)
        for i in range(3):
            rec.append("log", {"ts": float(i), "line": f"l{i}"})
        await rec.flush()

        def count() -> int:
            with sqlite3.connect(tmp_path / "r.db") as c:
                return c.execute("SELECT COUNT(*) FROM log").fetchone()[0]

        assert await asyncio.to_thread(count) == 3
    finally:
        await rec.close()


async def test_interval_writes_without_a_flush(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=10_000, flush_interval_ms=20)
    try:
        rec.ensure(LOG)
        rec.append("log", {"ts": 1.0, "line": "x"})
        async with asyncio.timeout(5):
            while rec.written < 1:
                await asyncio.sleep(0.01)
    finally:
        await rec.close()


async def test_primary_key_upserts_and_new_columns_are_added(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db")
    try:
        rec.ensure(USAGE)
        rec.append("usage", {"id": "a", "model": "m", "tokens": 1, "cost": 0.1})
        rec.append("usage", {"id": "a", "model": "m", "tokens": 2, "cost": 0.2, "team": "blue"})
        rows = await rec.query("SELECT id, tokens, team FROM usage")
        assert rows == [{"id": "a", "tokens": 2, "team": "blue"}]
        rec.append("usage", {"id": "b", "model": "m", "tokens": 3, "cost": 0.3, "meta": {"k": [1, 2]}})
        rows = await rec.query("SELECT meta FROM usage WHERE id = ?", ["b"])
        assert rows == [{"meta": '{"k": [1, 2]}'}]
    finally:
        await rec.close()


async def test_append_never_blocks_the_loop(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=500)
    try:
        rec.ensure(LOG)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(20_000):
            rec.append("log", {"ts": float(i), "line": "x" * 40})
        # queuing 20k rows is pure in-memory work; writing them is not done here
        assert loop.time() - t0 < 1.0
        await rec.flush()
        assert (await rec.query("SELECT COUNT(*) AS n FROM log"))[0]["n"] == 20_000
    finally:
        await rec.close()


async def test_bad_table_name_is_refused(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db")
    try:
        with pytest.raises(ValueError):
            rec.ensure(Table("x; DROP TABLE y", {"a": int}))
    finally:
        await rec.close()


def test_the_state_dir_probe_of_one_process_leaves_anothers_alone(tmp_path):
    """Workers sharing state.dir wrote and removed one fixed probe file: one removed another's between its
    write and its unlink, and /readyz said SQLite was down (a third of probes in a tight loop)."""
    import threading

    from proxy.state import _probe_dir

    errors: list[BaseException] = []

    def probe_many() -> None:
        try:
            for _ in range(300):
                _probe_dir(tmp_path)
        except BaseException as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=probe_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not list(tmp_path.glob(".sluice-probe*"))


async def test_hub_records_and_kv_are_singletons_and_close_flushes(tmp_path):
    hub = StateHub(StateConfig(dir=tmp_path / "var"))
    await hub.start()
    r = hub.records("usage")
    assert hub.records("usage") is r
    assert hub.kv("cache") is hub.kv("cache")
    assert hub.kv("cache", "memory") is not hub.kv("cache")
    # a reload's new bound reaches the store already open (SQLite kept its first one until a restart)
    assert hub.kv("bounded", "sqlite", max_bytes=1000).max_bytes == 1000
    assert hub.kv("bounded", "sqlite", max_bytes=500).max_bytes == 500
    assert hub.kv("bounded", "sqlite").max_bytes == 500  # none given: the bound stays
    assert hub.counters() is hub.counters("memory")
    r.ensure(LOG)
    r.append("log", {"ts": 1.0, "line": "kept"})
    assert await hub.check() == {"sqlite": "ok"}
    await hub.close()
    with sqlite3.connect(tmp_path / "var" / "usage.db") as c:
        assert c.execute("SELECT line FROM log").fetchall() == [("kept",)]
    with pytest.raises(ValueError, match="state.redis"):
        hub.counters("redis")


async def test_an_unopenable_file_drops_and_counts_but_never_hangs(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    rec = SQLiteRecords(blocker / "r.db")
    rec.ensure(LOG)
    rec.append("log", {"ts": 1.0, "line": "lost"})
    with pytest.raises(StateUnavailable):  # the flush says the row is not stored; it answers all the same
        await asyncio.wait_for(rec.flush(), 10)
    assert rec.dropped == 1 and rec.written == 0
    await asyncio.wait_for(rec.flush(), 10)  # nothing given up since the last flush answered
    await asyncio.wait_for(rec.close(), 10)


async def test_a_query_may_wait_longer_than_the_state_timeout_when_asked(tmp_path):
    """A report over a big ledger (the admin API's usage, metering's spend at start) takes longer than a
    lookup: ``timeout_s`` lets it wait past ``timeout_ms``, which still bounds every other query."""
    from proxy import StateUnavailable

    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT COUNT(*) AS n FROM c"
    rec = SQLiteRecords(tmp_path / "r.db", timeout_ms=50)
    try:
        with pytest.raises(StateUnavailable):
            await rec.query(slow)
        assert await rec.query(slow, timeout_s=60) == [{"n": 3_000_000}]
    finally:
        await rec.close()


async def test_a_refused_write_makes_sqlite_unready_for_a_while_not_for_ever(tmp_path):
    """One refused write kept /readyz at 503 until a later write went through, which a replica out of service
    never gets: it stayed out after the disk had room again. It now counts for FAILING_FOR_S (the probe's own
    write sees a disk still full); a file that cannot be opened counts for good."""
    import math
    import time

    from proxy.state.sqlite import FAILING_FOR_S

    hub = StateHub(StateConfig(dir=str(tmp_path)))
    await hub.start()
    rec = hub.records("r")
    try:
        assert (await hub.check())["sqlite"] == "ok"
        rec.refused_at = time.monotonic()  # as the writer marks a write the file refused
        assert (await hub.check())["sqlite"] == "down"
        rec.refused_at = time.monotonic() - FAILING_FOR_S - 1
        assert (await hub.check())["sqlite"] == "ok"
        rec.refused_at = math.inf  # as the writer marks a file it cannot open
        assert (await hub.check())["sqlite"] == "down"
    finally:
        rec.refused_at = -math.inf
        await hub.close()
