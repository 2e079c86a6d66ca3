"""The SQLite records writer: everything queued goes in one transaction per wake-up, nothing is lost.

The writer drains its queue and writes each table's rows with ``executemany`` in one
transaction; rows whose columns the table lacks, or values SQLite cannot bind, take the
sqlite-utils path, and the result must be what sqlite-utils alone would have written.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import sqlite3
import threading
import uuid

import pytest
import sqlite_utils

from proxy import StateUnavailable
from proxy.state import Table
from proxy.state.sqlite import SQLiteRecords

LEDGER = Table("ledger", {"id": str, "n": int, "cost": float, "note": str}, pk="id")
LOG = Table("log", {"ts": float, "line": str})


def rows_of(path, sql):
    with sqlite3.connect(path) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute(sql)]


async def test_one_transaction_per_wake_up(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(LEDGER)
        rec.ensure(LOG)
        await rec.flush()
        before = rec.batches
        for i in range(3000):
            rec.append("ledger", {"id": f"r{i}", "n": i, "cost": i / 7, "note": None})
            rec.append("log", {"ts": float(i), "line": "x"})
        await rec.flush()
        # one transaction per table per wake-up, whatever the number of rows: the flush's wake-up,
        # and at most one more when the writer was still draining the first flush's queue as rows came
        assert 2 <= rec.batches - before <= 4
        assert rec.written == 6000 and rec.dropped == 0
        assert rows_of(tmp_path / "r.db", "SELECT COUNT(*) AS n, SUM(n) AS s FROM ledger") == [{"n": 3000, "s": sum(range(3000))}]
        assert rows_of(tmp_path / "r.db", "SELECT COUNT(*) AS n FROM log") == [{"n": 3000}]
    finally:
        await rec.close()


async def test_batch_size_bounds_a_transaction(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100, flush_interval_ms=60_000)
    try:
        rec.ensure(LOG)
        await rec.flush()
        before = rec.batches
        for i in range(1000):
            rec.append("log", {"ts": float(i), "line": "x"})
        await rec.flush()
        assert rec.written == 1000
        # no transaction holds more than batch_size rows; none is written row by row either
        assert 10 <= rec.batches - before < 100
    finally:
        await rec.close()


async def test_rows_land_in_order_across_column_sets(tmp_path):
    """Upserts: the last row with a key wins, even when rows between have other columns."""
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(LEDGER)
        rec.append("ledger", {"id": "a", "n": 1, "cost": 0.1, "note": "first"})
        rec.append("ledger", {"id": "a", "n": 2, "cost": 0.2, "note": "second", "team": "blue"})  # a new column
        rec.append("ledger", {"n": 3, "id": "a", "cost": 0.3, "note": "third"})  # same columns, other order
        rec.append("ledger", {"id": "b", "n": 4})  # fewer columns
        await rec.flush()
        got = rows_of(tmp_path / "r.db", "SELECT id, n, cost, note, team FROM ledger ORDER BY id")
        assert got == [
            {"id": "a", "n": 3, "cost": 0.3, "note": "third", "team": None},
            {"id": "b", "n": 4, "cost": None, "note": None, "team": None},
        ]
        assert rec.written == 4 and rec.dropped == 0
    finally:
        await rec.close()


async def test_values_and_new_tables_are_written_as_sqlite_utils_writes_them(tmp_path):
    when = datetime.datetime(2026, 11, 23, 19, 30, 5, 123456, tzinfo=datetime.timezone.utc)
    rows = [
        {"id": "p", "n": 1, "cost": 0.5, "note": "plain", "flag": True, "blob": b"\x00\x01"},
        {"id": "q", "n": 2, "cost": 1.5, "note": "nested", "flag": False, "blob": None, "meta": {"k": [1, 2], "é": "ü"}},
        {"id": "r", "n": 3, "cost": decimal.Decimal("2.25"), "note": "typed", "flag": False, "blob": None,
         "meta": [1, "two"], "at": when, "day": when.date(), "uid": uuid.UUID(int=7), "span": datetime.timedelta(seconds=90)},
        {"id": "s", "n": 4, "cost": 0.0, "note": "tuple", "flag": True, "blob": None, "meta": ("a", 1)},
    ]
    rec = SQLiteRecords(tmp_path / "ours.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        for r in rows:
            rec.append("things", r)  # never ensured: created from the rows
        rec.ensure(Table("typed", {"id": str, "n": int, "cost": float, "note": str, "flag": int, "blob": bytes}, pk="id"))
        for r in rows:
            rec.append("typed", r)
        await rec.flush()
    finally:
        await rec.close()
    assert rec.written == 8 and rec.dropped == 0

    ref = sqlite_utils.Database(tmp_path / "ref.db")
    for r in rows:  # one by one, as rows arrive: columns are added as they appear
        ref["things"].insert_all([r], alter=True)
    ref["typed"].create({"id": str, "n": int, "cost": float, "note": str, "flag": int, "blob": bytes}, pk="id")
    for r in rows:
        ref["typed"].insert_all([r], pk="id", replace=True, alter=True)
    ref.conn.close()
    for table in ("things", "typed"):
        ours = rows_of(tmp_path / "ours.db", f"SELECT * FROM {table} ORDER BY n")
        theirs = rows_of(tmp_path / "ref.db", f"SELECT * FROM {table} ORDER BY n")
        assert ours == theirs
        assert rows_of(tmp_path / "ours.db", f"SELECT name, type FROM pragma_table_info('{table}')") == \
            rows_of(tmp_path / "ref.db", f"SELECT name, type FROM pragma_table_info('{table}')")


async def test_a_row_sqlite_refuses_costs_only_itself(tmp_path):
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(LOG)
        for i in range(100):
            rec.append("log", {"ts": float(i), "line": object() if i == 37 else f"l{i}"})
        with pytest.raises(StateUnavailable):  # the flush says one row is not stored
            await rec.flush()
        assert rec.written == 99 and rec.dropped == 1
        assert rows_of(tmp_path / "r.db", "SELECT COUNT(*) AS n FROM log WHERE ts = 37") == [{"n": 0}]
        rec.append("log", {"ts": 100.0, "line": "after"})
        await rec.flush()
        assert rec.written == 100
    finally:
        await rec.close()


@pytest.mark.parametrize("bad", [2**63, {1, 2}], ids=["int past 64 bits", "a set in a new column"])
async def test_a_value_python_cannot_bind_costs_only_its_row_and_never_the_writer(tmp_path, bad):
    """An int past 64 bits (an OverflowError) or a set (a TypeError) raised out of the writer thread, which
    died: every row after it was lost, uncounted, and each flush timed out."""
    rec = SQLiteRecords(tmp_path / "r.db", flush_interval_ms=20, timeout_ms=500)
    try:
        rec.ensure(Table("t", {"id": str, "n": int}))
        rec.append("t", {"id": "a", "n": 1})
        rec.append("t", {"id": "b", "n": bad} if isinstance(bad, int) else {"id": "b", "n": 2, "extra": bad})
        rec.append("t", {"id": "c", "n": 3})
        with pytest.raises(StateUnavailable):
            await rec.flush()
        rec.append("t", {"id": "d", "n": 4})
        await rec.flush()
        assert rec._thread.is_alive() and rec.dropped == 1 and rec.written == 3
        assert [r["id"] for r in rows_of(tmp_path / "r.db", "SELECT id FROM t ORDER BY id")] == ["a", "c", "d"]
    finally:
        await rec.close()


async def test_nothing_is_lost_while_the_writer_runs_and_at_close(tmp_path):
    """Appends racing a busy writer (small interval, small batches), then close: every row is there once."""
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=64, flush_interval_ms=1)
    rec.ensure(LEDGER)
    n = 20_000
    for i in range(n):
        rec.append("ledger", {"id": f"r{i}", "n": i, "cost": 0.001, "note": "x" * (i % 50)})
        if i % 97 == 0:
            await asyncio.sleep(0)  # let the loop run as it would between requests
    await rec.close()
    assert rec.written == n and rec.dropped == 0
    assert rows_of(tmp_path / "r.db", "SELECT COUNT(*) AS n, COUNT(DISTINCT id) AS d, SUM(n) AS s FROM ledger") == \
        [{"n": n, "d": n, "s": n * (n - 1) // 2}]


async def test_two_writers_on_one_file_lose_nothing(tmp_path):
    """Workers share a file: both writers' transactions wait for each other, none is dropped."""
    a = SQLiteRecords(tmp_path / "shared.db", batch_size=50, flush_interval_ms=1)
    b = SQLiteRecords(tmp_path / "shared.db", batch_size=50, flush_interval_ms=1)
    a.ensure(LOG)
    b.ensure(LOG)
    for i in range(5000):
        a.append("log", {"ts": float(i), "line": "a"})
        b.append("log", {"ts": float(i), "line": "b"})
        if i % 100 == 0:
            await asyncio.sleep(0)
    await asyncio.gather(a.close(), b.close())
    assert (a.written, a.dropped, b.written, b.dropped) == (5000, 0, 5000, 0)
    assert rows_of(tmp_path / "shared.db", "SELECT line, COUNT(*) AS n FROM log GROUP BY line ORDER BY line") == \
        [{"line": "a", "n": 5000}, {"line": "b", "n": 5000}]


