"""Streams: restoring placeholders and scanning the model's words as they arrive.

Each channel (one choice's content, one tool call's arguments, one responses
output part) runs its pieces through a restorer, then through a scanner, and
each holds back only what could still change: an unfinished placeholder, or the
words that could still be the start of an entity.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from ._pii_engine import Finding
from ._pii_vault import StreamRestorer

# tokens that can continue a multi-word entity: phone and card groups ("415", "(415)",
# "555-0132", "+44"), IBAN groups ("GB82", "WEST"); runs of them are held together
_GROUPISH = re.compile(r"[A-Z0-9+().\-/]{1,8}")
_MAX_GROUPS = 10
# text already released that the analyzer still sees, for context words and look-behinds
CONTEXT_CHARS = 200

Analyze = Callable[[str], Awaitable[list[Finding]]]
Transform = Callable[[str, list[Finding]], str]
Triggered = Callable[[str], bool]


def hold_from(text: str) -> int:
    """Where the part of ``text`` that could still grow into an entity begins.

    The last word could still become an address or a number; before it, a run of
    short number-like groups could be the first half of a phone, card or IBAN.
    """
    n = len(text)
    i = n
    if i and not text[i - 1].isspace():
        while i and not text[i - 1].isspace():
            i -= 1
    groups = 0
    while groups < _MAX_GROUPS:
        j = i
        while j and text[j - 1].isspace():
            j -= 1
        k = j
        while k and not text[k - 1].isspace():
            k -= 1
        if k == j or not _GROUPISH.fullmatch(text, k, j):
            break
        i = k
        groups += 1
    return i


class StreamScanner:
    """Finds entities in a text that arrives in pieces, releasing only what cannot grow into one."""

    __slots__ = ("pending", "context", "_analyze", "_transform", "_triggered")

    def __init__(self, analyze: Analyze, transform: Transform, triggered: Triggered) -> None:
        self.pending = ""
        self.context = ""
        self._analyze = analyze
        self._transform = transform
        self._triggered = triggered

    async def _release(self, cut: int) -> str:
        text = self.pending
        if not self._triggered(text):
            out = text[:cut]
        else:
            base = len(self.context)
            found = await self._analyze(self.context + text)
            spans = [Finding(f.type, f.start - base, f.end - base, f.score) for f in found if f.end > base]
            for f in spans:
                if f.start < cut < f.end:
                    cut = max(0, f.start)
            keep = [f for f in spans if f.start >= 0 and f.end <= cut]
            out = self._transform(text[:cut], keep)
        self.context = (self.context + text[:cut])[-CONTEXT_CHARS:]
        self.pending = text[cut:]
        return out

    async def feed(self, piece: str) -> str:
        self.pending += piece
        cut = hold_from(self.pending)
        if cut == 0:
            return ""
        return await self._release(cut)

    async def flush(self) -> str:
        if not self.pending:
            return ""
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
