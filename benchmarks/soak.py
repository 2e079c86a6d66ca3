"""Soak: Sluice's resident memory under steady load, sampled from /proc over a bounded run.

Starts the demo upstream and one Sluice process (``server.workers: 1``; by default the
chain of ten no-op plugins, so the chain, the ``on_done`` queue and stream parsing all
run; ``--chain observers``: metering, tracing, metrics and drift at 100% sampling, spans
exported over OTLP/HTTP to a sink here, the ledger's rows counted after SIGTERM), drives
it with one ``loadgen.py`` process in open loop (a fixed arrival rate, a mix of streamed
and buffered chat completions), samples the process's RSS every few seconds, and reports
the growth from the 1-minute mark (start-up and warm-up allocations done, pools filled)
to the end. Issue 2's target: under 5% over 10 minutes.

    .venv/bin/python benchmarks/soak.py                     # 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 2 --rate 40 --chain empty
    .venv/bin/python benchmarks/soak.py --chain observers    # the four observers, 10 minutes

A Markdown summary goes to stdout; ``--json FILE`` keeps the samples. Only 127.0.0.1
is used and only the processes started here are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_observers import observers, otlp_sink  # noqa: E402
from loadgen import cpu_seconds, memory_kb  # noqa: E402
from noop_plugins import chain as noop_chain  # noqa: E402
from run_core import PY, ROOT, Fleet, _git_commit, loadavg, sluice_config  # noqa: E402

BASELINE_AT_S = 60.0


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    fleet = Fleet(tmp)
    seconds = args.minutes * 60
    samples: list[dict[str, float]] = []
    commit = _git_commit()  # what the processes load now
    spans: list[int] = []
    ledger_rows = None
    sluice = None
    stack = contextlib.AsyncExitStack()
    try:
        up = await fleet.demo("upstream", args.token_delay_ms)
        url = f"http://127.0.0.1:{up.port}/v1"
        if args.chain == "observers":
            sink, spans = await stack.enter_async_context(otlp_sink())
            chain = observers(sink)
        else:
            chain = noop_chain() if args.chain == "noop10" else []
        cfg = sluice_config(tmp, "soak", url, url, chain)
        ready = tmp / "ready-soak.json"
        cmd = [PY, str(HERE / "noop_plugins.py"), "-c", str(cfg), "--ready-file", str(ready)]
        sluice = await fleet.with_ready_file("sluice", cmd, ready)
        pid = sluice.pid
        lg = await asyncio.create_subprocess_exec(
            PY, str(HERE / "loadgen.py"), "--url", f"http://127.0.0.1:{sluice.port}/v1", "--mode", "open",
            "--rate", str(args.rate), "--stream-fraction", str(args.stream_fraction), "--duration", str(seconds),
            "--warmup", "0", "--pid", str(pid), "--max-tokens", str(args.max_tokens),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        t0 = time.monotonic()
        cpu0 = cpu_seconds([pid])
        reader = asyncio.ensure_future(lg.communicate())
        while not reader.done():
            t = time.monotonic() - t0
            mem = memory_kb([pid])
            samples.append({"t_s": round(t, 1), "rss_kb": mem["rss_kb"], "cpu_s": round(cpu_seconds([pid]) - cpu0, 2)})
            # sampling on a clock is the point here; the loop ends when the load generator does
            await asyncio.wait({reader}, timeout=args.sample_seconds)
            if t > seconds + 180:
                raise RuntimeError("the load generator did not finish")
        out, err = reader.result()
        if lg.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
        load = json.loads(out)
        final = memory_kb([pid])
        log_tail = sluice.tail(2000)
    finally:
        try:
            await fleet.stop_all()  # SIGTERM: Sluice writes what its ledger holds before it exits
        finally:
            await stack.aclose()
    exit_code = sluice.popen.returncode if sluice is not None else None
    if args.chain == "observers":
        db = sqlite3.connect(f"file:{tmp / 'state-soak' / 'ledger.db'}?mode=ro", uri=True)
        try:
            ledger_rows = db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
        finally:
            db.close()
    at_base = min(samples, key=lambda s: abs(s["t_s"] - BASELINE_AT_S))
    last = samples[-1]
    after = [s["rss_kb"] for s in samples if s["t_s"] >= BASELINE_AT_S]
    growth = (last["rss_kb"] - at_base["rss_kb"]) / at_base["rss_kb"] * 100
    # a leak keeps growing; a high-water mark left by a burst (many requests in flight
    # at once after a stall) steps up and stays: the second half tells them apart
    at_half = min(samples, key=lambda s: abs(s["t_s"] - seconds / 2))
    growth_half = (last["rss_kb"] - at_half["rss_kb"]) / at_half["rss_kb"] * 100
    steps = [
        {"t_s": b["t_s"], "from_kb": a["rss_kb"], "to_kb": b["rss_kb"]}
        for a, b in zip(samples, samples[1:])
        if b["t_s"] >= BASELINE_AT_S and b["rss_kb"] - a["rss_kb"] > 0.01 * a["rss_kb"]
    ]
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "settings": {"minutes": args.minutes, "rate_rps": args.rate, "stream_fraction": args.stream_fraction, "chain": args.chain,
                     "token_delay_ms": args.token_delay_ms, "max_tokens": args.max_tokens, "sample_seconds": args.sample_seconds},
        "loadavg_after": loadavg(),
        "rss_at_1min_kb": at_base["rss_kb"],
        "rss_end_kb": last["rss_kb"],
        "rss_max_after_1min_kb": max(after) if after else None,
        "rss_median_after_1min_kb": statistics.median(after) if after else None,
        "peak_rss_kb": final["peak_rss_kb"],
        "growth_pct": round(growth, 2),
        "growth_second_half_pct": round(growth_half, 2),
        "steps_over_1pct": steps,
        "target_met": growth < 5.0,
        "load": {k: load.get(k) for k in ("completed", "started", "sent", "errors", "error_count", "throughput_rps", "latency_ms", "ttft_ms", "events", "max_inflight")},
        "proxy_cpu_us_per_request": (load.get("proxy") or {}).get("cpu_us_per_request"),
        "ledger_rows": ledger_rows,
        "sluice_exit_code_after_sigterm": exit_code,
        "otlp_exports": spans[0] if spans else None,
        "samples": samples,
        "sluice_log_tail": log_tail if load.get("error_count") else "",
    }


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lat = r["load"]["latency_ms"] or {}
    return "\n".join([
        f"Soak {r['when']} UTC, commit {r['commit']}: {s['minutes']} min, {s['rate_rps']} req/s open loop "
        f"({s['stream_fraction']:.0%} streamed), chain {s['chain']}; {r['load']['completed']} requests, "
        f"{r['load']['error_count']} errors, p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; load average after {r['loadavg_after']}.",
        "",
        "| RSS at 1 min | RSS at end | max after 1 min | growth 1 min → end | target (< 5%) | growth over the second half |",
        "|---|---|---|---|---|---|",
        f"| {r['rss_at_1min_kb'] / 1024:.1f} MiB | {r['rss_end_kb'] / 1024:.1f} MiB | {(r['rss_max_after_1min_kb'] or 0) / 1024:.1f} MiB "
        f"| {r['growth_pct']:+.2f}% | {'met' if r['target_met'] else '**missed**'} | {r['growth_second_half_pct']:+.2f}% |",
        "",
        "Steps of more than 1% after the first minute: "
        + (", ".join(f"{x['from_kb'] / 1024:.1f} → {x['to_kb'] / 1024:.1f} MiB at {x['t_s']:.0f} s" for x in r["steps_over_1pct"]) or "none")
        + f"; most requests in flight at once: {r['load'].get('max_inflight')}."
        + (f" Ledger rows after SIGTERM (Sluice exited with {r['sluice_exit_code_after_sigterm']}): {r['ledger_rows']}, "
           f"for {r['load']['sent']} requests sent ({r['load']['started']} of them started in the window); "
           f"OTLP exports received: {r['otlp_exports']}."
           if r["ledger_rows"] is not None else ""),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="RSS of Sluice over a bounded soak under steady load.")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (growth is measured from the 1-minute mark)")
    p.add_argument("--rate", type=float, default=60.0, help="requests per second (open loop)")
    p.add_argument("--stream-fraction", type=float, default=0.3, help="share of streamed requests")
    p.add_argument("--chain", choices=("noop10", "empty", "observers"), default="noop10")
    p.add_argument("--token-delay-ms", type=float, default=1.0, help="per-token delay of the demo upstream")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    if args.minutes * 60 <= BASELINE_AT_S:
        p.error("--minutes must be more than 1: growth is measured from the 1-minute mark")
    res = asyncio.run(soak(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0 if res["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
