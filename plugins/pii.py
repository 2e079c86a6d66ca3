"""pii: find personal data in what a model reads and writes; redact, mask, hash or block it.

Detection is Presidio on a blank spaCy pipeline (no model download), with tuned
recognizers for phones, cards and URLs, and an optional NER pipeline (the
``ner`` extra) for names and places. Only texts that could hold PII reach
Presidio, results are cached per text, and Presidio runs in a low-priority
worker process (or the runtime's executor threads) under a per-request timeout;
an analysis the worker has not answered within ``hedge_ms`` also runs in the
executor, and the first answer wins. With ``restore: true`` placeholders in the
answer are put back, in buffered answers and in streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy import Command, Context, Event, Plugin, PluginConfig, ProxyError, StashKey, hookimpl

from ._pii_engine import EngineSettings, Finding, PiiEngine, ProcessAnalyzer, ResultCache, build_nlp, ner_available
from ._pii_recognizers import NER_ENTITIES, PATTERN_ENTITIES, CustomPattern, CustomRecognizer
from ._pii_scope import (
    DELTA_TEXT_CHANNELS,
    answer_slots,
    answer_token_fields,
    channel_closed_by,
    drop_answer_tokens,
    endpoint_kind,
    request_slots,
    stream_channel_ends,
    stream_slots,
)
from ._pii_stream import Channel, StreamScanner, grow_limit, hold_words
from ._pii_vault import StreamRestorer, Vault, label

if TYPE_CHECKING:  # pragma: no cover
    from proxy.runtime import Runtime

log = logging.getLogger("sluice.pii")

Action = Literal["redact", "mask", "hash", "block"]
KNOWN_ENTITIES = PATTERN_ENTITIES + NER_ENTITIES
_ENTITY_NAME = r"^[A-Z][A-Z0-9_]{0,39}$"


class PatternConfig(BaseModel):
    """One regex of a custom recognizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regex: str = Field(..., min_length=1, max_length=2000, description="A regular expression (Python syntax) matching the whole entity.")
    score: float = Field(0.8, gt=0, le=1, description="Score of a match; compared with the entity's threshold.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex: {e}") from None
        if re.compile(v).match(""):
            raise ValueError("the regex matches the empty string")
        return v


