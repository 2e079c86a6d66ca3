"""Unit tests of the router's pure parts: strategies, EWMA, the ejection state machine, vLLM metrics, complexity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from plugins._router_core import (
    EJECTED, HEALTHY, PROBING, Candidate, TargetStats, features, latency_score, order_least_outstanding,
    order_lowest_latency, order_round_robin, order_vllm, order_weighted, parse_vllm_metrics,
)

FIX = Path(__file__).parent.parent / "fixtures"
EJ = dict(alpha=0.5, failures_to_eject=3, cooldown_s=10.0, max_cooldown_s=25.0)


def cands(*outstanding, weights=None):
    weights = weights or [1.0] * len(outstanding)
    return [Candidate(i, w, o, TargetStats()) for i, (o, w) in enumerate(zip(outstanding, weights))]


def test_weighted_follows_weights():
    cs = cands(0, 0, 0, weights=[1, 3, 0])
    firsts = Counter()
    for i in range(4000):
        firsts[order_weighted(cs, rnd=lambda i=i: (i % 1000) / 1000)[0].index] += 1
    assert firsts[2] == 0
    assert firsts[1] == 3000 and firsts[0] == 1000


def test_weighted_keeps_the_rest_as_fallbacks():
    cs = cands(0, 0, 0)
    order = order_weighted(cs, rnd=lambda: 0.5)
    assert [c.index for c in order] == [1, 0, 2]


def test_round_robin_rotates():
    cs = cands(0, 0, 0)
    assert [order_round_robin(cs, turn=t)[0].index for t in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_outstanding():
    cs = cands(5, 1, 3)
    assert [c.index for c in order_least_outstanding(cs, turn=0)] == [1, 2, 0]
    # ties rotate rather than always picking the first configured target
    tied = cands(2, 2)
    assert {order_least_outstanding(tied, turn=t)[0].index for t in range(2)} == {0, 1}
    # a heavier weight takes proportionally more load
    weighted = cands(4, 3, weights=[4, 1])
    assert order_least_outstanding(weighted)[0].index == 0


def test_ewma_and_lowest_latency():
    st = TargetStats()
    st.record(True, 100.0, 0, **EJ)
    assert st.ewma_ms == 100.0
    st.record(True, 200.0, 0, **EJ)
    assert st.ewma_ms == pytest.approx(150.0)
    fast, slow, new = cands(0, 0, 0)
    fast.stats.ewma_ms, slow.stats.ewma_ms = 50.0, 400.0
    assert [c.index for c in order_lowest_latency([slow, fast, new])] == [2, 0, 1]
    # a fast target with a queue loses to a slightly slower idle one
    fast.outstanding = 9
    assert latency_score(fast) > latency_score(slow)
    busy, idle = cands(9, 0)
    busy.stats.ewma_ms, idle.stats.ewma_ms = 50.0, 100.0
    assert order_lowest_latency([busy, idle])[0] is idle


def test_ejection_state_machine():
    st = TargetStats()
    assert not st.record(False, None, 0.0, **EJ)
    assert not st.record(False, None, 0.0, **EJ)
    assert st.state(0.0) == HEALTHY
    assert st.record(False, None, 1.0, **EJ)  # third in a row ejects
    assert st.state(5.0) == EJECTED and not st.available(5.0, 30)
    # late answers of requests sent before the ejection do not extend it
    assert not st.record(False, None, 2.0, **EJ)
    assert st.ejected_until == 11.0
    # cooldown over: half-open, one probe at a time
    assert st.state(11.0) == PROBING and st.available(11.0, 30)
    st.selected(11.0)
    assert not st.available(12.0, 30)
    assert st.available(42.0, 30)  # a probe that never reported no longer holds the door
    # the probe fails: out again for twice as long
    assert st.record(False, None, 12.0, **EJ)
    assert st.ejected_until == 32.0
    assert st.record(False, None, 40.0, **EJ)  # third ejection: capped at max_cooldown_s
    assert st.ejected_until == 65.0
    # a successful probe brings it back and resets the backoff
    assert not st.record(True, 10.0, 70.0, **EJ)
    assert st.state(70.0) == HEALTHY and st.ejections == 0 and st.available(70.0, 30)


def test_success_resets_consecutive_failures():
    st = TargetStats()
    st.record(False, None, 0, **EJ)
    st.record(False, None, 0, **EJ)
    st.record(True, 5.0, 0, **EJ)
    st.record(False, None, 0, **EJ)
    assert st.state(0) == HEALTHY


def test_parse_vllm_metrics_fixture():
    load = parse_vllm_metrics((FIX / "vllm_metrics.txt").read_text())
    assert load.valid
    assert (load.waiting, load.running, load.kv_cache_usage) == (7.0, 3.0, 0.4375)


def test_parse_vllm_metrics_engines_and_models():
    text = (FIX / "vllm_metrics_multi.txt").read_text()
    small = parse_vllm_metrics(text, "small")
    assert (small.waiting, small.running, small.kv_cache_usage) == (3.0, 8.0, 0.5)
    large = parse_vllm_metrics(text, "large")
    assert (large.waiting, large.kv_cache_usage) == (40.0, 0.97)
    assert not parse_vllm_metrics(text, "absent").valid


def test_parse_vllm_metrics_legacy_and_malformed():
    legacy = parse_vllm_metrics((FIX / "vllm_metrics_legacy.txt").read_text())
    assert legacy.valid and legacy.kv_cache_usage == 0.125
    bad = parse_vllm_metrics((FIX / "vllm_metrics_malformed.txt").read_text())
    assert not bad.valid
    assert bad.kv_cache_usage == 1.0  # clamped
    assert not parse_vllm_metrics("<html>not metrics</html>").valid


def test_vllm_order_prefers_short_queue_then_free_kv():
    a, b, c = cands(0, 0, 0)
    a.stats.vllm = (5.0, 0.0, 0.1, 0, 100.0)
    b.stats.vllm = (1.0, 0.0, 0.9, 0, 100.0)
    c.stats.vllm = (1.0, 0.0, 0.2, 0, 100.0)
    assert [x.index for x in order_vllm([a, b, c], now=101.0, kv_weight=4.0)] == [2, 1, 0]
    # requests we sent since the scrape count as waiting: no herd onto one target between scrapes
    c.outstanding = 10
    assert order_vllm([a, b, c], now=101.0, kv_weight=4.0)[0] is b
    # a stale scrape falls back to our own in-flight count
    for x in (a, b, c):
        x.stats.vllm = (0.0, 0.0, 0.0, 0, 0.0)
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert order_vllm([a, b, c], now=100.0, stale_after_s=10)[0] is b


def test_vllm_order_weighs_the_running_batch():
    a, b = cands(0, 0)
    # neither has a queue; a runs a full batch, b a small one: b decodes faster
    a.stats.vllm = (0.0, 48.0, 0.3, 0, 100.0)
    b.stats.vllm = (0.0, 4.0, 0.3, 0, 100.0)
    assert [x.index for x in order_vllm([a, b], now=101.0)] == [1, 0]
    # a queue still outweighs a busy batch at the default weight
    b.stats.vllm = (20.0, 4.0, 0.3, 0, 100.0)
    assert order_vllm([a, b], now=101.0)[0] is a
    # weight 0 ignores the batch: the shorter queue wins alone
    b.stats.vllm = (0.0, 4.0, 0.3, 0, 100.0)
    a.stats.vllm = (0.0, 48.0, 0.2, 0, 100.0)
    assert order_vllm([a, b], now=101.0, running_weight=0.0)[0] is a


def test_complexity_features():
    simple = {"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    f = features(simple)
    assert not f.has_code and not f.has_tools and f.turns == 1 and 5 < f.prompt_tokens < 40
    code = {"messages": [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n    return x\n```"}]}
    assert features(code).has_code
    c_like = {"messages": [{"role": "user", "content": "why does this fail\nint main() {\n  return 0;\n}"}]}
    assert features(c_like).has_code
    tools = {**simple, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    assert features(tools).has_tools
    deep = {"messages": [{"role": r, "content": "x"} for r in ["system"] + ["user", "assistant"] * 5]}
    assert features(deep).turns == 10
    assert features({"messages": [{"role": "user", "content": "Please PROVE it"}]}, ["prove"]).keyword
    long = {"messages": [{"role": "user", "content": "word " * 4000}]}
    assert features(long).prompt_tokens > 4000


def test_parse_recorded_vllm_metrics():
    text = (FIX / "vllm" / "metrics.txt").read_text()
    load = parse_vllm_metrics(text, "tiny-llama")
    assert load.valid and load.waiting == 0.0 and load.kv_cache_usage == 0.0
    # the waiting_by_reason breakdown must not be summed into the waiting count
    assert "vllm:num_requests_waiting_by_reason" not in load.seen
    assert not parse_vllm_metrics(text, "another-model").valid
