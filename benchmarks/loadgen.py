"""A load generator for OpenAI-compatible chat completions, with the proxy's CPU and RSS.

Run it as its own process (the runner does), so its CPU never lands in the proxy's
accounting and the three parties (client, proxy, model server) do not share a loop::

    python benchmarks/loadgen.py --url http://127.0.0.1:4000/v1 --mode closed --concurrency 32 --duration 5
    python benchmarks/loadgen.py --url http://127.0.0.1:4000/v1 --mode open --rate 200 --stream --pid 1234
    python benchmarks/loadgen.py --mode open --rate 100 --target a=http://127.0.0.1:4000/v1 \
        --target b=http://127.0.0.1:4100/v1 --target-pid a=1234 --target-pid b=5678

Modes:

* ``closed``: ``--concurrency`` workers, each sending its next request when the last
  one finished: the throughput at saturation.
* ``open``: requests arrive at ``--rate`` per second whatever happens to earlier ones
  (constant spacing, or ``--poisson``); latency is measured from the *scheduled* start,
  so a stalled server cannot hide its queue (no coordinated omission).

Several ``--target NAME=URL`` (open loop only) are loaded at the same time, each at
``--rate``, their arrivals interleaved evenly: every target then sees the same moments
of a noisy machine, which sequential runs cannot promise. The order within each cycle of
arrivals is shuffled anew (``--fixed-order`` keeps the order of the ``--target`` flags):
with a fixed order a target's latency depends on which neighbour's request arrived just
before its own and is still being served (a request right behind a cheap direct one
measured 0.3 ms more at p50 than the same proxy placed behind another proxy), which
would be billed to the target. The report has one entry per target under ``"targets"``.

Measurement window: the load runs ``--warmup`` seconds first (connections, caches,
JIT-free but allocator-warm code paths), then ``--duration`` seconds are measured.
Throughput and CPU per request count the requests completed inside the window;
latency and time to first token come from the requests started inside it (they are
awaited after the window, up to ``--timeout``).

With ``--pid`` (repeatable) the CPU seconds (scheduler run time of every thread, from
``/proc``) of those processes *and all their descendants* are read at both ends of the window, and their
resident set (current and peak) at the end. Linux only, like the rest of the benches.

Output: one JSON object on stdout (``--pretty`` to indent it).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

CLK_TCK = os.sysconf("SC_CLK_TCK")
WORDS = (
    "the river carries light cargo past old mills while the keeper of the sluice counts "
    "boats and writes their names in a ledger kept dry under the stone arch"
).split()


# -- /proc accounting ------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name is in parentheses and may hold spaces: split after its closing one
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(roots: list[int]) -> list[int]:
    """The given PIDs and every live descendant of theirs."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(name))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _schedstat_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of every live thread of ``pid`` (/proc/PID/task/TID/schedstat)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds these processes (all their threads) have run.

    Nanosecond scheduler accounting (schedstat) where the kernel offers it: the
    tick-based utime + stime of /proc/PID/stat moves in 10 ms steps, too coarse
    for a few seconds of a few hundred microseconds per request. The fallback is
    that tick-based figure.
    """
    total = 0.0
    for pid in pids:
        ns = _schedstat_ns(pid) if _HAVE_SCHEDSTAT else None
        if ns is not None:
            total += ns / 1e9
            continue
        f = _stat_fields(pid)
        if f is not None:
            total += (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)
    return total


_HAVE_SCHEDSTAT = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat")


def memory_kb(pids: list[int]) -> dict[str, int]:
    """Summed current (VmRSS) and peak (VmHWM) resident set of these processes, in KiB."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return {"rss_kb": rss, "peak_rss_kb": hwm}


# -- statistics ------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an unsorted list."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    return {
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(sum(ms) / len(ms), 3),
        "max": round(max(ms), 3),
    }


# -- the load ----------------------------------------------------------------------


@dataclass
class Sample:
    started: float
    ended: float
    latency: float
    ok: bool
    error: str | None = None
    ttft: float | None = None
    events: int = 0
    #: open loop: the arrival cycle (one arrival per target each), for pairing targets' requests
    cycle: int = -1


@dataclass
class Window:
    start: float = math.inf
    end: float = math.inf
    samples: list[Sample] = field(default_factory=list)


