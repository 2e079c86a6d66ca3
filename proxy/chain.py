"""Routes and their hook lists, built once per config load; the phases that run them.

The registry checks each plugin's hooks, but the request path does not go through
pluggy's ``pm.hook.x()``: with async hooks pluggy would stop at the first coroutine
without awaiting it. Each route keeps plain lists of bound hook functions in
chain order, and the phases below await them one by one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable

from .config import LoadedConfig, Retries, RouteConfig
from .context import Context, Response, Target
from .errors import ProxyError, StateUnavailable
from .plugin import Plugin
from .registry import hook_functions
from .sse import Event

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime
    from .upstream import UpstreamPool

log = logging.getLogger("sluice.chain")

#: (plugin, bound hook, is coroutine function, timing key "plugin-id.phase")
Hook = tuple[Plugin, Callable[..., Any], bool, str]
clock = time.perf_counter


class CompiledRoute:
    """A route ready to serve: its match, targets, retries and per-phase hook lists."""

    def __init__(self, index: int, config: RouteConfig, plugins: list[Plugin], default_max_body: int,
                 body_timeout: float = 0.0) -> None:
        self.index = index
        self.config = config
        self.prefix = config.match.path
        self.name = config.name or config.match.path
        self.methods = frozenset(config.match.methods) if config.match.methods else None
        self.match_headers = tuple(config.match.headers.items())
        self.retries: Retries = config.retries
        self.max_body_bytes = config.max_body_bytes or default_max_body
        #: seconds a request body may pause while it arrives (server.body_timeout_s; 0: no limit)
        self.body_timeout = body_timeout
        self.default_targets = [Target(upstream=n) for n in config.upstream_names]
        self.plugins = plugins
        hooks = [hook_functions(p) for p in plugins]
        #: per plugin position: its hook or None, so the onion can walk back by position
        self._by_pos: dict[str, list[Hook | None]] = {
            phase: [(p, *h[phase], f"{p.id}.{phase}") if phase in h else None for p, h in zip(plugins, hooks)]
            for phase in ("on_request", "on_response", "on_chunk", "on_stream_end")
        }
        self.on_done: list[Hook] = [(p, *h["on_done"], f"{p.id}.on_done") for p, h in zip(plugins, hooks) if "on_done" in h]
        #: some on_done here must never be dropped (a ledger row, a lease to give back)
        self.done_required = any(h[0].must_finish for h in self.on_done)
        #: every on_done is a plain function: run in the request's task once the answer is sent
        self.done_inline = not any(h[2] for h in self.on_done)
        #: on a done_inline route, the observers' on_done may wait for the server's batch (server.done_batch_ms);
        #: the others' run at once (a guard frees a concurrency slot, a router learns an upstream's health)
        self.done_batched: list[Hook] = [h for h in self.on_done if h[0].kind == "observer"]
        self.done_at_once: list[Hook] = [h for h in self.on_done if h[0].kind != "observer"]
        #: time each hook into ctx.timings.plugins (a plugin of the route asked for it)
        self.timed = any(p.wants_plugin_timings for p in plugins)
        #: someone will read ctx.usage: an on_done observer, a response or chunk hook, or needs_usage
        self.wants_usage = bool(self.on_done) or any(p.needs_usage for p in plugins) or any(
            h is not None for phase in ("on_response", "on_chunk", "on_stream_end") for h in self._by_pos[phase]
        )
        self.parse_stream = any(h is not None for h in self._by_pos["on_chunk"])
        #: ask streams for their usage (a plugin needs it, and the route lets the core ask)
        self.needs_usage = config.stream_usage and any(p.needs_usage for p in plugins)
        self.has_response_hooks = any(h is not None for h in self._by_pos["on_response"])
        #: a plugin acts on requests (a guard, a limit, a budget): a JSON body must parse before it runs
        self.checks_json = any(h is not None for h in self._by_pos["on_request"])
        self.has_stream_end = any(h is not None for h in self._by_pos["on_stream_end"])
        self._back: dict[tuple[str, int], tuple[Hook, ...]] = {}
        self._check_order()

    def _check_order(self) -> None:
        """Warn when a plugin comes before one it reads the results of (``Plugin.follows``)."""
        names = [p.name for p in self.plugins]
        for i, p in enumerate(self.plugins):
            for other in p.follows:
                if other in names[i + 1:]:
                    log.warning("route %s: %s comes before %s, whose results it reads: place it after %s in the chain",
                                self.name, p.id, other, other)

    def matches(self, method: str, path: str, headers: Any) -> bool:
        if not path.startswith(self.prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for k, v in self.match_headers:
            if headers.get(k) != v:
                return False
        return True

    def back(self, phase: str, passed: int) -> tuple[Hook, ...]:
        """The hooks of ``phase`` of the first ``passed`` plugins, innermost first (built once per pair)."""
        key = (phase, passed)
        hooks = self._back.get(key)
        if hooks is None:
            hooks = self._back[key] = tuple(h for h in reversed(self._by_pos[phase][:passed]) if h is not None)
        return hooks


class Generation:
    """One loaded config: routes, plugin instances and upstreams, retired as a whole on reload."""

    def __init__(self, loaded: LoadedConfig, runtime: Runtime, pool: UpstreamPool) -> None:
        #: plugins whose stop() was called (in stop()'s order)
        self._stops = 0
        self.loaded = loaded
        self.config = loaded.config
        self.runtime = runtime = runtime.view(loaded.config, pool)
        self.pool = pool
        self.plugins: list[Plugin] = []
        routes = []
        server = loaded.config.server
        for i, (rc, chain) in enumerate(zip(loaded.config.routes, loaded.chains)):
            instances = [cls(conf, runtime) for cls, conf in chain]
            self.plugins.extend(instances)
            routes.append(CompiledRoute(i, rc, instances, server.max_body_bytes, server.body_timeout_s))
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in loaded.config.server.trusted_proxies)
        # longest prefix first; ties keep file order
        self.routes = sorted(routes, key=lambda r: (-len(r.prefix), r.index))
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.started = False

    def longest_request_s(self) -> float:
        """The longest a request of this config may last: its body's read, then attempts starting up to
        the latest route deadline, each lasting up to the longest upstream total."""
        c = self.config
        deadline = max((r.retries.deadline_s for r in c.routes), default=0.0)
        total = max((u.timeouts.total for u in c.upstreams.values()), default=0.0)
        return c.server.body_timeout_s + deadline + total

    def client_ip(self, peer: str | None, forwarded: str | None) -> str | None:
        """The caller's address: the peer, or through trusted proxies the nearest untrusted hop."""
        if not self.trusted or not forwarded or peer is None or not self._trusted(peer):
            return peer
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            if hop and not self._trusted(hop):
                return hop
        return peer

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def match(self, method: str, path: str, headers: Any) -> CompiledRoute | None:
        for r in self.routes:
            if r.matches(method, path, headers):
                return r
        return None

    async def start(self) -> None:
        await self.pool.start()
        started: list[Plugin] = []
        try:
            for p in self.plugins:
                await p.start()
                started.append(p)
        except BaseException:
            for p in reversed(started):
                await _quietly(p.stop())
            await self.pool.close()
            raise
        self.started = True

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        """Stop the plugins (the last first), then close the upstream pool. Each plugin's stop is called once:
        called again after a stop was cut short (a retirement the server's close cancelled), it goes on with the
        plugins not yet asked to stop (the one it was cut in is not asked twice) and closes the pool."""
        plugins = self.plugins[::-1]
        while self._stops < len(plugins):
            p = plugins[self._stops]
            self._stops += 1
            await _quietly(p.stop())
        await self.pool.close()


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except Exception as e:  # a plugin failing to stop must not stop the others
        log.error("plugin stop failed: %s", type(e).__name__)


