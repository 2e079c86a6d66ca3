"""Drift plugin through a real server: a known shift is flagged, steady traffic is not."""

from __future__ import annotations

import logging
import random

import aiohttp
import openai
import pytest

from plugins.drift import Drift, render_report
from proxy import Attempt, Target, Usage
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime

# check_interval_s 0: compared every check_every samples however fast they come, so detection is stated in samples
DRIFT = {"window_samples": 60, "reservoir_size": 60, "min_samples": 30, "check_every": 10, "check_interval_s": 0, "reference": "pinned", "seed": 1}


def config(upstream: FakeUpstream, **drift) -> dict:
    return {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo",
                    "chain": [{"metrics": {}}, {"drift": {**DRIFT, **drift}}]}],
    }


def prompt(rng: random.Random, words: int) -> str:
    return " ".join("w%d" % rng.randrange(1000) for _ in range(max(1, int(rng.gauss(words, words * 0.15)))))


async def report(s: SluiceServer) -> list[dict]:
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
        async with http.get(f"{s.admin_url}/admin/drift") as r:
            assert r.status == 200
            return (await r.json())["monitors"]


async def scrape(s: SluiceServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{s.admin_url}/metrics") as r:
        return await r.text()


async def send(c: openai.AsyncOpenAI, rng: random.Random, words: int, n: int) -> None:
    for _ in range(n):
        await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": prompt(rng, words)}],
                                        max_tokens=8)


async def settle(s: SluiceServer) -> None:
    await s.wait_idle()
    await s.runtime.tasks.wait(10)


async def test_known_shift_is_detected_within_40_samples(upstream: FakeUpstream, tmp_path, caplog):
    """Prompts grow from ~40 to ~80 words: the reference is the first 60 requests; drift is flagged
    at the first comparison that has min_samples (30) shifted requests, and by 40 at the latest."""
    rng = random.Random(7)
    caplog.set_level(logging.WARNING, logger="sluice.drift")
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            await send(c, rng, 40, 60)
            await settle(s)
            (m,) = await report(s)
            assert m["reference_samples"] == 60 and m["drifted"] == []
            detected = None
            for i in range(1, 5):
                await send(c, rng, 80, 10)
                await settle(s)
                (m,) = await report(s)
                if "prompt_tokens" in m["drifted"]:
                    detected = i * 10
                    break
            assert detected is not None and detected <= 40, m
            text = await scrape(s)
    assert 'sluice_drift_alarm{feature="prompt_tokens",model="sluice-demo",route="main"} 1.0' in text
    assert any(getattr(r, "event", None) == "drift" and r.feature == "prompt_tokens" for r in caplog.records)
    assert "prompt_tokens" in render_report([m])


