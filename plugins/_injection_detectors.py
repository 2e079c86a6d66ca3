"""The detector interface of the injection plugin, and the built-in signature detector.

A detector looks at one text and says how likely it is to be an injection.
Another detector (a local classifier, a vendor's model, a stricter rule set)
plugs in without touching the plugin: name it in the config as
``detectors: [{use: NAME_OR_PATH, weight: ..., options: {...}}]`` where
``use`` is a name registered in the ``sluice.injection_detectors`` entry point
group, or an import path ``package.module:ClassName``. Scores of all detectors
are combined by the plugin (``combine: noisy_or | max | mean``).
"""

from __future__ import annotations

import abc
import importlib
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from itertools import chain, repeat
from typing import AbstractSet, Any, ClassVar, Iterable, Literal, Mapping

from . import _injection_normalize as norm
from ._injection_prefilter import Prefilter
from ._injection_signatures import BY_ID, COMPACT, OBFUSCATION_WEIGHTS, SIGNATURES, VERSION, Signature

#: where a text came from: the user, a tool result or retrieved document (indirect), a raw prompt
Source = Literal["user", "tool", "system", "assistant", "prompt"]
INDIRECT_SOURCES = frozenset({"tool"})
ENTRY_POINT_GROUP = "sluice.injection_detectors"


@dataclass(frozen=True, slots=True)
class Detection:
    """What one detector found in one text. Never holds the text itself.

    ``score`` is in [0, 1]; ``categories`` maps each category found to its own
    score; ``signals`` are stable identifiers (signature ids, feature names) for
    logs and the evaluation report.
    """

    score: float
    categories: Mapping[str, float] = field(default_factory=dict)
    signals: tuple[str, ...] = ()


NOTHING = Detection(0.0)


class Detector(abc.ABC):
    """Scores one text for prompt injection.

    Subclasses set ``name`` and implement :meth:`detect`. ``options`` is the
    ``options`` mapping of the detector's config entry; validate it in
    ``__init__`` and raise ``ValueError`` with a clear message (it becomes a
    config error naming the plugin). Load models in :meth:`start`, never at import.

    ``blocking = True`` marks a detector too slow for the event loop (a model):
    the plugin then runs it through the runtime's bounded executor. ``detect``
    must then be thread-safe.
    """

    name: ClassVar[str] = ""
    blocking: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @property
    def version(self) -> str:
        """Identifies the detector's behaviour (model or rule-set version), for reports and caches."""
        return "0"

    def start(self) -> None:
        """Load what the detector needs (models, files). Runs once per config load, off the request path."""

    def stop(self) -> None:
        """Release what :meth:`start` loaded."""

    @abc.abstractmethod
    def detect(self, text: str, source: Source) -> Detection:
        """Score ``text`` (raw, as the client sent it) coming from ``source``."""


def noisy_or(weights: Iterable[float]) -> float:
    keep = 1.0
    for w in weights:
        keep *= 1.0 - min(max(w, 0.0), 1.0)
    return 1.0 - keep


def _or2(a: float, b: float) -> float:
    """``noisy_or((a, b))``, the same float, without the loop (1.0 * x is x)."""
    return 1.0 - (1.0 - min(max(a, 0.0), 1.0)) * (1.0 - min(max(b, 0.0), 1.0))


