"""Prometheus metrics for every request of a route: counts, latencies, tokens, limits, guards, plugins, upstreams.

The families live once per process in ``runtime.metrics`` (``runtime.shared``), so every
route and every reload share them; with ``server.workers`` > 1 the core points
``PROMETHEUS_MULTIPROC_DIR`` at a shared directory before the workers start and serves
the multiprocess collector, and one scrape shows the sum. Gauges therefore declare a
``multiprocess_mode``.

Label values are bounded: routes, upstreams and plugin ids come from the config;
models are the configured ones (or the plugin's ``models`` allow-list), anything else
is ``other``; free-form values (guard finding types, answer reasons) pass through a
per-process limiter that folds everything past ``max_label_values`` into ``other``.
No key, user or raw client string is ever a label.

Recording is cheap: a request adds to plain Python accumulators (one per labelled
series, found once per kind of request), and the accumulated counts are applied to the
Prometheus families when anything reads the registry (a scrape, ``get_sample_value``),
through a collector registered ahead of them. prometheus-client's own ``inc`` and
``observe`` take a lock and validate on every call, and cost several times the rest of
the plugin. With several workers (multiprocess mode) the accumulators are applied at the
end of every request instead, so a scrape of any worker sees every finished request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable

from pydantic import Field

from proxy import Context, Plugin, PluginConfig, hookimpl
from proxy.openai import endpoint_is

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

OTHER = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
PLUGIN_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
OUTCOMES = frozenset({"ok", "answered", "upstream_error", "client_gone", "plugin_error", "error"})
OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}


def operation_name(ctx: Context) -> str:
    """The GenAI operation of a request (``chat``, ``text_completion``, ``embeddings``) or ``other``, from
    the end of its whole path: a route's prefix may end inside the API's name (``/v1/chat/``)."""
    path = ctx.path
    for name, op in OPERATIONS.items():  # chat/completions before completions
        if endpoint_is(path, name):
            return op
    return OTHER


class OperationNames:
    """:func:`operation_name`, remembered per path (bounded: paths are client text)."""

    __slots__ = ("_ops",)

    def __init__(self) -> None:
        self._ops: dict[str, str] = {}

    def __call__(self, ctx: Context) -> str:
        key = ctx.path
        op = self._ops.get(key)
        if op is None:
            op = operation_name(ctx)
            if len(self._ops) < 4096:
                self._ops[key] = op
        return op


def finding_counts(annotation: Any) -> list[tuple[Any, int]]:
    """The finding counts of a plugin's ``ctx.annotations`` entry, as ``(type, count)`` pairs.

    The contract (docs/plugins/metrics.md): an annotation that is a dict with a ``findings`` dict
    holds its findings there (the rest is detail: scores, flags, paths); any other dict is itself
    the findings (``{"EMAIL_ADDRESS": 2}``). Either way only ``int`` values above 0 are findings,
    counts by type: floats (scores), booleans, strings and nested values never are.
    """
    if type(annotation) is not dict:
        return []
    inner = annotation.get("findings")
    found = inner if type(inner) is dict else annotation
    return [(kind, n) for kind, n in found.items() if type(n) is int and n > 0]


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


#: outcomes in which an operation failed without an error status (a stream cut after its 200, say)
FAILED_OUTCOMES = frozenset({"upstream_error", "plugin_error", "error", "client_gone"})


def error_type(status: int | None, outcome: str) -> str:
    """``error.type`` of a GenAI operation (OpenTelemetry GenAI metrics): its HTTP status when that is an
    error (4xx included: a refused or rate-limited call failed for its caller), else the outcome that
    failed; ``""`` for one that succeeded (an empty Prometheus label is no label)."""
    if status is not None and status >= 400:
        return str(status)
    return outcome if outcome in FAILED_OUTCOMES else ""


def route_name(ctx: Context) -> str:
    """The route's name (a compiled route's is its config name or its path prefix), ``none`` without one."""
    route = ctx.route
    if route is None:
        return "none"
    return route.name or route.prefix or "none"


class LabelLimiter:
    """Admits the first ``limit`` distinct values of a label in this process, then ``other``."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        v = str(value)[:64]
        if v in self.seen:
            return v
        if len(self.seen) < self.limit:
            self.seen.add(v)
            return v
        return OTHER


