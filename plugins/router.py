"""Model aliases over several targets: strategies, fallbacks, outlier ejection, complexity routing.

The router only decides ``ctx.targets`` (in order of preference); the core makes
the attempts, retries before the first byte (backoff, jitter, ``retry-after``,
deadline) and falls back down the list. The router learns from ``ctx.attempts``
in ``on_done`` (latency, failures) and from background probes (vLLM
``/metrics``, optional active health checks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, Target, hookimpl
from proxy.config import Model
from proxy.upstream import overloaded

from ._router_core import STRATEGIES, Candidate, TargetStats, estimate_tokens, features, parse_vllm_metrics
from ._tokens import completion_allowance

log = logging.getLogger("sluice.router")

ALIAS_NAME = r"^[A-Za-z0-9_.:/@-]{1,128}$"


class TargetConfig(Model):
    upstream: str = Field(..., min_length=1, max_length=128, description="The upstream's name in 'upstreams:'.")
    model: str | None = Field(
        None, min_length=1, max_length=256, description="Model name sent to that upstream; default: the name the client sent."
    )
    weight: float = Field(1.0, ge=0, le=10000, description="Share of traffic for 'weighted'; scales load for the other strategies.")
    max_concurrency: int | None = Field(
        None, ge=1, le=100000, description="Skip this target while this many requests are in flight to its upstream."
    )


class AliasConfig(Model):
    targets: list[TargetConfig] = Field(..., min_length=1, max_length=64, description="Where requests for this alias may go.")
    strategy: Literal["weighted", "round_robin", "least_outstanding", "lowest_latency", "vllm"] = Field(
        "weighted", description="How the first target is chosen; the other targets follow as fallbacks."
    )
    fallbacks: list[str] = Field(
        default_factory=list, max_length=16,
        description="Other aliases tried, in order, when every target of this one failed or cannot take the prompt.",
    )

    @model_validator(mode="after")
    def _weights(self) -> AliasConfig:
        if self.strategy == "weighted" and not any(t.weight > 0 for t in self.targets):
            raise ValueError("a 'weighted' alias needs at least one target with weight > 0")
        return self


class EjectionConfig(Model):
    enabled: bool = Field(True, description="Take a target out after repeated failures, and probe it back in.")
    consecutive_failures: int = Field(5, ge=1, le=1000, description="Failures in a row that eject a target.")
    cooldown_s: float = Field(10.0, gt=0, le=3600, description="First ejection's length; doubles for each ejection in a row.")
    max_cooldown_s: float = Field(300.0, gt=0, le=86400, description="Longest ejection.")
    failure_statuses: list[int] = Field(
        default_factory=lambda: [429, 500, 502, 503, 504], max_length=32,
        description="Upstream statuses counted as failures (connect errors and timeouts always are).",
    )
    probe_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="While half-open, how long one probe request holds the target before another may go."
    )

    @model_validator(mode="after")
    def _cooldowns(self) -> EjectionConfig:
        if self.cooldown_s > self.max_cooldown_s:
            raise ValueError("cooldown_s must not exceed max_cooldown_s")
        if any(not 100 <= s <= 599 for s in self.failure_statuses):
            raise ValueError("failure_statuses must be HTTP statuses (100-599)")
        return self


class HealthCheckConfig(Model):
    enabled: bool = Field(False, description="Probe every target's upstream in the background.")
    interval_s: float = Field(10.0, ge=0.05, le=3600, description="Time between probes of one upstream.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="A probe slower than this fails.")
    path: str = Field("models", min_length=1, max_length=256, description="Endpoint probed with GET, after the upstream's url (e.g. 'models').")
    unhealthy_threshold: int = Field(2, ge=1, le=100, description="Failed probes in a row that eject the upstream's targets.")


class VllmConfig(Model):
    poll_interval_s: float = Field(2.0, ge=0.05, le=600, description="Time between scrapes of each vLLM upstream's /metrics.")
    timeout_s: float = Field(1.0, gt=0, le=60, description="A scrape slower than this is skipped.")
    stale_after_s: float = Field(10.0, gt=0, le=3600, description="Older scrapes are ignored; the target is then scored by in-flight requests.")
    kv_cache_weight: float = Field(
        4.0, ge=0, le=1000, description="How many waiting requests a full KV cache counts as when comparing targets."
    )
    running_weight: float = Field(
        0.25, ge=0, le=1000, description="How many waiting requests one running request counts as (a bigger batch decodes each sequence slower)."
    )


class ComplexityConfig(Model):
    model: str = Field("auto", pattern=ALIAS_NAME, description="The model name clients send to get complexity routing.")
    small: str = Field(..., pattern=ALIAS_NAME, description="Alias (or model name) for simple requests.")
    large: str = Field(..., pattern=ALIAS_NAME, description="Alias (or model name) for complex requests.")
    max_prompt_tokens: int = Field(1500, ge=1, le=10_000_000, description="Prompts longer than this go large.")
    max_turns: int = Field(8, ge=1, le=10000, description="Conversations with more user and assistant turns than this go large.")
    code: bool = Field(True, description="Prompts containing code go large.")
    tools: bool = Field(True, description="Requests offering tools go large.")
    keywords: list[str] = Field(
        default_factory=list, max_length=256, description="Phrases that send a prompt large, matched case-insensitively ('prove', 'step by step')."
    )


def stats_key(upstream: str, model: str | None) -> str:
    return f"{upstream}\x00{model or ''}"


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.ejections = Counter(
            "sluice_router_ejections_total", "Targets taken out of rotation after failures.", ["upstream"], registry=registry
        )
        self.routed = Counter(
            "sluice_router_requests_total", "Requests for an alias, by decision (ok, too_long, unavailable).", ["alias", "decision"], registry=registry
        )
        self.scrapes = Counter(
            "sluice_router_vllm_scrapes_total", "vLLM /metrics scrapes by result.", ["upstream", "result"], registry=registry
        )
        self.ejected = Gauge(
            "sluice_router_target_ejected", "1 while a target is ejected.", ["upstream", "model"], registry=registry
        )


class Router(Plugin):
    """Resolves model aliases to ordered targets; learns latency and failures per target."""

    name = "router"
    kind = "transform"

    class Config(PluginConfig):
        aliases: dict[str, AliasConfig] = Field(
            default_factory=dict, description="Model names clients send, each mapped to targets and a strategy."
        )
        ewma_alpha: float = Field(0.3, gt=0, le=1, description="Weight of the newest latency in the moving average ('lowest_latency').")
        ejection: EjectionConfig = Field(default_factory=EjectionConfig, description="Passive outlier ejection.")
        health_checks: HealthCheckConfig = Field(default_factory=HealthCheckConfig, description="Active health checks.")
        vllm: VllmConfig = Field(default_factory=VllmConfig, description="Scraping of vLLM upstreams for the 'vllm' strategy.")
        complexity: ComplexityConfig | None = Field(None, description="Send a virtual model to a small or a large alias by prompt features.")
        context_window_check: bool = Field(
            True, description="Skip targets whose upstream's context_window is smaller than the prompt plus max_tokens."
        )
        max_targets: int = Field(8, ge=1, le=64, description="At most this many targets (fallbacks included) per request.")
        unknown_models: Literal["pass", "reject"] = Field(
            "pass", description="A model that is not an alias: 'pass' leaves the route's upstreams, 'reject' answers 404."
        )

        @model_validator(mode="after")
        def _refs(self) -> Router.Config:
            for name, alias in self.aliases.items():
                for fb in alias.fallbacks:
                    if fb == name:
                        raise ValueError(f"aliases.{name}.fallbacks: an alias cannot fall back to itself")
                    if fb not in self.aliases:
                        raise ValueError(f"aliases.{name}.fallbacks: unknown alias {fb!r}")
            c = self.complexity
            if c is not None and c.model in self.aliases:
                raise ValueError(f"complexity.model: {c.model!r} is also an alias; pick a name of its own")
            return self

    config: Config

    @classmethod
    def check(cls, config: Config, sluice: Any) -> None:
        known = sluice.upstream_names()
        for name, alias in config.aliases.items():
            missing = sorted({t.upstream for t in alias.targets} - known)
            if missing:
                raise ValueError(f"aliases.{name}.targets: unknown upstream(s) {', '.join(missing)}: add them to 'upstreams'")

    async def start(self) -> None:
        c = self.config
        pool = self.runtime.upstreams
        # Health and latency outlive a config reload: keyed by target, shared in the process.
        self.stats: dict[str, TargetStats] = self.runtime.shared("router.stats", dict)
        self.metrics = self.runtime.shared("router.metrics", lambda: _Metrics(self.runtime.metrics))
        self._turn = itertools.count()
        self._fail_statuses = frozenset(c.ejection.failure_statuses)
        #: a target out of rotation, by passive ejection or by failed active probes, is skipped either way
        self._checked = c.ejection.enabled or c.health_checks.enabled
        # per alias: (strategy fn, [(TargetConfig, Upstream, TargetStats, Target)])
        self._plans: dict[str, tuple[Any, list[tuple[TargetConfig, Any, TargetStats, Target]]]] = {}
        self._pool: Any = None
        self._resolve(pool)
        self._chains = {name: self._fallback_chain(name) for name in c.aliases}
        self._routed_ok = {name: self.metrics.routed.labels(name, "ok") for name in c.aliases}
        self._tasks: list[asyncio.Task[Any]] = []
        vllm_ups = {t.upstream for a in c.aliases.values() if a.strategy == "vllm" for t in a.targets}
        for up in sorted(vllm_ups):
            self._tasks.append(self.runtime.spawn(self._scrape_loop(up), f"router.vllm.{up}"))
        if c.health_checks.enabled:
            for up in sorted({t.upstream for a in c.aliases.values() for t in a.targets}):
                self._tasks.append(self.runtime.spawn(self._health_loop(up), f"router.health.{up}"))

    def _resolve(self, pool: Any) -> None:
        """Bind targets to the pool's upstream objects (their in-flight counts and context windows).

        A reload starts the new chain while the old pool still serves, and swaps
        ``runtime.upstreams`` afterwards: targets are re-bound when the pool changes.
        """
        c = self.config
        plans = {}
        unknown = set()
        for name, alias in c.aliases.items():
            entries = []
            for t in alias.targets:
                st = self.stats.setdefault(stats_key(t.upstream, t.model), TargetStats())
                up = pool.upstreams.get(t.upstream)
                if up is None:
                    unknown.add(t.upstream)
                    continue
                entries.append((t, up, st, Target(t.upstream, t.model, label=name, max_concurrency=t.max_concurrency)))
            plans[name] = (STRATEGIES[alias.strategy], entries)
        self._plans = plans
        self._windows = c.context_window_check and any(
            e[1].config.context_window for _, entries in plans.values() for e in entries
        )
        if unknown and self._pool is not None:
            log.error("router: unknown upstream(s) %s: their targets are skipped", ", ".join(sorted(unknown)))
        self._pool = pool

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _fallback_chain(self, name: str) -> list[str]:
        out: list[str] = []
        todo = [name]
        while todo:
            n = todo.pop(0)
            if n in out:
                continue
            out.append(n)
            todo.extend(self.config.aliases[n].fallbacks)
        return out

    # -- request ------------------------------------------------------------------------
    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        model = ctx.model
        if model is None:
            return
        c = self.config
        if c.complexity is not None and model == c.complexity.model:
            model = self._by_complexity(ctx, c.complexity)
        chain = self._chains.get(model)
        route = ctx.route
        if chain is not None and route is not None and ctx.targets and ctx.targets != route.default_targets:
            return  # an earlier plugin (an experiment's variant) chose where this request goes: its choice stands
        if chain is None:
            if c.unknown_models == "reject":
                raise ProxyError(404, "The model does not exist or you do not have access to it.", code="model_not_found", param="model")
            return
        if self.runtime.upstreams is not self._pool:
            self._resolve(self.runtime.upstreams)
        now = time.monotonic()
        need = None
        if self._windows:
            body = ctx.body
            need = estimate_tokens(body) + completion_allowance(body, 0) if isinstance(body, dict) else 0
        targets: list[Target] = []
        too_small = False
        turn = next(self._turn)
        ej = c.ejection
        checked = self._checked
        vl = c.vllm
        for alias in chain:
            strategy, entries = self._plans[alias]
            cands: list[Candidate] = []
            for i, (tc, up, st, _) in enumerate(entries):
                if need is not None:
                    window = up.config.context_window
                    if window is not None and need > window:
                        too_small = True
                        continue
                # Ejected or full targets are skipped, not queued behind: the fallbacks take over.
                if checked and not st.available(now, ej.probe_timeout_s):
                    continue
                if tc.max_concurrency is not None and up.outstanding >= tc.max_concurrency:
                    continue
                cands.append(Candidate(i, tc.weight, up.outstanding, st))
            if not cands:
                continue
            ordered = strategy(cands, turn=turn, now=now, stale_after_s=vl.stale_after_s, kv_weight=vl.kv_cache_weight, running_weight=vl.running_weight)
            if ej.enabled and not targets:
                # only the first target is surely tried: a half-open one listed as a fallback is no probe
                ordered[0].stats.selected(now)
            for cand in ordered:
                targets.append(entries[cand.index][3])
            if len(targets) >= c.max_targets:
                break
        if not targets and not any(self._plans[a][1] for a in chain):
            self.metrics.routed.labels(model, "misconfigured").inc()
            raise ProxyError(500, "The router names an upstream that is not configured.", code="unknown_upstream")
        if not targets:
            decision = "too_long" if too_small else "unavailable"
            self.metrics.routed.labels(model, decision).inc()
            if too_small:
                raise ProxyError(
                    400, "The prompt is longer than the context window of every model this name routes to.",
                    code="context_length_exceeded", param="messages",
                )
            # Every target is ejected or at its cap: fail fast rather than queue behind a broken upstream.
            raise overloaded()
        ctx.targets = targets[: c.max_targets]
        ctx.tags["alias"] = model
        self._routed_ok[model].inc()

    def _by_complexity(self, ctx: Context, cc: ComplexityConfig) -> str:
        body = ctx.body
        f = features(body, cc.keywords)
        large = (
            f.prompt_tokens > cc.max_prompt_tokens
            or f.turns > cc.max_turns
            or (cc.code and f.has_code)
            or (cc.tools and f.has_tools)
            or f.keyword
        )
        ctx.features["prompt_tokens_estimate"] = float(f.prompt_tokens)
        ctx.features["conversation_turns"] = float(f.turns)
        ctx.tags["complexity"] = "large" if large else "small"
        chosen = cc.large if large else cc.small
        # as if the client had asked for it: targets without a model of their own send this name
        body["model"] = chosen
        ctx.body = body
        return chosen

    # -- learning -------------------------------------------------------------------------
    @hookimpl
    def on_done(self, ctx: Context) -> None:
        if not ctx.attempts:
            return
        ej = self.config.ejection
        alpha = self.config.ewma_alpha
        now = time.monotonic()
        # the attempt a stream came from: its latency is to the first token (the stream's first body
        # bytes), not to the headers, which a model server sends before prefill
        streamed = ctx.attempts[-1] if ctx.stream and ctx.timings.first_byte is not None else None
        for att in ctx.attempts:
            t = att.target
            st = self.stats.get(stats_key(t.upstream, t.model))
            if st is None:
                continue
            if att.error == "cancelled":
                continue  # the client left: says nothing about the upstream
            ok = att.error is None and att.status is not None and att.status not in self._fail_statuses
            latency = None
            if ok and att.first_byte is not None:
                first = ctx.timings.first_byte if att is streamed else att.first_byte
                latency = (first - att.start) * 1000.0  # type: ignore[operator]
            ejected = st.record(
                ok, latency, now, alpha=alpha, failures_to_eject=ej.consecutive_failures if ej.enabled else 1 << 30,
                cooldown_s=ej.cooldown_s, max_cooldown_s=ej.max_cooldown_s,
            )
            if ejected:
                self._ejected(t, st, now)
            elif ok:
                self.metrics.ejected.labels(t.upstream, t.model or "").set(0)

    def _ejected(self, t: Target, st: TargetStats, now: float) -> None:
        self.metrics.ejections.labels(t.upstream).inc()
        self.metrics.ejected.labels(t.upstream, t.model or "").set(1)
        log.warning(
            "router: ejected upstream=%s model=%s for %.1fs after %d failures in a row",
            t.upstream, t.model or "-", st.ejected_until - now, st.consecutive_failures,
        )

    # -- background probes ----------------------------------------------------------------
    def _targets_of(self, upstream: str) -> list[tuple[TargetConfig, TargetStats]]:
        return [(tc, st) for _, entries in self._plans.values() for tc, up, st, _ in entries if up.name == upstream]

    async def _scrape_loop(self, upstream: str) -> None:
        vl = self.config.vllm
        while True:
            await self.scrape_once(upstream)
            await asyncio.sleep(vl.poll_interval_s)

    async def scrape_once(self, upstream: str) -> bool:
        """Scrape one vLLM upstream's /metrics into its targets' stats; False when it failed."""
        import aiohttp

        up = self.runtime.upstreams.upstreams.get(upstream)
        vl = self.config.vllm
        if up is None or up.session is None:
            return False
        try:
            async with asyncio.timeout(vl.timeout_s):
                async with up.session.get(up.origin + "/metrics", allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                    text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self.metrics.scrapes.labels(upstream, "error").inc()
            log.debug("router: scraping %s/metrics failed: %s", upstream, type(e).__name__)
            return False
        now = time.monotonic()
        ok = False
        for tc, st in self._targets_of(upstream):
            load = parse_vllm_metrics(text, tc.model)
            if not load.valid:
                load = parse_vllm_metrics(text)
            if load.valid:
                st.vllm = (load.waiting, load.running, load.kv_cache_usage, up.outstanding, now)
                ok = True
        self.metrics.scrapes.labels(upstream, "ok" if ok else "invalid").inc()
        return ok

    async def _health_loop(self, upstream: str) -> None:
        hc = self.config.health_checks
        failures = 0
        while True:
            ok = await self.check_once(upstream)
            failures = 0 if ok else failures + 1
            now = time.monotonic()
            for tc, st in self._targets_of(upstream):
                if ok:
                    if st.by_health:
                        st.record(True, None, now, alpha=self.config.ewma_alpha, failures_to_eject=1, cooldown_s=1, max_cooldown_s=1)
                        self.metrics.ejected.labels(upstream, tc.model or "").set(0)
                        log.info("router: upstream=%s model=%s passed its health check; back in rotation", upstream, tc.model or "-")
                elif failures >= hc.unhealthy_threshold and st.ejected_until <= now + hc.interval_s:
                    was_in = st.ejected_until <= now
                    st.eject_for(hc.interval_s * 2, now)
                    if was_in:
                        self._ejected(Target(upstream, tc.model), st, now)
            await asyncio.sleep(hc.interval_s)

    async def check_once(self, upstream: str) -> bool:
        """One active health probe: GET the configured path; 2xx within the timeout passes."""
        hc = self.config.health_checks
        try:
            resp = await self.runtime.upstreams.call(Target(upstream), "GET", hc.path, b"", None, timeout=hc.timeout_s)
        except Exception as e:  # any failure to get a 2xx is a failed probe, whatever raised it
            log.debug("router: health check of %s failed: %s", upstream, type(e).__name__)
            return False
        return 200 <= resp.status < 300

