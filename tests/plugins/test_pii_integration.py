"""pii through a real Sluice server, a real upstream and the official openai SDK."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from plugins.pii import Pii
from proxy.testing import FakeUpstream, SluiceServer, register_plugin

EMAIL = "ann.lee@example.org"
PHONE = "+1 415 555 0132"
CARD = "2223 0031 2200 3222"
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _pii_registered() -> Any:
    # under pytest, tests/plugins can shadow the top-level "plugins" package and with it the
    # built-ins' registration; registering the class the way a third-party test would avoids that
    with register_plugin(Pii):
        yield


# the default worker (an idle-priority process) waits for spare CPU: on a busy test machine
# a screened request may wait longer than the default 2 s, which is not what these tests test
PATIENT = {"timeout_ms": 60_000}


def config(up: FakeUpstream, **pii: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"url": up.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "up", "chain": [{"pii": {**PATIENT, **pii}}]}],
    }


def client(s: SluiceServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0)


def last_user_text(up: FakeUpstream) -> str:
    return up.requests[-1].json["messages"][-1]["content"]


async def test_chat_is_redacted_upstream_and_restored_for_the_client(upstream: FakeUpstream, tmp_path: Path) -> None:
    async with SluiceServer(config(upstream, restore=True), tmp_path) as s, client(s) as c:
        r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": f"I am {EMAIL}, call {PHONE}"}])
    assert last_user_text(upstream) == "I am <EMAIL_1>, call <PHONE_1>"
    assert EMAIL.encode() not in upstream.requests[-1].body
    assert r.choices[0].message.content.endswith(f"You said: I am {EMAIL}, call {PHONE}")
    assert "<EMAIL_1>" not in r.choices[0].message.content


async def test_stream_is_restored_event_by_event(upstream: FakeUpstream, tmp_path: Path) -> None:
    async with SluiceServer(config(upstream, restore=True), tmp_path) as s, client(s) as c:
        stream = await c.chat.completions.create(
            model="sluice-demo",
            messages=[{"role": "user", "content": f"mail {EMAIL} now"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith(f"You said: mail {EMAIL} now")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert "<EMAIL_1>" in last_user_text(upstream)


async def test_model_written_placeholder_split_over_network_writes(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.reply_text = "Dear <EMAIL_1>, your number <PHONE_1> is saved."
    upstream.events_per_write = 3
    async with SluiceServer(config(upstream, restore=True), tmp_path) as s, client(s) as c:
        stream = await c.chat.completions.create(
            model="sluice-demo", messages=[{"role": "user", "content": f"I am {EMAIL}, call {PHONE}"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Dear {EMAIL}, your number {PHONE} is saved."


async def test_pii_the_model_emits_is_redacted_in_streams(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.reply_text = "Try bob@corp.example.com or 415-555-0199 instead."
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        stream = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "who do I call?"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Try <EMAIL_1> or <PHONE_1> instead."


async def test_block_answers_403_naming_types_and_never_reaches_upstream(upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with SluiceServer(config(upstream, actions={"CREDIT_CARD": "block"}), tmp_path) as s, client(s) as c:
        with pytest.raises(openai.PermissionDeniedError) as ei:
            await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": f"pay with {CARD}"}])
        await s.wait_idle()
    err = ei.value
    assert err.status_code == 403
    assert err.body["code"] == "pii_detected"
    assert "CREDIT_CARD" in err.body["message"] and CARD not in str(err.body)
    assert [r for r in upstream.requests if r.path.endswith("/chat/completions")] == []
    assert CARD not in caplog.text and "2223" not in caplog.text


async def test_embeddings_completions_and_responses_are_screened(upstream: FakeUpstream, tmp_path: Path) -> None:
    async with SluiceServer(config(upstream, restore=True), tmp_path) as s, client(s) as c:
        await c.embeddings.create(model="sluice-demo", input=[f"profile of {EMAIL}", "nothing"])
        assert upstream.requests[-1].json["input"] == ["profile of <EMAIL_1>", "nothing"]
        comp = await c.completions.create(model="sluice-demo", prompt=f"Write to {EMAIL}")
        assert upstream.requests[-1].json["prompt"] == "Write to <EMAIL_1>"
        assert comp.choices[0].text.endswith(f"Write to {EMAIL}")
        resp = await c.responses.create(model="sluice-demo", input=f"Write to {EMAIL}")
        assert upstream.requests[-1].json["input"] == "Write to <EMAIL_1>"
        assert resp.output_text.endswith(f"Write to {EMAIL}")
        stream = await c.responses.create(model="sluice-demo", input=f"Write to {EMAIL}", stream=True)
        events = [e async for e in stream]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.endswith(f"Write to {EMAIL}")
    done = [e for e in events if e.type == "response.completed"][0]
    assert done.response.output_text.endswith(f"Write to {EMAIL}")


async def test_findings_reach_observers_as_types_and_counts(upstream: FakeUpstream, tmp_path: Path) -> None:
    from proxy import Plugin, hookimpl

    seen: list[dict[str, Any]] = []

    class Recorder(Plugin):
        name = "pii_test_recorder"

        @hookimpl
        def on_done(self, ctx: Any) -> None:
            seen.append({k: v for k, v in ctx.annotations.items() if k.startswith("pii")})

    cfg = config(upstream)
    cfg["routes"][0]["chain"] = [{"pii_test_recorder": {}}, {"pii": dict(PATIENT)}]
    assert Pii.name == "pii"
    with register_plugin(Recorder):
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": f"{EMAIL} {EMAIL} {PHONE}"}]
            )
            await s.wait_idle()
    assert seen == [{"pii": {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1}}]


async def test_example_config_loads_and_serves(upstream: FakeUpstream, tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "pii.yaml").read_text())
    data["upstreams"] = {name: {**u, "url": upstream.url} for name, u in data["upstreams"].items()}
    async with SluiceServer(data, tmp_path) as s, client(s) as c:
        r = await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": f"mail {EMAIL}"}])
    assert EMAIL in r.choices[0].message.content
    assert "<EMAIL_1>" in last_user_text(upstream)


# -- long runs without whitespace: released as they arrive, not at the end ----------

def _blob(n: int) -> str:
    """A base64 blob of ``n`` characters (deterministic), the shape of an inline image or a signed token."""
    import base64
    import hashlib

    raw = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n // 32 + 1))
    return base64.b64encode(raw).decode()[:n]


class PieceUpstream(FakeUpstream):
    """Streams its reply in pieces of a fixed size, as a model streams tokens of a word with no spaces in it."""

    piece = 8

    def _answer(self, prompt_text: str, max_tokens: int | None) -> tuple[list[str], str]:
        text = self.reply_text or ""
        return [text[i:i + self.piece] for i in range(0, len(text), self.piece)], "stop"


async def _read_until(stream: Any, enough: Any, timeout: float) -> str:
    """Text of the stream's chunks until ``enough(text)`` holds; what arrived so far if ``timeout`` passes first."""
    got = ""
    try:
        async with asyncio.timeout(timeout):
            async for chunk in stream:
                if chunk.choices:
                    got += chunk.choices[0].delta.content or ""
                if enough(got):
                    break
    except TimeoutError:
        pass
    return got


