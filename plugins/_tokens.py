"""Prompt token counting shared by plugins (rate limits, budgets, routing by length).

``count_prompt_tokens(body, model)`` counts the prompt of an OpenAI-shaped request
body (chat, completions, embeddings, responses). With a real tokenizer it is
exact for the text; without one it is an estimate:

* text: ``ceil(utf-8 bytes / 4)`` per string, OpenAI's rule of thumb for English
  (it over-counts code and under-counts some scripts; limits only need the order);
* chat: plus 3 tokens per message and 3 to prime the answer, as OpenAI's
  cookbook counts; plus 1 per ``name``;
* images: 85 tokens each (OpenAI's low-detail price);
* token-id prompts (lists of ints): their exact length;
* tools and functions: their JSON, counted as text.

Real tokenizers are HuggingFace ``tokenizer.json`` files loaded with the optional
``tokenizers`` package, mapped to models by glob pattern (``register_tokenizer``)
or passed explicitly. Nothing is ever downloaded.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any, Callable, Iterable, Mapping

from proxy.sse import dump_json

#: how many UTF-8 bytes the estimate counts as one token
BYTES_PER_TOKEN = 4
PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS = 85

Counter = Callable[[str], int]
_registered: list[tuple[str, str]] = []


def estimate_text(text: str) -> int:
    """The estimate for one string: ``ceil(len(utf8) / 4)``."""
    # an ASCII string's UTF-8 length is its length (isascii() is a flag check, no scan)
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (n + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


@functools.lru_cache(maxsize=16)
def load_tokenizer(path: str) -> Counter:
    """A counter from a local ``tokenizer.json`` (needs the ``tokenizers`` extra)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("a tokenizer path is configured but the 'tokenizers' package is not installed "
                           "(pip install 'sluice[tokenizers]')") from e
    tok = Tokenizer.from_file(str(path))

    def count(text: str) -> int:
        if not text:
            return 0
        return len(tok.encode(text, add_special_tokens=False).ids)

    return count


def register_tokenizer(model_pattern: str, path: str) -> None:
    """Use the tokenizer at ``path`` for models matching the glob ``model_pattern``.

    Later registrations win; registering the same pattern again replaces it.
    """
    load_tokenizer(path)  # fail at configuration time, not on a request
    _registered[:] = [(p, f) for p, f in _registered if p != model_pattern]
    _registered.append((model_pattern, path))


def tokenizer_for(model: str | None, mapping: Mapping[str, str] | None = None) -> Counter | None:
    """The counter for ``model`` from ``mapping`` (pattern -> path) or the registry, else ``None``."""
    if not model or (not mapping and not _registered):
        return None
    pairs: Iterable[tuple[str, str]] = list(mapping.items()) if mapping else []
    for pattern, path in [*pairs, *reversed(_registered)]:
        if fnmatch.fnmatchcase(model, pattern):
            return load_tokenizer(path)
    return None