async def test_the_writer_is_one_thread_that_sleeps_between_batches(tmp_path):
    """Appending does not wake the writer: with a long interval, rows wait for a flush."""
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(LOG)
        await rec.flush()
        writers = [t for t in threading.enumerate() if t.name == "sluice-records-r"]
        assert len(writers) == 1
        for i in range(500):
            rec.append("log", {"ts": float(i), "line": "x"})
        assert rec.written == 0  # nothing woke the writer
        await rec.flush()
        assert rec.written == 500
    finally:
        await rec.close()


async def test_last_row_wins_inside_and_across_multi_row_statements(tmp_path):
    """500 upserts over 7 keys in one batch (several multi-row statements and a remainder): the last of each key wins."""
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(LEDGER)
        for i in range(500):
            rec.append("ledger", {"id": f"k{i % 7}", "n": i, "cost": i / 3, "note": str(i)})
        for i in range(37):  # a plain-append table in the same wake-up: every row kept, in order
            rec.append("log", {"ts": float(i), "line": f"l{i}"})
        await rec.flush()
        got = rows_of(tmp_path / "r.db", "SELECT id, n, note FROM ledger ORDER BY id")
        assert got == [{"id": f"k{r}", "n": max(i for i in range(500) if i % 7 == r), "note": str(max(i for i in range(500) if i % 7 == r))}
                       for r in range(7)]
        assert [r["line"] for r in rows_of(tmp_path / "r.db", "SELECT line FROM log ORDER BY rowid")] == [f"l{i}" for i in range(37)]
        assert rec.written == 537 and rec.dropped == 0
    finally:
        await rec.close()