# -- running hooks ---------------------------------------------------------


def _lap(timings: dict[str, float], key: str, t0: float) -> float:
    """Add a timed hook's time since ``t0`` to ``timings`` and return the clock reading that ended it:
    a loop of hooks passes it on as the next hook's start, one reading per hook. Callers check ``t0``
    first: untimed hooks cost no call."""
    t1 = clock()
    timings[key] = timings.get(key, 0.0) + (t1 - t0)
    return t1


def failure(ctx: Context, plugin: Plugin, phase: str, exc: BaseException) -> ProxyError | None:
    """Apply the plugin's failure policy; the error to answer with, or None to carry on."""
    if isinstance(exc, ProxyError) and not isinstance(exc, StateUnavailable):
        return exc  # a decision, not a failure
    ctx.runtime.on_plugin_error(plugin.id, phase)
    if plugin.fail_closed:
        log.error("plugin %s failed in %s (%s), failing closed request_id=%s", plugin.id, phase, type(exc).__name__, ctx.request_id)
        ctx.outcome = "plugin_error"
        if isinstance(exc, ProxyError):
            return exc
        return ProxyError(500, f"The request could not be processed (plugin {plugin.id} failed).", code="plugin_error", reason="plugin_error")
    log.warning("plugin %s failed in %s (%s), failing open request_id=%s", plugin.id, phase, type(exc).__name__, ctx.request_id)
    ctx.note_failed_open(plugin.id, phase)
    return None


