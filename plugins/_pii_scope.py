"""Where the texts are: every string a model reads in a request, and writes in an answer.

A *slot* is a (container, key) pair whose value is a string, so the plugin can
read every text, decide, and write replacements back in place. The walkers know
the OpenAI wire formats Sluice proxies: chat completions, completions,
embeddings and the responses API.
"""

from __future__ import annotations

from typing import Any, Iterator

Slot = tuple[Any, Any]  # (dict or list, key or index)


def _str_slot(container: Any, key: Any) -> Iterator[Slot]:
    if isinstance(container[key], str):
        yield container, key


def _strings(container: Any, key: Any) -> Iterator[Slot]:
    """A string, or a list of strings (token-id lists are not text and are skipped)."""
    v = container[key]
    if isinstance(v, str):
        yield container, key
    elif isinstance(v, list):
        for i, item in enumerate(v):
            if isinstance(item, str):
                yield v, i


def _content(msg: dict[str, Any], key: str = "content") -> Iterator[Slot]:
    """``content`` as a string or as a list of parts; only the text parts are text."""
    v = msg.get(key)
    if isinstance(v, str):
        yield msg, key
    elif isinstance(v, list):
        for i, part in enumerate(v):
            if isinstance(part, str):
                yield v, i
            elif isinstance(part, dict):
                for field in ("text", "output", "refusal"):
                    if isinstance(part.get(field), str):
                        yield part, field


#: the reasoning a model shows besides its content (vLLM's reasoning parsers: ``reasoning_content``, and
#: ``reasoning`` in newer versions), which a client reads too
REASONING_FIELDS = ("reasoning_content", "reasoning")


def _message(msg: dict[str, Any]) -> Iterator[Slot]:
    """A chat message's texts: content, refusal, reasoning, tool-call and legacy function-call arguments."""
    yield from _content(msg)
    if isinstance(msg.get("refusal"), str):
        yield msg, "refusal"
    for field in REASONING_FIELDS:
        if isinstance(msg.get(field), str):
            yield msg, field
    yield from _tool_calls(msg)


def _tool_calls(msg: dict[str, Any]) -> Iterator[Slot]:
    calls = msg.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            yield fn, "arguments"
    fc = msg.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
        yield fc, "arguments"


def endpoint_kind(endpoint: str, body: Any) -> str | None:
    """``chat``, ``completions``, ``embeddings`` or ``responses``, from the end of a request's whole path
    (``ctx.path``: a route's prefix may end inside the API's name); guessed from the body when the path
    names none of them."""
    ep = endpoint.rstrip("/")
    for kind, suffix in (("chat", "chat/completions"), ("completions", "completions"), ("embeddings", "embeddings"), ("responses", "responses")):
        if ep.endswith(suffix):
            return kind
    if isinstance(body, dict):
        if "messages" in body:
            return "chat"
        if "prompt" in body:
            return "completions"
        if "input" in body and "model" in body:
            return "responses"
    return None


#: the Responses API's ``include`` entry that asks for the output text's log probabilities
RESPONSES_LOGPROBS = "message.output_text.logprobs"


def _asks(v: Any) -> bool:
    """A count or flag that asks: anything but absent, ``null``, ``false`` and 0 (-1, vLLM's "the whole
    vocabulary", asks too)."""
    return v is not None and v is not False and v != 0


def answer_token_fields(kind: str | None, body: Any) -> list[str]:
    """The fields of a request body that ask for the answer's tokens: their log probabilities, or (vLLM)
    their ids, either of which repeats the answer's text a token at a time; or (vLLM's Responses) the raw
    messages, which repeat it whole beside the scanned ``output``.

    Chat: ``logprobs`` (true), ``top_logprobs``. Completions: ``logprobs``, any value but ``null``
    (vLLM reads ``false`` as 0, and 0 returns the sampled tokens). Responses: ``top_logprobs``, or
    ``include`` naming ``message.output_text.logprobs``. Chat and completions: vLLM's
    ``return_token_ids``. Responses: vLLM's ``enable_response_messages``. A prompt's own log
    probabilities or ids (vLLM's ``prompt_logprobs``, completions' ``echo``) repeat what the model
    read, which the request side redacted already: they are not asked for here.
    """
    if not isinstance(body, dict):
        return []
    out = []
    if kind == "completions" and body.get("logprobs") is not None:
        out.append("logprobs")
    if kind == "chat" and _asks(body.get("logprobs")):
        out.append("logprobs")
    if kind in ("chat", "responses") and _asks(body.get("top_logprobs")):
        out.append("top_logprobs")
    if kind == "responses":
        inc = body.get("include")
        if isinstance(inc, list) and RESPONSES_LOGPROBS in inc:
            out.append("include")
    if kind in ("chat", "completions") and _asks(body.get("return_token_ids")):
        out.append("return_token_ids")
    if kind == "responses" and _asks(body.get("enable_response_messages")):
        out.append("enable_response_messages")
    return out


