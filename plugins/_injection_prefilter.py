"""A cheap, exact "no" for signatures whose expressions would run for nothing in a long text.

A signature led by everyday words ("when", "if", "show", "system", "your") has its expression
tried at every occurrence of those words once its anchors are all in the text, which in a long
document they usually are. Its first few elements, translated into a pattern over the text's
UTF-8 that matches wherever the expression could (a superset: see ``byte_prefix``), are looked
for in one Hyperscan pass over the text together with the other listed signatures'; a signature
whose prefix is nowhere in the text cannot match, and is skipped. Detection is unchanged: the
expressions themselves still decide every match. The same pass answers the signatures'
punctuation checks (``needs``: is "---" or "](" anywhere in the text).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Sequence

from ._injection_normalize import HyperscanPatterns, first_ids

_SRE: Any = re._constants  # type: ignore[attr-defined]
_PARSE: Any = re._parser.parse  # type: ignore[attr-defined]

#: one character beyond ASCII (two to four bytes of UTF-8, or a lone surrogate's three)
_BEYOND = "[\\x80-\\xff]+"
_ASCII = frozenset(range(128))
# the ASCII members of \s, \w and \d for ``str`` patterns (each also matches characters beyond ASCII)
_CATEGORY = {
    _SRE.CATEGORY_SPACE: frozenset(b"\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f"),
    _SRE.CATEGORY_WORD: frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"),
    _SRE.CATEGORY_DIGIT: frozenset(b"0123456789"),
}
_ASSERTIONS = (_SRE.AT, _SRE.ASSERT, _SRE.ASSERT_NOT)
_REPEATS = (_SRE.MAX_REPEAT, _SRE.MIN_REPEAT, _SRE.POSSESSIVE_REPEAT)


def _escaped(data: bytes) -> str:
    """A Hyperscan pattern matching exactly ``data``."""
    return "".join("\\x%02x" % b for b in data)


def _character(ascii_members: Iterable[int], beyond: bool) -> str | None:
    """One character: one of ``ascii_members`` or, if ``beyond``, any character beyond ASCII."""
    members = sorted(ascii_members)
    parts = []
    if members:
        parts.append("\\x%02x" % members[0] if len(members) == 1 else "[" + "".join("\\x%02x" % b for b in members) + "]")
    if beyond:
        parts.append(_BEYOND)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _class(items: Sequence[tuple[Any, Any]]) -> tuple[frozenset[int], bool]:
    """The ASCII bytes a character class matches, and whether it matches characters beyond ASCII
    (taken as any of them: wider, never narrower)."""
    negate = False
    members: set[int] = set()
    beyond = False
    for op, av in items:
        if op is _SRE.NEGATE:
            negate = True
        elif op is _SRE.LITERAL:
            if av < 128:
                members.add(av)
            else:
                beyond = True
        elif op is _SRE.RANGE:
            members.update(range(av[0], min(av[1], 127) + 1))
            beyond = beyond or av[1] >= 128
        elif op is _SRE.CATEGORY and av in _CATEGORY:
            members |= _CATEGORY[av]
            beyond = True
        else:
            return _ASCII, True
    if negate:
        return _ASCII - members, True
    return frozenset(members), beyond


def _translate(items: Sequence[tuple[Any, Any]], budget: list[int] | None, gap: int) -> tuple[str, bool]:
    """A Hyperscan pattern for a prefix of ``items`` (at most ``budget[0]`` elements when given),
    and whether it is all of them."""
    out: list[str] = []
    for op, av in items:
        if op in _ASSERTIONS:
            continue  # an assertion only narrows where an expression matches
        if budget is not None:
            if budget[0] <= 0:
                return "".join(out), False
            budget[0] -= 1
        if op is _SRE.LITERAL:
            out.append(_escaped(chr(av).encode("utf-8", "surrogatepass")))
        elif op is _SRE.NOT_LITERAL:
            out.append(_character(_ASCII - {av}, True) or "")
        elif op is _SRE.ANY:
            out.append(_character(_ASCII - {10}, True) or "")
        elif op is _SRE.IN:
            one = _character(*_class(av))
            if one is None:
                return "".join(out), False
            out.append(one)
        elif op is _SRE.BRANCH:
            alternatives = [_translate(b, None, gap) for b in av[1]]
            out.append("(?:" + "|".join(a for a, _ in alternatives) + ")")
            if not all(whole for _, whole in alternatives):
                return "".join(out), False
        elif op is _SRE.SUBPATTERN:
            inner, whole = _translate(av[3], None, gap)
            out.append("(?:" + inner + ")")
            if not whole:
                return "".join(out), False
        elif op in _REPEATS:
            low, high, sub = av
            if high is not _SRE.MAXREPEAT and high > gap:
                return "".join(out), False  # a long bounded gap: costly for Hyperscan, and the prefix is enough
            inner, whole = _translate(sub, None, gap)
            if not whole:
                return "".join(out), False
            out.append("(?:" + inner + ")" + ("{%d,}" % low if high is _SRE.MAXREPEAT else "{%d,%d}" % (low, high)))
        else:
            return "".join(out), False  # anything else ends the prefix
    return "".join(out), True


def byte_prefix(pattern: re.Pattern[str], elements: int = 8, gap: int = 8) -> str:
    """A Hyperscan pattern over a text's UTF-8 (``surrogatepass``) that matches wherever
    ``pattern`` matches the text, at an offset or in any slice of it (assertions and lookarounds
    dropped, each class widened to every character beyond ASCII), for the first ``elements``
    elements of the expression, up to its first bounded repeat of more than ``gap``. A prefix
    of an expression matches wherever the expression does, so a text this does not match cannot
    hold a match of ``pattern``."""
    return _translate(_PARSE(pattern.pattern, pattern.flags), [elements], gap)[0]


@functools.lru_cache(maxsize=32)
def _database(prefixes: tuple[str, ...]) -> HyperscanPatterns:
    return HyperscanPatterns([p.encode() for p in prefixes])


class Prefilter:
    """Some signatures' prefixes and some literal strings, looked for in one pass over a text."""

    def __init__(self, patterns: dict[str, re.Pattern[str]], literals: Iterable[str] = ()) -> None:
        """``patterns``: name -> expression (its ``byte_prefix`` is looked for); ``literals``:
        strings looked for as they are (each is its own name)."""
        prefixes = {name: byte_prefix(p) for name, p in sorted(patterns.items())}
        empty = [name for name, p in prefixes.items() if not p]
        if empty:
            raise ValueError(f"no prefix to look for: {', '.join(empty)}")
        strings = sorted(set(literals))
        if set(strings) & set(prefixes):
            raise ValueError("a literal has the name of a pattern")
        self.names = tuple(prefixes) + tuple(strings)
        expressions = list(prefixes.values()) + [_escaped(x.encode("utf-8", "surrogatepass")) for x in strings]
        self._db = _database(tuple(expressions))

    def matching(self, utf8: bytes) -> frozenset[str]:
        """The names whose prefix or string occurs in ``utf8`` (a text in UTF-8, ``surrogatepass``)."""
        ids: list[int] = []
        self._db.scan(utf8, first_ids, ids)
        return frozenset(map(self.names.__getitem__, ids))
