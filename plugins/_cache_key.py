"""The cache's canonical request key and scope: pure functions, no I/O."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import orjson

from proxy.openai import CREDENTIAL_HEADERS  # the headers that carry a caller's key (the upstream's replace them)

#: request fields that never change the answer's content
DEFAULT_IGNORED = ("stream", "stream_options", "user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")


def _normalise(value: Any) -> Any:
    # 1 and 1.0 ask for the same thing; JSON serialisers write them differently.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _content(content: Any) -> Any:
    # [{"type": "text", "text": "hi"}] and "hi" are the same prompt to every upstream we know. Several
    # parts are not one string: upstreams join them differently (vLLM with a newline, others with a
    # space), so ["Do", "not"] and "Donot" may be different prompts; they stay a list
    if isinstance(content, list) and len(content) == 1:
        p = content[0]
        if isinstance(p, dict) and p.get("type") == "text" and set(p) <= {"type", "text"} and isinstance(p.get("text"), str):
            return p["text"]
    return content


def canonical_request(endpoint: str, body: dict[str, Any], ignored: Iterable[str] = DEFAULT_IGNORED) -> dict[str, Any]:
    """The answer-changing part of a request, normalised so equal requests compare equal."""
    skip = set(ignored)
    out: dict[str, Any] = {}
    for k, v in body.items():
        if k in skip or v is None:
            continue
        if k == "messages" and isinstance(v, list):
            v = [{**m, "content": _content(m["content"])} if isinstance(m, dict) and "content" in m else m for m in v]
        out[k] = v
    return {"endpoint": endpoint.strip("/"), "body": _normalise(out)}


def request_key(endpoint: str, body: dict[str, Any], scope: str, ignored: Iterable[str] = DEFAULT_IGNORED) -> str:
    """A fixed-length key: the scope plus a SHA-256 of the canonical request (key order irrelevant)."""
    canon = orjson.dumps(canonical_request(endpoint, body, ignored), option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(canon).hexdigest()
    return f"{scope}:{digest}"


def credentials_of(headers: Mapping[str, str]) -> str | None:
    """Every credential header the request carries, as one string (None when there is none)."""
    found = [f"{h}:{headers[h]}" for h in CREDENTIAL_HEADERS if h in headers]
    return "\n".join(found) if found else None


def scope_of(mode: str, key_id: str | None, team: str | None, credentials: str | None) -> str:
    """Who may read an entry: one key, one team, or everyone (``shared``).

    Without an identity (no auth plugin in the chain) the caller's own
    credentials (:func:`credentials_of`) stand in for the key, hashed, so two clients that
    present different upstream keys still never read each other's answers.
    """
    if mode == "shared":
        return "shared"
    if mode == "team" and team:
        return "team." + hashlib.sha256(team.encode()).hexdigest()[:24]
    if key_id:
        return "key." + hashlib.sha256(key_id.encode()).hexdigest()[:24]
    if credentials:
        return "cred." + hashlib.sha256(credentials.encode()).hexdigest()[:24]
    return "anon"
