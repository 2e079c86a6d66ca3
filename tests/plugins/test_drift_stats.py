"""The drift engine on its own: reservoirs, PSI, the tests, and alarms with fixed seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest

from plugins._drift_stats import (
    Monitor,
    Reservoir,
    Snapshot,
    Thresholds,
    chi2_test,
    ks_test,
    compare,
    psi_categorical,
    psi_numeric,
)


def make_monitor(seed: int, **kw) -> Monitor:
    args = dict(
        reservoir_size=500,
        window_samples=500,
        window_seconds=1e9,
        check_every=25,
        reference="pinned",
        thresholds=Thresholds(alpha=0.01, psi=0.2, min_samples=100),
        seed=seed,
    )
    args.update(kw)
    return Monitor(**args)


def sample(rng: np.random.Generator, mean_tokens: float, finish_stop: float) -> tuple[dict, dict]:
    return (
        {"prompt_tokens": float(max(1, round(rng.normal(mean_tokens, 40)))), "latency_s": float(rng.gamma(4, 0.05))},
        {"finish_reason": "stop" if rng.random() < finish_stop else "length"},
    )


def test_reservoir_keeps_capacity_and_is_uniform():
    rng = random.Random(7)
    means = []
    for _ in range(200):
        r = Reservoir(50, rng)
        for i in range(1000):
            r.add(float(i))
        assert len(r.values) == 50 and r.seen == 1000
        means.append(sum(r.values) / 50)
    # a uniform sample of 0..999 has mean 499.5; 200 reservoirs pin it within a few units
    assert abs(sum(means) / len(means) - 499.5) < 15


def test_reservoir_keeps_what_algorithm_r_with_randrange_keeps():
    """The reservoir's draws are ``randrange``'s: a seeded window keeps the same values as before."""
    for seed in range(5):
        r = Reservoir(100, random.Random(seed))
        rng = random.Random(seed)
        kept: list[float] = []
        for i in range(20_000):
            r.add(float(i))
            if len(kept) < 100:
                kept.append(float(i))
            else:
                j = rng.randrange(i + 1)
                if j < 100:
                    kept[j] = float(i)
        assert r.values == kept


def test_a_window_samples_each_feature_as_a_reservoir_would():
    """Window.add's inline reservoir step is Reservoir.add: same seed, same values kept."""
    from plugins._drift_stats import Window

    w = Window(50, random.Random(3), 0.0)
    rng = random.Random(3)
    ref = {"a": Reservoir(50, rng), "b": Reservoir(50, rng)}
    for i in range(5000):
        w.add({"a": float(i), "b": i * 0.5, "skip": float("nan")}, {"c": "x" if i % 3 else "y"})
        ref["a"].add(float(i))
        ref["b"].add(i * 0.5)
    assert {k: r.values for k, r in w.numeric.items()} == {k: r.values for k, r in ref.items()}
    assert {k: r.seen for k, r in w.numeric.items()} == {"a": 5000, "b": 5000}
    assert dict(w.categorical["c"]) == {"x": 3333, "y": 1667}


def test_psi_zero_for_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 5000).tolist()
    b = rng.normal(0, 1, 5000).tolist()
    c = rng.normal(1, 1, 5000).tolist()
    assert psi_numeric(a, b) < 0.02
    assert psi_numeric(a, c) > 0.5
    assert psi_categorical({"stop": 90, "length": 10}, {"stop": 90, "length": 10}) == pytest.approx(0.0)
    assert psi_categorical({"stop": 90, "length": 10}, {"stop": 50, "length": 50}) > 0.5


def test_psi_survives_ties_in_discrete_values():
    assert psi_numeric([5.0] * 100, [5.0] * 100) == pytest.approx(0.0)
    assert psi_numeric([5.0] * 100, [6.0] * 100) > 1.0


def test_chi2_single_category_is_no_evidence():
    assert chi2_test({"stop": 10}, {"stop": 30}) == (0.0, 1.0)
    stat, p = chi2_test({"stop": 90, "length": 10}, {"stop": 40, "length": 60})
    assert stat > 10 and p < 1e-6


