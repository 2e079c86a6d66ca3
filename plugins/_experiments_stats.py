"""Experiment statistics and the canary's verdict: pure functions over outcomes.

scipy is imported inside the functions that need it: it is heavy, and the
request path never calls these (only the canary check, off the hot path, and
the admin API and CLI).
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence


def bucket(experiment: str, unit: str) -> float:
    """A stable position in [0, 1) for a unit (key, user, header value) in one experiment.

    Salting with the experiment name keeps two experiments' splits independent.
    """
    h = hashlib.blake2b(f"{experiment}\x00{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def pick(position: float, weights: Sequence[float]) -> int:
    """The index whose cumulative weight share contains ``position``."""
    total = sum(weights)
    if total <= 0:
        return 0
    x = position * total
    for i, w in enumerate(weights):
        x -= w
        if x < 0:
            return i
    return len(weights) - 1


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_test(e1: int, n1: int, e2: int, n2: int) -> dict[str, float | None]:
    """Pooled two-proportion z-test of e1/n1 against e2/n2, with a CI of the difference (2 minus 1)."""
    if n1 == 0 or n2 == 0:
        return {"z": None, "p_value": None, "diff": None, "diff_ci_low": None, "diff_ci_high": None}
    from scipy.stats import norm

    p1, p2 = e1 / n1, e2 / n2
    pooled = (e1 + e2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        z, p = 0.0, 1.0
    else:
        z = (p2 - p1) / se
        p = float(2 * norm.sf(abs(z)))
    # the unpooled standard error for the interval (the pooled one assumes no difference)
    se_d = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    zc = float(norm.ppf(0.975))
    return {"z": z, "p_value": p, "diff": p2 - p1, "diff_ci_low": p2 - p1 - zc * se_d, "diff_ci_high": p2 - p1 + zc * se_d}


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Two-sided Mann-Whitney U of two latency samples; ``None`` values when either is too small."""
    if len(a) < 2 or len(b) < 2:
        return {"u": None, "p_value": None}
    from scipy.stats import mannwhitneyu

    res = mannwhitneyu(a, b, alternative="two-sided")
    return {"u": float(res.statistic), "p_value": float(res.pvalue)}


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Mean with a Student-t interval."""
    n = len(values)
    if n == 0:
        return (None, None, None)
    m = sum(values) / n
    if n < 2:
        return (m, None, None)
    from scipy.stats import t

    var = sum((v - m) ** 2 for v in values) / (n - 1)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(var / n)
    return (m, m - half, m + half)


@dataclass
class VariantSample:
    """One variant's outcomes: ``ok`` flags and latencies (ms) of successful requests."""

    name: str
    ok: list[bool]
    latencies_ms: list[float]

    @property
    def n(self) -> int:
        return len(self.ok)

    @property
    def errors(self) -> int:
        return self.n - sum(self.ok)


def summarise(v: VariantSample) -> dict[str, Any]:
    lo, hi = wilson(v.errors, v.n)
    mean, mlo, mhi = mean_ci(v.latencies_ms)
    return {
        "variant": v.name,
        "requests": v.n,
        "errors": v.errors,
        "error_rate": v.errors / v.n if v.n else None,
        "error_rate_ci": [lo, hi] if v.n else None,
        "latency_ms_mean": mean,
        "latency_ms_mean_ci": [mlo, mhi] if mlo is not None else None,
        "latency_ms_p50": percentile(v.latencies_ms, 50),
        "latency_ms_p95": percentile(v.latencies_ms, 95),
    }


def experiment_report(samples: Sequence[VariantSample], control: str | None = None) -> dict[str, Any]:
    """Per-variant summaries plus each variant's tests against the control (the first by default)."""
    if not samples:
        return {"variants": [], "comparisons": []}
    base = next((s for s in samples if s.name == control), samples[0])
    comps = []
    for s in samples:
        if s is base:
            continue
        comps.append({
            "control": base.name,
            "variant": s.name,
            "error_rate": two_proportion_test(base.errors, base.n, s.errors, s.n),
            "latency": mann_whitney(base.latencies_ms, s.latencies_ms),
        })
    return {"variants": [summarise(s) for s in samples], "comparisons": comps}


@dataclass(frozen=True)
class Verdict:
    action: str  # hold | advance | rollback
    reason: str


def canary_verdict(
    stable: VariantSample, canary: VariantSample, *, min_requests: int, max_error_rate_delta: float,
    max_p95_ratio: float, alpha: float, p95_slack_ms: float = 0.0,
) -> Verdict:
    """Judge one canary step from the step's outcomes.

    Rollback when the canary's error rate exceeds the stable one by more than
    ``max_error_rate_delta`` and a one-sided two-proportion test says it is not
    chance (p < ``alpha``), or when its p95 latency exceeds ``max_p95_ratio``
    times the stable p95 and by more than ``p95_slack_ms`` (a few milliseconds of
    jitter on a fast path are not a regression). With too few requests on either side: hold.
    """
    if canary.n < min_requests or stable.n < min_requests:
        return Verdict("hold", f"waiting for {min_requests} requests per variant (stable {stable.n}, canary {canary.n})")
    er_s = stable.errors / stable.n
    er_c = canary.errors / canary.n
    if er_c - er_s > max_error_rate_delta:
        test = two_proportion_test(stable.errors, stable.n, canary.errors, canary.n)
        z = test["z"] or 0.0
        from scipy.stats import norm

        p_one_sided = float(norm.sf(z))
        if p_one_sided < alpha:
            return Verdict("rollback", f"error rate {er_c:.2%} vs stable {er_s:.2%} (p={p_one_sided:.3g})")
    p95_s = percentile(stable.latencies_ms, 95)
    p95_c = percentile(canary.latencies_ms, 95)
    if p95_s and p95_c and p95_c > p95_s * max_p95_ratio and p95_c - p95_s > p95_slack_ms:
        return Verdict("rollback", f"p95 latency {p95_c:.0f} ms vs stable {p95_s:.0f} ms (limit x{max_p95_ratio:g})")
    return Verdict("advance", f"error rate {er_c:.2%} vs {er_s:.2%}, p95 {p95_c or 0:.0f} vs {p95_s or 0:.0f} ms")


def similarity(a: str, b: str) -> float:
    """Text similarity in [0, 1]: difflib's ratio over words (cheap, language-agnostic)."""
    if a == b:
        return 1.0
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0 if a.strip() == b.strip() else 0.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()
