"""Cache entries: assemble a streamed answer into a whole one, and replay either form.

An entry keeps the whole answer (what a non-streamed request would get) and,
when it came from a stream, the stream's chunks too, so a streamed hit replays
what the upstream sent and a plain hit gets the assembled body.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

ENTRY_VERSION = 1
#: message fields a delta carries as objects of fragments: the legacy ``function_call`` (name, arguments)
#: and ``audio`` (data, transcript; its ``id`` and ``expires_at`` whole)
_OBJECT_FIELDS = frozenset({"function_call", "audio"})
#: their string members sent whole, not as fragments
_WHOLE = frozenset({"id"})


class StreamAssembler:
    """Folds chat/completions stream chunks into the body a non-streamed call returns."""

    __slots__ = ("chunks", "head", "choices", "usage", "broken", "_kind")

    def __init__(self) -> None:
        self.chunks: list[Any] = []
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        #: an error event or an unparseable chunk: this stream is not stored
        self.broken = False
        self._kind: str | None = None

    def add(self, obj: Any) -> None:
        if not isinstance(obj, dict) or "error" in obj:
            self.broken = True
            return
        choices = obj.get("choices")
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if choices == [] and "usage" in obj:
            return  # the include_usage chunk: replayed only to callers who ask for it
        if not isinstance(choices, list):
            self.broken = True
            return
        if not self.head:
            self.head = {k: obj[k] for k in ("id", "created", "model", "system_fingerprint") if k in obj}
            self._kind = "text" if obj.get("object") == "text_completion" else "chat"
        chunk = {k: v for k, v in obj.items() if k != "usage"}
        self.chunks.append(chunk)
        for ch in choices:
            if not isinstance(ch, dict):
                self.broken = True
                return
            self._fold(ch)

    def _fold(self, ch: dict[str, Any]) -> None:
        idx = ch.get("index", 0)
        acc = self.choices.setdefault(idx, {"index": idx, "parts": {}, "objects": {}, "tools": {}, "finish_reason": None,
                                            "logprobs": None})
        if ch.get("finish_reason") is not None:
            acc["finish_reason"] = ch["finish_reason"]
        lp = ch.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            acc["logprobs"] = acc["logprobs"] or {"content": []}
            acc["logprobs"]["content"].extend(lp["content"])
        elif isinstance(lp, dict) and isinstance(lp.get("tokens"), list):
            # completions: parallel lists
            acc["logprobs"] = acc["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                if isinstance(lp.get(k), list):
                    acc["logprobs"].setdefault(k, []).extend(lp[k])
        if "text" in ch and isinstance(ch["text"], str):
            acc["parts"]["text"] = acc["parts"].get("text", "") + ch["text"]
        delta = ch.get("delta")
        if not isinstance(delta, dict):
            return
        for k, v in delta.items():
            if k == "role":
                if v:
                    acc["role"] = v
            elif k == "tool_calls" and isinstance(v, list):
                for tc in v:
                    if not isinstance(tc, dict):
                        continue
                    slot = acc["tools"].setdefault(tc.get("index", len(acc["tools"])), {"function": {"name": "", "arguments": ""}})
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    if tc.get("type"):
                        slot["type"] = tc["type"]
                    fn = tc.get("function")
                    if isinstance(fn, dict):
                        if fn.get("name"):
                            slot["function"]["name"] += fn["name"]
                        if fn.get("arguments"):
                            slot["function"]["arguments"] += fn["arguments"]
            elif isinstance(v, str):
                # content, refusal, reasoning_content...: every text field of a delta is a fragment
                acc["parts"][k] = acc["parts"].get(k, "") + v
            elif k in _OBJECT_FIELDS and isinstance(v, dict):
                obj = acc["objects"].setdefault(k, {})
                for sk, sv in v.items():
                    if isinstance(sv, str) and sk not in _WHOLE:
                        obj[sk] = obj.get(sk, "") + sv
                    elif sv is not None:
                        obj[sk] = sv

    @property
    def complete(self) -> bool:
        return not self.broken and bool(self.choices) and all(c["finish_reason"] is not None for c in self.choices.values())

    def body(self) -> dict[str, Any]:
        """The assembled non-streamed answer."""
        out: dict[str, Any] = dict(self.head)
        choices = []
        for idx in sorted(self.choices):
            acc = self.choices[idx]
            if self._kind == "text":
                choice: dict[str, Any] = {"index": idx, "text": acc["parts"].get("text", "")}
            else:
                msg: dict[str, Any] = {"role": acc.get("role", "assistant")}
                msg.update(acc["parts"])
                msg.setdefault("content", None)
                msg.update(acc["objects"])
                if acc["tools"]:
                    msg["tool_calls"] = [
                        {"id": t.get("id"), "type": t.get("type", "function"), "function": t["function"]}
                        for _, t in sorted(acc["tools"].items())
                    ]
                choice = {"index": idx, "message": msg}
            choice["logprobs"] = acc["logprobs"]
            choice["finish_reason"] = acc["finish_reason"]
            choices.append(choice)
        out["object"] = "text_completion" if self._kind == "text" else "chat.completion"
        out["choices"] = choices
        if self.usage is not None:
            out["usage"] = self.usage
        return out


def make_entry(body: dict[str, Any], chunks: list[Any] | None, now: float | None = None) -> bytes:
    return orjson.dumps({"v": ENTRY_VERSION, "body": body, "chunks": chunks, "stored_at": now if now is not None else time.time()})


def read_entry(raw: bytes) -> dict[str, Any] | None:
    """The entry, or ``None`` when it is from another version or damaged (treated as a miss)."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or entry.get("v") != ENTRY_VERSION or not isinstance(entry.get("body"), dict):
        return None
    return entry