async def run_request(ctx: Context, route: CompiledRoute) -> None:
    """on_request in chain order until a plugin answers; errors become early answers."""
    hooks = route._by_pos["on_request"]
    timings = ctx.timings.plugins
    # timed: one clock reading ends a hook's time and starts the next one's (_lap)
    t0 = clock() if route.timed else 0.0
    for pos, hook in enumerate(hooks):
        ctx.passed = pos + 1
        if hook is None:
            continue
        plugin, fn, is_async, key = hook
        ctx._current = plugin.id
        try:
            r = fn(ctx)
            if is_async:
                await r
        except Exception as exc:
            err = failure(ctx, plugin, "on_request", exc)
            if err is not None:
                answer_error(ctx, err)
        finally:
            if t0:
                t0 = _lap(timings, key, t0)
        if ctx.reply_value is not None:
            return
    ctx._current = None


def answer_error(ctx: Context, err: ProxyError) -> None:
    ctx.reply(err.status, err.body(), headers={"content-type": "application/json", **err.headers}, reason=err.reason)
    ctx.error = err.message


async def run_response(ctx: Context, route: CompiledRoute) -> None:
    """on_response, innermost plugin first; a ProxyError replaces the answer."""
    timed = route.timed
    for plugin, fn, is_async, key in route.back("on_response", ctx.passed):
        t0 = clock() if timed else 0.0
        try:
            r = fn(ctx)
            if is_async:
                await r
        except Exception as exc:
            err = failure(ctx, plugin, "on_response", exc)
            if err is not None:
                ctx.response = Response(err.status, {"content-type": "application/json", **err.headers}, err.body())
                ctx.error = err.message
                ctx.answered_by = ctx.answered_by or plugin.id
                ctx.answer_reason = err.reason
                if ctx.outcome != "plugin_error":
                    ctx.outcome = "answered"  # a plugin's answer, not the upstream's: as when it stops a stream
        finally:
            if t0:
                _lap(ctx.timings.plugins, key, t0)


class StreamError(Exception):
    """A plugin stopped a stream mid-way (after the status was sent)."""

    def __init__(self, err: ProxyError) -> None:
        super().__init__(err.message)
        self.err = err


class ChunkPipeline:
    """Events pass the route's on_chunk hooks innermost first; on_stream_end flushes held ones."""

    __slots__ = ("ctx", "chunk_hooks", "end_hooks", "timed")

    def __init__(self, ctx: Context, route: CompiledRoute) -> None:
        self.ctx = ctx
        self.timed = route.timed
        passed = ctx.passed
        by_pos = route._by_pos
        #: (position in the chain, hook), innermost first
        self.chunk_hooks = [(i, h) for i in range(passed - 1, -1, -1) if (h := by_pos["on_chunk"][i]) is not None]
        self.end_hooks = []
        for i in range(passed - 1, -1, -1):
            h = by_pos["on_stream_end"][i]
            if h is not None:
                # what a plugin releases at the end passes the chunk hooks outside it
                start = next((k for k, (pos, _) in enumerate(self.chunk_hooks) if pos < i), len(self.chunk_hooks))
                self.end_hooks.append((h, start))

    async def push(self, events: Iterable[Event], start: int = 0) -> list[Event]:
        out = list(events)
        ctx = self.ctx
        timed = self.timed
        for _, (plugin, fn, is_async, key) in self.chunk_hooks[start:]:
            if not out:
                break
            nxt: list[Event] = []
            t0 = clock() if timed else 0.0
            for ev in out:
                try:
                    r = fn(ctx, ev)
                    if is_async:
                        r = await r
                    if r is not None and type(r) is not list:
                        r = list(r)  # read here: a generator that fails, or an Event for a list, is the plugin's failure
                except Exception as exc:
                    err = failure(ctx, plugin, "on_chunk", exc)
                    if err is not None:
                        ctx.answered_by, ctx.answer_reason = plugin.id, err.reason
                        raise StreamError(err) from None
                    r = None
                if r is None:
                    nxt.append(ev)
                else:
                    nxt.extend(r)
            if t0:
                _lap(ctx.timings.plugins, key, t0)
            out = nxt
        return out

    async def end(self) -> list[Event]:
        out: list[Event] = []
        ctx = self.ctx
        timed = self.timed
        for (plugin, fn, is_async, key), start in self.end_hooks:
            t0 = clock() if timed else 0.0
            try:
                r = fn(ctx)
                if is_async:
                    r = await r
                if r is not None and type(r) is not list:
                    r = list(r)  # as in push
            except Exception as exc:
                err = failure(ctx, plugin, "on_stream_end", exc)
                if err is not None:
                    ctx.answered_by, ctx.answer_reason = plugin.id, err.reason
                    raise StreamError(err) from None
                r = None
            if t0:
                _lap(ctx.timings.plugins, key, t0)
            if r:
                out.extend(await self.push(r, start))
        return out


