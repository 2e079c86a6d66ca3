"""Nothing lost: N requests of every kind, SIGTERM while streams run, exactly N ledger rows."""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import openai
import pytest

from proxy.testing import FakeUpstream, SluiceProcess

BUFFERED, STREAMED, CANCELLED, FAILED = 12, 12, 8, 8
N = BUFFERED + STREAMED + CANCELLED + FAILED
WORDS = " ".join(f"word{i}" for i in range(60))


@pytest.mark.slow
async def test_sigterm_under_load_keeps_one_row_per_request(tmp_path):
    async with FakeUpstream() as up:
        up.token_delay = 0.02  # streams of ~60 tokens last over a second: SIGTERM lands mid-stream
        up.fail_next(500, count=FAILED)  # the first requests to arrive fail upstream
        cfg = {
            "server": {"drain_seconds": 20},
            "upstreams": {"demo": {"url": up.url, "models": ["sluice-demo"]}},
            "prices": {"sluice-demo": {"input": 1.0, "output": 2.0}},
            "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo", "chain": [{"metering": {}}]}],
        }
        async with SluiceProcess(cfg, tmp_path) as proc:
            async with openai.AsyncOpenAI(base_url=proc.url, api_key="sk", max_retries=0, timeout=30) as c:
                msgs = [{"role": "user", "content": WORDS}]

                async def failing() -> str:
                    try:
                        await c.chat.completions.create(model="sluice-demo", messages=msgs, max_tokens=5)
                    except openai.InternalServerError:
                        return "failed"
                    return "unexpected"

                async def buffered() -> str:
                    await c.chat.completions.create(model="sluice-demo", messages=msgs, max_tokens=5)
                    return "buffered"

                async def streamed() -> str:
                    async for _ in await c.chat.completions.create(model="sluice-demo", messages=msgs, stream=True):
                        pass
                    return "streamed"

                async def cancelled() -> str:
                    stream = await c.chat.completions.create(model="sluice-demo", messages=msgs, stream=True)
                    got = 0
                    async for _ in stream:
                        got += 1
                        if got == 3:
                            break
                    await stream.close()
                    return "cancelled"

                fails = [asyncio.create_task(failing()) for _ in range(FAILED)]
                await up.wait_for(lambda: len(up.requests) >= FAILED, timeout=20)
                tasks = fails + [asyncio.create_task(f()) for f, n in ((buffered, BUFFERED), (streamed, STREAMED),
                                                                       (cancelled, CANCELLED)) for _ in range(n)]
                # every request reached the upstream and streams are running: stop the proxy now
                await up.wait_for(lambda: len(up.requests) >= N and up.stats.running >= STREAMED // 2, timeout=20)
                proc.signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks)
            assert await proc.wait(30) == 0
    assert sorted(results) == sorted(["failed"] * FAILED + ["buffered"] * BUFFERED + ["streamed"] * STREAMED
                                     + ["cancelled"] * CANCELLED)
    conn = sqlite3.connect(tmp_path / "state" / "ledger.db")
    try:
        rows = conn.execute("SELECT id, status, stream, outcome, estimated, completion_tokens FROM ledger").fetchall()
    finally:
        conn.close()
    assert len(rows) == N and len({r[0] for r in rows}) == N
    assert sum(1 for r in rows if r[1] == 500) == FAILED
    streams = [r for r in rows if r[2] == 1]
    assert len(streams) == STREAMED + CANCELLED
    # completed streams carry the upstream's usage; cut ones are estimated
    assert sum(1 for r in streams if r[4] == 0 and r[5] > 0) >= STREAMED
