"""Redis state: GCRA counters, leases and sums in Lua (one round trip each), KV with TTL.

Every call goes through :class:`RedisGuard`: bounded by ``timeout_ms``, and after
``breaker_failures`` consecutive failures the breaker opens for
``breaker_cooldown_s`` and calls fail at once with
:class:`proxy.errors.StateUnavailable` instead of waiting on a dead server.

Time comes from Redis (``TIME``) so replicas with skewed clocks agree; tests may
inject a clock instead. In Cluster mode every counter key carries one hash tag,
so a multi-limit acquire is a single-slot script (atomic), at the price of
keeping counters on one shard.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from ..config import RedisConfig
from ..errors import StateUnavailable
from .base import KV, Counters, Decision, Limit, LimitStatus, SumStatus, settle_after_lost_answer
from .memory import gcra_check

log = logging.getLogger("sluice.state")
T = TypeVar("T")

_CLOCK = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: every key the step touches, once each (limit buckets, lease sets, buckets to adjust,
# lease sets to release from). ARGV[1]: now; ARGV[2]: the whole step as one space-separated
# string (one argument to encode and send, not one per number):
#   eps n m a r
#   then n limits     "key-index limit period cost",
#        m leases     "key-index limit ttl_s token",
#        a adjustments "key-index limit period cost",
#        r releases   "key-index token".
# First the settlement (earlier requests' reconciliations and releases, carried here to
# save them a round trip of their own), then the admission: leases are checked, then
# every GCRA limit, and only if all pass is anything of the admission written.
# Returns one string (one reply to parse): "allowed retry_after refused_index remaining_1
# reset_1 ..." (refused_index counts limits first, then leases).
ADMIT_LUA = _CLOCK + """
local w = {}
for x in string.gmatch(ARGV[2], '%S+') do w[#w + 1] = x end
local eps = tonumber(w[1])
local n = tonumber(w[2])
local m = tonumber(w[3])
local a = tonumber(w[4])
local r = tonumber(w[5])
local LIM = 5
local LEASES = LIM + 4 * n
local ADJ = LEASES + 4 * m
local REL = ADJ + 4 * a
for i = 1, a do
  local key = KEYS[tonumber(w[ADJ + 4 * i - 3])]
  local limit = tonumber(w[ADJ + 4 * i - 2])
  local period = tonumber(w[ADJ + 4 * i - 1])
  local cost = tonumber(w[ADJ + 4 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local nt = tat + cost * (period / limit)
  if nt <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.6f', nt), 'PX', math.ceil((nt - now) * 1000) + 1)
  end
end
for i = 1, r do
  redis.call('ZREM', KEYS[tonumber(w[REL + 2 * i - 1])], w[REL + 2 * i])
end
local nowtxt = string.format('%.6f', now)
for j = 1, m do
  local key = KEYS[tonumber(w[LEASES + 4 * j - 3])]
  local limit = tonumber(w[LEASES + 4 * j - 2])
  if redis.call('ZCARD', key) >= limit then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', nowtxt)
    if redis.call('ZCARD', key) >= limit then
      return '0 1.000000 ' .. tostring(n + j)
    end
  end
end
local new = {}
local out = {}
local pre = {}
local refused = 0
local wait_max = 0
for i = 1, n do
  local key = KEYS[tonumber(w[LIM + 4 * i - 3])]
  local limit = tonumber(w[LIM + 4 * i - 2])
  local period = tonumber(w[LIM + 4 * i - 1])
  local cost = tonumber(w[LIM + 4 * i])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  local base = tat
  if base < now then base = now end
  local nt = base + cost * interval
  local used = nt - now
  pre[2 * i - 1] = string.format('%.6f', (period - (base - now)) / interval)
  pre[2 * i] = string.format('%.6f', base - now)
  if used <= period + eps then
    new[i] = nt
    out[2 * i - 1] = string.format('%.6f', (period - used) / interval)
    out[2 * i] = string.format('%.6f', used)
  else
    local wait = used - period
    if cost > limit then wait = period end
    if refused == 0 or wait > wait_max then
      refused = i
      wait_max = wait
    end
  end
end
local head = (refused == 0 and '1 ' or '0 ') .. string.format('%.6f', wait_max) .. ' ' .. tostring(refused)
if refused ~= 0 then
  -- nothing was taken, so every status shows the bucket as it stands
  if n == 0 then return head end
  return head .. ' ' .. table.concat(pre, ' ')
end
for i = 1, n do
  local key = KEYS[tonumber(w[LIM + 4 * i - 3])]
  redis.call('SET', key, string.format('%.6f', new[i]), 'PX', math.ceil((new[i] - now) * 1000) + 1)
end
for j = 1, m do
  local key = KEYS[tonumber(w[LEASES + 4 * j - 3])]
  local ttl = tonumber(w[LEASES + 4 * j - 1])
  redis.call('ZADD', key, string.format('%.6f', now + ttl), w[LEASES + 4 * j])
  local want = math.ceil(ttl * 1000) + 1
  if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, want) end
end
if n == 0 then return head end
return head .. ' ' .. table.concat(out, ' ')
"""

# KEYS: one GCRA bucket. ARGV[1]: now. Returns how far its theoretical arrival time is ahead of now
# (0 when it is not), with nothing written: acquire's own test is then made in Python (gcra_check).
PEEK_LUA = _CLOCK + """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
return string.format('%.6f', tat - now)
"""

# KEYS: the sum, a hash {t: total, e: period end}. ARGV: now, amount, limit ('' for none), expires_at,
# the mark to record this add under ('' for none), the mark whose reservation this add settles ('': none;
# else the add applies only if that mark is still there, so a settlement sent twice applies once).
# The period end is kept in the hash (not only as a TTL) so an injected test clock sees it too.
# Numbers are written with '%.17g', which gives back the same double: a fixed number of
# decimals would round away amounts below it (a small embedding request costs 4e-7), so the
# sum and its limit check are the same arithmetic as the in-process counters'.
SUM_LUA = _CLOCK + """
local amount = tonumber(ARGV[2])
local expires_at = tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 't', 'e')
local cur = tonumber(h[1] or '0')
local e = tonumber(h[2] or '0')
if e <= now then
  cur = 0
  e = expires_at
  redis.call('DEL', KEYS[1])  -- a new period: the last one's reservation marks go with it
end
if ARGV[6] ~= '' and redis.call('HDEL', KEYS[1], 'r:' .. ARGV[6]) == 0 then
  return {'1', string.format('%.17g', cur)}  -- settled or undone already (or its period is over): nothing more
end
if ARGV[3] ~= '' and amount >= 0 and cur + amount > tonumber(ARGV[3]) then
  return {'0', string.format('%.17g', cur)}
end
if expires_at > e then e = expires_at end
local total = cur + amount
redis.call('HSET', KEYS[1], 't', string.format('%.17g', total), 'e', string.format('%.17g', e))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'r:' .. ARGV[5], string.format('%.17g', amount)) end
local ms = math.ceil((e - now) * 1000)
if ms < 1 then ms = 1 end
redis.call('PEXPIRE', KEYS[1], ms + 1000)
return {'1', string.format('%.17g', total)}
"""

# take back the add recorded under a mark (ARGV[1]), once: an add whose answer was lost may or may not
# have been made, and this is right either way
UNDO_SUM_LUA = """
local a = redis.call('HGET', KEYS[1], 'r:' .. ARGV[1])
if a then
  redis.call('HDEL', KEYS[1], 'r:' .. ARGV[1])
  local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0') - tonumber(a)
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', t))
end
return 1
"""

_FAILURES: tuple[type[BaseException], ...]


def _failures() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rx

    # ResponseError (a bug in a script, wrong type) is not a sign of an unhealthy server
    return (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.BusyLoadingError, rx.ReadOnlyError,
            rx.MasterDownError, rx.TryAgainError, asyncio.TimeoutError, OSError)


def connect(cfg: RedisConfig) -> Any:
    """A redis.asyncio client for the config: standalone URL, Sentinel or Cluster.

    Built-in retries are off: a retry inside the timeout only hides a slow server
    from the breaker.
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    timeout = cfg.timeout_ms / 1000
    common: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
    if cfg.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(cfg.url, retry=Retry(NoBackoff(), 0), **common)
    if cfg.sentinel:
        from redis.asyncio.sentinel import Sentinel
        from redis.asyncio.connection import parse_url

        nodes = []
        for hp in cfg.sentinel:
            host, _, port = hp.rpartition(":")
            nodes.append((host or hp, int(port or 26379)))
        opts = {k: v for k, v in parse_url(cfg.url).items() if k in ("password", "username", "db", "ssl")}
        sentinel = Sentinel(nodes, sentinel_kwargs=dict(common), retry=Retry(NoBackoff(), 0), **common, **opts)
        client = sentinel.master_for(cfg.master_name)
        # the sentinels' own connections outlive the master client: close_client() closes them too
        client.sluice_sentinels = list(sentinel.sentinels)
        return client
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(cfg.url, retry=Retry(NoBackoff(), 0), **common)


