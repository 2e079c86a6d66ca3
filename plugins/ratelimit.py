"""ratelimit: requests per minute, tokens per minute and concurrency, per key, team, model and globally.

Every limit is a GCRA bucket (``proxy.state.Counters``): a limit of N per minute
admits a burst of N at once and refills at N/60 per second. All the request and
token limits of a request are taken in one atomic step (one Redis round trip),
all or nothing. Tokens are reserved at admission (prompt tokens plus the
completion allowance) and reconciled with the real usage in ``on_done``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from multidict import istr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, StashKey, StateUnavailable, hookimpl
from proxy.openai import deployment_of
from proxy.state import Decision, Limit, check_backends

from ._tokens import NO_COMPLETION_PATHS, completion_allowance, count_prompt_tokens, load_tokenizer, reservation
from ._usage import (estimate_completion_tokens_from_response, estimate_completion_tokens_from_stream, reported_usage,
                     upstream_had_it)

if TYPE_CHECKING:  # pragma: no cover
    from proxy.runtime import Runtime
    from proxy.state import Counters, LimitStatus

log = logging.getLogger("sluice.ratelimit")

PERIOD_S = 60.0
#: above this body size a real tokenizer runs in the executor, off the loop
TOKENIZE_OFF_LOOP_BYTES = 32 * 1024
#: settlements held for the next admission at most; beyond, they are sent at once
PENDING_MAX = 1000


class LimitSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, ge=1, le=100_000_000, description="Requests admitted per minute (burst up to this, refilled steadily).")
    tokens_per_minute: int | None = Field(None, ge=1, le=100_000_000_000, description="Prompt plus completion tokens per minute, reserved at admission and reconciled with the real usage.")
    concurrency: int | None = Field(None, ge=1, le=10_000_000, description="Requests in flight at once.")

    @property
    def empty(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None and self.concurrency is None


class RateLimitConfig(PluginConfig):
    requests_per_minute: int | None = Field(None, ge=1, le=100_000_000, description="Per key: requests per minute (a key's own record overrides it).")
    tokens_per_minute: int | None = Field(None, ge=1, le=100_000_000_000, description="Per key: tokens per minute (a key's own record overrides it).")
    concurrency: int | None = Field(None, ge=1, le=10_000_000, description="Per key: requests in flight at once (a key's own record overrides it).")
    team: LimitSet | None = Field(None, description="Limits for each team (ctx.identity.team), every team its own bucket.")
    teams: dict[str, LimitSet] = Field(default_factory=dict, description="Limits of named teams, replacing 'team' for them.")
    model: LimitSet | None = Field(None, description="Limits for each model (the request's 'model'), every model its own bucket.")
    models: dict[str, LimitSet] = Field(default_factory=dict, description="Limits per model glob pattern (first match wins), replacing 'model' for those models.")
    global_: LimitSet | None = Field(None, alias="global", description="Limits over all requests of this plugin instance.")
    backend: Literal["auto", "memory", "redis"] = Field("auto", description="Where counters live: 'redis' shares them across workers and replicas; 'auto' picks redis when state.redis is set.")
    identity_limits: bool = Field(True, description="Let a key's own limits (ctx.identity.limits, set by auth) override the per-key limits here.")
    anonymous: Literal["client_ip", "shared", "skip"] = Field(
        "client_ip", description="Per-key limits for requests without an identity: by client address, one shared bucket, or none."
    )
    default_max_tokens: int = Field(1024, ge=0, le=10_000_000, description="Completion tokens reserved when a request gives no max_tokens / max_completion_tokens.")
    tokenizers: dict[str, str] = Field(
        default_factory=dict, description="Model glob pattern -> local tokenizer.json path, for exact prompt counts (needs the 'tokenizers' extra); other models use the bytes/4 estimate."
    )
    lease_ttl_s: float = Field(900.0, ge=1, le=86400, description="A concurrency slot not released (crashed replica) frees itself after this long; keep it above the longest request.")
    headers: bool = Field(True, description="Add OpenAI's x-ratelimit-* headers to answers.")
    settle_delay_ms: int = Field(
        50, ge=0, le=5000,
        description="Redis only: reconciliations and slot releases ride on this process's next admission, or are sent "
        "after this delay, whichever comes first (one round trip per request under load). 0 sends each at once.",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> RateLimitConfig:
        some = any(x is not None for x in (self.requests_per_minute, self.tokens_per_minute, self.concurrency))
        sets = [self.team, self.model, self.global_, *self.teams.values(), *self.models.values()]
        if not some and not any(s is not None and not s.empty for s in sets) and not self.identity_limits:
            raise ValueError("no limit is configured and identity_limits is off: this plugin would never limit anything")
        for name, ls in [("team", self.team), ("model", self.model), ("global", self.global_)]:
            if ls is not None and ls.empty:
                raise ValueError(f"{name}: give at least one of requests_per_minute, tokens_per_minute, concurrency")
        return self


@dataclass(slots=True)
class Reservation:
    tokens: int
    prompt_tokens: int
    token_limits: list[Limit]
    leases: list[tuple[str, str]]
    released: bool = False
    #: memory backend: the token buckets as ``(key, interval_s, period_s, True)`` (see ``MemoryCounters.take_now``)
    token_buckets: list[tuple[str, float, float, bool]] | None = None


RESERVATION: StashKey[Reservation] = StashKey("ratelimit.reservation")
#: plans kept per plugin instance at most (one per key identity, per model when model limits apply)
PLANS_MAX = 4096


@dataclass(slots=True)
class Plan:
    """Everything about a request's limits that does not depend on the request's tokens,
    built once per identity (and model) and reused: bucket keys, limits, leases, header text.

    ``template`` holds, in scope order, the request limits (``Limit`` objects with cost 1,
    shared by every request) and ``None`` where a token limit goes (its cost is the
    request's reservation: ``token_specs`` in the same order gives key, limit and scope).
    """

    template: list[Limit | None]
    token_specs: list[tuple[str, int, str]]
    leases: list[tuple[str, int, float]]
    lease_keys: list[str]
    kinds: dict[str, tuple[str, str]]
    #: per limit of ``template``: True for tokens, False for requests
    is_tokens: list[bool]
    #: per limit of ``template``: the limit as header text
    limit_text: list[str]
    #: per limit of ``template``: ``(key, interval_s, period_s, counts tokens)``, for the memory backend's fast path
    buckets: list[tuple[str, float, float, bool]]
    #: the token limits' buckets
    token_buckets: list[tuple[str, float, float, bool]]


class _Metrics:
    """The plugin's counters.

    In one process they are plain numbers that a collector reads at scrape time: an
    admission adds 1 to an int (no call, no lock). With several workers
    (``PROMETHEUS_MULTIPROC_DIR`` set) they are ``prometheus_client`` counters, whose
    values the workers share through files.
    """

    def __init__(self, registry: Any) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.allowed = 0
        self.limited: dict[tuple[str, str], int] = {}
        self.overrun_tokens = 0
        self._created = time.time()
        if self.multiprocess:
            from prometheus_client import Counter

            self.decisions = Counter("sluice_ratelimit_decisions_total", _DECISIONS_HELP, ["result", "scope", "limit"], registry=registry)
            self.allowed_child = self.decisions.labels("allowed", "", "")
            self.overrun = Counter("sluice_ratelimit_overrun_tokens_total", _OVERRUN_HELP, registry=registry)
        elif registry is not None:
            registry.register(self)

    def count_allowed(self) -> None:
        if self.multiprocess:
            self.allowed_child.inc()
        else:
            self.allowed += 1

    def count_limited(self, scope: str, kind: str) -> None:
        if self.multiprocess:
            self.decisions.labels("limited", scope, kind).inc()
        else:
            self.limited[(scope, kind)] = self.limited.get((scope, kind), 0) + 1

    def count_overrun(self, tokens: int) -> None:
        if self.multiprocess:
            self.overrun.inc(tokens)
        else:
            self.overrun_tokens += tokens

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        d = CounterMetricFamily("sluice_ratelimit_decisions", _DECISIONS_HELP, labels=["result", "scope", "limit"])
        d.add_metric(["allowed", "", ""], self.allowed, created=self._created)
        for (scope, kind), n in list(self.limited.items()):
            d.add_metric(["limited", scope, kind], n, created=self._created)
        yield d
        o = CounterMetricFamily("sluice_ratelimit_overrun_tokens", _OVERRUN_HELP)
        o.add_metric([], self.overrun_tokens, created=self._created)
        yield o


_DECISIONS_HELP = "Rate-limit decisions by result and, when limited, the limit that refused."
_OVERRUN_HELP = "Tokens used beyond the reservation (charged after the fact)."


_MS_TEXT = [f"{i}ms" for i in range(1001)]
# header names as multidict's case-insensitive strings: their folded form is computed once, not per answer
_H_LIMIT_REQUESTS = istr("x-ratelimit-limit-requests")
_H_REMAINING_REQUESTS = istr("x-ratelimit-remaining-requests")
_H_RESET_REQUESTS = istr("x-ratelimit-reset-requests")
_H_LIMIT_TOKENS = istr("x-ratelimit-limit-tokens")
_H_REMAINING_TOKENS = istr("x-ratelimit-remaining-tokens")
_H_RESET_TOKENS = istr("x-ratelimit-reset-tokens")


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        ms = math.ceil(seconds * 1000)
        return _MS_TEXT[ms] if ms > 0 else "0ms"
    seconds = math.ceil(seconds * 1000) / 1000
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    s_txt = f"{s:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{int(h)}h{int(m)}m{s_txt}"
    if m:
        return f"{int(m)}m{s_txt}"
    return s_txt


def rate_headers(
    r_text: str | None, r_left: float, r_reset: float, t_text: str | None, t_left: float, t_reset: float
) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the tightest request and token limits (text None: no such limit)."""
    out: dict[str, str] = {}
    # epoch-sized timestamps leave float noise of a fraction of a unit: round it away
    if r_text is not None:
        out[_H_LIMIT_REQUESTS] = r_text
        out[_H_REMAINING_REQUESTS] = str(max(0, int(r_left + 0.01)))
        out[_H_RESET_REQUESTS] = format_duration(r_reset)
    if t_text is not None:
        out[_H_LIMIT_TOKENS] = t_text
        out[_H_REMAINING_TOKENS] = str(max(0, int(t_left + 0.01)))
        out[_H_RESET_TOKENS] = format_duration(t_reset)
    return out


#: (requests per minute, tokens per minute, concurrency), each None when not limited
Triple = tuple["int | None", "int | None", "int | None"]


def _triple(ls: LimitSet | None) -> Triple | None:
    if ls is None or ls.empty:
        return None
    return (ls.requests_per_minute, ls.tokens_per_minute, ls.concurrency)


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class RateLimit(Plugin):
    """Admits or refuses (429) each request against every configured limit at once."""

    name = "ratelimit"
    kind = "guard"
    Config = RateLimitConfig
    needs_usage = True

    @classmethod
    def check(cls, config: RateLimitConfig, sluice: Any) -> None:
        check_backends(sluice, backend=config.backend)

    def __init__(self, config: RateLimitConfig, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        self.config: RateLimitConfig = config
        self.counters: Counters | None = None
        self.prefix = f"rl:{self.id}:"
        c = config
        # plain tuples, not models, on the request path: it runs for every request
        self._key_default: Triple = (c.requests_per_minute, c.tokens_per_minute, c.concurrency)
        self._team_default = _triple(c.team)
        self._teams = {name: _triple(ls) for name, ls in c.teams.items()}
        self._model_default = _triple(c.model)
        self._models = [(pat, _triple(ls)) for pat, ls in c.models.items()]
        self._global = _triple(c.global_)
        self._model_cache: dict[str, Triple | None] = {}
        self._model_scoped = bool(self._models) or self._model_default is not None
        self._tokenizers = dict(c.tokenizers) or None
        self._default_max_tokens = c.default_max_tokens
        self._headers_on = c.headers
        #: plan cache: identity id (or anonymous address), and model when model limits apply -> (identity, plan)
        self._plans: dict[Any, tuple[Any, Plan | None]] = {}
        #: settlements waiting to ride on the next admission (Redis): adjustments and lease releases
        self._carry = False
        self._pend_adjust: list[Limit] = []
        self._pend_release: list[tuple[str, str]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_now_task: asyncio.Task[None] | None = None
        self._one_step: Any = None
        state = runtime.state
        if (c.backend == "memory" or (c.backend == "auto" and not state.has_redis)) and not c.tokenizers:
            # nothing on the memory backend waits: plain functions, no coroutine per request
            self.counters = state.counters("memory")
            self.on_request = self._on_request_memory  # type: ignore[method-assign]
            self.on_done = self._on_done_memory  # type: ignore[method-assign]
        elif (c.backend == "redis" or (c.backend == "auto" and state.has_redis)) and c.settle_delay_ms > 0:
            # settlements wait for the next admission: on_done only queues them, without waiting
            self.on_done = self._on_done_carry  # type: ignore[method-assign]
        if not self._settles():
            # only requests-per-minute limits: a request holds nothing to give back, so no
            # on_done (the core then queues no background work for this plugin) and no usage
            self.on_done = None  # type: ignore[assignment]
            self.needs_usage = False  # type: ignore[misc]

    def _settles(self) -> bool:
        """Whether some request may hold tokens or a concurrency slot (to reconcile or free when it ends)."""
        if self.config.identity_limits:
            return True  # a key's own record may carry tokens_per_minute or concurrency
        sets = [self._key_default, self._team_default, *self._teams.values(), self._model_default,
                *(t for _, t in self._models), self._global]
        return any(t is not None and (t[1] is not None or t[2] is not None) for t in sets)

    async def start(self) -> None:
        self.counters = self.runtime.state.counters(self.config.backend)
        for path in self.config.tokenizers.values():
            await self.runtime.run_cpu(load_tokenizer, path)
        self.metrics = self.runtime.shared("ratelimit.metrics", lambda: _Metrics(self.runtime.metrics))
        self._carry = bool(getattr(self.counters, "carries_settlements", False)) and self.config.settle_delay_ms > 0
        self._one_step = getattr(self.counters, "admit", None)

    async def stop(self) -> None:
        await self._flush()

    # -- which limits apply ---------------------------------------------------
    def _model_limits(self, model: str) -> Triple | None:
        try:
            return self._model_cache[model]
        except KeyError:
            pass
        found = next((t for pat, t in self._models if fnmatchcase(model, pat)), self._model_default)
        if len(self._model_cache) < 4096:  # client-chosen strings: keep the memo bounded
            self._model_cache[model] = found
        return found

    def scopes(self, ctx: Context) -> list[tuple[str, str, Triple]]:
        """``(scope, bucket key, (rpm, tpm, concurrency))`` for every scope that applies to this request."""
        out: list[tuple[str, str, Triple]] = []
        ident = ctx.identity
        key_set = self._key_default
        if ident is not None:
            own = ident.limits
            if own and self.config.identity_limits:
                rpm, tpm, conc = key_set
                v = own.get("requests_per_minute")
                rpm = v if _positive(v) else rpm
                v = own.get("tokens_per_minute")
                tpm = v if _positive(v) else tpm
                v = own.get("concurrency")
                conc = v if _positive(v) else conc
                key_set = (rpm, tpm, conc)
            who: str | None = "k:" + ident.key_id
        else:
            anon = self.config.anonymous
            who = "ip:" + (ctx.client_ip or "-") if anon == "client_ip" else ("anon" if anon == "shared" else None)
        if who is not None and key_set != (None, None, None):
            out.append(("key", who, key_set))
        if ident is not None and ident.team:
            ts = self._teams.get(ident.team, self._team_default)
            if ts is not None:
                out.append(("team", "t:" + ident.team, ts))
        if self._models or self._model_default is not None:
            model = _limited_model(ctx)
            if model is not None:
                ms = self._model_limits(model)
                if ms is not None:
                    out.append(("model", "m:" + model, ms))
        if self._global is not None:
            out.append(("global", "g", self._global))
        return out

    def _plan(self, ctx: Context) -> Plan | None:
        """The request's plan, from the cache when its identity (and model) was seen before.

        Identities are shared read-only between requests of a key (``auth`` caches them),
        so the identity object itself is the cache key (by ``id``, the entry holding it
        alive, so the id cannot be reused while cached).
        """
        ident = ctx.identity
        model = _limited_model(ctx) if self._model_scoped else None
        if ident is not None:
            ck: Any = id(ident) if model is None else (id(ident), model)
        else:
            ck = ("anon", ctx.client_ip if self.config.anonymous == "client_ip" else None, model)
        plans = self._plans
        hit = plans.get(ck)
        if hit is not None and hit[0] is ident:
            return hit[1]
        plan = self._build_plan(self.scopes(ctx))
        if len(plans) >= PLANS_MAX:
            plans.clear()  # identities are renewed every cache_ttl_s of auth: old ones go too
        plans[ck] = (ident, plan)
        return plan

    def _build_plan(self, scopes: list[tuple[str, str, Triple]]) -> Plan | None:
        if not scopes:
            return None
        prefix = self.prefix
        template: list[Limit | None] = []
        token_specs: list[tuple[str, int, str]] = []
        leases: list[tuple[str, int, float]] = []
        kinds: dict[str, tuple[str, str]] = {}
        is_tokens: list[bool] = []
        limit_text: list[str] = []
        buckets: list[tuple[str, float, float, bool]] = []
        for scope, who, (rpm, tpm, conc) in scopes:
            if rpm is not None:
                k = prefix + who + ":r"
                template.append(Limit(k, rpm, PERIOD_S, 1.0))
                kinds[k] = (scope, "requests")
                is_tokens.append(False)
                limit_text.append(str(int(rpm)))
                buckets.append((k, PERIOD_S / rpm, PERIOD_S, False))
            if tpm is not None:
                k = prefix + who + ":t"
                template.append(None)
                token_specs.append((k, tpm, scope))
                kinds[k] = (scope, "tokens")
                is_tokens.append(True)
                limit_text.append(str(int(tpm)))
                buckets.append((k, PERIOD_S / tpm, PERIOD_S, True))
            if conc is not None:
                k = prefix + who + ":c"
                leases.append((k, conc, self.config.lease_ttl_s))
                kinds[k] = (scope, "concurrency")
        token_buckets = [b for b in buckets if b[3]]
        return Plan(template, token_specs, leases, [k for k, _, _ in leases], kinds, is_tokens, limit_text,
                    buckets, token_buckets)

    def count_tokens(self, ctx: Context) -> tuple[int, int]:
        """(prompt tokens, total reserved) for this request, on the loop."""
        if ctx.method != "POST":
            return 0, 0
        try:
            body = ctx.body
        except ProxyError:
            return 0, 0  # not JSON: nothing to count (the upstream will say what is wrong)
        if not isinstance(body, dict):
            return 0, 0
        return reservation(body, self._default_max_tokens, self._tokenizers, not ctx.path.endswith(NO_COMPLETION_PATHS))

    async def reserve_tokens(self, ctx: Context) -> tuple[int, int]:
        """(prompt tokens, total reserved) for this request; big prompts are tokenized off the loop."""
        if self._tokenizers and ctx.method == "POST" and len(ctx.raw) > TOKENIZE_OFF_LOOP_BYTES and ctx.body_is_json:
            body = ctx.body
            prompt = await self.runtime.run_cpu(count_prompt_tokens, body, None, tokenizers=self._tokenizers)
            if ctx.path.endswith(NO_COMPLETION_PATHS):
                return prompt, prompt
            return prompt, prompt + completion_allowance(body, self.config.default_max_tokens)
        return self.count_tokens(ctx)

    def _limits(self, plan: Plan, tokens: int) -> tuple[list[Limit], list[Limit]]:
        """The plan's limits with this request's token reservation: (all limits, the token ones)."""
        token_limits = []
        for key, tpm, scope in plan.token_specs:
            if tokens > tpm:
                self._too_large(tokens, tpm, scope)
            token_limits.append(Limit(key, tpm, PERIOD_S, float(tokens)))
        it = iter(token_limits)
        return [lim if lim is not None else next(it) for lim in plan.template], token_limits

    def _too_large(self, tokens: int, tpm: int, scope: str) -> None:
        self.metrics.count_limited(scope, "tokens")
        raise ProxyError(
            429,
            f"Request too large: it needs about {tokens} tokens (prompt plus max_tokens) but the tokens per "
            f"minute limit of this {scope} is {tpm}. Lower max_tokens or shorten the prompt.",
            code="rate_limit_exceeded", reason="request_too_large",
        )

    # -- request path ------------------------------------------------------------
    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.reply_value is not None:
            return
        plan = self._plan(ctx)
        if plan is None:
            return
        prompt = tokens = 0
        if plan.token_specs:
            prompt, tokens = await self.reserve_tokens(ctx)
            limits, token_limits = self._limits(plan, tokens)
        else:
            limits, token_limits = plan.template, []  # type: ignore[assignment]
        settle = self._take() if self._carry and (self._pend_adjust or self._pend_release) else None
        try:
            if self._one_step is not None:  # the backend takes it all in one step (Redis: one script)
                decision, held = await (self._one_step(limits, plan.leases, settle) if settle else self._one_step(limits, plan.leases))
            else:
                decision, held = await self._admit(limits, plan.leases, settle)
        except BaseException:
            if settle:
                self._requeue(settle)
                self._flush_soon()  # this process may get no other request to carry them
            raise
        self._admitted(ctx, plan, decision, held, token_limits, tokens, prompt)

    @hookimpl(specname="on_request")
    def _on_request_memory(self, ctx: Context) -> None:
        """``on_request`` on the memory backend: the same steps, none of which waits, so no coroutine,
        and buckets taken by the plan's ``(key, interval, period)`` without a ``Limit`` or status object.
        (It runs for every request: the usual steps are written out here rather than called.)"""
        if ctx.reply_value is not None:
            return
        ident = ctx.identity
        hit = self._plans.get(id(ident)) if ident is not None and not self._model_scoped else None
        plan = hit[1] if hit is not None and hit[0] is ident else self._plan(ctx)
        if plan is None:
            return
        prompt = tokens = 0
        if plan.token_specs:
            if ctx.method == "POST":
                try:
                    body = ctx.body
                except ProxyError:
                    body = None  # not JSON: nothing to count (the upstream will say what is wrong)
                if isinstance(body, dict):
                    prompt, tokens = reservation(body, self._default_max_tokens, self._tokenizers,
                                                 not ctx.path.endswith(NO_COMPLETION_PATHS))
            for _, tpm, scope in plan.token_specs:
                if tokens > tpm:
                    self._too_large(tokens, tpm, scope)
        counters = self.counters
        got = counters.take_now(plan.buckets, tokens, plan.leases)  # type: ignore[union-attr]
        if got is None:
            # refused (nothing was taken): the full step says which limit and for how long
            # (or admits, if a bucket refilled in between: a plan's buckets are distinct)
            limits, token_limits = self._limits(plan, tokens)
            decision, held = counters.admit_now(limits, plan.leases)  # type: ignore[union-attr]
            self._admitted(ctx, plan, decision, held, token_limits, tokens, prompt)
            return
        figures, taken = got
        metrics = self.metrics
        if metrics.multiprocess:
            metrics.count_allowed()
        else:
            metrics.allowed += 1
        ctx.stash[RESERVATION] = Reservation(tokens, prompt, [], taken, False, plan.token_buckets)
        if not self._headers_on:
            return
        # the headers (as _plan_headers, from the figures): the tightest limit of each kind, the fewest units left
        r = t = -1
        r_left = t_left = 0.0
        i = 0
        for is_tok in plan.is_tokens:
            left = figures[i]
            if left < 0.0:
                left = 0.0
            if is_tok:
                if t < 0 or left < t_left:
                    t, t_left = i, left
            elif r < 0 or left < r_left:
                r, r_left = i, left
            i += 3
        text = plan.limit_text
        ctx.response_headers.update(rate_headers(
            text[r // 3] if r >= 0 else None, r_left, figures[r + 1] if r >= 0 else 0.0,
            text[t // 3] if t >= 0 else None, t_left, figures[t + 1] if t >= 0 else 0.0,
        ))

    def _admitted(self, ctx: Context, plan: Plan, decision: Decision, held: list[str], token_limits: list[Limit],
                  tokens: int, prompt: int) -> None:
        if not decision.allowed:
            headers = self._headers(decision.statuses, plan.kinds) if self.config.headers and decision.statuses else {}
            self._refuse(decision, plan.kinds, headers)
        self.metrics.count_allowed()
        ctx.stash[RESERVATION] = Reservation(tokens, prompt, token_limits, list(zip(plan.lease_keys, held)) if held else [],
                                             False, plan.token_buckets)
        if self.config.headers and decision.statuses:
            ctx.response_headers.update(self._plan_headers(plan, decision.statuses))

    @staticmethod
    def _plan_headers(plan: Plan, statuses: tuple[LimitStatus, ...]) -> dict[str, str]:
        """OpenAI's headers for the tightest limit of each kind (the fewest units left); statuses follow the plan."""
        r = t = -1
        r_left = t_left = 0.0
        is_tokens = plan.is_tokens
        for i, st in enumerate(statuses):
            left = st.remaining
            if is_tokens[i]:
                if t < 0 or left < t_left:
                    t, t_left = i, left
            elif r < 0 or left < r_left:
                r, r_left = i, left
        text = plan.limit_text
        return rate_headers(
            text[r] if r >= 0 else None, r_left, statuses[r].reset_s if r >= 0 else 0.0,
            text[t] if t >= 0 else None, t_left, statuses[t].reset_s if t >= 0 else 0.0,
        )

    async def _admit(
        self, limits: list[Limit], leases: list[tuple[str, int, float]],
        settle: tuple[list[Limit], list[tuple[str, str]]] | None = None,
    ) -> tuple[Decision, list[str]]:
        """Every limit and lease in one step when the backend can (one Redis round trip), else in turn."""
        counters = self.counters
        assert counters is not None
        admit = getattr(counters, "admit", None)
        if admit is not None:
            return await admit(limits, leases, settle) if settle else await admit(limits, leases)
        if settle:
            await self._release(settle[1])
            if settle[0]:
                await counters.adjust(settle[0])
        held: list[str] = []
        try:
            for key, limit, ttl in leases:
                token = await counters.lease(key, limit, ttl)
                if token is None:
                    await self._release(list(zip([k for k, _, _ in leases], held)))
                    return Decision(False, 1.0, (), Limit(key, limit, ttl, 1.0)), []
                held.append(token)
            decision = await counters.acquire(limits) if limits else Decision(True, 0.0)
        except BaseException:
            await self._release(list(zip([k for k, _, _ in leases], held)))
            raise
        if not decision.allowed:
            await self._release(list(zip([k for k, _, _ in leases], held)))
            return decision, []
        return decision, held

    def _refuse(self, decision: Decision, kinds: dict[str, tuple[str, str]], headers: dict[str, str]) -> None:
        refused = decision.refused
        scope, kind = kinds.get(refused.key, ("key", "requests")) if refused is not None else ("key", "requests")
        self.metrics.count_limited(scope, kind)
        limit_n = int(refused.limit) if refused is not None else 0
        if kind == "concurrency":
            raise ProxyError(
                429, f"Too many requests in flight for this {scope} (limit {limit_n}). Retry when one finishes.",
                code="rate_limit_exceeded", headers={**headers, "retry-after": "1", "retry-after-ms": "1000"},
                reason="concurrency_limited",
            )
        wait = max(decision.retry_after_s, 0.001)
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        raise ProxyError(
            429,
            f"Rate limit reached for {kind} per minute on this {scope} (limit {limit_n}). "
            f"Please try again in {format_duration(wait)}.",
            code="rate_limit_exceeded", headers=headers, reason=f"{kind}_limited",
        )

    @staticmethod
    def _headers(statuses: tuple[LimitStatus, ...], kinds: dict[str, tuple[str, str]]) -> dict[str, str]:
        """OpenAI's headers for the tightest limit of each kind (the fewest units left)."""
        best: dict[str, LimitStatus] = {}
        for st in statuses:
            kind = kinds[st.limit.key][1]
            cur = best.get(kind)
            if cur is None or st.remaining < cur.remaining:
                best[kind] = st
        r, t = best.get("requests"), best.get("tokens")
        return rate_headers(
            str(int(r.limit.limit)) if r is not None else None, r.remaining if r is not None else 0.0, r.reset_s if r is not None else 0.0,
            str(int(t.limit.limit)) if t is not None else None, t.remaining if t is not None else 0.0, t.reset_s if t is not None else 0.0,
        )

    async def _release(self, leases: list[tuple[str, str]]) -> None:
        if not leases or self.counters is None:
            return
        for key, token in leases:
            try:
                await self.counters.release(key, token)
            except StateUnavailable:
                pass  # the lease's TTL frees it

    # -- reconcile -----------------------------------------------------------------
    def actual_tokens(self, ctx: Context, res: Reservation) -> int:
        """What the request really used, by the rules in docs/plugins/ratelimit.md."""
        u = reported_usage(ctx)  # as the ledger reads it (all-zero usage is none)
        if u is not None:
            total = u.total_tokens or (u.prompt_tokens + u.completion_tokens)
            return max(0, int(total))
        reached = any(a.status is not None for a in ctx.attempts)
        streamed = ctx.stream_events or ctx.stream_bytes
        if not reached:
            # the upstream had the request when Sluice hung up on it (client gone, first_byte timeout): its prompt
            return res.prompt_tokens if upstream_had_it(ctx) else 0
        if ctx.status is not None and ctx.status >= 400 and not streamed:
            return 0  # an error answer: nothing was generated
        # the same estimates metering records, so limits and the ledger agree
        if streamed or (ctx.response is None and ctx.status is not None and ctx.status < 300):
            return res.prompt_tokens + estimate_completion_tokens_from_stream(ctx)
        if ctx.response is not None and ctx.response.status < 300:
            return res.prompt_tokens + estimate_completion_tokens_from_response(ctx.response.json)
        return res.tokens  # nothing to go by: the reservation stands

    def _settlement(self, ctx: Context) -> tuple[list[Limit], Reservation] | None:
        """What a finished request gives back: token corrections and its leases (None: nothing).

        Marks the reservation released, so it is settled once whichever path runs.
        """
        res = ctx.stash.get(RESERVATION)
        if res is None or res.released:
            return None
        res.released = True
        adjust: list[Limit] = []
        if res.token_limits:
            delta = self.actual_tokens(ctx, res) - res.tokens
            if delta > 0:
                self.metrics.count_overrun(delta)
            if delta:
                adjust = [Limit(lim.key, lim.limit, lim.period_s, float(delta)) for lim in res.token_limits]
        if not adjust and not res.leases:
            return None
        return adjust, res

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        settlement = self._settlement(ctx)
        if settlement is None:
            return
        adjust, res = settlement
        if self._carry:
            self._pend_adjust.extend(adjust)
            self._pend_release.extend(res.leases)
            if len(self._pend_adjust) + len(self._pend_release) >= PENDING_MAX:
                await self._flush()
            else:
                self._flush_soon()
            return
        counters = self.counters
        assert counters is not None
        settle = getattr(counters, "settle", None)
        if settle is not None:
            try:
                await settle(adjust, res.leases)  # one round trip on Redis
            except StateUnavailable:
                self._release_in_background(res.leases)  # the slots must not wait for their TTL
                raise
            return
        try:
            await self._release(res.leases)
        finally:
            if adjust:
                await counters.adjust(adjust)

    @hookimpl(specname="on_done")
    def _on_done_carry(self, ctx: Context) -> None:
        """``on_done`` when settlements ride on admissions (Redis, ``settle_delay_ms`` > 0): it only
        queues the settlement in the process, so a plain function (the core runs it inline, with
        no background task per request); the send is a task of its own."""
        settlement = self._settlement(ctx)
        if settlement is None:
            return
        adjust, res = settlement
        self._pend_adjust.extend(adjust)
        self._pend_release.extend(res.leases)
        if len(self._pend_adjust) + len(self._pend_release) >= PENDING_MAX:
            if self._flush_now_task is None:
                self._flush_now_task = self.runtime.spawn(self._flush_now(), f"ratelimit-settle-now-{self.id}")
        else:
            self._flush_soon()

    async def _flush_now(self) -> None:
        try:
            await self._flush()
        finally:
            self._flush_now_task = None

    @hookimpl(specname="on_done")
    def _on_done_memory(self, ctx: Context) -> None:
        """``on_done`` on the memory backend: reconcile and free the slots at once, no coroutine."""
        res = ctx.stash.get(RESERVATION)
        if res is None or res.released:
            return
        res.released = True
        buckets = res.token_buckets
        delta = 0
        if buckets:
            u = reported_usage(ctx)
            if u is not None:  # the usual case, inline: the upstream's usage
                delta = max(0, int(u.total_tokens or (u.prompt_tokens + u.completion_tokens))) - res.tokens
            else:
                delta = self.actual_tokens(ctx, res) - res.tokens
            if delta > 0:
                self.metrics.count_overrun(delta)
        self.counters.give_back_now(buckets or (), delta, res.leases)  # type: ignore[union-attr]

    # -- settlements that ride on admissions (Redis) ------------------------------
    def _take(self) -> tuple[list[Limit], list[tuple[str, str]]]:
        """The pending settlements, adjustments merged per bucket."""
        merged: dict[str, Limit] = {}
        for lim in self._pend_adjust:
            prev = merged.get(lim.key)
            merged[lim.key] = lim if prev is None else Limit(lim.key, lim.limit, lim.period_s, prev.cost + lim.cost)
        releases = self._pend_release
        self._pend_adjust, self._pend_release = [], []
        return [lim for lim in merged.values() if lim.cost], releases

    def _requeue(self, settle: tuple[list[Limit], list[tuple[str, str]]]) -> None:
        # A failed call may still have run on the server (a timeout is ambiguous): releasing
        # again is harmless, applying an adjustment twice is not, so only releases go back.
        # A lost adjustment leaves a reservation charged in full: conservative.
        self._pend_release[:0] = settle[1]

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self.config.settle_delay_ms / 1000)  # the batching window, not a wait for a condition
        finally:
            self._flush_task = None
        await self._flush()

    async def _flush(self) -> None:
        if not self._pend_adjust and not self._pend_release or self.counters is None:
            return
        settle = self._take()
        try:
            await self.counters.settle(*settle)  # type: ignore[attr-defined]
        except StateUnavailable:
            # not left for this process's next admission to carry (it may never come, while other replicas
            # are refused the slots): released once Redis answers, or by their TTL. A lost adjustment
            # leaves a reservation charged in full: conservative
            self._release_in_background(settle[1])

    def _flush_soon(self) -> None:
        """Send the pending settlements after ``settle_delay_ms``, unless a send is already due."""
        if self._flush_task is None and (self._pend_adjust or self._pend_release):
            self._flush_task = self.runtime.spawn(self._flush_later(), f"ratelimit-settle-{self.id}")

    def _release_in_background(self, releases: list[tuple[str, str]]) -> None:
        later = getattr(self.counters, "release_later", None)  # Redis's; in-process counters do not fail
        if releases and later is not None:
            later(list(releases), self.config.lease_ttl_s)


def _limited_model(ctx: Context) -> str | None:
    """The model a request's per-model limits count it under: an Azure-style path's deployment
    (``/openai/deployments/NAME/...``, the model such an upstream runs whatever the body says), else the
    body's ``model``."""
    return deployment_of(ctx.path) or ctx.model
