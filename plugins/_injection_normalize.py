"""Text normalisation for the injection detector: undo the tricks attackers use to hide words.

Everything here is built once at import (translation tables, compiled patterns)
and is linear in the length of the text. The common case, plain ASCII prose,
takes the fast path: no Unicode work at all, one ``lower``; the detector's words
are then found by :class:`Vocabulary`, one pass of a Hyperscan literal matcher over
the text with its word breaks made spaces, instead of a set of every word; where a
word occurs is looked up only for the words that need it (``ahocorasick_rs``, a
SIMD substring search per word).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
import threading
import unicodedata
from dataclasses import dataclass, field
from operator import itemgetter
from typing import AbstractSet, Any, Callable, Iterable, Sequence

import ahocorasick_rs
import hyperscan

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


def _latin_marks() -> dict[int, str | None]:
    """Latin letters with diacritics folded to their base letters (``ó`` to ``o``), and combining marks left
    over by NFKC (one after a letter it does not compose with) removed. A reader, and a model, read
    "ignóre" as "ignore": an accent put on a keyword is no disguise. Signatures are written folded too
    (French, Spanish or German ones without their accents)."""
    out: dict[int, str | None] = {c: None for c in range(0x0300, 0x0370)}
    for c in range(0x00C0, 0x0250):
        base = "".join(x for x in unicodedata.normalize("NFD", chr(c)) if not unicodedata.combining(x))
        if base != chr(c) and base.isascii() and base.isalpha():
            out[c] = base
    return out


_LATIN_MARKS = _latin_marks()
_FOLD_TABLE: dict[int, int | str | None] = {c: None for c in _INVISIBLE + _BIDI}
_FOLD_TABLE.update(_LATIN_MARKS)
_FOLD_TABLE.update({ord(k): v for k, v in _CONFUSABLES.items()})
_FOLD_TABLE.update({ord(k): v for k, v in _QUOTES.items()})
_CONFUSABLE_CODES = frozenset(ord(k) for k in _CONFUSABLES)
_FEW_FOLDS = 8
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
#: the words the detector's scan asks about besides its signatures' anchors and lead words
SCAN_WORDS = _SINGLE_LETTERS | {"rot13", "rot", "caesar"}


@dataclass(slots=True)
class Normalised:
    """One text, normalised, with what was undone to get there."""

    #: NFKC, confusables folded, invisible and bidi characters removed, lower case
    text: str
    #: tricks seen: "invisible", "bidi", "confusable", "tags" (Unicode tag smuggling)
    tricks: set[str] = field(default_factory=set)
    #: text hidden in Unicode tag characters, decoded to ASCII
    smuggled: str = ""
    #: ``text`` in UTF-8 and its distinct characters beyond ASCII, when known (a text that is not
    #: ASCII); :meth:`Vocabulary.views` takes them instead of working them out again
    utf8: bytes | None = None
    chars: frozenset[str] | None = None

    @property
    def tokens(self) -> set[str]:
        """The words of ``text`` (punctuation broken), as a set. Built on demand: the
        detector does not need it (it finds its own vocabulary with :class:`Vocabulary`)."""
        return set(self.text.translate(_WORD_BREAK).split())


def normalise(raw: str) -> Normalised:
    """Fold a text to the form signatures are written against."""
    tricks: set[str] = set()
    smuggled = ""
    if raw.isascii():
        return Normalised(raw.lower(), tricks, smuggled)
    # the distinct characters beyond ASCII, from the UTF-8 with its ASCII bytes deleted: every
    # character this function looks for is beyond ASCII, and most texts hold few such characters
    data = raw.encode("utf-8", "surrogatepass")
    chars = _non_ascii(data)
    codes = set(map(ord, chars))
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
        data = raw.encode("utf-8", "surrogatepass")
        chars = {c for c in chars if not _TAG_FIRST <= ord(c) <= _TAG_LAST}
    # a text of stable characters is its own NFKC; ASCII is stable, so the quick check over
    # every character is needed only when a character beyond ASCII is not
    text = raw if all(map(_stable, chars)) else unicodedata.normalize("NFKC", raw)
    if codes & _CONFUSABLE_CODES and _mixed_script(text):
        tricks.add("confusable")
    # NFKC can make a character to fold ("″" is "′′"): look again when it changed the text
    if text != raw:
        data = text.encode("utf-8", "surrogatepass")
        chars = _non_ascii(data)
    fold = set(map(ord, chars)).intersection(_FOLD_TABLE)
    if fold:
        if len(fold) > _FEW_FOLDS:
            text = text.translate(_FOLD_TABLE)
        else:
            # a few kinds (typographic quotes, say): one replace each, much cheaper than a
            # look-up per character; the same result, as no folded character is folded again
            for c in fold:
                text = text.replace(chr(c), _FOLD_TABLE[c] or "")
        # every folded character becomes ASCII or nothing
        chars = chars.difference(map(chr, fold))
        data = text.encode("utf-8", "surrogatepass")
    if not chars:
        return Normalised(text.lower(), tricks, smuggled)
    # ``str.lower`` looks each character up; ASCII is lowered as bytes, and the few characters
    # beyond ASCII that have a lower case (checked one by one) are replaced
    upper = [c for c in chars if c.lower() != c]
    if not upper:
        data = data.lower()
        return Normalised(data.decode("utf-8", "surrogatepass"), tricks, smuggled, data, frozenset(chars))
    if len(upper) <= _FEW_FOLDS and all(map(_plain_lower, upper)):
        text = data.lower().decode("utf-8", "surrogatepass")
        for c in upper:
            text = text.replace(c, c.lower())
        return Normalised(text, tricks, smuggled)
    return Normalised(text.lower(), tricks, smuggled)


_ASCII_BYTES = bytes(range(128))
_COMPOSING: frozenset[int] | None = None


def composing() -> frozenset[int]:
    """The characters that can compose with a character before them (NFC, NFKC): the second
    character of every two-character canonical decomposition, and the Hangul vowel and trailing
    consonant jamo. Built once, on first use (tens of milliseconds)."""
    global _COMPOSING
    if _COMPOSING is None:
        found = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
        decomposition = unicodedata.decomposition
        for c in range(0xC0, 0x110000):
            d = decomposition(chr(c))
            if d and d[0] != "<":
                parts = d.split()
                if len(parts) == 2:
                    found.add(int(parts[1], 16))
        _COMPOSING = frozenset(found)
    return _COMPOSING


@functools.lru_cache(maxsize=4096)
def _stable(c: str) -> bool:
    """``c`` is NFKC-stable: its own NFKC, canonical combining class 0 and composing with no
    character before it; a text of stable characters (and ASCII) is unchanged by NFKC, as its
    quick check answers yes (UAX #15)."""
    return unicodedata.combining(c) == 0 and unicodedata.normalize("NFKC", c) == c and ord(c) not in composing()


def _non_ascii(data: bytes) -> set[str]:
    """The distinct characters beyond ASCII of a text, given its UTF-8."""
    return set(data.translate(None, _ASCII_BYTES).decode("utf-8", "surrogatepass"))


def has_latin_marks(text: str) -> bool:
    """``text`` holds a Latin letter with a diacritic or a combining mark (folded by :func:`normalise`)."""
    return not _LATIN_MARKS.keys().isdisjoint(map(ord, set(text)))


def _plain_lower(c: str) -> bool:
    """``c.lower()`` does not depend on the characters around ``c`` (only capital sigma's does,
    U+03A3 at the end of a word) and lowers to characters that lower to themselves."""
    low = c.lower()
    return c != "\u03a3" and low.lower() == low



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
        if _worth_scanning(text):
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
    return text if _worth_scanning(text) else None


def _worth_scanning(text: str) -> bool:
    """Decoded bytes to scan again: readable text, or a payload encoded once more (base64 of base64,
    hex of base64, ...), which the next level decodes (``max_decode_depth`` bounds how deep)."""
    if _readable(text):
        return True
    t = text.strip()
    return len(t) <= _MAX_PAYLOAD and bool(_B64_RUN.fullmatch(t) or _HEX_RUN.fullmatch(t))


def _readable(text: str) -> bool:
    """Decoded bytes that look like words, not binary or a hash (judged on their start)."""
    text = text[:2000]
    if len(text) < 8:
        return False
    printable = sum(1 for c in text if c.isprintable() or c in "\n\t")
    letters = sum(1 for c in text if c.isalpha())
    spaces = text.count(" ")
    return printable / len(text) > 0.95 and letters / len(text) > 0.5 and spaces >= 1


# -- the detector's words, found in one pass -------------------------------------------------
#
# A word of the text is a maximal run of characters that are neither whitespace (as
# ``str.split`` sees it) nor punctuation other than '@' and '$' (``_WORD_BREAK``). With every
# such break turned into a space and a space added at both ends, a word ``w`` occurs as a
# word exactly where " w " occurs. One pass of a Hyperscan database of " w " for each word of
# the detector's vocabulary, reporting each literal once (its first occurrence), gives the
# set of the vocabulary's words in the text: no list of every word, no hashing, and no Python
# call per occurrence (a 2,000-word text holds about 250 occurrences of some 40 words). Where
# a word occurs is needed only for the lead words of the signatures whose expressions run;
# those are found one word at a time (every occurrence of " w ", overlapping ones included:
# " a a " holds " a " twice) with a SIMD substring search, and kept for the view.

_PAD_BYTES = bytes(
    32 if (chr(c) in string.punctuation and chr(c) not in "@$") or chr(c).isspace() else c for c in range(256)
)
# every character ``str.split`` breaks on (the highest is U+3000) and the punctuation
_PAD_STR: dict[int, int | str | None] = dict(_WORD_BREAK)
_PAD_STR.update({c: " " for c in range(0x3001) if chr(c).isspace()})
_LEET_BYTES = bytes.maketrans(b"0134578@$9", b"oieastbasg")
# a word of 16 or more characters: runs of 'x' in a mask of the padded bytes
_LONG_MASK = bytes(32 if c == 32 else 120 for c in range(256))
_LONG_RUN = b"x" * _LONG_TOKEN
# a word with a leetspeak character and something other than digits shows in this mask of the
# padded bytes as '@' (for '@' and '$') or as 'l' (a leetspeak digit) next to 'x' (any other
# character of a word; 2 and 6 are deleted, so "a21" is "xl"); the search starts at the rare 'l'
_LEET_MASK = bytes(
    32 if c == 32 else 108 if chr(c) in "01345789" else 64 if chr(c) in "@$" else 120 for c in range(256)
)
_LEET_WORD = re.compile(rb"l(?:x|(?<=xl))")
# up to this many words with '@' or '$' (e-mail addresses, prices) are looked at one by one
_FEW = 48
# characters around which a regular expression's \b and a word break disagree: '@' and '$'
# (not a word character, not a break; class 2), '_' (a word character and a break) and the
# control characters that are not whitespace (class 0). Without them (and in ASCII), a word
# ``w`` of letters and digits occurs as a word at ``i`` exactly when ``\bw\b`` matches at
# ``i``; in the leetspeak text '@' and '$' have become letters, so only class 0 counts there.
# The other characters are ' ' (a word break) or 'x' (a character of a word): without classes 0
# and 2 this is the long-word mask (``_LONG_MASK``) of ASCII text, so one translation serves both.
_ODD_CLASS = bytes(
    0 if (c < 32 and not chr(c).isspace()) or c == 127 or c == ord("_") else 2 if chr(c) in "@$"
    else 32 if c < 128 and _PAD_BYTES[c] == 32 else 120
    for c in range(256)
)


# the same for UTF-8 bytes, one byte per character: ASCII as in ``_PAD_BYTES``, the first byte of
# a longer character \x01 (a character of a word, and in no word of a vocabulary, which is
# ASCII) and the bytes that continue it deleted (``_UTF8_CONT``), so offsets are the text's
_PAD_ONE = _PAD_BYTES[:128] + b"\x01" * 128
_UTF8_CONT = bytes(range(0x80, 0xC0))
# an ASCII stand-in for a text, where ``re`` sees the same literal words and the same \b: ASCII
# as it is, a character beyond ASCII that is a word character for ``re`` (``str.isalnum``) '_',
# any other one a space (one ``bytes.replace`` per kind, in the UTF-8, before the translation)
_WORDISH = bytes(range(128)) + b"_" * 128
# a letter or digit beside \x02 in the padded bytes; the search starts at the rare \x02
_BESIDE = re.compile(rb"\x02(?:[a-z0-9]|(?<=[a-z0-9]\x02))")
_FEW_KINDS = 32


# the whitespace beyond ASCII (``_PAD_STR``'s: U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028,
# U+2029, U+202F, U+205F, U+3000); each becomes one space (one character)
_UNICODE_SPACES = frozenset(chr(c) for c in range(128, 0x3001) if chr(c).isspace())


def _as_one(c: str, byte: int) -> tuple[bytes, bytes]:
    """``c`` in UTF-8, and as many bytes: ``byte`` then continuation bytes (0x80)."""
    e = c.encode("utf-8", "surrogatepass")
    return e, bytes((byte,)) + b"\x80" * (len(e) - 1)


def _ascii_stand_in(data: bytes, chars: Iterable[str] | None) -> str | None:
    """An ASCII text of the same length as the text whose UTF-8 is ``data`` (and whose distinct
    characters beyond ASCII are ``chars``) where ``word\\b`` matches exactly where it matches in
    the text, for any ASCII ``word`` of letters and digits; ``None`` past a few kinds of
    characters that are neither words nor ASCII."""
    if chars is None:
        chars = _non_ascii(data)
    other = [c for c in chars if not c.isalnum()]
    if len(other) > _FEW_KINDS:
        return None
    for c in other:
        data = data.replace(*_as_one(c, 32))
    return data.translate(_WORDISH, _UTF8_CONT).decode("ascii")


def first_ids(i: int, start: int, end: int, flags: int, ids: list[int]) -> None:
    """A Hyperscan match handler: the match's id, into the list passed as context."""
    ids.append(i)


def _every_match(i: int, start: int, end: int, flags: int, out: list[tuple[int, int]]) -> None:
    out.append((i, end))


class _Literals:
    """A Hyperscan database of byte strings (each one's id is its index), in block mode.

    A scan needs a scratch space that no other scan is using at the same time, and
    ``hs_scan`` runs without the GIL: each thread has its own (the executor scans large
    requests while the event loop scans others)."""

    __slots__ = ("_db", "_local")

    def __init__(self, literals: Sequence[bytes], *, first_only: bool, literal: bool = True) -> None:
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=list(literals), ids=list(range(len(literals))), elements=len(literals),
            flags=hyperscan.HS_FLAG_SINGLEMATCH if first_only else 0, literal=literal,
        )
        self._local = threading.local()

    def scan(self, data: bytes, on_match: Callable[..., None], into: Any) -> None:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        self._db.scan(data, match_event_handler=on_match, context=into, scratch=scratch)


