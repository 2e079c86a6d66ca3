"""A stream's time to first token is its first body bytes', not its headers'.

A model server sends a stream's headers at once and its first token after prefill (vLLM's
OpenAI server does); ``FakeUpstream.first_event_delay`` plays that pause. Every observer that
reports time to first token reads ``ctx.timings.first_byte``: the ledger's ``ttft_ms`` and
the metrics histogram are checked here, through a real server and the openai SDK.
"""

from __future__ import annotations

from pathlib import Path

import openai

import pytest

from proxy.testing import FakeUpstream, SluiceServer, register_plugin
from tests.plugins.test_metering import ledger_rows
from tests.plugins.test_metrics import scrape, value
from tests.test_proxy import Chunky  # an on_chunk hook: the route's streams go through the parsed relay

PREFILL_S = 0.4


def config(upstream: FakeUpstream, parse: bool) -> dict:
    chain = [{"metering": {}}, {"metrics": {}}] + ([{"chunky": {}}] if parse else [])
    return {
        "upstreams": {"demo": {"url": upstream.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": chain}],
    }


@pytest.mark.parametrize("parse", [False, True], ids=["raw-relay", "parsed"])
async def test_time_to_first_token_waits_for_the_first_event(upstream: FakeUpstream, tmp_path: Path, parse: bool):
    upstream.first_event_delay = PREFILL_S
    with register_plugin(Chunky):
        async with SluiceServer(config(upstream, parse), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as client:
                stream = await client.chat.completions.create(
                    model="sluice-demo", stream=True, messages=[{"role": "user", "content": "hello there"}])
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert text
                buffered = await client.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
                assert buffered.choices[0].message.content
            await s.wait_idle()
            await s.runtime.state.records("ledger").flush()
            sm = await scrape(s)

    rows = {r["stream"]: r for r in ledger_rows(tmp_path)}
    assert rows[1]["ttft_ms"] >= PREFILL_S * 1000, rows  # was the headers' time: a few milliseconds
    assert rows[1]["ttft_ms"] <= rows[1]["latency_ms"]
    assert rows[0]["ttft_ms"] is None  # buffered answers have no time to first token

    assert value(sm, "gen_ai_server_time_to_first_token_seconds_count") == 1
    assert value(sm, "gen_ai_server_time_to_first_token_seconds_sum") >= PREFILL_S
