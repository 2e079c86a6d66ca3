"""auth: who is calling. Virtual keys (stored as hashes), static keys from YAML, ctx.identity.

Clients send ``Authorization: Bearer <key>`` or ``api-key: <key>`` (Azure style).
The key is checked, then both headers are removed so a client's key never
reaches an upstream (the upstream's own ``api_key`` is added by the core).

Virtual keys live in SQLite (``<state.dir>/keys.db``) or Redis, as a SHA-256 of
the secret only; lookups are cached in each process for ``cache_ttl_s``, which
bounds how long a revoke takes to reach every worker and replica.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import hmac
import logging
import re
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy import AdminRoute, Command, Context, Identity, Plugin, PluginConfig, ProxyError, StashKey, hookimpl
from proxy.openai import MODEL_PATHS, api_path, deployment_of
from proxy.state import Limit, check_backends

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from proxy.config import LoadedConfig, SluiceConfig
    from proxy.runtime import Runtime

log = logging.getLogger("sluice.auth")

KEY_PREFIX = "sk-sluice-"
#: identity of the request, for plugins that want the key record's extras
RECORD: StashKey[KeyRecord] = StashKey("auth.record")
_ID = re.compile(r"^key_[0-9a-f]{16}$")
_CACHE_MAX = 10_000
#: addresses with recent failures tracked at most (beyond, new ones go unchecked until some expire)
_FAILING_MAX = 100_000


def hash_key(secret: str) -> str:
    """SHA-256 of a key: enough for random 256-bit secrets, which no dictionary can reach."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- records -----------------------------------------------------------------

@dataclass
class KeyRecord:
    """A virtual or static key, without its secret."""

    id: str
    hash: str
    name: str | None = None
    team: str | None = None
    user: str | None = None
    models: list[str] | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    #: the secret's last four characters, to tell keys apart in listings
    hint: str = ""

    def public(self) -> dict[str, Any]:
        """What listings show: never the secret, never the hash."""
        now = time.time()
        status = "active"
        if self.revoked_at is not None and self.revoked_at <= now:
            status = "revoked"
        elif self.expires_at is not None and self.expires_at <= now:
            status = "expired"
        return {
            "id": self.id, "name": self.name, "team": self.team, "user": self.user, "models": self.models,
            "limits": self.limits, "metadata": self.metadata, "created_at": self.created_at,
            "expires_at": self.expires_at, "revoked_at": self.revoked_at, "hint": "..." + self.hint if self.hint else "",
            "status": status,
        }

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id, "hash": self.hash, "name": self.name, "team": self.team, "user": self.user,
            "models": None if self.models is None else orjson.dumps(self.models).decode(),
            "limits": orjson.dumps(self.limits).decode(), "metadata": orjson.dumps(self.metadata).decode(),
            "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at, "hint": self.hint,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> KeyRecord:
        def js(v: Any, default: Any) -> Any:
            if v is None:
                return default
            return orjson.loads(v) if isinstance(v, (str, bytes)) else v

        return cls(
            id=row["id"], hash=row["hash"], name=row.get("name"), team=row.get("team"), user=row.get("user"),
            models=js(row.get("models"), None), limits=js(row.get("limits"), {}), metadata=js(row.get("metadata"), {}),
            created_at=row.get("created_at") or 0.0, expires_at=row.get("expires_at"), revoked_at=row.get("revoked_at"),
            hint=row.get("hint") or "",
        )

    def identity(self) -> Identity:
        return Identity(
            key_id=self.id, name=self.name, team=self.team, user=self.user,
            models=tuple(self.models) if self.models is not None else None,
            limits=dict(self.limits), metadata=dict(self.metadata),
        )