async def close_client(client: Any) -> None:
    """Close a client made by :func:`connect`, its Sentinel connections and its script lane if any."""
    await client.aclose()
    for s in getattr(client, "sluice_sentinels", ()):
        await s.aclose()
    lane = getattr(client, "sluice_lane", None)
    if lane is not None:
        await lane.close()


def _pack(args: Sequence[Any]) -> bytes:
    """A command in RESP, as ``Connection.pack_command`` writes it for str, int and bytes
    arguments, without its per-argument encoder and type checks."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if type(a) is bytes else (a if type(a) is str else str(a)).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Lane:
    """Plain connections for the scripts of the request path, beside the client's pool.

    The pool's ``execute_command`` path costs a lock, observability records, an event
    dispatch, a health probe of the socket and a ``wait_for`` task per call; a script
    on the request path needs none of them: its bound is the guard's timeout, and a
    connection whose call failed in any way (timeout, cancel, error) is closed, never
    reused. Error replies (``NOSCRIPT``) leave the connection clean. Only for a
    standalone client (Sentinel and Cluster keep their own pools).
    """

    def __init__(self, pool: Any, size: int = 64) -> None:
        # no socket timeout of its own: the guard bounds every call
        self.kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self.cls = pool.connection_class
        self.size = size
        self.idle: list[Any] = []
        self.busy = 0
        import redis.exceptions as rx

        self._reply_error = rx.ResponseError
        self._closed_error = rx.ConnectionError

    async def call(self, *args: Any) -> Any:
        conn = None
        idle = self.idle
        while idle:
            conn = idle.pop()
            reader = getattr(conn, "_reader", None)
            if reader is None or not reader.at_eof():
                break
            # closed by the server while idle (a restart, its idle `timeout`): not used, and not
            # counted as a failure of the backend
            await conn.disconnect(nowait=True)
            conn = None
        reused = conn is not None
        if conn is None:
            conn = self.cls(**self.kwargs)
        self.busy += 1
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(_pack(args), check_health=False)
            res = await conn.read_response()
        except self._reply_error:
            self.idle.append(conn)  # an error reply was read whole: the connection is in step
            raise
        except BaseException as e:
            await conn.disconnect(nowait=True)
            if reused and isinstance(e, self._closed_error):
                # a connection that sat idle was found closed: so, likely, are the others of its
                # time (a restart): dropped, so that each does not fail a call of its own
                await self.close()
            raise
        finally:
            self.busy -= 1
        self.idle.append(conn)  # at most ``size``: no call starts here when ``size`` are busy
        return res

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)


class RedisGuard:
    """Timeout and circuit breaker around every Redis call of a process."""

    def __init__(self, client: Any, cfg: RedisConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.cfg = cfg
        self.timeout_s = cfg.timeout_ms / 1000
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self._shas: dict[str, str] = {}
        self._errors = _failures()
        import redis.exceptions as rx

        self._noscript = rx.NoScriptError
        self._lane: _Lane | None = None
        try:
            from redis.asyncio import ConnectionPool

            if type(getattr(client, "connection_pool", None)) is ConnectionPool:
                self._lane = client.sluice_lane = _Lane(client.connection_pool)
        except (ImportError, AttributeError):  # pragma: no cover - another client type
            self._lane = None

    @property
    def is_open(self) -> bool:
        return self.failures >= self.cfg.breaker_failures and self._clock() < self.open_until

    def state(self) -> str:
        if self.is_open:
            return "open"
        return "half-open" if self.failures >= self.cfg.breaker_failures else "closed"

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.is_open:
            raise StateUnavailable("a state backend is unavailable (circuit open)", reason="redis_breaker_open")
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except self._errors as e:
            self._failed(e)
            raise _unavailable(e) from None
        self.failures = 0
        return result

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures >= self.cfg.breaker_failures:
            # past the threshold every failure (including a half-open probe) re-opens it
            if not self.is_open:
                log.warning("redis: breaker open for %.1fs after %d failures (%s)",
                            self.cfg.breaker_cooldown_s, self.failures, type(exc).__name__)
            self.open_until = self._clock() + self.cfg.breaker_cooldown_s

    async def script(self, lua: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script when the server does not know it (restart, failover)."""
        sha = self._shas.get(lua)
        if sha is None:
            sha = self._shas[lua] = hashlib.sha1(lua.encode()).hexdigest()

        lane = self._lane
        if lane is not None and lane.busy < lane.size and not self.is_open:
            # call(), written out for the request path: one coroutine less to resume
            try:
                async with asyncio.timeout(self.timeout_s):
                    try:
                        result = await lane.call("EVALSHA", sha, len(keys), *keys, *args)
                    except self._noscript:
                        result = await lane.call("EVAL", lua, len(keys), *keys, *args)
            except self._errors as e:
                self._failed(e)
                raise _unavailable(e) from None
            self.failures = 0
            return result

        async def run() -> Any:  # the client's own pool: Sentinel, Cluster, or a full lane
            try:
                return await self.client.evalsha(sha, len(keys), *keys, *args)
            except self._noscript:
                return await self.client.eval(lua, len(keys), *keys, *args)

        return await self.call(run)