@pytest.mark.parametrize("restore", [False, True])
async def test_a_long_run_without_whitespace_reaches_the_client_before_the_stream_ends(tmp_path: Path, restore: bool) -> None:
    head = "Here it is: "
    # head and blob fill whole pieces, so no piece carries the space after the blob
    blob = _blob(2400 + (-(len(head) + 2400)) % PieceUpstream.piece)
    async with PieceUpstream() as up:
        up.reply_text = head + blob + " and that is all."
        # the upstream sends the role chunk, the head and the whole blob, then holds the stream
        # open: whatever the client gets of the blob, it got before the stream ended
        up.stall_after = 1 + len(head + blob) // up.piece
        async with SluiceServer(config(up, restore=restore), tmp_path) as s, client(s) as c:
            stream = await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": f"send the image to {EMAIL}"}], stream=True
            )
            # all of the blob but the part that could still grow into an entity (at most a few hundred characters)
            want = len(head) + len(blob) - 512
            # the timeout only bounds a failing run: the read returns as soon as enough arrived
            got = await _read_until(stream, lambda t: len(t) >= want, timeout=60.0)
            await stream.close()
    assert len(got) >= want, f"only {len(got) - len(head)} of {len(blob)} blob characters reached the client before the stream ended"
    assert (head + blob).startswith(got)


