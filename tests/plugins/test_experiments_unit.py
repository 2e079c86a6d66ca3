"""Unit tests of experiment statistics, sticky bucketing and the canary's state machine."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from plugins._experiments_stats import (
    VariantSample, bucket, canary_verdict, experiment_report, mann_whitney, mean_ci, percentile, pick, similarity,
    two_proportion_test, wilson,
)
from plugins.experiments import Canary, Experiments, ExperimentConfig


class Rows:
    """An in-memory stand-in for the records sink: the canary only appends to it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []

    def append(self, table: str, row: dict) -> None:
        self.rows.append((table, row))


def test_bucket_is_stable_uniform_and_salted():
    assert bucket("exp", "k1") == bucket("exp", "k1")
    assert bucket("exp", "k1") != bucket("other", "k1")
    xs = [bucket("exp", f"user-{i}") for i in range(20000)]
    assert all(0 <= x < 1 for x in xs)
    assert abs(sum(x < 0.25 for x in xs) / len(xs) - 0.25) < 0.02


def test_pick_by_weight():
    assert [pick(p, [1, 3]) for p in (0.0, 0.24, 0.26, 0.99)] == [0, 0, 1, 1]
    assert pick(0.5, [0, 0]) == 0
    counts = Counter(pick(bucket("e", str(i)), [1, 1, 2]) for i in range(8000))
    assert abs(counts[2] / 8000 - 0.5) < 0.03


def test_wilson_interval():
    lo, hi = wilson(10, 100)
    assert 0.05 < lo < 0.1 < hi < 0.18
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0 < hi < 0.1


def test_two_proportion_test_against_known_values():
    # 30/200 vs 50/200: z = 2.5, two-sided p ~ 0.0124
    res = two_proportion_test(30, 200, 50, 200)
    assert res["z"] == pytest.approx(2.5, abs=0.01)
    assert res["p_value"] == pytest.approx(0.0124, abs=0.001)
    assert res["diff"] == pytest.approx(0.1)
    assert res["diff_ci_low"] < 0.1 < res["diff_ci_high"]
    assert two_proportion_test(0, 10, 0, 10)["p_value"] == 1.0
    assert two_proportion_test(1, 0, 1, 10)["p_value"] is None


def test_mann_whitney_detects_a_shift():
    rnd = random.Random(1)
    a = [rnd.gauss(100, 10) for _ in range(200)]
    b = [rnd.gauss(110, 10) for _ in range(200)]
    c = [rnd.gauss(100, 10) for _ in range(200)]
    assert mann_whitney(a, b)["p_value"] < 1e-6
    assert mann_whitney(a, c)["p_value"] > 0.01
    assert mann_whitney([1.0], [2.0])["p_value"] is None


def test_percentile_and_mean_ci():
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([], 50) is None
    m, lo, hi = mean_ci([10.0, 12.0, 14.0])
    assert m == 12.0 and lo < 12.0 < hi
    assert mean_ci([5.0]) == (5.0, None, None)


def test_experiment_report_compares_with_the_control():
    ctrl = VariantSample("control", [True] * 95 + [False] * 5, [100.0] * 95)
    treat = VariantSample("treatment", [True] * 80 + [False] * 20, [150.0] * 80)
    rep = experiment_report([ctrl, treat], "control")
    assert [v["variant"] for v in rep["variants"]] == ["control", "treatment"]
    assert rep["variants"][1]["error_rate"] == 0.2
    (comp,) = rep["comparisons"]
    assert comp["control"] == "control" and comp["error_rate"]["p_value"] < 0.01
    assert comp["latency"]["p_value"] < 0.001


def samples(n_ok: int, n_err: int, latency: float) -> list[tuple[bool, float | None]]:
    return [(True, latency)] * n_ok + [(False, None)] * n_err


def test_canary_verdicts():
    ok = VariantSample("s", [True] * 100, [100.0] * 100)
    kw = dict(min_requests=50, max_error_rate_delta=0.02, max_p95_ratio=1.5, alpha=0.05)
    assert canary_verdict(ok, VariantSample("c", [True] * 10, [100.0] * 10), **kw).action == "hold"
    assert canary_verdict(ok, VariantSample("c", [True] * 100, [110.0] * 100), **kw).action == "advance"
    bad = canary_verdict(ok, VariantSample("c", [True] * 80 + [False] * 20, [100.0] * 80), **kw)
    assert bad.action == "rollback" and "error rate" in bad.reason
    slow = canary_verdict(ok, VariantSample("c", [True] * 100, [200.0] * 100), **kw)
    assert slow.action == "rollback" and "p95" in slow.reason
    # twice as slow, but by less than the slack: jitter on a fast path
    assert canary_verdict(ok, VariantSample("c", [True] * 100, [200.0] * 100), **kw, p95_slack_ms=150).action == "advance"
    # a higher error rate that could be chance does not roll back
    noisy = canary_verdict(VariantSample("s", [True] * 50, [1.0] * 50), VariantSample("c", [True] * 48 + [False] * 2, [1.0] * 48), **kw)
    assert noisy.action == "advance"