def _unavailable(exc: BaseException) -> StateUnavailable:
    err = StateUnavailable(reason="redis_unavailable")
    err.ambiguous = isinstance(exc, TimeoutError)  # sent, unanswered in time: Redis may still carry it out
    return err


#: most background releases of lost leases a process keeps going at once (past it, their TTL frees them)
_MAX_PENDING_RELEASES = 1000


class RedisCounters(Counters):
    """Counters shared by every process and replica on one Redis.

    ``clock`` (epoch seconds) replaces Redis ``TIME`` in tests; leave it ``None``
    in production so all replicas use one clock.
    """

    def __init__(self, guard: RedisGuard, prefix: str, cluster: bool = False, clock: Callable[[], float] | None = None) -> None:
        self.guard = guard
        # one hash tag for all counters in Cluster mode: an acquire spans key, team and global limits
        self.prefix = prefix + ("{c}:" if cluster else "c:")
        self._clock = clock
        # lease tokens: unique across processes (a random prefix) without a random draw per lease
        self._token_prefix = secrets.token_hex(6)
        self._token_seq = itertools.count(1)
        from ..runtime import TaskGroup

        #: background releases of leases whose admission's answer was lost
        self._releasing = TaskGroup()

    def _now(self) -> str:
        return "-1" if self._clock is None else repr(self._clock())

    async def acquire(self, limits: Sequence[Limit]) -> Decision:
        decision, _ = await self.admit(limits, ())
        return decision

    #: admissions can carry settlements (``admit(..., settle=...)``), saving their round trips
    carries_settlements = True

    async def admit(
        self,
        limits: Sequence[Limit],
        leases: Sequence[tuple[str, int, float]],
        settle: tuple[Sequence[Limit], Sequence[tuple[str, str]]] | None = None,
    ) -> tuple[Decision, list[str]]:
        """``acquire(limits)`` plus a lease on every ``(key, limit, ttl_s)``: one script, all or nothing.

        ``settle`` (adjustments, releases) is applied first in the same script, whatever
        the decision. A full lease set refuses with ``refused = Limit(key, limit, ttl_s, 1)``
        and a one-second retry. Returns the decision and, when admitted, the lease tokens.
        """
        merged = _merge(limits) if len(limits) > 1 else list(limits)
        p = self.prefix
        keys: list[str] = []
        index: dict[str, str] = {}

        def ki(key: str) -> str:
            # every Redis key once in KEYS; the step refers to it by position
            i = index.get(key)
            if i is None:
                keys.append(key)
                i = index[key] = str(len(keys))
            return i

        words = ["0.000001", "", "", "", ""]
        for lim in merged:
            words += (ki(p + lim.key), _num(lim.limit), _num(lim.period_s), _num(lim.cost))
        tokens = []
        for key, limit, ttl_s in leases:
            token = self._token_prefix + format(next(self._token_seq), "x")
            tokens.append(token)
            words += (ki(p + "lease:" + key), str(int(limit)), _num(ttl_s), token)
        adjust = 0
        releases = 0
        if settle:
            for lim in settle[0]:
                if lim.cost != 0:
                    adjust += 1
                    words += (ki(p + lim.key), _num(lim.limit), _num(lim.period_s), _num(lim.cost))
            for key, token in settle[1]:
                releases += 1
                words += (ki(p + "lease:" + key), token)
        words[1:5] = (str(len(merged)), str(len(leases)), str(adjust), str(releases))
        try:
            raw = await self.guard.script(ADMIT_LUA, keys, (self._now(), " ".join(words)))
        except (StateUnavailable, asyncio.CancelledError) as e:
            # the answer was lost (a timeout), or the caller was cancelled (its client left) once the script
            # may have been sent: not necessarily the script, so its leases may be held, for a request that
            # will not release them. Released once Redis answers (idempotent), else their TTL
            if tokens and (isinstance(e, asyncio.CancelledError) or e.ambiguous):
                self.release_later([(key, t) for (key, _, _), t in zip(leases, tokens)], max(ttl for _, _, ttl in leases))
            raise
        res = raw.split()
        allowed = res[0] == b"1" or res[0] == "1"
        refused_i = int(res[2])
        if refused_i > len(merged):
            key, limit, ttl_s = leases[refused_i - len(merged) - 1]
            return Decision(False, float(res[1]), (), Limit(key, limit, ttl_s, 1.0)), []
        if len(merged) == len(limits):  # no key twice: statuses in order
            statuses = tuple(LimitStatus(lim, float(res[3 + 2 * i]), float(res[4 + 2 * i])) for i, lim in enumerate(limits))
        else:
            by_key = {lim.key: (float(res[3 + 2 * i]), float(res[4 + 2 * i])) for i, lim in enumerate(merged)}
            statuses = tuple(LimitStatus(lim, *by_key[lim.key]) for lim in limits)
        if allowed:
            return Decision(True, 0.0, statuses, None), tokens
        rk = merged[refused_i - 1].key
        refused = next(lim for lim in limits if lim.key == rk)
        return Decision(False, float(res[1]), statuses, refused), []

    async def adjust(self, limits: Sequence[Limit]) -> None:
        await self.settle(limits, ())

    async def peek(self, limit: Limit) -> Decision:
        ahead = float(await self.guard.script(PEEK_LUA, [self.prefix + limit.key], [self._now()]))
        # the in-process counters' test, on the bucket as it stands, measured from now (ADMIT_LUA's too)
        ok, _, _, wait = gcra_check(ahead, 0.0, limit)
        return Decision(True, 0.0) if ok else Decision(False, wait, (), limit)

    async def settle(self, adjust: Sequence[Limit], releases: Sequence[tuple[str, str]]) -> None:
        """``adjust(adjust)`` and release every ``(key, token)`` lease, in one script."""
        if any(lim.cost != 0 for lim in adjust) or releases:
            await self.admit((), (), (adjust, releases))

    def release_later(self, leases: list[tuple[str, str]], ttl_s: float) -> None:
        """Release ``leases`` in the background once Redis answers (a release is idempotent), or leave them to
        their TTL (``ttl_s``): for releases a failed call could not make."""
        if len(self._releasing) >= _MAX_PENDING_RELEASES:
            log.warning("redis: %d lost leases already wait for Redis; this one is left to its TTL", len(self._releasing))
            return

        async def release_all() -> None:
            for key, token in leases:
                await self.release(key, token)

        # until Redis answers, or the leases' TTL frees them anyway
        self._releasing.spawn(settle_after_lost_answer(release_all, time.monotonic() + ttl_s, time.monotonic),
                              "sluice-redis-release")

    async def close(self) -> None:
        await self._releasing.cancel()

    async def lease(self, key: str, limit: int, ttl_s: float) -> str | None:
        decision, tokens = await self.admit((), [(key, limit, ttl_s)])
        return tokens[0] if decision.allowed else None

    async def release(self, key: str, token: str) -> None:
        await self.guard.call(lambda: self.guard.client.zrem(self.prefix + "lease:" + key, token))

    async def add_sum(self, key: str, amount: float, limit: float | None, expires_at: float,
                      mark: str | None = None, unmark: str | None = None) -> SumStatus:
        res = await self.guard.script(
            SUM_LUA, [self.prefix + "sum:" + key],
            [self._now(), repr(float(amount)), "" if limit is None else repr(float(limit)), repr(float(expires_at)),
             mark or "", unmark or ""],
        )
        ok = (res[0].decode() if isinstance(res[0], bytes) else str(res[0])) == "1"
        total = float(res[1])
        return SumStatus(ok, total, float("inf") if limit is None else limit)

    async def undo_sum(self, key: str, mark: str) -> None:
        await self.guard.script(UNDO_SUM_LUA, [self.prefix + "sum:" + key], [mark])

    async def get_sum(self, key: str) -> float:
        total, end = await self.guard.call(lambda: self.guard.client.hmget(self.prefix + "sum:" + key, "t", "e"))
        if total is None or end is None:
            return 0.0
        now = self._clock() if self._clock is not None else time.time()
        return float(total) if float(end) > now else 0.0


