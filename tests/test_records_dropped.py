"""Ledger rows a records writer has to give up are counted where operators look: /metrics.

SQLite locked past ``state.sqlite_timeout_ms`` (another process holding the file, a backup)
makes the writer drop the batch; the log says so, and ``sluice_records_dropped_total`` counts
the rows by records file and table, so an alert can fire.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import openai

from proxy.testing import FakeUpstream, SluiceServer, wait_for
from tests.plugins.test_metrics import scrape, value


def config(upstream: FakeUpstream) -> dict:
    return {
        "state": {"sqlite_timeout_ms": 100, "flush_interval_ms": 20},
        "upstreams": {"demo": {"url": upstream.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"metering": {}}]}],
    }


async def test_rows_given_up_under_a_held_lock_are_counted(upstream: FakeUpstream, tmp_path: Path):
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

                async def three() -> bool:
                    return await dropped() >= 3

                await wait_for(three, timeout=20, what="3 dropped rows counted")
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert await dropped() == 3
    rows = sqlite3.connect(tmp_path / "ledger.db").execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    assert rows == 1
