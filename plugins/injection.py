"""Prompt-injection and jailbreak filter: a guard over user messages and tool results.

Layered: text is normalised (NFKC, confusables, invisible and bidi characters,
spacing and leetspeak tricks, base64/hex/rot13 payloads decoded and scanned too),
then matched against a curated, versioned signature set and heuristics, and the
detectors' scores are combined and compared with a threshold. Other detectors
(a local classifier, say) plug in through ``detectors:``. See docs/plugins/injection.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, StashKey, hookimpl

from ._injection_detectors import Detection, Detector, Source
from ._injection_engine import Engine, Finding, Item, extract
from ._injection_eval import eval_command
from ._injection_signatures import BY_ID

__all__ = ["BLOCK_CODE", "Detection", "Detector", "Injection", "InjectionConfig", "Source", "build_engine"]

log = logging.getLogger("sluice.injection")

#: the finding of this request, for this plugin's own later hooks and tests
FINDING: StashKey[Finding] = StashKey("injection.finding")

BLOCK_CODE = "prompt_injection_detected"


class DetectorSpec(BaseModel):
    """One detector whose score joins the combination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use: str = Field(
        ...,
        min_length=1,
        max_length=200,
        description="'signatures' (built in), a name from the 'sluice.injection_detectors' entry point group, or 'module:Class'.",
    )
    weight: float = Field(1.0, gt=0, le=1, description="The detector's score is multiplied by this before scores combine.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options passed to the detector's constructor.")


class InjectionConfig(PluginConfig):
    action: Literal["block", "flag", "log"] = Field(
        "block",
        description="'block' answers 403 (code prompt_injection_detected); 'flag' lets the request through with "
        "ctx.annotations['injection'] and a response header; 'log' only logs and annotates.",
    )
    threshold: float = Field(0.5, gt=0, le=1, description="Score at or above which a user message or prompt counts as an injection.")
    tool_threshold: float | None = Field(
        None, gt=0, le=1, description="Threshold for tool results and function outputs (indirect injection); default: 'threshold'."
    )
    roles: list[Literal["user", "tool", "system", "assistant", "prompt"]] = Field(
        default_factory=lambda: ["user", "tool", "prompt"],
        min_length=1,
        description="Which texts are scanned: message roles ('tool' includes 'function'; 'system' includes 'developer'), "
        "and 'prompt' for the completions prompt.",
    )
    last_messages: int | None = Field(
        None, ge=1, le=10000,
        description="Scan only the last N messages (earlier turns were scanned when they were sent); default: all.",
    )
    allow: list[str] = Field(
        default_factory=list, max_length=200,
        description="Regular expressions (case-insensitive) whose matches are blanked before scanning: phrases your "
        "application legitimately sends. Keep them simple: they run on every scanned text.",
    )
    disable_signatures: list[str] = Field(
        default_factory=list, max_length=200, description="Signature ids (e.g. 'DL-010') the built-in detector skips on this route."
    )
    exempt_keys: list[str] = Field(default_factory=list, max_length=10000, description="API key ids (ctx.identity.key_id) never scanned.")
    exempt_teams: list[str] = Field(default_factory=list, max_length=10000, description="Teams (ctx.identity.team) never scanned.")
    detectors: list[DetectorSpec] = Field(
        default_factory=lambda: [DetectorSpec(use="signatures")],
        min_length=1, max_length=16,
        description="Detectors whose scores combine; default the built-in signature detector alone.",
    )
    combine: Literal["noisy_or", "max", "mean"] = Field(
        "noisy_or", description="How detectors' weighted scores combine: noisy_or (either raises it, both more), max, or a weighted mean."
    )
    max_decode_depth: int = Field(2, ge=0, le=3, description="Nested base64/hex/rot13/tag-character payloads decoded and scanned.")
    header: str | None = Field(
        "x-sluice-injection", pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Response header carrying the score and categories when something is found (null: none).",
    )
    cache_size: int = Field(4096, ge=0, le=1_000_000, description="Texts whose result is remembered (chat history is resent every turn).")
    offload_chars: int = Field(
        50_000, ge=1000, le=100_000_000,
        description="Requests with more text than this are scanned in the executor, off the event loop.",
    )
    timeout_ms: int = Field(
        2000, ge=1, le=600_000, description="Longest a scan in the executor may take; past it the plugin fails (per on_error)."
    )

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"allow[{i}] is not a valid regular expression: {e}") from None
        return v

    @field_validator("disable_signatures")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(BY_ID))
        if unknown:
            raise ValueError(f"unknown signature ids: {', '.join(unknown)}")
        return v

    @model_validator(mode="after")
    def _detectors(self) -> InjectionConfig:
        uses = [d.use for d in self.detectors]
        if len(set(uses)) != len(uses):
            raise ValueError("each detector may appear once in 'detectors'")
        if self.disable_signatures and "signatures" not in uses:
            raise ValueError("'disable_signatures' needs the 'signatures' detector in 'detectors'")
        build_engine(self)  # imports and validates every detector's options now, at load
        return self