class KeyStore:
    """Virtual keys in the process's state: Redis when configured (or asked), else SQLite."""

    def __init__(self, runtime_state: Any, backend: Literal["auto", "sqlite", "redis"] = "auto") -> None:
        hub = runtime_state
        if backend == "auto":
            backend = "redis" if hub.has_redis else "sqlite"
        self.backend = backend
        self.hub = hub
        if backend == "redis":
            if not hub.has_redis:
                raise ValueError("auth store 'redis' needs state.redis")
            prefix = hub.config.redis.key_prefix + "{keys}:"
            self._h = prefix + "h:"
            self._ids = prefix + "ids"
        else:
            from proxy.state import Table

            self.records = hub.records("keys")
            self.records.ensure(Table(
                "keys",
                {"id": str, "hash": str, "name": str, "team": str, "user": str, "models": str, "limits": str,
                 "metadata": str, "created_at": float, "expires_at": float, "revoked_at": float, "hint": str},
                pk="id", indexes=[("hash",)],
            ))

    async def _redis(self, fn: Any) -> Any:
        return await self.hub.guard.call(fn)

    async def by_hash(self, h: str) -> KeyRecord | None:
        if self.backend == "redis":
            raw = await self._redis(lambda: self.hub.redis.get(self._h + h))
            return None if raw is None else KeyRecord.from_row(orjson.loads(raw))
        rows = await self.records.query("SELECT * FROM keys WHERE hash = ? LIMIT 1", [h])
        return KeyRecord.from_row(rows[0]) if rows else None

    async def by_id(self, key_id: str) -> KeyRecord | None:
        if self.backend == "redis":
            h = await self._redis(lambda: self.hub.redis.hget(self._ids, key_id))
            return None if h is None else await self.by_hash(h.decode())
        rows = await self.records.query("SELECT * FROM keys WHERE id = ?", [key_id])
        return KeyRecord.from_row(rows[0]) if rows else None

    async def put(self, rec: KeyRecord) -> None:
        if self.backend == "redis":
            data = orjson.dumps(rec.row())

            async def write() -> None:
                async with self.hub.redis.pipeline(transaction=True) as p:
                    p.set(self._h + rec.hash, data)
                    p.hset(self._ids, rec.id, rec.hash)
                    await p.execute()

            await self._redis(write)
            return
        self.records.append("keys", rec.row())
        await self.records.flush()

    async def list(self) -> list[KeyRecord]:
        if self.backend == "redis":
            ids = await self._redis(lambda: self.hub.redis.hgetall(self._ids))
            if not ids:
                return []
            hashes = [v.decode() for v in ids.values()]
            raws = await self._redis(lambda: self.hub.redis.mget([self._h + h for h in hashes]))
            out = [KeyRecord.from_row(orjson.loads(r)) for r in raws if r is not None]
            return sorted(out, key=lambda r: r.created_at)
        rows = await self.records.query("SELECT * FROM keys ORDER BY created_at")
        return [KeyRecord.from_row(r) for r in rows]

    async def create(self, *, name: str | None = None, team: str | None = None, user: str | None = None,
                     models: list[str] | None = None, limits: dict[str, Any] | None = None,
                     metadata: dict[str, Any] | None = None, expires_at: float | None = None) -> tuple[str, KeyRecord]:
        """A new key: the secret (shown once, never stored) and its record."""
        secret = new_secret()
        rec = KeyRecord(
            id="key_" + secrets.token_hex(8), hash=hash_key(secret), name=name, team=team, user=user, models=models,
            limits=check_limits(limits or {}), metadata=dict(metadata or {}), created_at=time.time(),
            expires_at=expires_at, hint=secret[-4:],
        )
        await self.put(rec)
        return secret, rec

    async def revoke(self, key_id: str, at: float | None = None) -> KeyRecord | None:
        rec = await self.by_id(key_id)
        if rec is None:
            return None
        when = time.time() if at is None else at
        if rec.revoked_at is None or rec.revoked_at > when:
            rec.revoked_at = when
            await self.put(rec)
        return rec

    async def rotate(self, key_id: str, grace_s: float = 0.0) -> tuple[str, KeyRecord] | None:
        """A new secret with the same attributes; the old key stops working after ``grace_s``."""
        old = await self.by_id(key_id)
        if old is None:
            return None
        secret, rec = await self.create(
            name=old.name, team=old.team, user=old.user, models=old.models, limits=old.limits,
            metadata={**old.metadata, "rotated_from": old.id}, expires_at=old.expires_at,
        )
        await self.revoke(old.id, at=time.time() + grace_s)
        return secret, rec


def check_limits(limits: dict[str, Any]) -> dict[str, Any]:
    """A virtual key's limits, checked by :class:`KeyLimits`, the rules a static key's and the admin API's
    limits follow (strictly: ``True`` is no count, ``"5"`` no number); ``ValueError`` naming the first wrong one."""
    known = KeyLimits.model_fields
    unknown = [k for k in limits if k not in known]
    if unknown:
        raise ValueError(f"unknown limit {unknown[0]!r} (known: {', '.join(known)})")
    try:
        KeyLimits.model_validate(limits, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"limit {err['loc'][0]}: {err['msg']}") from None
    return dict(limits)


# -- config --------------------------------------------------------------------