class HyperscanPatterns(_Literals):
    """A Hyperscan database of expressions over bytes, each reported once (its first match)."""

    __slots__ = ()

    def __init__(self, expressions: Sequence[bytes]) -> None:  # noqa: D107 - see the class
        super().__init__(expressions, first_only=True, literal=False)


@functools.lru_cache(maxsize=32)
def _databases(words: tuple[str, ...]) -> tuple[_Literals, _Literals]:
    """The databases of " w " for each of ``words`` (sorted): first occurrences, every occurrence.
    Shared by the detectors with the same vocabulary (every route's is almost always the same)."""
    literals = [f" {w} ".encode() for w in words]
    return _Literals(literals, first_only=True), _Literals(literals, first_only=False)


_SEARCHERS: dict[str, Callable[..., list[tuple[int, int, int]]]] = {}
_START = itemgetter(1)


def occurrences(word: str, padded: bytes) -> list[int]:
    """Every offset where " ``word`` " occurs in ``padded``, in order, overlapping ones included."""
    search = _SEARCHERS.get(word)
    if search is None:
        # built on first use; two threads may both build it, and either result is the same
        search = _SEARCHERS[word] = ahocorasick_rs.BytesAhoCorasick([f" {word} ".encode()]).find_matches_as_indexes
    return list(map(_START, search(padded, True)))


