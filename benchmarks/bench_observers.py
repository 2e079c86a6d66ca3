"""The observers together (tracing + metrics + metering + drift, sampling at 100%) against the empty chain.

Measured in one run, rounds interleaved so machine noise falls on both:

* CPU per request of the Sluice process (user + system time from /proc, so the
  exporter thread, the ledger writer thread and the drift comparisons in the executor
  all count), for the empty chain, each observer alone, and the four together; the
  difference from the empty chain is what they cost. Target: under 100 us per request.
* Client latency p50 / p99 of both, and their ratio.
* ``--hooks``: each observer's own hooks in-process (``on_request`` + ``on_done`` on a
  finished buffered chat request, garbage collection paused so one plugin's garbage is
  not billed to another), the OTLP encoding of its spans, and one drift comparison, so
  the plugins' share can be told from the core's and the state writer's.

Sluice and the demo upstream run as separate processes (``sluice serve``,
``sluice demo-upstream``); spans go over OTLP/HTTP to a sink in this process that
reads and discards them, so the export path is real. Traffic is 3 buffered : 1 streamed
chat requests at a fixed concurrency.

    .venv/bin/python benchmarks/bench_observers.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_observers.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_observers.py --hooks    # the plugins' own hooks, in-process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_traffic import demo_upstream, pct  # noqa: E402

from proxy.testing import SluiceProcess  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = orjson.dumps({"model": "sluice-demo", "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]})
STREAM_BODY = orjson.dumps({"model": "sluice-demo", "stream": True,
                            "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]})


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[str, list[int]]]:
    """An OTLP/HTTP endpoint that reads each export and answers 200 (counts bytes)."""
    received = [0, 0]

    async def traces(request: web.Request) -> web.Response:
        received[0] += 1
        received[1] += len(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", received
    finally:
        await runner.cleanup()


def config(upstream: str, chain: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "logging": {"level": "warning"},
        "upstreams": {"primary": {"url": upstream, "models": ["sluice-demo"]}},
        "prices": {"sluice-demo": {"input": 0.5, "output": 1.5}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "primary", "chain": chain}],
    }


def observers(sink: str) -> list[dict[str, Any]]:
    return [
        {"metrics": {}},
        {"metering": {}},
        {"drift": {"sample_rate": 1.0}},
        {"tracing": {"endpoint": sink, "sample_ratio": 1.0}},
    ]


async def load(http: aiohttp.ClientSession, url: str, n: int, concurrency: int) -> list[float]:
    lat: list[float] = []
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            body = STREAM_BODY if i % 4 == 3 else BODY
            t0 = time.perf_counter()
            async with http.post(url + "/chat/completions", data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
            lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat


async def settle(pid: int, quiet_s: float = 0.25, limit_s: float = 5.0) -> None:
    """Wait until the process stops burning CPU (its on_done queue, writer and exporter caught up)."""
    deadline = time.monotonic() + limit_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last <= 1 / CLK_TCK:
            return
        last = now


async def main(quick: bool) -> dict[str, Any]:
    rounds, per_round, concurrency = (2, 200, 8) if quick else (3, 600, 8)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-observers-"))
    async with demo_upstream(0.0) as up, otlp_sink() as (sink, received):
        every = observers(sink)
        chains = {"empty": [], **{next(iter(p)): [p] for p in every}, "observers": every}
        async with contextlib.AsyncExitStack() as stack:
            procs = {name: await stack.enter_async_context(SluiceProcess(config(up, chain), tmp / name))
                     for name, chain in chains.items()}
            cpu = {k: 0.0 for k in procs}
            lat: dict[str, list[float]] = {k: [] for k in procs}
            async with aiohttp.ClientSession() as http:
                for p in procs.values():
                    await load(http, p.url, 200, concurrency)  # warm up: imports, pools, first windows
                    await settle(p.pid)
                for _ in range(rounds):
                    for name, p in procs.items():
                        c0 = cpu_seconds(p.pid)
                        lat[name] += await load(http, p.url, per_round, concurrency)
                        await settle(p.pid)
                        cpu[name] += cpu_seconds(p.pid) - c0
    n = rounds * per_round
    us = {k: cpu[k] / n * 1e6 for k in cpu}
    return {
        "requests_per_config": n,
        "concurrency": concurrency,
        "mix": "3 buffered : 1 streamed chat requests",
        "cpu_us_per_request": {k: round(v, 1) for k, v in us.items()},
        "added_cpu_us_per_request": {k: round(v - us["empty"], 1) for k, v in us.items() if k != "empty"},
        "cpu_ratio_observers_vs_empty": round(us["observers"] / us["empty"], 3),
        "latency_ms": {k: {"p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3), "mean": round(statistics.fmean(v), 3)}
                       for k, v in lat.items()},
        "latency_p50_ratio_observers_vs_empty": round(pct(lat["observers"], 50) / pct(lat["empty"], 50), 3),
        "latency_p99_ratio_observers_vs_empty": round(pct(lat["observers"], 99) / pct(lat["empty"], 99), 3),
        "otlp_exports": received[0],
        "otlp_bytes": received[1],
    }


RESPONSE = orjson.dumps({
    "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1700000000, "model": "sluice-demo",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hamlet avenges his father. " * 4}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 28, "total_tokens": 49},
})


class _Capture:
    """Stands in for the batch processor: keeps the spans so their encoding is timed apart."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def on_end(self, span: Any) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        return None