class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000, description="Requests per minute for this key (read by ratelimit).")
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000, description="Tokens per minute for this key (read by ratelimit).")
    concurrency: int | None = Field(None, ge=1, le=1_000_000, description="Requests in flight at once for this key (read by ratelimit).")
    budget_per_day: float | None = Field(
        None, gt=0, le=1e12, allow_inf_nan=False,
        description="Spend per UTC day for this key, in the price table's currency (read by metering's budgets).")
    budget_per_month: float | None = Field(
        None, gt=0, le=1e12, allow_inf_nan=False,
        description="Spend per UTC month for this key, in the price table's currency (read by metering's budgets).")


class StaticKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(..., min_length=16, max_length=512, description='The secret, usually {"$env": "NAME"}; at least 16 characters.')
    id: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="A stable id for logs, metrics and limits (never the secret).")
    name: str | None = Field(None, max_length=200, description="A human name.")
    team: str | None = Field(None, max_length=200, description="Team, for team limits and usage.")
    user: str | None = Field(None, max_length=200, description="User, for usage records.")
    models: list[str] | None = Field(None, max_length=1000, description="Glob patterns of models this key may use; omitted: all.")
    limits: KeyLimits = Field(default_factory=KeyLimits, description="Per-key limits: rates for the ratelimit plugin, budgets for metering.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form labels carried on ctx.identity.metadata.")


class AuthConfig(PluginConfig):
    keys: list[StaticKey] = Field(default_factory=list, max_length=10_000, description="Static keys for simple sidecar use, checked before virtual keys.")
    virtual_keys: bool = Field(True, description="Accept virtual keys from the key store (created with `sluice keys create` or the admin API).")
    store: Literal["auto", "sqlite", "redis"] = Field("auto", description="Where virtual keys live: redis when state.redis is set (auto), else SQLite <state.dir>/keys.db.")
    cache_ttl_s: float = Field(5.0, ge=0, le=300, description="How long a looked-up key is trusted without asking the store again; bounds how long a revoke takes to reach every replica.")
    headers: list[str] = Field(default_factory=lambda: ["authorization", "api-key"], min_length=1, max_length=8, description="Headers a key is read from, in order; 'authorization' expects 'Bearer <key>'.")
    strip_credentials: bool = Field(True, description="Remove the client's credential headers before the request goes upstream.")
    max_failures: int = Field(20, ge=1, le=100_000, description="Failed attempts per client address allowed per failure_window_s (burst), refilled steadily.")
    failure_window_s: float = Field(60.0, gt=0, le=86_400, description="The window of max_failures.")
    failure_limit: bool = Field(True, description="Answer 429 to a client address after max_failures failed attempts in failure_window_s.")
    failure_backend: Literal["auto", "memory", "redis"] = Field(
        "auto", description="Where failed attempts are counted: 'redis' counts an address's failures across workers and replicas "
        "(this process's count stands in while Redis is unreachable); 'memory' per process; 'auto' picks redis when state.redis is set.")
    required: bool = Field(True, description="Refuse requests without a key (401). If false, they pass with no identity.")

    @field_validator("headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.lower() for h in v]

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        ids = [k.id for k in self.keys]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"keys: duplicate id {sorted(dup)[0]!r}")
        secrets_ = [k.key for k in self.keys]
        if len(set(secrets_)) != len(secrets_):
            raise ValueError("keys: two static keys have the same secret")
        if not self.keys and not self.virtual_keys:
            raise ValueError("no keys can ever match: add static 'keys' or enable 'virtual_keys'")
        return self


# -- the plugin --------------------------------------------------------------