class View:
    """One text as the detector's vocabulary sees it: which of its words occur as words, and where."""

    __slots__ = (
        "text", "padded", "words", "exact", "_known", "_vocab", "_found", "_positions", "_extra", "_bytes", "_stand_in",
        "_utf8", "_chars", "_long_mask",
    )

    def __init__(
        self, text: str, padded: str, words: AbstractSet[str], exact: bool, padded_bytes: bytes | None,
        utf8: bytes | None = None, chars: Iterable[str] | None = None, *,
        vocab: Vocabulary | None = None, found: dict[str, list[int]] | None = None,
    ) -> None:
        self.text = text
        #: ``text`` with every word break a space, a space at both ends (and, when ``text`` is
        #: not ASCII, every other character beyond ASCII \x01: one character per character)
        self.padded = padded
        #: the vocabulary words that occur as words
        self.words = words
        #: ``at`` gives exactly where ``\bword\b`` matches (ASCII text without odd characters)
        self.exact = exact
        self._vocab = vocab
        #: each word of ``words`` -> the offsets in ``text`` where it occurs as a word, when known
        self._found = found
        #: where ``\bword\b`` matches, when that is not ``found`` (set by ``Vocabulary``)
        self._positions: dict[str, list[int]] | None = None
        #: offsets to add to ``found``'s: the pieces between '@' and '$' inside words
        self._extra: dict[str, list[int]] | None = None
        #: the words ``at`` has answered for (while ``positions`` is not set) -> its answer
        self._known: dict[str, list[int]] = {}
        self._bytes = padded_bytes
        self._stand_in: str | None = text if text.isascii() else None
        self._utf8 = utf8
        self._chars = chars
        #: ``_LONG_MASK`` of the text when already at hand
        self._long_mask: bytes | None = None

    @property
    def found(self) -> dict[str, list[int]]:
        """Each word of ``words`` -> the offsets in ``text`` where it occurs as a word (one pass
        over the text for all of them; the detector asks ``at`` for the few it needs)."""
        if self._found is None:
            assert self._vocab is not None
            self._found = self._vocab._scan(self._padded_bytes())
        return self._found

    @property
    def positions(self) -> dict[str, list[int]]:
        """Each vocabulary word -> where ``\bword\b`` matches, when ``exact``: ``found``, plus
        the pieces between '@' and '$' inside words."""
        if self._positions is None:
            found = self.found
            extra = self._extra
            self._positions = {**found, **{w: sorted(found.get(w, []) + at) for w, at in extra.items()}} if extra else found
        return self._positions

    def at(self, word: str) -> list[int] | None:
        """``positions.get(word)`` for a word of ``words``, looked up for that word alone (once:
        the answer is kept in ``_known``)."""
        if self._positions is not None:
            return self._positions.get(word)
        at = self._known.get(word)
        if at is not None:
            return at
        if self._found is not None:
            at = self._found.get(word)
        else:
            at = occurrences(word, self._padded_bytes()) if word in self.words else None
        if self._extra is not None and word in self._extra:
            at = sorted((at or []) + self._extra[word])
        if at is not None:
            self._known[word] = at
        return at

    def _padded_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = self.padded.encode("ascii")
        return self._bytes

    def utf8(self) -> bytes:
        """``text`` in UTF-8."""
        if self._utf8 is None:
            self._utf8 = self.text.encode("utf-8", "surrogatepass")
        return self._utf8

    def search_text(self) -> str:
        """``text``, or an ASCII stand-in where ``word\\b`` (an ASCII word of letters and digits)
        matches at the same offsets: the regex engine's literal search is fastest on ASCII."""
        if self._stand_in is None:
            self._stand_in = _ascii_stand_in(self.utf8(), self._chars) or self.text
        return self._stand_in

    @property
    def empty(self) -> bool:
        """The text has no word at all."""
        return self.padded.isspace()

    def long_word(self) -> bool:
        """The text has a word of at least 16 characters (a possible encoded payload)."""
        if self._long_mask is not None:
            return _LONG_RUN in self._long_mask
        if self._bytes is not None:
            return _LONG_RUN in self._bytes.translate(_LONG_MASK)
        # a character is at least one byte of UTF-8: no run of 16 bytes, no word of 16 characters
        if _LONG_RUN not in self.padded.encode("utf-8", "surrogatepass").translate(_LONG_MASK):
            return False
        return max(map(len, self.padded.split())) >= _LONG_TOKEN