def _chunk_head(body: dict[str, Any], text: bool) -> dict[str, Any]:
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint") if k in body}
    head["object"] = "text_completion" if text else "chat.completion.chunk"
    return head


def synthesise_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream chunks equivalent to a whole answer, shaped as vLLM and OpenAI send them."""
    text = body.get("object") == "text_completion"
    head = _chunk_head(body, text)
    out: list[dict[str, Any]] = []
    for ch in body.get("choices") or []:
        idx = ch.get("index", 0)
        if text:
            out.append({**head, "choices": [{"index": idx, "text": ch.get("text", ""), "logprobs": ch.get("logprobs"), "finish_reason": None}]})
            out.append({**head, "choices": [{"index": idx, "text": "", "logprobs": None, "finish_reason": ch.get("finish_reason")}]})
            continue
        msg = ch.get("message") or {}
        out.append({**head, "choices": [{"index": idx, "delta": {"role": msg.get("role", "assistant"), "content": "" if isinstance(msg.get("content"), str) else None}, "logprobs": None, "finish_reason": None}]})
        delta = {k: v for k, v in msg.items() if (isinstance(v, str) and k != "role") or (k in _OBJECT_FIELDS and isinstance(v, dict))}
        if delta:
            out.append({**head, "choices": [{"index": idx, "delta": delta, "logprobs": ch.get("logprobs"), "finish_reason": None}]})
        tools = msg.get("tool_calls")
        if isinstance(tools, list) and tools:
            calls = [{"index": i, **t} for i, t in enumerate(tools) if isinstance(t, dict)]
            out.append({**head, "choices": [{"index": idx, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}]})
        out.append({**head, "choices": [{"index": idx, "delta": {}, "logprobs": None, "finish_reason": ch.get("finish_reason")}]})
    return out


def replay_chunks(entry: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks to stream for a hit; the usage chunk only when the caller asked for it."""
    body = entry["body"]
    chunks = entry.get("chunks") or synthesise_chunks(body)
    if include_usage and isinstance(body.get("usage"), dict):
        text = body.get("object") == "text_completion"
        chunks = [*chunks, {**_chunk_head(body, text), "choices": [], "usage": body["usage"]}]
    return chunks


def is_complete_body(body: Any) -> bool:
    """A whole successful answer: JSON object, no error, every choice finished (when it has choices)."""
    if not isinstance(body, dict) or "error" in body:
        return False
    choices = body.get("choices")
    if choices is None:
        return "data" in body  # embeddings and other list answers
    return isinstance(choices, list) and bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)
