"""The aiohttp app, the process's runtime, reload, drain, and the multi-worker master."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from . import chain as ch
from . import metrics as core_metrics
from .config import LoadedConfig, load_config
from .context import Context
from .errors import ConfigError
from .handler import Handler, error_response, new_request_id, refuse
from .runtime import Runtime, TaskGroup
from .upstream import UpstreamPool

log = logging.getLogger("sluice")
access_log = logging.getLogger("sluice.access")
#: most finished requests a batch of inline on_done work holds (server.done_batch_ms)
DONE_BATCH_MAX = 8
#: a batch whose interval passed runs when the next request finishes; if none finishes by this many
#: intervals after its first request, a timer runs it (a timer firing wakes an idle process)
DONE_BATCH_IDLE = 4
#: at close, how long requests still in flight after the drain get before they are cancelled (aiohttp
#: waits this long twice: for the handler to end, then after cancelling it)
CUT_WAIT_S = 0.5
#: at close, the longest the on_done queue may take to empty once no request is left
DONE_FLUSH_S = 10.0


def with_demo_upstream(loaded: LoadedConfig, url: str) -> LoadedConfig:
    """No upstream configured: route everything (or the default /v1/ route) to the demo model."""
    data = loaded.config.model_dump(mode="json", exclude_none=True)
    data["upstreams"] = {"demo": {"url": url, "models": ["sluice-demo"]}}
    if not data.get("routes"):
        data["routes"] = [{"name": "demo", "match": {"path": "/v1/"}, "chain": []}]
    for r in data["routes"]:
        r.setdefault("upstream", "demo")
    return load_config(loaded.source, data=data, environ={})


class Server:
    """One serving process: runtime (state, metrics, executor), the current generation, listeners."""

    def __init__(self, loaded: LoadedConfig, *, config_path: str | None = None, debug: bool = False, worker_id: int = 0) -> None:
        self.loaded = loaded
        self.config_path = config_path
        self.debug = debug
        self.worker_id = worker_id
        self.generation: ch.Generation = None  # type: ignore[assignment]
        self.runtime: Runtime = None  # type: ignore[assignment]
        self.demo = None
        self.runner: web.ServerRunner | None = None
        self.admin_runner: web.AppRunner | None = None
        self.port = 0
        self.admin_port = 0
        #: on_done work for the workers: a request's whole on_done, or (with a Rest) what a plain hook left to finish
        self._queue: asyncio.Queue[tuple[Context, ch.CompiledRoute, ch.Generation, ch.Rest | None]] | None = None
        self._workers: list[asyncio.Task[None]] = []
        #: queued on_done items not yet run, an overflow's pending put included (close() flushes by it)
        self._pending = 0
        #: the server's own background tasks (on_done workers, retiring generations, reloads)
        self._tasks = TaskGroup()
        #: retired generations not yet stopped (close() stops those whose retirement it cancels)
        self._retiring: set[ch.Generation] = set()
        self.draining = False
        self.metrics: core_metrics.CoreMetrics = None  # type: ignore[assignment]
        #: finished requests whose inline on_done waits for the next batch (server.done_batch_ms)
        self._batch: list[tuple[Context, ch.CompiledRoute, ch.Generation]] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        #: client requests inside the handler (their on_done not yet handed over), and what close() waits on
        self.handling = 0
        self.handlers_done: asyncio.Event | None = None

    # -- life cycle ---------------------------------------------------------
    async def _apply_demo(self, loaded: LoadedConfig) -> LoadedConfig:
        if loaded.config.upstreams or not loaded.config.server.demo_upstream:
            return loaded
        url = os.environ.get("SLUICE_DEMO_UPSTREAM_URL")
        if not url:
            if self.demo is None:
                from .demo import DemoUpstream

                self.demo = DemoUpstream()
                await self.demo.start()
                log.info("no upstream configured: serving the built-in demo model at %s", self.demo.url)
            url = self.demo.url
        return with_demo_upstream(loaded, url)

    async def start(self) -> None:
        from .state import StateHub

        self.loaded = await self._apply_demo(self.loaded)
        cfg = self.loaded.config
        hub = StateHub(cfg.state)
        await hub.start()
        registry = core_metrics.make_registry()
        pool = UpstreamPool(cfg.upstreams)
        self.runtime = Runtime(cfg, hub, registry, pool, executor_threads=cfg.server.executor_threads)
        self.runtime.worker_id = self.worker_id
        self.metrics = core_metrics.CoreMetrics(registry)
        self.runtime.on_plugin_error = self.metrics.plugin_error
        hub.on_records_dropped = self.metrics.record_dropped
        self.runtime._live = lambda: self.generation.plugins if self.generation is not None else []
        gen = ch.Generation(self.loaded, self.runtime, pool)
        await gen.start()
        self.generation = gen
        _freeze_heap()
        self._queue = asyncio.Queue(maxsize=cfg.server.background_queue)
        self._workers = [self._tasks.spawn(self._done_worker(), f"sluice-done-{i}") for i in range(cfg.server.background_workers)]
        trim = _malloc_trim()
        if cfg.server.memory_trim_s and trim is not None:
            self._workers.append(self._tasks.spawn(self._trim_memory(trim, cfg.server.memory_trim_s), "sluice-memory-trim"))

    async def _trim_memory(self, trim: Callable[[int], int], every: float) -> None:
        """Return freed heap pages to the system now and then, in a thread (it takes the allocator's locks)."""
        while True:
            await asyncio.sleep(every)
            await asyncio.to_thread(trim, 0)

    async def listen(self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False) -> None:
        cfg = self.loaded.config
        # aiohttp's low-level server: no router, no middleware layer, no Application in
        # the await chain of every stream read; the handler does its own dispatch
        # drain() waits server.drain_seconds for in-flight requests; past that, close() cuts them
        # within 2 x CUT_WAIT_S more instead of aiohttp's default minute (twice)
        # auto_decompress=False: the handler decodes a compressed body itself (read_body), checking that the
        # stream is whole and the decoded size within the limit; aiohttp would pass a cut gzip body on as
        # it stands and answer a corrupt one with a plain-text 500
        self.runner = web.ServerRunner(_WebServer(self, make_handler(self), handler_cancellation=True, access_log=None,
                                                  auto_decompress=False),
                                       shutdown_timeout=CUT_WAIT_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host or cfg.server.host, cfg.server.port if port is None else port, reuse_port=reuse_port, backlog=2048)
        await site.start()
        self.port = _site_port(site)
        if cfg.admin.enabled:
            from .admin import make_admin_app

            # bodies as sent: the admin API takes small JSON bodies, not compressed ones (see admin.guard)
            self.admin_runner = _AdminRunner(self, make_admin_app(self), access_log=None, auto_decompress=False)
            await self.admin_runner.setup()
            asite = web.TCPSite(self.admin_runner, cfg.admin.host, cfg.admin.port, reuse_port=reuse_port)
            await asite.start()
            self.admin_port = _site_port(asite)

    async def reload(self, path: str | None = None, data: dict[str, Any] | None = None) -> tuple[bool, str]:
        """Build and validate a whole new generation, then swap; the old one finishes in-flight work."""
        try:
            loaded = load_config(path or self.config_path, data=data) if data is not None else load_config(path or self.config_path)
            loaded = await self._apply_demo(loaded)
            self.check_reloadable(loaded)
            pool = UpstreamPool(loaded.config.upstreams)
            gen = ch.Generation(loaded, self.runtime, pool)
            await gen.start()
        except ConfigError as e:
            self.metrics.reloads.labels(result="error").inc()
            log.error("reload refused, the old config keeps serving: %s", e)
            return False, str(e)
        except Exception as e:
            self.metrics.reloads.labels(result="error").inc()
            log.error("reload failed while starting plugins (%s); the old config keeps serving", type(e).__name__)
            return False, f"starting the new config failed: {type(e).__name__}"
        old, self.generation, self.loaded = self.generation, gen, loaded
        self.runtime.config = loaded.config
        self.runtime.upstreams = pool
        self._tasks.spawn(self._retire(old), "sluice-retire")
        if _log_handler is not None:  # the process's logging is Sluice's (sluice serve), not an embedder's
            configure_logging(loaded.config.logging.level, loaded.config.logging.format)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("config reloaded from %s", loaded.source)
        return True, "reloaded"

    def check_reloadable(self, loaded: LoadedConfig) -> None:
        """``ConfigError`` when ``loaded`` changes what only a restart changes (the state section, the
        listeners, workers, queues and threads)."""
        if loaded.config.state != self.loaded.config.state:
            raise ConfigError(f"{loaded.source}: state: changing the state section needs a restart")
        fixed = _start_only_changes(self.loaded.config, loaded.config)
        if fixed:
            raise ConfigError(f"{loaded.source}: {', '.join(fixed)}: set when the server starts; changing it needs a restart")

    async def _retire(self, gen: ch.Generation) -> None:
        """Stop a config a reload replaced once its requests ended: they finish on it. The wait is bounded
        by the longest a request of that config may last (then its on_done work gets a minute): its
        upstream sessions close at the stop, and a request still reading from one would hang until its
        idle timeout and end as a stalled upstream (a long stream cut at drain_seconds + 60 s did)."""
        self._retiring.add(gen)
        await gen.wait_idle(max(gen.longest_request_s(), self.loaded.config.server.drain_seconds) + 60)
        await gen.stop()
        self._retiring.discard(gen)
        del gen
        # the retired generation was frozen with the heap (at start, or at the retirement before): thawed,
        # collected, and what lives (the new generation among it) frozen again; else every reload would
        # leave its plugins' reference cycles behind for good
        _freeze_heap(thaw=True)

    def done(self, ctx: Context, route: ch.CompiledRoute, gen: ch.Generation) -> None:
        """Queue on_done work; never blocks, drops and counts when the queue is full."""
        if not route.on_done and not self.loaded.config.server.access_log:
            return
        assert self._queue is not None
        gen.enter()  # the generation stays alive until its on_done work ran
        self._enqueue((ctx, route, gen, None), route.done_required)

    def _enqueue(self, item: tuple[Context, ch.CompiledRoute, ch.Generation, ch.Rest | None], required: bool) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(item)
            self._pending += 1
        except asyncio.QueueFull:
            if required:
                # a ledger row or a lease release is never dropped: it waits for room,
                # off the client's path, and the overflow is counted
                self.metrics.overflow.inc()
                self._pending += 1
                self._tasks.spawn(self._queue.put(item), "sluice-done-overflow")
            else:
                item[2].leave()
                self.metrics.dropped.inc()

    def _finish(self, ctx: Context, route: ch.CompiledRoute, gen: ch.Generation, rest: ch.Rest) -> None:
        """What a plain on_done left to finish (it returned a coroutine): to the queue, never dropped."""
        gen.enter()
        self._enqueue((ctx, route, gen, rest), True)

    def done_now(self, ctx: Context, route: ch.CompiledRoute, gen: ch.Generation) -> None:
        """A route's on_done, its answer already sent: now, or in the next batch.

        For routes whose on_done hooks are all plain functions: no queue, no
        task switch, and nothing to cancel them half-way (a sync hook runs to
        its end), so the work is never dropped either. With
        ``server.done_batch_ms``, the observers' on_done (plugins of kind
        ``observer``) waits for the batch, which runs them for all its requests
        in arrival order, while the other plugins' run at once (a concurrency
        slot is freed when the request ends). Run once per request, hooks find
        the CPU's caches cold each time and cost far more than the same work
        done for several requests together (the observers: about a third less
        CPU per request at 150 requests a second, less at saturation too;
        benchmarks/RESULTS.md).

        The batch runs when it holds ``DONE_BATCH_MAX`` requests, or when a
        request finishes once its first has waited ``done_batch_ms``, or when
        a request that must settle at once (``ctx.settle_now``: a budget's
        reservation to reconcile) joins it. Only
        when no request finishes for ``DONE_BATCH_IDLE`` intervals does a
        timer run it: under steady traffic no timer fires. A timer firing wakes
        an idle process, which costs CPU of its own (with the observers at 50
        requests a second, ending batches this way saved 43 µs a request;
        benchmarks/RESULTS.md).
        """
        if route.on_done:
            if route.done_batched and (batch_ms := self.loaded.config.server.done_batch_ms):
                # guards and transforms: now
                rest = ch.run_done_sync(ctx, route, route.done_at_once) if route.done_at_once else None
                if rest is not None:
                    # the observers wait for what that hook waits for: after it, in the queue, not in a batch
                    self._finish(ctx, route, gen, (rest[0] + route.done_batched, rest[1]))
                else:
                    gen.enter()  # the generation stays alive until its batch ran
                    batch = self._batch
                    batch.append((ctx, route, gen))
                    # how long the batch's first request has waited: the handler set timings.end before done_now
                    waited = ctx.timings.end - batch[0][0].timings.end  # type: ignore[operator]
                    if len(batch) >= DONE_BATCH_MAX or waited * 1000 >= batch_ms or ctx.settle_now:
                        self.run_batch()
                    elif self._batch_timer is None:
                        self._batch_timer = asyncio.get_running_loop().call_later(batch_ms * DONE_BATCH_IDLE / 1000, self.run_batch)
            else:
                if (rest := ch.run_done_sync(ctx, route)) is not None:
                    self._finish(ctx, route, gen, rest)
        if self.loaded.config.server.access_log:
            self._log_access(ctx, route)

    def run_batch(self) -> None:
        """Run the on_done hooks of every finished request waiting for the batch: hook by hook, each for the
        requests in arrival order (``chain.run_done_batch``)."""
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, []
        try:
            # hook by hook over each run of requests of one route (in a steady flow, the whole batch): a
            # plugin's failure is its own (isolated there)
            i, n = 0, len(batch)
            while i < n:
                route = batch[i][1]
                j = i + 1
                while j < n and batch[j][1] is route:
                    j += 1
                for ctx, rest in ch.run_done_batch([b[0] for b in batch[i:j]], route, route.done_batched):
                    self._finish(ctx, route, next(b[2] for b in batch[i:j] if b[0] is ctx), rest)
                i = j
        finally:
            # a BaseException half-way (the process stopping: hooks catch every Exception) ends the batch there
            for _, _, gen in batch:
                gen.leave()

    @staticmethod
    def _log_access(ctx: Context, route: ch.CompiledRoute) -> None:
        t = ctx.timings
        access_log.info(
            "request_id=%s route=%s method=%s status=%s outcome=%s ms=%.1f answered_by=%s",
            ctx.request_id, route.name, ctx.method, ctx.status, ctx.outcome,
            ((t.end or t.start) - t.start) * 1000, ctx.answered_by or "-",
        )

    async def _done_worker(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            ctx, route, gen, rest = await q.get()
            try:
                if rest is None:
                    await ch.run_done(ctx, route)
                    if self.loaded.config.server.access_log:
                        self._log_access(ctx, route)
                else:  # the access line was written when the request's plain hooks ran
                    await ch.run_done(ctx, route, *rest)
            except Exception as e:  # pragma: no cover - run_done isolates plugins already
                log.error("on_done failed: %s", type(e).__name__)
            finally:
                gen.leave()
                self._pending -= 1
                q.task_done()

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests and streams finish, flush background work."""
        if self.draining:
            return
        self.draining = True
        grace = self.loaded.config.server.drain_seconds
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()
            # kept-alive connections close: idle ones now, busy ones once their request is answered. Left
            # open, a pooled client kept sending new requests here through the grace, to be cut at its end
            _close_kept_alive(self.runner.server)
        # in flight counts queued on_done work too; what is left after the grace, close() cuts and flushes
        ok = await self.generation.wait_idle(grace)
        if not ok:
            log.warning("drain: %d requests still in flight after %.0fs", self.generation.inflight, grace)
        await self.close()

    async def close(self) -> None:
        """Cut what is still in flight, run every on_done it left, then stop the rest.

        The order matters: a request cut here ends in its handler's ``finally``, which queues
        its on_done (a ledger row, a budget to reconcile) or adds it to the batch. So the
        handlers end first, then the batch and the queue are run, and only then do the
        on_done workers, the plugins and the state stop.
        """
        if self.runner is not None:
            self.handlers_done = asyncio.Event()
            await self.runner.cleanup()
            self.runner = None
            if self.handling:  # cut handlers end in their finally, which hands their on_done over
                try:
                    async with asyncio.timeout(CUT_WAIT_S * 2):
                        await self.handlers_done.wait()
                except TimeoutError:
                    log.warning("close: %d requests still in their handler", self.handling)
        self.run_batch()
        if self._queue is not None and self._workers:
            try:
                async with asyncio.timeout(DONE_FLUSH_S):
                    # join() alone can return while a full queue's overflow puts are still to land (a
                    # worker that empties the queue wakes them, and join, in one go): count, not trust.
                    # join() returns at once on an empty queue: the sleep lets those puts run
                    while self._pending:
                        await self._queue.join()
                        await asyncio.sleep(0)
            except TimeoutError:
                log.warning("close: %d on_done items not run (their requests' rows and metrics are lost)", self._pending)
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self._tasks.cancel()
        for gen in list(self._retiring):
            # a retirement the cancel cut (the old config still draining, or stopping): stopped here all the
            # same, its plugins (a ledger's last rows) and its upstream connections with it
            await gen.stop()
        self._retiring.clear()
        while self._queue is not None and not self._queue.empty():  # what the flush's time did not reach
            _, _, gen, rest = self._queue.get_nowait()
            if rest is not None:
                rest[1][1].close()  # a hook's coroutine that never started: closed, not left to warn
            gen.leave()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
            self.admin_runner = None
        if self.generation is not None:
            await self.generation.stop()
        if self.runtime is not None:
            await self.runtime.close()
            await self.runtime.state.close()
        if self.demo is not None:
            await self.demo.stop()
            self.demo = None

    # -- health -------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        gen = self.generation
        if gen is None or not gen.started or self.draining:
            return False, {"status": "not ready", "reason": "draining" if self.draining else "starting"}
        checks = await asyncio.gather(*(_probe(u) for u in gen.pool.upstreams.values()))
        ups = dict(zip(gen.pool.upstreams, checks))
        state = await self.runtime.state.check()
        # ready while every route can reach one of its upstreams: with fallbacks over several model servers,
        # one down (a pod rolled) must not take every replica out of service while the others answer
        cut_off = [r.name for r in gen.routes if r.default_targets and not any(ups.get(t.upstream) for t in r.default_targets)]
        ok = not cut_off and all(v in (True, "ok") for v in state.values())
        out = {"status": "ready" if ok else "not ready", "upstreams": {k: "ok" if v else "unreachable" for k, v in ups.items()},
               "state": state}
        if cut_off:
            out["routes_without_upstream"] = cut_off
        return ok, out


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, when the C library has it (musl and macOS do not)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _freeze_heap(thaw: bool = False) -> None:
    """Move what start-up built (modules, configs, compiled patterns) out of the collector's sight.

    The cyclic GC otherwise walks those long-lived objects again and again as
    requests allocate; freezing them makes each collection cost only what is young.
    ``thaw`` first returns what was frozen to the collector, so that a retired generation
    can be freed: that collection walks the whole heap, once per reload.
    """
    started = time.perf_counter()
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    if thaw:
        log.info("heap collected after a reload in %.0f ms (%d objects frozen)", (time.perf_counter() - started) * 1000,
                 gc.get_freeze_count())


async def _probe(up: Any) -> bool:
    """An upstream is reachable: its health path answers below 500, or a TCP connect succeeds."""
    u = URL(up.base)
    try:
        if up.config.health_path:
            async with up.session.get(up.origin + up.config.health_path, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status < 500
        async with asyncio.timeout(2):
            _, w = await asyncio.open_connection(u.host, u.port)
            w.close()
            await w.wait_closed()
        return True
    except Exception:
        return False


def _site_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here
    assert server is not None and server.sockets
    return server.sockets[0].getsockname()[1]


def _close_kept_alive(server: Any) -> None:
    """Close the connections of aiohttp's low-level ``server``: an idle one (waiting for its next request)
    now, one with a request in hand once that request is answered. aiohttp's ``close()`` alone leaves an
    idle connection's socket open (its wait is cancelled, and the socket kept), so those are closed here."""
    for conn in server.connections:
        if getattr(conn, "_waiter", None) is not None and not getattr(conn, "_messages", True):
            conn.force_close()
        else:
            conn.close()


class _WebServer(web.Server):
    """aiohttp's low-level server, its connections answering what they cannot parse as Sluice answers.

    aiohttp answers a request it cannot parse (a bad request line or header, a header too long, a bad
    chunk) in plain text that quotes the client's bytes, and logs the parser's traceback with them at
    ERROR. Here such a request gets an OpenAI-shaped error with an ``x-request-id``, is counted in
    ``sluice_rejected_requests_total``, and is logged in one line that quotes nothing the client sent.
    """

    def __init__(self, sluice: Server, handler: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.protocol = _protocol_class(sluice)

    def __call__(self) -> RequestHandler:
        proto = super().__call__()
        proto.__class__ = self.protocol  # the same object layout (no slots of its own): only handle_error differs
        return proto


class _AdminRunner(web.AppRunner):
    """The admin listener's runner: its connections answer what they cannot parse as the client
    listener's do (:class:`_WebServer`), without counting those in the client traffic's metrics."""

    __slots__ = ("_sluice",)

    def __init__(self, sluice: Server, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._sluice = sluice

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _WebServer  # the same object: only __call__, which makes each connection, differs
        server.protocol = _protocol_class(self._sluice, counted=False)  # type: ignore[attr-defined]
        return server


def _protocol_class(sluice: Server, counted: bool = True) -> type[RequestHandler]:
    def answer(rid: str, status: int, reason: str, message: str, code: str) -> web.StreamResponse:
        if counted:
            return refuse(sluice, rid, status, reason, message, code)
        return error_response(status, message, rid, code=code)

    class Protocol(RequestHandler):
        __slots__ = ()

        def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None) -> web.StreamResponse:
            rid = new_request_id()
            if request.writer.output_size > 0:
                # as aiohttp does: the answer has begun, no other can be sent
                raise ConnectionError("Response is sent already, cannot send another response with the error message")
            kind = type(exc).__name__ if exc is not None else "none"
            if status >= 500:
                log.error("internal error %s request_id=%s", kind, rid, exc_info=exc if sluice.debug else None)
                resp = error_response(500, "Sluice failed to process the request.", rid, code="internal_error")
            elif isinstance(exc, LineTooLong):
                log.info("refused a request with a line or header over aiohttp's limit (%s) request_id=%s", kind, rid)
                resp = answer(rid, 431, "header_too_large",
                              "A request line or header field is longer than Sluice reads (8190 bytes).", "request_header_fields_too_large")
            else:
                # not HTTP at all (TLS, a port scan) is common on an open port: counted, and logged at debug
                level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
                log.log(level, "refused a request that is not valid HTTP/1.1 (%s) request_id=%s", kind, rid)
                resp = answer(rid, status if 400 <= status < 500 else 400, "invalid_http", "The request is not valid HTTP/1.1.",
                              "invalid_http")
            resp.force_close()
            return resp

    return Protocol


def make_handler(server: Server) -> Handler:
    """The request handler of the main listener: health paths, then the routes."""

    async def healthz(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"x-request-id": new_request_id()})

    async def readyz(request: web.BaseRequest) -> web.Response:
        ok, detail = await server.readiness()
        return web.json_response(detail, status=200 if ok else 503, headers={"x-request-id": new_request_id()})

    return Handler(server, {"/healthz": healthz, "/readyz": readyz})


# -- running ------------------------------------------------------------------

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()})


