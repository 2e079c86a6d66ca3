"""The pii engine: tuned recognizers, the fast path against plain Presidio, the cache, the corpus."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from plugins._pii_engine import EngineSettings, Finding, PiiEngine, ProcessAnalyzer, ResultCache, resolve_overlaps
from plugins._pii_eval import configure_eval, evaluate, load_corpus, run_eval
from plugins._pii_recognizers import PATTERN_ENTITIES, CustomPattern, CustomRecognizer, card_number_ok, luhn_ok
from proxy.testing import make_runtime

CORPUS = Path(__file__).parents[1] / "data" / "pii_corpus.jsonl"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def engine() -> PiiEngine:
    e = PiiEngine(EngineSettings(entities=PATTERN_ENTITIES))
    e.load()
    return e


def found(engine: PiiEngine, text: str) -> list[tuple[str, str]]:
    return [(f.type, text[f.start:f.end]) for f in engine.analyze_full(text)]


# -- recognizers -----------------------------------------------------------------

@pytest.mark.parametrize(
    "text, value",
    [
        ("call (415) 555-0132 today", "(415) 555-0132"),
        ("call 415-555-0132 today", "415-555-0132"),
        ("call 415.555.0132 today", "415.555.0132"),
        ("call +1 415 555 0132 today", "+1 415 555 0132"),
        ("call +1-415-555-0132 today", "+1-415-555-0132"),
        ("ring +44 20 7946 0958 now", "+44 20 7946 0958"),
        ("ring 020 7946 0958 now", "020 7946 0958"),
        ("ring 07700 900123 now", "07700 900123"),
        ("ruf an: +49 151 23456789", "+49 151 23456789"),
        ("appelle le 06 12 34 56 78", "06 12 34 56 78"),
        ("whatsapp +91 98765 43210", "+91 98765 43210"),
        ("phone number 4155550132", "4155550132"),
    ],
)
def test_phone_formats_are_found_above_threshold(engine: PiiEngine, text: str, value: str) -> None:
    assert ("PHONE_NUMBER", value) in found(engine, text)


@pytest.mark.parametrize(
    "number",
    [
        "2223 0031 2200 3222",  # Mastercard 2-series: Presidio's own pattern misses it
        "2720-9900-0000-0007",
        "5555 5555 5555 4444",
        "4111111111111111",
        "378282246310005",  # Amex
        "6011 1111 1111 1117",  # Discover
        "3530 1113 3330 0000",  # JCB
        "3056 930902 5904",  # Diners
        "6200000000000005",  # UnionPay
    ],
)
def test_cards_of_every_network_are_found(engine: PiiEngine, number: str) -> None:
    assert ("CREDIT_CARD", number) in found(engine, f"my card is {number}, thanks")


def test_card_validation_rules() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert card_number_ok("2221 0000 0000 0009")
    assert not card_number_ok("4111 1111-1111 1111")  # mixed separators
    assert not card_number_ok("9111111111111111")  # no network issues 9...
    assert not card_number_ok("0000000000000000")
    assert not card_number_ok("4111 1111 1111 1112")  # fails Luhn


@pytest.mark.parametrize(
    "text",
    [
        "Edit main.py and README.md then run setup.py",
        "logger.info and self.name and np.int and expect(x).to.be.ok",
        "open package.json, index.js, mod.rs, build.sh and requirements.in",
        "ASP.NET and Node.js and java.util.List",
    ],
)
def test_file_names_and_code_are_not_urls(engine: PiiEngine, text: str) -> None:
    assert [t for t, _ in found(engine, text) if t == "URL"] == []


@pytest.mark.parametrize(
    "text, value",
    [
        ("see https://example.com/a/b?x=1.", "https://example.com/a/b?x=1"),
        ("see www.example.org/path, then", "www.example.org/path"),
        ("go to portal.example.co.uk now", "portal.example.co.uk"),
    ],
)
def test_real_urls_are_found(engine: PiiEngine, text: str, value: str) -> None:
    assert ("URL", value) in found(engine, text)


def test_structured_types(engine: PiiEngine) -> None:
    text = (
        "ssn 536-22-1923, iban GB82 WEST 1234 5698 7654 32, ip 192.168.1.20 and 2001:db8::1, "
        "btc 1BoatSLRHtKNngkdXEeobR76b53LETtpyT, mac 00:1A:2B:3C:4D:5E, mail ann.lee@example.org"
    )
    assert set(found(engine, text)) == {
        ("US_SSN", "536-22-1923"),
        ("IBAN_CODE", "GB82 WEST 1234 5698 7654 32"),
        ("IP_ADDRESS", "192.168.1.20"),
        ("IP_ADDRESS", "2001:db8::1"),
        ("CRYPTO", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT"),
        ("MAC_ADDRESS", "00:1A:2B:3C:4D:5E"),
        ("EMAIL_ADDRESS", "ann.lee@example.org"),
    }


def test_allow_list_deny_list_thresholds_and_custom_recognizers() -> None:
    e = PiiEngine(
        EngineSettings(
            entities=("EMAIL_ADDRESS", "PHONE_NUMBER"),
            thresholds={"PHONE_NUMBER": 0.9},
            allow_list=frozenset({"support@example.com"}),
            deny_list={"PROJECT": ["Bluebird"]},
            custom=(CustomRecognizer("EMPLOYEE_ID", (CustomPattern(r"\bEMP-\d{6}\b", 0.9),)),),
        )
    )
    e.load()
    text = "Ask support@example.com or bob@example.com about project bluebird for EMP-123456; call 415-555-0132."
    assert [(f.type, text[f.start:f.end]) for f in e.analyze(text)] == [
        ("EMAIL_ADDRESS", "bob@example.com"),
        ("PROJECT", "bluebird"),
        ("EMPLOYEE_ID", "EMP-123456"),
    ]
    assert e.analyze(text) == e.analyze_full(text)


def test_the_engine_never_reaches_for_the_network(engine: PiiEngine) -> None:
    assert os.environ.get("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS") == ""
    nlp = engine._analyzer.nlp_engine.nlp["en"]
    assert nlp.pipe_names == ["sluice_pii_lemma"]  # blank English: no model was loaded


def test_analyzer_is_never_built_without_an_explicit_nlp_engine() -> None:
    # presidio's default engine would download en_core_web_lg: every analyzer we build names its engine
    src = (ROOT / "plugins" / "_pii_engine.py").read_text()
    assert src.count("AnalyzerEngine(") == 1
    assert "AnalyzerEngine(registry=registry, nlp_engine=engine" in src


# -- the fast path ---------------------------------------------------------------

def test_prescan_skips_texts_without_triggers(engine: PiiEngine) -> None:
    assert not engine.triggered("Write a haiku about autumn leaves.")
    assert not engine.triggered("Edit main.py and README.md; version 2")
    assert engine.triggered("mail a@b.co")
    assert engine.triggered("call 415 555 0132")


def test_fast_path_equals_plain_presidio_on_the_corpus(engine: PiiEngine) -> None:
    """The differential test: pre-scan and windows find exactly what Presidio finds on whole texts."""
    samples = load_corpus(CORPUS)
    assert len(samples) >= 150
    windowed = 0
    for s in samples:
        if engine.windows(s.text):
            windowed += 1
        assert engine.analyze(s.text) == engine.analyze_full(s.text), s.id
    assert windowed >= 3  # the long documents really took the windowed path


def test_fast_path_equals_plain_presidio_on_long_mixed_documents(engine: PiiEngine) -> None:
    samples = load_corpus(CORPUS)
    import random

    rng = random.Random(7)
    for _ in range(12):
        parts = [rng.choice(samples).text for _ in range(40)]
        doc = "\n\n".join(parts)
        spans = engine.windows(doc)
        assert spans is None or all(doc[a - 1 : a].isspace() or a == 0 for a, _ in spans)
        assert engine.analyze(doc) == engine.analyze_full(doc)


@pytest.mark.slow
async def test_a_worker_process_finds_exactly_what_the_engine_finds(engine: PiiEngine, tmp_path: Path) -> None:
    """Findings cross the pipe as [type, start, end, score]: the same types, spans and scores come back."""
    rt = await make_runtime(tmp_path)
    pool = ProcessAnalyzer(engine.settings, 1, "normal", rt.spawn)
    await pool.start()
    try:
        texts = [s.text for s in load_corpus(CORPUS)]
        got = await pool.analyze_many(texts)
        assert got == [engine.analyze(t) for t in texts]
        assert sum(map(len, got)) >= 150
    finally:
        await pool.close()
        await rt.close_all()


def test_windows_start_and_end_on_whitespace_and_cover_the_triggers(engine: PiiEngine) -> None:
    filler = "lorem ipsum dolor sit amet " * 200
    doc = filler + "mail ann@example.org now " + filler
    spans = engine.windows(doc)
    assert spans and len(spans) == 1
    (a, b), at = spans[0], doc.index("@")
    assert a < at < b
    assert doc[a - 1].isspace() and (b == len(doc) or doc[b].isspace())
    assert b - a < len(doc) // 4


def test_resolve_overlaps_prefers_score_then_length() -> None:
    a = Finding("URL", 0, 10, 0.5)
    b = Finding("EMAIL_ADDRESS", 2, 10, 1.0)
    c = Finding("PHONE_NUMBER", 12, 20, 0.7)
    assert resolve_overlaps([a, b, c]) == [b, c]


# -- the cache -------------------------------------------------------------------

def test_result_cache_is_a_bounded_lru() -> None:
    c = ResultCache(max_entries=2, max_chars=100)
    f = (Finding("EMAIL_ADDRESS", 0, 3, 1.0),)
    c.put("one", f)
    c.put("two", ())
    assert c.get("one") == f  # "one" is now the most recent
    c.put("three", ())
    assert c.get("two") is None and c.get("one") == f and c.get("three") == ()
    c.put("x" * 101, ())  # larger than the whole cache: not kept
    assert len(c) == 2
    big = ResultCache(max_entries=100, max_chars=10)
    big.put("aaaaaa", ())
    big.put("bbbbbb", ())
    assert len(big) == 1 and big.get("bbbbbb") == ()


# -- the corpus and `sluice eval pii` --------------------------------------------

def test_corpus_rates_hold(engine: PiiEngine) -> None:
    rep = evaluate(engine, load_corpus(CORPUS))
    for typ, s in rep.per_type.items():
        assert s.tp + s.fn > 0, typ
        assert s.precision >= 0.95, (typ, s)
        assert s.recall >= 0.92, (typ, s)
    total = rep.total
    assert total.precision >= 0.99 and total.recall >= 0.98


def test_eval_command_reports_per_type(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    configure_eval(p)
    status = run_eval(p.parse_args([str(CORPUS), "--json", "--min-recall", "0.9"]), None)
    out = orjson.loads(capsys.readouterr().out)
    assert status == 0
    assert set(out["types"]) == set(PATTERN_ENTITIES)
    assert out["types"]["CREDIT_CARD"]["recall"] == 1.0
    assert out["texts"] == len(load_corpus(CORPUS))


def test_eval_command_fails_below_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    configure_eval(p)
    assert run_eval(p.parse_args([str(CORPUS), "--min-recall", "0.999"]), None) == 1
    assert "recall" in capsys.readouterr().err


def test_eval_command_rejects_a_bad_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "entities": [{"type": "EMAIL_ADDRESS", "value": "x@y.z"}]}\n')
    p = argparse.ArgumentParser()
    configure_eval(p)
    assert run_eval(p.parse_args([str(bad)]), None) == 2
    assert "does not occur" in capsys.readouterr().err
    # lines of the wrong shape: a message naming the line, not a TypeError traceback
    for line, said in [('{"text": 5}', "must be strings"), ('{"text": "a", "entities": [5]}', "not a corpus line"),
                       ('[1]', "not a corpus line"), ('{"text": "a", "entities": [{"type": 1, "value": "a"}]}', "must be strings")]:
        bad.write_text(line + "\n")
        assert run_eval(p.parse_args([str(bad)]), None) == 2
        assert f"bad.jsonl:1: " in (err := capsys.readouterr().err) and said in err, (line, err)


@pytest.mark.slow
def test_sluice_eval_pii_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "sluice.yaml"
    cfg.write_text("routes:\n  - match: {path: /v1/}\n    chain:\n      - pii: {entities: [EMAIL_ADDRESS, CREDIT_CARD]}\n")
    exe = Path(sys.executable).with_name("sluice")
    r = subprocess.run([str(exe), "eval", "pii", str(CORPUS), "-c", str(cfg), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert set(out["types"]) == {"EMAIL_ADDRESS", "CREDIT_CARD"}