async def test_pinning_the_shifted_window_starts_a_new_one_and_clears_the_alarm(upstream: FakeUpstream, tmp_path):
    """A pin kept the window open: the next comparisons set it against a copy of itself (a shift would go
    unseen), and the old alarm stayed up until then."""
    rng = random.Random(7)
    # wall-clock latency is not steady on a shared machine: only the features the test controls
    steady = config(upstream, features=["prompt_tokens", "completion_tokens", "finish_reason", "refusal", "error"])
    async with SluiceServer(steady, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            await send(c, rng, 40, 60)
            await send(c, rng, 80, 40)
            await settle(s)
            (m,) = await report(s)
            assert "prompt_tokens" in m["drifted"] and m["window_samples"] == 40
            async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
                async with http.post(f"{s.admin_url}/admin/drift/pin", params={"route": "main"}) as r:
                    assert r.status == 200
            (m,) = await report(s)
            assert m["reference_samples"] == 40 and m["window_samples"] == 0 and m["drifted"] == [] and m["last"] is None
            assert 'sluice_drift_alarm{feature="prompt_tokens",model="sluice-demo",route="main"} 0.0' in await scrape(s)
            # the new reference is the shifted traffic, compared with the samples that came after the pin only
            await send(c, rng, 80, 30)
            await settle(s)
            (m,) = await report(s)
    assert m["last"] is not None and m["drifted"] == []
    assert {f["feature"]: f["n_current"] for f in m["last"]["features"]}["prompt_tokens"] == 30


async def test_steady_traffic_raises_no_alarm(upstream: FakeUpstream, tmp_path, caplog):
    rng = random.Random(11)
    caplog.set_level(logging.WARNING, logger="sluice.drift")
    # wall-clock latency is not steady on a shared machine: only the features the test controls (steady
    # latency is test_steady_latency_is_not_degraded's, with latencies it sets)
    steady = config(upstream, reference="previous",
                    features=["prompt_tokens", "completion_tokens", "finish_reason", "refusal", "error"])
    async with SluiceServer(steady, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            for _ in range(8):
                await send(c, rng, 40, 25)
                await settle(s)
        (m,) = await report(s)
    assert m["windows_closed"] >= 3 and m["last"] is not None
    assert m["drifted"] == [] and m["last"]["latency"] is None  # latency_s is not recorded here
    assert not [r for r in caplog.records if getattr(r, "event", None) in ("drift", "latency_degraded")]


async def test_steady_latency_is_not_degraded(tmp_path, caplog):
    """Latency is compared (against the reference window's p95) and found steady; the same comparison
    flags a window 1.6 times slower, past the default tolerance of 0.5."""
    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["latency_s", "error"]}, runtime=rt)
        rng = random.Random(4)

        async def feed(n: int, scale: float) -> dict:
            for _ in range(n):
                c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
                c.attempts.append(Attempt(Target("up"), start=c.timings.start))
                c.outcome, c.status = "ok", 200
                c.timings.end = c.timings.start + scale * rng.uniform(0.05, 0.1)
                p.on_done(c)
            await rt.tasks.wait(10)
            (m,) = p.report()
            return m

        await feed(60, 1.0)  # the reference
        m = await feed(30, 1.0)
        lat = m["last"]["latency"]
        assert lat is not None and 0.8 < lat["ratio"] < 1.25 and not m["latency_degraded"] and not caplog.records
        assert rt.metrics.get_sample_value("sluice_drift_latency_degraded", {"route": "none", "model": "other"}) == 0
        m = await feed(30, 1.6 / 0.95)  # the window's p95 is now past 1.5 times the reference's
        assert m["latency_degraded"]
        assert [getattr(r, "event", None) for r in caplog.records].count("latency_degraded") == 1
    finally:
        await rt.close_all()


async def test_streams_give_token_features_without_metering(upstream: FakeUpstream, tmp_path):
    """drift alone asks the upstream for a stream's usage: the sample has the stream's tokens, and the
    client's stream has no usage chunk."""
    from plugins.drift import _instances

    cfg = config(upstream)
    cfg["routes"][0]["chain"] = [{"drift": DRIFT}]
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            chunks = [ch async for ch in await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": "a b c"}], max_tokens=4, stream=True)]
        await settle(s)
        (drift,) = _instances(s.runtime)
        (m,) = drift.monitors.values()
        window = m.current.snapshot()
    assert all(ch.usage is None for ch in chunks)
    assert window.numeric["completion_tokens"] == [4.0] and window.numeric["prompt_tokens"][0] > 0
    # the categorical features of a stream, from its finishing event (ctx.stream_end)
    assert window.categorical["finish_reason"] == {"length": 1} and window.categorical["refusal"] == {"no": 1}


async def test_pin_through_the_admin_api(upstream: FakeUpstream, tmp_path):
    rng = random.Random(3)
    async with SluiceServer(config(upstream, reference="previous"), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            await send(c, rng, 20, 30)  # min_samples: a smaller window is not pinned
        await settle(s)
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            async with http.post(f"{s.admin_url}/admin/drift/pin", params={"route": "main"}) as r:
                assert (await r.json())["pinned"] == [["main", "sluice-demo"]]
            # a route or model no monitor has is a 404, not "nothing pinned" (a typo went unnoticed)
            for params in ({"route": "nope"}, {"route": "main", "model": "nope"}):
                async with http.post(f"{s.admin_url}/admin/drift/pin", params=params) as r:
                    assert r.status == 404 and "No drift monitor for" in (await r.json())["error"]["message"]
        (m,) = await report(s)
    assert m["pinned"] and m["reference_samples"] == 30


async def test_latency_degradation_and_plugin_features(tmp_path):
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "baseline_p95_ms": 100}, runtime=rt)
        rng = random.Random(5)

        def ctx(latency: float, score: float):
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
            c.attempts.append(Attempt(Target("up"), start=c.timings.start))
            c.outcome, c.status = "ok", 200
            c.usage = Usage(10, 5, 15)
            c.timings.end = c.timings.start + latency
            c.features["toxicity"] = score
            return c

        for _ in range(60):
            p.on_done(ctx(rng.uniform(0.01, 0.08), rng.gauss(0.1, 0.02)))
        await rt.tasks.wait(10)
        for _ in range(30):
            p.on_done(ctx(rng.uniform(0.2, 0.4), rng.gauss(0.5, 0.02)))
        await rt.tasks.wait(10)
        (m,) = p.report()
        assert m["latency_degraded"] and "toxicity" in m["drifted"]
        assert m["last"]["latency"]["baseline_p95"] == pytest.approx(0.1)
    finally:
        await rt.close_all()