def _text_of_content(content: Any, count: Counter) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    n = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                n += count(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind in ("text", "input_text", "output_text"):
                    n += count(str(part.get("text") or ""))
                elif kind in ("image_url", "input_image", "image"):
                    n += IMAGE_TOKENS
                elif kind in ("input_audio", "file", "input_file"):
                    n += count(dump_json(part).decode())
                else:
                    n += count(str(part.get("text") or ""))
        return n
    return count(dump_json(content).decode())


def _prompt(value: Any, count: Counter) -> int:
    """A completions/embeddings ``prompt``/``input``: str, [str], [int] or [[int]]."""
    if value is None:
        return 0
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        if value and all(isinstance(x, int) for x in value):
            return len(value)
        n = 0
        for item in value:
            if isinstance(item, str):
                n += count(item)
            elif isinstance(item, list) and all(isinstance(x, int) for x in item):
                n += len(item)
            elif isinstance(item, dict):  # responses API input items
                n += PER_MESSAGE + _text_of_content(item.get("content"), count)
            else:
                n += count(dump_json(item).decode())
        return n
    return count(dump_json(value).decode())


def count_prompt_tokens(body: Any, model: str | None = None, *, tokenizer: Counter | None = None,
                        tokenizers: Mapping[str, str] | None = None) -> int:
    """Tokens of the prompt in an OpenAI request body.

    ``tokenizer`` (a ``str -> int`` counter) wins; else a tokenizer mapped to
    ``model`` (``tokenizers`` pattern -> tokenizer.json path, then the registry);
    else the documented estimate. ``model`` defaults to ``body["model"]``.
    """
    if not isinstance(body, dict):
        return 0
    if tokenizer is not None:
        count = tokenizer
    elif tokenizers or _registered:
        if not model:
            m = body.get("model")
            model = m if isinstance(m, str) else None
        count = tokenizer_for(model, tokenizers) or estimate_text
    else:
        count = estimate_text
    n = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if type(content) is str and count is estimate_text:
                # the common case, inline: a plain text message
                k = len(content) if content.isascii() else len(content.encode("utf-8", "surrogatepass"))
                n += PER_MESSAGE + (k + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
            else:
                n += PER_MESSAGE + _text_of_content(content, count)
            if len(m) > 2:  # more than role and content: a name, tool calls
                if m.get("name"):
                    n += PER_NAME + count(str(m["name"]))
                if m.get("tool_calls"):
                    n += count(dump_json(m["tool_calls"]).decode())
                if m.get("function_call"):
                    n += count(dump_json(m["function_call"]).decode())
        n += REPLY_PRIMING
    if "prompt" in body:
        n += _prompt(body["prompt"], count)
    if "input" in body:
        n += _prompt(body["input"], count)
    if "instructions" in body and isinstance(body["instructions"], str):
        n += count(body["instructions"])
    if "tools" in body or "functions" in body:
        for extra in ("tools", "functions"):
            if body.get(extra):
                n += count(dump_json(body[extra]).decode())
    return n


#: endpoints whose answer generates no tokens: nothing is reserved for output
NO_COMPLETION = ("/embeddings", "/moderations")
#: their paths, with or without a trailing slash (``ctx.path.endswith(NO_COMPLETION_PATHS)``)
NO_COMPLETION_PATHS = tuple(p + s for p in NO_COMPLETION for s in ("", "/"))


#: a count in a string as pydantic's lax mode takes it: ASCII digits with single underscores between
#: them, a sign, a fraction of zeros, blanks around
_COUNT_TEXT = re.compile(r"\s*([+-]?[0-9]+(?:_[0-9]+)*)(?:\.0+)?\s*", re.ASCII)


def lax_count(v: Any) -> int | None:
    """A count as a Python (pydantic, so vLLM's) server reads it: an int, a float with no fraction
    (``100.0``, below 2**63), or a string of one (``"100"``, ``" 1_000 "``, ``"100.0"``); else None. A
    limiter that read ints only would reserve its default for ``"max_tokens": "3000000"``, which vLLM
    generates; one that read more than pydantic would refuse what the upstream refuses anyway."""
    t = type(v)
    if t is int:
        return v
    if t is float:
        return int(v) if v.is_integer() and abs(v) < 2.0**63 else None
    if t is str:
        m = _COUNT_TEXT.fullmatch(v)
        return int(m.group(1)) if m else None
    return None  # True is not a count, nor is anything else


def _allowance(body: dict[str, Any], default: int) -> int:
    """The answer's token allowance: the first of ``_MAX_FIELDS`` given (read as :func:`lax_count` reads),
    else ``default``; times ``n`` choices."""
    limit = default
    for name in _MAX_FIELDS:
        v = body.get(name)
        if v is not None:
            v = v if type(v) is int else lax_count(v)
            if v is not None and v >= 0:
                limit = v
                break
    choices = body.get("n")
    if choices is not None:
        choices = choices if type(choices) is int else lax_count(choices)
        if choices is not None and choices > 0:
            return limit * choices
    return limit


def completion_allowance(body: Any, default: int) -> int:
    """Tokens the answer may use: ``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens`` when given (read as :func:`lax_count` reads), else ``default``; times ``n`` choices."""
    return _allowance(body, default) if isinstance(body, dict) else default


_MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def reservation(body: dict[str, Any], default: int, tokenizers: Mapping[str, str] | None = None,
                completion: bool = True) -> tuple[int, int]:
    """``(prompt tokens, prompt plus completion allowance)`` of a request body (a dict), in one call:
    what a rate limiter reserves. ``completion=False`` for endpoints that generate nothing.

    The same figures as :func:`count_prompt_tokens` and :func:`completion_allowance`; the
    usual chat body (plain text messages, estimated) is counted here inline, in one frame.
    """
    prompt = -1
    messages = body.get("messages")
    if type(messages) is list and tokenizers is None and not _registered:
        n = REPLY_PRIMING
        for m in messages:
            if type(m) is not dict or len(m) > 2 or (len(m) == 2 and "role" not in m):
                break  # a name, tool calls, ...: the general count
            c = m.get("content")
            if type(c) is not str:
                break
            k = len(c) if c.isascii() else len(c.encode("utf-8", "surrogatepass"))
            n += PER_MESSAGE + (k + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
        else:
            if not ("prompt" in body or "input" in body or "instructions" in body or "tools" in body or "functions" in body):
                prompt = n
    if prompt < 0:
        prompt = count_prompt_tokens(body, None, tokenizers=tokenizers)
    if not completion:
        return prompt, prompt
    return prompt, prompt + _allowance(body, default)