class _Acc(ABC):
    """What one labelled series accumulated since it was last applied to its Prometheus child.

    The child is made (``family.labels(...)``) when something is first applied, so a
    series shows in a scrape only once a request touched it, as with direct calls.
    """

    __slots__ = ("family", "labels", "owner", "dirty", "_child")

    def __init__(self, family: Any, labels: tuple[str, ...], owner: Families) -> None:
        self.family = family
        self.labels = labels
        self.owner = owner
        self.dirty = False
        self._child: Any = None

    @property
    def child(self) -> Any:
        if self._child is None:
            self._child = self.owner.child(self.family, *self.labels)
        return self._child

    def _touch(self) -> None:
        self.dirty = True
        self.owner.dirty.append(self)

    @abstractmethod
    def apply(self) -> None:
        """Hand what accumulated to the Prometheus child and start again from nothing."""


class CounterAcc(_Acc):
    __slots__ = ("pending",)

    def __init__(self, family: Any, labels: tuple[str, ...], owner: Families) -> None:
        super().__init__(family, labels, owner)
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.pending += amount
        if not self.dirty:
            self._touch()

    def apply(self) -> None:
        self.dirty = False
        pending, self.pending = self.pending, 0.0
        self.child.inc(pending)


class HistogramAcc(_Acc):
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, family: Any, labels: tuple[str, ...], owner: Families) -> None:
        super().__init__(family, labels, owner)
        self.bounds = tuple(family._upper_bounds)  # the last is +Inf, as in every child
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        if amount == amount:  # NaN falls in no bucket, as with Histogram.observe
            # the first bucket whose upper bound is >= amount: Histogram.observe's rule
            self.counts[bisect_left(self.bounds, amount)] += 1
        if not self.dirty:
            self._touch()

    def apply(self) -> None:
        self.dirty = False
        child = self.child
        child._sum.inc(self.sum)
        self.sum = 0.0
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0


class GaugeAcc(_Acc):
    __slots__ = ("value",)

    def __init__(self, family: Any, labels: tuple[str, ...], owner: Families) -> None:
        super().__init__(family, labels, owner)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value
        if not self.dirty:
            self._touch()

    def apply(self) -> None:
        self.dirty = False
        self.child.set(self.value)


class Bounded(dict):  # type: ignore[type-arg]
    """A cache dict that starts again when it holds ``limit`` entries (keys with client-influenced parts, or
    few but never unbounded): reads are plain dict reads, only an insert checks the size."""

    __slots__ = ("limit",)

    def __init__(self, limit: int = 4096) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        if len(self) >= self.limit:
            self.clear()
        super().__setitem__(key, value)


class _ApplyOnRead:
    """A collector with no metrics of its own, registered before the families: reading the
    registry applies what the accumulators hold before the families are collected."""

    def __init__(self, families: Families) -> None:
        self.families = families

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.families.flush()
        return []


