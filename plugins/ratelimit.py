"""ratelimit: requests per minute, tokens per minute and concurrency, per key, team, model and globally.

Every limit is a GCRA bucket (``proxy.state.Counters``): a limit of N per minute
admits a burst of N at once and refills at N/60 per second. All the request and
token limits of a request are taken in one atomic step (one Redis round trip),
all or nothing. Tokens are reserved at admission (prompt tokens plus the
completion allowance) and reconciled with the real usage in ``on_done``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, StashKey, StateUnavailable, hookimpl

from ._tokens import completion_allowance, count_prompt_tokens, load_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from proxy.runtime import Runtime
    from proxy.state import Counters, Decision, Limit, LimitStatus

log = logging.getLogger("sluice.ratelimit")

PERIOD_S = 60.0
#: endpoints whose answer has no completion tokens
NO_COMPLETION = ("/embeddings", "/moderations")
#: above this body size a real tokenizer runs in the executor, off the loop
TOKENIZE_OFF_LOOP_BYTES = 32 * 1024


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
        self._key_default = LimitSet(requests_per_minute=c.requests_per_minute, tokens_per_minute=c.tokens_per_minute, concurrency=c.concurrency)
        self._models = list(c.models.items())
        self._model_cache: dict[str, LimitSet | None] = {}
        self._counts_tokens = any(
            ls is not None and ls.tokens_per_minute is not None
            for ls in [self._key_default, c.team, c.model, c.global_, *c.teams.values(), *c.models.values()]
        ) or c.identity_limits

    async def start(self) -> None:
        from proxy.state import Limit  # noqa: F401  (fails early if the state package is broken)

        self.counters = self.runtime.state.counters(self.config.backend)
        for path in self.config.tokenizers.values():
            await self.runtime.run_cpu(load_tokenizer, path)
        self.metrics = self.runtime.shared("ratelimit.metrics", lambda: _Metrics(self.runtime.metrics))

    # -- which limits apply ---------------------------------------------------
    def _model_limits(self, model: str | None) -> LimitSet | None:
        if model is None:
            return None
        if model in self._model_cache:
            return self._model_cache[model]
        found = next((ls for pat, ls in self._models if fnmatchcase(model, pat)), self.config.model)
        if len(self._model_cache) < 4096:  # client-chosen strings: keep the memo bounded
            self._model_cache[model] = found
        return found

    def scopes(self, ctx: Context) -> list[tuple[str, str, LimitSet]]:
        """``(scope, bucket key, limits)`` for every scope that applies to this request."""
        c = self.config
        out: list[tuple[str, str, LimitSet]] = []
        ident = ctx.identity
        key_set = self._key_default
        if ident is not None:
            if c.identity_limits and ident.limits:
                own = {k: v for k, v in ident.limits.items() if k in LimitSet.model_fields and isinstance(v, int)}
                if own:
                    key_set = key_set.model_copy(update=own)
            who = "k:" + ident.key_id
        elif c.anonymous == "client_ip":
            who = "ip:" + (ctx.client_ip or "-")
        elif c.anonymous == "shared":
            who = "anon"
        else:
            who = None
        if who is not None and not key_set.empty:
            out.append(("key", who, key_set))
        if ident is not None and ident.team:
            ts = c.teams.get(ident.team, c.team)
            if ts is not None:
                out.append(("team", "t:" + ident.team, ts))
        model = ctx.model
        ms = self._model_limits(model)
        if ms is not None and model is not None:
            out.append(("model", "m:" + model, ms))
        if c.global_ is not None:
            out.append(("global", "g", c.global_))
        return out

    async def reserve_tokens(self, ctx: Context) -> tuple[int, int]:
        """(prompt tokens, total reserved) for this request."""
        if ctx.method != "POST" or not ctx.body_is_json:
            return 0, 0
        body = ctx.body
        model = ctx.model
        if self.config.tokenizers and len(ctx.raw) > TOKENIZE_OFF_LOOP_BYTES:
            prompt = await self.runtime.run_cpu(count_prompt_tokens, body, model, tokenizers=self.config.tokenizers)
        else:
            prompt = count_prompt_tokens(body, model, tokenizers=self.config.tokenizers or None)
        completion = 0 if ctx.path.rstrip("/").endswith(NO_COMPLETION) else completion_allowance(body, self.config.default_max_tokens)
        return prompt, prompt + completion

    # -- request path ------------------------------------------------------------
    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        from proxy.state import Limit

        scopes = self.scopes(ctx)
        if not scopes:
            return
        counters = self.counters
        assert counters is not None
        prompt, tokens = 0, 0
        if self._counts_tokens and any(ls.tokens_per_minute for _, _, ls in scopes):
            prompt, tokens = await self.reserve_tokens(ctx)
        limits: list[Limit] = []
        token_limits: list[Limit] = []
        scope_of: dict[str, tuple[str, str]] = {}
        for scope, who, ls in scopes:
            base = self.prefix + who
            if ls.requests_per_minute is not None:
                lim = Limit(base + ":r", ls.requests_per_minute, PERIOD_S, 1.0)
                limits.append(lim)
                scope_of[lim.key] = (scope, "requests")
            if ls.tokens_per_minute is not None:
                if tokens > ls.tokens_per_minute:
                    self.metrics.decisions.labels("limited", scope, "tokens").inc()
                    raise ProxyError(
                        429,
                        f"Request too large: it needs about {tokens} tokens (prompt plus max_tokens) but the tokens per "
                        f"minute limit of this {scope} is {ls.tokens_per_minute}. Lower max_tokens or shorten the prompt.",
                        code="rate_limit_exceeded", reason="request_too_large",
                    )
                lim = Limit(base + ":t", ls.tokens_per_minute, PERIOD_S, float(tokens))
                limits.append(lim)
                token_limits.append(lim)
                scope_of[lim.key] = (scope, "tokens")

        leases: list[tuple[str, str]] = []
        try:
            for scope, who, ls in scopes:
                if ls.concurrency is None:
                    continue
                key = self.prefix + who + ":c"
                token = await counters.lease(key, ls.concurrency, self.config.lease_ttl_s)
                if token is None:
                    self.metrics.decisions.labels("limited", scope, "concurrency").inc()
                    raise ProxyError(
                        429, f"Too many requests in flight for this {scope} (limit {ls.concurrency}). Retry when one finishes.",
                        code="rate_limit_exceeded", headers={"retry-after": "1"}, reason="concurrency_limited",
                    )
                leases.append((key, token))
            decision = await counters.acquire(limits) if limits else None
        except BaseException:
            await self._release(leases)
            raise

        headers = self._headers(decision.statuses, scope_of) if decision is not None and self.config.headers else {}
        if decision is not None and not decision.allowed:
            await self._release(leases)
            refused = decision.refused
            scope, kind = scope_of.get(refused.key, ("key", "requests")) if refused else ("key", "requests")
            self.metrics.decisions.labels("limited", scope, kind).inc()
            wait = max(decision.retry_after_s, 0.001)
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            limit_n = int(refused.limit) if refused else 0
            raise ProxyError(
                429,
                f"Rate limit reached for {kind} per minute on this {scope} (limit {limit_n}). "
                f"Please try again in {format_duration(wait)}.",
                code="rate_limit_exceeded", headers=headers, reason=f"{kind}_limited",
            )
        self.metrics.decisions.labels("allowed", "", "").inc()
        ctx.stash[RESERVATION] = Reservation(tokens, prompt, token_limits, leases)
        if headers:
            ctx.response_headers.update(headers)

    @staticmethod
    def _headers(statuses: tuple[LimitStatus, ...], scope_of: dict[str, tuple[str, str]]) -> dict[str, str]:
        """OpenAI's headers for the tightest limit of each kind (the fewest units left)."""
        best: dict[str, LimitStatus] = {}
        for st in statuses:
            kind = scope_of.get(st.limit.key, ("", ""))[1]
            cur = best.get(kind)
            if cur is None or st.remaining < cur.remaining:
                best[kind] = st
        out: dict[str, str] = {}
        for kind, st in best.items():
            out[f"x-ratelimit-limit-{kind}"] = str(int(st.limit.limit))
            # epoch-sized timestamps leave float noise of a fraction of a unit: round it away
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(st.remaining + 0.01)))
            out[f"x-ratelimit-reset-{kind}"] = format_duration(st.reset_s)
        return out

    async def _release(self, leases: list[tuple[str, str]]) -> None:
        if not leases or self.counters is None:
            return
        for key, token in leases:
            try:
                await self.counters.release(key, token)
            except StateUnavailable:
                pass  # the lease's TTL frees it
        leases.clear()

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
        from proxy.state import Limit

        res = ctx.stash.get(RESERVATION)
        if res is None or res.released:
            return
        res.released = True
        await self._release(res.leases)
        if not res.token_limits:
            return
        used = self.actual_tokens(ctx, res)
        delta = used - res.tokens
        if delta > 0:
            self.metrics.overrun.inc(delta)
        if delta:
            assert self.counters is not None
            await self.counters.adjust([Limit(l.key, l.limit, l.period_s, float(delta)) for l in res.token_limits])