# Discussion about injections (quoted attack strings in a question about them) is not an attack.
_META = re.compile(
    r"\b(?:prompt injections?|injection attacks?|jailbreak (?:attempts?|attacks?|prompts?|examples?|techniques?)|"
    r"red[- ]team(?:ing|ers?)?|(?:detect|classify|flag|block|filter)(?:s|ing|ion|or)?\b[^\n]{0,40}?\b(?:injections?|jailbreaks?|attacks?)|"
    r"examples? of (?:an? )?(?:attacks?|injections?|jailbreaks?)|such as|phrases? like)\b"
)
_QUOTES = "\"'“”‘’`«»"
_CATEGORY = {sig_id: sig.category for sig_id, sig in BY_ID.items()}
_WINDOW = 320
_WHOLE_TEXT = 4 * _WINDOW
_ALNUM = re.compile("[a-z0-9]+")
# Signatures whose expressions run for nothing in long documents: on the corpus' 12 benign
# documents of 300 words or more, plain and with each of the corpus' attacks in the middle of one
# (190 texts), those tried and failing at 8 of the texts or more; most are led by everyday words
# ("when", "if", "show", "print", "system", "your", "do"), tried at each of their occurrences.
# A text where the first elements of such a signature's expression occur nowhere skips it (see
# _injection_prefilter). Any signature could be listed without changing a result; looking for a
# prefix costs every text that gets that far.
_PREFILTERED = frozenset({
    "IN-002", "DL-008", "EX-006", "SP-003", "SP-013", "DL-007", "IO-016", "IO-005", "SP-012", "IN-001", "SP-002",
    "JB-014", "SP-001", "JB-010", "IO-007", "IO-014", "JB-004", "SP-014", "SP-007", "IO-013", "IO-012", "IO-006",
    "IO-009", "JB-003", "IO-002", "JB-012", "JB-016", "EX-003", "IO-003", "JB-005",
})