def drop_answer_tokens(body: dict[str, Any], fields: list[str]) -> None:
    """Take out of ``body`` what :func:`answer_token_fields` found (``include`` keeps its other entries)."""
    for field in fields:
        if field == "include":
            rest = [x for x in body["include"] if x != RESPONSES_LOGPROBS]
            if rest:
                body["include"] = rest
            else:
                del body["include"]
        else:
            body.pop(field, None)


def request_slots(kind: str | None, body: Any) -> Iterator[Slot]:
    """Every text of a request body that the model will read."""
    if not isinstance(body, dict):
        return
    if kind == "chat":
        for msg in body.get("messages") or ():
            if isinstance(msg, dict):
                yield from _message(msg)
    elif kind == "completions":
        if "prompt" in body:
            yield from _strings(body, "prompt")
        if isinstance(body.get("suffix"), str):
            yield body, "suffix"
    elif kind == "embeddings":
        if "input" in body:
            yield from _strings(body, "input")
    elif kind == "responses":
        if isinstance(body.get("instructions"), str):
            yield body, "instructions"
        inp = body.get("input")
        if isinstance(inp, str):
            yield body, "input"
        elif isinstance(inp, list):
            for i, item in enumerate(inp):
                if isinstance(item, str):
                    yield inp, i
                elif isinstance(item, dict):
                    yield from _content(item)
                    for field in ("output", "arguments"):
                        if isinstance(item.get(field), str):
                            yield item, field
                    if isinstance(item.get("output"), list):
                        # a function_call_output's output as a list of parts (input_text, ...)
                        yield from _content(item, "output")


def answer_slots(kind: str | None, body: Any) -> Iterator[Slot]:
    """Every text of a buffered answer that the client will read."""
    if not isinstance(body, dict):
        return
    if kind in ("chat", "completions") or "choices" in body:
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                yield choice, "text"
            msg = choice.get("message")
            if isinstance(msg, dict):
                yield from _message(msg)
    elif kind == "responses" or "output" in body:
        for item in body.get("output") or ():
            if isinstance(item, dict):
                yield from _content(item)
                if isinstance(item.get("arguments"), str):
                    yield item, "arguments"
        if isinstance(body.get("output_text"), str):
            yield body, "output_text"


def stream_slots(data: Any) -> Iterator[tuple[tuple[Any, ...], Any, Any]]:
    """Text slots of one streamed chunk, each with the key of the channel it continues.

    A channel is one growing text: a choice's content or refusal, one tool call's
    arguments (or the legacy function call's), one output part of the responses API. Text split across events is only
    contiguous within its channel.
    """
    if not isinstance(data, dict):
        return
    choices = data.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            if isinstance(choice.get("text"), str):
                yield ("text", idx), choice, "text"
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    yield ("content", idx), delta, "content"
                if isinstance(delta.get("refusal"), str):
                    yield ("refusal", idx), delta, "refusal"
                for field in REASONING_FIELDS:
                    if isinstance(delta.get(field), str):
                        yield (field, idx), delta, field
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        yield ("tool", idx, call.get("index", 0)), fn, "arguments"
                fc = delta.get("function_call")
                if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
                    yield ("function", idx), fc, "arguments"
        return
    typ = data.get("type")
    if typ in ("response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta"):
        if isinstance(data.get("delta"), str):
            yield ("resp", data.get("output_index", 0), data.get("content_index", 0), typ), data, "delta"


def stream_channel_ends(data: Any) -> list[tuple[Any, ...]]:
    """Channels this chunk closes: a choice with its ``finish_reason``, a responses part marked done."""
    out: list[tuple[Any, ...]] = []
    if not isinstance(data, dict):
        return out
    choices = data.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                idx = choice.get("index", 0)
                out.append(("choice", idx))
        return out
    typ = data.get("type")
    if isinstance(typ, str) and typ.startswith("response.") and typ.endswith(".done"):
        out.append(("resp", data.get("output_index", 0), data.get("content_index", 0)))
    return out


#: the channels of a choice: its text (completions), content, refusal, each tool call's and
#: the legacy function call's arguments
_CHOICE_CHANNELS = frozenset({"text", "content", "refusal", "tool", "function", *REASONING_FIELDS})
#: the channels whose text is a string of a choice's ``delta`` under the channel's own name
DELTA_TEXT_CHANNELS = frozenset({"content", "refusal", *REASONING_FIELDS})


def channel_closed_by(channel: tuple[Any, ...], ends: list[tuple[Any, ...]]) -> bool:
    for end in ends:
        if end[0] == "choice" and channel[0] in _CHOICE_CHANNELS and channel[1] == end[1]:
            return True
        if end[0] == "resp" and channel[0] == "resp" and channel[1:3] == end[1:3]:
            return True
    return False