async def test_rows_given_as_values_land_as_the_same_rows_as_dicts(tmp_path):
    """append_values(table, cols, vals) writes what append(table, dict(zip(cols, vals))) writes.

    Mixed with dict rows in one batch, with new columns (the sqlite-utils path), values SQLite
    cannot bind, upserts across both kinds, and a run of one shape sharing its columns tuple.
    """
    when = datetime.datetime(2026, 11, 23, 19, 30, 5, tzinfo=datetime.timezone.utc)
    shape = ("id", "n", "cost", "note")
    rows = [
        {"id": "a", "n": 1, "cost": 0.5, "note": "plain"},
        {"id": "b", "n": 2, "cost": 1.5, "note": "new column", "team": "red"},
        {"id": "c", "n": 3, "cost": decimal.Decimal("2.25"), "note": "typed", "meta": {"k": [1, 2]}, "at": when},
        *({"id": f"r{i}", "n": 10 + i, "cost": i / 4, "note": None} for i in range(150)),
        {"id": "a", "n": 4, "cost": 0.0, "note": "a again, last wins"},
    ]
    for name, as_values in (("dicts", lambda i: False), ("values", lambda i: True), ("mixed", lambda i: i % 3 == 1)):
        rec = SQLiteRecords(tmp_path / f"{name}.db", batch_size=100_000, flush_interval_ms=60_000)
        try:
            rec.ensure(LEDGER)
            for i, r in enumerate(rows):
                if as_values(i):
                    cols = shape if tuple(r) == shape else tuple(r)
                    rec.append_values("ledger", cols, tuple(r.values()))
                else:
                    rec.append("ledger", r)
            await rec.flush()
        finally:
            await rec.close()
        assert rec.written == len(rows) and rec.dropped == 0
    want = rows_of(tmp_path / "dicts.db", "SELECT * FROM ledger ORDER BY id")
    assert len(want) == 153 and want[0]["note"] == "a again, last wins"
    for name in ("values", "mixed"):
        assert rows_of(tmp_path / f"{name}.db", "SELECT * FROM ledger ORDER BY id") == want
        assert rows_of(tmp_path / f"{name}.db", "SELECT name, type FROM pragma_table_info('ledger')") == \
            rows_of(tmp_path / "dicts.db", "SELECT name, type FROM pragma_table_info('ledger')")


async def test_none_lands_as_null_in_every_column_and_statement_kind(tmp_path):
    """None is bound as NaN (the sqlite3 module's fast path; SQLite stores a NaN as NULL): every
    column type reads back NULL, through the multi-row statements and the executemany tail alike,
    and the values beside it are untouched (a 0, an empty string and a real NaN included)."""
    table = Table("t", {"id": str, "n": int, "cost": float, "note": str}, pk="id")
    n_rows = 64 * 2 + 5  # two full multi-row statements, then five rows through executemany
    rec = SQLiteRecords(tmp_path / "r.db", batch_size=100_000, flush_interval_ms=60_000)
    try:
        rec.ensure(table)
        for i in range(n_rows):
            if i % 2:
                rec.append_values("t", ("id", "n", "cost", "note"), (f"r{i:03d}", None, None, None))
            else:
                rec.append_values("t", ("id", "n", "cost", "note"), (f"r{i:03d}", 0, float("nan") if i % 4 else 0.0, ""))
        await rec.flush()
    finally:
        await rec.close()
    with sqlite3.connect(tmp_path / "r.db") as c:
        got = c.execute("SELECT id, n, typeof(n), cost, typeof(cost), note, typeof(note) FROM t ORDER BY id").fetchall()
    assert len(got) == n_rows
    for i, (rid, n, tn, cost, tc, note, tt) in enumerate(got):
        assert rid == f"r{i:03d}"
        if i % 2:
            assert (n, tn, cost, tc, note, tt) == (None, "null", None, "null", None, "null")
        else:
            assert (n, tn, note, tt) == (0, "integer", "", "text")
            # SQLite itself stores a NaN as NULL, however it is bound
            assert (cost, tc) == ((None, "null") if i % 4 else (0.0, "real"))
