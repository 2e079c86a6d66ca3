"""Exact-match answer cache: a repeated request is answered without an upstream call.

Keys are a canonical form of the request (see ``plugins/_cache_key.py``), scoped
to the caller's key (or team, or shared). Streamed answers are stored once they
completed and can be replayed as a stream or as a plain answer, and the reverse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from proxy import Context, Event, Plugin, PluginConfig, StashKey, hookimpl
from proxy.openai import api_path
from proxy.state import check_backends

from ._cache_entry import StreamAssembler, is_complete_body, make_entry, read_entry, replay_chunks
from ._cache_key import DEFAULT_IGNORED, credentials_of, request_key, scope_of

log = logging.getLogger("sluice.cache")

HIT, MISS, BYPASS = "hit", "miss", "bypass"
RESULT_HEADER = "x-sluice-cache"


@dataclass(slots=True)
class _Pending:
    """One request's cache state, from lookup to store."""

    key: str
    ttl_s: float
    store: bool
    hit: bool = False
    body: bytes | None = None
    assembler: StreamAssembler | None = None
    stream_bytes: int = 0
    too_big: bool = False
    #: the in-flight marker this request leads (identical buffered requests wait for its answer)
    flight: _Flight | None = None


@dataclass(slots=True)
class _Flight:
    done: asyncio.Future[None]
    started: float


STASH: StashKey[_Pending] = StashKey("cache")


def _cache_control(value: str | None) -> set[str]:
    if not value:
        return set()
    out = set()
    for part in value.split(","):
        token = part.strip().lower()
        if token in ("max-age=0",):
            token = "no-cache"
        out.add(token)
    return out


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.requests = Counter(
            "sluice_cache_requests_total", "Cache lookups by result (hit, miss, bypass).", ["result"], registry=registry
        )
        self.stores = Counter(
            "sluice_cache_stores_total", "Answers offered to the cache, by what happened (stored, skipped reason, error).",
            ["result"], registry=registry,
        )