class Auth(Plugin):
    """Checks the caller's key and sets ``ctx.identity``; answers 401/403/429 otherwise."""

    name = "auth"
    kind = "guard"
    Config = AuthConfig

    @classmethod
    def check(cls, config: AuthConfig, sluice: Any) -> None:
        check_backends(sluice, store=config.store if config.virtual_keys else "auto", failure_backend=config.failure_backend)

    def __init__(self, config: AuthConfig, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        self.config: AuthConfig = config
        self._static: list[tuple[bytes, KeyRecord]] = []
        now = time.time()
        for k in config.keys:
            rec = KeyRecord(
                id=k.id, hash=hash_key(k.key), name=k.name, team=k.team, user=k.user, models=k.models,
                limits=k.limits.model_dump(exclude_none=True), metadata=dict(k.metadata), created_at=now, hint=k.key[-4:],
            )
            self._static.append((bytes.fromhex(rec.hash), rec))
        self._identities = {rec.hash: rec.identity() for _, rec in self._static}
        self.store: KeyStore | None = None
        self._fail = None
        #: this process's failure counts: the shared ones' stand-in while their backend is unreachable
        self._fail_local = None
        self._fail_warned = 0.0
        self._failing: dict[str, float] = {}
        #: hash -> (record, identity, trusted until): identities are shared read-only between requests
        self._cache: OrderedDict[str, tuple[KeyRecord, Identity, float]] = OrderedDict()
        #: presented virtual key -> (its cache key, the cache entry it found): saves hashing a key seen
        #: lately. Only keys the store knew are kept, in this process's memory, never written anywhere.
        self._memo: dict[str, tuple[str, tuple[KeyRecord, Identity, float]]] = {}
        self._header_names = tuple(config.headers)
        if not config.virtual_keys and all(k.models is None for k in config.keys):
            # no key is restricted to some models: nothing to filter in /models answers, so
            # no on_response (the core then skips the response phase for this plugin)
            self.on_response = None  # type: ignore[assignment]

    async def start(self) -> None:
        if self.config.virtual_keys:
            self.store = KeyStore(self.runtime.state, self.config.store)
            # shared by every auth instance of the process, so an admin revoke here clears it at once
            self._cache = self.runtime.shared("auth.cache", OrderedDict)
        if self.config.failure_limit:
            self._fail = self.runtime.state.counters(self.config.failure_backend)
            self._fail_local = self.runtime.state.counters("memory")
            self._failing = self.runtime.shared("auth.failing", dict)

    # -- request path --------------------------------------------------------
    def _presented(self, ctx: Context) -> str | None:
        """The key the client sent (first of ``headers`` that holds one); removes them all when stripping."""
        headers = ctx.headers
        strip = self.config.strip_credentials
        found = None
        for h in self._header_names:
            values = headers.popall(h, None) if strip else headers.getall(h, None)
            if not values or found is not None:
                continue
            v = values[0]
            if h == "authorization":
                scheme, _, token = v.partition(" ")
                if scheme.lower() != "bearer":
                    continue
                v = token
            v = v.strip()
            if v:
                found = v
        return found

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.reply_value is not None:
            return
        secret = self._presented(ctx)
        if secret is None:
            if not self.config.required:
                return
            raise ProxyError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or in the 'api-key' header.",
                             code="missing_api_key", reason="missing_key")
        if self._failing and self._fail is not None:  # some address failed lately: is it this one?
            fail_key = _fail_key(ctx)
            until = self._failing.get(fail_key)
            if until is not None:
                if until > time.monotonic():
                    # an address that failed lately (here: another replica's failures count once this
                    # one has seen one): would one more failure fit?
                    await self._probe_failures(fail_key)
                else:
                    self._failing.pop(fail_key, None)

        # a key seen lately (and still in the lookup cache) skips hashing: the memo holds
        # the cache entry it found, so an entry dropped or replaced (revoke, expiry) is missed
        rec: KeyRecord | None = None
        ident: Identity | None = None
        memo = self._memo.get(secret)
        if memo is not None and self._cache.get(memo[0]) is memo[1] and memo[1][2] > time.monotonic():
            rec, ident = memo[1][0], memo[1][1]
        else:
            h = hash_key(secret)
            rec = self._static_match(h) if self._static else None
            if rec is not None:
                ident = self._identities[rec.hash]
            elif self.store is not None:
                found = await self._lookup(h)
                if found is not None:
                    rec, ident = found
                    ck = self.store.backend + ":" + h
                    entry = self._cache.get(ck)
                    if entry is not None:
                        if len(self._memo) >= _CACHE_MAX:
                            self._memo.clear()
                        self._memo[secret] = (ck, entry)
        if rec is None:
            await self._failed(ctx)
            raise ProxyError(401, "Incorrect API key provided.", code="invalid_api_key", reason="invalid_key")
        if rec.revoked_at is not None or rec.expires_at is not None:
            now = time.time()
            if rec.revoked_at is not None and rec.revoked_at <= now:
                await self._failed(ctx)
                raise ProxyError(401, "This API key has been revoked.", code="api_key_revoked", reason="revoked_key")
            if rec.expires_at is not None and rec.expires_at <= now:
                await self._failed(ctx)
                raise ProxyError(401, "This API key has expired.", code="api_key_expired", reason="expired_key")
        ctx.identity = ident
        ctx.stash[RECORD] = rec
        if rec.models is not None:
            self._check_model(ctx, rec.models)

    @staticmethod
    def _check_model(ctx: Context, allowed: tuple[str, ...] | list[str]) -> None:
        """A restricted key names an allowed model, wherever the request carries it: the JSON body, a
        multipart form's ``model`` field, the path of ``GET /models/{id}``. A call to a model that names
        none would get the upstream's default (vLLM's served model), so it is refused too. The model
        name is never echoed: nothing from the request goes into an answer. An Azure-style path's
        deployment (``/openai/deployments/NAME/...``) is the model such an upstream runs, whatever the
        body says: it must be allowed too."""
        deployment = deployment_of(ctx.path)
        if deployment is not None and not any(fnmatch.fnmatchcase(deployment, p) for p in allowed):
            raise ProxyError(403, "This API key is not allowed to use the requested model.", code="model_not_allowed",
                             param="model", reason="model_not_allowed")
        if ctx.method == "POST" and ctx.path.rstrip("/").endswith("/batches"):
            # a batch runs the requests of a file uploaded before, each naming its own model: not checked
            # here, so not open to a key that may use only some models
            raise ProxyError(403, "This API key may use only some models: the Batch API, whose requests name their own "
                             "models, is not open to it.", code="model_not_allowed", param="model", reason="model_not_allowed")
        model = ctx.model
        if model is None:
            path = api_path(ctx.path)
            if path.startswith("models/"):
                # a model by its id (read, or deleted: a fine-tuned one), whatever the method
                if not any(fnmatch.fnmatchcase(path[7:], p) for p in allowed):
                    raise ProxyError(404, "The model does not exist or you do not have access to it.",
                                     code="model_not_found", param="model", reason="model_not_allowed")
                return
            if ctx.method != "POST" or path not in MODEL_PATHS:
                return  # not a call to a model: files, batches, threads, the model list (filtered in on_response)
            models = form_fields(ctx, "model")
            if len(models) != 1:
                # none, or several (servers differ on which one wins)
                raise ProxyError(403, "This API key may use only some models: name one in 'model'.",
                                 code="model_not_allowed", param="model", reason="model_not_allowed")
            model = models[0]
        if not any(fnmatch.fnmatchcase(model, p) for p in allowed):
            raise ProxyError(403, "This API key is not allowed to use the requested model.", code="model_not_allowed",
                             param="model", reason="model_not_allowed")

    def _static_match(self, h: str) -> KeyRecord | None:
        digest = bytes.fromhex(h)
        found = None
        for known, rec in self._static:  # no early exit: the time taken says nothing about which key is close
            if hmac.compare_digest(known, digest):
                found = rec
        return found

    async def _lookup(self, h: str) -> tuple[KeyRecord, Identity] | None:
        assert self.store is not None
        now = time.monotonic()
        # instances may use different stores: a key is trusted only for the store it came from
        ck = self.store.backend + ":" + h
        hit = self._cache.get(ck)
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        rec = await self.store.by_hash(h)
        if rec is not None and hmac.compare_digest(rec.hash, h):
            ident = rec.identity()
            if self.config.cache_ttl_s > 0:
                self._cache[ck] = (rec, ident, now + self.config.cache_ttl_s)
                self._cache.move_to_end(ck)
                while len(self._cache) > _CACHE_MAX:
                    self._cache.popitem(last=False)
            return rec, ident
        self._cache.pop(ck, None)
        return None

    def _fail_limit(self, fail_key: str) -> Limit:
        return Limit(fail_key, self.config.max_failures, self.config.failure_window_s)

    async def _probe_failures(self, fail_key: str) -> None:
        """429 when the address's bucket has no whole failure left (a look, nothing taken). The failures
        themselves are taken by :meth:`_failed`, refused once the bucket is empty; this check only stops
        a right key from telling itself apart while the address is blocked."""
        limit = self._fail_limit(fail_key)
        local = self._fail_local
        assert local is not None
        d = await local.peek(limit)  # this process's own failures, counted whatever Redis did with them
        if d.allowed and self._fail is not local:
            try:
                d = await self._fail.peek(limit)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - unreachable, slow or full: this process's count stands in
                self._shared_failed(e)
        if not d.allowed:
            raise _too_many(d.retry_after_s)

    def _shared_failed(self, e: BaseException) -> None:
        now = time.monotonic()
        if now >= self._fail_warned:  # once a minute at most, however many fail
            self._fail_warned = now + 60.0
            log.warning("auth: failed attempts cannot be counted in the shared state (%s); counted in this process meanwhile",
                        type(e).__name__)

    async def _failed(self, ctx: Context) -> None:
        """Take one failure from the address's bucket; 429 instead of the 401 when it is empty, so that every
        401 an address gets stands for a failure counted (however many are in flight at once)."""
        if self._fail is None:
            return
        fail_key = _fail_key(ctx)
        limit = self._fail_limit(fail_key)
        local = self._fail_local
        assert local is not None
        # counted here whatever the shared count does, so that it can stand in while that one is out of reach
        d = await local.acquire([limit])
        if self._fail is not local:
            try:
                d = await self._fail.acquire([limit])
            except Exception as e:  # noqa: BLE001 - unreachable, slow or full: this process's count stands in
                self._shared_failed(e)
        failing = self._failing
        now = time.monotonic()
        if len(failing) >= _FAILING_MAX:
            # at most one O(n) sweep a second, however many addresses fail; the ""
            # entry (no address key is empty) holds when the next sweep may run
            if failing.get("", 0.0) <= now:
                for k in [k for k, t in failing.items() if t <= now and k]:
                    del failing[k]
                failing[""] = now + 1.0
        if len(failing) < _FAILING_MAX:
            # a full bucket refills in one window: until then, check this address
            failing[fail_key] = now + self.config.failure_window_s
        if not d.allowed:
            raise _too_many(d.retry_after_s)

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        ident = ctx.identity
        r = ctx.response
        if ident is None or ident.models is None or r is None or r.status != 200 or not ctx.path.rstrip("/").endswith("/models"):
            return
        body = r.json
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            body["data"] = [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)
                            and any(fnmatch.fnmatchcase(m["id"], p) for p in ident.models)]
            r.set_json(body)
            r.headers.popall("content-length", None)

    # -- commands and admin ---------------------------------------------------
    @classmethod
    def commands(cls) -> list[Command]:
        return [
            Command("keys create", "create a virtual key (the secret is printed once)", _configure_create, _cmd_create),
            Command("keys list", "list virtual keys (never their secrets)", _configure_list, _cmd_list),
            Command("keys revoke", "revoke a virtual key", _configure_id, _cmd_revoke),
            Command("keys rotate", "replace a key's secret; the old one stops working after --grace", _configure_rotate, _cmd_rotate),
        ]

    @classmethod
    def admin_routes(cls) -> list[AdminRoute]:
        return [
            AdminRoute("POST", "keys", _admin_create),
            AdminRoute("GET", "keys", _admin_list),
            AdminRoute("GET", "keys/{id}", _admin_get),
            AdminRoute("POST", "keys/{id}/revoke", _admin_revoke),
            AdminRoute("DELETE", "keys/{id}", _admin_revoke),
            AdminRoute("POST", "keys/{id}/rotate", _admin_rotate),
        ]