def build_engine(config: InjectionConfig) -> Engine:
    specs = []
    for d in config.detectors:
        options = dict(d.options)
        if d.use == "signatures":
            options.setdefault("disable", list(config.disable_signatures))
            options.setdefault("max_decode_depth", config.max_decode_depth)
        specs.append({"use": d.use, "weight": d.weight, "options": options})
    try:
        return Engine.from_specs(
            specs,
            combine=config.combine,
            threshold=config.threshold,
            tool_threshold=config.tool_threshold,
            allow=config.allow,
            cache_size=config.cache_size,
        )
    except ValueError as e:
        raise ValueError(f"detectors: {e}") from None


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.scans = Counter(
            "sluice_injection_scans_total", "Requests the injection guard looked at, by result (clean, detected, exempt, timeout).",
            ["result"], registry=registry,
        )
        self.detections = Counter(
            "sluice_injection_detections_total", "Requests that crossed the threshold, by category found and action taken.",
            ["category", "action"], registry=registry,
        )
        self.seconds = Histogram(
            "sluice_injection_scan_seconds", "Time to scan a request's new texts (cached texts cost nothing).",
            registry=registry, buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
        )


class Injection(Plugin):
    """Blocks, flags or logs requests whose messages look like prompt injection or jailbreaks."""

    name = "injection"
    kind = "guard"
    Config = InjectionConfig

    def __init__(self, config: InjectionConfig, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.config: InjectionConfig = config
        self.engine = build_engine(config)
        self._sources = frozenset(config.roles)
        self._exempt_keys = frozenset(config.exempt_keys)
        self._exempt_teams = frozenset(config.exempt_teams)
        self.metrics: _Metrics | None = None

    @classmethod
    def commands(cls):
        return [eval_command(cls)]

    async def start(self) -> None:
        if self.runtime is not None:
            self.metrics = self.runtime.shared("injection.metrics", lambda: _Metrics(self.runtime.metrics))
        if self.engine.blocking and self.runtime is not None:
            await self.runtime.run_cpu(self.engine.start)
        else:
            self.engine.start()

    async def stop(self) -> None:
        self.engine.stop()

    def _exempt(self, ctx: Context) -> bool:
        ident = ctx.identity
        if ident is None:
            return False
        return ident.key_id in self._exempt_keys or (ident.team is not None and ident.team in self._exempt_teams)

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered or ctx.method != "POST" or not ctx.body_is_json:
            return
        if (self._exempt_keys or self._exempt_teams) and self._exempt(ctx):
            ctx.annotations["injection"] = {"exempt": True}
            if self.metrics is not None:
                self.metrics.scans.labels("exempt").inc()
            return
        items = extract(ctx.body, ctx.path, self._sources, self.config.last_messages)
        if not items:
            return
        try:
            finding = await self._scan(items)
        except TimeoutError:
            # as pii answers its own: a timeout is the screen's dependency (the executor) overloaded, 503
            self.runtime.on_plugin_error(self.id, "on_request")
            if self.metrics is not None:
                self.metrics.scans.labels("timeout").inc()
            if self.fail_closed:
                raise ProxyError(
                    503, "The prompt-injection screen did not finish in time; the request was not processed.",
                    code="injection_timeout", reason="injection_timeout",
                ) from None
            log.warning("injection: the scan exceeded %d ms; passing the request unscanned (on_error: open) request_id=%s",
                        self.config.timeout_ms, ctx.request_id)
            ctx.note_failed_open(self.id, "on_request")
            return
        ctx.stash[FINDING] = finding
        summary = finding.summary()
        summary["action"] = self.config.action
        summary["version"] = self.engine.version
        ctx.annotations["injection"] = summary
        if self.metrics is not None:
            self.metrics.scans.labels("detected" if finding.detected else "clean").inc()
        if not finding.detected:
            return
        found = sorted(c for c, s in finding.categories.items() if s > 0)
        if self.metrics is not None:
            for c in found:
                self.metrics.detections.labels(c, self.config.action).inc()
        categories = ",".join(found)
        if self.config.header:
            ctx.response_headers[self.config.header] = f"score={finding.score:.2f}; categories={categories}; action={self.config.action}"
        level = logging.WARNING if self.config.action == "log" else logging.INFO
        if log.isEnabledFor(level):  # the arguments cost more than the call when it is filtered out
            log.log(
                level,
                "injection detected request_id=%s plugin=%s action=%s score=%.2f categories=%s signals=%s where=%s",
                ctx.request_id, self.id, self.config.action, finding.score, categories,
                ",".join(sorted(finding.signals)), ",".join(finding.where[:5]),
            )
        if self.config.action == "block":
            raise ProxyError(
                403,
                f"This request was blocked by the prompt-injection policy (categories: {categories}).",
                code=BLOCK_CODE,
                param=finding.where[0].split("[", 1)[0] if finding.where else None,
                reason="prompt_injection",
            )

    async def _scan(self, items: list[Item]) -> Finding:
        engine = self.engine
        results: list[Any] = [engine.cached(i.text, i.source) for i in items]
        todo = [k for k, r in enumerate(results) if r is None]
        if todo:
            t0 = time.perf_counter()
            size = sum(len(items[k].text) for k in todo)
            if (engine.blocking or size > self.config.offload_chars) and self.runtime is not None:
                fresh = await asyncio.wait_for(
                    self.runtime.run_cpu(_detect_all, engine, [items[k] for k in todo]),
                    timeout=self.config.timeout_ms / 1000,
                )
            else:
                fresh = _detect_all(engine, [items[k] for k in todo])
            for k, r in zip(todo, fresh):
                results[k] = r
                engine.remember(items[k].text, items[k].source, r)
            if self.metrics is not None:
                self.metrics.seconds.observe(time.perf_counter() - t0)
        return engine.verdict(items, results)


def _detect_all(engine: Engine, items: list[Item]) -> list[Any]:
    return [engine.detect(i.text, i.source) for i in items]
