"""The built-in demo model server: a small, deterministic OpenAI-compatible upstream.

It answers like vLLM's OpenAI server (see shared/UPSTREAM-FACTS.md): chat and
completions, streamed and not, with usage (and the usage chunk only when
``stream_options.include_usage`` is set), the Responses API, embeddings with
deterministic vectors (float or base64), the models list, audio in and out, a
vLLM-style ``/metrics``, and an echo for every other path. The answer text
repeats the prompt, so tests can see what reached the model.

Tests drive faults through attributes (``token_delay``, ``fail_next(...)``,
``drop_after``, ``stall_after``, ...) and wait on state with ``wait_for``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict

TOKEN_RE = re.compile(r"\S+\s*|\s+")
WORD_RE = re.compile(r"\w+|[^\w\s]")
DEMO_MODEL = "sluice-demo"
PREFIX = "Hello from the Sluice demo model. You said: "
#: headers the echo never repeats (an upstream key a proxy adds would go back to its client)
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"})


def count_tokens(text: str) -> int:
    return len(WORD_RE.findall(text))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


@dataclass
class Seen:
    """A request the demo upstream received."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@dataclass
class Failure:
    status: int
    body: bytes
    headers: dict[str, str]
    remaining: int
    path_contains: str | None = None


@dataclass
class Counters:
    running: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    aborted: int = 0
    completed_streams: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class DemoUpstream:
    """An OpenAI-compatible model server on 127.0.0.1 (port 0 picks a free one)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_delay: float = 0.0, model: str = DEMO_MODEL, record: bool = True) -> None:
        self.host = host
        self.port = port
        self.model = model
        #: seconds between streamed tokens
        self.token_delay = token_delay
        #: seconds before the answer's headers are sent
        self.first_byte_delay = 0.0
        #: seconds between a stream's headers (sent at once) and its first event, as a model
        #: server's prefill: vLLM sends the headers before the first token exists
        self.first_event_delay = 0.0
        #: streamed chat chunks carry ``"usage":null`` when the usage is asked for, as OpenAI's do
        #: (vLLM's have no usage key before the usage chunk)
        self.null_usage = False
        #: the model name answers carry whatever was asked (OpenAI answers "gpt-4o" with its dated snapshot)
        self.answer_model: str | None = None
        #: close the connection after this many stream events (no [DONE])
        self.drop_after: int | None = None
        #: stop sending after this many stream events and hold the connection open
        self.stall_after: int | None = None
        #: send usage with wrong types
        self.malformed_usage = False
        #: reply text instead of the echo (tests that need a given answer)
        self.reply_text: str | None = None
        #: events per SSE write: >1 merges several tokens into one network chunk, as vLLM does under load
        self.events_per_write = 1
        #: cut every SSE write into writes of at most this many bytes (events split mid-way),
        #: ``piece_delay`` apart (None: ``token_delay``; 0: at once, so that a read holds several)
        self.piece_bytes: int | None = None
        self.piece_delay: float | None = None
        self.record = record
        self.requests: list[Seen] = []
        self.stats = Counters()
        self._failures: list[Failure] = []
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    # -- control ------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail_next(self, status: int, count: int = 1, *, body: Any = None, headers: dict[str, str] | None = None, path_contains: str | None = None) -> None:
        """The next ``count`` requests get ``status`` (an OpenAI-shaped error body unless given)."""
        if body is None:
            body = {"error": {"message": f"demo failure {status}", "type": "server_error" if status >= 500 else "invalid_request_error", "param": None, "code": status}}
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        self._failures.append(Failure(status, raw, dict(headers or {}), count, path_contains))

    def _notify(self) -> None:
        # wake every waiter: they re-check their predicate against the new state
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked whenever the server's state changes)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                assert self._changed is not None
                await self._changed.wait()

    # -- life cycle -----------------------------------------------------------
    async def start(self) -> DemoUpstream:
        self._changed = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self._health)
        r.add_get("/ping", self._health)
        r.add_get("/version", self._version)
        r.add_get("/metrics", self._metrics)
        r.add_get("/v1/models", self._models)
        r.add_get("/v1/models/{model:.+}", self._model)  # ids may hold a slash (org/name)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/responses", self._responses)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_post("/v1/audio/speech", self._speech)
        r.add_post("/v1/audio/transcriptions", self._transcriptions)
        r.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DemoUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- helpers ----------------------------------------------------------------
    async def _enter(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        body = await request.read()
        self.stats.requests += 1
        if self.record:
            self.requests.append(Seen(request.method, request.path, request.raw_path.partition("?")[2], CIMultiDict(request.headers), body))
        self._notify()
        for f in self._failures:
            if f.remaining > 0 and (f.path_contains is None or f.path_contains in request.path):
                f.remaining -= 1
                self._failures = [x for x in self._failures if x.remaining > 0]
                return body, web.Response(status=f.status, body=f.body, headers={"content-type": "application/json", **f.headers})
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)
        return body, None

    async def _accept(self, request: web.Request, required: str) -> tuple[dict[str, Any], web.Response | None]:
        """Record the request, apply a queued failure, and check the JSON body has ``required``."""
        raw, fail = await self._enter(request)
        if fail is not None:
            return {}, fail
        body = self._json(raw)
        if not isinstance(body, dict) or required not in body:
            return {}, self._bad(f"{required}: Field required", required)
        return body, None

    @staticmethod
    def _bad(message: str, param: str | None = None, status: int = 400) -> web.Response:
        err = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}
        return web.Response(status=status, body=orjson.dumps(err), content_type="application/json")

    def _usage(self, prompt: int, completion: int) -> dict[str, Any]:
        if self.malformed_usage:
            return {"prompt_tokens": "many", "completion_tokens": None, "total_tokens": "x"}
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion, "prompt_tokens_details": None}

    def _answer(self, prompt_text: str, max_tokens: int | None) -> tuple[list[str], str]:
        text = self.reply_text if self.reply_text is not None else PREFIX + (prompt_text.strip() or "nothing")
        toks = TOKEN_RE.findall(text)
        if max_tokens is not None and max_tokens < len(toks):
            return toks[:max_tokens], "length"
        return toks, "stop"

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None

    async def _sse(self, request: web.Request, events: list[bytes], *, headers: dict[str, str] | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8", **(headers or {})})
        await resp.prepare(request)
        if self.first_event_delay:
            # aiohttp (3.11 on) holds the headers back until the first body write: send them now
            send_headers = getattr(request.writer, "send_headers", None)
            if send_headers is not None:
                send_headers()
            await asyncio.sleep(self.first_event_delay)
        self.stats.running += 1
        self._notify()
        sent = 0
        try:
            step = max(1, self.events_per_write)
            for i in range(0, len(events), step):
                if self.drop_after is not None and sent >= self.drop_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if self.stall_after is not None and sent >= self.stall_after:
                    await asyncio.Event().wait()  # held open until the client gives up
                batch = events[i : i + step]
                data = b"".join(batch)
                if self.piece_bytes:
                    gap = self.token_delay if self.piece_delay is None else self.piece_delay
                    for j in range(0, len(data), self.piece_bytes):
                        if j and gap:
                            await asyncio.sleep(gap)
                        await resp.write(data[j : j + self.piece_bytes])
                else:
                    await resp.write(data)
                sent += len(batch)
                if self.token_delay and i + step < len(events):
                    await asyncio.sleep(self.token_delay)
            await resp.write_eof()
            self.stats.completed_streams += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.stats.aborted += 1
            raise
        finally:
            self.stats.running -= 1
            self._notify()
        return resp

    # -- endpoints ----------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "sluice-demo"})

    async def _metrics(self, request: web.Request) -> web.Response:
        s = self.stats
        m = f'model_name="{self.model}",engine="0"'
        text = (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{m}}} {float(s.running)}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{m}}} 0.0\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{{m}}} {min(1.0, s.running / 16):.4f}\n"
            f"# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{{{m}}} {float(s.prompt_tokens)}\n"
            f"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{{{m}}} {float(s.generation_tokens)}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        _, fail = await self._enter(request)
        if fail is not None:
            return fail
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 1700000000, "owned_by": "sluice", "root": self.model, "parent": None, "max_model_len": 4096}]}
        )

    async def _model(self, request: web.Request) -> web.Response:
        _, fail = await self._enter(request)
        if fail is not None:
            return fail
        name = request.match_info["model"]
        if name != self.model:  # as vLLM answers an unknown model
            err = {"error": {"message": f"The model `{name}` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}}
            return web.Response(status=404, body=orjson.dumps(err), content_type="application/json")
        return web.json_response({"id": self.model, "object": "model", "created": 1700000000, "owned_by": "sluice"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw, fail = await self._enter(request)
        if fail is not None:
            return fail
        body = self._json(raw)
        if not isinstance(body, dict):
            return self._bad("Request body is not valid JSON.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._bad("messages: Field required", "messages")
        model = self.answer_model or body.get("model") or self.model
        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        last_user = next((_text_of(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
        prompt_tokens = sum(count_tokens(t) for t in texts) + 3 * len(messages)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        toks, finish = self._answer(last_user, max_tokens if isinstance(max_tokens, int) else None)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += len(toks)
        cid = "chatcmpl-" + os.urandom(8).hex()
        created = int(time.time())
        if body.get("stream") is not True:
            msg = {"role": "assistant", "content": "".join(toks), "refusal": None, "annotations": None, "audio": None, "function_call": None, "tool_calls": [], "reasoning": None}
            return web.Response(
                body=orjson.dumps(
                    {
                        "id": cid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None}],
                        "service_tier": None, "system_fingerprint": None,
                        "usage": self._usage(prompt_tokens, len(toks)),
                        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
                    }
                ),
                content_type="application/json",
            )
        so = body.get("stream_options") or {}
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        # as vLLM: a running usage in every chunk only when the usage chunk was asked for too
        continuous = include_usage and so.get("continuous_usage_stats") is True
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish_reason: str | None, n: int) -> bytes:
            c: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if continuous:
                c["usage"] = self._usage(prompt_tokens, n)
            elif include_usage and self.null_usage:
                c["usage"] = None
            return b"data: " + orjson.dumps(c) + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""}, None, 0)]
        for i, t in enumerate(toks):
            events.append(chunk({"content": t}, finish if i == len(toks) - 1 else None, i + 1))
        return await self._end_stream(request, events, base, include_usage, prompt_tokens, len(toks))

    async def _end_stream(self, request: web.Request, events: list[bytes], base: dict[str, Any], include_usage: bool, prompt: int, completion: int) -> web.StreamResponse:
        """Chat and completions streams end alike: the usage chunk when asked for, then [DONE]."""
        if include_usage:
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": self._usage(prompt, completion)}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._sse(request, events)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._accept(request, "prompt")
        if early is not None:
            return early
        prompt = body["prompt"]
        ptext = prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else ""
        model = self.answer_model or body.get("model") or self.model
        prompt_tokens = count_tokens(ptext)
        max_tokens = body.get("max_tokens", 16)
        toks, finish = self._answer(ptext, max_tokens if isinstance(max_tokens, int) else 16)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += len(toks)
        cid = "cmpl-" + os.urandom(8).hex()
        created = int(time.time())
        if body.get("stream") is not True:
            return web.Response(
                body=orjson.dumps(
                    {
                        "id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": "".join(toks), "logprobs": None, "finish_reason": finish, "stop_reason": None, "prompt_logprobs": None}],
                        "usage": self._usage(prompt_tokens, len(toks)), "kv_transfer_params": None,
                    }
                ),
                content_type="application/json",
            )
        so = body.get("stream_options") or {}
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        events = [
            b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": finish if i == len(toks) - 1 else None, "stop_reason": None}]}) + b"\n\n"
            for i, t in enumerate(toks)
        ]
        return await self._end_stream(request, events, base, include_usage, prompt_tokens, len(toks))

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._accept(request, "input")
        if early is not None:
            return early
        inp = body["input"]
        if isinstance(inp, str):
            ptext = inp
        elif isinstance(inp, list):
            ptext = " ".join(_text_of(i.get("content")) for i in inp if isinstance(i, dict))
        else:
            ptext = ""
        model = self.answer_model or body.get("model") or self.model
        prompt_tokens = count_tokens(ptext) + count_tokens(body.get("instructions") or "")
        mot = body.get("max_output_tokens")
        toks, finish = self._answer(ptext, mot if isinstance(mot, int) else None)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += len(toks)
        rid, mid = "resp_" + os.urandom(12).hex(), "msg_" + os.urandom(12).hex()
        usage = {
            "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(toks), "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt_tokens + len(toks),
        }
        text = "".join(toks)
        status = "completed" if finish == "stop" else "incomplete"
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}

        def response(status_: str, output: list[Any], usage_: Any) -> dict[str, Any]:
            return {
                "id": rid, "object": "response", "created_at": int(time.time()), "status": status_, "model": model,
                "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": body.get("temperature", 1.0),
                "top_p": body.get("top_p", 1.0), "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
                "instructions": body.get("instructions"), "metadata": {}, "error": None, "usage": usage_,
            }

        if body.get("stream") is not True:
            return web.Response(body=orjson.dumps(response(status, [item], usage)), content_type="application/json")
        seq = 0

        def ev(kind: str, **data: Any) -> bytes:
            nonlocal seq
            payload = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

        events = [
            ev("response.created", response=response("in_progress", [], None)),
            ev("response.in_progress", response=response("in_progress", [], None)),
            ev("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []}),
            ev("response.content_part.added", item_id=mid, output_index=0, content_index=0, part={**part, "text": ""}),
        ]
        events += [ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=t, logprobs=[]) for t in toks]
        events += [
            ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[]),
            ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part),
            ev("response.output_item.done", output_index=0, item=item),
            ev("response.completed" if status == "completed" else "response.incomplete", response=response(status, [item], usage)),
        ]
        return await self._sse(request, events)

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, early = await self._accept(request, "input")
        if early is not None:
            return early
        inp = body["input"]
        items = [inp] if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)) else list(inp) if isinstance(inp, list) else []
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 16
        data = []
        ptoks = 0
        for i, it in enumerate(items):
            text = it if isinstance(it, str) else " ".join(map(str, it))
            ptoks += count_tokens(text) if isinstance(it, str) else len(it)
            vec = _vector(text, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if body.get("encoding_format") == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self.stats.prompt_tokens += ptoks
        return web.json_response({"object": "list", "data": data, "model": body.get("model") or self.model, "usage": {"prompt_tokens": ptoks, "total_tokens": ptoks}})

    async def _speech(self, request: web.Request) -> web.Response:
        raw, fail = await self._enter(request)
        if fail is not None:
            return fail
        body = self._json(raw) or {}
        seed = hashlib.sha256(str(body.get("input", "")).encode()).digest()
        audio = b"ID3\x04\x00\x00" + seed * 64
        return web.Response(body=audio, content_type="audio/mpeg")

    async def _transcriptions(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        form = await request.post()
        f = form.get("file")
        size = len(f.file.read()) if hasattr(f, "file") else 0
        if self.record:
            self.requests.append(Seen(request.method, request.path, request.raw_path.partition("?")[2], CIMultiDict(request.headers), b""))
        self._notify()
        return web.json_response({"text": f"{size} bytes of audio for model {form.get('model')}"})

    async def _echo(self, request: web.Request) -> web.Response:
        raw, fail = await self._enter(request)
        if fail is not None:
            return fail
        # what came, for a look at what a proxy forwards; never a credential back to whoever asked
        headers = {k.lower(): "[redacted]" if k.lower() in SECRET_HEADERS else v for k, v in request.headers.items()}
        return web.json_response(
            {"method": request.method, "path": request.path, "query": request.query_string, "body_bytes": len(raw),
             "body_sha256": hashlib.sha256(raw).hexdigest(), "headers": headers},
            headers={"x-demo-echo": "1"},
        )


def _vector(text: str, dims: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        h = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 127.5) / 127.5 for b in h)
        counter += 1
    v = out[:dims]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in v]


async def run(host: str, port: int, token_delay: float) -> None:
    demo = DemoUpstream(host, port, token_delay=token_delay, record=False)
    await demo.start()
    print(f"sluice demo upstream on {demo.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await demo.stop()
