"""The observers' on_done work is queued and done in batches; nothing a reader can see lags behind.

``plugins.metrics.Deferred`` holds the work of the metrics, metering, drift and tracing hooks
until ``LIMIT`` requests wait, ``DELAY`` seconds pass, or someone reads what it produces. These
tests pin what must not change because of it: a scrape, the usage report and the drift report
show every finished request; a stop loses nothing; with several workers nothing waits; each
request's hooks still run in chain order; failures are counted as the plugin's own.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import openai
import pytest

from plugins.drift import Drift
from plugins.metering import Metering
from plugins.metrics import Deferred, Metrics, deferred, families
from plugins.tracing import Tracing
from proxy import Attempt, Identity, Response, Target, Usage
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime

ANSWER = b'{"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}'


def finished(rt, i: int = 0):
    ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt,
                       identity=Identity(key_id="k1", team="t1"))
    ctx.request_id = f"req_{i:08d}"
    t = ctx.timings
    ctx.attempts.append(Attempt(Target("up"), start=t.start, status=200, first_byte=t.start + 0.01, end=t.start + 0.02))
    ctx.upstream = Target("up")
    t.upstream_start, t.upstream_end, t.end = t.start, t.start + 0.02, t.start + 0.021
    ctx.response = Response(200, {"content-type": "application/json"}, ANSWER)
    ctx.usage = Usage(7, 3, 10)
    ctx.outcome, ctx.status = "ok", 200
    return ctx


class Spans:
    """Stands in for the span batcher (exporter ``none`` has none): keeps the encoded spans."""

    def __init__(self, into: list[bytes]) -> None:
        self.add = into.append

    def shutdown(self) -> None:
        return None


RT_CONFIG = {"upstreams": {"up": {"url": "http://127.0.0.1:9/v1", "models": ["m"]}}, "prices": {"m": {"input": 1.0, "output": 2.0}}}


async def test_a_registry_read_runs_the_queued_work_first(tmp_path):
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    try:
        metrics = await configure_plugin(Metrics, {}, runtime=rt)
        meter = await configure_plugin(Metering, {}, runtime=rt)
        n = Deferred.LIMIT // 2 - 1  # two hooks a request: fewer items than a batch, and no time passes
        for i in range(n):
            ctx = finished(rt, i)
            metrics.on_done(ctx)
            meter.on_done(ctx)
        assert len(deferred(rt).items) == 2 * n  # queued, not done
        reg = rt.metrics
        labels = {"route": "none", "model": "m", "status_class": "2xx", "outcome": "ok"}
        assert reg.get_sample_value("sluice_requests_total", labels) == n
        assert reg.get_sample_value("sluice_cost_total", {"route": "none", "model": "m"}) == pytest.approx(n * 13e-6)
        assert deferred(rt).items == []
        await meter.stop()
        rows = await rt.state.records("ledger").query("SELECT COUNT(*) AS n FROM ledger")
        assert rows[0]["n"] == n
    finally:
        await rt.close_all()


async def test_a_batch_runs_when_full_and_the_rest_after_the_delay(tmp_path):
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    try:
        meter = await configure_plugin(Metering, {}, runtime=rt)
        d = deferred(rt)
        for i in range(Deferred.LIMIT + 3):
            meter.on_done(finished(rt, i))
        assert len(d.items) == 3  # the first LIMIT ran when the batch was full
        await rt.tasks.wait(5)  # the timer started with the first of the rest
        assert d.items == []
        rows = await rt.state.records("ledger").query("SELECT COUNT(*) AS n FROM ledger")
        assert rows[0]["n"] == Deferred.LIMIT + 3
        await meter.stop()
    finally:
        await rt.close_all()


async def test_stop_loses_nothing_and_hooks_run_in_chain_order(tmp_path):
    """Metering's cost reaches the tracing span of the same request: its work runs first, as its hook does."""
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    try:
        meter = await configure_plugin(Metering, {}, runtime=rt)
        tracing = await configure_plugin(Tracing, {"exporter": "none"}, runtime=rt)
        seen: list[bytes] = []
        tracing.pipeline.wire = Spans(seen)
        ctxs = [finished(rt, i) for i in range(5)]
        for ctx in ctxs:
            tracing.on_request(ctx)
            meter.on_done(ctx)
            tracing.on_done(ctx)
            assert ctx.cost is None  # queued
        await tracing.stop()  # the first to stop (reverse chain order) does everything queued
        assert all(ctx.cost == pytest.approx(13e-6) for ctx in ctxs)
        assert len(seen) == 10 and all(b"sluice.cost" in span for span in seen[1::2])
        rows = await rt.state.records("ledger").query("SELECT COUNT(*) AS n FROM ledger")
        assert rows[0]["n"] == 5
        await meter.stop()
    finally:
        await rt.close_all()


