"""Pooled upstream clients: timeouts, retries before the first byte, fallback over ctx.targets."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
import weakref
from typing import TYPE_CHECKING, Any, Mapping

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from .config import UpstreamConfig
from .context import Attempt, Context, Response, Target
from .sse import dump_json
from .errors import ProxyError
from .openai import CREDENTIAL_HEADERS
from .timers import Alarm

if TYPE_CHECKING:  # pragma: no cover
    from .chain import CompiledRoute

log = logging.getLogger("sluice.upstream")

CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
URL_CACHE_SIZE = 256
#: headers aiohttp adds when a request lacks them; the upstream must see only the client's
SKIP_AUTO_HEADERS = ("User-Agent", "Content-Type")


def skip_auto_headers(headers: CIMultiDict[str], body: bytes | None) -> tuple[str, ...] | None:
    """What aiohttp must not add to these headers, or None when it would add nothing anyway.

    aiohttp adds a ``User-Agent`` and, to a body, a ``Content-Type`` the client did
    not send, unless told to skip them. Telling it costs a sort, a multidict and a
    copy of the headers on every request, so it is told only when one is missing
    (the OpenAI SDKs send both).
    """
    if "user-agent" in headers and (not body or "content-type" in headers):
        return None
    return SKIP_AUTO_HEADERS


def join_url(base: str, tail: str, query: str) -> URL:
    url = base if not tail else base + "/" + tail.lstrip("/")
    if query:
        url += "?" + query
    return URL(url, encoded=True)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """How long an answer asks to wait before a retry, in seconds: OpenAI's ``retry-after-ms`` (the finer,
    when both are sent), else ``retry-after`` (seconds or an HTTP date); ``None`` when neither says."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            wait = float(ms) / 1000
        except ValueError:
            wait = math.nan
        if math.isfinite(wait):
            return max(0.0, wait)
    return retry_after_seconds(headers.get("retry-after"))


def retry_after_seconds(value: str | None) -> float | None:
    """``retry-after`` (seconds or an HTTP date), as seconds."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, noting the requests cancelled before they had a connection.

    Such a request was never sent: it waited for a free connection (the pool at
    ``max_connections``) or for a new one to open. Only those slow paths are
    overridden, so a request on a pooled keep-alive connection costs nothing more.
    With an aiohttp that names them otherwise, nothing is noted and such a request
    counts as sent, as it did before.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: the tasks cancelled while waiting for a connection (weak: a task no one asks about is not kept)
        self.unsent: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def _note(self) -> None:
        self.unsent.add(asyncio.current_task())  # type: ignore[arg-type]  # always in a task here

    async def _wait_for_available_connection(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super()._wait_for_available_connection(*args, **kwargs)  # type: ignore[misc]
        except asyncio.CancelledError:
            self._note()
            raise

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._create_connection(*args, **kwargs)
        except asyncio.CancelledError:
            self._note()
            raise

    def took_unsent(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` (the request's: aiohttp's connector runs in it) was cancelled before it had a
        connection; forgotten once asked."""
        if task not in self.unsent:
            return False
        self.unsent.discard(task)
        return True


