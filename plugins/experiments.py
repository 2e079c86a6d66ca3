"""A/B splits, canary rollouts with automatic rollback, and shadow traffic with comparisons.

* An experiment splits the requests for one model name between variants, sticky
  per key, user or header; the variant goes to ``ctx.tags`` (ledger, traces) and
  each outcome to the ``experiment_results`` table.
* A canary experiment moves traffic to its canary variant in steps and rolls back
  when the canary's error rate or p95 latency falls behind the stable variant.
* A shadow mirrors a sample of requests to a candidate target in the background
  and stores a comparison with the primary answer in ``shadow_comparisons``.

Results live in ``<state.dir>/<records>.db`` (SQLite); ``sluice experiments`` and
``GET /admin/experiments`` report them with statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field, model_validator

from proxy import AdminRoute, Command, Context, Event, Plugin, PluginConfig, StashKey, Target, hookimpl
from proxy.config import Model
from proxy.openai import CREDENTIAL_HEADERS
from proxy.sse import dump_json
from proxy.state import Table

from ._experiments_stats import VariantSample, bucket, canary_verdict, experiment_report, pick, similarity

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from proxy.config import LoadedConfig
    from proxy.runtime import Runtime

log = logging.getLogger("sluice.experiments")

NAME = r"^[A-Za-z0-9_.-]{1,64}$"
RESULTS = Table(
    "experiment_results",
    {"ts": float, "experiment": str, "variant": str, "request_id": str, "ok": int, "status": int, "latency_ms": float,
     "total_ms": float, "prompt_tokens": int, "completion_tokens": int, "upstream": str, "model": str},
    indexes=(("experiment", "ts"),),
)
EVENTS = Table(
    "experiment_events",
    {"ts": float, "experiment": str, "event": str, "step": int, "share": float, "reason": str, "fingerprint": str},
    indexes=(("experiment", "ts"),),
)
SHADOWS = Table(
    "shadow_comparisons",
    {"ts": float, "shadow": str, "request_id": str, "primary_upstream": str, "primary_model": str, "shadow_upstream": str,
     "shadow_model": str, "primary_status": int, "shadow_status": int, "primary_latency_ms": float, "shadow_latency_ms": float,
     "primary_prompt_tokens": int, "primary_completion_tokens": int, "shadow_prompt_tokens": int, "shadow_completion_tokens": int,
     "primary_cost": float, "shadow_cost": float, "primary_finish_reason": str, "shadow_finish_reason": str,
     "exact_match": int, "similarity": float, "error": str},
    indexes=(("shadow", "ts"),),
)
SIMILARITY_INLINE_CHARS = 4000


# -- config -----------------------------------------------------------------------------


class VariantConfig(Model):
    name: str = Field(..., pattern=NAME, description="The variant's label, recorded in ctx.tags['variant'] and the results.")
    weight: float = Field(1.0, ge=0, le=10000, description="Share of the experiment's traffic (A/B; ignored by canaries).")
    model: str | None = Field(
        None, min_length=1, max_length=256,
        description="Model to use instead of the one asked (a router alias when experiments come before the router).",
    )
    upstream: str | None = Field(
        None, min_length=1, max_length=128, description="Send this variant's requests to this upstream (default: wherever the route sends them)."
    )


class CanaryConfig(Model):
    stable: str = Field(..., pattern=NAME, description="The variant taking the rest of the traffic.")
    canary: str = Field(..., pattern=NAME, description="The variant whose share grows step by step.")
    steps: list[float] = Field(
        default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1, max_length=20,
        description="Percentages of traffic the canary gets, in increasing order; the last should be 100.",
    )
    min_requests: int = Field(100, ge=1, le=10_000_000, description="Requests per variant in a step before it is judged.")
    min_step_seconds: float = Field(60.0, ge=0, le=7 * 86400, description="Shortest time on one step.")
    max_error_rate_delta: float = Field(
        0.02, ge=0, le=1, description="How much higher than the stable error rate the canary's may be (0.02 = 2 points)."
    )
    max_p95_ratio: float = Field(1.5, ge=1, le=100, description="Canary p95 latency above this multiple of the stable p95 rolls back.")
    p95_slack_ms: float = Field(
        50.0, ge=0, le=600_000, description="A slower canary p95 rolls back only when it is also this many milliseconds above the stable p95 "
        "(jitter on a fast path is not a regression)."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the error-rate test; a higher rate must also be unlikely by chance.")
    window: int = Field(2000, ge=10, le=1_000_000, description="Most recent outcomes per variant kept for judging.")

    @model_validator(mode="after")
    def _steps(self) -> CanaryConfig:
        if self.stable == self.canary:
            raise ValueError("stable and canary must be different variants")
        if any(not 0 < s <= 100 for s in self.steps):
            raise ValueError("steps must be percentages in (0, 100]")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must increase")
        if self.window < self.min_requests:
            raise ValueError("window must hold at least min_requests outcomes")
        return self


class ExperimentConfig(Model):
    name: str = Field(..., pattern=NAME, description="The experiment's name (results, admin API, CLI).")
    model: str = Field(..., min_length=1, max_length=256, description="Requests for this model name take part; '*' for every request.")
    sticky: Literal["key", "user", "header", "random"] = Field(
        "key", description="What keeps a caller on one variant: its API key, the end user, a header's value, or nothing."
    )
    header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$", description="The header hashed when sticky is 'header'.")
    variants: list[VariantConfig] = Field(..., min_length=2, max_length=16, description="The arms of the experiment.")
    control: str | None = Field(None, pattern=NAME, description="The variant others are compared with (default: the first).")
    keep_route_fallbacks: bool = Field(
        False, description="When a variant names an upstream, keep the route's own targets behind it as fallbacks "
        "(availability over a clean split).",
    )
    canary: CanaryConfig | None = Field(None, description="Roll the canary variant out in steps with automatic rollback.")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if self.sticky == "header" and not self.header:
            raise ValueError("sticky 'header' needs 'header'")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not a variant")
        if self.canary is not None:
            if len(names) != 2 or {self.canary.stable, self.canary.canary} != set(names):
                raise ValueError("a canary experiment has exactly two variants: canary.stable and canary.canary")
        elif not any(v.weight > 0 for v in self.variants):
            raise ValueError("at least one variant needs weight > 0")
        return self


class ShadowTarget(Model):
    upstream: str = Field(..., min_length=1, max_length=128, description="Upstream receiving the mirrored requests.")
    model: str | None = Field(None, min_length=1, max_length=256, description="Model name sent to it (default: the request's).")


class ShadowConfig(Model):
    name: str = Field(..., pattern=NAME, description="The shadow's name in the comparisons table.")
    model: str = Field("*", min_length=1, max_length=256, description="Requests for this model name are mirrored; '*' for all.")
    target: ShadowTarget = Field(..., description="Where mirrored requests go.")
    sample: float = Field(0.1, ge=0, le=1, description="Share of matching requests mirrored (0.1 = 10%).")
    max_concurrency: int = Field(8, ge=1, le=10000, description="Mirrored calls in flight at most; beyond it requests are not mirrored (counted).")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="A mirrored call slower than this is recorded as a timeout.")
    primary_wait_s: float = Field(
        900.0, gt=0, le=86400, description="How long a comparison waits for the primary answer to finish (long streams)."
    )


class _Config(PluginConfig):
    experiments: list[ExperimentConfig] = Field(default_factory=list, max_length=64, description="A/B and canary experiments.")
    shadows: list[ShadowConfig] = Field(default_factory=list, max_length=64, description="Shadow traffic to candidate targets.")
    records: str = Field("experiments", pattern=NAME, description="Records file (<state.dir>/<records>.db) for results and comparisons.")
    check_every: int = Field(20, ge=1, le=100000, description="A canary is judged every this many outcomes.")

    @model_validator(mode="after")
    def _unique(self) -> _Config:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError("experiment names must be unique")
        models = [e.model for e in self.experiments]
        if len(set(models)) != len(models):
            raise ValueError("two experiments match the same model; one request takes part in one experiment")
        shadows = [s.name for s in self.shadows]
        if len(set(shadows)) != len(shadows):
            raise ValueError("shadow names must be unique")
        return self


# -- canary -----------------------------------------------------------------------------


def fingerprint(exp: ExperimentConfig) -> str:
    """Identifies a rollout: a changed canary or steps starts over rather than resuming."""
    spec = [[v.model_dump() for v in exp.variants], exp.canary.model_dump() if exp.canary else None]
    return hashlib.sha256(orjson.dumps(spec)).hexdigest()[:16]


class Canary:
    """One canary rollout's state in this process: step, status, recent outcomes per variant."""

    RUNNING, COMPLETED, ROLLED_BACK = "running", "completed", "rolled_back"

    def __init__(self, exp: ExperimentConfig, records: Any) -> None:
        assert exp.canary is not None
        self.exp = exp
        self.cfg = exp.canary
        self.records = records
        self.fp = fingerprint(exp)
        self.step = 0
        self.status = self.RUNNING
        self.reason = "started"
        self.step_started = time.monotonic()
        self.stable: collections.deque[tuple[bool, float | None]] = collections.deque(maxlen=self.cfg.window)
        self.canary: collections.deque[tuple[bool, float | None]] = collections.deque(maxlen=self.cfg.window)
        self.seen = 0
        self.history: list[dict[str, Any]] = []

    @property
    def share(self) -> float:
        """The canary's share of traffic now, in percent."""
        if self.status == self.ROLLED_BACK:
            return 0.0
        if self.status == self.COMPLETED:
            return 100.0
        return self.cfg.steps[self.step]

    def restore(self, row: dict[str, Any]) -> None:
        if row.get("fingerprint") != self.fp:
            return
        event = row.get("event")
        step = int(row.get("step") or 0)
        self.step = min(max(step, 0), len(self.cfg.steps) - 1)
        if event == "rollback":
            self.status = self.ROLLED_BACK
        elif event in ("completed", "promote"):
            self.status = self.COMPLETED
        self.reason = f"resumed after restart ({row.get('reason') or event})"

    def observe(self, variant: str, ok: bool, latency_ms: float | None, check_every: int) -> None:
        if self.status != self.RUNNING:
            return
        if variant == self.cfg.canary:
            self.canary.append((ok, latency_ms))
        elif variant == self.cfg.stable:
            self.stable.append((ok, latency_ms))
        else:
            return
        self.seen += 1
        if self.seen % check_every == 0:
            self.judge(time.monotonic())

    @staticmethod
    def _sample(name: str, window: collections.deque[tuple[bool, float | None]]) -> VariantSample:
        return VariantSample(name, [ok for ok, _ in window], [lat for ok, lat in window if ok and lat is not None])

    def judge(self, now: float) -> str:
        """Advance, hold or roll back from the current windows; returns the action taken."""
        if self.status != self.RUNNING:
            return "hold"
        v = canary_verdict(
            self._sample(self.cfg.stable, self.stable), self._sample(self.cfg.canary, self.canary),
            min_requests=self.cfg.min_requests, max_error_rate_delta=self.cfg.max_error_rate_delta,
            max_p95_ratio=self.cfg.max_p95_ratio, alpha=self.cfg.alpha, p95_slack_ms=self.cfg.p95_slack_ms,
        )
        if v.action == "rollback":
            self.status = self.ROLLED_BACK
            self.event("rollback", v.reason)
            return "rollback"
        if v.action == "advance" and now - self.step_started >= self.cfg.min_step_seconds:
            if self.step + 1 >= len(self.cfg.steps):
                self.status = self.COMPLETED
                self.event("completed", v.reason)
                return "completed"
            self.step += 1
            self.step_started = now
            # each step is judged on its own traffic: the canary's earlier, smaller sample says little about this share
            self.canary.clear()
            self.event("step", v.reason)
            return "step"
        return "hold"

    def event(self, kind: str, reason: str) -> None:
        self.reason = reason
        row = {"ts": time.time(), "experiment": self.exp.name, "event": kind, "step": self.step, "share": self.share,
               "reason": reason, "fingerprint": self.fp}
        self.history.append(row)
        del self.history[:-50]
        level = logging.WARNING if kind == "rollback" else logging.INFO
        log.log(level, "experiments: canary %s %s: canary share %.0f%% (%s)", self.exp.name, kind, self.share, reason)
        self.records.append(EVENTS.name, row)

    def manual(self, action: str) -> None:
        if action == "rollback":
            self.status = self.ROLLED_BACK
        elif action == "promote":
            self.status = self.COMPLETED
            self.step = len(self.cfg.steps) - 1
        elif action == "resume":
            self.status = self.RUNNING
            self.step_started = time.monotonic()
            self.canary.clear()
        self.event(action, "operator request")

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "step": self.step, "share": self.share, "steps": self.cfg.steps, "reason": self.reason,
                "canary_outcomes_this_step": len(self.canary), "stable_outcomes": len(self.stable), "events": self.history[-10:]}