def form_fields(ctx: Context, name: str) -> list[str]:
    """The texts of every ``name`` field of a ``multipart/form-data`` body (an audio upload's ``model``)."""
    ctype = ctx.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        return []
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if m is None:
        return []
    delimiter = b"--" + m.group(1).encode("latin-1")
    wanted = re.compile(rb'(?i)^content-disposition:\s*form-data;(?:.*;)?\s*name="' + re.escape(name.encode()) + rb'"(?:;|\s*$)')
    out = []
    for part in ctx.raw.split(delimiter)[1:]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and any(wanted.match(line) for line in head.split(b"\r\n")):
            out.append(value.removesuffix(b"\r\n").decode("utf-8", "replace"))
    return out


def _fail_key(ctx: Context) -> str:
    """The counter of an address's failed attempts."""
    return "auth:fail:" + (ctx.client_ip or "-")


def _too_many(retry_after: float) -> ProxyError:
    secs = max(1, int(retry_after + 0.999))
    return ProxyError(429, "Too many failed authentication attempts from your address. Retry later.",
                      code="too_many_auth_failures", headers={"retry-after": str(secs)}, reason="auth_failures")


# -- shared by the CLI and the admin API -------------------------------------

def store_backend(config: SluiceConfig) -> Literal["auto", "sqlite", "redis"]:
    """The store the configured auth plugin uses (the first that says), else auto."""
    for route in config.routes:
        for entry in route.chain:
            if isinstance(entry, dict) and "auth" in entry and isinstance(entry["auth"], dict):
                s = entry["auth"].get("store")
                if s in ("sqlite", "redis", "auto"):
                    return s
    return "auto"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"invalid duration {text!r} (examples: 3600, 90s, 15m, 12h, 30d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _new_key_payload(secret: str, rec: KeyRecord) -> dict[str, Any]:
    return {"key": secret, **rec.public()}


