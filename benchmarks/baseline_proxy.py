"""The floor for a Python proxy: a minimal aiohttp pass-through, kept as the benchmark baseline.

One pooled keep-alive ``ClientSession``; the request's method, path, query, headers
(minus hop-by-hop) and body bytes go to the upstream; the answer comes back with its
status and headers; a streamed answer (``text/event-stream``) is relayed chunk by
chunk as the network delivers it, anything else is read and sent in one piece. No
parsing, no plugins, no timeouts beyond the pool's, no error shaping: what naive code
pays for proxying, on the same uvloop event loop Sluice runs on.

    python benchmarks/baseline_proxy.py --upstream http://127.0.0.1:8000/v1 --port 4100
    python benchmarks/baseline_proxy.py --upstream http://127.0.0.1:8000/v1 \\
        --route /s/v1/=http://127.0.0.1:8001/v1 --port 0 --ready-file ready.json

``--route PREFIX=URL`` (repeatable) maps a path prefix to another upstream, the rest of
the path appended, exactly as a Sluice route does; ``--upstream`` serves ``/v1/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length")
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def _forward_headers(headers: CIMultiDict[str] | object) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)  # type: ignore[attr-defined]


def make_app(routes: list[tuple[str, str]], max_connections: int) -> web.Application:
    # longest prefix first, as Sluice matches
    table = sorted(routes, key=lambda r: -len(r[0]))

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        conn = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
        app[SESSION] = aiohttp.ClientSession(connector=conn, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        for prefix, base in table:
            if path.startswith(prefix):
                url = base + "/" + path[len(prefix):]
                break
        else:
            return web.Response(status=404)
        body = await request.read()
        async with request.app[SESSION].request(
            request.method, url, data=body, headers=_forward_headers(request.headers), allow_redirects=False
        ) as up:
            headers = _forward_headers(up.headers)
            if up.headers.get("content-type", "").startswith("text/event-stream"):
                out = web.StreamResponse(status=up.status, headers=headers)
                await out.prepare(request)
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            return web.Response(status=up.status, body=await up.read(), headers=headers)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(args: argparse.Namespace) -> None:
    routes = [("/v1/", args.upstream.rstrip("/"))] if args.upstream else []
    for spec in args.route:
        prefix, _, url = spec.partition("=")
        if not prefix.startswith("/") or not url.startswith("http"):
            raise SystemExit(f"--route wants PREFIX=URL, got {spec!r}")
        routes.append((prefix, url.rstrip("/")))
    if not routes:
        raise SystemExit("give --upstream or --route")
    runner = web.AppRunner(make_app(routes, args.max_connections), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    info = {"pid": os.getpid(), "port": port, "host": args.host}
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, args.ready_file)
    print(f"baseline proxy on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await runner.cleanup()


def _profile_on_signals(path: str) -> None:
    """The same switchable thread-CPU profiler as ``noop_plugins.py``, for a like-for-like comparison."""
    import cProfile
    import time

    current: list[cProfile.Profile] = []

    def on(_sig: int, _frame: object) -> None:
        if not current:
            current.append(cProfile.Profile(time.thread_time))
            current[0].enable()

    def off(_sig: int, _frame: object) -> None:
        if current:
            prof = current.pop()
            prof.disable()
            prof.dump_stats(f"{path}.tmp")
            os.replace(f"{path}.tmp", path)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Minimal aiohttp pass-through proxy (benchmark baseline).")
    p.add_argument("--upstream", help="base URL serving /v1/, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--route", action="append", default=[], help="PREFIX=URL, another prefix to another upstream (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4100, help="0 picks a free port (see --ready-file)")
    p.add_argument("--ready-file", help="write {pid, port, host} as JSON here once listening")
    p.add_argument("--max-connections", type=int, default=256, help="pooled upstream connections (Sluice's default)")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    p.add_argument("--profile", default=None, help="profile CPU between SIGUSR1 and SIGUSR2; the stats are written here at SIGUSR2")
    args = p.parse_args(argv)
    if args.profile:
        _profile_on_signals(args.profile)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