# -- per request -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Answer:
    """What the primary answered, gathered on the way out, for shadow comparisons."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class _ShadowJob:
    """A sampled mirror: prepared in on_request, sent once the primary upstream answers."""

    shadow: ShadowConfig
    endpoint: str
    body: bytes
    headers: dict[str, str]
    model: str | None
    primary: asyncio.Future[dict[str, Any]] | None = None


@dataclass(slots=True)
class _Assigned:
    #: None when the request is only mirrored, in no experiment
    experiment: ExperimentConfig | None
    variant: str
    canary: Canary | None
    jobs: list[_ShadowJob] = field(default_factory=list)
    answer: _Answer | None = None
    launched: bool = False


STASH: StashKey[_Assigned] = StashKey("experiments")
#: marks a mirror not sent because its shadow was at max_concurrency
_DROPPED: Any = object()


def _answer_of(body: Any) -> tuple[str, str | None]:
    if not isinstance(body, dict):
        return "", None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None
    ch = choices[0]
    msg = ch.get("message")
    if isinstance(msg, dict):
        text = msg.get("content") if isinstance(msg.get("content"), str) else ""
        if not text and msg.get("tool_calls"):
            text = dump_json(msg["tool_calls"]).decode()
    else:
        text = ch.get("text") if isinstance(ch.get("text"), str) else ""
    return text, ch.get("finish_reason")


def _usage_of(body: Any) -> tuple[int | None, int | None]:
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return None, None
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    return (p if isinstance(p, int) else None, c if isinstance(c, int) else None)


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.assigned = Counter(
            "sluice_experiment_requests_total", "Requests assigned to a variant.", ["experiment", "variant"], registry=registry
        )
        self.shadow = Counter(
            "sluice_shadow_requests_total", "Mirrored requests by result: sent, dropped (concurrency full), error, compared.",
            ["shadow", "result"], registry=registry,
        )
        self.canary_share = Gauge(
            "sluice_canary_share_percent", "The canary variant's current share of traffic.", ["experiment"], registry=registry
        )


class _Registry:
    """Live experiments plugin instances of this process, for the admin API."""

    def __init__(self) -> None:
        self.instances: list[Experiments] = []


class Experiments(Plugin):
    """A/B splits, canaries and shadow traffic."""

    name = "experiments"
    kind = "transform"
    Config = _Config

    config: _Config

    @classmethod
    def check(cls, config: _Config, sluice: Any) -> None:
        known = sluice.upstream_names()
        for i, e in enumerate(config.experiments):
            missing = sorted({v.upstream for v in e.variants if v.upstream} - known)
            if missing:
                raise ValueError(f"experiments[{i}].variants: unknown upstream(s) {', '.join(missing)}: add them to 'upstreams'")
        for i, sh in enumerate(config.shadows):
            if sh.target.upstream not in known:
                raise ValueError(f"shadows[{i}].target.upstream: unknown upstream {sh.target.upstream}: add it to 'upstreams'")

    async def start(self) -> None:
        c = self.config
        self.records = self.runtime.state.records(c.records)
        for t in (RESULTS, EVENTS, SHADOWS):
            self.records.ensure(t)
        self.metrics = self.runtime.shared("experiments.metrics", lambda: _Metrics(self.runtime.metrics))
        self._by_model = {e.model: e for e in c.experiments}
        self._weights = {e.name: [v.weight for v in e.variants] for e in c.experiments}
        self._variants = {e.name: {v.name: v for v in e.variants} for e in c.experiments}
        # A reload keeps a running rollout where it is; a restart resumes from the events table.
        canaries: dict[str, Canary] = self.runtime.shared("experiments.canaries", dict)
        self.canaries: dict[str, Canary] = {}
        for e in c.experiments:
            if e.canary is None:
                continue
            old = canaries.get(e.name)
            if old is not None and old.fp == fingerprint(e):
                old.records = self.records
                self.canaries[e.name] = old
                continue
            can = Canary(e, self.records)
            rows = await self.records.query(
                "SELECT event, step, reason, fingerprint FROM experiment_events WHERE experiment = ? ORDER BY ts DESC, rowid DESC LIMIT 1",
                (e.name,),
            )
            if rows and rows[0].get("fingerprint") == can.fp:
                can.restore(rows[0])
            else:
                can.event("start", "rollout started" if not rows else "rollout started (the canary's definition changed)")
            canaries[e.name] = self.canaries[e.name] = can
            self.metrics.canary_share.labels(e.name).set(can.share)
        self._shadows_by_model: dict[str, list[ShadowConfig]] = {}
        for sh in c.shadows:
            self._shadows_by_model.setdefault(sh.model, []).append(sh)
        self._inflight: dict[str, int] = {sh.name: 0 for sh in c.shadows}
        self._prices: Any = None
        self.runtime.shared("experiments.registry", _Registry).instances.append(self)

    async def stop(self) -> None:
        reg = self.runtime.shared("experiments.registry", _Registry)
        if self in reg.instances:
            reg.instances.remove(self)

    # -- request ------------------------------------------------------------------------
    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        model = ctx.model
        if model is None:
            return
        exp = self._by_model.get(model) or self._by_model.get("*")
        assigned = None
        if exp is not None:
            assigned = self._assign(ctx, exp)
        shadows = self._shadows_by_model.get(model)
        wild = self._shadows_by_model.get("*")
        if shadows or wild:
            for sh in (*(shadows or ()), *(wild or ())):
                if sh.sample < 1.0 and random.random() >= sh.sample:
                    continue
                job = self._prepare(ctx, sh)
                if job is None:
                    continue
                if assigned is None:
                    assigned = _Assigned(None, "", None)
                    ctx.stash[STASH] = assigned
                assigned.jobs.append(job)
                if assigned.answer is None:
                    assigned.answer = _Answer()

    def _unit(self, ctx: Context, exp: ExperimentConfig) -> str | None:
        ident = ctx.identity
        if exp.sticky == "random":
            return None
        if exp.sticky == "header":
            v = ctx.headers.get(exp.header or "")
            if v:
                return "h:" + v
        if exp.sticky == "user":
            u = ident.user if ident is not None and ident.user else None
            if u is None:
                body = ctx.body
                u = body.get("user") if isinstance(body, dict) and isinstance(body.get("user"), str) else None
            if u:
                return "u:" + u
        if ident is not None:
            return "k:" + ident.key_id
        for h in CREDENTIAL_HEADERS:  # authorization first (as before), then Azure's api-key and x-api-key
            cred = ctx.headers.get(h)
            if cred:
                return "c:" + hashlib.sha256(cred.encode("utf-8", "surrogateescape")).hexdigest()
        return "ip:" + ctx.client_ip if ctx.client_ip else None

    def _assign(self, ctx: Context, exp: ExperimentConfig) -> _Assigned:
        unit = self._unit(ctx, exp)
        pos = bucket(exp.name, unit) if unit is not None else random.random()
        canary = self.canaries.get(exp.name)
        if canary is not None:
            name = canary.cfg.canary if pos * 100 < canary.share else canary.cfg.stable
        else:
            name = exp.variants[pick(pos, self._weights[exp.name])].name
        variant = self._variants[exp.name][name]
        label = f"{exp.name}/{name}"
        if variant.upstream is not None:
            own = [Target(variant.upstream, variant.model, label=label)]
            ctx.targets = own + (list(ctx.targets) if exp.keep_route_fallbacks else [])
        elif variant.model is not None:
            body = ctx.body
            if isinstance(body, dict):
                body["model"] = variant.model
                ctx.body = body
            # a router before us pinned model names on its targets: this variant's model replaces them
            ctx.targets = [Target(t.upstream, variant.model, label=label) if t.model is not None else t for t in ctx.targets]
        ctx.tags["experiment"] = exp.name
        ctx.tags["variant"] = name
        self.metrics.assigned.labels(exp.name, name).inc()
        a = _Assigned(exp, name, canary)
        ctx.stash[STASH] = a
        return a

    # -- shadow -----------------------------------------------------------------------------
    def _prepare(self, ctx: Context, sh: ShadowConfig) -> _ShadowJob | None:
        body = ctx.body
        if not isinstance(body, dict):
            return None
        shadow_body = {k: v for k, v in body.items() if k != "stream_options"}
        if "stream" in shadow_body:
            # a buffered answer is simpler to compare and cheaper to hold than a stream; a body without
            # the field (an embedding, say, whose endpoint has no such parameter) is left without it
            shadow_body["stream"] = False
        if sh.target.model is not None:
            shadow_body["model"] = sh.target.model
        # the client's credentials are for the upstream it asked; the shadow upstream authenticates with its own api_key
        headers = {"x-sluice-shadow": sh.name}
        model = shadow_body.get("model")
        return _ShadowJob(sh, ctx.endpoint, dump_json(shadow_body), headers, model if isinstance(model, str) else None)

    def _launch(self, ctx: Context, a: _Assigned) -> None:
        """Send the prepared mirrors, now that the primary upstream answers.

        Not earlier: a plugin later in the chain may still refuse the request (a
        guard, a limit), and a refused request must not reach the candidate.
        """
        if ctx.upstream is None:
            return
        for job in a.jobs:
            if job.primary is not None:
                continue
            sh = job.shadow
            if self._inflight[sh.name] >= sh.max_concurrency:
                self.metrics.shadow.labels(sh.name, "dropped").inc()
                job.primary = _DROPPED
                continue
            job.primary = asyncio.get_running_loop().create_future()
            self._inflight[sh.name] += 1
            self.metrics.shadow.labels(sh.name, "sent").inc()
            self.runtime.spawn(self._shadow(ctx, job), f"experiments.shadow.{sh.name}")
        a.launched = True

    async def _shadow(self, ctx: Context, job: _ShadowJob) -> None:
        sh = job.shadow
        assert job.primary is not None
        model = job.model
        t0 = time.perf_counter()
        status: int | None = None
        error = None
        resp_body: Any = None
        try:
            resp = await asyncio.wait_for(
                self.runtime.upstreams.call(Target(sh.target.upstream, sh.target.model), "POST", job.endpoint, job.body, job.headers,
                                            timeout=sh.timeout_s),
                sh.timeout_s,
            )
            status = resp.status
            resp_body = resp.json
        except asyncio.TimeoutError:
            error = "timeout"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failing shadow is data, never a problem for the client
            error = type(e).__name__
        finally:
            self._inflight[sh.name] -= 1
        latency = (time.perf_counter() - t0) * 1000.0
        if error is not None or (status is not None and status >= 400):
            self.metrics.shadow.labels(sh.name, "error").inc()
        try:
            primary = await asyncio.wait_for(asyncio.shield(job.primary), sh.primary_wait_s)
        except asyncio.TimeoutError:
            primary = {}
        text, finish = _answer_of(resp_body)
        sp, sc = _usage_of(resp_body)
        ptext = primary.get("text")
        sim = None
        exact = None
        comparable = finish is not None or primary.get("finish_reason") is not None  # embeddings have no text to compare
        if ptext is not None and status == 200 and primary.get("status") == 200 and comparable:
            exact = int(ptext == text)
            if len(ptext) + len(text) > SIMILARITY_INLINE_CHARS:
                sim = await self.runtime.run_cpu(similarity, ptext, text)
            else:
                sim = similarity(ptext, text)
        pm = primary.get("model")
        self.records.append(SHADOWS.name, {
            "ts": time.time(), "shadow": sh.name, "request_id": ctx.request_id,
            "primary_upstream": primary.get("upstream"), "primary_model": pm,
            "shadow_upstream": sh.target.upstream, "shadow_model": model if isinstance(model, str) else None,
            "primary_status": primary.get("status"), "shadow_status": status,
            "primary_latency_ms": primary.get("latency_ms"), "shadow_latency_ms": latency,
            "primary_prompt_tokens": primary.get("prompt_tokens"), "primary_completion_tokens": primary.get("completion_tokens"),
            "shadow_prompt_tokens": sp, "shadow_completion_tokens": sc,
            # ctx.cost is read now, not in on_done: metering may run after us in the chain
            "primary_cost": ctx.cost if ctx.cost is not None else self._cost(pm, primary.get("prompt_tokens"), primary.get("completion_tokens")),
            "shadow_cost": self._cost(model if isinstance(model, str) else None, sp, sc),
            "primary_finish_reason": primary.get("finish_reason"), "shadow_finish_reason": finish,
            "exact_match": exact, "similarity": sim, "error": error or (None if primary else "primary_unknown"),
        })
        self.metrics.shadow.labels(sh.name, "compared").inc()

    def _cost(self, model: str | None, prompt: int | None, completion: int | None) -> float | None:
        if model is None or prompt is None or completion is None:
            return None
        if self._prices is None:
            from ._usage import PriceTable

            self._prices = PriceTable.build(self.runtime.config.prices)
        price = self._prices.lookup(model)
        return price.cost_of(prompt, completion) if price is not None else None

    # -- answer ------------------------------------------------------------------------------
    @hookimpl
    def on_response(self, ctx: Context) -> None:
        a = ctx.stash.get(STASH)
        if a is None or a.answer is None or ctx.response is None:
            return
        if not a.launched:
            self._launch(ctx, a)
        text, finish = _answer_of(ctx.response.json)
        a.answer.text.append(text)
        a.answer.finish_reason = finish

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        a = ctx.stash.get(STASH)
        if a is None or a.answer is None:
            return None
        if not a.launched:
            self._launch(ctx, a)
        obj = event.json
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if choices and isinstance(choices[0], dict) and choices[0].get("index", 0) == 0:
            ch = choices[0]
            delta = ch.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else ch.get("text")
            if isinstance(piece, str):
                a.answer.text.append(piece)
            if ch.get("finish_reason") is not None:
                a.answer.finish_reason = ch["finish_reason"]
        return None

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        a = ctx.stash.get(STASH)
        if a is None:
            return
        t = ctx.timings
        end = t.end or time.perf_counter()
        total_ms = (end - t.start) * 1000.0
        latency_ms = (t.first_byte - t.start) * 1000.0 if ctx.stream and t.first_byte is not None else total_ms
        u = ctx.usage
        if a.jobs:
            summary = {
                "status": ctx.status, "latency_ms": total_ms, "upstream": ctx.upstream.upstream if ctx.upstream else None,
                "model": (ctx.upstream.model if ctx.upstream and ctx.upstream.model else ctx.model),
                "prompt_tokens": u.prompt_tokens if u else None, "completion_tokens": u.completion_tokens if u else None,
                "text": "".join(a.answer.text) if a.answer is not None and ctx.outcome == "ok" else None,
                "finish_reason": a.answer.finish_reason if a.answer is not None else None,
            }
            for job in a.jobs:
                if job.primary is not None and job.primary is not _DROPPED and not job.primary.done():
                    job.primary.set_result(summary)
        if a.experiment is None or ctx.outcome == "client_gone":
            return
        ok = ctx.outcome == "ok" and (ctx.status or 0) < 500
        if ctx.outcome == "answered" and ctx.status is not None and ctx.status < 500:
            return  # a plugin after us answered (limits, policy): not the variant's doing
        self.records.append(RESULTS.name, {
            "ts": time.time(), "experiment": a.experiment.name, "variant": a.variant, "request_id": ctx.request_id,
            "ok": int(ok), "status": ctx.status, "latency_ms": latency_ms, "total_ms": total_ms,
            "prompt_tokens": u.prompt_tokens if u else None, "completion_tokens": u.completion_tokens if u else None,
            "upstream": ctx.upstream.upstream if ctx.upstream else None,
            "model": ctx.upstream.model if ctx.upstream and ctx.upstream.model else ctx.model,
        })
        if a.canary is not None:
            before = (a.canary.status, a.canary.step)
            a.canary.observe(a.variant, ok, latency_ms if ok else None, self.config.check_every)
            if (a.canary.status, a.canary.step) != before:
                self.metrics.canary_share.labels(a.experiment.name).set(a.canary.share)

    # -- reports ---------------------------------------------------------------------------------
    async def report(self, name: str | None = None, limit: int = 100_000) -> dict[str, Any]:
        """Statistics for this instance's experiments (or one of them), shadows and canaries."""
        return await build_report(self.records, self.runtime.run_cpu, self.config, name, limit, self.canaries)

    @classmethod
    def commands(cls) -> list[Command]:
        return [Command("experiments", "show experiments, canaries and shadow comparisons with statistics", _configure_cli, _run_cli)]

    @classmethod
    def admin_routes(cls) -> list[AdminRoute]:
        return [
            AdminRoute("GET", "experiments", _admin_list),
            AdminRoute("GET", "experiments/{name}", _admin_one),
            AdminRoute("POST", "experiments/{name}/{action:rollback|promote|resume}", _admin_action),
        ]


