"""Ledger rows under a lock: held, then written; those a writer has to give up are counted in /metrics.

SQLite locked past ``state.sqlite_timeout_ms`` (another process holding the file, a backup) dropped the
batch: usage records lost. The writer now holds the rows and writes them, in order, once the lock goes;
rows it gives up (the file still locked at close) are logged and counted in ``sluice_records_dropped_total``
by records file and table, so an alert can fire.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import openai

from proxy.testing import FakeUpstream, SluiceServer, wait_for
from tests.plugins.test_metrics import scrape, value


def config(upstream: FakeUpstream) -> dict:
    return {
        "state": {"sqlite_timeout_ms": 100, "flush_interval_ms": 20},
        "upstreams": {"demo": {"url": upstream.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"metering": {}}]}],
    }


async def test_rows_under_a_held_lock_are_written_once_it_goes(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s:
        async def dropped() -> float:
            return value(await scrape(s), "sluice_records_dropped_total", records="ledger", table="ledger")

        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
            ask = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hi"}]}
            await client.chat.completions.create(**ask)
            await s.wait_idle()
            await s.runtime.state.records("ledger").flush()  # the table exists, one row written
            holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
            try:
                holder.execute("BEGIN EXCLUSIVE")  # as another process holding the file would
                for _ in range(3):
                    await client.chat.completions.create(**ask)
                await s.wait_idle()

                ledger = s.runtime.state.records("ledger")
                await wait_for(lambda: "ledger" in ledger._held, timeout=20, what="the rows held under the lock")
                assert await dropped() == 0
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            await ledger.flush()
            assert not ledger._held and await dropped() == 0
            rows = sqlite3.connect(tmp_path / "ledger.db").execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
            assert rows == 4  # none lost


async def test_rows_still_locked_at_close_are_given_up_and_counted(tmp_path: Path):
    from proxy.state import Table
    from proxy.state.sqlite import SQLiteRecords

    rec = SQLiteRecords(tmp_path / "r.db", timeout_ms=100, flush_interval_ms=20)
    rec.ensure(Table("t", {"id": str}))
    rec.append("t", {"id": "a"})
    await rec.flush()
    counted: list[tuple[str, int]] = []
    rec.on_dropped = lambda table, n: counted.append((table, n))
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        rec.append("t", {"id": "b"})
        rec.append("t", {"id": "c"})
        await wait_for(lambda: "t" in rec._held, timeout=20, what="the rows held under the lock")
        await rec.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert counted == [("t", 2)] and rec.dropped == 2


def keys_config(upstream: FakeUpstream) -> dict:
    """Virtual keys in SQLite, with a short lock timeout and a quick writer."""
    return {"state": {"sqlite_timeout_ms": 100, "flush_interval_ms": 20},
            "upstreams": {"demo": {"url": upstream.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"auth": {}}]}]}


def admin_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"authorization": "Bearer admin-token"})


async def created_key(s: SluiceServer, http: aiohttp.ClientSession, name: str) -> str:
    async with http.post(f"{s.admin_url}/admin/keys", json={"name": name}) as r:
        assert r.status == 201
        return (await r.json())["id"]


async def test_a_key_revoke_answers_only_once_its_row_is_in_the_file(upstream: FakeUpstream, tmp_path: Path):
    """An admin revoke under another process's lock on keys.db used to answer 200 with the row only held in
    the writer: a restart before the lock went lost the revoke. It now answers once the row is written, or
    503 when the lock outlasts the flush's wait, and the held row is written once the lock goes."""
    conf = keys_config(upstream)
    async with SluiceServer(conf, tmp_path) as s, admin_session() as http:
        key_id = await created_key(s, http, "svc")
        holder = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            async with http.delete(f"{s.admin_url}/admin/keys/{key_id}") as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "state_unavailable"
                assert r.headers["x-request-id"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        def revoked_in_file() -> bool:
            with sqlite3.connect(tmp_path / "keys.db") as db:
                return db.execute("SELECT revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()[0] is not None

        await wait_for(revoked_in_file, timeout=20, what="the held revoke written once the lock went")
        async with http.get(f"{s.admin_url}/admin/keys") as r:
            assert [k["status"] for k in (await r.json())["data"]] == ["revoked"]


async def test_a_key_write_the_file_refuses_is_an_error_not_a_success(upstream: FakeUpstream, tmp_path: Path):
    """A revoke whose row the file refused (a full disk, an I/O error: here a trigger that aborts it) answered
    200 "revoked" while the key stayed active and went on working. It is now 503 state_unavailable, the row
    counted as given up; the next write, once the file takes it, succeeds. A key store that cannot be opened
    at all refuses a create the same way, instead of handing out a secret that was never stored."""
    conf = keys_config(upstream)
    async with SluiceServer(conf, tmp_path) as s, admin_session() as http:
        key_id = await created_key(s, http, "leaked")
        with sqlite3.connect(tmp_path / "keys.db") as db:
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON keys WHEN NEW.revoked_at IS NOT NULL "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        async with http.delete(f"{s.admin_url}/admin/keys/{key_id}") as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "state_unavailable"
        assert value(await scrape(s), "sluice_records_dropped_total", records="keys", table="keys") == 1
        with sqlite3.connect(tmp_path / "keys.db") as db:
            db.execute("DROP TRIGGER refuse")
        async with http.delete(f"{s.admin_url}/admin/keys/{key_id}") as r:
            assert r.status == 200 and (await r.json())["status"] == "revoked"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keys.db").mkdir()  # a keys.db SQLite cannot open
    conf["state"]["dir"] = str(tmp_path / "other")
    async with SluiceServer(conf, tmp_path / "other") as s, admin_session() as http:
        async with http.post(f"{s.admin_url}/admin/keys", json={"name": "svc"}) as r:
            assert r.status == 503 and "key" not in (await r.json())
        async with http.get(f"{s.admin_url}/readyz") as r:  # the keys (and usage) it cannot store: not ready
            assert r.status == 503 and (await r.json())["state"]["sqlite"] == "down"