async def hooks(n: int = 2000, repeats: int = 3) -> dict[str, Any]:
    import gc

    from plugins._drift_stats import Snapshot, Thresholds, compare
    from plugins._otel_wire import encode_request
    from plugins.drift import Drift
    from plugins.metering import Metering
    from plugins.metrics import Metrics
    from plugins.tracing import Tracing
    from proxy import Attempt, Identity, Response, Target, Usage
    from proxy.testing import configure_plugin, make_context, make_runtime

    rt = await make_runtime(tempfile.mkdtemp(prefix="sluice-bench-hooks-"), config={
        "upstreams": {"primary": {"url": "http://127.0.0.1:9/v1", "models": ["sluice-demo"]}},
        "prices": {"sluice-demo": {"input": 0.5, "output": 1.5}}})

    def finished() -> Any:
        ctx = make_context(orjson.loads(BODY), runtime=rt, identity=Identity(key_id="k1", team="t1"))
        t = ctx.timings
        ctx.attempts.append(Attempt(Target("primary"), start=t.start + 1e-4, status=200, first_byte=t.start + 0.01, end=t.start + 0.02))
        ctx.upstream = Target("primary")
        t.upstream_start, t.first_byte, t.upstream_end, t.end = t.start + 1e-4, t.start + 0.01, t.start + 0.02, t.start + 0.021
        ctx.response = Response(200, {"content-type": "application/json"}, RESPONSE)
        ctx.usage = Usage(21, 28, 49)
        ctx.outcome, ctx.status = "ok", 200
        t.plugins.update({"metrics.on_done": 2e-5, "metering.on_request": 1e-5, "metering.on_done": 2e-5, "tracing.on_request": 1e-5})
        return ctx

    out: dict[str, Any] = {}
    try:
        for name, cls, cfg in (("metrics", Metrics, {}), ("metering (hooks; ledger rows go to the state writer)", Metering, {"ledger": False}),
                               ("drift (sampling; comparisons below)", Drift, {}), ("tracing (span building; encoding below)", Tracing, {"exporter": "console"})):
            plugin = await configure_plugin(cls, cfg, runtime=rt)
            cap = None
            if cls is Tracing:
                cap = _Capture()
                plugin.pipeline.processor = cap
            best = float("inf")
            for _ in range(repeats):
                ctxs = [finished() for _ in range(n)]
                gc.collect()
                gc.disable()
                t0 = time.process_time()
                for ctx in ctxs:
                    if hasattr(plugin, "on_request"):
                        r = plugin.on_request(ctx)
                        if asyncio.iscoroutine(r):
                            await r
                    r = plugin.on_done(ctx)
                    if asyncio.iscoroutine(r):
                        await r
                best = min(best, (time.process_time() - t0) / n * 1e6)
                gc.enable()
            out[name] = round(best, 1)
            if cap is not None:
                spans = cap.spans[: 2 * n]
                t0 = time.process_time()
                for i in range(0, len(spans), 512):
                    encode_request(spans[i:i + 512])
                out["tracing: OTLP encoding of its 2 spans"] = round((time.process_time() - t0) / n * 1e6, 1)
            await rt.tasks.wait(30)
            await plugin.stop()
        # the ledger row metering appends, through the state's records writer (its thread included)
        from plugins.metering import LEDGER_TABLE, ledger_table

        meter = await configure_plugin(Metering, {}, runtime=rt)
        rows = []
        for _ in range(n):
            ctx = finished()
            rows.append(meter._row(ctx, ctx.usage, "sluice-demo", 0.0001, True, False))
        records = rt.state.records("bench-ledger")
        records.ensure(ledger_table())
        await records.flush()
        t0 = time.process_time()
        for i, row in enumerate(rows):
            records.append(LEDGER_TABLE, row)
            if i % 8 == 7:
                await asyncio.sleep(0)  # let the writer thread run as it would between requests
        await records.flush()
        out["metering: ledger row through runtime.state.records (state writer thread)"] = round(
            (time.process_time() - t0) / n * 1e6, 1)
        await meter.stop()

        import numpy as np

        rng = np.random.default_rng(0)
        snap = lambda: Snapshot({k: rng.normal(0, 1, 1000).tolist() for k in ("prompt_tokens", "completion_tokens", "latency_s", "ttft_s")},
                                {"finish_reason": {"stop": 900, "length": 100}, "error": {"no": 1000}, "refusal": {"no": 1000}}, 1000, 0, 1)
        a, b = snap(), snap()
        compare(a, b, Thresholds())
        t0 = time.process_time()
        for _ in range(50):
            compare(a, b, Thresholds())
        one = (time.process_time() - t0) / 50
        out["drift: one comparison (4 numeric x 1000, 3 categorical), us"] = round(one * 1e6, 1)
        out["drift: comparisons per request at check_every 100"] = round(one * 1e6 / 100, 1)
    finally:
        await rt.close_all()
    out["unit"] = "us of CPU per request unless stated"
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--hooks", action="store_true", help="time the plugins' own hooks in-process")
    args = ap.parse_args()
    result = asyncio.run(hooks()) if args.hooks else asyncio.run(main(args.quick))
    print(json.dumps(result, indent=2))