async def build_report(records: Any, run_cpu: Any, config: _Config, name: str | None, limit: int,
                       canaries: dict[str, Canary] | None = None) -> dict[str, Any]:
    exps = [e for e in config.experiments if name is None or e.name == name]
    out: dict[str, Any] = {"experiments": [], "shadows": []}
    for e in exps:
        rows = await records.query(
            "SELECT variant, ok, latency_ms FROM experiment_results WHERE experiment = ? ORDER BY ts DESC LIMIT ?", (e.name, limit)
        )
        by: dict[str, VariantSample] = {v.name: VariantSample(v.name, [], []) for v in e.variants}
        for r in rows:
            s = by.get(r["variant"])
            if s is None:
                continue
            s.ok.append(bool(r["ok"]))
            if r["ok"] and r["latency_ms"] is not None:
                s.latencies_ms.append(float(r["latency_ms"]))
        control = e.control or (e.canary.stable if e.canary else None)
        rep = await run_cpu(experiment_report, list(by.values()), control)
        rep["name"] = e.name
        rep["model"] = e.model
        if e.canary is not None:
            live = (canaries or {}).get(e.name)
            if live is not None:
                rep["canary"] = live.describe()
            else:
                ev = await records.query(
                    "SELECT ts, event, step, share, reason FROM experiment_events WHERE experiment = ? ORDER BY ts DESC, rowid DESC LIMIT 10",
                    (e.name,),
                )
                rep["canary"] = {"events": ev}
        out["experiments"].append(rep)
    if name is None or any(s.name == name for s in config.shadows):
        for sh in config.shadows:
            if name is not None and sh.name != name:
                continue
            agg = await records.query(
                "SELECT COUNT(*) AS compared, SUM(shadow_status = 200) AS shadow_ok, SUM(error IS NOT NULL) AS errors, "
                "AVG(primary_latency_ms) AS primary_latency_ms, AVG(shadow_latency_ms) AS shadow_latency_ms, "
                "AVG(exact_match) AS exact_match_rate, AVG(similarity) AS similarity_mean, "
                "SUM(primary_cost) AS primary_cost, SUM(shadow_cost) AS shadow_cost, "
                "AVG(primary_completion_tokens) AS primary_completion_tokens, AVG(shadow_completion_tokens) AS shadow_completion_tokens, "
                "AVG(primary_finish_reason = shadow_finish_reason) AS finish_reason_agreement "
                "FROM shadow_comparisons WHERE shadow = ?",
                (sh.name,),
            )
            out["shadows"].append({"name": sh.name, "target": sh.target.model_dump(), "sample": sh.sample, **(agg[0] if agg else {})})
    return out


