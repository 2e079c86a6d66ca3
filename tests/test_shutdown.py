"""Stopping with a stream that outlasts the drain: the stream is cut, and its on_done still runs.

``server.drain_seconds`` bounds how long in-flight requests may take once a stop begins.
A stream still running past it is cut; its handler ends in ``finally``, which queues the
request's on_done (or adds it to the observers' batch). Those must run before the plugins
and the state stop: the ledger row (usage estimated), the metrics, the budget reconciliation.
Both ways an on_done can take are covered: inline batches (every on_done a plain function)
and the background queue (one async on_done on the route).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import openai
import pytest

from proxy import Context, Plugin, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, register_plugin, wait_for


class AsyncObserver(Plugin):
    """An async on_done: the route's on_done work goes through the background queue."""

    name = "async_observer"
    kind = "observer"

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        await asyncio.sleep(0)


def config(upstream: FakeUpstream, queued: bool) -> dict:
    chain = [{"metering": {}}] + ([{"async_observer": {}}] if queued else [])
    return {
        "server": {"drain_seconds": 0.5},
        "upstreams": {"demo": {"url": upstream.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": chain}],
    }


@pytest.mark.parametrize("queued", [False, True], ids=["inline", "queued"])
async def test_a_stream_cut_at_stop_keeps_its_ledger_row(upstream: FakeUpstream, tmp_path: Path, queued: bool):
    upstream.token_delay = 0.05
    upstream.reply_text = " ".join(["word"] * 400)  # about 20 s: far past the drain
    got: list[str] = []
    with register_plugin(AsyncObserver):
        async with SluiceServer(config(upstream, queued), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
                done = await client.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
                assert done.choices[0].message.content

                async def read() -> None:
                    stream = await client.chat.completions.create(
                        model="sluice-demo", stream=True, messages=[{"role": "user", "content": "go on"}])
                    async for c in stream:
                        if c.choices and c.choices[0].delta.content:
                            got.append(c.choices[0].delta.content)

                reader = asyncio.create_task(read())
                await wait_for(lambda: len(got) >= 3, timeout=10, what="the stream's first tokens")
                await asyncio.wait_for(s.server.drain(), timeout=20)  # the drain, the cut, the on_done, the stop
                with pytest.raises((openai.APIError, openai.APIConnectionError)):
                    await asyncio.wait_for(reader, timeout=10)  # the client saw its stream end early
    assert len(got) < 400

    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT stream, outcome, estimated, completion_tokens FROM ledger ORDER BY ts")]
    assert [r["stream"] for r in rows] == [0, 1], rows
    cut = rows[1]
    assert cut["estimated"] == 1 and cut["completion_tokens"] >= 3, cut