def test_known_shift_detected_within_150_samples():
    """Prompt tokens move from mean 200 to 260 (1.5 sd): an alarm by the 150th sample after the shift."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        m = make_monitor(seed)
        for _ in range(500):
            m.add(*sample(rng, 200, 0.9), now=0.0)
        assert m.check_now(now=0.0) is None  # the first full window became the reference
        assert m.reference is not None and m.reference.count == 500
        detected_at = None
        for i in range(1, 501):
            if m.add(*sample(rng, 260, 0.9), now=0.0):
                res = m.check_now(now=0.0)
                if res is not None and "prompt_tokens" in res.drifted:
                    detected_at = i
                    break
        assert detected_at is not None and detected_at <= 150, (seed, detected_at)
        assert "finish_reason" not in res.drifted  # only what moved is flagged


def test_check_interval_bounds_comparisons_per_second_but_a_closing_window_is_always_compared():
    rng = np.random.default_rng(4)
    m = make_monitor(4, check_interval_s=1.0)
    for _ in range(500):
        m.add(*sample(rng, 200, 0.9), now=0.0)
    assert m.check_now(now=0.0) is None  # the first window closed: always compared (it became the reference)
    due_at = []
    t = 0.0
    for i in range(1, 501):
        t += 0.004  # 250 samples a second
        if m.add(*sample(rng, 200, 0.9), now=t):
            due_at.append(i)
            m.due_snapshots(now=t)
    # every 25 samples (a tenth of a second) without the interval; with it, once a second plus the closing window
    assert due_at == [250, 500], due_at
    m0 = make_monitor(4)  # check_interval_s defaults to 0 in the engine: every check_every samples
    for _ in range(500):
        m0.add(*sample(rng, 200, 0.9), now=0.0)
    m0.check_now(now=0.0)
    due = 0
    for _ in range(200):
        if m0.add(*sample(rng, 200, 0.9), now=0.0):
            due += 1
            m0.due_snapshots(now=0.0)
    assert due == 5  # at 100 (min_samples), 125, 150, 175, 200


def test_categorical_shift_detected():
    rng = np.random.default_rng(3)
    m = make_monitor(3)
    for _ in range(500):
        m.add(*sample(rng, 200, 0.95), now=0.0)
    m.check_now(now=0.0)
    for _ in range(200):
        m.add(*sample(rng, 200, 0.6), now=0.0)
    res = m.check_now(now=0.0)
    assert res.drifted == ["finish_reason"]


def test_no_shift_no_alarm_over_many_checks():
    checks = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        m = make_monitor(100 + seed, reference="previous")
        for _ in range(3000):
            if m.add(*sample(rng, 200, 0.9), now=0.0):
                res = m.check_now(now=0.0)
                if res is not None:
                    checks += 1
                    assert res.drifted == [], (seed, res.to_json())
                    assert res.latency is None or not res.latency.degraded
    assert checks > 100


def test_latency_degradation_against_reference_and_pinned_baseline():
    rng = np.random.default_rng(9)
    ref = Snapshot({"latency_s": rng.gamma(4, 0.05, 400).tolist()}, {}, 400, 0, 1)
    slow = Snapshot({"latency_s": (rng.gamma(4, 0.05, 400) * 2).tolist()}, {}, 400, 1, 2)
    same = Snapshot({"latency_s": rng.gamma(4, 0.05, 400).tolist()}, {}, 400, 1, 2)
    th = Thresholds(min_samples=100, latency_tolerance=0.5)
    assert compare(ref, slow, th).latency.degraded
    assert not compare(ref, same, th).latency.degraded
    # a pinned baseline of 1 s: neither window is slow against it
    assert not compare(ref, slow, th, baseline_p95=1.0).latency.degraded


def test_snapshot_round_trips_through_json():
    s = Snapshot({"x": [1.0, 2.0]}, {"f": {"stop": 3}}, 3, 1.5, 2.5)
    assert Snapshot.from_json(s.to_json()) == s


def test_window_bounds_features_and_categories():
    m = make_monitor(0, max_features=3)
    for i in range(100):
        m.add({f"f{j}": 1.0 for j in range(10)}, {"c": f"v{i}"}, now=0.0)
    assert len(m.current.numeric) + 0 <= 3
    assert len(m.current.categorical["c"]) <= 33  # 32 seen values and "other"


def test_fast_tests_agree_with_scipy():
    from scipy.stats import chi2_contingency, ks_2samp

    rng = np.random.default_rng(4)
    for shift in (0.0, 0.1, 0.3):
        a, b = rng.normal(0, 1, 700), rng.normal(shift, 1, 400)
        d, p = ks_test(a.tolist(), b.tolist())
        ref = ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=0.05, abs=1e-4)
    r, c = {"stop": 500, "length": 40, "tool_calls": 12}, {"stop": 300, "length": 60, "tool_calls": 3}
    stat, p = chi2_test(r, c)
    ref = chi2_contingency(np.array([[40, 500, 12], [60, 300, 3]]), correction=False)
    assert stat == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_a_comparison_is_cheap():
    import time

    rng = np.random.default_rng(8)
    snap = lambda: Snapshot({k: rng.normal(0, 1, 1000).tolist() for k in "abcd"},
                            {"f": {"x": 900, "y": 100}, "g": {"no": 990, "yes": 10}}, 1000, 0, 1)
    a, b = snap(), snap()
    compare(a, b, Thresholds())
    t = time.process_time()
    for _ in range(20):
        compare(a, b, Thresholds())
    # four 1000-sample numeric features and two categorical ones: well under 5 ms of CPU
    assert (time.process_time() - t) / 20 < 0.005


def test_p95_is_numpys_quantile_exactly():
    from plugins._drift_stats import p95

    rng = np.random.default_rng(11)
    for n in (1, 2, 3, 19, 20, 21, 101, 999, 1000, 1001):
        for _ in range(30):
            v = rng.normal(0, 1, n).tolist() if rng.random() < 0.7 else [float(x) for x in rng.integers(0, 5, n)]
            assert p95(v) == float(np.quantile(np.asarray(v), 0.95)), n
    assert p95([]) is None


def test_cached_reference_gives_the_fresh_answer():
    """A reference compared again and again (its sorted values and PSI bins cached) answers as a fresh copy does."""
    rng = np.random.default_rng(12)
    ref = Snapshot({k: rng.normal(0, 1, 800).tolist() for k in ("a", "latency_s")}, {"f": {"x": 700, "y": 100}}, 800, 0, 1)
    for n in (150, 400, 800, 1000):  # different current sizes: different PSI bin counts
        shift = rng.random()
        cur = Snapshot({k: rng.normal(shift, 1, n).tolist() for k in ("a", "latency_s")}, {"f": {"x": n - 50, "y": 50}}, n, 1, 2)
        fresh = Snapshot.from_json(ref.to_json())
        assert compare(ref, cur, Thresholds()).to_json() == compare(fresh, cur, Thresholds()).to_json()
        assert compare(ref, cur, Thresholds()).features[0].psi == pytest.approx(psi_numeric(fresh.numeric["a"], cur.numeric["a"]), abs=0)
    assert Snapshot.from_json(ref.to_json()) == ref  # the caches are not part of the snapshot


def test_categorical_psi_and_chi2_agree_with_numpy_and_scipy():
    from scipy.stats import chi2_contingency

    rng = np.random.default_rng(13)
    for _ in range(50):
        cats = [f"c{i}" for i in range(int(rng.integers(2, 34)))]
        r = {c: int(rng.integers(0, 200)) for c in cats}
        c = {k: int(rng.integers(0, 200)) for k in cats if rng.random() < 0.8}
        r[cats[0]] += 1
        c[cats[1]] = c.get(cats[1], 0) + 1
        keys = sorted(set(r) | set(c))
        rp = np.clip(np.array([r.get(k, 0) for k in keys]) / sum(r.values()), 1e-4, None)
        cp = np.clip(np.array([c.get(k, 0) for k in keys]) / sum(c.values()), 1e-4, None)
        assert psi_categorical(r, c) == pytest.approx(float(np.sum((cp - rp) * np.log(cp / rp))), rel=1e-12, abs=1e-12)
        used = [k for k in keys if r.get(k, 0) + c.get(k, 0) > 0]
        ref = chi2_contingency(np.array([[r.get(k, 0) for k in used], [c.get(k, 0) for k in used]]), correction=False)
        stat, p = chi2_test(r, c)
        assert stat == pytest.approx(ref.statistic, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)


def test_ks_statistic_is_the_concatenated_searches_exactly():
    """The KS statistic from each sample's own values (sorted-key searches, a reference's counts kept)
    is, float for float, scipy's: the largest difference over the concatenation of both samples."""
    from plugins._drift_stats import _sorted

    rng = np.random.default_rng(21)
    for i in range(400):
        n, m = int(rng.integers(1, 1100)), int(rng.integers(1, 1100))
        if i % 2:  # ties within and across the samples
            a, b = rng.integers(0, 12, n).astype(float), rng.integers(0, 15, m).astype(float)
        else:
            a, b = rng.normal(0, 1, n), rng.normal(rng.random(), 1.3, m)
        a, b = _sorted(a), _sorted(b)
        both = np.concatenate((a, b))
        want = float(np.max(np.abs(np.searchsorted(a, both, side="right") / n - np.searchsorted(b, both, side="right") / m)))
        assert ks_test(a, b)[0] == want
        assert ks_test(a, b, np.searchsorted(a, a, side="right"))[0] == want
    snap = Snapshot({"x": rng.normal(0, 1, 300).tolist()}, {}, 300, 0, 1)
    assert snap.ranks("x") is snap.ranks("x")  # kept with the snapshot