# -- admin API --------------------------------------------------------------------------------


def _instances(runtime: Runtime) -> list[Experiments]:
    """Live instances, newest first (during a reload the retiring chain's are still listed)."""
    return list(reversed(runtime.shared("experiments.registry", _Registry).instances))


async def _admin_list(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    from aiohttp import web

    out: dict[str, Any] = {"experiments": [], "shadows": []}
    seen: set[tuple[str, str]] = set()
    for inst in _instances(runtime):
        rep = await inst.report()
        for kind in ("experiments", "shadows"):
            for item in rep[kind]:
                if (kind, item["name"]) not in seen:
                    seen.add((kind, item["name"]))
                    out[kind].append(item)
    return web.json_response(out, dumps=lambda o: orjson.dumps(o).decode())


def _find(runtime: Runtime, name: str) -> Experiments | None:
    for inst in _instances(runtime):
        if any(e.name == name for e in inst.config.experiments) or any(s.name == name for s in inst.config.shadows):
            return inst
    return None


async def _admin_one(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    from aiohttp import web

    name = request.match_info["name"]
    inst = _find(runtime, name)
    if inst is None:
        return _not_found(name)
    return web.json_response(await inst.report(name), dumps=lambda o: orjson.dumps(o).decode())


async def _admin_action(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    from aiohttp import web

    name, action = request.match_info["name"], request.match_info["action"]
    inst = _find(runtime, name)
    canary = inst.canaries.get(name) if inst is not None else None
    if canary is None:
        return _not_found(name, "canary ")
    canary.manual(action)
    inst.metrics.canary_share.labels(name).set(canary.share)
    return web.json_response(canary.describe(), dumps=lambda o: orjson.dumps(o).decode())


def _not_found(name: str, what: str = "") -> web.StreamResponse:
    from aiohttp import web

    from proxy.errors import error_body

    return web.Response(status=404, body=error_body(f"No {what}experiment or shadow named {name!r} is running.", "not_found_error", "not_found"),
                        content_type="application/json")


# -- CLI ------------------------------------------------------------------------------------


def _configure_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="one experiment or shadow (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--limit", type=int, default=100_000, help="most recent outcomes per experiment to analyse")


async def _run_cli(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from proxy.state import StateHub

    configs = [cfg for chain in loaded.chains for cls, cfg in chain if cls is Experiments]
    if not configs:
        print("sluice experiments: no route of this config uses the experiments plugin")
        return 1
    if args.name is not None:
        known = sorted({x.name for cfg in configs for x in (*cfg.experiments, *cfg.shadows)})  # type: ignore[attr-defined]
        if args.name not in known:
            print(f"sluice experiments: no experiment or shadow named {args.name!r} in this config "
                  f"(known: {', '.join(known) or 'none'})", file=sys.stderr)
            return 1
    hub = StateHub(loaded.config.state)
    await hub.start()
    try:
        reports = []
        for cfg in configs:
            assert isinstance(cfg, _Config)
            rec = hub.records(cfg.records)
            for t in (RESULTS, EVENTS, SHADOWS):
                rec.ensure(t)

            async def run_cpu(fn: Any, *a: Any) -> Any:
                return fn(*a)

            reports.append(await build_report(rec, run_cpu, cfg, args.name, args.limit))
    finally:
        await hub.close()
    if args.json:
        print(orjson.dumps(reports, option=orjson.OPT_INDENT_2).decode())
        return 0
    for rep in reports:
        print(format_report(rep))
    return 0


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v * 100:.2f}%"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def format_report(rep: dict[str, Any]) -> str:
    """The report as plain text tables."""
    lines: list[str] = []
    for e in rep["experiments"]:
        lines.append(f"experiment {e['name']} (model {e['model']})")
        if "canary" in e:
            c = e["canary"]
            if "status" in c:
                lines.append(f"  canary: {c['status']}, share {c['share']:.0f}% (step {c['step'] + 1}/{len(c['steps'])}): {c['reason']}")
            for ev in c.get("events", [])[:5]:
                lines.append(f"    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ev['ts']))} {ev['event']} share={_f(ev['share'])}%: {ev['reason']}")
        lines.append(f"  {'variant':<16}{'requests':>9}{'errors':>8}{'error rate':>12}{'95% CI':>20}{'p50 ms':>9}{'p95 ms':>9}")
        for v in e["variants"]:
            ci = v["error_rate_ci"]
            ci_s = f"[{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]%" if ci else "-"
            lines.append(f"  {v['variant']:<16}{v['requests']:>9}{v['errors']:>8}{_f(v['error_rate'], True):>12}{ci_s:>20}"
                         f"{_f(v['latency_ms_p50']):>9}{_f(v['latency_ms_p95']):>9}")
        for c in e["comparisons"]:
            er, lat = c["error_rate"], c["latency"]
            lines.append(f"  {c['variant']} vs {c['control']}: error rate diff {_f(er['diff'], True)} (p={_f(er['p_value'])}), "
                         f"latency Mann-Whitney p={_f(lat['p_value'])}")
    for s in rep["shadows"]:
        lines.append(f"shadow {s['name']} -> {s['target']['upstream']}/{s['target'].get('model') or '(same model)'}: "
                     f"{s.get('compared') or 0} compared, exact match {_f(s.get('exact_match_rate'), True)}, "
                     f"similarity {_f(s.get('similarity_mean'))}, latency {_f(s.get('primary_latency_ms'))} vs {_f(s.get('shadow_latency_ms'))} ms")
    return "\n".join(lines) if lines else "no experiments or shadows"
