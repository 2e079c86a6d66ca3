"""Prompts and completions in the OpenTelemetry GenAI message shape, for captured content.

``gen_ai.input.messages`` and ``gen_ai.output.messages`` are JSON arrays of messages, each a
``role`` and a list of ``parts`` (``{"type": "text", "content": ...}``, ``tool_call``,
``tool_call_response``, ``uri``, ``blob``, ``file``, or a part of another ``type``); an output message also has
its ``finish_reason``. Chat, completions, embeddings and the Responses API map onto it, so a
trace backend reads every endpoint's content, buffered or streamed, one way.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import unquote_to_bytes

#: OpenAI's finish reasons under the conventions' names (others pass as they are)
_FINISH = {"tool_calls": "tool_call", "function_call": "tool_call"}


def finish_reason(reason: Any) -> str:
    return _FINISH.get(reason, reason) if isinstance(reason, str) else "stop"


def _text(content: Any) -> dict[str, Any]:
    return {"type": "text", "content": content}


def _image(url: str) -> dict[str, Any]:
    """An image by URL: a ``uri`` part, or for an inline ``data:`` URL a ``blob`` part (the conventions' schema:
    a uri part is never a data URL), its content base64 as the schema wants."""
    if not url[:5].lower() == "data:":
        return {"type": "uri", "modality": "image", "uri": url}
    header, _, payload = url[5:].partition(",")
    mime, *params = header.split(";")
    if "base64" not in (x.strip().lower() for x in params):
        payload = base64.b64encode(unquote_to_bytes(payload)).decode()
    return {"type": "blob", "modality": "image", "mime_type": mime.strip() or None, "content": payload}


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """A message's ``content``: a string, or a list of parts (text, images, audio, files)."""
    if isinstance(content, str):
        return [_text(content)]
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for p in content:
            if isinstance(p, str):
                parts.append(_text(p))
            elif isinstance(p, dict):
                kind = p.get("type")
                text = p.get("text")
                if isinstance(text, str):  # text, input_text, output_text
                    parts.append(_text(text))
                elif kind in ("image_url", "input_image"):
                    url = p.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if isinstance(url, str):
                        parts.append(_image(url))
                    elif isinstance(p.get("file_id"), str):
                        parts.append({"type": "file", "modality": "image", "file_id": p["file_id"]})
                    else:
                        parts.append({"type": kind})
                elif isinstance(p.get("refusal"), str):
                    parts.append({"type": "refusal", "content": p["refusal"]})
                else:
                    parts.append({"type": kind if isinstance(kind, str) else "unknown"})
    return parts


def _tool_call(call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict):
        return None
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    part: dict[str, Any] = {"type": "tool_call", "name": fn.get("name") if isinstance(fn.get("name"), str) else ""}
    # a Responses function call's call_id (what its function_call_output answers), not its item id
    cid = call.get("call_id", call.get("id"))
    if isinstance(cid, str):
        part["id"] = cid
    if "arguments" in fn:
        part["arguments"] = fn["arguments"]
    return part


def _tool_result(response: Any, call_id: Any) -> dict[str, Any]:
    """A tool's answer to the model, as a message."""
    part: dict[str, Any] = {"type": "tool_call_response", "response": response}
    if isinstance(call_id, str):
        part["id"] = call_id
    return {"role": "tool", "parts": [part]}


def _chat_message(msg: dict[str, Any]) -> dict[str, Any]:
    role = msg.get("role") if isinstance(msg.get("role"), str) else "user"
    if role in ("tool", "function"):
        out = _tool_result(msg.get("content"), msg.get("tool_call_id"))
    else:
        parts = _content_parts(msg.get("content"))
        if isinstance(msg.get("refusal"), str):
            parts.append({"type": "refusal", "content": msg["refusal"]})
        calls = msg.get("tool_calls")
        for call in (*(calls if isinstance(calls, list) else ()), msg.get("function_call")):  # the legacy function call last
            tc = _tool_call(call)
            if tc is not None:
                parts.append(tc)
        out = {"role": role, "parts": parts}
    if isinstance(msg.get("name"), str):
        out["name"] = msg["name"]
    return out


def _response_item(item: Any) -> dict[str, Any] | None:
    """One item of a Responses API ``input``: a message, a function call or its output."""
    if isinstance(item, str):
        return {"role": "user", "parts": [_text(item)]}
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "function_call":
        return {"role": "assistant", "parts": [_tool_call(item)]}
    if kind == "function_call_output":
        return _tool_result(item.get("output"), item.get("call_id"))
    return _chat_message(item)


def input_messages(body: Any) -> list[dict[str, Any]] | None:
    """A request's prompt as GenAI input messages; ``None`` when it has none."""
    if not isinstance(body, dict):
        return None
    msgs = body.get("messages")
    if isinstance(msgs, list):
        return [_chat_message(m) for m in msgs if isinstance(m, dict)]
    for key in ("prompt", "input"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return [{"role": "user", "parts": [_text(value)]}]
        if isinstance(value, list):
            if all(isinstance(v, str) for v in value):  # a batch of prompts or texts to embed
                return [{"role": "user", "parts": [_text(v)]} for v in value]
            if all(isinstance(v, int) for v in value):  # token ids
                return [{"role": "user", "parts": [{"type": "tokens", "count": len(value)}]}]
            out = [_response_item(v) for v in value]
            return [m for m in out if m is not None]
    return None


def system_instructions(body: Any) -> list[dict[str, Any]] | None:
    """A Responses request's ``instructions`` as the parts of ``gen_ai.system_instructions``; ``None``
    without them (chat and completions carry theirs in their messages, which input_messages keeps)."""
    if isinstance(body, dict):
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            return [_text(instructions)]
    return None


def output_messages(body: Any) -> list[dict[str, Any]] | None:
    """A buffered answer's choices (chat, completions) or output (Responses API) as GenAI output messages."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list):
        out = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            msg = choice.get("message")
            if isinstance(msg, dict):
                m = _chat_message({**msg, "role": msg.get("role") or "assistant"})
            else:
                text = choice.get("text")
                m = {"role": "assistant", "parts": [_text(text)] if isinstance(text, str) else []}
            m["finish_reason"] = finish_reason(choice.get("finish_reason"))
            out.append(m)
        return out
    output = body.get("output")
    if isinstance(output, list):
        parts: list[dict[str, Any]] = []
        for item in output:
            m = _response_item(item)
            if m is not None:
                parts.extend(m["parts"])
        status = body.get("status")
        reason = "stop" if status in (None, "completed") else "length" if status == "incomplete" else str(status)
        return [{"role": "assistant", "parts": parts, "finish_reason": reason}]
    return None


def streamed_message(text: str, reason: Any, tools: list[tuple[Any, Any, Any]] | None = None) -> dict[str, Any]:
    """A streamed choice, from its text and tool calls (``(id, name, arguments)``) as gathered and its finish
    reason (``None``: it did not finish). Its parts are those of the buffered answer: the text (left out
    when empty and there are tool calls, as a message whose content is null), then the tool calls."""
    parts = [_text(text)] if text or not tools else []
    for cid, name, arguments in tools or ():
        parts.append(_tool_call({"id": cid, "name": name, "arguments": arguments}))  # type: ignore[arg-type]
    return {"role": "assistant", "parts": parts, "finish_reason": finish_reason(reason) if reason is not None else "error"}