_log_handler: logging.Handler | None = None


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Sluice's one handler on the root logger (stderr), its format and the level; again on a reload."""
    global _log_handler
    root = logging.getLogger()
    if _log_handler is None:
        _log_handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_log_handler)
    _log_handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level.upper())


#: settings read once, when the server starts (listeners, worker processes, queues, threads)
_START_ONLY = {
    "server": ("host", "port", "workers", "executor_threads", "background_queue", "background_workers", "memory_trim_s"),
    "admin": ("enabled", "host", "port"),
}


def _start_only_changes(old: Any, new: Any) -> list[str]:
    return [f"{section}.{name}" for section, names in _START_ONLY.items() for name in names
            if getattr(getattr(old, section), name) != getattr(getattr(new, section), name)]


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on some platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_async(loaded: LoadedConfig, config_path: str | None, *, worker_id: int = 0, reuse_port: bool = False, ready_fd: int | None = None, ready_file: str | None = None, port: int | None = None) -> int:
    server = Server(loaded, config_path=config_path, worker_id=worker_id)
    try:
        await server.start()
        await server.listen(port=port, reuse_port=reuse_port)
    except BaseException:
        await server.close()  # what started (the demo model, the state, the plugins) stops before the error shows
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_hup() -> None:
        server._tasks.spawn(server.reload(), "sluice-reload")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    info = {"pid": os.getpid(), "port": server.port, "admin_port": server.admin_port, "host": loaded.config.server.host}
    log.info("sluice listening on http://%s:%d (admin %s) worker=%d", info["host"], server.port, server.admin_port or "off", worker_id)
    if ready_fd is not None:
        os.write(ready_fd, (json.dumps(info) + "\n").encode())
        os.close(ready_fd)
    if ready_file:
        _write_atomic(ready_file, json.dumps(info))
    await stop.wait()
    log.info("draining (grace %.0fs)", loaded.config.server.drain_seconds)
    await server.drain()
    log.info("stopped")
    return 0


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def run_master(loaded: LoadedConfig, config_path: str | None, ready_file: str | None) -> int:
    """N worker processes on one port (SO_REUSEPORT); signals are forwarded to them.

    A worker that dies is started again; one that then fails to start (the file on disk
    may have broken since) is tried again after 1 s, then 2, 4, ... up to 30, while the
    others keep serving."""
    env = dict(os.environ)
    if "PROMETHEUS_MULTIPROC_DIR" in env:
        return _run_master(loaded, config_path, ready_file, env)
    env["PROMETHEUS_MULTIPROC_DIR"] = prom = tempfile.mkdtemp(prefix="sluice-prom-")
    try:
        return _run_master(loaded, config_path, ready_file, env)
    finally:
        shutil.rmtree(prom, ignore_errors=True)  # the workers' metric files, made for this run