async def _admin_store(runtime: Runtime) -> KeyStore:
    return runtime.shared("auth.admin_store", lambda: KeyStore(runtime.state, store_backend(runtime.config)))


async def key_identity(runtime: Runtime, key_id: str) -> Identity | None:
    """The identity (team, limits) of the key ``key_id``: a static key of a serving auth instance, else a
    virtual key in the store, when an instance takes them. For admin endpoints that report on a key."""
    instances = runtime.instances(Auth)
    for inst in instances:
        for _, rec in inst._static:
            if rec.id == key_id:
                return rec.identity()
    if any(inst.config.virtual_keys for inst in instances):
        rec = await (await _admin_store(runtime)).by_id(key_id)
        if rec is not None:  # revoked or expired too: what it spent is still worth a report
            return rec.identity()
    return None


def _forget(runtime: Runtime, rec: KeyRecord | None) -> None:
    if rec is not None:
        cache = runtime.shared("auth.cache", OrderedDict)
        for backend in ("sqlite", "redis"):
            cache.pop(backend + ":" + rec.hash, None)


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _bad(message: str, status: int = 400, code: str = "invalid_request") -> web.Response:
    from aiohttp import web

    err = ProxyError(status, message, code=code)
    return web.Response(status=status, body=err.body(), content_type="application/json")


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    team: str | None = Field(None, max_length=200)
    user: str | None = Field(None, max_length=200)
    models: list[str] | None = Field(None, max_length=1000)
    limits: KeyLimits = Field(default_factory=KeyLimits)
    metadata: dict[str, Any] = Field(default_factory=dict)
    expires_in_s: float | None = Field(None, gt=0, le=10 * 365 * 86400)

    @field_validator("metadata")
    @classmethod
    def _storable(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            orjson.dumps(v)  # as the record stores it (a key's metadata nested past 254 levels cannot be)
        except TypeError:
            raise ValueError("nested too deeply to store (254 levels at most)") from None
        return v


async def _admin_create(request: web.Request, runtime: Runtime) -> web.Response:
    try:
        spec = CreateKey.model_validate(orjson.loads(await request.read() or b"{}"))
    except (orjson.JSONDecodeError, ValidationError) as e:
        msg = "invalid JSON" if isinstance(e, orjson.JSONDecodeError) else "; ".join(
            f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return _bad(f"Invalid key spec: {msg}")
    store = await _admin_store(runtime)
    secret, rec = await store.create(
        name=spec.name, team=spec.team, user=spec.user, models=spec.models,
        limits=spec.limits.model_dump(exclude_none=True), metadata=spec.metadata,
        expires_at=None if spec.expires_in_s is None else time.time() + spec.expires_in_s,
    )
    return _json(_new_key_payload(secret, rec), 201)


async def _admin_list(request: web.Request, runtime: Runtime) -> web.Response:
    store = await _admin_store(runtime)
    return _json({"object": "list", "data": [r.public() for r in await store.list()]})


async def _admin_get(request: web.Request, runtime: Runtime) -> web.Response:
    store = await _admin_store(runtime)
    rec = await store.by_id(request.match_info["id"])
    if rec is None:
        return _bad("No such key.", 404, "key_not_found")
    return _json(rec.public())


async def _admin_revoke(request: web.Request, runtime: Runtime) -> web.Response:
    store = await _admin_store(runtime)
    rec = await store.revoke(request.match_info["id"])
    if rec is None:
        return _bad("No such key.", 404, "key_not_found")
    _forget(runtime, rec)
    return _json(rec.public())


async def _admin_rotate(request: web.Request, runtime: Runtime) -> web.Response:
    grace = request.query.get("grace", "0")
    try:
        grace_s = parse_duration(grace)
    except ValueError as e:
        return _bad(str(e))
    store = await _admin_store(runtime)
    key_id = request.match_info["id"]
    out = await store.rotate(key_id, grace_s)
    if out is None:
        return _bad("No such key.", 404, "key_not_found")
    if grace_s == 0:
        _forget(runtime, await store.by_id(key_id))
    return _json(_new_key_payload(*out), 201)


# -- CLI ----------------------------------------------------------------------

def _configure_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="a human name for the key")
    p.add_argument("--team", help="the team (team limits, usage)")
    p.add_argument("--user", help="the user (usage)")
    p.add_argument("--model", action="append", dest="models", metavar="GLOB", help="a model pattern the key may use (repeat); default all")
    p.add_argument("--rpm", type=int, help="requests per minute for this key")
    p.add_argument("--tpm", type=int, help="tokens per minute for this key")
    p.add_argument("--concurrency", type=int, help="requests in flight at once for this key")
    p.add_argument("--budget-per-day", type=float, help="spend per UTC day for this key (metering's budgets)")
    p.add_argument("--budget-per-month", type=float, help="spend per UTC month for this key (metering's budgets)")
    p.add_argument("--expires-in", help="lifetime, e.g. 30d, 12h, 3600")
    p.add_argument("--meta", action="append", default=[], metavar="K=V", help="a metadata label (repeat)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="include revoked and expired keys")


def _configure_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="the key id (key_...)")


def _configure_rotate(p: argparse.ArgumentParser) -> None:
    _configure_id(p)
    p.add_argument("--grace", default="0", help="how long the old secret keeps working, e.g. 1h (default: stops now)")
    p.add_argument("--json", action="store_true", help="print JSON")


async def _with_store(loaded: LoadedConfig, fn: Any, existing: bool = True) -> int:
    """Run ``fn(store)``; with ``existing``, a SQLite store must be there already (a mistyped
    ``state.dir`` would otherwise get an empty one, and list nothing without a word)."""
    from proxy.state import StateHub

    backend = store_backend(loaded.config)
    if existing and (backend == "sqlite" or (backend == "auto" and not loaded.config.state.redis)):
        path = Path(loaded.config.state.dir) / "keys.db"
        if not path.exists():
            print(f"sluice: no key store at {path} (is state.dir right? 'sluice keys create' makes one)", file=sys.stderr)
            return 1
    hub = StateHub(loaded.config.state)
    await hub.start()
    try:
        return await fn(KeyStore(hub, backend))
    except ProxyError as e:
        print(f"sluice: {e.message}", file=sys.stderr)
        return 1
    finally:
        await hub.close()


def _print_new(secret: str, rec: KeyRecord, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(_new_key_payload(secret, rec)).decode())
    else:
        print(f"id:  {rec.id}\nkey: {secret}\n(the key is shown only now; store it safely)")


async def _cmd_create(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    limits = {k: v for k, v in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm), ("concurrency", args.concurrency),
                                ("budget_per_day", args.budget_per_day), ("budget_per_month", args.budget_per_month)) if v is not None}
    meta = {}
    for kv in args.meta:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            print(f"sluice: --meta expects K=V, got {kv!r}", file=sys.stderr)
            return 2
        meta[k] = v
    try:
        check_limits(limits)
        expires = None if args.expires_in is None else time.time() + parse_duration(args.expires_in)
    except ValueError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2

    async def run(store: KeyStore) -> int:
        secret, rec = await store.create(name=args.name, team=args.team, user=args.user, models=args.models,
                                         limits=limits, metadata=meta, expires_at=expires)
        _print_new(secret, rec, args.json)
        return 0

    return await _with_store(loaded, run, existing=False)


