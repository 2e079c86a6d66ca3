"""The drift engine: sampled windows of request features and their comparison.

Pure Python plus numpy/scipy, no proxy imports, so it is unit-tested on its own and
its comparisons can run in the CPU executor (``compare`` takes plain snapshots).

* Numeric features (tokens, latency, anything a plugin puts in ``ctx.features``) are
  kept in a reservoir per window (Vitter's algorithm R, seeded) and compared with the
  two-sample Kolmogorov-Smirnov test.
* Categorical features (finish reason, refusal, error) are counted and compared with a
  chi-square test of homogeneity.
* Both also get a Population Stability Index, with bins taken from the reference's
  quantiles (numeric) or its categories.

A feature drifts when its test rejects at ``alpha`` (Bonferroni-corrected over the
features compared, so more features do not mean more false alarms) *and* its PSI
reaches ``psi_threshold``: the test says the change is real, PSI says it is big enough
to matter. Large windows make tiny changes significant; PSI keeps those quiet.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

MAX_CATEGORIES = 32
OTHER = "other"


class Reservoir:
    """A uniform sample of at most ``capacity`` values of a stream of unknown length."""

    __slots__ = ("capacity", "values", "seen", "_rng", "_below")

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self.values: list[float] = []
        self.seen = 0
        self._rng = rng
        # rng.randrange(n) for n > 0 is rng._randbelow(n) after argument checks: the same draws, less work
        self._below = getattr(rng, "_randbelow", rng.randrange)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.capacity:
            self.values.append(value)
        else:
            j = self._below(self.seen)
            if j < self.capacity:
                self.values[j] = value


@dataclass
class Snapshot:
    """A frozen copy of a window, safe to hand to another thread or to store as JSON."""

    numeric: dict[str, list[float]]
    categorical: dict[str, dict[str, int]]
    count: int
    started: float
    ended: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sorted_numeric(self, name: str) -> np.ndarray:
        """The values of a numeric feature as a sorted array, computed once per snapshot.

        A reference snapshot is compared with the open window every ``check_every``
        samples: its sorting (and its PSI bins, below) need not be redone each time.
        Snapshots are never changed after they are taken, so the cache stays right; it
        lives outside the dataclass fields, so JSON and equality ignore it.
        """
        cache = self.__dict__.setdefault("_sorted_cache", {})
        a = cache.get(name)
        if a is None:
            a = cache[name] = _sorted(self.numeric[name])
        return a

    def ranks(self, name: str) -> np.ndarray:
        """For each value of :meth:`sorted_numeric`, how many values are at most it (the KS test's own counts)."""
        cache = self.__dict__.setdefault("_rank_cache", {})
        a = cache.get(name)
        if a is None:
            s = self.sorted_numeric(name)
            a = cache[name] = np.searchsorted(s, s, side="right")
        return a

    def psi_reference(self, name: str, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner PSI bin edges of a numeric feature and the share of this snapshot's values in each bin."""
        cache = self.__dict__.setdefault("_psi_cache", {})
        found = cache.get((name, bins))
        if found is None:
            found = cache[(name, bins)] = _psi_bins_of(self.sorted_numeric(name), bins)
        return found

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(
            numeric={k: [float(x) for x in v] for k, v in data.get("numeric", {}).items()},
            categorical={k: {str(c): int(n) for c, n in v.items()} for k, v in data.get("categorical", {}).items()},
            count=int(data.get("count", 0)),
            started=float(data.get("started", 0.0)),
            ended=float(data.get("ended", 0.0)),
        )


class Window:
    """The samples of one period for one route and model."""

    __slots__ = ("capacity", "numeric", "categorical", "count", "started", "_rng", "max_features")

    def __init__(self, capacity: int, rng: random.Random, started: float, max_features: int = 32) -> None:
        self.capacity = capacity
        self.numeric: dict[str, Reservoir] = {}
        self.categorical: dict[str, Counter[str]] = {}
        self.count = 0
        self.started = started
        self._rng = rng
        self.max_features = max_features

    def add(self, numeric: Mapping[str, float], categorical: Mapping[str, str]) -> None:
        self.count += 1
        for name, value in numeric.items():
            if value is None or not math.isfinite(value):
                continue
            r = self.numeric.get(name)
            if r is None:
                if len(self.numeric) >= self.max_features:
                    continue
                r = self.numeric[name] = Reservoir(self.capacity, self._rng)
            # Reservoir.add, inline (once per feature per sample)
            r.seen += 1
            values = r.values
            if len(values) < r.capacity:
                values.append(float(value))
            else:
                j = r._below(r.seen)
                if j < r.capacity:
                    values[j] = float(value)
        for name, value in categorical.items():
            c = self.categorical.get(name)
            if c is None:
                if len(self.categorical) >= self.max_features:
                    continue
                c = self.categorical[name] = Counter()
            if value not in c and len(c) >= MAX_CATEGORIES:
                value = OTHER
            c[value] += 1

    def snapshot(self, now: float | None = None) -> Snapshot:
        return Snapshot(
            numeric={k: list(r.values) for k, r in self.numeric.items()},
            categorical={k: dict(c) for k, c in self.categorical.items()},
            count=self.count,
            started=self.started,
            ended=time.time() if now is None else now,
        )


# -- statistics -----------------------------------------------------------------

PSI_EPS = 1e-4


def _psi_from_props(ref: np.ndarray, cur: np.ndarray) -> float:
    ref = np.clip(ref, PSI_EPS, None)
    cur = np.clip(cur, PSI_EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def psi_bins(n_ref: int, n_cur: int, most: int = 10) -> int:
    """Bins for a numeric PSI: ten when samples allow, fewer for small windows.

    PSI's expected value between two samples of one distribution is about
    ``(bins - 1) * (1/n_ref + 1/n_cur)``; with 100 samples and ten bins that noise alone
    is 0.1, half the usual alarm level. Keeping about 20 samples a bin bounds it.
    """
    return max(2, min(most, min(n_ref, n_cur) // 20))


def _sorted(values: Any) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=float))


def psi_numeric(ref: Any, cur: Any, bins: int | None = None) -> float:
    """PSI over quantile bins of the reference (ties merged). Takes lists or sorted arrays."""
    r = ref if isinstance(ref, np.ndarray) else _sorted(ref)
    c = cur if isinstance(cur, np.ndarray) else _sorted(cur)
    if r.size == 0 or c.size == 0:
        return 0.0
    if bins is None:
        bins = psi_bins(r.size, c.size)
    edges, ref_props = _psi_bins_of(r, bins)
    return _psi_against(edges, ref_props, c)


def _psi_bins_of(r: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner quantile edges of a sorted reference (ties merged) and its share of values per bin."""
    # inner quantile edges of the (sorted) reference, without np.quantile's overhead
    edges = np.unique(r[np.minimum((np.arange(1, bins) * r.size) // bins, r.size - 1)])
    # searchsorted puts each value in the bin of the first edge >= it: same rule for both sides
    rc = np.bincount(np.searchsorted(edges, r, side="left"), minlength=edges.size + 1)
    return edges, rc / r.size


def _psi_against(edges: np.ndarray, ref_props: np.ndarray, c: np.ndarray) -> float:
    cc = np.bincount(np.searchsorted(edges, c, side="left"), minlength=edges.size + 1)
    return _psi_from_props(ref_props, cc / c.size)


def psi_categorical(ref: Mapping[str, int], cur: Mapping[str, int]) -> float:
    cats = sorted(set(ref) | set(cur))
    rt, ct = sum(ref.values()), sum(cur.values())
    if not cats or rt == 0 or ct == 0:
        return 0.0
    # at most MAX_CATEGORIES + 1 terms: plain floats cost less than numpy's per-call overhead
    total = 0.0
    for k in cats:
        r = max(ref.get(k, 0) / rt, PSI_EPS)
        c = max(cur.get(k, 0) / ct, PSI_EPS)
        total += (c - r) * math.log(c / r)
    return total


def ks_test(ref: Any, cur: Any, ref_ranks: np.ndarray | None = None, cur_ranks: np.ndarray | None = None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: statistic and asymptotic two-sided p-value.

    The statistic is exact; the p-value is scipy's Kolmogorov limiting distribution with
    Stephens' small-sample correction. ``scipy.stats.ks_2samp`` gives the same answer
    (a test pins it) but costs milliseconds of argument handling per call, and a
    comparison runs one test per feature every ``check_every`` samples.

    The two empirical distribution functions are compared at every value of either
    sample, as scipy does over their concatenation, but at each sample's values apart:
    sorted keys make the searches cheap, and a sample's counts at its own values
    (``*_ranks``, ``searchsorted(a, a, "right")``) can be kept with it (a reference is
    compared again and again). Every difference is the same float as scipy's, so the
    statistic is too.
    """
    from scipy.special import kolmogorov

    a = ref if isinstance(ref, np.ndarray) else _sorted(ref)
    b = cur if isinstance(cur, np.ndarray) else _sorted(cur)
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return 0.0, 1.0
    if ref_ranks is None:
        ref_ranks = np.searchsorted(a, a, side="right")
    if cur_ranks is None:
        cur_ranks = np.searchsorted(b, b, side="right")
    at_a = np.abs(ref_ranks / n - np.searchsorted(b, a, side="right") / m).max()
    at_b = np.abs(np.searchsorted(a, b, side="right") / n - cur_ranks / m).max()
    d = float(max(at_a, at_b))
    en = math.sqrt(n * m / (n + m))
    p = float(kolmogorov((en + 0.12 + 0.11 / en) * d))
    return d, min(max(p, 0.0), 1.0)


def chi2_test(ref: Mapping[str, int], cur: Mapping[str, int]) -> tuple[float, float]:
    """Chi-square test of homogeneity of two count tables (no continuity correction)."""
    from scipy.special import chdtrc

    cats = [k for k in sorted(set(ref) | set(cur)) if ref.get(k, 0) + cur.get(k, 0) > 0]
    if len(cats) < 2 or sum(ref.values()) == 0 or sum(cur.values()) == 0:
        return 0.0, 1.0  # one category on both sides: nothing can have shifted
    # a 2 x k table, in plain floats (k is at most MAX_CATEGORIES + 1)
    rows = ([float(ref.get(k, 0)) for k in cats], [float(cur.get(k, 0)) for k in cats])
    row_sums = [sum(r) for r in rows]
    total = row_sums[0] + row_sums[1]
    stat = 0.0
    for j in range(len(cats)):
        col = rows[0][j] + rows[1][j]
        for i in (0, 1):
            e = row_sums[i] * col / total
            stat += (rows[i][j] - e) ** 2 / e
    return stat, float(chdtrc(len(cats) - 1, stat))


def p95(values: Any) -> float | None:
    """The 95th percentile (numpy's default, linear method); takes a list or a sorted array."""
    a = values if isinstance(values, np.ndarray) else _sorted(values)
    return _quantile_sorted(a, 0.95) if a.size else None


def _quantile_sorted(a: np.ndarray, q: float) -> float:
    """``np.quantile(a, q)`` of a sorted array, without its argument handling: the same arithmetic."""
    n = a.size
    virtual = (n - 1) * q  # numpy's virtual index of the linear method
    lo = int(math.floor(virtual))
    hi = min(lo + 1, n - 1)
    t = virtual - lo
    x, y = float(a[lo]), float(a[hi])
    diff = y - x
    # numpy's _lerp: from the nearer end, so t = 1 gives exactly y
    return y - diff * (1 - t) if t >= 0.5 else x + diff * t


@dataclass
class FeatureResult:
    feature: str
    kind: Literal["numeric", "categorical"]
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    psi: float
    n_reference: int
    n_current: int
    drifted: bool


@dataclass
class LatencyResult:
    feature: str
    baseline_p95: float
    current_p95: float
    ratio: float
    degraded: bool


@dataclass
class Thresholds:
    alpha: float = 0.01
    psi: float = 0.2
    min_samples: int = 100
    latency_tolerance: float = 0.5
    latency_feature: str = "latency_s"


@dataclass
class Comparison:
    features: list[FeatureResult] = field(default_factory=list)
    latency: LatencyResult | None = None

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    def to_json(self) -> dict[str, Any]:
        return {
            "features": [asdict(f) for f in self.features],
            "latency": asdict(self.latency) if self.latency else None,
            "drifted": self.drifted,
        }


def compare(reference: Snapshot | None, current: Snapshot, th: Thresholds, baseline_p95: float | None = None) -> Comparison:
    """Every feature present on both sides with ``min_samples`` values, compared.

    ``baseline_p95`` (seconds) pins the latency baseline; without it the reference
    window's own p95 is the baseline. With no reference yet, only latency against a fixed baseline.
    """
    out = Comparison()
    if reference is None:
        reference = Snapshot({}, {}, 0, 0.0, 0.0)
    numeric = [k for k in sorted(set(reference.numeric) & set(current.numeric))
               if len(reference.numeric[k]) >= th.min_samples and len(current.numeric[k]) >= th.min_samples]
    categorical = [k for k in sorted(set(reference.categorical) & set(current.categorical))
                   if sum(reference.categorical[k].values()) >= th.min_samples
                   and sum(current.categorical[k].values()) >= th.min_samples]
    n_tests = len(numeric) + len(categorical)
    alpha = th.alpha / n_tests if n_tests else th.alpha
    for k in numeric:
        r, c = reference.sorted_numeric(k), current.sorted_numeric(k)
        stat, p = ks_test(r, c, reference.ranks(k))
        edges, ref_props = reference.psi_reference(k, psi_bins(r.size, c.size))
        score = _psi_against(edges, ref_props, c)
        out.features.append(FeatureResult(k, "numeric", "ks", stat, p, score, r.size, c.size, p < alpha and score >= th.psi))
    for k in categorical:
        r2, c2 = reference.categorical[k], current.categorical[k]
        stat, p = chi2_test(r2, c2)
        score = psi_categorical(r2, c2)
        out.features.append(
            FeatureResult(k, "categorical", "chi2", stat, p, score, sum(r2.values()), sum(c2.values()), p < alpha and score >= th.psi)
        )
    lat = th.latency_feature
    cur_lat = current.numeric.get(lat) or []
    if baseline_p95 is not None:
        base: float | None = baseline_p95
    else:
        base = p95(reference.sorted_numeric(lat)) if len(reference.numeric.get(lat) or ()) >= th.min_samples else None
    if base is not None and base > 0 and len(cur_lat) >= th.min_samples:
        cur95 = p95(current.sorted_numeric(lat)) or 0.0
        ratio = cur95 / base
        out.latency = LatencyResult(th.latency_feature, base, cur95, ratio, ratio > 1.0 + th.latency_tolerance)
    return out


class Monitor:
    """One route and model: a current window, a reference, and when to compare.

    ``reference`` is ``"previous"`` (each closed window becomes the reference of the
    next) or ``"pinned"`` (the first full window, or one set with :meth:`pin`, stays).
    A window closes after ``window_samples`` samples, or after ``window_seconds`` once it
    holds ``min_samples``.
    """

    def __init__(
        self,
        *,
        reservoir_size: int,
        window_samples: int,
        window_seconds: float,
        check_every: int,
        reference: Literal["previous", "pinned"],
        check_interval_s: float = 0.0,
        thresholds: Thresholds,
        seed: int | None = None,
        max_features: int = 32,
        now: float | None = None,
        fixed_baseline: bool = False,
    ) -> None:
        self.reservoir_size = reservoir_size
        self.window_samples = window_samples
        self.window_seconds = window_seconds
        self.check_every = check_every
        #: and at least this long after the last comparison (a window that closes is always compared)
        self.check_interval_s = check_interval_s
        self.mode = reference
        self.thresholds = thresholds
        self.max_features = max_features
        #: latency has a baseline of its own: the open window is checked before any reference exists
        self.fixed_baseline = fixed_baseline
        self._rng = random.Random(seed)
        self.current = Window(reservoir_size, self._rng, time.time() if now is None else now, max_features)
        #: when the last sample came (the monitor's creation before any)
        self.last_sample = self.current.started
        self.reference: Snapshot | None = None
        self.pinned = False
        self.last: Comparison | None = None
        self.last_checked_at = 0
        self.last_checked_time = float("-inf")
        self.windows_closed = 0
        #: bumped by :meth:`pin`: a comparison taken before it compared against a reference that is gone
        self.epoch = 0

    def add(self, numeric: Mapping[str, float], categorical: Mapping[str, str], now: float | None = None) -> bool:
        """Record one sample; True when a comparison is due (call :meth:`due_snapshots`)."""
        now = time.time() if now is None else now
        self.last_sample = now
        self.current.add(numeric, categorical)
        return self._due(now)

    def closing(self, now: float | None = None) -> bool:
        """The open window is full or old enough to close (its next :meth:`due_snapshots` rolls it)."""
        return self._closing(self.current.count, time.time() if now is None else now)

    def _closing(self, n: int, now: float) -> bool:
        """The open window, holding ``n`` samples, is full or old enough to close."""
        return n >= self.window_samples or (now - self.current.started >= self.window_seconds and n >= self.thresholds.min_samples)

    def _due(self, now: float) -> bool:
        n = self.current.count
        if self._closing(n, now):
            return True
        return (
            (self.reference is not None or self.fixed_baseline) and n >= self.thresholds.min_samples and n - self.last_checked_at >= self.check_every
            and now - self.last_checked_time >= self.check_interval_s
        )

    def due_snapshots(self, now: float | None = None) -> tuple[Snapshot | None, Snapshot]:
        """The (reference, current) pair to compare now; rolls the window when it is full.

        Call on the event loop; hand the result to :func:`compare` anywhere.
        """
        now = time.time() if now is None else now
        cur = self.current.snapshot(now)
        ref = self.reference
        self.last_checked_at = self.current.count
        self.last_checked_time = now
        closing = self._closing(cur.count, now)
        if closing:
            self.windows_closed += 1
            if self.mode == "previous" or (self.reference is None and not self.pinned):
                self.reference = cur
                self.pinned = False  # a pinned reference, if any, is replaced (reference: previous)
            self.current = Window(self.reservoir_size, self._rng, now, self.max_features)
            self.last_checked_at = 0
        return ref, cur

    def pin(self, snapshot: Snapshot, now: float | None = None) -> None:
        """Make ``snapshot`` (the open window's) the reference, and open a new window: compared with its
        own samples, the next comparisons would find nothing whatever came."""
        self.reference = snapshot
        self.pinned = True
        self.epoch += 1
        self.current = Window(self.reservoir_size, self._rng, time.time() if now is None else now, self.max_features)
        self.last_checked_at = 0
        self.last = None

    def check_now(self, baseline_p95: float | None = None, now: float | None = None) -> Comparison | None:
        """Compare synchronously (tests, the CLI): the due pair, or ``None`` with no reference."""
        ref, cur = self.due_snapshots(now)
        if ref is None and baseline_p95 is None:
            return None
        self.last = compare(ref, cur, self.thresholds, baseline_p95)
        return self.last