def test_latency_baseline_from_the_reference_needs_min_samples():
    """min_samples on both sides holds for latency too: a p95 of five values is no baseline."""
    rng = np.random.default_rng(5)
    tiny = Snapshot({"latency_s": rng.gamma(4, 0.05, 5).tolist()}, {}, 5, 0, 1)
    cur = Snapshot({"latency_s": rng.gamma(4, 0.05, 200).tolist()}, {}, 200, 1, 2)
    assert compare(tiny, cur, Thresholds(min_samples=100)).latency is None
    # a fixed baseline needs no reference samples
    assert compare(tiny, cur, Thresholds(min_samples=100), baseline_p95=1.0).latency is not None


def test_a_pin_in_previous_mode_is_not_reported_once_the_reference_rolls():
    """reference: previous replaces a pinned reference with the next closed window: ``pinned`` (the admin
    report's, and the CLI's "(previous, pinned)") must not go on saying the reference is the pinned one."""
    rng = np.random.default_rng(6)
    m = make_monitor(6, reference="previous", window_samples=200, reservoir_size=200)
    for _ in range(150):
        m.add(*sample(rng, 200, 0.9), now=0.0)
    pinned = m.current.snapshot(now=0.0)
    m.pin(pinned, now=0.0)
    assert m.pinned and m.reference is pinned
    for _ in range(200):
        m.add(*sample(rng, 200, 0.9), now=0.0)
    m.check_now(now=0.0)  # the window closes and becomes the reference
    assert m.reference is not pinned and m.reference.count == 200
    assert not m.pinned