class Cache(Plugin):
    """Answers repeated requests from a store, and stores complete successful answers."""

    name = "cache"
    kind = "transform"
    # A streamed answer is replayed with its usage chunk to callers who ask for one.
    needs_usage = True

    class Config(PluginConfig):
        ttl_seconds: float = Field(3600.0, gt=0, le=30 * 86400, description="How long an answer stays in the cache.")
        max_ttl_seconds: float = Field(
            86400.0, gt=0, le=365 * 86400, description="Ceiling for a per-request TTL asked with the TTL header."
        )
        ttl_header: str = Field(
            "x-sluice-cache-ttl", pattern=r"^[A-Za-z0-9-]{1,64}$",
            description="Request header giving this request's TTL in seconds (0 means do not store); removed before the upstream.",
        )
        backend: Literal["auto", "memory", "sqlite", "redis"] = Field(
            "auto", description="Where entries live: 'memory' (this process, LRU bounded by max_bytes), 'sqlite' (survives restarts), "
            "'redis' (shared by replicas), 'auto' (redis when state.redis is configured, else sqlite)."
        )
        max_bytes: int = Field(
            256 * 1024 * 1024, ge=1024, le=1 << 40, description="Memory and SQLite backends: total bytes of entries kept before some are evicted (memory: the least recently used; SQLite: the oldest written)."
        )
        max_entry_bytes: int = Field(
            2 * 1024 * 1024, ge=256, le=256 * 1024 * 1024, description="Answers larger than this are not stored."
        )
        scope: Literal["key", "team", "shared"] = Field(
            "key", description="Who may read an entry: the caller's key, its team, or everyone ('shared', only for public data)."
        )
        endpoints: list[str] = Field(
            default_factory=lambda: ["chat/completions", "completions", "embeddings"], min_length=1, max_length=32,
            description="API endpoints whose POST answers are cached: a request's path after /v1/ (or an Azure-style "
            "deployments/NAME/), whatever the route's prefix.",
        )
        ignore_fields: list[str] = Field(
            default_factory=lambda: list(DEFAULT_IGNORED), max_length=64,
            description="Body fields left out of the key because they do not change the answer.",
        )
        honour_cache_control: bool = Field(
            True, description="Obey the request's cache-control: no-cache (skip lookup, still store) and no-store (neither)."
        )
        cache_streams: bool = Field(True, description="Store streamed answers (assembled once complete) and answer streams from the cache.")
        coalesce: bool = Field(
            True, description="A buffered request identical to one in flight in this process waits for that answer "
            "(at most coalesce_wait_s) instead of going upstream too. Streamed requests never wait.",
        )
        coalesce_wait_s: float = Field(30.0, gt=0, le=3600, description="Longest wait for an identical request in flight.")
        namespace: str = Field(
            "cache", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Key-value namespace; two instances with one namespace share entries."
        )

        @model_validator(mode="after")
        def _ttls(self) -> Cache.Config:
            if self.ttl_seconds > self.max_ttl_seconds:
                raise ValueError("ttl_seconds must not exceed max_ttl_seconds")
            if "model" in self.ignore_fields or "messages" in self.ignore_fields or "input" in self.ignore_fields or "prompt" in self.ignore_fields:
                raise ValueError("ignore_fields must not contain model, messages, input or prompt: the answer depends on them")
            return self

    config: Config

    @classmethod
    def check(cls, config: Config, sluice: Any) -> None:
        check_backends(sluice, backend=config.backend)

    async def start(self) -> None:
        c = self.config
        self.kv = self.runtime.state.kv(c.namespace, c.backend, c.max_bytes)
        self.metrics = self.runtime.shared("cache.metrics", lambda: _Metrics(self.runtime.metrics))
        self._endpoints = frozenset(e.strip("/") for e in c.endpoints)
        self._flights: dict[str, _Flight] = {}
        self._ignored = tuple(c.ignore_fields)

    # -- request ----------------------------------------------------------------
    def _cached_endpoint(self, path: str) -> bool:
        """Whether ``path`` (the whole request path: a route's prefix may end inside the endpoint's name)
        is a call to one of the configured endpoints."""
        return api_path(path) in self._endpoints

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        if ctx.method != "POST" or not self._cached_endpoint(ctx.path) or not ctx.body_is_json:
            return
        c = self.config
        body = ctx.body
        stream = ctx.stream
        cc = _cache_control(ctx.headers.get("cache-control")) if c.honour_cache_control else set()
        ttl = self._request_ttl(ctx)
        if "no-store" in cc or (stream and not c.cache_streams):
            self._result(ctx, BYPASS)
            return
        ident = ctx.identity
        scope = scope_of(c.scope, ident.key_id if ident else None, ident.team if ident else None, credentials_of(ctx.headers))
        pending = _Pending(key=request_key(ctx.endpoint, body, scope, self._ignored), ttl_s=ttl or 0.0, store=bool(ttl))
        ctx.stash[STASH] = pending
        if "no-cache" not in cc:
            entry = await self._lookup(pending.key)
            if entry is None and c.coalesce and not stream and await self._wait_for_flight(pending.key):
                entry = await self._lookup(pending.key)
            if entry is not None:
                self._answer(ctx, pending, entry, stream, body)
                return
        if pending.store and c.coalesce:
            flight = self._flights.get(pending.key)
            if flight is None or flight.done.done() or time.monotonic() - flight.started > c.coalesce_wait_s:
                pending.flight = self._flights[pending.key] = _Flight(asyncio.get_running_loop().create_future(), time.monotonic())
        self._result(ctx, MISS)

    async def _lookup(self, key: str) -> dict[str, Any] | None:
        raw = await self.kv.get(key)
        return read_entry(raw) if raw is not None else None

    async def _wait_for_flight(self, key: str) -> bool:
        """Wait for an identical request in flight to be answered and stored; False when there is none."""
        flight = self._flights.get(key)
        if flight is None or flight.done.done():
            return False
        left = self.config.coalesce_wait_s - (time.monotonic() - flight.started)
        if left <= 0:
            return False  # its on_done never came (dropped, or the leader is still streaming): go upstream
        try:
            await asyncio.wait_for(asyncio.shield(flight.done), left)
        except asyncio.TimeoutError:
            return False
        return True

    def _request_ttl(self, ctx: Context) -> float | None:
        c = self.config
        raw = ctx.headers.get(c.ttl_header)
        if raw is None:
            return c.ttl_seconds
        ctx.headers.popall(c.ttl_header, None)
        try:
            ttl = float(raw)
        except ValueError:
            return c.ttl_seconds
        if ttl != ttl or ttl <= 0:  # NaN or "do not store"
            return None
        return min(ttl, c.max_ttl_seconds)

    def _answer(self, ctx: Context, pending: _Pending, entry: dict[str, Any], stream: bool, body: dict[str, Any]) -> None:
        pending.hit = True
        self._result(ctx, HIT)
        age = max(0, int(time.time() - float(entry.get("stored_at") or time.time())))
        ctx.response_headers["age"] = str(age)
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        if stream:
            chunks = replay_chunks(entry, include_usage)
            ctx.reply(200, events=[Event.from_json(ch) for ch in chunks], reason="cache_hit")
        else:
            ctx.reply(200, entry["body"], reason="cache_hit")

    def _result(self, ctx: Context, result: str) -> None:
        ctx.tags["cache"] = result
        ctx.response_headers[RESULT_HEADER] = result
        self.metrics.requests.labels(result).inc()

    # -- answer -------------------------------------------------------------------
    @hookimpl
    def on_response(self, ctx: Context) -> None:
        pending = ctx.stash.get(STASH)
        if pending is None or pending.hit or not pending.store or ctx.response is None:
            return
        # Bytes, not the parsed object: outer plugins may change the answer in place on its way out.
        if ctx.response.status == 200 and len(ctx.response.body) <= self.config.max_entry_bytes:
            pending.body = ctx.response.body

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        pending = ctx.stash.get(STASH)
        if pending is None or pending.hit or not pending.store or pending.too_big or event.is_done:
            return None
        data = event.data
        if not data:
            return None  # no data lines (a keep-alive comment, a retry: or id: block): no chunk to keep
        pending.stream_bytes += len(data)
        if pending.stream_bytes > self.config.max_entry_bytes:
            pending.too_big = True
            pending.assembler = None
            return None
        asm = pending.assembler
        if asm is None:
            asm = pending.assembler = StreamAssembler()
        try:
            asm.add(orjson.loads(data))
        except orjson.JSONDecodeError:
            asm.broken = True
        return None

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        pending = ctx.stash.get(STASH)
        if pending is None or pending.hit or not pending.store:
            return
        try:
            entry = self._entry(ctx, pending)
            if isinstance(entry, str):
                self.metrics.stores.labels(entry).inc()
                return
            try:
                await self.kv.set(pending.key, entry, pending.ttl_s)
            except Exception:
                self.metrics.stores.labels("error").inc()
                raise
            self.metrics.stores.labels("stored").inc()
        finally:
            flight = pending.flight
            if flight is not None:
                # waiters look the key up again: a hit if stored, else they go upstream themselves
                if self._flights.get(pending.key) is flight:
                    del self._flights[pending.key]
                if not flight.done.done():
                    flight.done.set_result(None)

    def _entry(self, ctx: Context, pending: _Pending) -> bytes | str:
        """The entry to store, or the reason it is not stored."""
        if ctx.outcome != "ok" or ctx.upstream is None:
            return "incomplete"
        if pending.too_big:
            return "too_big"
        if pending.assembler is not None:
            asm = pending.assembler
            if not asm.complete:
                return "incomplete"
            body = asm.body()
            if "usage" not in body and ctx.usage is not None and not ctx.usage.estimated:
                # the usage event was hidden from this client (it did not ask): rebuilt with its details, so
                # a later hit reports the cached and reasoning tokens the upstream reported
                u = ctx.usage
                usage: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                         "total_tokens": u.total_tokens}
                if u.cached_tokens:
                    usage["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
                if u.reasoning_tokens:
                    usage["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
                body["usage"] = usage
            entry = make_entry(body, asm.chunks)
        elif pending.body is not None:
            try:
                body = orjson.loads(pending.body)
            except orjson.JSONDecodeError:
                return "incomplete"
            if not is_complete_body(body):
                return "incomplete"
            entry = make_entry(body, None)
        else:
            return "incomplete"
        if len(entry) > self.config.max_entry_bytes:
            return "too_big"
        return entry
