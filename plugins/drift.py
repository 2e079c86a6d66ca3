"""Drift sampling: is what the model receives and returns changing?

Requests that reached an upstream are sampled (``sample_rate``) into per-route,
per-model windows of features: prompt and completion tokens, latency, time to first
token, finish reason, refusals, errors, and every numeric feature a plugin put in
``ctx.features``. Each window is compared with a reference (the previous window, or a
pinned one) by plugins/_drift_stats.py: KS for numeric features, chi-square for
categorical ones, PSI for both. Comparisons run in the CPU executor, off the loop,
from a background task: ``on_done`` only appends to reservoirs.

Results are gauges (``sluice_drift_*``), a warning log event when a feature starts or
stops drifting or p95 latency degrades past the baseline, a report at
``GET /admin/drift`` and ``sluice drift``. A route and model that gets no sample for
``idle_after_s`` shows no values and no alarms any more, until samples come again. Windows
live in each process; with several workers each samples its share of the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from proxy import AdminRoute, Command, Context, Plugin, PluginConfig, hookimpl

from ._drift_stats import Comparison, Monitor, Snapshot, Thresholds, compare
from .metrics import ModelLabel, families, route_name

log = logging.getLogger("sluice.drift")

BUILTIN_NUMERIC = ("prompt_tokens", "completion_tokens", "latency_s", "ttft_s")
BUILTIN_CATEGORICAL = ("finish_reason", "refusal", "error")
NAN = float("nan")


class Drift(Plugin):
    """Samples request features into windows and flags distribution shifts and latency degradation."""

    name = "drift"
    kind = "observer"
    #: prompt_tokens and completion_tokens of streams: ask the upstream for the stream's usage
    needs_usage = True
    #: metering's on_done sets the estimate when an upstream gave no usage (a cut stream)
    follows = ("metering",)

    class Config(PluginConfig):
        sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="Share of requests sampled into the windows.")
        reservoir_size: int = Field(
            1000, ge=10, le=100_000, description="Values kept per feature per window (a uniform reservoir sample).")
        window_samples: int = Field(
            1000, ge=20, le=10_000_000, description="A window closes after this many samples...")
        window_seconds: float = Field(
            3600.0, ge=1.0, le=30 * 86400, description="...or after this long, once it holds min_samples.")
        min_samples: int = Field(
            100, ge=10, le=1_000_000, description="Samples a feature needs on both sides before it is compared.")
        check_every: int = Field(
            100, ge=1, le=1_000_000, description="Compare the open window with the reference every this many samples...")
        check_interval_s: float = Field(
            1.0, ge=0.0, le=86400.0, description="...and at most once this many seconds (a closing window is always compared), "
            "so a busy route pays for comparisons per second, not per request.")
        reference: Literal["previous", "pinned"] = Field(
            "previous", description="'previous': each closed window is the next one's reference; 'pinned': the first full "
            "window (or one pinned through the admin API) stays the reference.")
        alpha: float = Field(
            0.01, gt=0.0, lt=0.5, description="Significance of the KS / chi-square tests, Bonferroni-corrected over features.")
        psi_threshold: float = Field(
            0.2, gt=0.0, le=10.0, description="PSI a significant change must also reach to count as drift (0.1 small, 0.25 large).")
        latency_tolerance: float = Field(
            0.5, gt=0.0, le=100.0, description="p95 latency above baseline * (1 + this) is a degradation.")
        idle_after_s: float | None = Field(
            None, ge=1.0, le=30 * 86400,
            description="A route and model with no sample for this long shows no drift values, alarms or latency "
            "degradation any more (\"drift cleared\" is logged), until samples come again; default window_seconds.")
        baseline_p95_ms: float | None = Field(
            None, gt=0, le=3_600_000, description="A fixed latency baseline (p95, ms); default: the reference window's p95.")
        features: list[str] | None = Field(
            None, max_length=64,
            description=f"Built-in features to record (default all: {', '.join(BUILTIN_NUMERIC + BUILTIN_CATEGORICAL)}).")
        plugin_features: bool = Field(True, description="Also record the numeric features plugins put in ctx.features.")
        max_features: int = Field(32, ge=1, le=256, description="Most features per window (the rest are ignored).")
        max_monitors: int = Field(
            256, ge=1, le=100_000, description="Most route x model windows per process; models beyond are folded into 'other'.")
        seed: int | None = Field(None, description="Seed of sampling and reservoirs (tests, reproducible runs).")

        @model_validator(mode="after")
        def _check(self) -> Drift.Config:
            if self.window_samples < self.min_samples:
                raise ValueError("window_samples must be at least min_samples")
            if self.reservoir_size < self.min_samples:
                raise ValueError("reservoir_size must be at least min_samples")
            if self.features is not None:
                unknown = sorted(set(self.features) - set(BUILTIN_NUMERIC + BUILTIN_CATEGORICAL))
                if unknown:
                    raise ValueError(f"unknown features {', '.join(unknown)} "
                                     f"(choose from {', '.join(BUILTIN_NUMERIC + BUILTIN_CATEGORICAL)})")
            return self

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.config: Drift.Config = config
        c = config
        self.thresholds = Thresholds(
            alpha=c.alpha, psi=c.psi_threshold, min_samples=c.min_samples, latency_tolerance=c.latency_tolerance)
        self.baseline = c.baseline_p95_ms / 1000 if c.baseline_p95_ms else None
        wanted = set(c.features) if c.features is not None else set(BUILTIN_NUMERIC + BUILTIN_CATEGORICAL)
        self.numeric = tuple(f for f in BUILTIN_NUMERIC if f in wanted)
        self.categorical = tuple(f for f in BUILTIN_CATEGORICAL if f in wanted)
        self._every_builtin = len(self.numeric) == len(BUILTIN_NUMERIC) and len(self.categorical) == len(BUILTIN_CATEGORICAL)
        if "prompt_tokens" not in self.numeric and "completion_tokens" not in self.numeric:
            self.needs_usage = False  # type: ignore[misc]  # no token feature: a stream's usage is not worth asking for
        self.rng = random.Random(c.seed)
        self._sampling = c.sample_rate < 1.0
        self.model_label = ModelLabel.for_runtime(runtime)
        self.families = families(runtime)
        self.monitors: dict[tuple[str, str], Monitor] = {}
        self.alarms: dict[tuple[str, str], set[str]] = {}
        self.degraded: dict[tuple[str, str], bool] = {}
        #: the features the last comparison of each monitor key published gauges for
        self.compared: dict[tuple[str, str], set[str]] = {}
        #: the comparison running (or waiting for the one before it) for each monitor key
        self._busy: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: the sluice_drift_samples_total accumulator of each monitor key
        self._samples: dict[tuple[str, str], Any] = {}
        #: stop() ran: nothing is sampled or published any more (a late on_done, a comparison still running)
        self._stopped = False
        #: no sample for this long: what a monitor published is cleared (clear_idle)
        self.idle_s = c.idle_after_s if c.idle_after_s is not None else c.window_seconds
        #: the timer that looks for idle monitors while some monitor has published values (a loop timer, not
        #: a task: it holds this instance only through a weak reference)
        self._idle_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        # numpy and scipy.special take most of a second of CPU to import: do it now, in the
        # executor, rather than in the first comparison while requests are being served
        await self.runtime.run_cpu(_warm_up)
        self.runtime.shared("drift.instances", weakref.WeakSet).add(self)

    async def stop(self) -> None:
        """Replaced by a reload, or removed: what this instance published describes windows no one keeps any more.

        It samples and publishes nothing more (its comparisons still running are cancelled or, when already
        in the executor, dropped), it leaves the admin report, and every gauge it set goes to no value and no
        alarm, as when a feature drops out of a comparison, except those a live instance (the reload's) has
        published since for the same route and model: those values are current.
        """
        self._stopped = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for task in list(self._busy.values()):
            task.cancel()
        self.runtime.shared("drift.instances", weakref.WeakSet).discard(self)
        others = self._others()
        for key in sorted(set(self.compared) | set(self.degraded)):
            self._unpublish(key, "monitor stopped", others)

    def _others(self) -> list[Drift]:
        """The other live instances (a reload's, while this one's retired config drains)."""
        return [o for o in self.runtime.shared("drift.instances", weakref.WeakSet) if o is not self]

    def _unpublish(self, key: tuple[str, str], why: str, others: list[Drift]) -> None:
        """Clear what this instance published for ``key`` (its features' gauges and alarms, its latency
        degradation), but what another live instance publishes for the same route and model: those values
        are current."""
        route, model = key
        taken = set().union(*(o.compared.get(key, ()) for o in others))
        alarmed = self.alarms.get(key, set())
        for feature in sorted(set(self.compared.get(key, ())) - taken):
            self._clear(route, model, feature, feature in alarmed, why)
        if key in self.degraded and not any(key in o.degraded for o in others):
            self._clear_latency(route, model, why)

    # -- sampling ------------------------------------------------------------------------
    def monitor(self, key: tuple[str, str]) -> tuple[tuple[str, str], Monitor]:
        """The monitor of a route and model (``other`` once ``max_monitors`` are taken), and its key."""
        m = self.monitors.get(key)
        if m is None:
            if len(self.monitors) >= self.config.max_monitors:
                key = (key[0], "other")
                m = self.monitors.get(key)
                if m is not None:
                    return key, m
            c = self.config
            m = self.monitors[key] = Monitor(
                reservoir_size=c.reservoir_size, window_samples=c.window_samples, window_seconds=c.window_seconds,
                check_every=c.check_every, check_interval_s=c.check_interval_s, reference=c.reference, thresholds=self.thresholds,
                seed=None if c.seed is None else c.seed + len(self.monitors), max_features=c.max_features,
                fixed_baseline=self.baseline is not None,
            )
        return key, m

    def features_of(self, ctx: Context) -> tuple[dict[str, float], dict[str, str]]:
        t = ctx.timings
        num: dict[str, float] = {}
        cat: dict[str, str] = {}
        u = ctx.usage
        if u is not None and (u.prompt_tokens or u.completion_tokens):
            num["prompt_tokens"] = float(u.prompt_tokens)
            num["completion_tokens"] = float(u.completion_tokens)
        if t.end is not None:
            num["latency_s"] = t.end - t.start
        if ctx.stream and t.first_byte is not None and ctx.status == 200:
            num["ttft_s"] = t.first_byte - t.start
        ok = ctx.outcome == "ok"
        cat["error"] = "no" if ok else "yes"
        answer = ctx.answer if ok else None  # buffered or streamed, as the core read it
        if answer is not None and (answer.choices or ctx.response is None):
            # a buffered answer without choices (embeddings) has neither feature; a stream cut
            # before it finished counts as not refused
            reasons = answer.finish_reasons
            reason = reasons[0] if reasons else None  # the first choice's
            if reason is not None:
                cat["finish_reason"] = reason[:32]
            cat["refusal"] = "yes" if answer.refusal or reason == "content_filter" else "no"
        if not self._every_builtin:
            num = {k: v for k, v in num.items() if k in self.numeric}
            cat = {k: v for k, v in cat.items() if k in self.categorical}
        if self.config.plugin_features and ctx.features:
            for k, v in ctx.features.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in num:
                    num[str(k)[:64]] = float(v)
        return num, cat

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        if not ctx.attempts or self._stopped:
            return  # answered before any model: nothing about the model to learn
        if self._sampling and self.rng.random() >= self.config.sample_rate:
            return
        key, m = self.monitor((route_name(ctx), self.model_label(ctx)))
        num, cat = self.features_of(ctx)
        f = self.families
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = f.acc(f.drift_samples, *key)  # bounded as the monitors are
        samples.inc(1.0)
        if f.eager:
            f.flush()
        if m.add(num, cat):
            running = self._busy.get(key)
            # a periodic check due while a comparison runs is skipped (the next one comes check_every samples
            # later); a window that is full closes now all the same, and its comparison follows the running one
            if running is None or m.closing():
                ref, cur = m.due_snapshots()
                if ref is not None or m.fixed_baseline:  # a fixed latency baseline needs no reference
                    self._busy[key] = self.runtime.spawn(self._evaluate(key, m, ref, cur, running, m.epoch),
                                                         name=f"drift.compare.{key[0]}.{key[1]}")

    async def _evaluate(self, key: tuple[str, str], m: Monitor, ref: Snapshot | None, cur: Snapshot,
                        before: asyncio.Task[None] | None = None, epoch: int | None = None) -> None:
        me = asyncio.current_task()
        try:
            if before is not None:
                await asyncio.wait((before,))  # results are published in the order their checks fell due
            res = await self.runtime.run_cpu(compare, ref, cur, self.thresholds, self.baseline)
        finally:
            if self._busy.get(key) is me:
                del self._busy[key]
        if self._stopped:
            return  # the windows compared are gone with this instance: its gauges were cleared at stop
        if epoch is not None and epoch != m.epoch:
            return  # a pin came since: this compared the old reference, whose results the pin cleared
        m.last = res
        self.publish(key, res)

    def _clear(self, route: str, model: str, feature: str, alarmed: bool, why: str) -> None:
        """A feature's gauges to no value and no alarm; "drift cleared" is logged if it was drifting."""
        f = self.families
        f.child(f.drift_psi, route, model, feature).set(NAN)
        f.child(f.drift_p_value, route, model, feature).set(NAN)
        f.child(f.drift_alarm, route, model, feature).set(0)
        if alarmed:
            log.info("drift cleared: route=%s model=%s feature=%s (%s)", route, model, feature, why,
                     extra={"event": "drift_cleared", "route": route, "model": model, "feature": feature})

    def _clear_latency(self, route: str, model: str, why: str) -> None:
        """The latency gauges to no value and no degradation; "latency cleared" is logged if it was degraded."""
        f = self.families
        f.child(f.latency_p95, route, model, "current").set(NAN)
        f.child(f.latency_p95, route, model, "baseline").set(NAN)
        f.child(f.latency_degraded, route, model).set(0)
        if self.degraded.get((route, model)):
            log.info("latency cleared: route=%s model=%s (%s)", route, model, why,
                     extra={"event": "latency_cleared", "route": route, "model": model})
        self.degraded[(route, model)] = False

    def publish(self, key: tuple[str, str], res: Comparison) -> None:
        """Gauges and log events for one comparison."""
        f = self.families
        route, model = key
        now_drifted = set(res.drifted)
        before = self.alarms.get(key, set())
        for fr in res.features:
            f.child(f.drift_psi, route, model, fr.feature).set(fr.psi)
            f.child(f.drift_p_value, route, model, fr.feature).set(fr.p_value)
            f.child(f.drift_alarm, route, model, fr.feature).set(1 if fr.drifted else 0)
            if fr.drifted and fr.feature not in before:
                log.warning(
                    "drift detected: route=%s model=%s feature=%s test=%s statistic=%.4f p=%.3g psi=%.3f samples=%d/%d",
                    route, model, fr.feature, fr.test, fr.statistic, fr.p_value, fr.psi, fr.n_reference, fr.n_current,
                    extra={"event": "drift", "route": route, "model": model, "feature": fr.feature, "psi": fr.psi},
                )
            elif not fr.drifted and fr.feature in before:
                log.info("drift cleared: route=%s model=%s feature=%s psi=%.3f", route, model, fr.feature, fr.psi,
                         extra={"event": "drift_cleared", "route": route, "model": model, "feature": fr.feature})
        compared = {fr.feature for fr in res.features}
        for feature in sorted(self.compared.get(key, compared) - compared):
            # compared last time, not now (too few samples left, e.g. ttft_s in a window without
            # streams): no value and no alarm any more, as the report says, rather than stale gauges
            self._clear(route, model, feature, feature in before, "no longer compared")
        self.compared[key] = compared
        self.alarms[key] = now_drifted
        lat = res.latency
        if lat is None:
            if key in self.degraded:
                # too few latencies to compare: no p95 and no degradation shown any more, as the report says
                self._clear_latency(route, model, "no longer compared")
        else:
            f.child(f.latency_p95, route, model, "current").set(lat.current_p95)
            f.child(f.latency_p95, route, model, "baseline").set(lat.baseline_p95)
            f.child(f.latency_degraded, route, model).set(1 if lat.degraded else 0)
            if lat.degraded and not self.degraded.get(key):
                log.warning(
                    "latency degraded: route=%s model=%s p95=%.3fs baseline=%.3fs ratio=%.2f",
                    route, model, lat.current_p95, lat.baseline_p95, lat.ratio,
                    extra={"event": "latency_degraded", "route": route, "model": model, "ratio": lat.ratio},
                )
            elif not lat.degraded and self.degraded.get(key):
                log.info("latency cleared: route=%s model=%s p95=%.3fs baseline=%.3fs ratio=%.2f",
                         route, model, lat.current_p95, lat.baseline_p95, lat.ratio,
                         extra={"event": "latency_cleared", "route": route, "model": model, "ratio": lat.ratio})
            self.degraded[key] = lat.degraded
        self._watch_idle()

    # -- idle monitors -------------------------------------------------------------------
    def _watch_idle(self) -> None:
        """Look for idle monitors from now on, every quarter of ``idle_s`` (within 0.25-60 s)."""
        if self._idle_timer is None and not self._stopped:
            period = min(max(self.idle_s / 4, 0.25), 60.0)
            self._idle_timer = asyncio.get_running_loop().call_later(period, _idle_tick, weakref.ref(self))

    def clear_idle(self, now: float) -> bool:
        """Clear what each monitor with no sample for ``idle_s`` published (its features' gauges and alarms,
        its latency degradation), as when they are no longer compared; True while some monitor still shows
        values. Without samples nothing is compared: an alarm would otherwise stay on for good."""
        why = f"no samples for {self.idle_s:g}s"
        others = self._others()
        for key in sorted(set(self.compared) | set(self.degraded)):
            m = self.monitors.get(key)
            if (m is not None and now - m.last_sample < self.idle_s) or key in self._busy:
                continue
            self._unpublish(key, why, others)
            self.alarms.pop(key, None)
            self.compared.pop(key, None)
            self.degraded.pop(key, None)
        return bool(self.compared or self.degraded)

    # -- reports -------------------------------------------------------------------------
    def report(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for (route, model), m in sorted(self.monitors.items()):
            out.append({
                "plugin": self.id,
                "route": route,
                "model": model,
                "reference": m.mode,
                "pinned": m.pinned,
                "window_samples": m.current.count,
                "window_started": m.current.started,
                "reference_samples": m.reference.count if m.reference else 0,
                "windows_closed": m.windows_closed,
                "last_sample": m.last_sample,
                "idle": now - m.last_sample >= self.idle_s,
                "drifted": sorted(self.alarms.get((route, model), ())),
                "latency_degraded": self.degraded.get((route, model), False),
                "last": m.last.to_json() if m.last else None,
            })
        return out

    def pin(self, route: str | None, model: str | None) -> list[tuple[str, str]]:
        """Make the open window the reference of the matching monitors (not if it holds fewer than
        min_samples: nothing could be compared with it), open a new window for each, and clear what their
        last comparisons showed."""
        pinned = []
        for (r, mdl), m in self.monitors.items():
            if (route is None or r == route) and (model is None or mdl == model) and m.current.count >= self.thresholds.min_samples:
                m.pin(m.current.snapshot())
                pinned.append((r, mdl))
                # what was compared against the old reference says nothing of the new one
                self._unpublish((r, mdl), "reference pinned", [])
                self.alarms.pop((r, mdl), None)
                self.compared.pop((r, mdl), None)
        return pinned

    @classmethod
    def admin_routes(cls) -> list[AdminRoute]:
        return [AdminRoute("GET", "drift", _admin_report), AdminRoute("POST", "drift/pin", _admin_pin)]

    @classmethod
    def commands(cls) -> list[Command]:
        return [Command("drift", "Drift report of a running server (from its admin API).", _configure_cli, _run_cli)]


def _idle_tick(ref: weakref.ref[Drift]) -> None:
    """The idle timer fired: clear idle monitors, and look again later while some still show values."""
    inst = ref()
    if inst is None:
        return
    inst._idle_timer = None
    if inst._stopped:
        return
    try:
        again = inst.clear_idle(time.time())
    except Exception as e:  # a timer callback's error would reach only the loop's handler
        log.warning("drift idle check failed (%s)", type(e).__name__)
        again = True
    if again:
        inst._watch_idle()


def _warm_up() -> None:
    from ._drift_stats import Snapshot, Thresholds, compare

    ref = Snapshot({"x": [0.0, 1.0] * 10}, {"c": {"a": 10, "b": 10}}, 20, 0.0, 0.0)
    compare(ref, ref, Thresholds(min_samples=10))


def _instances(runtime: Any) -> list[Drift]:
    """The instances the admin report and pins act on: the serving config's (a reload's retired config,
    still draining, would show each route and model twice), else every live one (no config serves drift)."""
    return runtime.instances(Drift) or list(runtime.shared("drift.instances", weakref.WeakSet))


async def _admin_report(request: Any, runtime: Any) -> Any:
    from aiohttp import web

    rows = [r for inst in _instances(runtime) for r in inst.report()]
    return web.json_response({"monitors": rows}, dumps=lambda o: orjson.dumps(o).decode())


async def _admin_pin(request: Any, runtime: Any) -> Any:
    from aiohttp import web

    route = request.query.get("route")
    model = request.query.get("model")
    insts = _instances(runtime)
    if (route or model) and not any((route is None or r == route) and (model is None or m == model)
                                    for inst in insts for r, m in inst.monitors):
        which = " and ".join(f"{k} {v!r}" for k, v in (("route", route), ("model", model)) if v)
        raise web.HTTPNotFound(reason=f"No drift monitor for {which}: a monitor appears with its first sampled request.")
    pinned = [list(k) for inst in insts for k in inst.pin(route, model)]
    return web.json_response({"pinned": pinned})


def _configure_cli(p: Any) -> None:
    p.add_argument("--url", help="admin base URL (default: from the config's admin host and port)")
    p.add_argument("--token", help="admin token (default: the config's admin.token, or $SLUICE_ADMIN_TOKEN)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--pin", action="store_true", help="pin the open windows as the reference instead of reporting")
    p.add_argument("--route", help="with --pin: only this route")
    p.add_argument("--model", help="with --pin: only this model")


async def _run_cli(args: Any, loaded: Any) -> int:
    import os
    import sys

    import aiohttp

    admin = loaded.config.admin
    url = (args.url or f"http://{admin.host}:{admin.port}").rstrip("/")
    token = args.token or admin.token or os.environ.get("SLUICE_ADMIN_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    params = {k: v for k, v in (("route", args.route), ("model", args.model)) if v}
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as http:
            if args.pin:
                async with http.post(f"{url}/admin/drift/pin", params=params) as r:
                    raw = await r.read()
            else:
                async with http.get(f"{url}/admin/drift") as r:
                    raw = await r.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        print(f"sluice drift: cannot reach the admin API at {url}: {type(e).__name__}", file=sys.stderr)
        return 1
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        print(f"sluice drift: {url} answered {r.status} without JSON: is it Sluice's admin API?", file=sys.stderr)
        return 1
    if r.status != 200:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        print(f"sluice drift: admin API answered {r.status}: {msg or ''}", file=sys.stderr)
        return 1
    if args.format == "json" or args.pin:
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    sys.stdout.write(render_report(body.get("monitors", [])))
    return 0


def render_report(monitors: list[dict[str, Any]]) -> str:
    if not monitors:
        return "no drift windows yet (is drift in a chain, and has traffic reached an upstream?)\n"
    lines = []
    for m in monitors:
        status = "DRIFT " + ",".join(m["drifted"]) if m["drifted"] else "ok"
        if m["latency_degraded"]:
            status += " LATENCY"
        lines.append(f"{m['route']}  {m['model']}  window={m['window_samples']}  reference={m['reference_samples']}"
                     f" ({m['reference']}{', pinned' if m['pinned'] else ''})  {status}")
        last = m.get("last") or {}
        for fr in last.get("features", []):
            flag = "  <- drift" if fr["drifted"] else ""
            lines.append(f"    {fr['feature']:<20} {fr['test']:<5} stat={fr['statistic']:.4f} p={fr['p_value']:.3g}"
                         f" psi={fr['psi']:.3f} n={fr['n_reference']}/{fr['n_current']}{flag}")
        lat = last.get("latency")
        if lat:
            lines.append(f"    p95 latency {lat['current_p95']:.3f}s vs baseline {lat['baseline_p95']:.3f}s"
                         f" (x{lat['ratio']:.2f}){'  <- degraded' if lat['degraded'] else ''}")
    return "\n".join(lines) + "\n"