async def aiter_events(events: Any) -> AsyncIterator[Event]:
    if hasattr(events, "__aiter__"):
        async for ev in events:
            yield ev
    else:
        for ev in events:
            yield ev


def _done_failed(ctx: Context, plugin: Plugin, exc: Exception) -> None:
    """An on_done failure is counted and logged, never raised to anyone."""
    ctx.runtime.on_plugin_error(plugin.id, "on_done")
    log.warning("plugin %s failed in on_done (%s) request_id=%s", plugin.id, type(exc).__name__, ctx.request_id)


#: the hooks after a plain on_done that handed back a coroutine, and (that plugin, the coroutine, its
#: timing key): the core's queue finishes them
Rest = tuple[list[Hook], tuple[Plugin, Any, str]]


def run_done_sync(ctx: Context, route: CompiledRoute, hooks: list[Hook] | None = None) -> Rest | None:
    """``run_done`` for a route whose on_done hooks are all plain functions (``done_inline``): all of
    them, or ``hooks`` (the route's ``done_at_once`` or ``done_batched``).

    A plain hook that must wait for this one request (metering counting a big prompt in the
    executor) returns a coroutine instead of ``None``: the rest of ``hooks`` is then returned, for
    :func:`run_done` to run after it, in order. (Any other value is ignored, as before: a task or
    future a hook returns is not awaited.)
    """
    timings = ctx.timings.plugins
    t0 = clock() if route.timed else 0.0  # as in run_request: one reading ends a hook and starts the next
    seq = route.on_done if hooks is None else hooks
    for plugin, fn, _, key in seq:
        try:
            if (r := fn(ctx)) is not None and asyncio.iscoroutine(r):
                i = next(i for i, h in enumerate(seq) if h[1] is fn)
                return seq[i + 1:], (plugin, r, key)
        except Exception as exc:
            _done_failed(ctx, plugin, exc)
        finally:
            if t0:
                t0 = _lap(timings, key, t0)
    return None


def run_done_batch(ctxs: list[Context], route: CompiledRoute, hooks: list[Hook]) -> list[tuple[Context, Rest]]:
    """:func:`run_done_sync` for several finished requests of one route, hook by hook: each hook runs for
    every request, in their order, before the next hook starts, so its code and data stay warm across the
    batch instead of being fetched again after three other plugins' for each request. For each request the
    hooks still run in the route's order, and for each hook the requests in theirs.

    A request whose hook hands back a coroutine leaves the batch there: it is returned with the rest of
    ``hooks``, as :func:`run_done_sync` returns it.
    """
    rests: list[tuple[Context, Rest]] = []
    timed = route.timed
    live = ctxs
    for k, (plugin, fn, _, key) in enumerate(hooks):
        t0 = clock() if timed else 0.0
        left: list[Context] | None = None
        for ctx in live:
            try:
                if (r := fn(ctx)) is not None and asyncio.iscoroutine(r):
                    rests.append((ctx, (hooks[k + 1:], (plugin, r, key))))
                    left = [c for c in live if c is not ctx] if left is None else [c for c in left if c is not ctx]
            except Exception as exc:
                _done_failed(ctx, plugin, exc)
            finally:
                if t0:
                    t0 = _lap(ctx.timings.plugins, key, t0)
        if left is not None:
            live = left
    return rests


async def run_done(ctx: Context, route: CompiledRoute, hooks: list[Hook] | None = None,
                   waiting: tuple[Plugin, Any, str] | None = None) -> None:
    """The route's on_done hooks (or ``hooks``), awaiting the coroutines; ``waiting``, a hook's
    coroutine handed back by :func:`run_done_sync`, is awaited first (its time added to the hook's)."""
    timings = ctx.timings.plugins
    t0 = clock() if route.timed else 0.0  # as in run_request: one reading ends a hook and starts the next
    if waiting is not None:
        try:
            await waiting[1]
        except Exception as exc:
            _done_failed(ctx, waiting[0], exc)
        finally:
            if t0:
                t0 = _lap(timings, waiting[2], t0)
    for plugin, fn, is_async, key in route.on_done if hooks is None else hooks:
        try:
            r = fn(ctx)
            if is_async or (r is not None and asyncio.iscoroutine(r)):
                await r
        except Exception as exc:
            _done_failed(ctx, plugin, exc)
        finally:
            if t0:
                t0 = _lap(timings, key, t0)