async def _cmd_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def run(store: KeyStore) -> int:
        rows = [r.public() for r in await store.list()]
        if not args.all:
            rows = [r for r in rows if r["status"] == "active"]
        if args.json:
            print(orjson.dumps(rows).decode())
            return 0
        print(f"{'ID':<22} {'NAME':<20} {'TEAM':<14} {'STATUS':<8} {'HINT':<8} MODELS")
        for r in rows:
            models = ",".join(r["models"]) if r["models"] else "*"
            print(f"{r['id']:<22} {str(r['name'] or '-')[:20]:<20} {str(r['team'] or '-')[:14]:<14} {r['status']:<8} {r['hint']:<8} {models}")
        return 0

    return await _with_store(loaded, run)


async def _cmd_revoke(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def run(store: KeyStore) -> int:
        rec = await store.revoke(args.id)
        if rec is None:
            print(f"sluice: no key {args.id}", file=sys.stderr)
            return 1
        print(f"revoked {rec.id}")
        return 0

    return await _with_store(loaded, run)


async def _cmd_rotate(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    try:
        grace = parse_duration(args.grace)
    except ValueError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2

    async def run(store: KeyStore) -> int:
        out = await store.rotate(args.id, grace)
        if out is None:
            print(f"sluice: no key {args.id}", file=sys.stderr)
            return 1
        _print_new(*out, args.json)
        return 0

    return await _with_store(loaded, run)
