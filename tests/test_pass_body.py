"""Answers that are neither JSON nor SSE (speech audio, file contents, NDJSON) are relayed as they arrive.

Only ``text/event-stream`` was relayed piece by piece; every other answer was read whole first, so a
client playing text-to-speech as it is made (``audio.speech.with_streaming_response``) got its first
byte only once the upstream had finished, and a file download was held in memory whole.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import openai
import pytest
from aiohttp import web

from proxy.testing import SluiceServer, serve_app, wait_for

FIRST, REST = b"ID3\x04audio-first-piece", b"-and-the-rest" * 100


class Speech:
    """An upstream whose ``/v1/audio/speech`` sends its first piece, then waits for ``go`` before the rest;
    ``how`` says how the rest goes: whole, never (a stall), or cut off (the connection dropped)."""

    def __init__(self, how: str = "whole", content_length: bool = False) -> None:
        self.go = asyncio.Event()
        self.how = how
        self.content_length = content_length

    async def speech(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        r = web.StreamResponse(headers={"content-type": "audio/mpeg"})
        if self.content_length:
            r.content_length = len(FIRST) + len(REST)
        await r.prepare(request)
        await r.write(FIRST)
        await self.go.wait()
        if self.how == "cut":
            assert request.transport is not None
            request.transport.abort()
            return r
        await r.write(REST)
        return r

    def serve(self) -> Any:
        app = web.Application()
        app.router.add_post("/v1/audio/speech", self.speech)
        return serve_app(app)


def config(url: str, **upstream: Any) -> dict[str, Any]:
    return {"upstreams": {"tts": {"url": f"{url}/v1", **upstream}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "tts", "chain": [{"metering": {}}, {"metrics": {}}]}]}


async def test_speech_audio_reaches_the_sdk_as_it_is_made_and_whole(tmp_path: Path):
    up = Speech(content_length=True)
    async with up.serve() as origin, SluiceServer(config(origin), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0, timeout=10) as client:
            async with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="Hello") as r:
                assert r.headers["content-type"] == "audio/mpeg" and r.headers["x-request-id"].startswith("req_")
                assert r.headers["content-length"] == str(len(FIRST) + len(REST))  # a download's size, kept
                pieces = r.iter_bytes()
                got = await asyncio.wait_for(pieces.__anext__(), 10)  # held back whole, this waited for ever
                assert got == FIRST[:len(got)]  # before the upstream sent the rest: it was not held back
                up.go.set()
                async for more in pieces:
                    got += more
        assert got == FIRST + REST
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        assert db.execute("SELECT status, outcome, endpoint FROM ledger").fetchall() == [(200, "ok", "audio/speech")]


@pytest.mark.parametrize("how", ["stall", "cut"])
async def test_an_answer_that_stalls_or_breaks_off_is_not_passed_off_as_whole(tmp_path: Path, how: str):
    """There is no error event to send in audio: the client's connection is cut, so its body is incomplete
    (an error in the SDK), never a short body that looks whole; the ledger says what happened."""
    up = Speech(how=how)
    timeouts = {"timeouts": {"idle": 0.5}} if how == "stall" else {}
    async with up.serve() as origin, SluiceServer(config(origin, **timeouts), tmp_path) as s:
        async with httpx.AsyncClient(timeout=10) as http:
            async with http.stream("POST", f"{s.url}/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "x"}) as r:
                assert r.status_code == 200
                pieces = r.aiter_bytes()
                assert (await pieces.__anext__()).startswith(FIRST[:3])
                if how == "cut":
                    up.go.set()
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in pieces:
                        pass
        up.go.set()  # the stalled upstream's handler ends (else its server waits for it at close)
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        assert db.execute("SELECT status, outcome FROM ledger").fetchall() == [(200, "upstream_error")]


async def test_ndjson_streams_and_json_answers_keep_their_paths(tmp_path: Path):
    """An NDJSON stream (Ollama's native API) is relayed line by line as it comes; a JSON answer is still
    read whole, for the plugins that read it (its usage is metered)."""
    go = asyncio.Event()

    async def ndjson(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await r.prepare(request)
        await r.write(b'{"message":{"content":"Hel"},"done":false}\n')
        await go.wait()
        await r.write(b'{"message":{"content":"lo"},"done":true}\n')
        return r

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"id": "c", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    app = web.Application()
    app.router.add_post("/v1/api/chat", ndjson)
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_app(app) as origin, SluiceServer(config(origin), tmp_path) as s:
        async with httpx.AsyncClient(timeout=10) as http:
            ask = http.stream("POST", f"{s.url}/api/chat", json={"model": "m", "messages": []})
            async with ask as r:
                lines = r.aiter_lines()
                assert await asyncio.wait_for(lines.__anext__(), 10) == '{"message":{"content":"Hel"},"done":false}'
                go.set()
                assert [line async for line in lines] == ['{"message":{"content":"lo"},"done":true}']
            r2 = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": []})
            assert r2.json()["usage"]["total_tokens"] == 4
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT endpoint, prompt_tokens, completion_tokens, estimated FROM ledger ORDER BY ts").fetchall()
    assert rows[1] == ("chat/completions", 3, 1, 0)
    assert rows[0][0] == "api/chat"
