"""A guard that gives up on an answer is recorded the same way whether the answer was buffered or streamed.

A stream stopped mid-way (an error event after its 200) was a success to metrics (error_type "") and
tracing (server span UNSET), and no guardrail block, while the same guard replacing the same answer
buffered was an error; and the buffered one kept the outcome "ok" (its span said error.type "ok")."""

from __future__ import annotations

import openai
import pytest

from proxy import Context, Event, Plugin, ProxyError, StashKey, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, register_plugin

from tests.plugins.otlp_receiver import OTLPReceiver

SEEN: StashKey[list[int]] = StashKey("screen.seen")


class Screen(Plugin):
    """An answer screen that gives up (as pii's answer screen does when it times out with on_error: closed)."""

    name = "screen"
    kind = "guard"

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        if ctx.response is not None and ctx.response.status == 200:
            raise ProxyError(503, "The answer screen did not finish in time.", code="screen_timeout", reason="screen_timeout")

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        n = ctx.stash.setdefault(SEEN, [0])
        n[0] += 1
        if n[0] == 3:
            raise ProxyError(503, "The answer screen did not finish in time.", code="screen_timeout", reason="screen_timeout")


def cfg(upstream: FakeUpstream, rx: OTLPReceiver) -> dict:
    return {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo", "chain": [
            {"metering": {"ledger": False}},
            {"tracing": {"endpoint": rx.traces_url, "schedule_delay_ms": 10}},
            {"metrics": {}},
            {"screen": {}},
        ]}],
    }


async def test_a_stream_a_guard_stopped_is_an_error_as_the_same_buffered_answer_is(upstream: FakeUpstream, tmp_path):
    msgs = [{"role": "user", "content": "a long answer please " * 5}]
    with register_plugin(Screen):
        async with OTLPReceiver() as rx:
            async with SluiceServer(cfg(upstream, rx), tmp_path) as s:
                async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
                    with pytest.raises(openai.APIStatusError) as buffered:
                        await c.chat.completions.create(model="sluice-demo", messages=msgs)
                    assert buffered.value.status_code == 503
                    with pytest.raises(openai.APIError) as streamed:
                        async for _ in await c.chat.completions.create(model="sluice-demo", messages=msgs, stream=True):
                            pass
                    assert "did not finish in time" in streamed.value.message
                await s.wait_idle()
                spans = await rx.wait_for(lambda sp: len([x for x in sp if x["kind"] == "server"]) == 2)
                reg = s.runtime.metrics
                ops = {et: reg.get_sample_value("gen_ai_client_operation_duration_seconds_count", {
                    "gen_ai_operation_name": "chat", "gen_ai_request_model": "sluice-demo", "route": "main", "error_type": et})
                    for et in ("", "503")}
                blocks = reg.get_sample_value("sluice_guardrail_blocks_total",
                                              {"route": "main", "plugin": "screen", "reason": "screen_timeout"})
                reqs = {k: reg.get_sample_value("sluice_requests_total", {"route": "main", "model": "sluice-demo",
                                                                          "status_class": sc, "outcome": oc})
                        for k, (sc, oc) in {"buffered": ("5xx", "answered"), "streamed": ("2xx", "answered")}.items()}
    buffered_span, streamed_span = sorted((x for x in spans if x["kind"] == "server"), key=lambda x: x["start_ns"])
    b, st = buffered_span["attributes"], streamed_span["attributes"]
    assert (buffered_span["status"], b["error.type"], b["sluice.outcome"], b["http.response.status_code"]) == (2, "503", "answered", 503)
    assert (streamed_span["status"], st["error.type"], st["sluice.outcome"], st["http.response.status_code"]) == (2, "503", "answered", 200)
    assert ops == {"": None, "503": 2.0}  # both failed operations, neither a success
    assert blocks == 2 and reqs == {"buffered": 1.0, "streamed": 1.0}
