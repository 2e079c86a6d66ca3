"""Typed placeholders for one request, and putting the values back in answers.

The vault is per request (it lives in ``ctx.stash``): the same value always gets
the same placeholder within a request, and ``<EMAIL_1>`` in one request means
nothing in another.
"""

from __future__ import annotations

import re
from typing import Iterable

#: short labels for placeholders; other types use their own name
LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP",
}
PLACEHOLDER_RE = re.compile(r"<([A-Z][A-Z0-9_]*?)_([1-9][0-9]*)>")


def label(entity: str) -> str:
    return LABELS.get(entity, entity)


class Vault:
    """Value <-> placeholder for one request."""

    __slots__ = ("_by_value", "_by_placeholder", "_counts", "_avoid", "_prefixes", "_restorable")

    def __init__(self, avoid: Iterable[str] = ()) -> None:
        self._by_value: dict[str, str] = {}
        self._by_placeholder: dict[str, str] = {}
        # placeholders made for what the model wrote: numbered in the same series, never restored
        self._restorable: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        # texts of the request: a placeholder that already occurs in them literally is skipped,
        # or restoring would turn the client's own "<EMAIL_1>" into someone's address
        self._avoid = tuple(avoid)
        self._prefixes: frozenset[str] | None = None

    def placeholder(self, entity: str, value: str, restorable: bool = True) -> str:
        """The placeholder of ``value``, made on first sight; ``restorable=False`` for values found in answers."""
        ph = self._by_value.get(value)
        if ph is not None:
            return ph
        lab = label(entity)
        n = self._counts.get(lab, 0)
        while True:
            n += 1
            ph = f"<{lab}_{n}>"
            if not any(ph in t for t in self._avoid):
                break
        self._counts[lab] = n
        self._by_value[value] = ph
        self._by_placeholder[ph] = value
        if restorable:
            self._restorable[ph] = value
            self._prefixes = None
        return ph

    def __len__(self) -> int:
        return len(self._restorable)

    def __contains__(self, value: object) -> bool:
        return value in self._by_value

    def value(self, placeholder: str) -> str | None:
        return self._restorable.get(placeholder)

    @property
    def values(self) -> frozenset[str]:
        """The values the client sent (restorable ones)."""
        return frozenset(self._restorable.values())

    def restore(self, text: str) -> str:
        """Every known placeholder in ``text`` replaced by its value; unknown ones are left as they are."""
        if "<" not in text or not self._restorable:
            return text
        return PLACEHOLDER_RE.sub(lambda m: self._restorable.get(m.group(0), m.group(0)), text)

    def is_partial(self, tail: str) -> bool:
        """True when ``tail`` is a proper prefix of a known placeholder (it could still become one)."""
        if self._prefixes is None:
            self._prefixes = frozenset(ph[:i] for ph in self._restorable for i in range(1, len(ph)))
        return tail in self._prefixes


class StreamRestorer:
    """Restores placeholders in a text that arrives in pieces.

    Holds back only the shortest tail that could still become a placeholder: from
    the last ``<`` when what follows it is a proper prefix of a known placeholder,
    and nothing otherwise. Placeholders hold no ``<``, so no earlier position can
    start one that is still open.
    """

    __slots__ = ("vault", "held")

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.held = ""

    def feed(self, piece: str) -> str:
        text = self.held + piece if self.held else piece
        cut = text.rfind("<")
        if cut != -1 and self.vault.is_partial(text[cut:]):
            self.held = text[cut:]
            text = text[:cut]
        else:
            self.held = ""
        return self.vault.restore(text)

    def flush(self) -> str:
        """The end of the text: what was held can no longer become a placeholder."""
        out, self.held = self.held, ""
        return self.vault.restore(out)
