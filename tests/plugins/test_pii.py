"""pii plugin: config validation and the request/answer hooks, through the real config and a real runtime."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any, AsyncIterator, Iterator

import orjson
import pytest
from pydantic import ValidationError

from plugins.pii import VAULT, Pii, PiiConfig
from proxy import ProxyError
from proxy.context import Response
from proxy.testing import configure_plugin, make_context, make_runtime

EMAIL = "ann.lee@example.org"
PHONE = "+1 415 555 0132"
CARD = "5555 5555 5555 4444"


@pytest.fixture
async def runtime(tmp_path) -> AsyncIterator[Any]:
    rt = await make_runtime(tmp_path)
    yield rt
    await rt.close_all()


async def plugin(runtime: Any, **config: Any) -> Pii:
    # Presidio in the executor threads unless a test asks for worker processes (each costs a spawn)
    p = await configure_plugin(Pii, {"processes": 0, **config}, runtime=runtime)
    assert isinstance(p, Pii)
    return p


def chat(*contents: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents], **extra}


def sent(ctx: Any) -> Any:
    return orjson.loads(ctx.body_bytes())


# -- config ---------------------------------------------------------------------

def errors(**config: Any) -> str:
    with pytest.raises(ValidationError) as ei:
        PiiConfig.model_validate(config)
    return "; ".join(e["msg"] for e in ei.value.errors())


def test_defaults_are_valid_and_pattern_only() -> None:
    c = PiiConfig()
    assert c.action == "redact" and not c.ner and not c.restore and c.fast_path
    assert c.processes == 1 and c.worker_priority == "idle"
    assert "PERSON" not in c.entities and "EMAIL_ADDRESS" in c.entities


def test_config_errors_are_explicit() -> None:
    assert "unknown entity type 'EMAIL'" in errors(entities=["EMAIL"])
    assert errors(entities=["PERSON"]) == "Value error, PERSON needs 'ner: true' (names and places need the NER model)"
    assert errors(actions={"IBAN": "block"}) == "Value error, actions: 'IBAN' is not an entity type this plugin looks for"
    assert errors(action="hash") == "Value error, the 'hash' action needs 'hash_key' (a secret of at least 16 characters)"
    assert errors(restore=True, action="mask") == "Value error, restore: true needs at least one entity type whose action is 'redact'"
    assert "Extra inputs are not permitted" in errors(colour="red")
    assert "less than or equal to 1" in errors(min_score=1.5)
    assert errors(thresholds={"URL": 2.0}) == "Value error, URL: a threshold is between 0 and 1"
    assert "invalid regex" in errors(recognizers=[{"entity": "TICKET", "patterns": [{"regex": "(unclosed"}]}])
    assert "matches the empty string" in errors(recognizers=[{"entity": "TICKET", "patterns": [{"regex": "x*"}]}])
    assert "String should match pattern" in errors(recognizers=[{"entity": "ticket", "patterns": [{"regex": "T-\\d+"}]}])
    assert errors(ner=True, entities=["EMAIL_ADDRESS"]).startswith("Value error, ner: true but no NER entity type")


def test_custom_types_may_take_actions_and_thresholds() -> None:
    c = PiiConfig.model_validate(
        {
            "recognizers": [{"entity": "TICKET", "patterns": [{"regex": r"\bT-\d{5}\b", "score": 0.9}]}],
            "deny_list": {"PROJECT": ["Bluebird"]},
            "actions": {"TICKET": "mask", "PROJECT": "block"},
            "thresholds": {"TICKET": 0.8},
        }
    )
    assert "TICKET" in c.all_entities and "PROJECT" in c.all_entities


# -- requests -------------------------------------------------------------------

async def test_redacts_every_role_and_part_with_stable_placeholders(runtime: Any) -> None:
    p = await plugin(runtime)
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": f"Escalate to {EMAIL}."},
            {"role": "user", "content": [{"type": "text", "text": f"I am {EMAIL}, call {PHONE}"}, {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": orjson.dumps({"email": EMAIL}).decode()}}]},
            {"role": "tool", "tool_call_id": "c1", "content": f"record: card {CARD}, email {EMAIL}"},
        ],
    }
    ctx = make_context(body)
    await p.on_request(ctx)
    out = sent(ctx)
    m = out["messages"]
    assert m[0]["content"] == "Escalate to <EMAIL_1>."
    assert m[1]["content"][0]["text"] == "I am <EMAIL_1>, call <PHONE_1>"
    assert m[1]["content"][1] == body["messages"][1]["content"][1]  # image parts are not text
    assert orjson.loads(m[2]["tool_calls"][0]["function"]["arguments"]) == {"email": "<EMAIL_1>"}
    assert m[3]["content"] == "record: card <CREDIT_CARD_1>, email <EMAIL_1>"
    assert ctx.annotations["pii"] == {"EMAIL_ADDRESS": 4, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}
    assert EMAIL not in ctx.body_bytes().decode() and CARD not in ctx.body_bytes().decode()


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/completions", {"model": "m", "prompt": f"Mail {EMAIL}"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": [f"Mail {EMAIL}", "nothing here"]}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": f"Mail {EMAIL}"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ["nothing", f"Mail {EMAIL}"]}, "input"),
        ("/v1/responses", {"model": "m", "input": f"Mail {EMAIL}"}, "input"),
        ("/v1/responses", {"model": "m", "instructions": f"Sign as {EMAIL}", "input": "hi"}, "instructions"),
        (
            "/v1/responses",
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": f"Mail {EMAIL}"}]}, {"type": "function_call_output", "call_id": "c", "output": f"found {EMAIL}"}]},
            "input",
        ),
        # a tool result as a list of parts (the Responses API allows it): went upstream unscreened
        (
            "/v1/responses",
            {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": f"found {EMAIL}"}]}]},
            "input",
        ),
    ],
)
async def test_every_endpoint_is_in_scope(runtime: Any, path: str, body: dict[str, Any], field: str) -> None:
    p = await plugin(runtime)
    ctx = make_context(body, path=path)
    await p.on_request(ctx)
    text = orjson.dumps(sent(ctx)[field]).decode()
    assert EMAIL not in text and "<EMAIL_1>" in text


async def test_token_id_prompts_and_non_json_bodies_pass_untouched(runtime: Any) -> None:
    p = await plugin(runtime)
    ctx = make_context({"model": "m", "prompt": [[1, 2, 3]]}, path="/v1/completions")
    await p.on_request(ctx)
    assert not ctx.body_changed
    ctx = make_context(b"not json at all " + EMAIL.encode(), path="/v1/audio/speech")
    await p.on_request(ctx)
    assert not ctx.body_changed and "pii" not in ctx.annotations


async def test_nothing_found_leaves_the_original_bytes(runtime: Any) -> None:
    p = await plugin(runtime)
    ctx = make_context(chat("Write a haiku about main.py"))
    await p.on_request(ctx)
    assert not ctx.body_changed and ctx.annotations == {} and VAULT not in ctx.stash


async def test_an_answered_request_is_left_alone(runtime: Any) -> None:
    p = await plugin(runtime, action="block")
    ctx = make_context(chat(f"mail {EMAIL}"))
    ctx.reply(429, {"error": {"message": "slow down"}})
    await p.on_request(ctx)
    assert not ctx.body_changed and "pii" not in ctx.annotations


async def test_mask_and_hash_actions(runtime: Any) -> None:
    p = await plugin(runtime, actions={"CREDIT_CARD": "mask", "EMAIL_ADDRESS": "hash"}, hash_key="k" * 32, mask_keep_last=4)
    ctx = make_context(chat(f"card {CARD} mail {EMAIL}", f"again {EMAIL}"))
    await p.on_request(ctx)
    m = sent(ctx)["messages"]
    hashed = m[0]["content"].split("mail ")[1]
    assert m[0]["content"].startswith("card **** **** **** 4444 mail <EMAIL#")
    assert len(hashed) == len("<EMAIL#>") + 16
    assert m[1]["content"] == f"again {hashed}"  # the same value hashes the same
    p2 = await plugin(runtime, action="hash", hash_key="z" * 32, id="other")
    ctx2 = make_context(chat(f"mail {EMAIL}"))
    await p2.on_request(ctx2)
    assert sent(ctx2)["messages"][0]["content"] != f"mail {hashed}"  # keyed: another key, another hash


async def test_block_names_types_never_values(runtime: Any) -> None:
    p = await plugin(runtime, actions={"CREDIT_CARD": "block", "US_SSN": "block"})
    ctx = make_context(chat(f"card {CARD}, ssn 536-22-1923, mail {EMAIL}"))
    with pytest.raises(ProxyError) as ei:
        await p.on_request(ctx)
    err = ei.value
    assert err.status == 403 and err.code == "pii_detected"
    assert err.message == "This request was blocked because it contains personal data (CREDIT_CARD, US_SSN)."
    assert CARD not in err.body().decode() and "536-22-1923" not in err.body().decode()
    assert ctx.annotations["pii"] == {"CREDIT_CARD": 1, "US_SSN": 1, "EMAIL_ADDRESS": 1}


async def test_client_text_that_looks_like_a_placeholder_is_never_reused(runtime: Any) -> None:
    p = await plugin(runtime, restore=True)
    ctx = make_context(chat(f"The template says <EMAIL_1>; mine is {EMAIL}"))
    await p.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "The template says <EMAIL_1>; mine is <EMAIL_2>"


async def test_allow_and_deny_lists_and_custom_recognizers(runtime: Any) -> None:
    p = await plugin(
        runtime,
        allow_list=["support@example.com"],
        deny_list={"PROJECT": ["Bluebird"]},
        recognizers=[{"entity": "TICKET", "patterns": [{"regex": r"\bT-\d{5}\b", "score": 0.9}], "context": ["ticket"]}],
        actions={"TICKET": "mask"},
        mask_keep_last=0,
    )
    ctx = make_context(chat(f"support@example.com asks about BLUEBIRD ticket T-12345 for {EMAIL}"))
    await p.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "support@example.com asks about <PROJECT_1> ticket *-***** for <EMAIL_1>"


def texts_metric(runtime: Any, result: str) -> float:
    return runtime.metrics.get_sample_value("sluice_pii_texts_total", {"result": result}) or 0.0


async def test_prescan_and_cache_keep_resent_history_away_from_presidio(runtime: Any) -> None:
    p = await plugin(runtime)
    history = [f"turn {i}: mail {EMAIL} and call {PHONE}" for i in range(5)] + ["a question without personal data"]
    await p.on_request(make_context(chat(*history)))
    assert texts_metric(runtime, "analyzed") == 5 and texts_metric(runtime, "skipped") == 1
    ctx = make_context(chat(*history, "one more question", f"and {EMAIL} again"))
    await p.on_request(ctx)
    assert texts_metric(runtime, "analyzed") == 6  # only the new message with a trigger reached Presidio
    assert texts_metric(runtime, "skipped") == 2 and texts_metric(runtime, "cached") == 6
    assert sent(ctx)["messages"][0]["content"] == "turn 0: mail <EMAIL_1> and call <PHONE_1>"


async def test_timeout_fails_closed_by_default(runtime: Any) -> None:
    p = await plugin(runtime, timeout_ms=1, cache_entries=0)
    big = " ".join(f"user{i}@example.com called 415-555-{i % 10000:04d}" for i in range(3000))
    with pytest.raises(ProxyError) as ei:
        await p.on_request(make_context(chat(big)))
    assert ei.value.status == 503 and ei.value.code == "pii_timeout"
    assert "example.com" not in ei.value.message


async def test_timeout_fails_open_when_configured(runtime: Any) -> None:
    p = await plugin(runtime, timeout_ms=1, cache_entries=0, on_error="open")
    big = " ".join(f"user{i}@example.com called 415-555-{i % 10000:04d}" for i in range(3000))
    ctx = make_context(chat(big))
    await p.on_request(ctx)
    assert not ctx.body_changed and ctx.annotations["pii_error"] == "timeout"
    assert ctx.failed_open == [f"{p.id}.on_request"]  # observers can tell the request went unscreened (tracing withholds content)


async def test_presidio_runs_off_the_event_loop(runtime: Any) -> None:
    p = await plugin(runtime, cache_entries=0)
    text = " ".join(f"user{i}@example.com" for i in range(400))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.get_running_loop().create_task(ticker())
    try:
        await p.on_request(make_context(chat(text)))
    finally:
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    assert ticks > 10  # the loop kept turning while Presidio worked


# -- buffered answers -------------------------------------------------------------

def chat_answer(content: str) -> Response:
    return Response(
        200,
        {"content-type": "application/json"},
        orjson.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}),
    )


async def test_buffered_answer_is_restored(runtime: Any) -> None:
    p = await plugin(runtime, restore=True)
    ctx = make_context(chat(f"mail {EMAIL} and call {PHONE}"))
    await p.on_request(ctx)
    ctx.response = chat_answer("I wrote to <EMAIL_1> and called <PHONE_1>; <EMAIL_7> is unknown.")
    await p.on_response(ctx)
    content = ctx.response.json["choices"][0]["message"]["content"]
    assert content == f"I wrote to {EMAIL} and called {PHONE}; <EMAIL_7> is unknown."
    assert "pii_answer" not in ctx.annotations  # the client's own values are not a leak


async def test_pii_the_model_writes_is_redacted_and_counted(runtime: Any) -> None:
    p = await plugin(runtime, restore=True)
    ctx = make_context(chat(f"mail {EMAIL}"))
    await p.on_request(ctx)
    ctx.response = chat_answer("Sure <EMAIL_1>; also try bob@corp.example.com or 5555 5555 5555 4444.")
    await p.on_response(ctx)
    content = ctx.response.json["choices"][0]["message"]["content"]
    assert content == f"Sure {EMAIL}; also try <EMAIL_2> or <CREDIT_CARD_1>."
    assert ctx.annotations["pii_answer"] == {"EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}


async def test_without_restore_placeholders_stay(runtime: Any) -> None:
    p = await plugin(runtime, scan_answers=False)
    ctx = make_context(chat(f"mail {EMAIL}"))
    await p.on_request(ctx)
    ctx.response = chat_answer("Hello <EMAIL_1>")
    body = ctx.response.body
    await p.on_response(ctx)
    assert ctx.response.body == body


async def test_completions_and_responses_answers_are_restored(runtime: Any) -> None:
    p = await plugin(runtime, restore=True)
    ctx = make_context({"model": "m", "prompt": f"mail {EMAIL}"}, path="/v1/completions")
    await p.on_request(ctx)
    ctx.response = Response(200, None, orjson.dumps({"object": "text_completion", "choices": [{"index": 0, "text": "to <EMAIL_1>"}]}))
    await p.on_response(ctx)
    assert ctx.response.json["choices"][0]["text"] == f"to {EMAIL}"
    ctx = make_context({"model": "m", "input": f"mail {EMAIL}"}, path="/v1/responses")
    await p.on_request(ctx)
    ctx.response = Response(
        200, None, orjson.dumps({"object": "response", "output": [{"type": "message", "content": [{"type": "output_text", "text": "to <EMAIL_1>"}]}]})
    )
    await p.on_response(ctx)
    assert ctx.response.json["output"][0]["content"][0]["text"] == f"to {EMAIL}"


async def test_error_answers_are_not_touched(runtime: Any) -> None:
    p = await plugin(runtime, restore=True)
    ctx = make_context(chat(f"mail {EMAIL}"))
    await p.on_request(ctx)
    ctx.response = Response(400, None, b'{"error": {"message": "bad <EMAIL_1>"}}')
    await p.on_response(ctx)
    assert b"<EMAIL_1>" in ctx.response.body


@pytest.mark.slow
@pytest.mark.parametrize("priority", ["low", "idle", "normal"])
async def test_worker_processes_find_the_same_and_stop_cleanly(runtime: Any, priority: str) -> None:
    # a long timeout: an idle-priority worker waits for spare CPU, and the machine may be busy
    p = await plugin(runtime, processes=1, restore=True, worker_priority=priority, timeout_ms=60_000)
    assert p.workers is not None and p.workers.started
    ctx = make_context(chat(f"mail {EMAIL}, call {PHONE}, card {CARD}"))
    await p.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "mail <EMAIL_1>, call <PHONE_1>, card <CREDIT_CARD_1>"
    procs = [w.proc for w in p.workers.workers]
    assert len(procs) == 1 and procs[0].is_alive()
    pid = procs[0].pid
    if sys.platform == "linux":
        policy = os.sched_getscheduler(pid)
        assert policy == (os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER)
        assert os.getpriority(os.PRIO_PROCESS, pid) == (19 if priority == "low" else os.getpriority(os.PRIO_PROCESS, 0))
    pool = p.workers
    await p.stop()
    assert pool.workers == [] and pool.users == 0
    assert not procs[0].is_alive()  # reaped: it read the closed pipe and left (or was killed after 5 s)


@contextlib.contextmanager
def stopped(proc: Any) -> Iterator[None]:
    """The worker process gets no CPU at all inside the block (SIGSTOP), the extreme of starvation."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def forgotten(w: Any) -> None:
    """Until the worker's pending map is empty (a cancelled job's callback runs on a later loop turn)."""
    async with asyncio.timeout(10):
        while w.pending:
            await asyncio.sleep(0)