def gauge(rt, name: str, **labels) -> float | None:
    return rt.metrics.get_sample_value(name, {"route": "none", "model": "other", **labels})


async def test_a_feature_that_drops_out_of_the_comparison_clears_its_alarm(tmp_path, caplog):
    """ttft_s drifts, then a window has no streams: ttft_s is no longer compared, so its alarm gauge
    goes back to 0 and "drift cleared" is logged, as the report says."""
    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["latency_s", "ttft_s", "error"]}, runtime=rt)
        rng = random.Random(9)

        def ctx(ttft: float | None):
            c = make_context({"model": "m", "stream": ttft is not None, "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
            c.attempts.append(Attempt(Target("up"), start=c.timings.start))
            c.outcome, c.status = "ok", 200
            c.timings.end = c.timings.start + rng.uniform(1.0, 1.1)
            if ttft is not None:
                c.timings.first_byte = c.timings.start + ttft
            return c

        async def feed(n: int, ttft: tuple[float, float] | None) -> None:
            for _ in range(n):
                p.on_done(ctx(rng.uniform(*ttft) if ttft else None))
            await rt.tasks.wait(10)

        await feed(60, (0.01, 0.02))  # the reference window (pinned)
        await feed(30, (0.5, 0.6))  # slower first tokens
        (m,) = p.report()
        assert m["drifted"] == ["ttft_s"] and gauge(rt, "sluice_drift_alarm", feature="ttft_s") == 1
        await feed(30, None)  # the window closes, still comparing its 30 streams
        await feed(30, None)  # a new window without streams: ttft_s is not compared any more
        (m,) = p.report()
        assert "ttft_s" not in [f["feature"] for f in m["last"]["features"]]
        assert m["drifted"] == [] and gauge(rt, "sluice_drift_alarm", feature="ttft_s") == 0
        psi, p_value = gauge(rt, "sluice_drift_psi", feature="ttft_s"), gauge(rt, "sluice_drift_p_value", feature="ttft_s")
        assert psi != psi and p_value != p_value  # NaN: no current value, not the last one
        assert gauge(rt, "sluice_drift_psi", feature="latency_s") < 1  # still compared
        cleared = [r for r in caplog.records if getattr(r, "event", None) == "drift_cleared"]
        assert [r.feature for r in cleared] == ["ttft_s"]
    finally:
        await rt.close_all()


async def test_a_stopped_instance_clears_its_gauges_unless_its_successor_published_them(tmp_path, caplog):
    """A reload replaces the drift instance: the old one's alarm (its windows are gone) goes to no value and no
    alarm, and it leaves the admin report, unless the new instance has published the same route and model."""
    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        rng = random.Random(11)
        conf = {**DRIFT, "features": ["latency_s", "error"]}

        def ctx(latency: float):
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
            c.attempts.append(Attempt(Target("up"), start=c.timings.start))
            c.outcome, c.status = "ok", 200
            c.timings.end = c.timings.start + latency
            return c

        async def drifted(features: tuple[str, ...] = ("latency_s", "error")) -> Drift:
            p = await configure_plugin(Drift, {**conf, "features": list(features)}, runtime=rt)
            for lo, hi in [(1.0, 1.1)] * 60 + [(3.0, 3.1)] * 30:  # the pinned reference, then slower answers
                p.on_done(ctx(rng.uniform(lo, hi)))
            await rt.tasks.wait(10)
            (m,) = p.report()
            assert m["drifted"] == ["latency_s"] and gauge(rt, "sluice_drift_alarm", feature="latency_s") == 1
            return p

        # the successor published the same route and model: the old instance's stop leaves the gauges to it
        from plugins.drift import _instances  # what the admin report and `sluice drift` read

        old = await drifted()
        assert gauge(rt, "sluice_drift_psi", feature="error") == 0  # compared: no errors on either side
        new = await drifted(("latency_s",))  # the reload dropped the error feature
        await old.stop()
        assert _instances(rt) == [new]
        assert gauge(rt, "sluice_drift_alarm", feature="latency_s") == 1
        assert gauge(rt, "sluice_drift_latency_degraded") == 1
        psi = gauge(rt, "sluice_drift_psi", feature="error")  # no one compares it any more
        assert psi != psi and gauge(rt, "sluice_drift_alarm", feature="error") == 0
        # the last instance stops (its route removed by a reload): nothing measures any more
        await new.stop()
        assert _instances(rt) == []
        assert gauge(rt, "sluice_drift_alarm", feature="latency_s") == 0
        psi = gauge(rt, "sluice_drift_psi", feature="latency_s")
        assert psi != psi  # NaN: no current value
        assert gauge(rt, "sluice_drift_alarm", feature="error") == 0
        assert gauge(rt, "sluice_drift_latency_degraded") == 0
        p95 = gauge(rt, "sluice_drift_latency_p95_seconds", window="current")
        assert p95 != p95
        cleared = [r for r in caplog.records if getattr(r, "event", None) == "drift_cleared"]
        assert [r.feature for r in cleared] == ["latency_s"]
    finally:
        await rt.close_all()


async def test_a_comparison_still_running_when_its_instance_stops_publishes_nothing(tmp_path, caplog):
    """The window closes while a periodic comparison runs: the closing one is chained after it. Stopping
    cancels the chained one; the running one, already in the executor, must not publish afterwards (its
    instance left the live set, so nothing would ever clear what it set)."""
    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        rng = random.Random(12)
        p = await configure_plugin(Drift, {**DRIFT, "features": ["latency_s"]}, runtime=rt)
        for lo, hi in [(1.0, 1.1)] * 60 + [(3.0, 3.1)] * 60:  # the pinned reference, then a whole slower window
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
            c.attempts.append(Attempt(Target("up"), start=c.timings.start))
            c.outcome, c.status = "ok", 200
            c.timings.end = c.timings.start + rng.uniform(lo, hi)
            p.on_done(c)  # no await in between: the checks at 70..110 find the one at 70 still running
        await p.stop()
        p.on_done(c)  # a late request of the retired chain: not sampled
        await rt.tasks.wait(10)
        assert gauge(rt, "sluice_drift_alarm", feature="latency_s") is None
        assert gauge(rt, "sluice_drift_latency_degraded") is None
        assert not [r for r in caplog.records if getattr(r, "event", None) in ("drift", "latency_degraded")]
    finally:
        await rt.close_all()


async def test_latency_degradation_and_p95_clear_when_latency_is_no_longer_compared(tmp_path, caplog):
    from plugins._drift_stats import Comparison, LatencyResult

    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, DRIFT, runtime=rt)
        key = ("none", "other")
        p.publish(key, Comparison([], LatencyResult("latency_s", 0.1, 0.3, 3.0, True)))
        assert gauge(rt, "sluice_drift_latency_degraded") == 1 and p.degraded[key]
        p.publish(key, Comparison([], None))  # too few latencies in this window to compare
        assert gauge(rt, "sluice_drift_latency_degraded") == 0 and not p.degraded[key]
        events = [getattr(r, "event", None) for r in caplog.records]
        assert events == ["latency_degraded", "latency_cleared"]
        # not degraded, the p95 gauges go to no value all the same (the report's last.latency is None)
        p.publish(key, Comparison([], LatencyResult("latency_s", 0.1, 0.12, 1.2, False)))
        assert gauge(rt, "sluice_drift_latency_p95_seconds", window="current") == 0.12
        p.publish(key, Comparison([], None))
        current = gauge(rt, "sluice_drift_latency_p95_seconds", window="current")
        baseline = gauge(rt, "sluice_drift_latency_p95_seconds", window="baseline")
        assert current != current and baseline != baseline
    finally:
        await rt.close_all()


async def test_an_idle_monitor_clears_its_alarms_until_samples_come_again(tmp_path, caplog):
    """A route that stopped getting traffic kept its drift alarm and latency degradation for good: with no
    samples nothing is compared again. After idle_after_s without a sample they clear, as the report says;
    the next comparison publishes again."""
    from proxy.testing import wait_for

    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "baseline_p95_ms": 100, "idle_after_s": 1,
                                           "features": ["latency_s"]}, runtime=rt)
        rng = random.Random(3)

        def ctx(latency: float, score: float):
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
            c.attempts.append(Attempt(Target("up"), start=c.timings.start))
            c.outcome, c.status = "ok", 200
            c.timings.end = c.timings.start + latency
            c.features["toxicity"] = score
            return c

        async def feed(n: int, latency: tuple[float, float], score: float) -> None:
            for _ in range(n):
                p.on_done(ctx(rng.uniform(*latency), rng.gauss(score, 0.02)))
            await rt.tasks.wait(10)

        await feed(60, (0.01, 0.08), 0.1)
        await feed(30, (0.2, 0.4), 0.5)
        (m,) = p.report()
        assert m["drifted"] == ["latency_s", "toxicity"] and m["latency_degraded"] and not m["idle"]
        assert gauge(rt, "sluice_drift_alarm", feature="toxicity") == 1
        await wait_for(lambda: gauge(rt, "sluice_drift_alarm", feature="toxicity") == 0, timeout=20, what="idle clear")
        (m,) = p.report()
        assert m["idle"] and m["drifted"] == [] and not m["latency_degraded"]
        assert gauge(rt, "sluice_drift_latency_degraded") == 0
        psi = gauge(rt, "sluice_drift_psi", feature="toxicity")
        assert psi != psi  # NaN: no current value
        cleared = [r for r in caplog.records if getattr(r, "event", None) in ("drift_cleared", "latency_cleared")]
        assert {r.event for r in cleared} == {"drift_cleared", "latency_cleared"}
        assert all("no samples for 1s" in r.getMessage() for r in cleared)
        # traffic again, still shifted: the next comparison raises the alarm and logs it again
        await feed(30, (0.2, 0.4), 0.5)
        (m,) = p.report()
        assert m["drifted"] == ["latency_s", "toxicity"] and not m["idle"]
        assert gauge(rt, "sluice_drift_alarm", feature="toxicity") == 1
        assert [getattr(r, "event", None) for r in caplog.records].count("drift") == 4
        await p.stop()
        assert p._idle_timer is None
    finally:
        await rt.close_all()


