"""Recognizers the pii plugin uses instead of (or beside) Presidio's defaults.

Presidio's stock recognizers are tuned for recall on clean documents; in LLM
prompts they under-score valid phone numbers, miss Mastercard's 2-series and
flag every ``main.py`` as a URL. The classes here are built lazily (only
``build_recognizers`` imports Presidio) and each one declares a *trigger*: a
cheap regex that every one of its matches contains. The fast pre-scan relies on
that promise, so a recognizer without a trigger forces a full scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

# -- triggers ------------------------------------------------------------------
# Each recognizer lists (guard, regex) pairs: every match it can make contains a match of
# one of the regexes, and the guard is a cheaper necessary condition for that regex (a
# character the regex needs), checked first. Keep them in step with the recognizers
# below; the differential test holds the pair together on a corpus.
DIGITS7 = r"\d(?:[\s().\-/+]{0,3}\d){6,}"
_DIGIT = re.compile(r"\d").search
GUARDS: dict[str, Callable[[str], bool]] = {
    "any": lambda t: True,
    "at": lambda t: "@" in t,
    "digit": lambda t: _DIGIT(t) is not None,
    "colon2": lambda t: t.count(":") >= 2,
    "mac": lambda t: t.count(":") >= 5 or t.count("-") >= 5 or t.count(".") >= 2,
    "scheme": lambda t: "://" in t,
    "www": lambda t: "www." in t.lower(),
    "dot": lambda t: "." in t,
}
TRIGGERS: dict[str, list[tuple[str, str]]] = {
    "EMAIL_ADDRESS": [("at", r"@")],
    "PHONE_NUMBER": [("digit", DIGITS7)],
    "CREDIT_CARD": [("digit", DIGITS7)],
    "US_SSN": [("digit", DIGITS7)],
    "IBAN_CODE": [("digit", r"[A-Za-z]{2}[0-9]{2}")],
    "IP_ADDRESS": [("digit", r"\d\.\d"), ("colon2", r":[0-9A-Fa-f]{0,4}:")],
    "URL": [("scheme", r"://"), ("www", r"(?i:www)\."), ("dot", r"\.(?:TLDS)\b")],
    # Presidio's pattern is (bc1|[13]) and 25 or more base58/bech32 characters
    "CRYPTO": [("digit", r"[13][a-zA-HJ-NP-Z0-9]{25}")],
    "MAC_ADDRESS": [("mac", r"[0-9A-Fa-f]{2}[:\-.][0-9A-Fa-f]{2}")],
}

#: Entity types Presidio finds with patterns alone (no model).
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS", "URL", "CRYPTO", "MAC_ADDRESS")
#: Entity types that need the NER model (the ``ner`` extra).
NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "ORGANIZATION")

# Country-code and generic TLDs that show up in real addresses but are not common
# file extensions or attribute names: ".py", ".md", ".rs", ".sh", ".pl", ".js", ".in"
# (Paraguay, Moldova, Serbia, St Helena, Poland, ...) and ".info", ".name", ".app",
# ".page", ".int", ".be" ("logger.info", "user.name", "self.app", "np.int",
# "to.be") are deliberately absent, so code and file names are not taken for hosts.
TLDS = (
    "com|org|net|edu|gov|mil|biz|aero|coop|museum|mobi|io|ai|co|me|tv|xyz|us|uk|ca|au|nz|ie|de|fr|es|it|nl|ch|at|"
    "se|dk|fi|pt|gr|cz|hu|ro|bg|hr|sk|si|lt|lv|ee|ru|ua|tr|il|jp|cn|hk|tw|kr|sg|th|vn|br|mx|ar|cl|pe|za|ke|ae|sa|eu|asia"
)
TRIGGERS["URL"] = [(g, rx.replace("TLDS", TLDS)) for g, rx in TRIGGERS["URL"]]

_URL_TAIL = r"(?:[/?#][^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]}])?"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# (prefix low, prefix high, prefix length, allowed lengths): issuer ranges as published by the networks.
_CARD_RANGES: tuple[tuple[int, int, int, tuple[int, ...]], ...] = (
    (4, 4, 1, (13, 16, 19)),  # Visa
    (51, 55, 2, (16,)),  # Mastercard
    (2221, 2720, 4, (16,)),  # Mastercard 2-series
    (34, 34, 2, (15,)),  # American Express
    (37, 37, 2, (15,)),
    (6011, 6011, 4, (16, 17, 18, 19)),  # Discover
    (644, 649, 3, (16, 17, 18, 19)),
    (65, 65, 2, (16, 17, 18, 19)),
    (3528, 3589, 4, (16, 17, 18, 19)),  # JCB
    (300, 305, 3, (14, 15, 16, 17, 18, 19)),  # Diners Club
    (36, 36, 2, (14, 15, 16, 17, 18, 19)),
    (38, 39, 2, (16, 17, 18, 19)),
    (62, 62, 2, (16, 17, 18, 19)),  # UnionPay
    (5018, 5018, 4, (12, 13, 14, 15, 16, 17, 18, 19)),  # Maestro
    (5020, 5020, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (5038, 5038, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (5893, 5893, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (6304, 6304, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (6759, 6759, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (6761, 6763, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    (2200, 2204, 4, (16, 17, 18, 19)),  # Mir
)


def card_number_ok(text: str) -> bool:
    """A known issuer range, a length that range issues, a consistent separator and the Luhn check."""
    seps = {c for c in text if not c.isdigit()}
    if len(seps) > 1:
        return False
    digits = "".join(c for c in text if c.isdigit())
    n = len(digits)
    if not 12 <= n <= 19 or len(set(digits)) == 1:
        return False
    for low, high, plen, lengths in _CARD_RANGES:
        if n in lengths and low <= int(digits[:plen]) <= high:
            return luhn_ok(digits)
    return False


@dataclass(frozen=True)
class CustomPattern:
    regex: str
    score: float


@dataclass(frozen=True)
class CustomRecognizer:
    entity: str
    patterns: tuple[CustomPattern, ...]
    context: tuple[str, ...] = ()


def deny_regex(words: Iterable[str]) -> str:
    alts = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return r"(?<!\w)(?i:" + alts + r")(?!\w)"


def build_recognizers(
    entities: Iterable[str],
    custom: Iterable[CustomRecognizer] = (),
    deny_list: dict[str, list[str]] | None = None,
    ner: bool = False,
) -> list[Any]:
    """Presidio recognizers for ``entities``, tuned ones first; imports Presidio."""
    import phonenumbers
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        SpacyRecognizer,
        UsSsnRecognizer,
    )

    class PhoneRecognizer(PatternRecognizer):
        """Phone numbers by shape, checked with libphonenumber where a country is known.

        Presidio's matcher scores valid numbers 0.4 and skips formats such as
        ``555.123.4567``; here a number written the way people write numbers is
        enough, and international ones must also be possible per libphonenumber.
        """

        PATTERNS = [
            # +44 20 7946 0958, +1 (415) 555-0132, +49 30 1234567, +33 1 23 45 67 89
            Pattern("intl", r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,8}\)?){1,6}(?![\w+])", 0.75),
            # (415) 555-0132, 415-555-0132, 415.555.0132, 1-415-555-0132
            Pattern(
                "nanp",
                r"(?<![\w+\-.])(?:1[ .\-])?(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|\.\d)",
                0.7,
            ),
            # trunk-prefixed national numbers: 020 7946 0958, 030 12345678, 06 12 34 56 78
            Pattern(
                "national",
                r"(?<![\w+\-.])0\d{1,4}(?:[ \-]\d{2,8}){1,4}(?![\w\-]|\.\d)",
                0.5,
            ),
            # ten bare digits: only with context ("call", "phone", ...)
            Pattern("bare", r"(?<![\w+\-.])\d{10}(?![\w\-]|\.\d)", 0.2),
        ]
        CONTEXT = ["phone", "telephone", "tel", "call", "cell", "mobile", "number", "fax", "whatsapp", "sms", "text", "reach", "contact"]

        def __init__(self) -> None:
            super().__init__(supported_entity="PHONE_NUMBER", patterns=self.PATTERNS, context=self.CONTEXT, name="SluicePhoneRecognizer")

        def validate_result(self, pattern_text: str) -> bool | None:
            digits = sum(c.isdigit() for c in pattern_text)
            if digits < 7 or digits > 15:
                return False
            if pattern_text.startswith("0") and not 9 <= digits <= 12:
                return False
            if pattern_text.startswith("+"):
                try:
                    num = phonenumbers.parse(pattern_text, None)
                except phonenumbers.NumberParseException:
                    return False
                return None if phonenumbers.is_possible_number(num) else False
            return None

    class CardRecognizer(PatternRecognizer):
        """Payment card numbers of every major network (Mastercard 2-series included), Luhn-checked."""

        PATTERNS = [Pattern("card", r"(?<![\w\-.])\d(?:[ \-]?\d){11,18}(?![\w\-]|\.\d)", 0.3)]
        CONTEXT = ["credit", "card", "visa", "mastercard", "amex", "discover", "jcb", "diners", "maestro", "payment", "cc"]

        def __init__(self) -> None:
            super().__init__(supported_entity="CREDIT_CARD", patterns=self.PATTERNS, context=self.CONTEXT, name="SluiceCardRecognizer")

        def validate_result(self, pattern_text: str) -> bool:
            return card_number_ok(pattern_text)

    class UrlRecognizer(PatternRecognizer):
        """URLs with a scheme or ``www.``, and bare host names on real-world TLDs only.

        File names (``main.py``, ``README.md``, ``index.js``) are not hosts: their
        extensions are left out of the bare-host TLD list, and TLDs must be lower case.
        """

        PATTERNS = [
            Pattern("scheme", r"\b(?i:https?|ftp|wss?)://[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]}]", 0.7),
            Pattern("www", r"(?<![\w.@-])(?i:www)\." + _HOST + r"[A-Za-z]{2,24}\b" + _URL_TAIL, 0.6),
            Pattern("bare", r"(?<![\w.@/-])" + _HOST + r"(?:" + TLDS + r")\b(?![.@\-]\w)" + _URL_TAIL, 0.5),
        ]
        CONTEXT = ["url", "website", "site", "link", "http", "https", "domain", "visit"]

        def __init__(self) -> None:
            super().__init__(supported_entity="URL", patterns=self.PATTERNS, context=self.CONTEXT, name="SluiceUrlRecognizer")

    class MacRecognizer(PatternRecognizer):
        """MAC addresses: six hex pairs with one separator, or Cisco's three dotted quads."""

        PATTERNS = [
            Pattern("mac", r"\b[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}\b", 0.6),
            Pattern("cisco", r"\b[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\b", 0.6),
        ]
        CONTEXT = ["mac", "ethernet", "nic", "hardware", "address", "wifi", "bluetooth"]

        def __init__(self) -> None:
            super().__init__(supported_entity="MAC_ADDRESS", patterns=self.PATTERNS, context=self.CONTEXT, name="SluiceMacRecognizer")

        def invalidate_result(self, pattern_text: str) -> bool:
            hexes = [c for c in pattern_text.lower() if c in "0123456789abcdef"]
            # all zeros or all ones: placeholders in docs and configs, not a device
            return set(hexes) <= {"0"} or set(hexes) <= {"f"}

    builders: dict[str, Any] = {
        "EMAIL_ADDRESS": EmailRecognizer,
        "PHONE_NUMBER": PhoneRecognizer,
        "CREDIT_CARD": CardRecognizer,
        "US_SSN": UsSsnRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "IP_ADDRESS": IpRecognizer,
        "URL": UrlRecognizer,
        "CRYPTO": CryptoRecognizer,
        "MAC_ADDRESS": MacRecognizer,
    }
    wanted = set(entities)
    out: list[Any] = [builders[e]() for e in PATTERN_ENTITIES if e in wanted]
    for rec in out:
        if isinstance(rec, IbanRecognizer):
            # IBANs typed on a phone come in lower case; the checksum keeps this precise
            rec.case_insensitive = True
    for rec in custom:
        out.append(
            PatternRecognizer(
                supported_entity=rec.entity,
                name=f"custom:{rec.entity}",
                patterns=[Pattern(f"custom{i}", p.regex, p.score) for i, p in enumerate(rec.patterns)],
                context=list(rec.context) or None,
            )
        )
    for entity, words in (deny_list or {}).items():
        if words:
            out.append(
                PatternRecognizer(
                    supported_entity=entity,
                    name=f"deny:{entity}",
                    patterns=[Pattern("deny_list", deny_regex(words), 1.0)],
                )
            )
    if ner:
        ner_wanted = [e for e in NER_ENTITIES if e in wanted]
        if ner_wanted:
            out.append(SpacyRecognizer(supported_entities=ner_wanted))
    return out
