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
_GROUP_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+().-/")
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


def hold_from(text: str, limit: int = DEFAULT_SPAN) -> int:
    """Where the part of ``text`` that could still grow into an entity begins.

    The last word could still become an address or a number; before it, a run of
    short number-like groups could be the first half of a phone, card or IBAN, and
    so could a number glued to the word before it ("tel:415 555"). No
    entity is longer than ``limit``, so nothing before the last ``limit`` characters
    is held, however long the last word (a URL, a base64 blob).
    """
    n = len(text)
    floor = n - limit if n > limit else 0
    i = n
    while i > floor and not text[i - 1].isspace():
        i -= 1
    groups = 0
    while groups < _MAX_GROUPS and i > floor:
        j = i
        while j > floor and text[j - 1].isspace():
            j -= 1
        k = j
        while k > floor and not text[k - 1].isspace():
            k -= 1
        if k == j:
            break
        if not _GROUPISH.fullmatch(text, k, j):
            # a number glued to what precedes it ("tel:415", "U8857)415") may begin an entity:
            # its last few group characters are held too
            t = j
            while t > k and j - t < 8 and text[t - 1] in _GROUP_CHARS:
                t -= 1
            if t < j and any(c.isdigit() for c in text[t:j]):
                i = t
            break
        i = k
        groups += 1
    return i


class StreamScanner:
    """Finds entities in a text that arrives in pieces, releasing only what cannot grow into one.

    ``pending`` is what was received and not yet released; ``context`` the last released
    characters, which the analyzer sees again for context words and look-behinds.
    """

    __slots__ = ("pending", "context", "limit", "_analyze", "_transform", "_triggered", "_split", "_stuck")

    def __init__(self, analyze: Analyze, transform: Transform, triggered: Triggered, limit: int = DEFAULT_SPAN) -> None:
        self.pending = ""
        self.context = ""
        self.limit = limit
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
        cut = hold_from(text, self.limit)
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

    __slots__ = ("restorer", "scanner", "template")

    def __init__(self, restorer: StreamRestorer | None, scanner: StreamScanner | None) -> None:
        self.restorer = restorer
        self.scanner = scanner
        #: the last event of this channel, to shape an event for what is flushed at the end
        self.template: Any = None

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