class SignatureDetector(Detector):
    """The built-in layered detector: normalisation, then anchored signatures, then heuristics.

    Options: ``disable`` (signature ids to skip), ``max_decode_depth`` (how many
    nested encodings to undo, 0-3).
    """

    name = "signatures"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        disable = set(options.get("disable", ()))
        unknown = disable - set(BY_ID)
        if unknown:
            raise ValueError(f"unknown signature ids: {', '.join(sorted(unknown))}")
        unexpected = set(options) - {"disable", "max_decode_depth"}
        if unexpected:
            raise ValueError(f"unknown options: {', '.join(sorted(unexpected))}")
        self.max_depth = int(options.get("max_decode_depth", 2))
        if not 0 <= self.max_depth <= 3:
            raise ValueError("max_decode_depth must be between 0 and 3")
        self.signatures = tuple(s for s in SIGNATURES if s.id not in disable)
        self._compact = tuple(s for s in COMPACT if s.id not in disable)
        by_anchor: dict[str, list[Signature]] = {}
        for sig in self.signatures:
            for a in (sig.anchors[0] if sig.anchors else ()):
                by_anchor.setdefault(a, []).append(sig)
        self._by_anchor = {a: tuple(v) for a, v in by_anchor.items()}
        # what the scan needs of each signature, unpacked once: (id, signature, weight in a tool
        # result, weight in a user's text, indirect only, literals, other anchor groups, needs, lead,
        # whether the lead words' offsets from the vocabulary scan can stand in for ``_lead_re``:
        # the expression starts with \b and the lead words are letters and digits)
        self._rec = {
            sig.id: (
                sig.id, sig, sig.weight, sig.weight if sig.user_weight is None else sig.user_weight,
                sig.scope == "indirect", frozenset(sig.literals), sig.anchors[1:], sig.needs, sig.lead,
                sig.pattern.pattern.startswith("\\b") and all(_ALNUM.fullmatch(w) for w in sig.lead),
            )
            for sig in self.signatures
        }
        # anchor word -> the ids of the signatures it brings in (a set union of these, in C, gives
        # the candidates); the signatures with an anchor that is also one of their literals
        self._sids = {a: tuple(sig.id for sig in v) for a, v in by_anchor.items()}
        self._anchor_literals = {
            sig.id: lits for sig in self.signatures if sig.anchors and (lits := sig.anchors[0].intersection(sig.literals))
        }
        self._anchors = frozenset(by_anchor)
        self._literals = tuple((lit, sig) for sig in self.signatures for lit in sig.literals)
        literal_set = sorted({lit for lit, _ in self._literals}, key=lambda x: (-len(x), x))
        # one alternation of literals: every branch starts with a literal character, so the
        # regex engine skips ahead on the set of first characters instead of trying each offset
        self._literal_re = re.compile("|".join(map(re.escape, literal_set))) if literal_set else None
        self._literal_first = sorted({lit[0] for lit in literal_set})
        self._literal_prefix = {lit: [l2 for l2 in literal_set if l2.startswith(lit)] for lit in literal_set}
        # a literal search (no leading \b) takes the regex engine's fast substring path; the
        # trailing \b keeps that path and drops the lead inside longer words ("if" in "specific")
        self._lead_re = {w: re.compile(re.escape(w) + (r"\b" if w[-1:].isalnum() else "")) for sig in self.signatures for w in sig.lead}
        # a view's ASCII stand-in gives the offsets of ``word\b`` for ASCII words of letters and digits
        self._stand_in = all(_ALNUM.fullmatch(w) for w in self._lead_re)
        # every word the scan asks about, found as whole words in one pass (see norm.Vocabulary)
        words = set(norm.SCAN_WORDS)
        for sig in self.signatures:
            words.update(sig.lead)
            for g in sig.anchors:
                words.update(g)
        self._vocab = norm.Vocabulary(words)
        # the listed signatures' prefixes, and the punctuation every signature needs, looked for
        # in one pass over a text once a signature gets that far
        listed = {sig.id: sig.pattern for sig in self.signatures if sig.id in _PREFILTERED}
        self._prefilter = Prefilter(listed, {x for sig in self.signatures for x in sig.needs})
        self._prefiltered = frozenset(listed)
        norm.composing()  # built now, off the request path
        self._version = f"{VERSION}-{'-'.join(sorted(disable))}" if disable else VERSION

    @property
    def version(self) -> str:
        return self._version

    # -- scanning ---------------------------------------------------------------------
    def detect(self, text: str, source: Source) -> Detection:
        hits: dict[str, float] = {}
        tricks: set[str] = set()
        quoted: set[str] = set()
        self._scan(text, source, hits, tricks, quoted, depth=0)
        if not hits and not tricks & {"tags"}:
            return NOTHING
        # Every walk below is in sorted order: sets iterate in an order that follows the process's
        # hash seed, and a float product's last bit follows the order of its factors, so unsorted
        # the same text could score 0.9863 in one process and 0.9864 in another.
        weights = dict(sorted(hits.items()))
        if quoted:
            # several signatures matching one quoted example are one piece of evidence, not several
            top = max(sorted(quoted), key=lambda k: weights[k])
            for k in quoted - {top}:
                weights[k] = 0.0
        categories: dict[str, float] = {}
        for sig_id, w in weights.items():
            cat = _CATEGORY[sig_id]
            categories[cat] = _or2(categories.get(cat, 0.0), w)
        if tricks and (hits or "tags" in tricks):
            # Obfuscation alone is not an injection (invisible characters appear in real text), but
            # hiding a phrase that already looks like one makes it far more likely to be one.
            for t in sorted(tricks):
                w = OBFUSCATION_WEIGHTS.get(t, 0.2)
                weights[f"obf:{t}"] = w
                categories["obfuscation"] = _or2(categories.get("obfuscation", 0.0), w)
        score = noisy_or(sorted(weights.values()))
        return Detection(round(score, 4), {k: round(v, 4) for k, v in categories.items()}, tuple(sorted(weights)))

    def _scan(self, raw: str, source: Source, hits: dict[str, float], tricks: set[str], quoted: set[str], depth: int) -> None:
        n = norm.normalise(raw)
        tricks |= n.tricks
        indirect = source in INDIRECT_SOURCES
        v, lv, leet_tokens = self._vocab.views(n.text, n.utf8, n.chars)
        tokens = v.words  # a frozenset: set operations with a set iterate the smaller side
        self._match_view(v, tokens, indirect, hits, quoted)
        found_plain = bool(hits)

        if lv is not None:
            # the leetspeak view's tokens are the plain ones and what the words mixing letters
            # with leetspeak characters read as; it is scanned if that adds an anchor
            if not self._anchors.isdisjoint(leet_tokens.difference(tokens)):
                before = len(hits)
                self._match_view(lv, leet_tokens, indirect, hits, quoted)
                if len(hits) > before:
                    tricks.add("leet")
        if norm.has_single_letter_runs(tokens):
            spaced = norm.despace(n.text)
            if spaced is not None:
                joined, runs = spaced
                before = len(hits)
                jv = self._vocab.view(joined)
                self._match_view(jv, jv.words, indirect, hits, quoted)
                for run in runs:
                    for sig in self._compact:
                        if sig.weight > hits.get(sig.id, 0.0) and sig.pattern.search(run):
                            hits[sig.id] = sig.weight
                if len(hits) > before:
                    tricks.add("spaced")
        if depth >= self.max_depth:
            return
        if n.smuggled:
            before = len(hits)
            self._scan(n.smuggled, source, hits, tricks, quoted, depth + 1)
            if len(hits) > before:
                tricks.add("smuggled")
        if v.long_word() or (len(raw) >= 16 and v.empty):
            for encoding, decoded in norm.decode_payloads(raw):
                before = len(hits)
                self._scan(decoded, source, hits, tricks, quoted, depth + 1)
                if len(hits) > before:
                    tricks.add(encoding)
        if "rot13" in tokens or "rot" in tokens or "caesar" in tokens or (not found_plain and len(raw) <= 600 and not v.empty):
            # Without a cue, rot13 is only tried on short texts: a long document is not rot13.
            before = len(hits)
            rv = self._vocab.view(norm.rot13(n.text))
            self._match_view(rv, rv.words, indirect, hits, quoted)
            if not raw.isascii() and norm.has_latin_marks(raw):
                # the rotation of a folded text turned a rotated "précédentes"'s é (rot13 leaves it) into an r:
                # that text is rotated before it is folded too
                rv = self._vocab.view(norm.normalise(norm.rot13(raw)).text)
                self._match_view(rv, rv.words, indirect, hits, quoted)
            if len(hits) > before:
                tricks.add("rot13")

    def _match_view(
        self, view: norm.View, tokens: AbstractSet[str], indirect: bool, hits: dict[str, float], quoted: set[str]
    ) -> None:
        """Match the signatures on ``view.text``, whose tokens (as far as the vocabulary goes) are ``tokens`` (a set)."""
        text = view.text
        # the signatures an anchor brings in, and those a literal does (which need no other
        # anchor group; with the literals, near which to look in a long text)
        present = self._anchors.intersection(tokens)
        candidates: set[str] = set().union(*map(self._sids.__getitem__, present))
        by_literal_near: dict[str, list[str]] = {}
        if self._literal_re is not None:
            lits: set[str] | None = None
            for c in self._literal_first:
                if c in text:
                    lits = set(self._literal_re.findall(text))
                    break
            if lits:
                for lit, sig in self._literals:
                    if lit in lits or any(longer in lits for longer in self._literal_prefix[lit]):
                        candidates.add(sig.id)
                        by_literal_near.setdefault(sig.id, []).append(lit)
        if not candidates:
            return
        whole = len(text) <= _WHOLE_TEXT
        meta: bool | None = None
        # where each lead word occurs: the view's offsets of the word when they are exactly the
        # matches of \bword\b, else (and for expressions that do not start with \b) _lead_re
        by_view = view.at if view.exact else None
        positions: dict[str, list[int]] = {}
        starts_for: dict[tuple[AbstractSet[str], bool], list[int]] = {}
        search_text: str | None = None
        lead_re = self._lead_re
        rec_of = self._rec
        anchor_literals = self._anchor_literals
        disjoint = tokens.isdisjoint
        prefiltered = self._prefiltered
        # the listed signatures whose prefix occurs in the text, and the needles it holds (one
        # pass, once a signature needs either)
        seen: frozenset[str] | None = None
        for sid in candidates:
            _, sig, w_tool, w_user, only_indirect, _lits, rest, needs, lead, bounded = rec_of[sid]
            weight = w_tool if indirect else w_user
            if hits.get(sid, 0.0) >= weight:
                continue
            if only_indirect and not indirect:
                continue
            # another anchor group that the text lacks, unless a literal brought the signature in
            if rest and any(map(disjoint, rest)) and not (
                sid in by_literal_near or (sid in anchor_literals and not anchor_literals[sid].isdisjoint(present))
            ):
                continue
            listed = sid in prefiltered
            if listed or needs:
                if seen is None:
                    seen = self._prefilter.matching(view.utf8())
                if listed and sid not in seen:
                    continue  # the first elements of its expression occur nowhere in the text
                if needs and seen.isdisjoint(needs):
                    continue  # none of the punctuation it needs
            m = None
            if lead:
                # the earliest match in the text, whichever lead word it starts with (the order of
                # a set of words depends on the process's hash seed, and so did the match taken);
                # signatures whose lead words in the text are the same share the offsets
                ws = lead.intersection(tokens)
                starts = starts_for.get((ws, bounded))
                if starts is None:
                    lists = []
                    for word in ws:
                        at = by_view(word) if bounded and by_view is not None else None
                        if at is None:
                            at = positions.get(word)
                            if at is None:
                                if search_text is None:
                                    # the same offsets as in ``text``; ASCII where it can be
                                    search_text = view.search_text() if self._stand_in else text
                                at = positions[word] = [p.start() for p in lead_re[word].finditer(search_text)]
                        lists.append(at)
                    starts = starts_for[ws, bounded] = lists[0] if len(lists) == 1 else sorted(chain.from_iterable(lists))
                if starts:
                    # the first match at these offsets, the loop in C (map and filter are lazy)
                    m = next(filter(None, map(sig.pattern.match, repeat(text), starts)), None)
                w = text
            else:
                if whole:
                    near: list[str] = []
                else:
                    # the anchors of the first group that the text holds, and the literals found
                    near = [a for a in present if a in sig.anchors[0]] if sig.anchors else []
                    near += by_literal_near.get(sid, ())
                for w in ([text] if whole else _windows(text, near)):
                    m = sig.pattern.search(w)
                    if m is not None:
                        break
            if m is None:
                continue
            damped = False
            if _quoted(w, m.start(), m.end()):
                if meta is None:
                    meta = _META.search(text) is not None
                if meta:
                    weight *= 0.4
                    damped = True
            if weight > hits.get(sid, 0.0):
                hits[sid] = weight
                if damped:
                    quoted.add(sid)
                else:
                    quoted.discard(sid)


