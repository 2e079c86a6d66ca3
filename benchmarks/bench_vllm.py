"""Sluice in front of a real vLLM (CPU, contrib/vllm), as ratios against the direct path in one run.

Four paths to the same vLLM server, rounds interleaved:

* direct: client -> vLLM;
* empty: client -> ``sluice serve`` with an empty chain -> vLLM;
* full: client -> ``sluice serve`` with the default chain (auth, ratelimit,
  injection, pii, cache, router with the vLLM strategy, experiments, tracing,
  metering, drift, metrics) -> vLLM. Every prompt is unique, so the cache never hits;
* full_without_pii: the same minus pii, whose answer scanning holds back runs of
  digits in a stream until they cannot be part of a number it must redact (the tiny
  model writes many digits), to separate that effect on time to first token.

For each: time to first token and total latency of streamed chat completions
(32 tokens), latency of buffered ones, and the Sluice process's CPU per request
(from /proc, whole process tree). vLLM, Sluice and the client are separate
processes. The tiny model generates a few hundred tokens a second here, far
faster than a real model, so the proxy's share of the latency is overstated.

    .venv/bin/python benchmarks/bench_vllm.py            # about 2 minutes: 1 starting vLLM, under 1 of load
    .venv/bin/python benchmarks/bench_vllm.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.testing import SluiceProcess  # noqa: E402

MODEL = "tiny-llama"
KEY = "sk-bench-vllm-0123456789abcdef"


def _launch():
    spec = importlib.util.spec_from_file_location("sluice_contrib_vllm_launch", ROOT / "contrib" / "vllm" / "launch.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def full_chain() -> list[dict[str, Any]]:
    return [
        {"auth": {"keys": [{"key": KEY, "id": "bench"}], "virtual_keys": False}},
        {"ratelimit": {"requests_per_minute": 1_000_000}},
        {"injection": {"action": "block"}},
        {"pii": {"action": "redact"}},
        {"cache": {}},
        {"router": {"aliases": {MODEL: {"strategy": "vllm", "targets": [{"upstream": "vllm"}]}}, "vllm": {"poll_interval_s": 1}}},
        {"experiments": {}},
        {"tracing": {"exporter": "none"}},
        {"metering": {}},
        {"drift": {}},
        {"metrics": {}},
    ]


def config(url: str, chain: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "logging": {"level": "warning"},
        "upstreams": {"vllm": {"url": url, "kind": "vllm", "models": [MODEL], "context_window": 512}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "vllm", "chain": chain}],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (/proc, clock ticks)."""
    total = 0
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def body(stream: bool) -> bytes:
    nonce = "".join(random.choices(string.ascii_lowercase, k=12))
    b: dict[str, Any] = {
        "model": MODEL, "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "user", "content": f"Write a short note about proxies {nonce}."}],
        "ignore_eos": True,  # every request generates exactly 32 tokens, on every path
    }
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


async def one(http: aiohttp.ClientSession, url: str, stream: bool) -> tuple[float, float | None]:
    """(total ms, time to first content event ms) of one request."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    t0 = time.perf_counter()
    ttft = None
    async with http.post(url + "/chat/completions", data=body(stream), headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: status {r.status}: {(await r.read())[:200]!r}")
        if stream:
            async for line in r.content:
                if ttft is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    ttft = (time.perf_counter() - t0) * 1000
        else:
            await r.read()
    return (time.perf_counter() - t0) * 1000, ttft


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=12, help="requests per path, kind and round")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    rounds, per = (1, 4) if args.quick else (args.rounds, args.per_round)

    launch = _launch()
    python = launch.setup_env(quiet=True)
    model = launch.build_model(python)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    t_start = time.monotonic()
    with launch.VllmFleet.start(1, model, python=python, log_dir=tmp / "logs", model_name=MODEL) as fleet:
        vllm_url = fleet.servers[0].url
        started = time.monotonic() - t_start
        no_pii = [p for p in full_chain() if "pii" not in p]
        async with SluiceProcess(config(vllm_url, []), tmp / "empty") as empty, \
                SluiceProcess(config(vllm_url, full_chain()), tmp / "full") as full, \
                SluiceProcess(config(vllm_url, no_pii), tmp / "full-no-pii") as full_no_pii, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            paths = {
                "direct": (vllm_url, None),
                "empty": (empty.url, empty.pid),
                "full": (full.url, full.pid),
                "full_without_pii": (full_no_pii.url, full_no_pii.pid),
            }
            for url, _ in paths.values():  # warm-up: connections, lazy imports, first-request paths
                for stream in (False, True):
                    await one(http, url, stream)
            res: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "stream": [], "buffered": [], "cpu": []} for n in paths}
            t_load = time.monotonic()
            for _ in range(rounds):
                order = list(paths)
                random.shuffle(order)
                for name in order:
                    url, pid = paths[name]
                    c0 = cpu_seconds(pid) if pid else 0.0
                    for _ in range(per):
                        total, ttft = await one(http, url, True)
                        res[name]["stream"].append(total)
                        if ttft is not None:
                            res[name]["ttft"].append(ttft)
                        total, _ = await one(http, url, False)
                        res[name]["buffered"].append(total)
                    if pid:
                        res[name]["cpu"].append((cpu_seconds(pid) - c0) / (2 * per) * 1e6)
            load_s = time.monotonic() - t_load

    out: dict[str, Any] = {"vllm_start_s": round(started, 1), "load_s": round(load_s, 1), "rounds": rounds, "per_round": per}
    base = res["direct"]
    for name, r in res.items():
        row: dict[str, Any] = {}
        for kind in ("ttft", "stream", "buffered"):
            p50, p99 = pct(r[kind], 50), pct(r[kind], 99)
            row[kind] = {
                "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                "p50_ratio": round(p50 / pct(base[kind], 50), 3), "p99_ratio": round(p99 / pct(base[kind], 99), 3),
            }
        if r["cpu"]:
            row["sluice_cpu_us_per_request"] = round(statistics.median(r["cpu"]), 1)
        out[name] = row
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