def hedged_metric(runtime: Any, first: str) -> float:
    return runtime.metrics.get_sample_value("sluice_pii_hedged_total", {"first": first}) or 0.0


@pytest.mark.slow
async def test_a_starved_worker_hits_the_timeout_and_the_failure_policy_without_the_hedge(runtime: Any) -> None:
    # instances with the same settings share one worker process
    same = {"processes": 1, "cache_entries": 0, "worker_priority": "normal", "hedge_ms": 0}
    closed = await plugin(runtime, timeout_ms=300, **same)
    opened = await plugin(runtime, id="open", timeout_ms=300, on_error="open", **same)
    patient = await plugin(runtime, id="patient", timeout_ms=60_000, **same)
    assert closed.workers is opened.workers is patient.workers and closed.workers is not None
    proc = closed.workers.workers[0].proc
    with stopped(proc):
        with pytest.raises(ProxyError) as ei:
            await closed.on_request(make_context(chat(f"mail {EMAIL}")))
        assert ei.value.status == 503 and ei.value.code == "pii_timeout"
        ctx = make_context(chat(f"mail {EMAIL}"))
        await opened.on_request(ctx)
        assert not ctx.body_changed and ctx.annotations["pii_error"] == "timeout"
    # the worker skips the two jobs nobody waits for and answers the next one
    ctx = make_context(chat(f"call {PHONE}"))
    await patient.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "call <PHONE_1>"
    assert closed.workers.workers[0].proc is proc
    assert closed.engine is not None and not closed.engine.loaded  # no hedge: no engine in this process
    assert hedged_metric(runtime, "executor") == hedged_metric(runtime, "worker") == 0
    for p in (closed, opened, patient):
        await p.stop()