def canary_exp(**canary) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "rollout", "model": "m",
        "variants": [{"name": "stable"}, {"name": "next", "upstream": "b"}],
        "canary": {"stable": "stable", "canary": "next", "steps": [5, 50, 100], "min_requests": 20, "min_step_seconds": 0, **canary},
    })


def test_canary_steps_up_and_completes():
    rows = Rows()
    can = Canary(canary_exp(), rows)
    assert can.share == 5
    for _ in range(3):
        for _ in range(20):
            can.observe("stable", True, 100.0, check_every=10)
            can.observe("next", True, 100.0, check_every=10)
    assert can.status == Canary.COMPLETED and can.share == 100
    assert [r["event"] for _, r in rows.rows] == ["step", "step", "completed"]
    assert [r["share"] for _, r in rows.rows] == [50, 100, 100]


def test_canary_rolls_back_on_errors_and_stays_back():
    rows = Rows()
    can = Canary(canary_exp(), rows)
    for i in range(40):
        can.observe("stable", True, 100.0, check_every=10)
        can.observe("next", i % 2 == 0, 100.0, check_every=10)
    assert can.status == Canary.ROLLED_BACK and can.share == 0
    assert rows.rows[-1][1]["event"] == "rollback" and "error rate" in rows.rows[-1][1]["reason"]
    can.observe("next", True, 1.0, check_every=1)
    assert can.status == Canary.ROLLED_BACK


def test_canary_respects_min_step_seconds():
    can = Canary(canary_exp(min_step_seconds=3600), Rows())
    for _ in range(100):
        can.observe("stable", True, 100.0, check_every=10)
        can.observe("next", True, 100.0, check_every=10)
    assert can.step == 0 and can.status == Canary.RUNNING


def test_canary_restores_only_its_own_rollout():
    can = Canary(canary_exp(), Rows())
    can.restore({"event": "rollback", "step": 1, "reason": "x", "fingerprint": "someone-else"})
    assert can.status == Canary.RUNNING and can.step == 0
    can.restore({"event": "step", "step": 1, "reason": "x", "fingerprint": can.fp})
    assert can.step == 1 and can.share == 50
    can.restore({"event": "rollback", "step": 1, "reason": "x", "fingerprint": can.fp})
    assert can.share == 0


def test_manual_actions_are_logged():
    rows = Rows()
    can = Canary(canary_exp(), rows)
    can.manual("rollback")
    assert can.share == 0
    can.manual("resume")
    assert can.share == 5
    can.manual("promote")
    assert can.share == 100
    assert [r["event"] for _, r in rows.rows] == ["rollback", "resume", "promote"]


def test_similarity():
    assert similarity("a b c", "a b c") == 1.0
    assert similarity("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert similarity("", "") == 1.0
    assert similarity("abc", "") == 0.0


@pytest.mark.parametrize("cfg,message", [
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}, {"name": "a"}]}]}, "variant names must be unique"),
    ({"experiments": [{"name": "e", "model": "m", "sticky": "header", "variants": [{"name": "a"}, {"name": "b"}]}]}, "sticky 'header' needs 'header'"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0}]}]}, "at least one variant needs weight > 0"),
    ({"experiments": [{"name": "e", "model": "m", "control": "z", "variants": [{"name": "a"}, {"name": "b"}]}]}, "control 'z' is not a variant"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}]}]}, "at least 2 items"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                       "canary": {"stable": "a", "canary": "b"}}]}, "exactly two variants"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}, {"name": "b"}],
                       "canary": {"stable": "a", "canary": "b", "steps": [50, 25]}}]}, "steps must increase"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}, {"name": "b"}],
                       "canary": {"stable": "a", "canary": "a"}}]}, "stable and canary must be different variants"),
    ({"experiments": [{"name": "e", "model": "m", "variants": [{"name": "a"}, {"name": "b"}]},
                      {"name": "f", "model": "m", "variants": [{"name": "a"}, {"name": "b"}]}]}, "two experiments match the same model"),
    ({"shadows": [{"name": "s", "target": {"upstream": "x"}, "sample": 1.5}]}, "less than or equal to 1"),
])
def test_config_validation_messages(cfg: dict, message: str):
    with pytest.raises(ValidationError) as e:
        Experiments.Config.model_validate(cfg)
    assert message in str(e.value)