def _run_master(loaded: LoadedConfig, config_path: str | None, ready_file: str | None, env: dict[str, str]) -> int:
    cfg = loaded.config
    n = cfg.server.workers
    port = cfg.server.port or free_port(cfg.server.host)
    admin_port = cfg.admin.port or (free_port(cfg.admin.host) if cfg.admin.enabled else 0)
    env["SLUICE__SERVER__PORT"] = str(port)
    env["SLUICE__ADMIN__PORT"] = str(admin_port)
    demo = None
    if not cfg.upstreams and cfg.server.demo_upstream and "SLUICE_DEMO_UPSTREAM_URL" not in env:
        demo_port = free_port("127.0.0.1")
        demo = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo-upstream", "--port", str(demo_port)], env=env)
        env["SLUICE_DEMO_UPSTREAM_URL"] = f"http://127.0.0.1:{demo_port}/v1"
        _wait_port("127.0.0.1", demo_port, 20)
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(i: int) -> bool:
        """Start worker ``i`` and wait until it listens; ``False`` when it exited first."""
        r, w = os.pipe()
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--worker", str(i), "--ready-fd", str(w)]
        if config_path:
            cmd += ["-c", config_path]
        try:
            p = subprocess.Popen(cmd, env={**env, "SLUICE_WORKER": str(i)}, pass_fds=(w,))
        except OSError as e:
            os.close(r)
            os.close(w)
            log.error("worker %d could not be started: %s", i, e)
            return False
        os.close(w)
        p.worker_index = i  # type: ignore[attr-defined]
        children[p.pid] = p  # before it is ready: a SIGTERM meanwhile reaches it too
        with os.fdopen(r) as f:
            line = f.readline()
        if line:
            return True
        children.pop(p.pid, None)
        p.wait()
        return False

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sig = signal.SIGTERM
        for p in list(children.values()):
            # os.kill, not send_signal or poll: those reap a child that exited, and os.wait() below
            # would then never report it (a worker lost, or a loop that never ends). Only that wait
            # reaps the children in `children`, so their pids cannot be reused yet.
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    for i in range(n):
        if not spawn(i):
            log.error("worker %d failed to start; stopping", i)
            forward(signal.SIGTERM, None)
            for p in list(children.values()):
                p.wait()
            _stop_demo(demo)
            return 1
    if ready_file:
        _write_atomic(ready_file, json.dumps({"pid": os.getpid(), "port": port, "admin_port": admin_port, "host": cfg.server.host, "workers": n}))
    status = 0
    # workers that died, to start again: index -> (when to try next, the wait after a failed try). One
    # that fails to start (the file on disk may have broken since) waits longer each time; the others
    # keep serving meanwhile.
    retry: dict[int, tuple[float, float]] = {}
    while children or (retry and not stopping):
        if stopping:
            retry.clear()
        for i, (due, wait) in sorted(retry.items()):
            if due <= time.monotonic() and not stopping:
                if spawn(i):
                    del retry[i]
                    log.warning("worker %d started again", i)
                else:
                    retry[i] = (time.monotonic() + wait, min(wait * 2, _RESTART_MAX_WAIT_S))
                    log.error("worker %d failed to start again; next try in %.0f s", i, wait)
        reaped = _reap(min((d for d, _ in retry.values()), default=None))
        if reaped is None:
            if not retry:
                break  # no child left to wait for
            continue
        pid, code = reaped
        p = children.pop(pid, None)
        if p is None:
            continue
        if not stopping:
            log.error("worker %d exited with %d; starting it again", p.worker_index, code)  # type: ignore[attr-defined]
            retry[p.worker_index] = (0.0, _RESTART_FIRST_WAIT_S)  # type: ignore[attr-defined]  # due at once
        elif code != 0:
            status = code
    _stop_demo(demo)
    return status