_NUM_TEXT: dict[float, str] = {}


def _num(x: float) -> str:
    """``repr(float(x))``, remembered for the few numbers every step repeats (limits, periods, cost 1)."""
    t = _NUM_TEXT.get(x)
    if t is None:
        t = repr(float(x))
        if len(_NUM_TEXT) < 4096:
            _NUM_TEXT[x] = t
    return t


def _merge(limits: Sequence[Limit]) -> list[Limit]:
    """One entry per key (costs added): a script must not see one bucket twice."""
    out: dict[str, Limit] = {}
    for lim in limits:
        prev = out.get(lim.key)
        out[lim.key] = lim if prev is None else Limit(lim.key, prev.limit, prev.period_s, prev.cost + lim.cost)
    return list(out.values())


class RedisKV(KV):
    """Bytes under ``<prefix>kv:<namespace>:<key>`` with Redis-side expiry.

    ``max_bytes`` is not enforced per namespace: bound Redis itself with
    ``maxmemory`` and an LRU eviction policy.
    """

    def __init__(self, guard: RedisGuard, prefix: str, namespace: str) -> None:
        self.guard = guard
        self.prefix = f"{prefix}kv:{namespace}:"

    async def get(self, key: str) -> bytes | None:
        return await self.guard.call(lambda: self.guard.client.get(self.prefix + key))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(1, int(ttl_s * 1000))
        await self.guard.call(lambda: self.guard.client.set(self.prefix + key, value, px=px))

    async def delete(self, key: str) -> None:
        await self.guard.call(lambda: self.guard.client.delete(self.prefix + key))