async def test_requests_answered_early_are_not_sampled(tmp_path):
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, DRIFT, runtime=rt)
        c = make_context({"model": "m"}, runtime=rt)
        c.reply(401, {"error": {"message": "no"}})
        p.on_done(c)
        assert p.report() == []
    finally:
        await rt.close_all()


def test_config_errors():
    with pytest.raises(Exception, match="window_samples must be at least min_samples"):
        Drift.Config.model_validate({"window_samples": 50, "min_samples": 100})
    with pytest.raises(Exception, match="unknown features colour"):
        Drift.Config.model_validate({"features": ["colour"]})
    with pytest.raises(Exception, match="greater than 0"):
        Drift.Config.model_validate({"sample_rate": 0})


async def test_sluice_drift_command_reports_from_the_admin_api(upstream: FakeUpstream, tmp_path):
    import asyncio
    import json
    import sys

    rng = random.Random(2)
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk", max_retries=0) as c:
            await send(c, rng, 10, 3)
        await settle(s)

        async def run(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.cli", "drift", "--url", s.admin_url, *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, out.decode(), err.decode()

        code, out, err = await run("--token", s.admin_token, "--format", "json")
        assert code == 0, err
        (m,) = json.loads(out)["monitors"]
        assert m["route"] == "main" and m["window_samples"] == 3
        code, out, _ = await run("--token", s.admin_token)
        assert code == 0 and out.startswith("main  sluice-demo  window=3")
        code, _, err = await run("--token", "wrong")
        assert code == 1 and "401" in err


def _tokens_ctx(rt, prompt_tokens: int, latency: float = 0.1):
    c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, runtime=rt)
    c.attempts.append(Attempt(Target("up"), start=c.timings.start))
    c.outcome, c.status = "ok", 200
    c.usage = Usage(prompt_tokens, 5, prompt_tokens + 5)
    c.timings.end = c.timings.start + latency
    return c


