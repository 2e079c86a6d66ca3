"""The metrics plugin's accumulators publish exactly what prometheus-client's own calls would.

``record`` adds to plain accumulators that are applied to the Prometheus children when the
registry is read. The reference here is the straightforward way: ``family.labels(...)``
then ``inc`` / ``observe`` / ``set`` for every request. Both run on the same contexts into
two registries, and every sample of the two expositions must be equal.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from plugins.metrics import OUTCOMES, Families, attempt_result, error_type, operation_name, record, route_name, status_class
from proxy import Attempt, Identity, Response, Target, Usage
from proxy.testing import make_context

ROUTE = SimpleNamespace(name="main", prefix="/v1/")
OTHER_ROUTE = SimpleNamespace(name=None, prefix="/alt/")


def reference(f: Families, ctx, model: str) -> None:
    """What one request contributes, through prometheus-client's API call by call."""
    route = route_name(ctx)
    t = ctx.timings
    outcome = ctx.outcome if ctx.outcome in OUTCOMES else "error"
    f.requests.labels(route, model, status_class(ctx.status), outcome).inc()
    op = operation_name(ctx)
    if t.end is not None:
        total = t.end - t.start
        f.duration.labels(route, model).observe(total)
        if op != "other":  # model calls only
            f.operation_duration.labels(op, model, route, error_type(ctx.status, outcome)).observe(total)
        waited = 0.0
        if t.upstream_start is not None:
            upstream_end = t.upstream_end if t.upstream_end is not None else t.end
            waited = max(upstream_end - t.upstream_start, 0.0)
            if ctx.upstream is not None:
                f.upstream_duration.labels(route, ctx.upstream.upstream).observe(waited)
        f.overhead.labels(route).observe(max(total - waited, 0.0))
    u = ctx.usage
    if u is not None:
        f.tokens.labels(route, model, "input").inc(u.prompt_tokens)
        f.tokens.labels(route, model, "output").inc(u.completion_tokens)
        if u.cached_tokens:
            f.tokens.labels(route, model, "cached_input").inc(u.cached_tokens)
        if u.reasoning_tokens:
            f.tokens.labels(route, model, "reasoning").inc(u.reasoning_tokens)
        f.token_usage.labels(op, model, "input", route).observe(u.prompt_tokens)
        if op != "embeddings":
            f.token_usage.labels(op, model, "output", route).observe(u.completion_tokens)
        if u.estimated:
            f.estimated.labels(route, model).inc()
    if t.first_byte is not None and ctx.stream and ctx.status == 200:
        f.ttft.labels(op, model, route).observe(max(t.first_byte - t.start, 0.0))
        if u is not None and u.completion_tokens > 1 and t.upstream_end is not None:
            f.tpot.labels(op, model, route).observe(max(t.upstream_end - t.first_byte, 0.0) / (u.completion_tokens - 1))
    if ctx.answered_by and ctx.status is not None and ctx.status >= 400:
        fam = f.limits if ctx.status == 429 else f.blocks
        fam.labels(route, ctx.answered_by, f.free_labels(ctx.answer_reason or "error")).inc()
    for plugin_id, found in ctx.annotations.items():
        # the findings contract: a "findings" dict if there is one, else the annotation; int counts only
        found = found["findings"] if isinstance(found.get("findings"), dict) else found
        for kind, n in found.items():
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                f.findings.labels(route, str(plugin_id), f.free_labels(kind)).inc(n)
    for key, seconds in t.plugins.items():
        plugin_id, _, phase = key.rpartition(".")
        f.plugin_duration.labels(route, plugin_id or key, phase).observe(seconds)
    for a in ctx.attempts:
        result = attempt_result(a.status, a.error)
        f.attempts.labels(a.target.upstream, result).inc()
        if result != "cancelled":  # the client left: says nothing about the upstream
            f.upstream_up.labels(a.target.upstream).set(0 if result in ("http_5xx", "connect", "timeout", "protocol", "error") else 1)