@pytest.mark.slow
async def test_a_starved_worker_is_hedged_by_the_executor(runtime: Any) -> None:
    # the default timeout and failure policy (closed): without the hedge this request would get a 503
    p = await plugin(runtime, processes=1, cache_entries=0, hedge_ms=50)
    assert p.workers is not None and p.engine is not None and p.engine.loaded
    w = p.workers.workers[0]
    with stopped(w.proc):
        ctx = make_context(chat(f"mail {EMAIL}, call {PHONE}, card {CARD}"))
        await p.on_request(ctx)
        assert sent(ctx)["messages"][0]["content"] == "mail <EMAIL_1>, call <PHONE_1>, card <CREDIT_CARD_1>"
        assert hedged_metric(runtime, "executor") == 1 and hedged_metric(runtime, "worker") == 0
        await forgotten(w)  # the job the executor answered no longer waits on the worker
    await p.stop()


@pytest.mark.slow
async def test_a_worker_answering_after_the_hedge_won_does_not_corrupt_the_next_request(runtime: Any) -> None:
    same = {"processes": 1, "cache_entries": 0, "timeout_ms": 60_000}
    hedged = await plugin(runtime, hedge_ms=50, **same)
    patient = await plugin(runtime, id="patient", hedge_ms=0, **same)  # the same worker process, never hedged
    assert hedged.workers is patient.workers and hedged.workers is not None
    w = hedged.workers.workers[0]
    with stopped(w.proc):
        ctx = make_context(chat(f"mail {EMAIL}"))
        await hedged.on_request(ctx)
        assert sent(ctx)["messages"][0]["content"] == "mail <EMAIL_1>"
        assert hedged_metric(runtime, "executor") == 1
        await forgotten(w)
    # the worker now analyses the hedged job (its deadline is a minute away) and answers it
    # first: that answer is dropped, and the next job gets its own findings
    ctx = make_context(chat(f"call {PHONE} or card {CARD}"))
    await patient.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "call <PHONE_1> or card <CREDIT_CARD_1>"
    ctx = make_context(chat(f"again {EMAIL}"))
    await patient.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "again <EMAIL_1>"
    assert w.pending == {} and hedged.workers.workers[0] is w
    assert hedged_metric(runtime, "executor") == 1
    for p in (hedged, patient):
        await p.stop()


@pytest.mark.slow
async def test_a_worker_that_dies_is_replaced(runtime: Any) -> None:
    from plugins._pii_engine import WorkerLost

    p = await plugin(runtime, processes=1, timeout_ms=60_000, cache_entries=0)
    pool = p.workers
    assert pool is not None
    old = pool.workers[0].proc
    os.kill(old.pid, signal.SIGKILL)
    await asyncio.get_running_loop().run_in_executor(None, old.join, 30)
    # the request in flight when the worker is found dead fails (the plugin's failure
    # policy applies), or waits for the new worker
    ctx = make_context(chat(f"mail {EMAIL}"))
    try:
        await p.on_request(ctx)
    except WorkerLost:
        pass
    else:
        assert sent(ctx)["messages"][0]["content"] == "mail <EMAIL_1>"
    async with asyncio.timeout(60):
        await pool.wait_ready()
    assert len(pool.workers) == 1 and pool.workers[0].proc is not old and pool.workers[0].proc.is_alive()
    ctx = make_context(chat(f"card {CARD}"))
    await p.on_request(ctx)
    assert sent(ctx)["messages"][0]["content"] == "card <CREDIT_CARD_1>"
    await p.stop()
