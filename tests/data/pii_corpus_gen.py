"""Writes tests/data/pii_corpus.jsonl: a labelled PII corpus made for Sluice (seeded, reproducible).

    python tests/data/pii_corpus_gen.py

Every value is synthetic: card numbers are generated to pass Luhn in each
network's range, IBANs carry computed check digits, phone numbers use
fictional ranges where the country has them. Negatives are the texts that trip
naive detectors in LLM traffic: code, file names, versions, dates, hashes,
order numbers, math.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).with_name("pii_corpus.jsonl")
rng = random.Random(20261123)


def luhn_complete(prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body + "0")):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def group(num: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for s in sizes:
        out.append(num[i:i + s])
        i += s
    if i < len(num):
        out.append(num[i:])
    return sep.join(out)


def card() -> tuple[str, str]:
    kind = rng.choice(["visa", "mc5", "mc2", "amex", "discover", "jcb", "diners", "unionpay", "visa13"])
    if kind == "visa":
        n = luhn_complete("4", 16)
    elif kind == "visa13":
        n = luhn_complete("4", 13)
    elif kind == "mc5":
        n = luhn_complete(str(rng.randint(51, 55)), 16)
    elif kind == "mc2":
        n = luhn_complete(str(rng.randint(2221, 2720)), 16)
    elif kind == "amex":
        n = luhn_complete(rng.choice(["34", "37"]), 15)
    elif kind == "discover":
        n = luhn_complete(rng.choice(["6011", "65", "644"]), 16)
    elif kind == "jcb":
        n = luhn_complete(str(rng.randint(3528, 3589)), 16)
    elif kind == "diners":
        n = luhn_complete(rng.choice(["36", "300", "305"]), 14)
    else:
        n = luhn_complete("62", 16)
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain" or len(n) == 13:
        return n, kind
    sizes = [4, 6, 5] if len(n) == 15 else [4, 6, 4] if len(n) == 14 else [4, 4, 4, 4]
    return group(n, sizes, " " if style == "space" else "-"), kind


def bad_card() -> str:
    n = luhn_complete("4", 16)
    last = (int(n[-1]) + rng.randint(1, 9)) % 10
    return group(n[:-1] + str(last), [4, 4, 4, 4], " ")


def iban() -> str:
    country = rng.choice(["GB", "DE", "NL", "FR", "ES"])
    if country == "GB":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(rng.choice(string.digits) for _ in range(14))
    elif country == "DE":
        bban = "".join(rng.choice(string.digits) for _ in range(18))
    elif country == "NL":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(rng.choice(string.digits) for _ in range(10))
    elif country == "FR":
        bban = "".join(rng.choice(string.digits) for _ in range(23))
    else:
        bban = "".join(rng.choice(string.digits) for _ in range(20))
    rearranged = bban + country + "00"
    num = int("".join(str(int(c, 36)) for c in rearranged))
    check = 98 - num % 97
    code = f"{country}{check:02d}{bban}"
    if rng.random() < 0.5:
        return " ".join(code[i:i + 4] for i in range(0, len(code), 4))
    return code


FIRST = ["Alice", "Bob", "Carmen", "Dmitri", "Emeka", "Fatima", "Guo", "Hannah", "Ivan", "Jasmine", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya"]
LAST = ["Johnson", "Okafor", "Schmidt", "Tanaka", "Moreau", "Garcia", "Novak", "Haddad", "Lindqvist", "Kowalski", "Mensah", "Rossi"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "corp-example.co.uk", "example.de", "uni-example.edu"]
CITIES = ["Berlin", "Lagos", "Toronto", "Osaka", "Lyon", "Chicago", "Nairobi", "Madrid", "Melbourne", "Krakow"]


def email() -> str:
    f, l = rng.choice(FIRST).lower(), rng.choice(LAST).lower()
    local = rng.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}_{l}{rng.randint(1, 99)}", f"{f}+news", l])
    return f"{local}@{rng.choice(DOMAINS)}"


def phone() -> str:
    kind = rng.choice(["us1", "us2", "us3", "us4", "us5", "uk1", "uk2", "uk3", "de1", "de2", "fr1", "fr2", "in1", "au1"])
    area = rng.choice(["415", "212", "646", "312", "617", "303", "206"])
    sub = f"{rng.randint(100, 199):03d}"[1:]
    line = f"01{sub}"
    return {
        "us1": f"({area}) 555-{line}",
        "us2": f"{area}-555-{line}",
        "us3": f"{area}.555.{line}",
        "us4": f"+1 {area} 555 {line}",
        "us5": f"+1-{area}-555-{line}",
        "uk1": f"+44 20 7946 0{rng.randint(100, 999)}",
        "uk2": f"020 7946 0{rng.randint(100, 999)}",
        "uk3": f"+44 7700 900{rng.randint(100, 999)}",
        "de1": f"+49 30 {rng.randint(1000000, 9999999)}",
        "de2": f"+49 151 {rng.randint(10000000, 99999999)}",
        "fr1": f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
        "fr2": f"06 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
        "in1": f"+91 98{rng.randint(100, 999)} {rng.randint(10000, 99999)}",
        "au1": f"+61 2 9{rng.randint(100, 999)} {rng.randint(1000, 9999)}",
    }[kind]


def ssn() -> str:
    area = rng.choice([n for n in range(1, 899) if n != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def ipv4() -> str:
    return rng.choice([
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"203.0.113.{rng.randint(1, 254)}",
        f"198.51.100.{rng.randint(1, 254)}",
    ])


def ipv6() -> str:
    return rng.choice(["2001:db8::1", f"2001:db8:{rng.randint(1, 0xffff):x}::{rng.randint(1, 0xffff):x}", "fe80::1ff:fe23:4567:890a", f"2001:db8:0:0:0:0:2:{rng.randint(1, 0xff):x}"])


def url() -> str:
    host = rng.choice(["example.com", "shop.example.org", "portal.example.net", "intranet.example.co.uk", "example.io"])
    path = rng.choice(["", "/account/settings", "/u/4821/profile", "/reset?token=abc123", "/orders/77120"])
    return rng.choice([f"https://{host}{path}", f"http://{host}{path}", f"www.{host}{path}", f"{host}{path}" if path else f"https://{host}"])


CRYPTO = ["1BoatSLRHtKNngkdXEeobR76b53LETtpyT", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"]


def mac() -> str:
    sep = rng.choice([":", "-"])
    return sep.join(f"{rng.randint(0, 255):02X}" for _ in range(6))


POSITIVE_TEMPLATES: list[tuple[str, list[str]]] = [
    ("Hi, my email is {EMAIL_ADDRESS} and you can call me on {PHONE_NUMBER} after 5pm.", ["EMAIL_ADDRESS", "PHONE_NUMBER"]),
    ("Please update the billing card to {CREDIT_CARD}, expiry 09/28.", ["CREDIT_CARD"]),
    ("Customer record: ssn {US_SSN}, phone {PHONE_NUMBER}, email {EMAIL_ADDRESS}.", ["US_SSN", "PHONE_NUMBER", "EMAIL_ADDRESS"]),
    ("Wire the refund to IBAN {IBAN_CODE} by Friday please.", ["IBAN_CODE"]),
    ("The login attempts came from {IP_ADDRESS} and then from {IP_ADDRESS}.", ["IP_ADDRESS", "IP_ADDRESS"]),
    ("Summarise this ticket: user {EMAIL_ADDRESS} says the reset link {URL} does not work.", ["EMAIL_ADDRESS", "URL"]),
    ("Send the donation to {CRYPTO} and confirm.", ["CRYPTO"]),
    ("The printer with MAC {MAC_ADDRESS} keeps dropping off the network.", ["MAC_ADDRESS"]),
    ("Can you draft a reply to {EMAIL_ADDRESS}? Their number is {PHONE_NUMBER}.", ["EMAIL_ADDRESS", "PHONE_NUMBER"]),
    ("I paid with {CREDIT_CARD} but the order still shows unpaid.", ["CREDIT_CARD"]),
    ("My social security number is {US_SSN}; is it safe to share it here?", ["US_SSN"]),
    ("Translate to German: call me at {PHONE_NUMBER} or write to {EMAIL_ADDRESS}.", ["PHONE_NUMBER", "EMAIL_ADDRESS"]),
    ("Server {IP_ADDRESS} returns 502; the health page is at {URL}.", ["IP_ADDRESS", "URL"]),
    ("Here is the log line: 2024-06-01T10:22:03Z auth failed for {EMAIL_ADDRESS} from {IP_ADDRESS}", ["EMAIL_ADDRESS", "IP_ADDRESS"]),
    ("tel: {PHONE_NUMBER}", ["PHONE_NUMBER"]),
    ("Card on file {CREDIT_CARD}; second card {CREDIT_CARD}.", ["CREDIT_CARD", "CREDIT_CARD"]),
    ("Account holder IBAN: {IBAN_CODE}. Reference 7781.", ["IBAN_CODE"]),
    ("Write a SQL insert for a user with email {EMAIL_ADDRESS} and phone {PHONE_NUMBER}.", ["EMAIL_ADDRESS", "PHONE_NUMBER"]),
    ("```json\n{{\"email\": \"{EMAIL_ADDRESS}\", \"card\": \"{CREDIT_CARD}\"}}\n```", ["EMAIL_ADDRESS", "CREDIT_CARD"]),
    ("Is {URL} a phishing site? It asked for my card {CREDIT_CARD}.", ["URL", "CREDIT_CARD"]),
]

NER_TEMPLATES: list[tuple[str, list[tuple[str, str]]]] = [
    ("My name is {p} and I live in {c}.", [("PERSON", "{p}"), ("LOCATION", "{c}")]),
    ("Please write a cover letter for {p}, who is moving to {c} next month.", [("PERSON", "{p}"), ("LOCATION", "{c}")]),
    ("{p} asked me to book a flight from {c} to {c2}.", [("PERSON", "{p}"), ("LOCATION", "{c}"), ("LOCATION", "{c2}")]),
]

NEGATIVES = [
    "Edit main.py and README.md, then run pytest tests/test_app.py -x.",
    "Open package.json and tsconfig.json and bump the version to 2.14.3.",
    "Why does logger.info not print anything when I run app.py under gunicorn?",
    "In Node.js, what is the difference between require and import? ASP.NET Core does it differently.",
    "Rename utils.rs to helpers.rs and update mod.rs accordingly.",
    "My build.sh fails at line 42 with 'permission denied'.",
    "The meeting is on 2024-03-15 at 14:30; please add it to the calendar.",
    "Upgrade from Python 3.11.4 to 3.12.1 broke my requirements.in file.",
    "Order number 2024-118-7734 shipped yesterday; can you write a tracking update?",
    "The commit 3f2a9c1b4d5e6f708192a3b4c5d6e7f809102a3b introduced the regression.",
    "Compute 1234567 * 89 and explain the steps.",
    "The ISBN of the book is 978-0-13-468599-1.",
    "UUID 123e4567-e89b-12d3-a456-426614174000 is the request id in the logs.",
    "Our server listens on port 8080 and the worker pool has 16 threads.",
    "In pandas, df.to_csv('out.csv') writes the index unless index=False.",
    "What does self.name refer to inside a dataclass with slots=True?",
    "The test card 4111 1111 1111 1112 should be rejected by the Luhn check.",
    "Revenue grew from 1,250,000 to 1,480,000 dollars in 2023.",
    "Set timeout=30 and retries=3 in config.yaml, then restart.",
    "Explain the formula e = mc^2 in simple terms.",
    "How do I ignore files in git? I want to skip node_modules and .env files.",
    "Reset my password please, I forgot it.",
    "The flight leaves at 07:45 and lands at 11:20 local time.",
    "import numpy as np; x = np.int64(5); print(x.dtype)",
    "chai: expect(result).to.be.equal(42) fails with undefined.",
    "The dataset has 4,812 rows and 37 columns; summarise the distributions.",
    "Version v1.2.3-rc.4 is tagged; please write the changelog.",
    "The ratio 3.14159 appears in both formulas.",
    "Write a haiku about autumn leaves.",
    "Refactor this function: def add(a, b): return a + b",
    "My zip code area has 12 schools and 3 hospitals.",
    "The table has columns id, created_at, updated_at and user_id.",
    "Call the function twice: first with 10, then with 20.",
    "What is 2 + 2 * 10?",
    "The docker image sha256:9a1b2c3d4e5f is cached locally.",
    "Latency p50 is 12.4 ms and p99 is 48.9 ms.",
    "Please review styles.css and index.html for accessibility issues.",
    "The invoice total is EUR 1.299,00 including VAT.",
    "Use java.util.List instead of arrays here.",
    "Our office phone tree has 4 options; option 2 is billing.",
]


# hard cases, most of them known misses or false alarms; they stay in the corpus so the figures are honest
HARD = [
    ("My number is 555 0134, call after lunch.", [("PHONE_NUMBER", "555 0134")]),
    ("Write to john dot doe at example dot com for access.", [("EMAIL_ADDRESS", "john dot doe at example dot com")]),
    ("iban gb33bukb20201555555555 (lower case, as typed on a phone)", [("IBAN_CODE", "gb33bukb20201555555555")]),
    ("Reference number 415-555-0198 is on the parcel label.", []),
    ("The part number 0300 2211 8765 is out of stock.", []),
]


def fill(template: str, types: list[str]) -> tuple[str, list[dict[str, str]]]:
    makers = {
        "EMAIL_ADDRESS": email, "PHONE_NUMBER": phone, "CREDIT_CARD": lambda: card()[0], "US_SSN": ssn, "IBAN_CODE": iban,
        "IP_ADDRESS": lambda: rng.choice([ipv4, ipv4, ipv6])(), "URL": url, "CRYPTO": lambda: rng.choice(CRYPTO), "MAC_ADDRESS": mac,
    }
    ents = []
    text = template
    for t in types:
        value = makers[t]()
        text = text.replace("{" + t + "}", value, 1)
        ents.append({"type": t, "value": value})
    return text.replace("{{", "{").replace("}}", "}"), ents


def main() -> None:
    rows = []
    n = 0
    for rep in range(6):
        for template, types in POSITIVE_TEMPLATES:
            text, ents = fill(template, types)
            n += 1
            rows.append({"id": f"pos-{n}", "text": text, "entities": ents})
    for rep in range(4):
        for template, ents_t in NER_TEMPLATES:
            p = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            c, c2 = rng.sample(CITIES, 2)
            text = template.format(p=p, c=c, c2=c2)
            ents = [{"type": t, "value": v.format(p=p, c=c, c2=c2)} for t, v in ents_t]
            n += 1
            rows.append({"id": f"ner-{n}", "text": text, "entities": ents})
    for i, text in enumerate(NEGATIVES):
        rows.append({"id": f"neg-{i + 1}", "text": text, "entities": []})
    for i in range(10):
        rows.append({"id": f"neg-card-{i + 1}", "text": f"Why is {bad_card()} rejected as invalid by the form?", "entities": []})
    for i, (text, ents_h) in enumerate(HARD):
        rows.append({"id": f"hard-{i + 1}", "text": text, "entities": [{"type": t, "value": v} for t, v in ents_h]})
    # a long document with a single address deep inside: the windowed fast path's case
    filler = " ".join(rng.choice(["the", "quarterly", "report", "shows", "steady", "growth", "in", "all", "regions", "and", "teams", "margin", "improved"]) for _ in range(900))
    for i in range(3):
        e = email()
        ph = phone()
        text = f"{filler[: 2500 + i * 700]} For questions contact {e} or phone {ph}. {filler[: 1800]}"
        rows.append({"id": f"long-{i + 1}", "text": text, "entities": [{"type": "EMAIL_ADDRESS", "value": e}, {"type": "PHONE_NUMBER", "value": ph}]})
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} samples to {OUT}")


if __name__ == "__main__":
    main()