def contexts(n: int, seed: int = 5) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["ok", "stream", "upstream_error", "limited", "blocked", "gone", "embeddings"])
        stream = kind == "stream"
        path = "/v1/embeddings" if kind == "embeddings" else rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/models"])
        body = {"model": rng.choice(["m1", "m2", "unknown"]), "stream": stream, "messages": [{"role": "user", "content": "x"}]}
        ctx = make_context(body, path=path if rng.random() < 0.8 else "/alt/chat/completions",
                           identity=Identity(key_id="k", team="t"))
        ctx.route = ROUTE if ctx.path.startswith("/v1/") else OTHER_ROUTE
        t = ctx.timings
        # durations on bucket bounds, between them and past the last one
        total = rng.choice([0.005, 0.01, 0.0123, 0.25, 3.3, 500.0, rng.expovariate(20)])
        t.end = t.start + total
        t.plugins.update({"auth.on_request": rng.choice([0.00001, 0.0004, 2.0]), "metering.on_done": rng.random() / 1000})
        if kind in ("limited", "blocked"):
            ctx.status = 429 if kind == "limited" else 401
            ctx.outcome = "answered"
            ctx.answered_by = "ratelimit" if kind == "limited" else "auth"
            ctx.answer_reason = rng.choice(["rpm", "tpm", None, "bad_key"])
            if kind == "blocked":
                n = rng.randint(0, 2)
                ctx.annotations["injection"] = rng.choice([
                    {"instruction_override": n, "flag": True, "score": 0.75},
                    {"findings": {"instruction_override": n}, "score": 0.9, "scanned": 3}])
            out.append(ctx)
            continue
        target = Target(rng.choice(["primary", "backup"]), model=rng.choice([None, "m1"]))
        failed = Attempt(Target("primary"), start=t.start + 1e-4, error=rng.choice(["connect", "timeout", "cancelled"]), end=t.start + 2e-4)
        if kind == "upstream_error":
            ctx.attempts.append(failed)
            ctx.attempts.append(Attempt(target, start=t.start + 3e-4, status=rng.choice([500, 503, 404]), end=t.start + total / 2))
            ctx.upstream = target
            ctx.status, ctx.outcome = ctx.attempts[-1].status, "upstream_error"
        else:
            if rng.random() < 0.3:
                ctx.attempts.append(failed)
            ctx.attempts.append(Attempt(target, start=t.start + 3e-4, status=200, first_byte=t.start + total / 3, end=t.start + total / 2))
            ctx.upstream = target
            ctx.status = 200
            ctx.outcome = "client_gone" if kind == "gone" else rng.choice(["ok", "ok", "weird"])
            t.first_byte = t.start + total / 3
            ctx.usage = Usage(rng.randint(1, 5000), rng.randint(0, 900), cached_tokens=rng.choice([0, 64]),
                              reasoning_tokens=rng.choice([0, 12]), estimated=rng.random() < 0.2)
            if not stream:
                ctx.response = Response(200, {"content-type": "application/json"}, b'{"model": "m1"}')
        t.upstream_start = t.start + 1e-4
        t.upstream_end = t.start + total / 2 if rng.random() < 0.9 else None
        out.append(ctx)
    return out


def exposed(registry: CollectorRegistry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue  # creation times differ between the two registries, by design
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def same(got: dict, want: dict) -> None:
    """Equal samples; sums may differ in the last bits (added in another order)."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-12, abs_tol=1e-12), (k, got[k], v)


def model_of(ctx) -> str:
    m = ctx.upstream.model if ctx.upstream is not None and ctx.upstream.model else ctx.model
    return m if m in ("m1", "m2") else "other"


@pytest.mark.parametrize("reads", [0, 1, 7])
def test_accumulated_metrics_equal_direct_calls(reads):
    """Any number of reads between requests: each read applies what accumulated so far, nothing twice."""
    ours_reg, ref_reg = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    ours, ref = Families(ours_reg), Families(ref_reg)
    ctxs = contexts(600)
    for i, ctx in enumerate(ctxs):
        record(ours, ctx, model_of(ctx))
        reference(ref, ctx, model_of(ctx))
        if reads and i % (len(ctxs) // reads) == 0:
            same(exposed(ours_reg), exposed(ref_reg))
    got = exposed(ours_reg)
    same(got, exposed(ref_reg))
    # nothing is pending after a read, and a second read changes nothing
    assert ours.dirty == []
    assert exposed(ours_reg) == got


def test_the_genai_operation_duration_has_error_type_and_only_model_calls():
    """OpenTelemetry's gen_ai.client.operation.duration carries error.type when the call failed; it counted
    failures with successes, and /v1/models with model calls."""
    reg = CollectorRegistry(auto_describe=True)
    f = Families(reg)
    for path, status, outcome in [("/v1/chat/completions", 200, "ok"), ("/v1/chat/completions", 429, "answered"),
                                  ("/v1/chat/completions", 200, "client_gone"), ("/v1/embeddings", 502, "upstream_error"),
                                  ("/v1/models", 200, "ok")]:
        ctx = make_context({"model": "m1"}, path=path)
        ctx.route = ROUTE
        ctx.timings.end = ctx.timings.start + 0.2
        ctx.status, ctx.outcome = status, outcome
        record(f, ctx, "m1")
    got = {(s.labels["gen_ai_operation_name"], s.labels["error_type"]): s.value
           for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples
           if s.name == "gen_ai_client_operation_duration_seconds_count"}
    assert got == {("chat", ""): 1, ("chat", "429"): 1, ("chat", "client_gone"): 1, ("embeddings", "502"): 1}
    # every request, /v1/models included, is still in Sluice's own duration
    assert reg.get_sample_value("sluice_request_duration_seconds_count", {"route": "main", "model": "m1"}) == 5


def test_get_sample_value_sees_requests_without_a_scrape():
    reg = CollectorRegistry(auto_describe=True)
    f = Families(reg)
    ctx = contexts(1, seed=1)[0]
    ctx.status, ctx.outcome, ctx.answered_by = 200, "ok", None
    record(f, ctx, "m1")
    assert f.dirty  # accumulated, not yet applied
    assert reg.get_sample_value("sluice_requests_total", {"route": route_name(ctx), "model": "m1",
                                                          "status_class": "2xx", "outcome": "ok"}) == 1
    assert f.dirty == []


def test_several_workers_apply_at_the_end_of_every_request(monkeypatch, tmp_path):
    """Multiprocess mode: values live in files other workers read, so nothing waits for a scrape here."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    f = Families(CollectorRegistry(auto_describe=True))
    assert f.eager
    for ctx in contexts(20):
        record(f, ctx, model_of(ctx))
        assert f.dirty == []
    f.count(f.cost, 0.5, "main", "m1")
    assert f.dirty == []


def test_counters_refuse_negative_amounts_like_prometheus():
    f = Families(CollectorRegistry(auto_describe=True))
    with pytest.raises(ValueError):
        f.acc(f.cost, "main", "m1").inc(-1)