class RecognizerConfig(BaseModel):
    """A custom pattern recognizer: an entity type of your own (employee ids, ticket numbers, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: str = Field(..., pattern=_ENTITY_NAME, description="Entity type it finds, upper case (EMPLOYEE_ID); its placeholder label.")
    patterns: list[PatternConfig] = Field(..., min_length=1, max_length=50, description="Regexes, each with a score.")
    context: list[str] = Field(
        default_factory=list, max_length=100, description="Words that raise a match's score when they precede it (Presidio context)."
    )


class PiiConfig(PluginConfig):
    entities: list[str] = Field(
        default_factory=lambda: list(PATTERN_ENTITIES),
        min_length=1,
        max_length=64,
        description="Entity types to look for. Pattern types need no model: "
        + ", ".join(PATTERN_ENTITIES)
        + ". PERSON, LOCATION, NRP and ORGANIZATION need 'ner: true'.",
    )
    action: Action = Field("redact", description="What to do with an entity: redact to a typed placeholder, mask, hash, or block the request.")
    actions: dict[str, Action] = Field(default_factory=dict, description="Per entity type, overrides 'action' (e.g. CREDIT_CARD: block).")
    min_score: float = Field(0.5, ge=0, le=1, description="Lowest score that counts as a finding.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Per entity type, overrides 'min_score' (0 to 1).")
    allow_list: list[str] = Field(
        default_factory=list, max_length=100_000, description="Exact values never treated as PII (your support address, test cards)."
    )
    deny_list: dict[str, list[str]] = Field(
        default_factory=dict, description="Entity type -> words always treated as that type (case-insensitive, whole words)."
    )
    recognizers: list[RecognizerConfig] = Field(default_factory=list, max_length=100, description="Custom pattern recognizers.")
    ner: bool = Field(False, description="Use the NER pipeline (pip install 'sluice[ner]') for PERSON, LOCATION, NRP, ORGANIZATION.")
    restore: bool = Field(False, description="Put redacted values back into the answer (buffered and streamed) before the client sees it.")
    scan_answers: bool = Field(True, description="Scan the model's answers too, and apply the same actions to PII the model writes.")
    answer_logprobs: Literal["refuse", "drop", "allow"] = Field(
        "refuse", description="With scan_answers, a request asking for the answer's tokens (log probabilities, vLLM's token ids or raw messages), "
        "which repeat its text unscanned: 'refuse' it (400 unsupported_parameter), 'drop' the fields so none come back, or 'allow' it.")
    fast_path: bool = Field(True, description="Send to Presidio only texts (and windows of long texts) that could hold an entity.")
    window_min_chars: int = Field(2000, ge=200, le=10_000_000, description="Texts at least this long are analysed in windows around their triggers.")
    cache_entries: int = Field(4096, ge=0, le=1_000_000, description="Texts whose findings are cached (LRU; 0 disables the cache).")
    cache_max_chars: int = Field(16_000_000, ge=0, le=1_000_000_000, description="Bound on the characters of cached texts.")
    timeout_ms: int = Field(2000, ge=1, le=600_000, description="Longest a request waits for Presidio; then the failure policy ('on_error') applies.")
    processes: int = Field(
        1,
        ge=0,
        le=64,
        description="Worker processes that run Presidio (0: the runtime's executor threads instead). Processes keep Presidio off "
        "the event loop's GIL and CPU, at about 125 MB each (Presidio and spaCy; more with NER).",
    )
    worker_priority: Literal["idle", "low", "normal"] = Field(
        "idle",
        description="CPU priority of the worker processes: 'idle' (Linux SCHED_IDLE: the server preempts an analysis the moment it has "
        "work; nice 19 elsewhere), 'low' (nice 19) or 'normal'. Below 'normal', screened requests wait when the server keeps the CPU busy.",
    )
    hedge_ms: int = Field(
        50,
        ge=0,
        le=600_000,
        description="With worker processes: when a worker has not answered a request's analysis after this long, also run it in the "
        "runtime's executor threads and take the first answer (0, or not below timeout_ms: never). Bounds the wait of screened requests when the workers get no "
        "CPU; costs an in-process engine (memory) and, while hedging, the event loop shares the GIL with the analysis.",
    )
    hash_key: str | None = Field(
        None, min_length=16, description='Secret key of the HMAC for the "hash" action, usually {"$env": "SLUICE_PII_HASH_KEY"}.'
    )
    hash_length: int = Field(16, ge=8, le=64, description="Hex characters of the HMAC kept in a hashed value.")
    mask_char: str = Field("*", min_length=1, max_length=1, description="Character that replaces masked letters and digits.")
    mask_keep_last: int = Field(4, ge=0, le=8, description="Trailing letters or digits a mask leaves visible (0 hides all).")

    @field_validator("entities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in KNOWN_ENTITIES]
        if unknown:
            raise ValueError(f"unknown entity type {unknown[0]!r} (known: {', '.join(KNOWN_ENTITIES)}; add others with 'recognizers')")
        if len(set(v)) != len(v):
            raise ValueError("an entity type is listed twice")
        return v

    @field_validator("thresholds")
    @classmethod
    def _scores(cls, v: dict[str, float]) -> dict[str, float]:
        for k, s in v.items():
            if not 0 <= s <= 1:
                raise ValueError(f"{k}: a threshold is between 0 and 1")
        return v

    @field_validator("deny_list")
    @classmethod
    def _deny(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for k, words in v.items():
            if not re.match(_ENTITY_NAME, k):
                raise ValueError(f"{k!r}: entity types are upper case letters, digits and '_'")
            if any(not w.strip() for w in words):
                raise ValueError(f"{k}: empty word")
        return v

    @property
    def all_entities(self) -> list[str]:
        out = list(self.entities)
        for extra in [r.entity for r in self.recognizers] + list(self.deny_list):
            if extra not in out:
                out.append(extra)
        return out

    @model_validator(mode="after")
    def _coherent(self) -> PiiConfig:
        needs_ner = [e for e in self.entities if e in NER_ENTITIES]
        if needs_ner and not self.ner:
            raise ValueError(f"{needs_ner[0]} needs 'ner: true' (names and places need the NER model)")
        if self.ner and not ner_available():
            raise ValueError("ner: true needs the NER pipeline: pip install 'sluice[ner]'")
        if self.ner and not needs_ner:
            raise ValueError("ner: true but no NER entity type (PERSON, LOCATION, NRP, ORGANIZATION) in 'entities'")
        known = set(self.all_entities)
        for field in ("actions", "thresholds"):
            for k in getattr(self, field):
                if k not in known:
                    raise ValueError(f"{field}: {k!r} is not an entity type this plugin looks for")
        actions = {e: self.actions.get(e, self.action) for e in known}
        if "hash" in actions.values() and not self.hash_key:
            raise ValueError("the 'hash' action needs 'hash_key' (a secret of at least 16 characters)")
        if self.restore and "redact" not in actions.values():
            raise ValueError("restore: true needs at least one entity type whose action is 'redact'")
        return self


VAULT: StashKey[Vault] = StashKey("pii.vault")
STREAM: StashKey[dict[tuple[Any, ...], Channel]] = StashKey("pii.stream")
#: Responses API streams: how many events this plugin added so far (later events' sequence
#: numbers move up by as many), and the last sequence number a client got
SEQ: StashKey[list[int]] = StashKey("pii.seq")


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter as PCounter

        self.findings = PCounter(
            "sluice_pii_findings", "Entities the pii plugin found, by type and direction.", ["entity", "where"], registry=registry
        )
        self.texts = PCounter(
            "sluice_pii_texts", "Texts the pii plugin looked at, by what it took: skipped (pre-scan), cached or analyzed.", ["result"], registry=registry
        )
        self.timeouts = PCounter("sluice_pii_timeouts", "Requests whose PII analysis exceeded timeout_ms.", registry=registry)
        self.hedged = PCounter(
            "sluice_pii_hedged",
            "Analyses a worker process had not answered within hedge_ms, so that the executor ran them too, by which answered first: "
            "executor, worker, or none (both failed or timeout_ms passed).",
            ["first"],
            registry=registry,
        )


class Pii(Plugin):
    """Finds personal data in every text a model reads and writes, and redacts, masks, hashes or blocks it."""

    name = "pii"
    kind = "guard"
    Config = PiiConfig

    def __init__(self, config: PiiConfig, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        self.config: PiiConfig = config
        self.settings = engine_settings(config)
        self.actions = {e: config.actions.get(e, config.action) for e in config.all_entities}
        self.engine: PiiEngine | None = None
        self.cache: ResultCache | None = None
        self.metrics: _Metrics | None = None
        self.workers: ProcessAnalyzer | None = None
        self._timeout = config.timeout_ms / 1000
        self._hedge = config.hedge_ms / 1000 if config.processes and config.hedge_ms < config.timeout_ms else 0.0
        self._hash_key = config.hash_key.encode() if config.hash_key else b""
        #: how much of a run without whitespace a stream scanner may hold back
        deny_words = [w for ws in config.deny_list.values() for w in ws]
        self.grow_limit = grow_limit(config.entities, deny_words, bool(config.recognizers))
        #: and how many whole words before the last, for entities of several words
        self.hold_words = hold_words(deny_words, any(e in NER_ENTITIES for e in config.all_entities),
                                     [p.regex for r in config.recognizers for p in r.patterns])

    async def start(self) -> None:
        rt = self.runtime
        settings = self.settings
        key = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
        conf = self.config

        def nlp_factory(ner: bool) -> Any:
            return rt.shared(f"pii.nlp.{'ner' if ner else 'blank'}", lambda: build_nlp(ner))

        def make_cache() -> ResultCache:
            return ResultCache(conf.cache_entries, conf.cache_max_chars)

        # engines, caches and worker pools outlive a reload that keeps the same settings
        self.engine = rt.shared(f"pii.engine:{key}", lambda: PiiEngine(settings, nlp_factory=nlp_factory))
        self.cache = rt.shared(f"pii.cache:{key}:{conf.cache_entries}:{conf.cache_max_chars}", make_cache)
        self.metrics = rt.shared("pii.metrics", lambda: _Metrics(rt.metrics))
        if conf.processes:
            # the workers build their own engines (a bad pattern fails here too); this
            # process keeps only the pre-scan, which needs no Presidio
            pool = rt.shared(
                f"pii.processes:{key}:{conf.processes}:{conf.worker_priority}", lambda: ProcessAnalyzer(settings, conf.processes, conf.worker_priority, rt.spawn)
            )
            pool.users += 1
            self.workers = pool
            starting = [] if pool.started else [pool.start()]
            if self._hedge and not self.engine.loaded:
                # the hedge runs the analysis here, in the executor: the engine is built now, not on a starved request
                starting.append(rt.run_cpu(self.engine.load))
            got = await asyncio.gather(*starting, return_exceptions=True)
            for e in got:
                if isinstance(e, BaseException):
                    raise e
        elif not self.engine.loaded:
            await rt.run_cpu(self.engine.load)

    async def stop(self) -> None:
        pool, self.workers = self.workers, None
        if pool is not None:
            pool.users -= 1
            if pool.users == 0:
                # a reload that keeps the settings took its reference before this instance retired
                await pool.close()

    # -- finding -------------------------------------------------------------
    async def find(self, texts: list[str], where: str, ctx: Context) -> list[tuple[Finding, ...]] | None:
        """Findings per text (pre-scan, cache, then Presidio off the loop) of ``ctx``'s request or answer
        (``where``); ``None`` when it timed out and fails open, noted in ``ctx.failed_open``."""
        engine, cache = self.engine, self.cache
        assert engine is not None and cache is not None, "start() was not awaited"
        results: list[tuple[Finding, ...]] = [()] * len(texts)
        todo: dict[str, list[int]] = {}
        skipped = cached = 0
        for i, t in enumerate(texts):
            if not t:
                continue
            # the cache first: a resent history message costs one hash, found or not
            hit = cache.get(t)
            if hit is not None:
                results[i] = hit
                cached += 1
            elif not engine.triggered(t):
                cache.put(t, ())
                skipped += 1
            else:
                todo.setdefault(t, []).append(i)
        m = self.metrics
        if m is not None:
            if skipped:
                m.texts.labels("skipped").inc(skipped)
            if cached:
                m.texts.labels("cached").inc(cached)
            if todo:
                m.texts.labels("analyzed").inc(len(todo))
        if not todo:
            return results
        uniq = list(todo)
        try:
            if self.workers is None:
                found = await asyncio.wait_for(self.runtime.run_cpu(engine.analyze_many, uniq), self._timeout)
            elif not self._hedge:
                found = await asyncio.wait_for(self.workers.analyze_many(uniq, time.monotonic() + self._timeout), self._timeout)
            else:
                found = await self._hedged(engine, uniq)
        except asyncio.TimeoutError:
            if m is not None:
                m.timeouts.inc()
            phase = "on_request" if where == "request" else "on_response"
            self.runtime.on_plugin_error(self.id, phase)
            if self.fail_closed:
                raise ProxyError(
                    503,
                    "The personal-data screen did not finish in time; the request was not processed.",
                    code="pii_timeout",
                    reason="pii_timeout",
                ) from None
            log.warning("pii: analysis of %d texts exceeded %d ms; passing %s unscreened (on_error: open)", len(uniq), self.config.timeout_ms, where)
            ctx.note_failed_open(self.id, phase)
            return None
        for t, fs in zip(uniq, found):
            tup = tuple(fs)
            cache.put(t, tup)
            for i in todo[t]:
                results[i] = tup
        return results

    async def _hedged(self, engine: PiiEngine, uniq: list[str]) -> list[list[Finding]]:
        """The worker's findings; if it has not answered within ``hedge_ms``, whichever of it and the executor answers first.

        Both run the same engine settings (the same findings). The loser is cancelled: the
        worker's job leaves its pending map at once (the worker skips it if its deadline
        passed, else its answer is ignored), and an executor thread finishes and is ignored.
        """
        assert self.workers is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout
        # tasks this call holds, awaits and cancels itself (not background work: no runtime.spawn)
        work = loop.create_task(self.workers.analyze_many(uniq, time.monotonic() + self._timeout), name="pii-worker-analysis")
        tasks: list[asyncio.Future[Any]] = [work]
        first = "none"
        try:
            await asyncio.wait(tasks, timeout=self._hedge)
            if work.done():
                return work.result()
            tasks.append(loop.create_task(self.runtime.run_cpu(engine.analyze_many, uniq), name="pii-hedge-analysis"))
            errors: list[BaseException] = []
            pending = set(tasks)
            async with asyncio.timeout_at(end):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    ok = None
                    for t in tasks:  # the worker first when both are done: every exception is retrieved
                        if t not in done:
                            continue
                        e = asyncio.CancelledError() if t.cancelled() else t.exception()
                        if e is not None:
                            errors.append(e)
                        elif ok is None:
                            ok = t
                    if ok is not None:
                        first = "worker" if ok is work else "executor"
                        return ok.result()
            raise errors[0]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            if len(tasks) > 1 and self.metrics is not None:
                self.metrics.hedged.labels(first).inc()

    # -- changing text -------------------------------------------------------
    def _mask(self, value: str) -> str:
        keep = self.config.mask_keep_last
        alnum = [i for i, c in enumerate(value) if c.isalnum()]
        visible = set(alnum[-keep:]) if keep and len(alnum) > keep else set()
        return "".join(c if (not c.isalnum() or i in visible) else self.config.mask_char for i, c in enumerate(value))

    def _hash(self, entity: str, value: str) -> str:
        digest = hmac.new(self._hash_key, value.encode(), hashlib.sha256).hexdigest()[: self.config.hash_length]
        return f"<{label(entity)}#{digest}>"

    def transform(
        self,
        text: str,
        findings: list[Finding] | tuple[Finding, ...],
        vault: Vault,
        skip: frozenset[str] = frozenset(),
        restorable: bool = True,
    ) -> str:
        """``text`` with each finding replaced as its type's action says (block types are redacted here)."""
        out: list[str] = []
        pos = 0
        for f in sorted(findings, key=lambda f: f.start):
            value = text[f.start:f.end]
            if value in skip:
                continue
            action = self.actions.get(f.type, self.config.action)
            if action == "mask":
                new = self._mask(value)
            elif action == "hash":
                new = self._hash(f.type, value)
            else:
                new = vault.placeholder(f.type, value, restorable)
            out.append(text[pos:f.start])
            out.append(new)
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def _count(self, ctx: Context, key: str, found: list[tuple[Finding, ...]], where: str, skip: frozenset[str] = frozenset(), texts: list[str] | None = None) -> Counter[str]:
        counts: Counter[str] = Counter()
        for i, fs in enumerate(found):
            for f in fs:
                if skip and texts is not None and texts[i][f.start:f.end] in skip:
                    continue
                counts[f.type] += 1
        if counts:
            ann = ctx.annotations.setdefault(key, {})
            for k, n in counts.items():
                ann[k] = ann.get(k, 0) + n
            if self.metrics is not None:
                for k, n in counts.items():
                    self.metrics.findings.labels(k, where).inc(n)
        return counts

    # -- hooks ---------------------------------------------------------------
    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered or not ctx.body_is_json:
            return
        body = ctx.body
        kind = endpoint_kind(ctx.path, body)
        if self.config.scan_answers and self.config.answer_logprobs != "allow":
            self._answer_logprobs(ctx, kind, body)
        slots = list(request_slots(kind, body))
        if not slots:
            return
        texts = [c[k] for c, k in slots]
        found = await self.find(texts, "request", ctx)
        if found is None:
            ctx.annotations["pii_error"] = "timeout"
            return
        counts = self._count(ctx, "pii", found, "request")
        if not counts:
            return
        blocked = sorted(t for t in counts if self.actions.get(t) == "block")
        if blocked:
            raise ProxyError(
                403,
                f"This request was blocked because it contains personal data ({', '.join(blocked)}).",
                code="pii_detected",
                param="messages" if "messages" in body else None,
                reason="pii_blocked",
            )
        vault = Vault(avoid=texts)
        for (c, k), text, fs in zip(slots, texts, found):
            if fs:
                c[k] = self.transform(text, fs, vault)
        if len(vault):
            ctx.stash[VAULT] = vault
        ctx.body = body

    def _answer_logprobs(self, ctx: Context, kind: str | None, body: Any) -> None:
        """The answer's tokens (their log probabilities, vLLM's token ids) and vLLM's raw Responses messages
        repeat its text where no scan reaches: a request asking for them is refused, or the fields are
        dropped (``answer_logprobs``)."""
        fields = answer_token_fields(kind, body)
        if not fields:
            return
        if self.config.answer_logprobs == "refuse":
            raise ProxyError(
                400,
                f"The answer's tokens and raw messages are not available on this route ('{fields[0]}'): its "
                "personal-data guard scans answers, and these would repeat the answer's text unscanned. Send the "
                "request without them.",
                code="unsupported_parameter",
                param=fields[0],
                reason="pii_logprobs",
            )
        drop_answer_tokens(body, fields)
        ctx.body = body

    def _vault(self, ctx: Context) -> Vault:
        v = ctx.stash.get(VAULT)
        if v is None:
            v = Vault()
            ctx.stash[VAULT] = v
        return v

    async def _screen_answer(self, ctx: Context, texts: list[str]) -> list[str]:
        vault = ctx.stash.get(VAULT)
        if self.config.restore and vault is not None:
            texts = [vault.restore(t) for t in texts]
        if not self.config.scan_answers:
            return texts
        found = await self.find(texts, "answer", ctx)
        if found is None:
            return texts
        # values the client sent itself and got back restored are not a leak
        skip = vault.values if (self.config.restore and vault is not None) else frozenset()
        self._count(ctx, "pii_answer", found, "answer", skip, texts)
        av = self._vault(ctx)
        return [self.transform(t, fs, av, skip, restorable=False) if fs else t for t, fs in zip(texts, found)]

    def _answer_active(self, ctx: Context) -> bool:
        return self.config.scan_answers or (self.config.restore and VAULT in ctx.stash)

    @hookimpl
    async def on_response(self, ctx: Context) -> None:
        resp = ctx.response
        if resp is None or not 200 <= resp.status < 300 or not self._answer_active(ctx):
            return
        body = resp.json
        if not isinstance(body, dict):
            return
        slots = list(answer_slots(endpoint_kind(ctx.path, ctx.json_body), body))
        if not slots:
            return
        texts = [c[k] for c, k in slots]
        new = await self._screen_answer(ctx, texts)
        if new != texts:
            for (c, k), t in zip(slots, new):
                c[k] = t
            resp.set_json(body)

    def _channel(self, ctx: Context, chan: tuple[Any, ...]) -> Channel:
        chans = ctx.stash.get(STREAM)
        if chans is None:
            chans = {}
            ctx.stash[STREAM] = chans
        ch = chans.get(chan)
        if ch is None:
            vault = ctx.stash.get(VAULT)
            restorer = StreamRestorer(vault) if (self.config.restore and vault is not None) else None
            scanner = None
            if self.config.scan_answers:
                skip = vault.values if (self.config.restore and vault is not None) else frozenset()
                engine = self.engine
                assert engine is not None

                async def analyze(text: str) -> list[Finding]:
                    found = await self.find([text], "answer", ctx)
                    return list(found[0]) if found else []

                def transform(text: str, findings: list[Finding]) -> str:
                    if findings:
                        self._count(ctx, "pii_answer", [tuple(findings)], "answer", skip, [text])
                    return self.transform(text, findings, self._vault(ctx), skip, restorable=False)

                scanner = StreamScanner(analyze, transform, engine.triggered, self.grow_limit, self.hold_words)
            ch = chans[chan] = Channel(restorer, scanner)
        return ch

    @hookimpl
    async def on_chunk(self, ctx: Context, event: Event) -> list[Event] | None:
        if not self._answer_active(ctx):
            return None
        data = event.json
        if not isinstance(data, dict):
            return None
        changed = False
        seq = data.get("sequence_number")
        if type(seq) is int:
            shift = ctx.stash.get(SEQ)
            if shift is None:
                shift = ctx.stash[SEQ] = [0, seq]
            elif shift[0]:
                seq = data["sequence_number"] = seq + shift[0]
                changed = True
            shift[1] = seq
        seen: set[tuple[Any, ...]] = set()
        for chan, c, k in stream_slots(data):
            ch = self._channel(ctx, chan)
            piece = c[k]
            new = await ch.feed(piece)
            ch.template = data
            ch.event_name = event.event
            seen.add(chan)
            if new != piece:
                c[k] = new
                changed = True
        if _full_text_event(data):
            changed = await self._screen_done_event(ctx, data) or changed
        before: list[Event] = []
        ends = stream_channel_ends(data)
        chans = ctx.stash.get(STREAM)
        if ends and chans:
            for chan, ch in list(chans.items()):
                if not channel_closed_by(chan, ends):
                    continue
                rest = await ch.flush()
                del chans[chan]
                if not rest:
                    continue
                if chan[0] == "resp":
                    before.append(_event_for(chan, ch, rest))
                else:
                    _attach(data, chan, rest)
                    changed = True
        if before and type(seq) is int:
            # the added events take this one's place in the sequence; it and every later one move up
            for i, ev in enumerate(before):
                ev.json["sequence_number"] = seq + i
            ctx.stash[SEQ][0] += len(before)
            data["sequence_number"] = ctx.stash[SEQ][1] = seq + len(before)
            changed = True
        if changed:
            event.json = data
        if before:
            return [*before, event]
        return None

    async def _screen_done_event(self, ctx: Context, data: dict[str, Any]) -> bool:
        slots = list(_done_slots(data))
        if not slots:
            return False
        texts = [c[k] for c, k in slots]
        new = await self._screen_answer(ctx, texts)
        if new == texts:
            return False
        for (c, k), t in zip(slots, new):
            c[k] = t
        return True

    @hookimpl
    async def on_stream_end(self, ctx: Context) -> list[Event] | None:
        chans = ctx.stash.get(STREAM)
        if not chans:
            return None
        if ctx.outcome == "upstream_error":
            # the upstream broke off (or timed out): what is held could be the start of an entity
            # the stream never finished ("415 555 "); the client gets the error event without it
            chans.clear()
            return None
        out = []
        last = ctx.stash.get(SEQ)
        for chan, ch in list(chans.items()):
            rest = await ch.flush()
            if rest and ch.template is not None:
                ev = _event_for(chan, ch, rest)
                if last is not None and chan[0] == "resp":
                    last[1] += 1
                    ev.json["sequence_number"] = last[1]
                out.append(ev)
        chans.clear()
        return out or None

    # -- commands ------------------------------------------------------------
    @classmethod
    def commands(cls) -> list[Command]:
        from ._pii_eval import configure_eval, run_eval

        return [Command(name="eval pii", help="Measure the pii plugin's precision and recall on a labelled JSONL corpus.", configure=configure_eval, run=run_eval)]


