"""The OpenAI wire format: usage extraction, header hygiene, request shaping."""

from __future__ import annotations

from typing import Any

import orjson

from multidict import CIMultiDict, CIMultiDictProxy

from .context import Usage

#: hop-by-hop headers (RFC 9110 7.6.1) plus those the proxy recomputes
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    )
)
#: response headers not passed to the client: the body is decompressed and re-framed
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding"}
#: a client's ``Expect: 100-continue`` is answered by Sluice, which reads the body whole before the upstream
#: sees the request: sent on, it would make aiohttp wait for the upstream's own 100 before the body (a
#: round trip; a hang until first_byte against a server that never sends one, as HTTP/1.1 allows)
REQUEST_DROP = HOP_BY_HOP | {"expect"}
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
RESPONSE_DROP_ORDER = tuple(sorted(RESPONSE_DROP))
REQUEST_DROP_ORDER = tuple(sorted(REQUEST_DROP))


def request_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and those named in ``Connection``) and ``Expect``."""
    out: CIMultiDict[str] = CIMultiDict(headers)  # one copy in C, then drop the few that go
    conn = out.get("connection")
    for h in REQUEST_DROP_ORDER:
        if h in out:
            del out[h]
    if conn:
        for t in conn.split(","):
            t = t.strip()
            if t and t in out:
                del out[t]
    # Sluice reads answers and sends them on decoded whatever the client accepts, and aiohttp's gzip decoder
    # does not tell a stream cut short from a whole one (a cut answer went on as a complete 200): the upstream
    # is asked for plain bytes, whose framing shows a cut
    out["accept-encoding"] = "identity"
    return out


def response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str], keep_length: bool = False) -> CIMultiDict[str]:
    """The upstream's headers for the client: framing ones dropped, its ``x-request-id`` renamed.

    ``keep_length``: the upstream's ``Content-Length`` is kept, unless it is a compressed length (the
    client gets the body decoded): for the answer to a HEAD request, which has no body but says how long
    the GET's would be (RFC 9110 9.3.2), and for a body relayed as it comes (a download's progress)."""
    out: CIMultiDict[str] = CIMultiDict(headers)
    for h in RESPONSE_DROP_ORDER:
        if h in out:
            del out[h]
    if keep_length and "content-length" in headers and headers.get("content-encoding", "identity").strip().lower() == "identity":
        out["content-length"] = headers["content-length"]
    if "x-request-id" in out:
        for v in out.popall("x-request-id"):
            out.add("x-upstream-request-id", v)
    return out


#: more tokens than any answer has: a count at or past it is malformed usage (estimated instead)
MAX_TOKENS = 1 << 53


def usage_from(obj: Any) -> Usage | None:
    """Usage from a chat/completions/embeddings/responses body or stream event, if any.

    Handles ``usage`` at the top level (chat, completions, embeddings, the usage
    chunk of a stream) and inside ``response`` (the Responses API's
    ``response.completed`` event). Malformed usage gives ``None``.
    """
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if u is None:
        resp = obj.get("response")
        if isinstance(resp, dict):
            u = resp.get("usage")
    if not isinstance(u, dict):
        return None
    # a token count is a non-negative JSON integer (type() is int: a bool is not one) below MAX_TOKENS (JSON
    # allows any size; one past SQLite's 64 bits cost the ledger its row); every check inline, as this runs
    # once per answer on every route that meters or limits
    prompt = u.get("prompt_tokens")
    completion = u.get("completion_tokens")
    p_ok = type(prompt) is int and 0 <= prompt < MAX_TOKENS
    c_ok = type(completion) is int and 0 <= completion < MAX_TOKENS
    if p_ok or c_ok:
        pd = u.get("prompt_tokens_details")
        cd = u.get("completion_tokens_details")
    else:
        prompt = u.get("input_tokens")
        completion = u.get("output_tokens")
        p_ok = type(prompt) is int and 0 <= prompt < MAX_TOKENS
        c_ok = type(completion) is int and 0 <= completion < MAX_TOKENS
        if not (p_ok or c_ok):
            return None
        pd = u.get("input_tokens_details")
        cd = u.get("output_tokens_details")
    if (not p_ok and prompt is not None) or (not c_ok and completion is not None):
        return None  # a count given but not one (negative, a string): malformed usage, estimated instead
    if not p_ok:
        prompt = 0  # absent: an embedding's usage has no completion_tokens
    if not c_ok:
        completion = 0
    total = u.get("total_tokens")
    if not (type(total) is int and 0 < total < MAX_TOKENS):
        total = prompt + completion
    cached = pd.get("cached_tokens") if isinstance(pd, dict) else 0
    reasoning = cd.get("reasoning_tokens") if isinstance(cd, dict) else 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=cached if type(cached) is int and 0 <= cached < MAX_TOKENS else 0,
        reasoning_tokens=reasoning if type(reasoning) is int and 0 <= reasoning < MAX_TOKENS else 0,
    )


def is_usage_only_chunk(obj: Any) -> bool:
    """The extra chunk ``stream_options.include_usage`` adds: no choices, a usage object."""
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def endpoint_is(endpoint: str, name: str) -> bool:
    """Whether a request's path (``ctx.path``; ``ctx.endpoint`` only where the route's prefix is known
    to end before the API's name) is the API ``name`` (``chat/completions``), under whatever comes
    before it: ``/v1/``, an Azure-style ``/openai/deployments/NAME/``. Kinds of request are told
    from the whole path: a route's prefix may end inside the name (``/v1/chat/``), leaving
    ``completions`` of ``chat/completions``."""
    endpoint = endpoint.strip("/")
    return endpoint == name or endpoint.endswith("/" + name)


def streams_usage(endpoint: str) -> bool:
    """Whether a stream to ``endpoint`` (a request's whole path) can carry a usage chunk: chat and text
    completions (the ``completions`` suffix covers ``chat/completions`` too)."""
    return endpoint_is(endpoint, "completions")


def wants_usage(body: Any) -> bool:
    so = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(so, dict) and so.get("include_usage") is True


def ensure_stream_usage(body: dict[str, Any]) -> bool:
    """Ask a streamed chat/completions request for the usage chunk; True when we added it.

    vLLM's ``continuous_usage_stats`` puts a running usage in every chunk only when
    ``include_usage`` is on too: a client that asked for the first alone gets no usage, so
    it is turned off where we add the second (else every chunk would carry one)."""
    if wants_usage(body):
        return False
    so = body.get("stream_options")
    if isinstance(so, dict):
        so = {**so, "include_usage": True}
        if so.get("continuous_usage_stats") is True:
            so["continuous_usage_stats"] = False
        body["stream_options"] = so
    else:
        body["stream_options"] = {"include_usage": True}
    return True


FULL_PARSE_LIMIT = 256 * 1024


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a buffered JSON answer, read from its last ``"usage": {...}`` without parsing the rest.

    The key inside a JSON string would be escaped (``\\"usage\\"``), so the last
    unescaped ``"usage"`` followed by ``:`` and an object is the answer's own;
    anything else falls back to parsing the whole body.
    """
    idx = body.rfind(b'"usage"')
    while idx > 0 and body[idx - 1] == 0x5C:  # escaped: inside a string
        idx = body.rfind(b'"usage"', 0, idx)
    if idx < 0:
        return None
    start = idx + 7
    n = len(body)
    while start < n and body[start] in b" \t\r\n:":
        start += 1
    if start < n and body[start] == 0x7B:
        depth = 0
        in_str = False
        j = start
        end = min(n, start + 8192)
        while j < end:
            c = body[j]
            if in_str:
                if c == 0x5C:
                    j += 1
                elif c == 0x22:
                    in_str = False
            elif c == 0x22:
                in_str = True
            elif c == 0x7B:
                depth += 1
            elif c == 0x7D:
                depth -= 1
                if depth == 0:
                    try:
                        return usage_from({"usage": orjson.loads(body[start : j + 1])})
                    except orjson.JSONDecodeError:
                        break
            j += 1
    try:
        return usage_from(orjson.loads(body)) if n <= FULL_PARSE_LIMIT else None
    except orjson.JSONDecodeError:
        return None


#: the API paths (after /v1/) of the calls that run a model: a restricted key's request to one must name it
MODEL_PATHS = frozenset({
    "chat/completions", "completions", "embeddings", "responses", "moderations", "messages",
    "audio/transcriptions", "audio/translations", "audio/speech", "images/generations", "images/edits",
    "images/variations", "rerank", "score", "classify", "pooling", "tokenize", "detokenize",
})


def api_path(path: str) -> str:
    """A request's whole path (``ctx.path``) without what comes before the API's own path: up to its first
    ``v1`` segment, or an Azure-style ``deployments/NAME/``: ``chat/completions``, ``models/org/name``.
    A path with neither (a route ``/agents/`` to an upstream's ``/v1``) gives the model call it ends with,
    or what follows its ``models`` segment. From the whole path, not ``ctx.endpoint``: a route's prefix may
    end inside the API's name (``/v1/chat/`` leaves ``completions``)."""
    segments = path.strip("/").split("/")
    if "v1" in segments:
        return "/".join(segments[segments.index("v1") + 1:])
    if "deployments" in segments:
        return "/".join(segments[segments.index("deployments") + 2:])
    for n in (2, 1):
        if len(segments) >= n and "/".join(segments[-n:]) in MODEL_PATHS:
            return "/".join(segments[-n:])
    if "models" in segments:
        return "/".join(segments[segments.index("models"):])
    return "/".join(segments)


def deployment_of(path: str) -> str | None:
    """The deployment an Azure-style path names (``/openai/deployments/NAME/chat/completions``), else ``None``."""
    if "/deployments/" not in path:
        return None
    segments = path.strip("/").split("/")
    i = segments.index("deployments")
    return segments[i + 1] if i + 2 < len(segments) and segments[i + 1] else None
