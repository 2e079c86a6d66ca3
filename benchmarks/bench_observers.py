"""The observers together (tracing + metrics + metering + drift, sampling at 100%) against the empty chain.

Measured in one run, rounds interleaved so machine noise falls on both:

* CPU per request of the Sluice process (user + system time from /proc, so the
  exporter thread, the ledger writer thread and the drift comparisons in the executor
  all count), for the empty chain, each observer alone, and the four together; the
  difference from the empty chain is what they cost. Target: under 100 us per request.
* Client latency p50 / p99 of both, and their ratio.

Sluice and the demo upstream run as separate processes (``sluice serve``,
``sluice demo-upstream``); spans go over OTLP/HTTP to a sink in this process that
reads and discards them, so the export path is real. Traffic is 3 buffered : 1 streamed
chat requests at a fixed concurrency.

    .venv/bin/python benchmarks/bench_observers.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_observers.py --quick    # smoke run
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.quick)), indent=2))