_QUOTE_SET = frozenset(_QUOTES)


def _quoted(text: str, start: int, end: int) -> bool:
    return not _QUOTE_SET.isdisjoint(text[max(0, start - 3):start]) and not _QUOTE_SET.isdisjoint(text[end:end + 40])


def _windows(text: str, anchors: list[str]) -> list[str]:
    """Merged slices of ``text`` around every occurrence of an anchor."""
    spans: list[tuple[int, int]] = []
    for a in anchors:
        i = text.find(a)
        while i != -1:
            spans.append((max(0, i - _WINDOW), i + len(a) + _WINDOW))
            i = text.find(a, i + len(a))
    if not spans:
        return []
    spans.sort()
    merged = [list(spans[0])]
    for s, e in spans[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [text[s:e] for s, e in merged]


def load_detector(use: str, options: Mapping[str, Any]) -> Detector:
    """Build a detector from a registered name or a ``module:Class`` import path."""
    if use == SignatureDetector.name:
        cls: Any = SignatureDetector
    elif ":" in use:
        module, _, attr = use.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import detector {use!r}: {type(e).__name__}: {e}") from None
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
        if not found:
            known = sorted({SignatureDetector.name, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
            raise ValueError(f"unknown detector {use!r} (known: {', '.join(known)}; or give 'module:Class')")
        cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise ValueError(f"detector {use!r} is not a subclass of plugins._injection_detectors.Detector")
    return cls(options)
