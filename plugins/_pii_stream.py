"""Streams: restoring placeholders and scanning the model's words as they arrive.

Each channel (one choice's content, one tool call's arguments, one responses
output part) runs its pieces through a restorer, then through a scanner, and
each holds back only what could still change: an unfinished placeholder, or the
words that could still be the start of an entity.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Iterable

from ._pii_engine import Finding
from ._pii_vault import StreamRestorer

# tokens that can continue a multi-word entity: phone and card groups ("415", "(415)",
# "555-0132", "+44"), IBAN groups ("GB82", "WEST"); runs of them are held together
_GROUPISH = re.compile(r"[A-Z0-9+().\-/]{1,8}")
_GROUP_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+().-/")
_GROUPISH_ANY_CASE = re.compile(r"[A-Za-z0-9+().\-/]{1,8}")
# an IBAN written in lower or mixed case ("gb82 west 1234"), up to the end of a run of groups:
# its country code and check digits begin a run that short lower-case words otherwise end
_LOWER_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}[A-Za-z0-9]{0,4}(?:\s+[A-Za-z0-9]{1,8}){0,9}\Z")
_LOWER_IBAN_REACH = 96
_MAX_GROUPS = 10
# text already released that the analyzer still sees, for context words and look-behinds
CONTEXT_CHARS = 200

Analyze = Callable[[str], Awaitable[list[Finding]]]
Transform = Callable[[str, list[Finding]], str]
Triggered = Callable[[str], bool]


#: How far back, in characters, a text can still grow into an entity of each type: the
#: longest span such an entity can have before its last character arrives. A run without
#: whitespace longer than this is released except for its last ``limit`` characters: an
#: entity that already matches is held whole by the analyzer (its start moves the cut back),
#: and one that does not match yet is shorter than this. Addresses are the long ones: an
#: e-mail is at most 254 characters, a host name 253.
MAX_SPAN = {
    "EMAIL_ADDRESS": 320,
    "URL": 320,
    "PHONE_NUMBER": 72,
    "CREDIT_CARD": 40,
    "US_SSN": 16,
    "IBAN_CODE": 48,
    "IP_ADDRESS": 64,
    "CRYPTO": 96,
    "MAC_ADDRESS": 24,
}
#: a long word is released in steps of at least this many characters (each release of a
#: text that could hold an entity costs an analysis; a base64 blob streams 2-4 characters a token)
RELEASE_STEP = 64
#: types whose extent nothing bounds (NER, custom patterns): a generous default
DEFAULT_SPAN = 320
CUSTOM_SPAN = 1024


def grow_limit(entities: Iterable[str], deny_words: Iterable[str] = (), custom: bool = False) -> int:
    """The hold-back bound of a scanner looking for ``entities`` (and deny-list words, custom patterns)."""
    spans = [MAX_SPAN.get(e, DEFAULT_SPAN) for e in entities]
    spans += [len(w) + 1 for w in deny_words]
    if custom:
        spans.append(CUSTOM_SPAN)
    return max(spans, default=DEFAULT_SPAN)


#: a place or a name NER finds may be this many words long ("Rio de Janeiro", "Mary Ann Smith")
NER_WORDS = 4
#: words a custom pattern is taken to span at most, when its regex does not bound them
MAX_PATTERN_WORDS = 8


def hold_words(deny_phrases: Iterable[str] = (), ner: bool = False, patterns: Iterable[str] = ()) -> int:
    """How many whole words before the last one a scanner holds: an entity of several words
    (a deny-list phrase, a name, a custom pattern with spaces) is whole in what it analyses."""
    most = max((len(p.split()) for p in deny_phrases), default=1)
    if ner:
        most = max(most, NER_WORDS)
    for p in patterns:
        most = max(most, 1 + _spaces_in(p))
    return min(most, 1 + MAX_PATTERN_WORDS) - 1


def _spaces_in(pattern: str) -> int:
    """The most whitespace characters a match of ``pattern`` can hold, up to ``MAX_PATTERN_WORDS``."""
    try:
        from re import _parser as parser  # type: ignore[attr-defined]

        tree = parser.parse(pattern)
    except Exception:  # an invalid pattern is refused elsewhere; here it only means "unbounded"
        return MAX_PATTERN_WORDS
    return min(_tree_spaces(tree), MAX_PATTERN_WORDS)


_WHITESPACE = tuple(i for i in range(0x3001) if chr(i).isspace())


def _tree_spaces(items: Any) -> int:
    from re import _constants as c  # type: ignore[attr-defined]

    total = 0
    for op, av in items:
        if op is c.LITERAL:
            total += chr(av).isspace()
        elif op in (c.ANY, c.NOT_LITERAL):
            total += 1
        elif op is c.IN:
            total += any(o is c.NEGATE or (o is c.LITERAL and chr(a).isspace())
                         or (o is c.RANGE and any(a[0] <= w <= a[1] for w in _WHITESPACE))
                         or (o is c.CATEGORY and a not in (c.CATEGORY_DIGIT, c.CATEGORY_WORD, c.CATEGORY_NOT_SPACE))
                         for o, a in av)
        elif op is c.CATEGORY:
            total += av not in (c.CATEGORY_DIGIT, c.CATEGORY_WORD, c.CATEGORY_NOT_SPACE)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            inner = _tree_spaces(sub)
            total += inner * min(hi, MAX_PATTERN_WORDS) if inner else 0
        elif op is c.SUBPATTERN:
            total += _tree_spaces(av[-1])
        elif op is c.BRANCH:
            total += max((_tree_spaces(b) for b in av[1]), default=0)
        elif op is getattr(c, "ATOMIC_GROUP", None):
            total += _tree_spaces(av)
        if total >= MAX_PATTERN_WORDS:
            return MAX_PATTERN_WORDS
    return total


def hold_from(text: str, limit: int = DEFAULT_SPAN, words: int = 0) -> int:
    """Where the part of ``text`` that could still grow into an entity begins.

    The last word could still become an address or a number; before it, a run of
    short number-like groups could be the first half of a phone, card or IBAN (an IBAN
    in lower case too: "gb82 west 1234"), and so could a number glued to the word
    before it ("tel:415 555"). ``words`` more whole words are held for entities of
    several words (a deny-list phrase, a place NER finds). No entity is longer than
    ``limit``, so nothing before the last ``limit`` characters is held, however long
    the last word (a URL, a base64 blob).
    """
    n = len(text)
    floor = n - limit if n > limit else 0
    i = n
    while i > floor and not text[i - 1].isspace():
        i -= 1
    last = i
    groups = 0
    while groups < _MAX_GROUPS and i > floor:
        k, j = _word_before(text, i, floor)
        if k == j:
            break
        if not _GROUPISH.fullmatch(text, k, j):
            i = _glued_start(text, k, j, i)
            if _GROUPISH_ANY_CASE.fullmatch(text, k, j):
                m = _LOWER_IBAN.search(text, max(floor, k - _LOWER_IBAN_REACH), j)
                if m is not None:
                    i = min(i, m.start())
            break
        i = k
        groups += 1
    if words:
        w = last
        for _ in range(words):
            k, j = _word_before(text, w, floor)
            if k == j:
                break
            w = k
        i = min(i, w)
    return i


def _word_before(text: str, i: int, floor: int) -> tuple[int, int]:
    """The word that ends before ``i`` (whitespace skipped), as (start, end); equal when none."""
    j = i
    while j > floor and text[j - 1].isspace():
        j -= 1
    k = j
    while k > floor and not text[k - 1].isspace():
        k -= 1
    return k, j


def _glued_start(text: str, k: int, j: int, i: int) -> int:
    """For the word ``text[k:j]`` that ends a run of groups: where a number glued to what
    precedes it begins ("tel:415", "U8857)415": its last few group characters), else ``i``."""
    t = j
    while t > k and j - t < 8 and text[t - 1] in _GROUP_CHARS:
        t -= 1
    if t < j and any(c.isdigit() for c in text[t:j]):
        return t
    return i


class StreamScanner:
    """Finds entities in a text that arrives in pieces, releasing only what cannot grow into one.

    ``pending`` is what was received and not yet released; ``context`` the last released
    characters, which the analyzer sees again for context words and look-behinds.
    """

    __slots__ = ("pending", "context", "limit", "words", "_analyze", "_transform", "_triggered", "_split", "_stuck")

    def __init__(self, analyze: Analyze, transform: Transform, triggered: Triggered, limit: int = DEFAULT_SPAN, words: int = 0) -> None:
        self.pending = ""
        self.context = ""
        self.limit = limit
        #: whole words held before the last one (see :func:`hold_words`)
        self.words = words
        self._analyze = analyze
        self._transform = transform
        self._triggered = triggered
        # the last release cut a word in two: a trigger may straddle the cut
        self._split = False
        # length of ``pending`` when an entity reaching its end held everything back: that
        # entity is still growing, so pieces without whitespace are not analysed again
        # until ``limit`` more characters came (a long URL costs a few analyses, not one a token)
        self._stuck = -1

    async def _release(self, cut: int) -> str:
        text = self.pending
        if not self._triggered(self.context + text if self._split else text):
            out = text[:cut]
        else:
            base = len(self.context)
            found = await self._analyze(self.context + text)
            spans = [Finding(f.type, f.start - base, f.end - base, f.score) for f in found if f.end > base]
            for f in spans:
                if f.start < cut < f.end:
                    cut = max(0, f.start)
            if cut == 0:
                self._stuck = len(text)
                return ""
            # an entity that began in released text (longer than the hold) is redacted from the cut on
            keep = [Finding(f.type, max(0, f.start), f.end, f.score) for f in spans if f.end <= cut]
            out = self._transform(text[:cut], keep)
        self._stuck = -1
        self._split = not text[cut - 1].isspace() and cut < len(text) and not text[cut].isspace()
        self.context = (self.context + text[:cut])[-CONTEXT_CHARS:]
        self.pending = text[cut:]
        return out

    async def feed(self, piece: str) -> str:
        self.pending += piece
        if self._stuck >= 0 and len(self.pending) - self._stuck < self.limit and not any(c.isspace() for c in piece):
            return ""
        text = self.pending
        cut = hold_from(text, self.limit, self.words)
        if cut == 0:
            return ""
        if cut < RELEASE_STEP and not text[cut - 1].isspace() and not text[cut].isspace():
            # inside a long word: release it in steps, one analysis per step rather than per token
            return ""
        return await self._release(cut)

    async def flush(self) -> str:
        if not self.pending:
            return ""
        self._stuck = -1
        return await self._release(len(self.pending))


class Channel:
    """One growing text of a stream: restorer first (the model writes placeholders), then scanner."""

    __slots__ = ("restorer", "scanner", "template", "event_name")

    def __init__(self, restorer: StreamRestorer | None, scanner: StreamScanner | None) -> None:
        self.restorer = restorer
        self.scanner = scanner
        #: the last event of this channel (its data and ``event:`` name), to shape an event for
        #: what is flushed at the end
        self.template: Any = None
        self.event_name: str | None = None

    async def feed(self, piece: str) -> str:
        if self.restorer is not None:
            piece = self.restorer.feed(piece)
        if self.scanner is not None:
            piece = await self.scanner.feed(piece)
        return piece

    async def flush(self) -> str:
        out = ""
        if self.restorer is not None:
            out = self.restorer.flush()
        if self.scanner is not None:
            if out:
                out = await self.scanner.feed(out)
            out += await self.scanner.flush()
        return out

    @property
    def holding(self) -> bool:
        return bool((self.restorer is not None and self.restorer.held) or (self.scanner is not None and self.scanner.pending))