async def test_a_comparison_due_before_a_pin_does_not_publish_after_it(tmp_path):
    """A comparison against the old reference, spawned (or in the executor) when the pin lands, must not
    raise the alarm again and set ``last`` on the freshly pinned monitor."""
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["prompt_tokens", "error"]}, runtime=rt)
        rng = random.Random(1)
        for _ in range(60):  # the pinned reference
            p.on_done(_tokens_ctx(rt, rng.randint(10, 20)))
        await rt.tasks.wait(10)
        for _ in range(30):  # shifted: the comparison at 30 is spawned, not yet run
            p.on_done(_tokens_ctx(rt, rng.randint(100, 120)))
        assert p.pin(None, None) == [("none", "other")]
        await rt.tasks.wait(10)
        (m,) = p.report()
        assert m["window_samples"] == 0 and m["last"] is None and m["drifted"] == []
        assert gauge(rt, "sluice_drift_alarm", feature="prompt_tokens") in (None, 0)
    finally:
        await rt.close_all()


async def test_a_pin_clears_the_latency_degradation_of_the_last_comparison(tmp_path, caplog):
    """The pin clears what the last comparison showed: the latency degradation (state, gauges) too, not only
    the features' alarms; the report said latency_degraded with no comparison (``last`` None) to back it."""
    caplog.set_level(logging.INFO, logger="sluice.drift")
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["latency_s", "error"]}, runtime=rt)
        rng = random.Random(1)
        for lo, hi in [(1.0, 1.1)] * 60 + [(3.0, 3.1)] * 30:
            p.on_done(_tokens_ctx(rt, 10, rng.uniform(lo, hi)))
        await rt.tasks.wait(10)
        (m,) = p.report()
        assert m["latency_degraded"] and gauge(rt, "sluice_drift_latency_degraded") == 1
        p.pin(None, None)
        (m,) = p.report()
        assert m["last"] is None and not m["latency_degraded"]
        assert gauge(rt, "sluice_drift_latency_degraded") == 0
        current = gauge(rt, "sluice_drift_latency_p95_seconds", window="current")
        assert current != current  # NaN: nothing compared against the new reference yet
        assert [getattr(r, "event", None) for r in caplog.records][-1] == "latency_cleared"
    finally:
        await rt.close_all()