def engine_settings(config: PiiConfig) -> EngineSettings:
    return EngineSettings(
        entities=tuple(config.entities),
        thresholds=dict(config.thresholds),
        min_score=config.min_score,
        allow_list=frozenset(config.allow_list),
        deny_list={k: list(v) for k, v in config.deny_list.items()},
        custom=tuple(
            CustomRecognizer(r.entity, tuple(CustomPattern(p.regex, p.score) for p in r.patterns), tuple(r.context)) for r in config.recognizers
        ),
        ner=config.ner,
        fast_path=config.fast_path,
        window_min_chars=config.window_min_chars,
    )


def _full_text_event(data: dict[str, Any]) -> bool:
    typ = data.get("type")
    return isinstance(typ, str) and typ.startswith("response.") and (typ.endswith(".done") or typ in ("response.completed", "response.incomplete"))


def _done_slots(data: dict[str, Any]) -> Any:
    """Full texts the responses API repeats when a part, an item or the response is done."""
    if isinstance(data.get("text"), str):
        yield data, "text"
    if isinstance(data.get("arguments"), str):
        yield data, "arguments"
    if isinstance(data.get("refusal"), str):
        yield data, "refusal"
    part = data.get("part")
    if isinstance(part, dict):
        for field in ("text", "refusal"):
            if isinstance(part.get(field), str):
                yield part, field
    item = data.get("item")
    if isinstance(item, dict):
        yield from answer_slots("responses", {"output": [item]})
    resp = data.get("response")
    if isinstance(resp, dict):
        yield from answer_slots("responses", resp)


