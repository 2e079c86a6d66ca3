"""The core benchmark of issue 2: Sluice against the direct path and a minimal Python proxy.

One run on this machine, every target a separate process (started afresh for each of
``--sets`` sets), rounds interleaved:

* ``direct``: the demo model server (``sluice demo-upstream``), no proxy;
* ``baseline``: ``benchmarks/baseline_proxy.py``, a minimal aiohttp pass-through (the floor);
* ``sluice-empty``: ``sluice serve`` with an empty chain;
* ``sluice-10noop``: Sluice with the ten no-op plugins of ``benchmarks/noop_plugins.py``.

Two demo upstreams serve them all: one with no token delay (buffered answers) and one
with a small delay per token (streams, so events reach the proxy one by one and the
CPU per event is measured on separate events rather than on coalesced reads).

Per round: throughput at saturation and CPU per request there (closed loop, one target
at a time, the order rotating every round so no target always runs first or right after
another); then two open loops that load *all targets at once*, each at the same rate,
arrivals interleaved, so every target lives through the same moments of a noisy
machine: buffered answers at a moderate rate (latency, added latency = target minus
direct in that same window, CPU per request at the same offered load) and streams
(CPU per event, time to first token). An open-loop window whose offered load was not
delivered (a stalled machine) is run again. Added latency is given two ways: the
difference of the two percentiles (target p99 minus direct p99), and request by request
(each proxied request minus the direct request of its own arrival cycle, then the
percentile of those differences; each difference still carries the direct request's own
jitter, but the difference of two p99s can come out negative when the direct path's tail
is the noisier one, and a ratio to a negative baseline is then reported as none). Peak
RSS at the end. Figures are medians over rounds; ratios are against the baseline,
computed per round then taken as medians. Each load runs in its own ``loadgen.py``
process so the client's CPU never counts as a proxy's, and each proxy's CPU is read from
its own process tree.

    .venv/bin/python benchmarks/run_core.py                 # full run: 3 sets of fresh processes x 3 rounds, about 7 minutes
    .venv/bin/python benchmarks/run_core.py --quick         # under a minute, a smoke run
    .venv/bin/python benchmarks/run_core.py --profile /tmp/prof   # where the CPU goes: baseline and both Sluice targets
    .venv/bin/python benchmarks/run_core.py --breakdown     # the ten no-op plugins' cost, part by part

``--json FILE`` keeps the whole result; the Markdown summary goes to stdout.
Only 127.0.0.1 is used, and only the processes this script started are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
TARGETS = ("direct", "baseline", "sluice-empty", "sluice-10noop")
PROXIES = TARGETS[1:]


@dataclass
class Proc:
    """A child process this script started (and is the only one allowed to stop)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_until(cond: Any, proc: Proc, timeout: float, what: str) -> None:
    """Poll a cross-process condition (a ready file, an open port); there is no event to await."""
    async with asyncio.timeout(timeout):
        while not cond():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{proc.tail()}")
            await asyncio.sleep(0.05)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Fleet:
    """Starts the processes of a run and stops exactly those, by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        f = open(log, "wb")
        popen = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        f.close()
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    async def demo(self, name: str, token_delay_ms: float) -> Proc:
        port = free_port()
        p = self.spawn(name, [PY, "-m", "proxy.cli", "demo-upstream", "--port", str(port), "--token-delay-ms", str(token_delay_ms)])
        p.port = port
        await _wait_until(lambda: _port_open(port), p, 60, "listening")
        return p

    async def with_ready_file(self, name: str, cmd: list[str], ready: Path) -> Proc:
        p = self.spawn(name, cmd)
        await _wait_until(ready.exists, p, 60, "ready")
        p.info = json.loads(ready.read_text())
        p.port = int(p.info["port"])
        return p

    async def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                async with asyncio.timeout(20):
                    while p.popen.poll() is None:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                p.popen.kill()
                p.popen.wait()


def sluice_config(tmp: Path, name: str, up_buffered: str, up_stream: str, chain: list[dict[str, Any]]) -> Path:
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1, "access_log": False, "drain_seconds": 5},
        "admin": {"enabled": False},
        "logging": {"level": "warning"},
        "state": {"dir": str(tmp / f"state-{name}")},
        "upstreams": {"buffered": {"url": up_buffered}, "streamed": {"url": up_stream}},
        "routes": [
            {"name": "buffered", "match": {"path": "/v1/"}, "upstream": "buffered", "chain": chain},
            {"name": "streamed", "match": {"path": "/s/v1/"}, "upstream": "streamed", "chain": chain},
        ],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Target:
    name: str
    url: str  # buffered answers
    stream_url: str
    pids: list[int]


@contextlib.asynccontextmanager
async def start_targets(tmp: Path, args: argparse.Namespace, profile_dir: Path | None = None) -> AsyncIterator[dict[str, Target]]:
    tmp.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(tmp)
    try:
        up = await fleet.demo("upstream-buffered", 0)
        ups = await fleet.demo("upstream-streamed", args.token_delay_ms)
        a = f"http://127.0.0.1:{up.port}/v1"
        b = f"http://127.0.0.1:{ups.port}/v1"
        from noop_plugins import chain as noop_chain

        targets: dict[str, Target] = {"direct": Target("direct", a, b, [])}
        ready = tmp / "ready-baseline.json"
        cmd = [PY, str(HERE / "baseline_proxy.py"), "--upstream", a, "--route", f"/s/v1/={b}", "--port", "0", "--ready-file", str(ready)]
        if profile_dir is not None:
            cmd += ["--profile", str(profile_dir / "baseline.prof")]
        base = await fleet.with_ready_file("baseline", cmd, ready)
        targets["baseline"] = Target("baseline", f"http://127.0.0.1:{base.port}/v1", f"http://127.0.0.1:{base.port}/s/v1", [base.pid])
        for name, chain in (("sluice-empty", []), ("sluice-10noop", noop_chain())):
            cfg = sluice_config(tmp, name, a, b, chain)
            ready = tmp / f"ready-{name}.json"
            if chain or profile_dir is not None:
                cmd = [PY, str(HERE / "noop_plugins.py"), "-c", str(cfg), "--ready-file", str(ready)]
                if profile_dir is not None:
                    cmd += ["--profile", str(profile_dir / f"{name}.prof")]
            else:
                cmd = [PY, "-m", "proxy.cli", "serve", "-c", str(cfg), "--ready-file", str(ready)]  # the real CLI
            p = await fleet.with_ready_file(name, cmd, ready)
            targets[name] = Target(name, f"http://127.0.0.1:{p.port}/v1", f"http://127.0.0.1:{p.port}/s/v1", [p.pid])
        yield targets
    finally:
        await fleet.stop_all()


async def loadgen(target: Target, *, stream: bool, mode: str, duration: float, warmup: float, concurrency: int = 32, rate: float = 0.0, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [PY, str(HERE / "loadgen.py"), "--url", target.stream_url if stream else target.url, "--mode", mode,
           "--duration", str(duration), "--warmup", str(warmup)]
    cmd += ["--concurrency", str(concurrency)] if mode == "closed" else ["--rate", str(rate)]
    if stream:
        cmd.append("--stream")
    for pid in target.pids:
        cmd += ["--pid", str(pid)]
    cmd += extra or []
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=duration + warmup + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed for {target.name}: {err.decode()[-2000:]}")
    return json.loads(out)


async def loadgen_together(ts: list[Target], *, stream: bool, rate: float, duration: float, warmup: float, tries: int = 3) -> tuple[dict[str, Any], int]:
    """One open-loop load on all targets at once; retried when the offered load was not delivered.

    A window in which some target completed under 90% of its arrivals, or saw errors,
    measured a stalled machine rather than the proxies: it is run again (at most
    ``tries`` times; the last one is kept, and flagged by its attempt count).
    """
    cmd = [PY, str(HERE / "loadgen.py"), "--mode", "open", "--rate", str(rate), "--duration", str(duration), "--warmup", str(warmup)]
    if any(t.name == "direct" for t in ts):
        cmd += ["--reference", "direct"]  # each proxied request against the direct request of its arrival cycle
    if stream:
        cmd.append("--stream")
    for t in ts:
        cmd += ["--target", f"{t.name}={t.stream_url if stream else t.url}"]
        for pid in t.pids:
            cmd += ["--target-pid", f"{t.name}={pid}"]
    for attempt in range(1, tries + 1):
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=duration + warmup + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
        res = json.loads(out)["targets"]
        if all(r["completed"] >= 0.9 * rate * duration and not r["error_count"] for r in res.values()):
            break
        print(f"  open loop not delivered ({ {k: r['completed'] for k, r in res.items()} } of {rate * duration:.0f}), again", file=sys.stderr, flush=True)
    return res, attempt


def med(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 3) if vals else None


def spread(xs: list[float | None]) -> list[float] | None:
    vals = [x for x in xs if x is not None]
    return [round(min(vals), 3), round(max(vals), 3)] if vals else None


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


async def sanity_check(targets: dict[str, Target]) -> None:
    """Every target gives the direct path's answer (text, stream events, usage) before anything is timed."""
    import aiohttp
    import orjson

    body = {"model": "sluice-demo", "messages": [{"role": "user", "content": "check the sluice gate before the boats"}]}
    want: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for name in TARGETS:
            t = targets[name]
            async with http.post(t.url + "/chat/completions", json=body) as r:
                got = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{name}: buffered answer {r.status}: {got[:300]!r}")
                obj = orjson.loads(got)
                buffered = (obj["choices"][0]["message"]["content"], obj["usage"]["completion_tokens"])
            async with http.post(t.stream_url + "/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                raw = await r.read()
                if r.status != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
                    raise RuntimeError(f"{name}: streamed answer {r.status} {r.headers.get('content-type')}")
            events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
            chunks = [orjson.loads(e) for e in events if e != "[DONE]"]
            text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
            streamed = (text, len(events), events[-1], chunks[-1].get("usage", {}).get("completion_tokens"))
            if name == "direct":
                want = {"buffered": buffered, "streamed": streamed}
            elif (buffered, streamed) != (want["buffered"], want["streamed"]):
                raise RuntimeError(f"{name} answers differently from the direct path: {buffered} {streamed} != {want}")


async def calibrate_rate(targets: dict[str, Target], args: argparse.Namespace) -> float:
    """A moderate open-loop rate per target: all targets together offer ``--rate-fraction`` of what the slowest proxy sustains."""
    best = []
    for name in PROXIES:
        r = await loadgen(targets[name], stream=False, mode="closed", duration=args.duration / 2, warmup=0.2, concurrency=args.concurrency)
        best.append(r["throughput_rps"])
    # all targets run their open loops at once: split the fraction between them
    rate = max(10.0, round(min(best) * args.rate_fraction / len(TARGETS) / 10) * 10)
    return rate


async def one_round(targets: dict[str, Target], rnd: int, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """One round: each target alone in a closed loop (the order rotating), then the shared open loops."""
    n = args.rounds * args.sets
    order = list(TARGETS[rnd % len(TARGETS):] + TARGETS[: rnd % len(TARGETS)])
    this: dict[str, Any] = {"order": order}
    for name in order:
        r = await loadgen(targets[name], stream=False, mode="closed", duration=args.duration, warmup=args.warmup, concurrency=args.concurrency)
        this[f"closed:{name}"] = r
        print(f"round {rnd + 1}/{n} closed {name:14} {_line(r)}", file=sys.stderr, flush=True)
    # open loops: every target at once, same rate, interleaved arrivals, same window
    for phase, stream, phase_rate in (("open", False, rate), ("stream", True, args.stream_rate)):
        multi, attempts = await loadgen_together([targets[name] for name in order], stream=stream, rate=phase_rate,
                                                 duration=args.duration, warmup=args.warmup)
        this[f"{phase}:attempts"] = attempts
        for name in order:
            this[f"{phase}:{name}"] = multi[name]
            print(f"round {rnd + 1}/{n} {phase:6} {name:14} {_line(multi[name])}", file=sys.stderr, flush=True)
    return this


def tally(rows: dict[str, dict[str, list[Any]]], this: dict[str, Any]) -> None:
    """A round's figures and its ratios against the baseline, appended to ``rows`` (per target, per figure)."""

    def put(target: str, key: str, value: Any) -> None:
        rows[target].setdefault(key, []).append(value)

    for name in TARGETS:
        c, o, s = this[f"closed:{name}"], this[f"open:{name}"], this[f"stream:{name}"]
        put(name, "throughput_rps", c["throughput_rps"])
        put(name, "errors", c["error_count"] + o["error_count"] + s["error_count"])
        put(name, "p50_ms", (o["latency_ms"] or {}).get("p50"))
        put(name, "p99_ms", (o["latency_ms"] or {}).get("p99"))
        put(name, "stream_events_per_s", s["events_per_s"])
        put(name, "ttft_p50_ms", (s["ttft_ms"] or {}).get("p50"))
        put(name, "ttft_p99_ms", (s["ttft_ms"] or {}).get("p99"))
        if name != "direct":
            d = this["open:direct"]["latency_ms"] or {}
            ol = o["latency_ms"] or {}
            put(name, "added_p50_ms", _sub(ol.get("p50"), d.get("p50")))
            put(name, "added_p99_ms", _sub(ol.get("p99"), d.get("p99")))
            paired = o.get("added_paired_ms") or {}
            put(name, "added_p50_paired_ms", paired.get("p50"))
            put(name, "added_p99_paired_ms", paired.get("p99"))
            dt = this["stream:direct"]["ttft_ms"] or {}
            put(name, "added_ttft_p50_ms", _sub((s["ttft_ms"] or {}).get("p50"), dt.get("p50")))
            put(name, "cpu_us_per_request", c["proxy"]["cpu_us_per_request"])
            put(name, "cpu_us_per_request_open", o["proxy"]["cpu_us_per_request"])
            put(name, "cpu_us_per_event", s["proxy"]["cpu_us_per_event"])
            put(name, "cpu_util_closed", c["proxy"]["cpu_util"])
            put(name, "peak_rss_kb", s["proxy"]["peak_rss_kb"])
    for name in ("sluice-empty", "sluice-10noop"):
        b = this["closed:baseline"]
        c = this[f"closed:{name}"]
        put(name, "throughput_vs_baseline", _div(c["throughput_rps"], b["throughput_rps"]))
        put(name, "cpu_per_request_vs_baseline", _div(c["proxy"]["cpu_us_per_request"], b["proxy"]["cpu_us_per_request"]))
        put(name, "cpu_per_request_open_vs_baseline", _div(this[f"open:{name}"]["proxy"]["cpu_us_per_request"], this["open:baseline"]["proxy"]["cpu_us_per_request"]))
        put(name, "cpu_per_event_vs_baseline", _div(this[f"stream:{name}"]["proxy"]["cpu_us_per_event"], this["stream:baseline"]["proxy"]["cpu_us_per_event"]))
        for q in ("p50", "p99"):
            for kind in ("", "_paired"):
                put(name, f"added_{q}{kind}_vs_baseline",
                    _added_ratio(rows[name][f"added_{q}{kind}_ms"][-1], rows["baseline"][f"added_{q}{kind}_ms"][-1]))
    e, n = this["closed:sluice-empty"], this["closed:sluice-10noop"]
    put("sluice-10noop", "noop_cpu_us_per_request", _sub(n["proxy"]["cpu_us_per_request"], e["proxy"]["cpu_us_per_request"]))
    put("sluice-10noop", "noop_cpu_us_per_request_open", _sub(this["open:sluice-10noop"]["proxy"]["cpu_us_per_request"], this["open:sluice-empty"]["proxy"]["cpu_us_per_request"]))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from loadgen import memory_kb, process_tree  # benchmarks/ is on the path once main() ran

    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-core-"))
    t_start = time.time()
    commit = _git_commit()  # the processes load the code now; later commits are not what ran
    load_before = loadavg()
    rows: dict[str, dict[str, list[Any]]] = {t: {} for t in TARGETS}
    rate = args.rate
    raw_rounds: list[dict[str, Any]] = []
    final_rss: dict[str, Any] = {}
    # A server process keeps a CPU and latency offset of its own for its life (its address layout, its
    # dicts' hash seed): with one process per target, every round of a run shares the same draw. Each set
    # starts every target afresh, so --sets N samples that offset N times instead of fixing it per run.
    for set_no in range(args.sets):
        async with start_targets(tmp / f"set{set_no}", args) as targets:
            await sanity_check(targets)
            # warm every target's connections and code paths, both answer kinds
            warm = 0.5 if args.quick else 1.0
            for name in TARGETS:
                await loadgen(targets[name], stream=False, mode="closed", duration=warm, warmup=0.2, concurrency=8)
                await loadgen(targets[name], stream=True, mode="closed", duration=warm, warmup=0.2, concurrency=4)
            if rate is None:
                rate = await calibrate_rate(targets, args)  # once: every set runs at the same offered load
            for rnd in range(set_no * args.rounds, (set_no + 1) * args.rounds):
                this = await one_round(targets, rnd, args, rate)
                this["set"] = set_no
                raw_rounds.append(this)
                tally(rows, this)
            final_rss = {name: memory_kb(process_tree(targets[name].pids)) for name in PROXIES}  # the last set's
    chain = await chain_cost(2000 if args.quick else 10000, rounds=3 if args.quick else 5)
    summary = {name: {k: med(v) for k, v in cols.items()} for name, cols in rows.items()}
    spreads = {name: {k: spread(v) for k, v in cols.items() if k in ("throughput_rps", "added_p50_ms", "added_p99_ms", "added_p99_paired_ms", "cpu_us_per_request", "cpu_us_per_request_open", "cpu_us_per_event")} for name, cols in rows.items()}
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": loadavg()},
        "commit": commit,
        "settings": {k: getattr(args, k) for k in ("rounds", "sets", "duration", "warmup", "concurrency", "stream_rate", "token_delay_ms")} | {"open_rate_rps": rate},
        "summary": summary,
        "spread_over_rounds": spreads,
        "final_rss_kb": final_rss,
        "chain_alone": chain,
        "targets": verdicts(summary, chain),
        "rounds": raw_rounds,
    }
    return result


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def _added_ratio(a: float | None, b: float | None) -> float | None:
    """A target's added latency over the baseline's; none when the baseline's is not positive
    (the direct path's percentile was the higher in that round: no ratio means anything)."""
    return None if a is None or b is None or b <= 0 else round(a / b, 4)


def _line(r: dict[str, Any]) -> str:
    lat = r["latency_ms"] or {}
    p = r.get("proxy") or {}
    s = f"rps={r['throughput_rps']:8.1f} p50={lat.get('p50', 0):7.2f}ms p99={lat.get('p99', 0):7.2f}ms err={r['error_count']}"
    if p:
        s += f" cpu/req={p['cpu_us_per_request']}us"
        if p.get("cpu_us_per_event"):
            s += f" cpu/ev={p['cpu_us_per_event']}us"
    return s


def verdicts(s: dict[str, dict[str, float | None]], chain: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, against the baseline of the same run."""
    e, n = s["sluice-empty"], s["sluice-10noop"]

    def check(value: float | None, limit: float, le: bool = True) -> dict[str, Any]:
        ok = None if value is None else (value <= limit if le else value >= limit)
        return {"value": value, "limit": limit, "ok": ok}

    return {
        "empty: added p50 latency <= 1.10x baseline": check(e.get("added_p50_vs_baseline"), 1.10),
        "empty: added p99 latency <= 1.10x baseline": check(e.get("added_p99_vs_baseline"), 1.10),
        "empty: added latency request by request, p50 <= 1.10x baseline": check(e.get("added_p50_paired_vs_baseline"), 1.10),
        "empty: added latency request by request, p99 <= 1.10x baseline": check(e.get("added_p99_paired_vs_baseline"), 1.10),
        "empty: CPU per request, same offered load (open loop) <= 1.10x baseline": check(e.get("cpu_per_request_open_vs_baseline"), 1.10),
        "empty: CPU per request, saturated (closed loop) <= 1.10x baseline": check(e.get("cpu_per_request_vs_baseline"), 1.10),
        "empty: throughput >= 0.90x baseline": check(e.get("throughput_vs_baseline"), 0.90, le=False),
        "empty: stream CPU per event <= 1.00x baseline": check(e.get("cpu_per_event_vs_baseline"), 1.00),
        "10 no-op plugins: added CPU per request, same offered load < 30 us": check(n.get("noop_cpu_us_per_request_open"), 30.0),
        "10 no-op plugins: added CPU per request, saturated < 30 us": check(n.get("noop_cpu_us_per_request"), 30.0),
        "10 no-op plugins: chain phases alone, in-process < 30 us": check(chain["added_us_per_request_10"], 30.0),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    st = res["settings"]
    lines = [
        f"Run {res['when']} UTC, commit {res['commit']}, {res['machine']['cpus']} CPUs, Python {res['machine']['python']}, "
        f"load average {res['machine']['loadavg_before']} before / {res['machine']['loadavg_after']} after, {res['seconds']:.0f} s. "
        f"{st.get('sets', 1)} set(s) of fresh processes x {st['rounds']} interleaved rounds of {st['duration']} s per measurement (medians; [min, max] over rounds where shown); "
        f"closed loop {st['concurrency']} workers; open loop {st['open_rate_rps']:.0f} req/s; streams open loop {st['stream_rate']:.0f}/s, "
        f"{st['token_delay_ms']} ms per token upstream.",
        "",
        "| target | throughput req/s (saturated) | added p50 ms | added p99 ms | added p99 ms, request by request | CPU µs/req (open loop) | CPU µs/req (saturated) | CPU µs/stream event | TTFT p50 ms | peak RSS MiB (end of run) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sp = res["spread_over_rounds"]

    def f(v: Any, nd: int = 1) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    def rng(name: str, key: str, nd: int = 1) -> str:
        r = sp.get(name, {}).get(key)
        return f" [{f(r[0], nd)}, {f(r[1], nd)}]" if r else ""

    for name in TARGETS:
        r = s[name]
        rss = res["final_rss_kb"].get(name, {}).get("peak_rss_kb")
        lines.append(
            f"| {name} | {f(r.get('throughput_rps'), 0)}{rng(name, 'throughput_rps', 0)} | {f(r.get('added_p50_ms'), 2)}{rng(name, 'added_p50_ms', 2)} "
            f"| {f(r.get('added_p99_ms'), 2)}{rng(name, 'added_p99_ms', 2)} | {f(r.get('added_p99_paired_ms'), 2)}{rng(name, 'added_p99_paired_ms', 2)} "
            f"| {f(r.get('cpu_us_per_request_open'), 0)}{rng(name, 'cpu_us_per_request_open', 0)} "
            f"| {f(r.get('cpu_us_per_request'), 0)}{rng(name, 'cpu_us_per_request', 0)} | {f(r.get('cpu_us_per_event'), 1)}{rng(name, 'cpu_us_per_event', 1)} "
            f"| {f(r.get('ttft_p50_ms'), 2)} | {f(rss / 1024 if rss else None, 1)} | {f(r.get('errors'), 0)} |"
        )
    lines += ["", "| target (issue 2) | measured | limit | met |", "|---|---|---|---|"]
    for k, v in res["targets"].items():
        met = {True: "yes", False: "**no**", None: "n/a"}[v["ok"]]
        lines.append(f"| {k} | {f(v['value'], 3)} | {v['limit']} | {met} |")
    n = s["sluice-10noop"]
    lines += [
        "",
        f"10 no-op plugins vs empty chain: {f(n.get('noop_cpu_us_per_request_open'), 1)} µs CPU/request at the same offered load, "
        f"{f(n.get('noop_cpu_us_per_request'), 1)} µs saturated; "
        f"stream CPU per event {f(n.get('cpu_per_event_vs_baseline'), 2)}x baseline (on_chunk makes the route parse events).",
        "",
        f"Chain phases alone, in-process (run_request + run_response + run_done per request, ChunkPipeline.push per event): "
        + ", ".join(f"{k}: {v} µs/request" for k, v in res["chain_alone"]["us_per_request"].items())
        + "; " + ", ".join(f"{k}: {v} µs/event" for k, v in res["chain_alone"]["us_per_event"].items()) + ".",
    ]
    return "\n".join(lines)


# -- what the ten no-op plugins cost, part by part ------------------------------------------


async def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Sluice empty vs ten no-op plugins with all four hooks vs the same ten with on_request/on_response only.

    Same method as the open loops of ``measure`` (all targets at once, same rate), so
    the differences split the ten plugins' cost: the chain dispatch of the request and
    response hooks; what declaring ``on_done`` adds (the background queue and its
    worker); what declaring ``on_chunk`` adds to streams (parsing into events, the
    chunk pipeline).
    """
    from noop_plugins import chain as noop_chain

    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-breakdown-"))
    fleet = Fleet(tmp)
    commit = _git_commit()
    variants = {"empty": [], "10noop-all-hooks": noop_chain(), "10noop-request-response": noop_chain(request_response_only=True)}
    rows: dict[str, list[float]] = {}
    try:
        up = await fleet.demo("upstream-buffered", 0)
        ups = await fleet.demo("upstream-streamed", args.token_delay_ms)
        a, b = f"http://127.0.0.1:{up.port}/v1", f"http://127.0.0.1:{ups.port}/v1"
        targets = []
        prof_dir = Path(args.profile_breakdown) if args.profile_breakdown else None
        for name, chain in variants.items():
            cfg = sluice_config(tmp, name, a, b, chain)
            ready = tmp / f"ready-{name}.json"
            cmd = [PY, str(HERE / "noop_plugins.py"), "-c", str(cfg), "--ready-file", str(ready)]
            if prof_dir is not None:
                prof_dir.mkdir(parents=True, exist_ok=True)
                cmd += ["--profile", str(prof_dir / f"{name}.prof")]
            p = await fleet.with_ready_file(name, cmd, ready)
            targets.append(Target(name, f"http://127.0.0.1:{p.port}/v1", f"http://127.0.0.1:{p.port}/s/v1", [p.pid]))
        for t in targets:
            await loadgen(t, stream=False, mode="closed", duration=1, warmup=0.2, concurrency=8)
            await loadgen(t, stream=True, mode="closed", duration=1, warmup=0.2, concurrency=4)
        rate = args.rate or 120.0
        if prof_dir is not None:
            # one profiled window of buffered answers on all variants at once, then the per-function difference
            for t in targets:
                (prof_dir / f"{t.name}.prof").unlink(missing_ok=True)
                os.kill(t.pids[0], signal.SIGUSR1)
            buf, _ = await loadgen_together(targets, stream=False, rate=rate, duration=args.duration * 2, warmup=0, tries=1)
            for t in targets:
                os.kill(t.pids[0], signal.SIGUSR2)
            for t in targets:
                path = prof_dir / f"{t.name}.prof"
                async with asyncio.timeout(30):
                    while not path.exists():
                        await asyncio.sleep(0.05)  # the child writes the stats file; no event crosses processes
            return {"commit": commit, "profile_diff": profile_diff(prof_dir / "empty.prof", prof_dir / "10noop-request-response.prof", args.profile_top)}
        rounds = args.rounds * args.sets  # one set of processes, as many rounds as a measuring run has in all
        for rnd in range(rounds):
            order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
            buf, _ = await loadgen_together(order, stream=False, rate=rate, duration=args.duration, warmup=args.warmup)
            st, _ = await loadgen_together(order, stream=True, rate=args.stream_rate, duration=args.duration, warmup=args.warmup)
            req = {n: buf[n]["proxy"]["cpu_us_per_request"] for n in variants}
            ev = {n: st[n]["proxy"]["cpu_us_per_event"] for n in variants}
            for key, value in (
                ("buffered: 10 plugins, request/response hooks only (chain dispatch)", req["10noop-request-response"] - req["empty"]),
                ("buffered: declaring on_done too (the on_done queue and worker)", req["10noop-all-hooks"] - req["10noop-request-response"]),
                ("buffered: 10 plugins, all hooks", req["10noop-all-hooks"] - req["empty"]),
                ("stream per event: 10 plugins, request/response hooks only", ev["10noop-request-response"] - ev["empty"]),
                ("stream per event: declaring on_chunk and on_done too (event parsing, chunk pipeline)", ev["10noop-all-hooks"] - ev["10noop-request-response"]),
            ):
                rows.setdefault(key, []).append(round(value, 2))
            print(f"breakdown round {rnd + 1}/{rounds}: CPU/req {req}  CPU/event {ev}", file=sys.stderr, flush=True)
    finally:
        await fleet.stop_all()
    return {"commit": commit, "rate_rps": rate, "stream_rate": args.stream_rate, "rounds": args.rounds * args.sets,
            "median_us": {k: med(v) for k, v in rows.items()}, "per_round_us": rows}


# -- the chain alone ---------------------------------------------------------------


async def chain_cost(n_requests: int, events: int = 34, rounds: int = 5) -> dict[str, Any]:
    """CPU of the chain phases alone, in this process: 0, 1 and 10 no-op plugins.

    The real ``proxy.chain`` functions run over real contexts (built as the testing kit
    builds them), without a server, a network or another process: what the chain costs
    per request (``run_request`` + ``run_response`` + ``run_done``) and per stream event
    (``ChunkPipeline.push``), net of building the context, with nothing else on the
    meter. Medians over ``rounds`` passes, the plugin counts interleaved.
    """
    from noop_plugins import PLUGINS

    from proxy import Event
    from proxy.chain import ChunkPipeline, CompiledRoute, run_done, run_request, run_response
    from proxy.config import RouteConfig
    from proxy.testing import make_context

    rc = RouteConfig.model_validate({"match": {"path": "/v1/"}, "upstream": "demo"})
    body = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hello"}]}
    chunk = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"word "}}]}\n\n'
    routes = {n: CompiledRoute(0, rc, [cls(cls.Config(), None) for cls in PLUGINS[:n]], 1 << 20) for n in (0, 1, 10)}  # type: ignore[arg-type]
    per_req: dict[int, list[float]] = {n: [] for n in routes}
    per_ev: dict[int, list[float]] = {n: [] for n in routes}
    for _ in range(rounds):
        for n, route in routes.items():
            ctxs = [make_context(body) for _ in range(n_requests)]
            t0 = time.process_time()
            for ctx in ctxs:
                await run_request(ctx, route)
                await run_response(ctx, route)
                await run_done(ctx, route)
            per_req[n].append((time.process_time() - t0) / n_requests * 1e6)
            ctx = make_context(body)
            await run_request(ctx, route)
            pipe = ChunkPipeline(ctx, route)
            evs = [Event(raw=chunk) for _ in range(events)]
            m = max(1, n_requests // 10)
            t0 = time.process_time()
            for _ in range(m):
                for ev in evs:
                    await pipe.push((ev,))
            per_ev[n].append((time.process_time() - t0) / (m * events) * 1e6)
    req = {n: statistics.median(v) for n, v in per_req.items()}
    ev = {n: statistics.median(v) for n, v in per_ev.items()}
    return {
        "requests_per_pass": n_requests,
        "us_per_request": {f"{n} plugins": round(v, 2) for n, v in req.items()},
        "us_per_event": {f"{n} plugins": round(v, 3) for n, v in ev.items()},
        "added_us_per_request_10": round(req[10] - req[0], 2),
        "added_us_per_event_10": round(ev[10] - ev[0], 3),
    }


# -- profiling -----------------------------------------------------------------


async def profile(args: argparse.Namespace) -> str:
    """Profile the baseline and both Sluice targets (thread CPU, between SIGUSR1 and SIGUSR2).

    Buffered and streamed loads are profiled separately; figures are per request,
    the request count taken from the profile itself.
    """
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-prof-"))
    report = []
    async with start_targets(tmp, args, profile_dir=out_dir) as targets:
        for name in PROXIES:
            t = targets[name]
            pid = t.pids[0]
            live = out_dir / f"{name}.prof"
            for stream in (False, True):
                conc = args.stream_concurrency if stream else args.concurrency
                await loadgen(t, stream=stream, mode="closed", duration=1, warmup=0.3, concurrency=conc)
                live.unlink(missing_ok=True)
                os.kill(pid, signal.SIGUSR1)
                r = await loadgen(t, stream=stream, mode="closed", duration=args.duration, warmup=0, concurrency=conc)
                os.kill(pid, signal.SIGUSR2)
                async with asyncio.timeout(30):
                    while not live.exists():
                        await asyncio.sleep(0.05)  # the child writes the stats file; no event crosses processes
                kind = "stream" if stream else "buffered"
                path = out_dir / f"{name}-{kind}.prof"
                live.replace(path)
                report.append(hot_spots(path, f"{name} {kind} ({r['throughput_rps']} req/s, {r['events_per_s']} events/s)", args.profile_top))
    return "\n\n".join(report)


def _area(rel: str) -> str:
    if rel.startswith(("proxy/", "benchmarks/", "plugins/")):
        return rel.split(":")[0]
    for lib in ("aiohttp/web", "aiohttp/client", "aiohttp/http", "aiohttp/streams", "aiohttp/", "multidict", "yarl", "asyncio/"):
        if lib in rel:
            return lib.rstrip("/") + "*"
    return "builtins/other" if rel.startswith("~") else rel.rsplit("/", 1)[-1].split(":")[0]


def _requests_in(stats: dict) -> int:
    """Requests served in a profile: ``BaseRequest.__init__`` calls (the first ``__init__`` of aiohttp's web_request.py)."""
    inits = {line: v[1] for (file, line, fn), v in stats.items() if file.endswith("aiohttp/web_request.py") and fn == "__init__"}
    return max(inits[min(inits)] if inits else 0, 1)


def profile_diff(base: Path, other: Path, top: int) -> list[str]:
    """Functions whose self CPU per request grew most from ``base`` to ``other`` (same load, same window)."""
    def per_req(path: Path) -> tuple[dict[str, float], dict[str, float]]:
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        n = _requests_in(stats)
        selfs: dict[str, float] = {}
        calls: dict[str, float] = {}
        for (f, l, fn), v in stats.items():
            k = f"{f.replace(str(ROOT) + '/', '').replace(sys.prefix + '/', '')}:{l}:{fn}"
            selfs[k] = v[2] / n * 1e6
            calls[k] = v[1] / n
        return selfs, calls
    a, ca = per_req(base)
    b, cb = per_req(other)
    keys = set(a) | set(b)
    total = sum(b.values()) - sum(a.values())
    rows = sorted(keys, key=lambda k: b.get(k, 0) - a.get(k, 0), reverse=True)[:top]
    out = [f"total self CPU difference: {total:+.1f} us/request (profiled)", f"{'diff us/req':>11} {'calls/req a->b':>16}  function"]
    for k in rows:
        out.append(f"{b.get(k, 0) - a.get(k, 0):11.2f} {ca.get(k, 0):7.2f}->{cb.get(k, 0):<7.2f}  {k}")
    return out


def hot_spots(path: Path, title: str, top: int) -> str:
    """Self CPU per request by function and by area; one request = one ``BaseRequest.__init__`` call.

    cProfile counts every resumption of a coroutine as a call, so the handler's own
    count is not the number of requests; aiohttp builds one ``BaseRequest`` per
    request in Sluice (low-level server) and the baseline (an ``Application``,
    whose ``Request.__init__`` calls it) alike.
    """
    st = pstats.Stats(str(path))
    stats = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    n = _requests_in(stats)
    lines = [f"== {title}: {path}", f"{n} requests; {total / n * 1e6:.1f} us CPU/request on the loop thread, profiler overhead included "
             "(use the shares, not the absolute figures)", "", f"{'self us/req':>12} {'share':>6}  area"]
    areas: dict[str, float] = {}
    for (file, line, fn), v in stats.items():
        rel = file.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        key = _area(f"{rel}:{line}")
        areas[key] = areas.get(key, 0.0) + v[2]
    for key, tt in sorted(areas.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"{tt / n * 1e6:12.2f} {tt / total:6.1%}  {key}")
    lines += ["", f"{'self us/req':>12} {'cum us/req':>11} {'calls/req':>10}  function"]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, fn), (_cc, nc, tt, ct, _cl) in rows:
        rel = file.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        lines.append(f"{tt / n * 1e6:12.2f} {ct / n * 1e6:11.2f} {nc / n:10.2f}  {rel}:{line}:{fn}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Core benchmark: direct vs minimal proxy vs Sluice (empty chain, 10 no-op plugins).")
    p.add_argument("--quick", action="store_true", help="one short round (about a minute): a smoke run, not figures to record")
    p.add_argument("--rounds", type=int, default=3, help="rounds per set")
    p.add_argument("--sets", type=int, default=3,
                   help="start every target afresh this many times, --rounds each, rounds pooled (a process keeps an offset of its own for its life: sets sample it)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per load")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers (saturation)")
    p.add_argument("--stream-rate", type=float, default=40.0, help="streams per second (open loop), the same for every target")
    p.add_argument("--stream-concurrency", type=int, default=8, help="closed-loop streaming workers (profiling and warm-up)")
    p.add_argument("--token-delay-ms", type=float, default=2.0, help="per-token delay of the streaming upstream")
    p.add_argument("--rate", type=float, default=None, help="open-loop rate; default: --rate-fraction of the slowest proxy's saturation")
    p.add_argument("--rate-fraction", type=float, default=0.25,
                   help="open-loop load of all targets together, as a fraction of the slowest proxy's saturation (measured alone). "
                        "0.25 leaves the machine room: at 0.5 the four open loops, their two upstreams and the load generator "
                        "keep this 2-core machine nearly busy, and latency tails measure its stalls more than the proxies")
    p.add_argument("--json", dest="json_out", default=None, help="write the whole result here")
    p.add_argument("--profile", default=None, metavar="DIR", help="instead of measuring, profile the Sluice targets into DIR and print hot spots")
    p.add_argument("--profile-top", type=int, default=40)
    p.add_argument("--profile-breakdown", default=None, metavar="DIR", help="with --breakdown: profile the variants together and diff empty vs request/response-only")
    p.add_argument("--breakdown", action="store_true", help="instead of measuring, split the ten no-op plugins' cost (on_done queue, stream parsing, dispatch)")
    args = p.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive (leave it out to calibrate)")
    if args.rounds < 1 or args.sets < 1:
        p.error("--rounds and --sets must be at least 1")
    if args.quick:
        args.rounds, args.sets, args.duration, args.warmup = 1, 1, 2.0, 0.3
    sys.path.insert(0, str(HERE))
    if args.profile:
        print(asyncio.run(profile(args)))
        return 0
    if args.breakdown:
        res = asyncio.run(breakdown(args))
        if "profile_diff" in res:
            print("\n".join(res["profile_diff"]))
            return 0
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=2))
        print(f"Ten no-op plugins, part by part (commit {res['commit']}, {res['rounds']} rounds, open loop {res['rate_rps']:.0f} req/s "
              f"and {res['stream_rate']:.0f} streams/s on all variants at once); µs of Sluice CPU, median [per round]:\n")
        for k, v in res["median_us"].items():
            print(f"- {k}: {v} {res['per_round_us'][k]}")
        return 0
    res = asyncio.run(measure(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