async def test_a_window_with_fewer_than_min_samples_is_not_pinned(tmp_path):
    """A reference with fewer than min_samples values has no feature to compare: pinned (reference: pinned),
    it would stay for good and every later shift would go unseen, with no sign of it in the report."""
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["prompt_tokens", "error"]}, runtime=rt)
        rng = random.Random(2)
        for _ in range(65):  # the first window (60) becomes the reference, 5 more in the open one
            p.on_done(_tokens_ctx(rt, rng.randint(10, 20)))
        await rt.tasks.wait(10)
        assert p.pin(None, None) == []  # 5 samples: too few to be a reference
        for _ in range(35):  # prompts ten times longer
            p.on_done(_tokens_ctx(rt, rng.randint(100, 120)))
        await rt.tasks.wait(10)
        (m,) = p.report()
        assert m["reference_samples"] == 60 and "prompt_tokens" in m["drifted"]
    finally:
        await rt.close_all()


async def test_a_fixed_latency_baseline_is_checked_before_the_first_window_closes(tmp_path):
    """With baseline_p95_ms no reference window is needed for latency: a slow first window (the first hour
    with the defaults, and again after every reload) is flagged, not only once a reference exists."""
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Drift, {**DRIFT, "features": ["latency_s", "error"], "baseline_p95_ms": 100}, runtime=rt)
        rng = random.Random(3)
        for _ in range(59):  # min_samples (30) and more, the window (60) still open
            p.on_done(_tokens_ctx(rt, 10, rng.uniform(1.0, 1.1)))
        await rt.tasks.wait(10)
        (m,) = p.report()
        assert m["reference_samples"] == 0 and m["latency_degraded"]
        assert gauge(rt, "sluice_drift_latency_degraded") == 1
    finally:
        await rt.close_all()