class Vocabulary:
    """The words a detector looks for, found as whole words by one pass of a Hyperscan database.

    Built once per detector (off the request path); ``view`` is thread-safe (the
    databases are only read, and each thread scans with its own scratch space).
    """

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(words)
        for w in self.words:
            if not w or w != w.translate(_PAD_STR) or w != w.lower() or not w.isascii():
                raise ValueError(f"not a lower-case ASCII word: {w!r}")
        self._list = tuple(sorted(self.words))
        # the length of " w ": an occurrence ends that far after the word's offset in the text
        self._back = tuple(len(w) + 2 for w in self._list)
        self._first, self._every = _databases(self._list)
        self._both_: _Literals | None = None
        self._both_keys: tuple[tuple[str, int, bool], ...] = ()
        self._leet_spelt = frozenset(w for w in self.words if w != leet(w))

    def _present(self, padded: bytes) -> frozenset[str]:
        """The vocabulary words that occur as words in ``padded`` (the view's padded bytes)."""
        ids: list[int] = []
        self._first.scan(padded, first_ids, ids)
        return frozenset(map(self._list.__getitem__, ids))

    def _scanned(
        self, text: str, padded: str, pb: bytes, exact: bool, utf8: bytes | None = None, chars: Iterable[str] | None = None,
    ) -> View:
        """The view of ``text`` whose padded bytes are ``pb``, its words found in one pass."""
        return View(text, padded, self._present(pb), exact, pb, utf8, chars, vocab=self)

    def view(self, text: str, utf8: bytes | None = None, chars: Iterable[str] | None = None) -> View:
        """``utf8`` and ``chars``: ``text`` in UTF-8 and its distinct characters beyond ASCII, if known."""
        if text.isascii():
            raw = text.encode("ascii")
            pb = b" " + raw.translate(_PAD_BYTES) + b" "
            padded = pb.decode("ascii")
            odd = raw.translate(_ODD_CLASS)
            v = self._scanned(text, padded, pb, 0 not in odd and 2 not in odd)
            if v.exact:
                v._long_mask = odd
            return v
        if utf8 is None:
            utf8 = text.encode("utf-8", "surrogatepass")
        if chars is None:
            chars = _non_ascii(utf8)
        # characters are replaced in the UTF-8 by as many bytes, the first one ASCII and the
        # others continuation bytes (the translations delete them): a same-length replace is
        # twice as fast, and the result is still one byte per character
        data = utf8
        for c in _UNICODE_SPACES.intersection(chars):
            data = data.replace(*_as_one(c, 32))
        # ``_ODD_CLASS`` of each character (one byte per character): the odd classes, and the
        # long-word mask when there are none
        odd = data.translate(_ODD_CLASS, _UTF8_CONT)
        other = [c for c in chars if not c.isalnum() and c not in _UNICODE_SPACES] if 0 not in odd and 2 not in odd else None
        if other is None or len(other) > _FEW_KINDS:
            pb = b" " + data.translate(_PAD_ONE, _UTF8_CONT) + b" "
            padded = pb.decode("ascii")
            v = self._scanned(text, padded, pb, False, utf8, chars)
            if other is not None:
                v._long_mask = odd
            return v
        # Without '@', '$', '_' and control characters, a word of letters and digits occurs as
        # ``\bword\b`` where it is between two characters that are not word characters for
        # ``re``: word breaks, and characters beyond ASCII that are neither letters, digits nor
        # spaces (a dash, a bullet, an emoji), which are not word breaks. Those become \x02 (a
        # character of a word, for the token set), and one pass of a second database, that also
        # knows the words between \x02 and a space, finds both the words and where ``\bword\b``
        # matches
        table = _PAD_ONE
        if other:
            # a first byte that only such characters of this text have is translated to \x02
            # directly (a dash and an arrow share theirs); the others are replaced one by one
            lead = {c: c.encode("utf-8", "surrogatepass")[0] for c in other}
            mixed = {c.encode("utf-8", "surrogatepass")[0] for c in chars if c not in lead and c not in _UNICODE_SPACES}
            pure = set(lead.values()) - mixed
            if pure:
                t = bytearray(_PAD_ONE)
                for b in pure:
                    t[b] = 2
                table = bytes(t)
            for c, b in lead.items():
                if b not in pure:
                    data = data.replace(*_as_one(c, 2))
        pb = b" " + data.translate(table, _UTF8_CONT) + b" "
        padded = pb.decode("ascii")
        if not other or _BESIDE.search(pb) is None:
            # no letter or digit touches such a character: ``\bword\b`` is where the word is
            v = self._scanned(text, padded, pb, True, utf8, chars)
        else:
            found, positions = self._scan_both(pb)
            v = View(text, padded, frozenset(found), True, pb, utf8, chars, vocab=self, found=found)
            v._positions = positions
        v._long_mask = odd
        return v

    def views(self, text: str, utf8: bytes | None = None, chars: Iterable[str] | None = None) -> tuple[View, View | None, set[str]]:
        """The view of ``text`` and, when a word of it reads differently in leetspeak, the
        view of ``leet(text)`` and the vocabulary words among the leetspeak view's tokens:
        the plain ones and those the words mixing letters with leetspeak characters read as
        (``leet_tokens``; a word of digits alone does not count).

        ASCII text where no word mixes a leetspeak character with other characters (numbers
        alone do not count), or where only a few words hold '@' or '$', takes one pass over the
        text. Otherwise one pass over the leetspeak text finds both: a word found there is a
        plain one where the text itself spells it (a word keeps its place under ``leet``)."""
        if not may_be_leet(text):
            return self.view(text, utf8, chars), None, set()
        if not text.isascii():
            plain = self.view(text, utf8, chars)
            lpadded = plain.padded.translate(_LEET)
            lfound = self._scan(lpadded.encode("ascii"))
            words = set(plain.words)
            for w, at in lfound.items():
                if w not in words:
                    n = len(w)
                    for i in at:
                        if not text[i:i + n].isdigit():
                            words.add(w)
                            break
            return plain, View(leet(text), lpadded, frozenset(lfound), False, None, vocab=self, found=lfound), words
        raw = text.encode("ascii")
        pb = b" " + raw.translate(_PAD_BYTES) + b" "
        mask = pb.translate(_LEET_MASK, b"26")
        if _LEET_WORD.search(mask) is None and (b"@" not in mask or raw.count(b"@") + raw.count(b"$") <= _FEW):
            # no word holds a leetspeak digit and a character other than digits, '@' and '$'
            padded = pb.decode("ascii")
            odd = raw.translate(_ODD_CLASS)
            plain = self._scanned(text, padded, pb, 0 not in odd and 2 not in odd)
            if plain.exact:
                plain._long_mask = odd
            if b"@" not in mask:
                # every word reads the same in leetspeak, or is a number (which does not count)
                return plain, None, set()
            # the words that can read differently all hold '@' or '$' (e-mail addresses, say),
            # and there are few: look at each; the leetspeak view matters only if one of them
            # reads as a word of the vocabulary that is not already one of the text's words
            new = False
            starts: set[int] = set()
            inner: dict[str, list[int]] = {}
            for c in b"@$":
                i = raw.find(c)
                while i != -1 and not new:
                    # the word around it (offset i in raw is i + 1 in the padded bytes)
                    s = pb.rfind(b" ", 0, i + 1) + 1
                    if s not in starts:
                        starts.add(s)
                        word = pb[s:pb.find(b" ", i + 1)]
                        read = word.translate(_LEET_BYTES).decode("ascii")
                        new = read in self.words and read not in plain.words
                        # '@' and '$' are not word characters for \b: the pieces between
                        # them are where ``\bw\b`` matches inside this word
                        at = s - 1
                        for piece in word.replace(b"$", b"@").split(b"@"):
                            if piece:
                                w = piece.decode("ascii")
                                if w in self.words:
                                    inner.setdefault(w, []).append(at)
                            at += len(piece) + 1
                    i = raw.find(c, i + 1)
            if not new:
                if 0 not in odd:
                    plain.exact = True
                    if inner:
                        plain._extra = inner
                return plain, None, set()
        lpb = pb.translate(_LEET_BYTES)
        lpadded = lpb.decode("ascii")
        lfound = self._scan(lpb)
        found: dict[str, list[int]] = {}
        words = set()
        startswith = text.startswith
        for w, at in lfound.items():
            same = [i for i in at if startswith(w, i)]
            if same:
                found[w] = same
                words.add(w)
            else:
                n = len(w)
                for i in at:
                    if not text[i:i + n].isdigit():
                        words.add(w)
                        break
        padded = pb.decode("ascii")
        for w in self._leet_spelt:
            # words the leetspeak text cannot hold (they have a leetspeak character themselves)
            key = f" {w} "
            i = padded.find(key)
            while i != -1:
                found.setdefault(w, []).append(i)
                i = padded.find(key, i + len(w) + 1)
        words.update(self._leet_spelt.intersection(found))
        odd = raw.translate(_ODD_CLASS)
        plain = View(text, padded, frozenset(found), 0 not in odd and 2 not in odd, pb, vocab=self, found=found)
        if words.issubset(found):
            return plain, None, set()
        return plain, View(leet(text), lpadded, frozenset(lfound), 0 not in odd, lpb, vocab=self, found=lfound), words

    def _scan_both(self, padded: bytes) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """The words between spaces (as ``_scan``) and the words between spaces or \\x02."""
        between: dict[str, list[int]] = {}
        beside: list[tuple[str, int]] = []
        both = self._both_
        if both is None:
            # built on first use (text beyond ASCII with dashes, bullets, emoji): two threads may
            # both build it, and either result is the same
            keys = []
            literals = []
            for w in self._list:
                for left in " \x02":
                    for right in " \x02":
                        keys.append((w, len(w) + 2, left == right == " "))
                        literals.append(f"{left}{w}{right}".encode())
            self._both_keys = tuple(keys)
            both = self._both_ = _Literals(literals, first_only=False)
        hits: list[tuple[int, int]] = []
        both.scan(padded, _every_match, hits)
        keys = self._both_keys
        for i, end in hits:
            w, back, word = keys[i]
            at = between.get(w)
            if at is None:
                between[w] = [end - back]
            else:
                at.append(end - back)
            if not word:
                beside.append((w, end - back))
        for at in between.values():
            at.sort()
        if not beside:
            return between, between
        found = dict(between)
        for w, i in beside:
            at = [j for j in found[w] if j != i]
            if at:
                found[w] = at
            else:
                del found[w]
        return found, between

    def _scan(self, padded: bytes) -> dict[str, list[int]]:
        """Each vocabulary word that occurs in ``padded`` as a word -> its offsets, in order."""
        hits: list[tuple[int, int]] = []
        self._every.scan(padded, _every_match, hits)
        found: dict[str, list[int]] = {}
        words, back = self._list, self._back
        for i, end in hits:
            w = words[i]
            at = found.get(w)
            if at is None:
                found[w] = [end - back[i]]
            else:
                at.append(end - back[i])
        for at in found.values():
            at.sort()  # in order whatever order the matches came in (one pass over a sorted list)
        return found


__all__ = [
    "Normalised", "normalise", "leet", "leet_tokens", "may_be_leet", "despace", "has_single_letter_runs", "rot13",
    "long_tokens", "decode_payloads", "View", "Vocabulary",
]