async def test_a_failure_in_queued_work_is_the_plugins_on_done_error(tmp_path, caplog):
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    errors = []
    rt.on_plugin_error = lambda plugin_id, phase: errors.append((plugin_id, phase))
    try:
        metrics = await configure_plugin(Metrics, {}, runtime=rt)
        bad, good = finished(rt, 1), finished(rt, 2)
        bad.timings.plugins["auth.on_request"] = "not a duration"
        caplog.set_level(logging.WARNING, logger="sluice.observers")
        metrics.on_done(bad)
        metrics.on_done(good)
        deferred(rt).run()
        assert errors == [(metrics.id, "on_done")]
        assert "plugin metrics failed in on_done (TypeError) request_id=req_00000001" in caplog.text
        assert rt.metrics.get_sample_value(
            "sluice_requests_total", {"route": "none", "model": "m", "status_class": "2xx", "outcome": "ok"}) == 2
    finally:
        await rt.close_all()


async def test_several_workers_wait_for_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    (tmp_path / "prom").mkdir()
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    try:
        metrics = await configure_plugin(Metrics, {}, runtime=rt)
        assert deferred(rt).eager
        metrics.on_done(finished(rt))
        assert deferred(rt).items == [] and families(rt).dirty == []
    finally:
        await rt.close_all()


async def test_drift_compares_every_check_of_a_batch_and_closes_windows_on_time(tmp_path):
    """A whole batch of samples arrives at once: a check due while a comparison runs is made after it."""
    rt = await make_runtime(tmp_path, config=RT_CONFIG)
    try:
        drift = await configure_plugin(Drift, {"window_samples": 20, "reservoir_size": 20, "min_samples": 10,
                                               "check_every": 5, "seed": 3}, runtime=rt)
        compared = []
        publish = drift.publish
        drift.publish = lambda key, res: (compared.append(res), publish(key, res))
        for i in range(60):
            drift.on_done(finished(rt, i))
        await drift.settled()
        (m,) = drift.report()
        assert m["windows_closed"] == 3 and m["window_samples"] == 0
        # window 2: checks at 10, 15 and 20 samples; window 3 the same: every one compared, in order
        assert len(compared) == 6
        assert [r.features[0].n_current for r in compared] == [10, 15, 20, 10, 15, 20]
    finally:
        await rt.close_all()


async def test_reports_right_after_the_requests_show_all_of_them(tmp_path):
    async with FakeUpstream() as up:
        cfg = {
            "upstreams": {"demo": {"url": up.url, "models": ["sluice-demo"]}},
            "prices": {"sluice-demo": {"input": 1.0, "output": 2.0}},
            "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo",
                        "chain": [{"metrics": {}}, {"metering": {}}, {"drift": {}}]}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
                await asyncio.gather(*(c.chat.completions.create(
                    model="sluice-demo", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(7)))
            await s.wait_idle()
            headers = {"authorization": f"Bearer {s.admin_token}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                async with http.get(f"{s.admin_url}/metrics") as r:
                    text = await r.text()
                async with http.get(f"{s.admin_url}/admin/usage", params={"group_by": "model"}) as r:
                    usage = (await r.json())["rows"]
                async with http.get(f"{s.admin_url}/admin/drift") as r:
                    (monitor,) = (await r.json())["monitors"]
    assert 'sluice_requests_total{model="sluice-demo",outcome="ok",route="main",status_class="2xx"} 7.0' in text
    assert 'sluice_drift_samples_total{model="sluice-demo",route="main"} 7.0' in text
    assert usage[0]["requests"] == 7
    assert monitor["window_samples"] == 7