async def test_sluice_drift_says_what_answered_when_it_is_not_the_admin_api(tmp_path):
    """A URL that is not Sluice's admin API (a listener port, a load balancer's HTML error page) answers
    something other than JSON: a one-line error and exit 1, not a JSONDecodeError traceback."""
    import asyncio
    import sys

    from aiohttp import web

    from proxy.testing import serve_app

    async with serve_app(web.Application()) as url:  # every path a plain-text 404
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "drift", "--url", url, "--token", "t",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "Traceback" not in err.decode(), err.decode()
    assert "404" in err.decode()


async def test_the_report_lists_each_monitor_once_while_a_reload_drains(upstream: FakeUpstream, tmp_path):
    """The admin report read every live instance: while a reload's retired config still drained (a stream in
    flight), each route and model showed twice, the old instance's windows beside the new one's, and a pin
    pinned both."""
    async with SluiceServer(config(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
            for _ in range(3):
                await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
            await s.wait_idle()
            upstream.token_delay = 0.5
            stream = await c.chat.completions.create(
                model="sluice-demo", stream=True, messages=[{"role": "user", "content": "a long answer " * 20}])
            await stream.__anext__()  # the old config is busy until this stream ends
            ok, msg = await s.reload(config(upstream))
            assert ok, msg
            upstream.token_delay = 0.0
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}])
            await s.wait_idle()
            rows = await report(s)
            assert [(m["route"], m["model"]) for m in rows] == [("main", "sluice-demo")]
            assert rows[0]["window_samples"] == 1  # the new config's window
            await stream.close()



IDLE_DRIFT = {"window_samples": 1000, "reservoir_size": 10, "min_samples": 10, "check_every": 1, "check_interval_s": 0,
              "baseline_p95_ms": 0.001, "features": ["latency_s"], "seed": 1}  # a baseline every latency is far above


def idle_config(upstream: FakeUpstream, **drift) -> dict:
    return {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "demo",
                    "chain": [{"metrics": {}}, {"drift": {**IDLE_DRIFT, **drift}}]}],
    }


async def test_a_retired_instance_going_idle_leaves_the_serving_instances_gauges(upstream: FakeUpstream, tmp_path, caplog):
    """While a reload's retired config drained (a long stream in flight), its drift instance went idle and
    cleared the gauges the serving instance publishes for the same route and model, logging a false
    "latency cleared". It spares them now, as stop() does."""
    import weakref

    from proxy.testing import wait_for

    caplog.set_level(logging.INFO, logger="sluice.drift")
    msgs = [{"role": "user", "content": "hi"}]

    def degraded() -> float | None:
        return s.runtime.metrics.get_sample_value("sluice_drift_latency_degraded", {"route": "main", "model": "sluice-demo"})

    async with SluiceServer(idle_config(upstream, idle_after_s=2), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
            for _ in range(10):
                await c.chat.completions.create(model="sluice-demo", messages=msgs)
            await s.wait_idle()
            await wait_for(lambda: degraded() == 1, 10, "the first instance to say degraded")
            upstream.token_delay = 0.5  # streams only: the stream below keeps the old config draining
            stream = await c.chat.completions.create(model="sluice-demo", stream=True,
                                                     messages=[{"role": "user", "content": "a long answer " * 40}])
            await stream.__anext__()
            ok, msg = await s.reload(idle_config(upstream, idle_after_s=3600))
            assert ok, msg
            for _ in range(10):
                await c.chat.completions.create(model="sluice-demo", messages=msgs)
            await s.wait_idle()
            await wait_for(lambda: [getattr(r, "event", None) for r in caplog.records].count("latency_degraded") == 2, 10,
                           "the serving instance to publish")
            serving = set(s.runtime.instances(Drift))
            (retired,) = [i for i in s.runtime.shared("drift.instances", weakref.WeakSet) if i not in serving]
            await wait_for(lambda: ("main", "sluice-demo") not in retired.degraded, 15, "the retired instance's idle check")
            (row,) = await report(s)
            assert row["latency_degraded"] and not row["idle"]
            assert degraded() == 1  # the gauge says what /admin/drift says
            assert not [r for r in caplog.records if getattr(r, "event", None) == "latency_cleared"]
            await stream.close()