def make_body(prompt_words: int, max_tokens: int | None, stream: bool, include_usage: bool, seed: int) -> bytes:
    rnd = random.Random(seed)
    prompt = " ".join(rnd.choice(WORDS) for _ in range(prompt_words))
    body: dict[str, Any] = {"model": "sluice-demo", "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _first_content(chunk: bytes) -> bool:
    """Whether this network chunk carries a token (not only the empty role delta)."""
    i = chunk.find(b'"content":"')
    while i != -1:
        if chunk[i + 11 : i + 12] != b'"':
            return True
        i = chunk.find(b'"content":"', i + 11)
    return False


@dataclass
class Target:
    """One URL under load, with the processes whose CPU and memory its requests cost."""

    name: str
    url: str
    roots: list[int]
    window: Window = field(default_factory=Window)
    pids: list[int] = field(default_factory=list)
    dropped: int = 0
    #: requests sent, warm-up and after the window included
    sent: int = 0
    #: most requests outstanding at once (a burst after a stall shows here)
    max_inflight: int = 0
    cpu0: float = 0.0
    cpu1: float = 0.0
    mem: dict[str, int] = field(default_factory=dict)


class Load:
    def __init__(self, args: argparse.Namespace, targets: list[Target]) -> None:
        self.args = args
        self.targets = targets
        self.bodies = {
            False: make_body(args.prompt_words, args.max_tokens, False, args.include_usage, args.seed),
            True: make_body(args.prompt_words, args.max_tokens, True, args.include_usage, args.seed),
        }
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {args.api_key}"}
        self.stopping = False
        self.rnd = random.Random(args.seed)
        self.timeout = aiohttp.ClientTimeout(total=args.timeout)

    def pick_stream(self) -> bool:
        f = self.args.stream_fraction
        if f is None:
            return self.args.stream
        return self.rnd.random() < f

    async def one(self, http: aiohttp.ClientSession, target: Target, scheduled: float | None = None, cycle: int = -1) -> None:
        stream = self.pick_stream()
        target.sent += 1
        t0 = time.perf_counter()
        start = scheduled if scheduled is not None else t0
        ttft = None
        events = 0
        err = None
        try:
            async with http.post(target.url, data=self.bodies[stream], headers=self.headers, timeout=self.timeout) as r:
                if stream and r.status == 200:
                    done = False
                    tail = b""
                    async for chunk in r.content.iter_any():
                        if ttft is None and _first_content(chunk):
                            ttft = time.perf_counter() - start
                        events += chunk.count(b"data:")
                        # [DONE] can straddle two reads
                        if b"[DONE]" in tail[-8:] + chunk:
                            done = True
                        tail = chunk[-8:]
                    if not done:
                        err = "incomplete_stream"
                    else:
                        events -= 1  # the [DONE] sentinel is not an event a client uses
                else:
                    await r.read()
                    if r.status != 200:
                        err = f"http_{r.status}"
        except asyncio.TimeoutError:
            err = "timeout"
        except aiohttp.ClientError as e:
            err = type(e).__name__
        t1 = time.perf_counter()
        w = target.window
        if w.start <= start < w.end:
            w.samples.append(Sample(start, t1, t1 - start, err is None, err, ttft, events, cycle))
        elif w.start <= t1 < w.end:
            # completed in the window (counts for throughput and CPU) but started before it
            w.samples.append(Sample(start, t1, math.nan, err is None, err, None, events))

    async def closed(self, sessions: dict[str, aiohttp.ClientSession]) -> None:
        (target,) = self.targets
        http = sessions[target.name]

        async def worker() -> None:
            while not self.stopping:
                await self.one(http, target)

        await self._run([asyncio.ensure_future(worker()) for _ in range(self.args.concurrency)])

    async def open(self, sessions: dict[str, aiohttp.ClientSession]) -> None:
        """Arrivals at ``rate`` per target; with several targets their arrivals interleave evenly."""
        inflight: dict[str, set[asyncio.Task[None]]] = {t.name: set() for t in self.targets}
        n = len(self.targets)

        async def scheduler() -> None:
            loop = asyncio.get_running_loop()
            t_next = time.perf_counter()
            total_rate = self.args.rate * n
            i = 0
            cycle = list(self.targets)
            while not self.stopping:
                now = time.perf_counter()
                if t_next > now:
                    await asyncio.sleep(t_next - now)  # the arrival schedule is the point of an open loop
                    continue
                if i % n == 0 and n > 1 and not self.args.fixed_order:
                    self.rnd.shuffle(cycle)  # every target behind every neighbour equally often
                target = cycle[i % n]
                pending = inflight[target.name]
                if len(pending) >= self.args.max_inflight:
                    if target.window.start <= t_next < target.window.end:
                        target.dropped += 1  # this far behind: count it instead of piling up more
                else:
                    t = loop.create_task(self.one(sessions[target.name], target, scheduled=t_next, cycle=i // n))
                    pending.add(t)
                    if len(pending) > target.max_inflight:
                        target.max_inflight = len(pending)
                    t.add_done_callback(pending.discard)
                i += 1
                t_next += self.rnd.expovariate(total_rate) if self.args.poisson else 1.0 / total_rate

        sched = asyncio.ensure_future(scheduler())
        await self._run([sched], inflight)

    async def _run(self, tasks: list[asyncio.Future[None]], inflight: dict[str, set[asyncio.Task[None]]] | None = None) -> None:
        a = self.args
        await asyncio.sleep(a.warmup)
        for t in self.targets:
            t.pids = process_tree(t.roots) if t.roots else []
        # every target's window is the same span of time, so all see the same machine
        for t in self.targets:
            t.cpu0 = cpu_seconds(t.pids)
        self.client_cpu0 = time.process_time()
        start = time.perf_counter()
        for t in self.targets:
            t.window.start, t.window.end = start, start + a.duration
        await asyncio.sleep(a.duration)
        for t in self.targets:
            t.cpu1 = cpu_seconds(t.pids)
        self.client_cpu1 = time.process_time()
        for t in self.targets:
            t.mem = memory_kb(t.pids)
        self.stopping = True
        # requests started in the window are awaited so their latency is not lost
        pending = set(tasks)
        for s in (inflight or {}).values():
            pending |= s
        if pending:
            _, still = await asyncio.wait(pending, timeout=a.timeout)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    def report_one(self, target: Target) -> dict[str, Any]:
        a = self.args
        w = target.window
        in_window = [s for s in w.samples if w.start <= s.ended < w.end]
        started = [s for s in w.samples if w.start <= s.started < w.end]
        ok_done = [s for s in in_window if s.ok]
        errors: dict[str, int] = {}
        for s in started:
            if s.error:
                errors[s.error] = errors.get(s.error, 0) + 1
        if target.dropped:
            errors["dropped_by_generator"] = target.dropped
        lat = [s.latency for s in _timed(target)]
        ttft = [s.ttft for s in started if s.ok and s.ttft is not None]
        events = sum(s.events for s in ok_done)
        out: dict[str, Any] = {
            "url": target.url,
            "mode": a.mode,
            "stream": a.stream if a.stream_fraction is None else f"fraction {a.stream_fraction}",
            "concurrency": a.concurrency if a.mode == "closed" else None,
            "rate": a.rate if a.mode == "open" else None,
            "duration_s": a.duration,
            "completed": len(ok_done),
            "started": len(started),
            "sent": target.sent,
            "errors": errors,
            "error_count": sum(errors.values()),
            "throughput_rps": round(len(ok_done) / a.duration, 2),
            "latency_ms": summarise(lat),
            "ttft_ms": summarise(ttft),
            "events": events,
            "events_per_s": round(events / a.duration, 1),
            "max_inflight": target.max_inflight if a.mode == "open" else a.concurrency,
        }
        if target.pids:
            cpu = target.cpu1 - target.cpu0
            out["proxy"] = {
                "pids": target.pids,
                "cpu_s": round(cpu, 4),
                "cpu_util": round(cpu / a.duration, 3),
                "cpu_us_per_request": round(cpu / len(ok_done) * 1e6, 2) if ok_done else None,
                "cpu_us_per_event": round(cpu / events * 1e6, 3) if events else None,
                **target.mem,
            }
        return out

    def report(self) -> dict[str, Any]:
        client = {"client_cpu_s": round(self.client_cpu1 - self.client_cpu0, 3)}
        if len(self.targets) == 1 and self.targets[0].name == "-":
            return {**self.report_one(self.targets[0]), **client}
        out = {t.name: self.report_one(t) for t in self.targets}
        ref = self.args.reference
        if ref is not None:  # parse_args made sure it names a target
            base = {s.cycle: s.latency for t in self.targets if t.name == ref for s in _timed(t)}
            for t in self.targets:
                if t.name != ref:
                    diffs = [s.latency - base[s.cycle] for s in _timed(t) if s.cycle in base]
                    out[t.name]["added_paired_ms"] = summarise(diffs)
                    out[t.name]["paired"] = len(diffs)
        return {"targets": out, **client}


def _timed(target: Target) -> list[Sample]:
    """A target's successful requests that started in the window: those whose latency counts."""
    w = target.window
    return [s for s in w.samples if w.start <= s.started < w.end and s.ok and not math.isnan(s.latency)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = [Target("-", args.url.rstrip("/") + "/chat/completions", args.pid)] if args.url else []
    pids: dict[str, list[int]] = {}
    for spec in args.target_pid:
        name, _, pid = spec.partition("=")
        pids.setdefault(name, []).append(int(pid))
    for spec in args.target:
        name, _, url = spec.partition("=")
        targets.append(Target(name, url.rstrip("/") + "/chat/completions", pids.get(name, [])))
    load = Load(args, targets)
    limit = args.concurrency if args.mode == "closed" else args.max_inflight
    sessions = {
        t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit))
        for t in targets
    }
    try:
        if args.mode == "closed":
            await load.closed(sessions)
        else:
            await load.open(sessions)
    finally:
        for http in sessions.values():
            await http.close()
    return load.report()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat-completions load generator (closed or open loop), JSON report on stdout.")
    p.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:4000/v1")
    p.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                   help="open loop: load several base URLs at once, each at --rate, arrivals interleaved (repeatable)")
    p.add_argument("--target-pid", action="append", default=[], metavar="NAME=PID", help="measure this process tree for target NAME")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=32, help="closed loop: concurrent workers")
    p.add_argument("--rate", type=float, default=100.0, help="open loop: arrivals per second (per target)")
    p.add_argument("--fixed-order", action="store_true",
                   help="open loop, several targets: arrivals always in the order of --target (default: shuffled every cycle)")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="open loop, several targets: also report each other target's added latency against NAME request by request "
                        "(each request minus NAME's request of the same arrival cycle), as added_paired_ms")
    p.add_argument("--poisson", action="store_true", help="open loop: exponential gaps instead of constant ones")
    p.add_argument("--max-inflight", type=int, default=512, help="open loop: arrivals beyond this many outstanding (per target) are counted as dropped")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the measured window")
    p.add_argument("--stream", action="store_true", help="streamed requests (SSE)")
    p.add_argument("--stream-fraction", type=float, default=None, help="mix: this fraction of requests is streamed")
    p.add_argument("--no-include-usage", dest="include_usage", action="store_false", help="streams without stream_options.include_usage")
    p.add_argument("--prompt-words", type=int, default=24, help="words in the user message (the demo model echoes them)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--api-key", default="sk-bench", help="sent as a bearer token")
    p.add_argument("--pid", type=int, action="append", default=[], help="measure CPU and RSS of this process tree (repeatable)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--pretty", action="store_true")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="use the default asyncio loop")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.target):
        p.error("give either --url or --target NAME=URL (one or more)")
    if args.reference is not None and args.reference not in [t.partition("=")[0] for t in args.target]:
        p.error("--reference must name one of the --target names (open loop, several targets)")
    if args.target and args.mode == "closed":
        p.error("several targets at once only in open loop: closed loops would compete for the CPU")
    if args.mode == "closed" and args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.mode == "open" and args.rate <= 0:
        p.error("--rate must be positive")
    if args.stream_fraction is not None and not 0 <= args.stream_fraction <= 1:
        p.error("--stream-fraction must be within 0..1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:  # pragma: no cover - the client works on the default loop too
            pass
    report = asyncio.run(run(args))
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 if args.pretty else 0).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