#: a worker that cannot be started again is retried after this many seconds, doubling up to the maximum
_RESTART_FIRST_WAIT_S = 1.0
_RESTART_MAX_WAIT_S = 30.0


def _reap(until: float | None) -> tuple[int, int] | None:
    """A child that exited, as (pid, exit code): waits for one, or only until ``until`` (monotonic)."""
    if until is None:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            return None
        return pid, os.waitstatus_to_exitcode(st)
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid:
            return pid, os.waitstatus_to_exitcode(st)
        left = until - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(left, 0.1))  # no wait-with-timeout for children: poll, at most ten times a second


def _stop_demo(demo: subprocess.Popen[bytes] | None) -> None:
    if demo is not None:
        demo.terminate()
        demo.wait()


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve(config_path: str | None, *, worker: int | None = None, ready_fd: int | None = None, ready_file: str | None = None) -> int:
    try:
        loaded = load_config(config_path)
    except ConfigError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    configure_logging(loaded.config.logging.level, loaded.config.logging.format)
    if worker is None and loaded.config.server.workers > 1:
        return run_master(loaded, config_path, ready_file)
    install_uvloop()
    try:
        return asyncio.run(
            serve_async(
                loaded, config_path, worker_id=worker or 0, reuse_port=worker is not None,
                ready_fd=ready_fd, ready_file=ready_file,
            )
        )
    except ConfigError as e:  # a plugin refused its config while starting
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, an address that cannot be bound, a state.dir that is not a directory
        print(f"sluice: cannot start: {e}", file=sys.stderr)
        return 1


__all__ = ["Server", "make_handler", "serve", "error_response"]
