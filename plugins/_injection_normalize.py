"""Text normalisation for the injection detector: undo the tricks attackers use to hide words.

Everything here is built once at import (translation tables, compiled patterns)
and is linear in the length of the text. The common case, plain ASCII prose,
takes the fast path: no Unicode work at all, one ``lower``, one ``translate``,
one ``split``.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
import unicodedata
from dataclasses import dataclass, field

# Zero-width, joiners, soft hyphen, word joiner, invisible operators, BOM, Mongolian vowel
# separator, Hangul fillers: all render as nothing and split a keyword for a naive matcher.
_INVISIBLE = (
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0]
    + list(range(0x200B, 0x2010))
    + list(range(0x2060, 0x2065))
    + list(range(0xFE00, 0xFE10))
)
# Bidi embeddings, overrides and isolates reorder what the reader sees.
_BIDI = [0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069]
_TAG_FIRST, _TAG_LAST = 0xE0000, 0xE007F

# Letters from other scripts that look like Latin ones (a curated subset of Unicode's
# confusables.txt: the characters actually seen in homoglyph attacks on English keywords).
_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "һ": "h", "ӏ": "l",
    "ԛ": "q", "ԝ": "w", "ɡ": "g", "ո": "n", "ս": "u", "ց": "g", "օ": "o", "ь": "b", "ʏ": "y",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Т": "t",
    "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "Ԁ": "d", "Һ": "h", "Ӏ": "l",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y", "ω": "w", "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i",
    "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    # Latin look-alikes and IPA
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ʟ": "l", "ɴ": "n", "ʀ": "r", "ꜱ": "s", "ᴀ": "a", "ᴄ": "c",
    "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p",
    "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z",
}
# Typographic quotes, so "don’t" and "you’re" match like their ASCII spelling (not a disguise).
_QUOTES = {"‘": "'", "’": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"'}

_FOLD_TABLE: dict[int, int | str | None] = {c: None for c in _INVISIBLE + _BIDI}
_FOLD_TABLE.update({ord(k): v for k, v in _CONFUSABLES.items()})
_FOLD_TABLE.update({ord(k): v for k, v in _QUOTES.items()})
_CONFUSABLE_CODES = frozenset(ord(k) for k in _CONFUSABLES)
_INVISIBLE_CODES = frozenset(_INVISIBLE)
_BIDI_CODES = frozenset(_BIDI)

# Punctuation becomes a word break for the token set; '@' and '$' stay, they are leetspeak.
_WORD_BREAK = str.maketrans({c: " " for c in string.punctuation if c not in "@$"})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "9": "g"})
_ROT13 = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase,
    string.ascii_lowercase[13:] + string.ascii_lowercase[:13] + string.ascii_uppercase[13:] + string.ascii_uppercase[:13],
)

# Letters spaced or dotted apart ("i g n o r e", "i.g.n.o.r.e"): runs of 4+ single characters.
_SPACED_RUN = re.compile(r"(?<![^\W_])(?:[^\W_][ .\-_*/|]{1,3}){3,}[^\W_](?![^\W_])")
_SPACED_SEP = re.compile(r"[ .\-_*/|]+")
# Candidate encoded payloads, searched only in the neighbourhood of a long token.
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX_RUN = re.compile(r"(?:[0-9a-fA-F]{2}[ :]?){10,}")
_LONG_TOKEN = 16
# an injection hides in the first tens of kilobytes of a payload; a bigger blob is a file
_MAX_PAYLOAD = 65536
_INSIDE_WORD = re.compile("[^\\W\\d_][" + "".join(chr(c) for c in _INVISIBLE) + "]+[^\\W\\d_]")
# "a" and "i" are words; other lone letters in numbers are rare in prose
_SINGLE_LETTERS = frozenset(string.ascii_lowercase) - {"a", "i"}


@dataclass(slots=True)
class Normalised:
    """One text, normalised, with what was undone to get there."""

    #: NFKC, confusables folded, invisible and bidi characters removed, lower case
    text: str
    #: the words of ``text`` (punctuation broken), as a set: the anchor prefilter
    tokens: frozenset[str] | set[str]
    #: tricks seen: "invisible", "bidi", "confusable", "tags" (Unicode tag smuggling)
    tricks: set[str] = field(default_factory=set)
    #: text hidden in Unicode tag characters, decoded to ASCII
    smuggled: str = ""


def normalise(raw: str) -> Normalised:
    """Fold a text to the form signatures are written against."""
    tricks: set[str] = set()
    smuggled = ""
    if raw.isascii():
        text = raw.lower()
    else:
        codes = set(map(ord, raw))
        if codes & _INVISIBLE_CODES and _INSIDE_WORD.search(raw):
            # joiners inside emoji sequences are normal; inside a word they split a keyword
            tricks.add("invisible")
        if codes & _BIDI_CODES:
            tricks.add("bidi")
        if any(_TAG_FIRST <= c <= _TAG_LAST for c in codes):
            smuggled = "".join(chr(ord(ch) - _TAG_FIRST) for ch in raw if 0xE0020 <= ord(ch) <= 0xE007E)
            # Subdivision flags (England, Scotland) are tag sequences after U+1F3F4; they are short.
            if len(smuggled) > 6:
                tricks.add("tags")
            else:
                smuggled = ""
            raw = "".join(ch for ch in raw if not (_TAG_FIRST <= ord(ch) <= _TAG_LAST))
        text = unicodedata.normalize("NFKC", raw)
        if codes & _CONFUSABLE_CODES and _mixed_script(text):
            tricks.add("confusable")
        text = text.translate(_FOLD_TABLE).lower()
    tokens = set(text.translate(_WORD_BREAK).split())
    return Normalised(text, tokens, tricks, smuggled)


def _mixed_script(text: str) -> bool:
    """A confusable inside a word that also has ASCII letters: a homoglyph disguise, not a foreign text."""
    for word in text.split():
        if word.isascii():
            continue
        has_ascii = any("a" <= c.lower() <= "z" for c in word)
        has_conf = any(ord(c) in _CONFUSABLE_CODES for c in word)
        if has_ascii and has_conf:
            return True
    # All-confusable words (whole keyword spelt in Cyrillic) next to English words count too.
    ascii_words = sum(1 for w in text.split() if w.isascii() and w.isalpha())
    return ascii_words > 0 and any(ord(c) in _CONFUSABLE_CODES for c in text)


_LEET_CHARS = "0134578@$9"


def may_be_leet(text: str) -> bool:
    """Could any token of ``text`` change under leetspeak? (one ``memchr`` per leet character)"""
    for c in _LEET_CHARS:
        if c in text:
            return True
    return False


def leet_tokens(tokens: frozenset[str] | set[str]) -> set[str]:
    """Tokens mixing letters with leetspeak digits or symbols, translated back to letters."""
    mixed = tokens - set(filter(str.isalpha, tokens))
    if not mixed:
        return set()
    mixed -= set(filter(str.isdigit, mixed))
    return {t.translate(_LEET) for t in mixed} - tokens


def leet(text: str) -> str:
    return text.translate(_LEET)


def despace(text: str) -> tuple[str, list[str]] | None:
    """Join letters that were spaced apart; ``None`` when there are no such runs.

    Returns the text with each run rejoined (a wider gap than the run's usual one
    is kept as a word break) and the runs squeezed to bare letters, for the
    compact signatures that need no word breaks at all.
    """
    if not _SPACED_RUN.search(text):
        return None
    compact: list[str] = []

    def join(m: re.Match[str]) -> str:
        run = m.group(0)
        seps = _SPACED_SEP.findall(run)
        narrow = min(map(len, seps))
        letters = _SPACED_SEP.split(run)
        out = [letters[0]]
        for sep, letter in zip(seps, letters[1:]):
            out.append(" " if len(sep) > narrow else "")
            out.append(letter)
        compact.append("".join(letters))
        return "".join(out)

    return _SPACED_RUN.sub(join, text), compact


def has_single_letter_runs(tokens: frozenset[str] | set[str]) -> bool:
    """Cheap hint that a text may hold spaced-out words: many distinct one-letter tokens."""
    return len(_SINGLE_LETTERS.intersection(tokens)) >= 4


def rot13(text: str) -> str:
    return text.translate(_ROT13)


def long_tokens(tokens: frozenset[str] | set[str]) -> bool:
    return bool(tokens) and max(map(len, tokens)) >= _LONG_TOKEN


def decode_payloads(raw: str, limit: int = 8) -> list[tuple[str, str]]:
    """Base64 and hex runs in ``raw`` that decode to readable text: [(encoding, text)]."""
    out: list[tuple[str, str]] = []
    for m in _B64_RUN.finditer(raw):
        if len(out) >= limit:
            break
        chunk = m.group(0)[:_MAX_PAYLOAD]
        if chunk.isalpha() or chunk.isdigit():
            # plain long words or numbers; base64 of prose almost always mixes classes
            continue
        text = _b64(chunk)
        if text:
            out.append(("base64", text))
    for m in _HEX_RUN.finditer(raw):
        if len(out) >= limit:
            break
        digits = re.sub(r"[ :]", "", m.group(0)[:_MAX_PAYLOAD])
        if len(digits) % 2:
            digits = digits[:-1]
        try:
            text = binascii.unhexlify(digits).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            continue
        if _readable(text):
            out.append(("hex", text))
    return out


def _b64(chunk: str) -> str | None:
    s = chunk.rstrip("=")
    s = s[: len(s) - len(s) % 4] if len(s) % 4 == 1 else s
    altchars = b"-_" if ("-" in s or "_" in s) else None
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, altchars=altchars, validate=altchars is None) if altchars else base64.b64decode(s, validate=True)
        text = data.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return text if _readable(text) else None


def _readable(text: str) -> bool:
    """Decoded bytes that look like words, not binary or a hash (judged on their start)."""
    text = text[:2000]
    if len(text) < 8:
        return False
    printable = sum(1 for c in text if c.isprintable() or c in "\n\t")
    letters = sum(1 for c in text if c.isalpha())
    spaces = text.count(" ")
    return printable / len(text) > 0.95 and letters / len(text) > 0.5 and spaces >= 1


__all__ = [
    "Normalised", "normalise", "leet", "leet_tokens", "may_be_leet", "despace", "has_single_letter_runs", "rot13",
    "long_tokens", "decode_payloads",
]
