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
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, StashKey, StateUnavailable, hookimpl
from proxy.state import Decision, Limit

from ._tokens import completion_allowance, count_prompt_tokens, load_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from proxy.runtime import Runtime
    from proxy.state import Counters, LimitStatus

log = logging.getLogger("sluice.ratelimit")

PERIOD_S = 60.0
#: endpoints whose answer has no completion tokens
NO_COMPLETION = ("/embeddings", "/moderations")
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


RESERVATION: StashKey[Reservation] = StashKey("ratelimit.reservation")


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.decisions = Counter(
            "sluice_ratelimit_decisions_total", "Rate-limit decisions by result and, when limited, the limit that refused.",
            ["result", "scope", "limit"], registry=registry,
        )
        self.admitted = self.decisions.labels("allowed", "", "")
        self.overrun = Counter(
            "sluice_ratelimit_overrun_tokens_total", "Tokens used beyond the reservation (charged after the fact).", registry=registry,
        )


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds * 1000) / 1000
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    s_txt = f"{s:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{int(h)}h{int(m)}m{s_txt}"
    if m:
        return f"{int(m)}m{s_txt}"
    return s_txt


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
        self._no_completion = NO_COMPLETION
        #: settlements waiting to ride on the next admission (Redis): adjustments and lease releases
        self._carry = False
        self._pend_adjust: list[Limit] = []
        self._pend_release: list[tuple[str, str]] = []
        self._flush_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.counters = self.runtime.state.counters(self.config.backend)
        for path in self.config.tokenizers.values():
            await self.runtime.run_cpu(load_tokenizer, path)
        self.metrics = self.runtime.shared("ratelimit.metrics", lambda: _Metrics(self.runtime.metrics))
        self._carry = bool(getattr(self.counters, "carries_settlements", False)) and self.config.settle_delay_ms > 0

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
            model = ctx.model
            if model is not None:
                ms = self._model_limits(model)
                if ms is not None:
                    out.append(("model", "m:" + model, ms))
        if self._global is not None:
            out.append(("global", "g", self._global))
        return out

    async def reserve_tokens(self, ctx: Context) -> tuple[int, int]:
        """(prompt tokens, total reserved) for this request."""
        if ctx.method != "POST" or not ctx.body_is_json:
            return 0, 0
        body = ctx.body
        tokenizers = self.config.tokenizers
        if tokenizers and len(ctx.raw) > TOKENIZE_OFF_LOOP_BYTES:
            prompt = await self.runtime.run_cpu(count_prompt_tokens, body, None, tokenizers=tokenizers)
        else:
            prompt = count_prompt_tokens(body, None, tokenizers=tokenizers or None)
        completion = 0 if ctx.path.rstrip("/").endswith(self._no_completion) else completion_allowance(body, self.config.default_max_tokens)
        return prompt, prompt + completion

    # -- request path ------------------------------------------------------------
    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        scopes = self.scopes(ctx)
        if not scopes:
            return
        prompt = tokens = 0
        for _, _, (_, tpm, _) in scopes:
            if tpm is not None:
                prompt, tokens = await self.reserve_tokens(ctx)
                break
        limits: list[Limit] = []
        token_limits: list[Limit] = []
        leases: list[tuple[str, int, float]] = []
        kinds: dict[str, tuple[str, str]] = {}
        prefix = self.prefix
        for scope, who, (rpm, tpm, conc) in scopes:
            if rpm is not None:
                k = prefix + who + ":r"
                limits.append(Limit(k, rpm, PERIOD_S, 1.0))
                kinds[k] = (scope, "requests")
            if tpm is not None:
                if tokens > tpm:
                    self.metrics.decisions.labels("limited", scope, "tokens").inc()
                    raise ProxyError(
                        429,
                        f"Request too large: it needs about {tokens} tokens (prompt plus max_tokens) but the tokens per "
                        f"minute limit of this {scope} is {tpm}. Lower max_tokens or shorten the prompt.",
                        code="rate_limit_exceeded", reason="request_too_large",
                    )
                k = prefix + who + ":t"
                lim = Limit(k, tpm, PERIOD_S, float(tokens))
                limits.append(lim)
                token_limits.append(lim)
                kinds[k] = (scope, "tokens")
            if conc is not None:
                k = prefix + who + ":c"
                leases.append((k, conc, self.config.lease_ttl_s))
                kinds[k] = (scope, "concurrency")

        settle = self._take() if self._carry and (self._pend_adjust or self._pend_release) else None
        try:
            decision, held = await self._admit(limits, leases, settle)
        except BaseException:
            if settle:
                self._requeue(settle)
            raise
        headers = self._headers(decision.statuses, kinds) if self.config.headers and decision.statuses else {}
        if not decision.allowed:
            self._refuse(decision, kinds, headers)
        self.metrics.admitted.inc()
        ctx.stash[RESERVATION] = Reservation(tokens, prompt, token_limits, list(zip([k for k, _, _ in leases], held)))
        if headers:
            ctx.response_headers.update(headers)

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
        self.metrics.decisions.labels("limited", scope, kind).inc()
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
        out: dict[str, str] = {}
        for kind, st in best.items():
            out["x-ratelimit-limit-" + kind] = str(int(st.limit.limit))
            # epoch-sized timestamps leave float noise of a fraction of a unit: round it away
            out["x-ratelimit-remaining-" + kind] = str(max(0, int(st.remaining + 0.01)))
            out["x-ratelimit-reset-" + kind] = format_duration(st.reset_s)
        return out

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
        u = ctx.usage
        if u is not None:
            total = u.total_tokens or (u.prompt_tokens + u.completion_tokens)
            return max(0, int(total))
        reached = any(a.status is not None for a in ctx.attempts)
        streamed = ctx.stream_events or ctx.stream_bytes
        if not reached or (ctx.status is not None and ctx.status >= 400 and not streamed):
            return 0  # no upstream answer, or an error answer: nothing was generated
        # the same estimates metering records, so limits and the ledger agree
        from ._usage import estimate_completion_tokens_from_response, estimate_completion_tokens_from_stream

        if streamed:
            return res.prompt_tokens + estimate_completion_tokens_from_stream(ctx.stream_events, ctx.stream_bytes)
        if ctx.response is not None and ctx.response.status < 300:
            return res.prompt_tokens + estimate_completion_tokens_from_response(ctx.response.json)
        return res.tokens  # nothing to go by: the reservation stands

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        res = ctx.stash.get(RESERVATION)
        if res is None or res.released:
            return
        res.released = True
        adjust: list[Limit] = []
        if res.token_limits:
            delta = self.actual_tokens(ctx, res) - res.tokens
            if delta > 0:
                self.metrics.overrun.inc(delta)
            if delta:
                adjust = [Limit(lim.key, lim.limit, lim.period_s, float(delta)) for lim in res.token_limits]
        if not adjust and not res.leases:
            return
        if self._carry:
            self._pend_adjust.extend(adjust)
            self._pend_release.extend(res.leases)
            if len(self._pend_adjust) + len(self._pend_release) >= PENDING_MAX:
                await self._flush()
            elif self._flush_task is None:
                self._flush_task = self.runtime.spawn(self._flush_later(), f"ratelimit-settle-{self.id}")
            return
        counters = self.counters
        assert counters is not None
        settle = getattr(counters, "settle", None)
        if settle is not None:
            await settle(adjust, res.leases)  # one round trip on Redis
            return
        try:
            await self._release(res.leases)
        finally:
            if adjust:
                await counters.adjust(adjust)

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
            self._requeue(settle)
            if len(self._pend_release) > PENDING_MAX:
                del self._pend_release[: len(self._pend_release) - PENDING_MAX]  # their TTL frees them