async def test_a_long_run_streamed_to_the_end_arrives_whole(tmp_path: Path) -> None:
    blob = _blob(3000)
    text = f"Image: {blob} mail <EMAIL_1> or bob@corp.example.com, url {blob[:50]}"
    async with PieceUpstream() as up:
        up.reply_text = text
        async with SluiceServer(config(up, restore=True), tmp_path) as s, client(s) as c:
            stream = await c.chat.completions.create(
                model="sluice-demo", messages=[{"role": "user", "content": f"I am {EMAIL}"}], stream=True
            )
            got = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert got == f"Image: {blob} mail {EMAIL} or <EMAIL_2>, url {blob[:50]}"


async def test_answer_logprobs_are_refused_dropped_or_allowed(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The answer's tokens, with their log probabilities, repeat its text where no scan reaches: with
    scan_answers a request asking for them is refused (the default), or they are dropped, or allowed."""
    ask = {"model": "sluice-demo", "messages": [{"role": "user", "content": f"I am {EMAIL}"}], "logprobs": True, "top_logprobs": 2}
    async with SluiceServer(config(upstream), tmp_path / "refuse") as s, client(s) as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(**ask)
        with pytest.raises(openai.BadRequestError) as e2:
            await c.completions.create(model="sluice-demo", prompt="hello", logprobs=0)
        with pytest.raises(openai.BadRequestError) as e3:
            await c.responses.create(model="sluice-demo", input="hello", include=["message.output_text.logprobs"])
        # not asking: false, 0 and absent go through as sent
        await c.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "hi"}], logprobs=False, top_logprobs=0)
        assert upstream.requests[-1].json["logprobs"] is False
    assert e.value.status_code == 400 and e.value.code == "unsupported_parameter" and e.value.param == "logprobs"
    assert e.value.response.headers.get("x-request-id")
    assert EMAIL not in e.value.response.text
    assert (e2.value.code, e2.value.param) == ("unsupported_parameter", "logprobs")
    assert (e3.value.code, e3.value.param) == ("unsupported_parameter", "include")
    assert len(upstream.requests) == 1  # none of the refused reached it

    async with SluiceServer(config(upstream, answer_logprobs="drop"), tmp_path / "drop") as s, client(s) as c:
        r = await c.chat.completions.create(**ask)
        sent = upstream.requests[-1].json
        assert "logprobs" not in sent and "top_logprobs" not in sent and sent["messages"][0]["content"] == "I am <EMAIL_1>"
        assert r.choices[0].message.content
        await c.responses.create(model="sluice-demo", input="hello", include=["message.output_text.logprobs", "reasoning.encrypted_content"],
                                 top_logprobs=3)
        sent = upstream.requests[-1].json
        assert sent["include"] == ["reasoning.encrypted_content"] and "top_logprobs" not in sent

    for name, cfg in (("allow", {"answer_logprobs": "allow"}), ("unscanned", {"scan_answers": False})):
        async with SluiceServer(config(upstream, **cfg), tmp_path / name) as s, client(s) as c:
            await c.chat.completions.create(**ask)
        sent = upstream.requests[-1].json
        assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2), name


def test_which_fields_ask_for_the_answers_tokens() -> None:
    from plugins._pii_scope import answer_token_fields as fields

    assert fields("chat", {"logprobs": True}) == ["logprobs"]
    assert fields("chat", {"logprobs": False, "top_logprobs": 0}) == []
    assert fields("chat", {"top_logprobs": 1}) == ["top_logprobs"]
    assert fields("chat", {"top_logprobs": -1}) == ["top_logprobs"]  # vLLM: the whole vocabulary
    assert fields("completions", {"logprobs": 0}) == ["logprobs"]  # 0 still returns the sampled tokens
    assert fields("completions", {"logprobs": False}) == ["logprobs"]  # vLLM reads false as 0
    assert fields("completions", {"logprobs": None, "echo": True, "prompt_logprobs": 1}) == []
    assert fields("responses", {"top_logprobs": 5, "include": ["message.output_text.logprobs"]}) == ["top_logprobs", "include"]
    assert fields("responses", {"include": ["file_search_call.results"]}) == []
    assert fields("chat", {"return_token_ids": True}) == fields("completions", {"return_token_ids": True}) == ["return_token_ids"]
    assert fields("chat", {"return_token_ids": False}) == []
    assert fields("responses", {"enable_response_messages": True}) == ["enable_response_messages"]
    assert fields("chat", {"enable_response_messages": True}) == []
    assert fields("embeddings", {"logprobs": True}) == []
    assert fields("chat", ["not", "an", "object"]) == []