def _attach(data: dict[str, Any], chan: tuple[Any, ...], text: str) -> None:
    """Append flushed text to the chunk that closes its channel, where that channel's text goes."""
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != chan[1]:
            continue
        if chan[0] == "text":
            choice["text"] = (choice.get("text") or "") + text
        else:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if chan[0] in DELTA_TEXT_CHANNELS:
                delta[chan[0]] = (delta.get(chan[0]) or "") + text
            elif chan[0] == "function":
                fc = delta.get("function_call")
                if not isinstance(fc, dict):
                    fc = delta["function_call"] = {}
                fc["arguments"] = (fc.get("arguments") or "") + text
            else:
                calls = delta.setdefault("tool_calls", [])
                for call in calls:
                    if isinstance(call, dict) and call.get("index", 0) == chan[2]:
                        fn = call.setdefault("function", {})
                        fn["arguments"] = (fn.get("arguments") or "") + text
                        break
                else:
                    calls.append({"index": chan[2], "function": {"arguments": text}})
        return


def _event_for(chan: tuple[Any, ...], ch: Channel, text: str) -> Event:
    """An event carrying ``text`` on ``chan``, shaped like that channel's last event (its
    ``event:`` name too; a Responses event's sequence number is the caller's to set)."""
    template = ch.template
    if chan[0] == "resp":
        data = {k: v for k, v in template.items() if k in ("type", "item_id", "output_index", "content_index")}
        data["delta"] = text
        return Event(json=data, event=ch.event_name)
    data = {k: v for k, v in template.items() if k in ("id", "object", "created", "model", "system_fingerprint")}
    choice: dict[str, Any] = {"index": chan[1]}
    if chan[0] == "text":
        choice["text"] = text
    elif chan[0] in DELTA_TEXT_CHANNELS:
        choice["delta"] = {chan[0]: text}
    elif chan[0] == "function":
        choice["delta"] = {"function_call": {"arguments": text}}
    else:
        choice["delta"] = {"tool_calls": [{"index": chan[2], "function": {"arguments": text}}]}
    choice["finish_reason"] = None
    data["choices"] = [choice]
    return Event(json=data, event=ch.event_name)