class Families:
    """Every metric family Sluice's observers publish, registered once per process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from proxy.metrics import multiprocess_mode

        r = registry
        #: accumulators touched since they were last applied
        self.dirty: list[Any] = []
        #: apply at the end of every request (several workers share the values through files)
        self.eager = multiprocess_mode()
        self._accs: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._series: dict[tuple[Any, ...], Series] = {}
        #: the GenAI operation of a request, remembered per route and path
        self.operation = OperationNames()
        self._timing: dict[tuple[str, str], HistogramAcc] = {}
        #: per (upstream, status, error) of an attempt: its counter, the up gauge and the gauge's value
        self.attempt_accs: Bounded = Bounded()
        registry.register(_ApplyOnRead(self))
        self.requests = Counter(
            "sluice_requests_total", "Requests answered, by route, model, status class and outcome.",
            ["route", "model", "status_class", "outcome"], registry=r)
        self.duration = Histogram(
            "sluice_request_duration_seconds", "Time from request arrival to the last byte sent to the client.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "sluice_upstream_duration_seconds", "Time spent in upstream attempts (first send to last byte), per answering upstream.",
            ["route", "upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "sluice_overhead_seconds", "Time of a request not spent waiting on an upstream: Sluice's own latency.",
            ["route"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration as the client sees it (OTel GenAI semconv).",
            ["gen_ai_operation_name", "gen_ai_request_model", "route", "error_type"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Streams: time from request arrival to the first bytes of the upstream's stream (its first token; not its headers).",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Streams: time per output token after the first.",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"], buckets=TPOT_BUCKETS, registry=r)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens per request, by token type (input, output).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type", "route"], buckets=TOKEN_BUCKETS, registry=r)
        self.tokens = Counter(
            "sluice_tokens_total", "Tokens in and out (type: input, output, cached_input, reasoning); estimated ones too.",
            ["route", "model", "type"], registry=r)
        self.estimated = Counter(
            "sluice_usage_estimated_total", "Requests whose usage Sluice estimated because the upstream reported none.",
            ["route", "model"], registry=r)
        self.cost = Counter(
            "sluice_cost_total", "Money spent, from usage and the price table (metering plugin), in the table's currency.",
            ["route", "model"], registry=r)
        self.limits = Counter(
            "sluice_limit_rejections_total", "Requests refused with 429 by a plugin (rate limits, budgets, concurrency).",
            ["route", "plugin", "reason"], registry=r)
        self.blocks = Counter(
            "sluice_guardrail_blocks_total", "Requests a plugin answered early with an error other than 429 (auth, policy, guards).",
            ["route", "plugin", "reason"], registry=r)
        self.findings = Counter(
            "sluice_guardrail_findings_total", "What guards found (types and counts, never values), by plugin.",
            ["route", "plugin", "type"], registry=r)
        self.plugin_duration = Histogram(
            "sluice_plugin_duration_seconds", "Time spent inside each plugin's hooks, by phase.",
            ["route", "plugin", "phase"], buckets=PLUGIN_BUCKETS, registry=r)
        self.attempts = Counter(
            "sluice_upstream_attempts_total", "Upstream attempts by result (ok, http_4xx, http_5xx, connect, timeout, protocol, "
            "cancelled: the client left first, error: anything else).",
            ["upstream", "result"], registry=r)
        self.upstream_up = Gauge(
            "sluice_upstream_up", "1 when the last attempt on this upstream got an answer below 500, else 0 (attempts the "
            "client cancelled leave it as it was).",
            ["upstream"], multiprocess_mode="mostrecent", registry=r)
        # Drift gauges live here too, so one registry call site bounds every family name.
        self.drift_psi = Gauge(
            "sluice_drift_psi", "Population stability index of a feature: current window against the reference.",
            ["route", "model", "feature"], multiprocess_mode="mostrecent", registry=r)
        self.drift_p_value = Gauge(
            "sluice_drift_p_value", "p-value of the drift test of a feature (KS for numeric, chi-square for categorical).",
            ["route", "model", "feature"], multiprocess_mode="mostrecent", registry=r)
        self.drift_alarm = Gauge(
            "sluice_drift_alarm", "1 while a feature has drifted past both thresholds, else 0.",
            ["route", "model", "feature"], multiprocess_mode="mostrecent", registry=r)
        self.latency_p95 = Gauge(
            "sluice_drift_latency_p95_seconds", "p95 latency of the sampled window (window: current or baseline).",
            ["route", "model", "window"], multiprocess_mode="mostrecent", registry=r)
        self.latency_degraded = Gauge(
            "sluice_drift_latency_degraded", "1 while the current p95 latency exceeds the baseline by more than the tolerance.",
            ["route", "model"], multiprocess_mode="mostrecent", registry=r)
        self.drift_samples = Counter(
            "sluice_drift_samples_total", "Requests sampled into drift windows.", ["route", "model"], registry=r)
        self.free_labels = LabelLimiter(256)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, cached: the registry's own lookup takes a lock and validates."""
        key = (id(family), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = family.labels(*labels)
        return c

    def acc(self, family: Any, *labels: str) -> Any:
        """The accumulator of a labelled series (counter, histogram or gauge), made on first use."""
        key = (id(family), labels)
        a = self._accs.get(key)
        if a is None:
            kind = family._type
            cls = HistogramAcc if kind == "histogram" else GaugeAcc if kind == "gauge" else CounterAcc
            a = self._accs[key] = cls(family, labels, self)
        return a

    def count(self, family: Any, amount: float, *labels: str) -> None:
        """Add to a labelled counter from outside :func:`record` (metering's cost, drift's samples)."""
        self.acc(family, *labels).inc(amount)
        if self.eager:
            self.flush()

    def flush(self) -> None:
        """Apply every accumulator touched since the last flush to its Prometheus child."""
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for a in dirty:
                a.apply()

    def series(self, route: str, model: str, status: int | None, outcome: str, op: str, upstream: str | None,
               error_status: int | None = None) -> Series:
        """The accumulators a request of this kind adds to (every label here is bounded). ``error_status``: a
        stream's error event's status (``ctx.error_status``), the operation's error type."""
        key = (route, model, status, outcome, op, upstream, error_status)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = Series(self, route, model, status, outcome, op, upstream, error_status)
        return s

    def attempt(self, upstream: str, status: int | None, error: str | None) -> tuple[CounterAcc, GaugeAcc, int | None]:
        """The attempts counter and the up gauge an attempt with this status or error touches, and the gauge's
        value (``None``: leave the gauge as it is)."""
        result = attempt_result(status, error)
        up = UPSTREAM_UP.get(result, 1)
        return self.acc(self.attempts, upstream, result), self.acc(self.upstream_up, upstream), up

    def timing(self, route: str, key: str) -> HistogramAcc:
        """The plugin-duration accumulator of a ``ctx.timings.plugins`` key (``plugin-id.phase``)."""
        a = self._timing.get((route, key))
        if a is None:
            plugin_id, _, phase = key.rpartition(".")
            a = self._timing[(route, key)] = self.acc(self.plugin_duration, route, plugin_id or key, phase)
        return a


def families(runtime: Any) -> Families:
    """The process's metric families (built on first use in ``runtime.metrics``)."""
    return runtime.shared("metrics.families", lambda: Families(runtime.metrics))


def served_models(ctx: Context) -> tuple[str | None, str | None]:
    """For a request that reached an upstream: the model its answer names (not an error's, which names
    none), and its target's model; ``None`` for either that is not known."""
    r = ctx.response
    found = ctx.answer if r is None or r.status < 400 else None
    return (found.model if found is not None else None), ctx.upstream.model  # type: ignore[union-attr]


class ModelLabel:
    """Maps model names to bounded label values: configured ones pass, others are ``other``."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    @classmethod
    def for_runtime(cls, runtime: Any, extra: Iterable[str] = ()) -> ModelLabel:
        allowed = set(extra)
        config = getattr(runtime, "config", None)
        for up in (getattr(config, "upstreams", None) or {}).values():
            allowed.update(up.models)
        return cls(allowed)

    def __call__(self, ctx: Context) -> str:
        """The label of a finished request: the model its answer names (what the ledger records as served),
        else its target's, else the one it asked for, each only when the config names it."""
        if ctx.upstream is not None:
            for m in served_models(ctx):
                if m in self.allowed:
                    return m  # type: ignore[return-value]
        asked = ctx.model
        return asked if asked and asked in self.allowed else OTHER


#: what an attempt's result says about its upstream (sluice_upstream_up): failures 0, answers below 500 1;
#: a client that left before the answer ("cancelled") says nothing, so the gauge keeps its value
UPSTREAM_UP: dict[str, int | None] = {
    "http_5xx": 0, "connect": 0, "timeout": 0, "protocol": 0, "error": 0, "cancelled": None}


def attempt_result(status: int | None, error: str | None) -> str:
    if error:
        return error if error in ("connect", "timeout", "protocol", "cancelled") else "error"
    if status is None:
        return "error"
    if status >= 500:
        return "http_5xx"
    if status >= 400:
        return "http_4xx"
    return "ok"


class Metrics(Plugin):
    """Publishes Prometheus metrics about every request of the route, in ``on_done``."""

    name = "metrics"
    kind = "observer"
    #: token counters and TPOT need a stream's usage: ask the upstream for it when the client did not
    needs_usage = True
    #: metering's on_done sets the estimate when an upstream gave no usage (a cut stream)
    follows = ("metering",)

    class Config(PluginConfig):
        models: list[str] = Field(
            default_factory=list, max_length=1000,
            description="Model names allowed as label values besides those the upstreams list; others show as 'other'.")
        plugin_timings: bool = Field(
            True, description="Publish sluice_plugin_duration_seconds per plugin and phase (from ctx.timings.plugins).")
        findings: bool = Field(True, description="Publish sluice_guardrail_findings_total from what guards annotate.")

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.config: Metrics.Config = config
        self.families = families(runtime)
        self.model_label = ModelLabel.for_runtime(runtime, config.models)

    @property
    def wants_plugin_timings(self) -> bool:  # type: ignore[override]
        return self.config.plugin_timings

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        record(self.families, ctx, self.model_label(ctx), self.config.plugin_timings, self.config.findings)


class Series:
    """What one kind of request (route, model, status, outcome, operation, upstream) accumulated since it was
    last applied, in one object: a request adds to a few plain numbers and lists here, without a call or an
    object per metric, and :meth:`apply` hands the sums to the Prometheus children when the registry is read.

    Histograms are ``[sum, count of bucket 0, ...]`` lists (the request duration and the GenAI operation
    duration observe the same value into the same buckets: one list feeds both). A child is made only once
    a request touched its metric (``touched``), so a series shows in a scrape as with direct calls.
    """

    __slots__ = ("owner", "labels", "dirty", "touched", "timings", "n", "tokens", "estimated",
                 "duration", "overhead", "upstream_duration", "usage_in", "usage_out", "ttft", "tpot")

    def __init__(self, f: Families, route: str, model: str, status: int | None, outcome: str, op: str, upstream: str | None,
                 error_status: int | None = None) -> None:
        self.owner = f
        self.labels = (route, model, status_class(status), outcome, op, upstream, error_type(error_status or status, outcome))
        self.dirty = False
        #: the metrics (bits, below) a request of this kind ever touched
        self.touched = 0
        #: plugin-duration accumulators of this route by ctx.timings.plugins key (Families.timing's, found once here)
        self.timings: dict[str, HistogramAcc] = Bounded(1024)  # keys are plugin ids and phases
        self.n = 0
        self.tokens = [0.0, 0.0, 0.0, 0.0]  # input, output, cached_input, reasoning
        self.estimated = 0
        self.duration = _histogram(LATENCY_BUCKETS)
        self.overhead = _histogram(OVERHEAD_BUCKETS)
        self.upstream_duration = _histogram(LATENCY_BUCKETS)
        self.usage_in = _histogram(TOKEN_BUCKETS)
        self.usage_out = _histogram(TOKEN_BUCKETS) if op != "embeddings" else None
        self.ttft = _histogram(LATENCY_BUCKETS)
        self.tpot = _histogram(TPOT_BUCKETS)

    def touch(self) -> None:
        self.dirty = True
        self.owner.dirty.append(self)

    def apply(self) -> None:
        self.dirty = False
        f = self.owner
        route, model, status_class, outcome, op, upstream, error = self.labels
        t = self.touched
        child = f.child
        if t & _REQUESTS:
            child(f.requests, route, model, status_class, outcome).inc(self.n)
            self.n = 0
        if t & _DURATION:
            if op != OTHER:  # the GenAI operation duration is of model calls only (not /v1/models, say)
                _apply_histogram(self.duration, child(f.duration, route, model), child(f.operation_duration, op, model, route, error))
            else:
                _apply_histogram(self.duration, child(f.duration, route, model))
        if t & _UPSTREAM_DURATION:
            _apply_histogram(self.upstream_duration, child(f.upstream_duration, route, upstream))
        if t & _OVERHEAD:
            _apply_histogram(self.overhead, child(f.overhead, route))
        tokens = self.tokens
        for bit, i, kind in _TOKEN_KINDS:
            if t & bit:
                child(f.tokens, route, model, kind).inc(tokens[i])
                tokens[i] = 0.0
        if t & _USAGE_IN:
            _apply_histogram(self.usage_in, child(f.token_usage, op, model, "input", route))
        if t & _USAGE_OUT and self.usage_out is not None:
            _apply_histogram(self.usage_out, child(f.token_usage, op, model, "output", route))
        if t & _ESTIMATED:
            child(f.estimated, route, model).inc(self.estimated)
            self.estimated = 0
        if t & _TTFT:
            _apply_histogram(self.ttft, child(f.ttft, op, model, route))
        if t & _TPOT:
            _apply_histogram(self.tpot, child(f.tpot, op, model, route))


_REQUESTS, _DURATION, _UPSTREAM_DURATION, _OVERHEAD = 1, 2, 4, 8
_TOKENS_IN, _TOKENS_OUT, _TOKENS_CACHED, _TOKENS_REASONING = 16, 32, 64, 128
_USAGE_IN, _USAGE_OUT, _ESTIMATED, _TTFT, _TPOT = 256, 512, 1024, 2048, 4096
_TOKEN_KINDS = ((_TOKENS_IN, 0, "input"), (_TOKENS_OUT, 1, "output"), (_TOKENS_CACHED, 2, "cached_input"),
                (_TOKENS_REASONING, 3, "reasoning"))
#: bucket bounds as every child has them (the last is +Inf), for bisect_left: Histogram.observe's rule
_BOUNDS = {b: (*b, float("inf")) for b in (LATENCY_BUCKETS, OVERHEAD_BUCKETS, TOKEN_BUCKETS, TPOT_BUCKETS)}
_LATENCY, _OVERHEAD_B, _TOKEN, _TPOT_B = (_BOUNDS[LATENCY_BUCKETS], _BOUNDS[OVERHEAD_BUCKETS], _BOUNDS[TOKEN_BUCKETS],
                                         _BOUNDS[TPOT_BUCKETS])


def _histogram(buckets: tuple[float, ...]) -> list[float]:
    return [0.0] * (len(buckets) + 2)  # the sum, then a count per bucket (+Inf last)


def _observe(h: list[float], bounds: tuple[float, ...], value: float) -> None:
    """One observation into a :func:`_histogram` list (NaN adds to the sum and falls in no bucket,
    as with ``Histogram.observe``)."""
    h[0] += value
    if value == value:
        h[bisect_left(bounds, value) + 1] += 1


def _apply_histogram(h: list[float], *children: Any) -> None:
    total = h[0]
    h[0] = 0.0
    counts = [(i, int(n)) for i, n in enumerate(h[1:]) if n]
    for i, _ in counts:
        h[i + 1] = 0.0
    for c in children:
        c._sum.inc(total)
        for i, n in counts:
            c._buckets[i].inc(n)


def record(f: Families, ctx: Context, model: str, plugin_timings: bool = True, count_findings: bool = True) -> None:
    """Everything one finished request contributes to the metric families."""
    route = route_name(ctx)
    t = ctx.timings
    outcome = ctx.outcome if ctx.outcome in OUTCOMES else "error"
    status = ctx.status
    upstream = ctx.upstream
    s = f.series(route, model, status, outcome, f.operation(ctx), upstream.upstream if upstream is not None else None,
                 ctx.error_status)
    s.n += 1
    touched = _REQUESTS
    end = t.end
    if end is not None:
        total = end - t.start
        _observe(s.duration, _LATENCY, total)
        waited = 0.0
        if t.upstream_start is not None:
            upstream_end = t.upstream_end if t.upstream_end is not None else end
            waited = max(upstream_end - t.upstream_start, 0.0)
            if upstream is not None:
                _observe(s.upstream_duration, _LATENCY, waited)
                touched |= _UPSTREAM_DURATION
        over = max(total - waited, 0.0)
        _observe(s.overhead, _OVERHEAD_B, over)
        touched |= _DURATION | _OVERHEAD
    usage = ctx.usage
    if usage is not None:
        p, c = usage.prompt_tokens, usage.completion_tokens
        if p < 0 or c < 0 or usage.cached_tokens < 0 or usage.reasoning_tokens < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        tokens = s.tokens
        tokens[0] += p
        tokens[1] += c
        touched |= _TOKENS_IN | _TOKENS_OUT | _USAGE_IN
        if usage.cached_tokens:
            tokens[2] += usage.cached_tokens
            touched |= _TOKENS_CACHED
        if usage.reasoning_tokens:
            tokens[3] += usage.reasoning_tokens
            touched |= _TOKENS_REASONING
        _observe(s.usage_in, _TOKEN, p)
        if s.usage_out is not None:
            _observe(s.usage_out, _TOKEN, c)
            touched |= _USAGE_OUT
        if usage.estimated:
            s.estimated += 1
            touched |= _ESTIMATED
    if t.first_byte is not None and status == 200 and ctx.stream:
        ttft = max(t.first_byte - t.start, 0.0)
        _observe(s.ttft, _LATENCY, ttft)
        touched |= _TTFT
        if usage is not None and usage.completion_tokens > 1 and t.upstream_end is not None:
            tpot = max(t.upstream_end - t.first_byte, 0.0) / (usage.completion_tokens - 1)
            _observe(s.tpot, _TPOT_B, tpot)
            touched |= _TPOT
    s.touched |= touched
    if not s.dirty:
        s.touch()
    blocked = ctx.error_status or status  # a stream a guard stopped after its 200: its error event's status
    if ctx.answered_by and blocked is not None and blocked >= 400:
        fam = f.limits if blocked == 429 else f.blocks
        f.acc(fam, route, ctx.answered_by, f.free_labels(ctx.answer_reason or "error")).inc()
    if count_findings and ctx.annotations:
        for plugin_id, annotation in ctx.annotations.items():
            for kind, n in finding_counts(annotation):
                f.acc(f.findings, route, str(plugin_id), f.free_labels(kind)).inc(n)
    if plugin_timings:
        timings = s.timings
        for key, seconds in t.plugins.items():
            acc = timings.get(key)
            if acc is None:
                acc = timings[key] = f.timing(route, key)
            acc.observe(seconds)
    for a in ctx.attempts:
        key = (a.target.upstream, a.status, a.error)
        found = f.attempt_accs.get(key)
        if found is None:
            found = f.attempt_accs[key] = f.attempt(*key)
        counter, up_gauge, up = found
        counter.inc()
        if up is not None:
            up_gauge.set(up)
    if f.eager:
        f.flush()