class Upstream:
    """One upstream: a pooled keep-alive session and its settings."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.base = config.url
        u = URL(config.url)
        self.origin = f"{u.scheme}://{u.host}:{u.port}" if u.port else f"{u.scheme}://{u.host}"
        self.session: aiohttp.ClientSession | None = None
        self.connector: _Connector | None = None
        #: requests in flight to this upstream (read by routing strategies)
        self.outstanding = 0
        t = config.timeouts
        self._timeout = aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect)
        auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._extra_headers = {**config.headers, **auth}
        self._urls: dict[tuple[str, str], URL] = {}

    def url_for(self, tail: str, query: str) -> URL:
        """The URL of an endpoint (and query) on this upstream; yarl URLs are immutable, so
        the few endpoints a route sees are built once, not parsed again for every request."""
        key = (tail, query)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()  # many distinct queries (file ids, cursors): start over
            url = self._urls[key] = join_url(self.base, tail, query)
        return url

    async def start(self) -> None:
        connector = self.connector = _Connector(
            limit=self.config.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
            auto_decompress=True,
            trust_env=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def headers_for(self, ctx_headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """The headers to send: the client's, with this upstream's credentials and extras.

        With neither, the context's own headers go as they are (no copy); they
        are the request's, so nothing of one upstream leaks into the next attempt.
        """
        if not self._extra_headers:
            return ctx_headers
        headers = CIMultiDict(ctx_headers)
        if self.config.api_key:
            for h in CREDENTIAL_HEADERS:
                headers.popall(h, None)
        headers.update(self._extra_headers)
        return headers

    async def open(self, method: str, url: URL, body: bytes, headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        assert self.session is not None, "upstream pool not started"
        return await self.session.request(
            method, url, data=body if body else None, headers=headers, allow_redirects=False, timeout=self._timeout,
            skip_auto_headers=skip_auto_headers(headers, body),
        )

    async def call(
        self,
        method: str,
        endpoint: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """A buffered call outside any client request (shadow traffic, probes)."""
        url = self.url_for(endpoint, "")
        h = self.headers_for(CIMultiDict(headers or {}))
        if body and "content-type" not in h:
            h["content-type"] = "application/json"
        async with asyncio.timeout(timeout or self.config.timeouts.total):
            async with await self.open(method, url, body, h) as resp:
                data = await resp.read()
                return Response(resp.status, CIMultiDict(resp.headers), data)


def _let_go(held: tuple[Any, Upstream, Attempt] | None) -> None:
    """Release an error answer kept in case no later attempt answered (one did, or the request ended)."""
    if held is not None:
        resp, up, _ = held
        resp.release()
        up.outstanding -= 1


def _fresh_after(plan: list[tuple[Target, int]], i: int) -> bool:
    """Whether a target not yet tried follows step ``i`` of a retry plan (its first attempt needs no wait)."""
    return any(n == 0 for _, n in plan[i + 1:])


class UpstreamPool:
    """All configured upstreams, by name."""

    def __init__(self, configs: Mapping[str, UpstreamConfig]) -> None:
        self.upstreams = {name: Upstream(name, c) for name, c in configs.items()}

    def get(self, name: str) -> Upstream:
        return self.upstreams[name]

    def __contains__(self, name: object) -> bool:
        return name in self.upstreams

    async def start(self) -> None:
        for u in self.upstreams.values():
            await u.start()

    async def close(self) -> None:
        for u in self.upstreams.values():
            await u.close()

    async def call(
        self,
        target: Target,
        method: str,
        endpoint: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        if target.model and body:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and obj.get("model") != target.model:
                obj["model"] = target.model
                body = dump_json(obj)
        return await self.get(target.upstream).call(method, endpoint, body, headers, timeout)

    async def send(
        self, ctx: Context, route: CompiledRoute, task: asyncio.Task | None = None
    ) -> tuple[aiohttp.ClientResponse, Upstream, Attempt]:
        """Open the request on the first target that answers, retrying before the first byte.

        Connect errors, timeouts before the first byte and the route's retry
        statuses are retried on the same target (``retries.attempts`` times, with
        exponential backoff, full jitter and ``retry-after`` honoured), then the
        next target is tried, all within ``retries.deadline_s``; a retry whose wait would pass
        the deadline gives way to the next target, tried at once. The last
        upstream error answer is passed through unchanged; with none, 502 or 504.
        ``task`` is the running task (the handler has it at hand): the timeouts cancel it, and
        aiohttp's connector runs in it.
        """
        policy = route.retries
        targets = ctx.targets or route.default_targets
        if not targets:
            raise ProxyError(502, "No upstream is configured for this route.", code="no_upstream")
        deadline = ctx.timings.start + policy.deadline_s
        body = ctx.body_bytes()
        tail = ctx.endpoint
        plan = [(t, n) for t in targets for n in range(policy.attempts + 1)]
        if task is None:
            task = asyncio.current_task()
        loop = task.get_loop()  # not get_running_loop(): that costs a getpid() system call
        last_error: ProxyError | None = None
        # the last error answer retried past, unread: passed through if no later attempt answers at all
        held: tuple[Any, Upstream, Attempt] | None = None
        delay = 0.0
        try:
            for i, (target, n) in enumerate(plan):
                last = i == len(plan) - 1
                up = self.upstreams.get(target.upstream)
                if up is None:
                    raise ProxyError(500, "The route names an upstream that is not configured.", code="unknown_upstream")
                cap = target.max_concurrency
                if cap is not None and up.outstanding >= cap:
                    # full since it was chosen (the requests of a burst all passed the router before any was
                    # sent): the next target is tried at once, as the router would have; none left, 503
                    if last_error is None:
                        last_error = overloaded()
                    continue
                if i:
                    now = time.perf_counter()
                    if n == 0:
                        delay = 0.0  # a fresh target needs no backoff
                    if now + delay >= deadline:
                        if n and _fresh_after(plan, i):
                            continue  # no time for this retry's wait: the next target is tried at once instead
                        break
                    if delay:
                        await asyncio.sleep(delay)
                send_body = body
                if target.model and ctx.model is not None and target.model != ctx.model:
                    b = dict(ctx.body)
                    b["model"] = target.model
                    send_body = dump_json(b)
                headers = up.headers_for(ctx.headers)
                headers["x-request-id"] = ctx.request_id
                url = up.url_for(tail, ctx.query)
                att = Attempt(target=target, start=time.perf_counter())
                ctx.attempts.append(att)
                if ctx.on_attempt is not None:
                    if headers is ctx.headers:
                        headers = CIMultiDict(headers)  # this attempt's own: what a callable sets goes with it only
                    _before_attempt(ctx, att, headers)
                t = up.config.timeouts
                up.outstanding += 1
                alarm = Alarm(loop.time() + t.first_byte, loop, task)
                try:
                    try:
                        # the session directly, not Upstream.open: one coroutine layer less per request
                        resp = await up.session.request(  # type: ignore[union-attr]
                            ctx.method, url, data=send_body or None, headers=headers, allow_redirects=False, timeout=up._timeout,
                            skip_auto_headers=skip_auto_headers(headers, send_body),
                        )
                    except asyncio.CancelledError:
                        alarm.timed_out()
                    finally:
                        alarm.disarm()
                except TimeoutError:
                    up.outstanding -= 1
                    # a connect timeout (or one spent waiting for the pool) cancels inside aiohttp: the upstream never saw it
                    att.unsent = up.connector.took_unsent(task)  # type: ignore[union-attr]
                    att.error, att.end = "timeout", time.perf_counter()
                    last_error = ProxyError(504, "The upstream did not answer in time.", code="upstream_timeout")
                    delay = self._backoff(policy, n, None)
                    continue
                except CONNECT_ERRORS as e:
                    up.outstanding -= 1
                    up.connector.took_unsent(task)  # type: ignore[union-attr]
                    att.error, att.end = "connect", time.perf_counter()
                    log.warning("upstream %s unreachable (%s) request_id=%s", up.name, type(e).__name__, ctx.request_id)
                    last_error = ProxyError(502, "The upstream could not be reached.", code="upstream_unreachable")
                    delay = self._backoff(policy, n, None)
                    continue
                except BaseException:
                    up.outstanding -= 1
                    att.error, att.end = "cancelled", time.perf_counter()
                    att.unsent = up.connector.took_unsent(task)  # type: ignore[union-attr]
                    raise
                att.status = resp.status
                att.first_byte = time.perf_counter()
                if resp.status in policy.on_status and not last:
                    ra = retry_after(resp.headers)
                    nxt = 0.0 if plan[i + 1][1] == 0 else self._backoff(policy, n, ra)
                    now = time.perf_counter()
                    # a retry whose wait (retry-after, say) passes the deadline gives way to the next target
                    if now + nxt < deadline or (now < deadline and _fresh_after(plan, i)):
                        _let_go(held)
                        held = (resp, up, att)
                        att.end = now
                        delay = nxt
                        continue
                _let_go(held)
                ctx.upstream = target
                return resp, up, att
            if held is not None:
                # the attempts after it got no answer (unreachable, timed out): the client gets the upstream's
                # own answer (a 429 with its retry-after, a 503), not one made up by Sluice
                ctx.upstream = held[2].target
                return held
            raise last_error or ProxyError(502, "Every upstream attempt failed.", code="upstream_unavailable")
        except BaseException:
            _let_go(held)  # the client left during a backoff, or the route failed: the kept answer goes
            raise

    @staticmethod
    def _backoff(policy, n: int, retry_after: float | None) -> float:
        cap = min(policy.max_backoff_s, policy.backoff_s * (2**n))
        jitter = random.uniform(0, cap) if cap > 0 else 0.0
        return max(jitter, retry_after or 0.0)


def overloaded() -> ProxyError:
    """The answer when every target of a request is full or out: fail fast (a router's choice, or the
    core finding the targets full as it sends) rather than queue behind them."""
    return ProxyError(503, "Every upstream for this model is overloaded or unhealthy; retry shortly.",
                      code="upstream_overloaded", headers={"retry-after": "1"})


def _before_attempt(ctx: Context, att: Attempt, headers: CIMultiDict[str]) -> None:
    """Run the callables plugins put in ``ctx.on_attempt`` for one attempt. One that raises is logged
    (the exception's type only: no request data), noted in ``ctx.failed_open`` under its plugin's id,
    and the attempt goes on without it."""
    for fn in ctx.on_attempt or ():
        try:
            fn(ctx, att, headers)
        except Exception as e:
            owner = getattr(getattr(fn, "__self__", None), "id", None)
            who = owner if isinstance(owner, str) else getattr(fn, "__qualname__", "?")
            log.warning("on_attempt of %s failed (%s) request_id=%s", who, type(e).__name__, ctx.request_id)
            ctx.note_failed_open(who, "on_attempt")
