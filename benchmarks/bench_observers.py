"""The observers together (tracing + metrics + metering + drift, sampling at 100%) against the empty chain.

Measured in one run, many short rounds interleaved so machine noise falls on all:

* CPU per request of the Sluice process, every thread's nanosecond run time from
  ``/proc/<pid>/task/*/schedstat`` (so the exporter thread, the ledger writer thread and
  the drift comparisons in the executor all count, and the loop's thread is reported
  apart), for the empty chain, the observers' "shape" (four no-op plugins with their
  hooks and flags: the core's share) and the four observers together, with their ``on_done``
  in batches (``server.done_batch_ms``, the default) and without (``--each``: also each
  alone). The added CPU is the median over rounds of each round's difference from
  the empty chain, with its quartiles; configurations rotate order every round. Other
  work on a shared machine only adds CPU, so the difference of each configuration's
  quietest round is printed too (``added_from_minimums``). Target: under 100 us per
  request. The tick-based /proc figure is printed as a cross-check.
* Client latency p50 / p99 of both, and their ratio.
* ``--hooks``: each observer's own hooks in-process (``on_request`` + ``on_done`` on a
  finished buffered chat request, garbage collection paused so one plugin's garbage is
  not billed to another), the batching of its encoded spans, and one drift comparison, so
  the plugins' share can be told from the core's and the state writer's.
* ``--insitu``: the same hooks, the chain's phases and each thread, timed with thread CPU
  inside a live ``sluice serve`` under the same traffic (shape and observers, rounds
  interleaved, medians): what the
  hooks cost among everything else a process does, which is about twice the in-process
  figure (caches are cold), and what the core's phases cost around them.

Sluice and the demo upstream run as separate processes (``sluice serve``,
``sluice demo-upstream``); spans go over OTLP/HTTP to a sink in this process that
reads and discards them, so the export path is real. Traffic is 3 buffered : 1 streamed
chat requests at a fixed concurrency.

    .venv/bin/python benchmarks/bench_observers.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_observers.py --each     # and each observer alone
    .venv/bin/python benchmarks/bench_observers.py --against /tmp/other-tree   # before/after, one run
    .venv/bin/python benchmarks/bench_observers.py --sets 3 --rounds 10       # fresh processes 3 times, rounds pooled
    .venv/bin/python benchmarks/bench_observers.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_observers.py --hooks    # the plugins' own hooks, in-process
    .venv/bin/python benchmarks/bench_observers.py --insitu   # per hook, chain phase and thread, in a live server
    .venv/bin/python benchmarks/bench_observers.py --together 150 --rounds 6 --sets 4    # one open loop over all, same seconds
    .venv/bin/python benchmarks/bench_observers.py --together 150 --against /tmp/other-tree   # and before/after in that loop
    .venv/bin/python benchmarks/bench_observers.py --together 150 --pair --sets 4   # only the empty chain and the observers
    .venv/bin/python benchmarks/bench_observers.py --together 150 --pair --pin --sets 4   # and Sluice on a CPU of its own
    .venv/bin/python benchmarks/bench_observers.py --offsets 4 --sets 2   # identical processes: each one's own CPU offset
    .venv/bin/python benchmarks/bench_observers.py --calls    # calls per request on the loop's thread, per configuration
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
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

from pydantic import Field  # noqa: E402

from proxy import Context, Plugin, PluginConfig, hookimpl  # noqa: E402
from plugins.tracing import Tracing  # noqa: E402
from proxy.config import StateConfig  # noqa: E402
from proxy.testing import SluiceProcess, serve_app  # noqa: E402

#: the "shape" Sluice process loads this module for the SHAPE plugins
PLUGIN_ENV = {"SLUICE_PLUGINS": Path(__file__).stem,
              "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = orjson.dumps({"model": "sluice-demo", "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]})
STREAM_BODY = orjson.dumps({"model": "sluice-demo", "stream": True,
                            "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]})


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far (clock ticks; counts exited threads too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU nanoseconds of each live thread of a process, summed by kind (from schedstat).

    Nanosecond run times rather than /proc's 10 ms ticks, and per thread, so the event
    loop can be told from the rest: ``main`` is the loop's thread; Python does not name
    its threads for the OS, so the exporter, the ledger writer and the executor threads
    add up as ``threads``; native threads keep their names (uvloop's ``libuv-worker``).
    """
    out: dict[str, int] = {}
    own = Path(f"/proc/{pid}/comm").read_text().strip()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            comm = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listing and reading
        name = "main" if task.name == str(pid) else "threads" if comm == own else comm
        out[name] = out.get(name, 0) + ns
    return out


def cpu_ns(pid: int) -> tuple[int, dict[str, int]]:
    per = thread_cpu_ns(pid)
    return sum(per.values()), per


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
    async with serve_app(app) as origin:
        yield f"{origin}/v1/traces", received


def config(upstream: str, chain: list[dict[str, Any]], name: str = "") -> dict[str, Any]:
    """The benchmark's Sluice config; a configuration named "... no batch" runs each request's
    on_done right after its answer (``server.done_batch_ms: 0``)."""
    return {
        "server": {"access_log": False, **({"done_batch_ms": 0} if name.endswith("no batch") else {})},
        "logging": {"level": "warning"},
        "upstreams": {"primary": {"url": upstream, "models": ["sluice-demo"]}},
        "prices": {"sluice-demo": {"input": 0.5, "output": 1.5}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "primary", "chain": chain}],
    }


def observers(sink: str) -> list[dict[str, Any]]:
    """The four observers in the recommended order (configs/full.yaml): metering first, whose cost and
    usage estimates the others read."""
    return [
        {"metering": {}},
        {"tracing": {"endpoint": sink, "sample_ratio": 1.0}},
        {"metrics": {}},
        {"drift": {"sample_rate": 1.0}},
    ]


# -- the observers' shape, without their work ------------------------------------------
# Four no-op plugins with the hooks, kinds and flags of the four observers (sync or async as
# theirs are; metrics asks for plugin timings, metering for stream usage and a never-dropped
# on_done, and reads ctx.usage, the core's service). What a chain of them costs over the
# empty chain is the core's share of the observers' cost; what the observers cost over them
# is the plugins' own work. ``--core`` switches the flags one at a time to price each.
SHAPE = [{"bench_shape_metrics": {}}, {"bench_shape_metering": {}}, {"bench_shape_drift": {}}, {"bench_shape_tracing": {}}]


class ShapeMetrics(Plugin):
    """Like metrics: a plain on_done, and per-hook timings for the whole chain."""

    name = "bench_shape_metrics"
    kind = "observer"

    class Config(PluginConfig):
        timed: bool = Field(True, description="Ask for ctx.timings.plugins, as metrics does.")

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.wants_plugin_timings = config.timed

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        return None


class _ShapeMetering(Plugin):
    kind = "observer"
    done_required = True

    class Config(PluginConfig):
        usage: bool = Field(True, description="needs_usage, as metering: usage asked for on streams.")
        read_usage: bool = Field(True, description="Read ctx.usage in on_done, as every observer does.")

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.needs_usage = config.usage
        self.read_usage = config.read_usage


class ShapeMetering(_ShapeMetering):
    """Like metering without Redis budgets: plain on_request and on_done, usage on streams, an on_done never dropped."""

    name = "bench_shape_metering"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        if self.read_usage:
            ctx.usage


class ShapeMeteringAsync(_ShapeMetering):
    """As metering with budgets in Redis: async hooks, so the route's on_done goes through the core's queue."""

    name = "bench_shape_metering_async"

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        if self.read_usage:
            ctx.usage


class ShapeDrift(Plugin):
    """Like drift: a plain on_done."""

    name = "bench_shape_drift"
    kind = "observer"

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        return None


class ShapeTracing(Plugin):
    """Like tracing without capture_content: plain on_request and on_done (no on_response then)."""

    name = "bench_shape_tracing"
    kind = "observer"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        return None


#: the shape with one thing changed at a time (``--core``)
SHAPE_VARIANTS = {
    "shape, async metering hooks (budgets in Redis)": [SHAPE[0], {"bench_shape_metering_async": {}}, SHAPE[2], SHAPE[3]],
    "shape, no hook timings": [{"bench_shape_metrics": {"timed": False}}, *SHAPE[1:]],
    "shape, no stream usage asked": [SHAPE[0], {"bench_shape_metering": {"usage": False}}, *SHAPE[2:]],
    "shape, ctx.usage never read": [SHAPE[0], {"bench_shape_metering": {"read_usage": False}}, *SHAPE[2:]],
}


SHAPE_PLUGINS = (ShapeMetrics, ShapeMetering, ShapeMeteringAsync, ShapeDrift, ShapeTracing)


class TreeProcess(SluiceProcess):
    """``sluice serve`` from another source tree (``--against``): ``python -m proxy.cli`` run in it."""

    def __init__(self, config: dict[str, Any], tmp: Path, tree: Path) -> None:
        super().__init__(config, tmp)
        self.cwd = tree


@hookimpl
def register_plugins(register: Any) -> None:
    """Loaded by the "shape" Sluice process through $SLUICE_PLUGINS."""
    for cls in SHAPE_PLUGINS:
        register(cls)


def server_process(upstream: str, name: str, chain: list[dict[str, Any]], tmp: Path, against: Path | None) -> SluiceProcess:
    """The Sluice process of one configuration: from ``against``'s tree when its name ends in "(against)"."""
    if name.endswith("(against)"):
        assert against is not None
        return TreeProcess(config(upstream, chain), tmp, against)
    return SluiceProcess(config(upstream, chain, name), tmp, env=PLUGIN_ENV if name.startswith("shape") else None)


def round_differences(per: dict[str, list[float]], against: bool) -> dict[str, list[float]]:
    """Each configuration's CPU per request minus the empty chain's, round by round; with an ``--against``
    tree, its observers against its own empty chain, and the two trees' observers head to head (the same
    minute's load on both)."""
    diffs = {k: [a - b for a, b in zip(v, per["empty"])] for k, v in per.items() if k != "empty"}
    if against:
        diffs["observers (against)"] = [a - b for a, b in zip(per["observers (against)"], per["empty (against)"])]
        diffs["observers minus observers (against), paired"] = [a - b for a, b in zip(per["observers"], per["observers (against)"])]
    return diffs


def quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [round(q[0], 1), round(q[2], 1)]


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads it starts later inherit its main thread's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def rotated(items: list[Any], k: int) -> list[Any]:
    """``items`` starting at its ``k``-th (modulo its length): each set of processes starts another one first."""
    k %= len(items)
    return items[k:] + items[:k]


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


#: the longest a finished request's work waits on a background thread, by default: the ledger's rows
#: for the writer (``state.flush_interval_ms``) and the spans for the exporter (tracing's ``schedule_delay_ms``)
BACKGROUND_WAIT_S = max(StateConfig.model_fields["flush_interval_ms"].default,
                        Tracing.Config.model_fields["schedule_delay_ms"].default) / 1000


async def settle(pid: int, quiet_s: float = BACKGROUND_WAIT_S + 0.2, limit_s: float = 8.0) -> None:
    """Wait until the process stops burning CPU (its on_done queue, writer and exporter caught up).

    Quiet means under 2 ms of CPU in ``quiet_s``: more than a second ticking of idle timers
    costs, less than one request. ``quiet_s`` is longer than the ledger writer's interval and
    the span exporter's delay, so their batches of the round's rows and spans fall inside the
    round's measurement, not into another configuration's turn.
    """
    deadline = time.monotonic() + limit_s
    last = cpu_ns(pid)[0]
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_ns(pid)[0]
        if now - last <= 2_000_000:
            return
        last = now


async def main(quick: bool, rounds: int | None = None, per_round: int | None = None, each: bool = False,
               core: bool = False, against: Path | None = None, sets: int = 1) -> dict[str, Any]:
    rounds_, per_round_, concurrency = (3, 200, 8) if quick else (15, 300, 8)
    rounds = rounds or rounds_
    per_round = per_round or per_round_
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-observers-"))
    load_before = os.getloadavg()
    async with demo_upstream(0.0) as up, otlp_sink() as (sink, received):
        every = observers(sink)
        # many short rounds of few configurations: a pair measured a second apart shares the machine's load
        alone = {next(iter(p)): [p] for p in every} if each else {}
        variants = SHAPE_VARIANTS if core else {}
        chains = {"empty": [], **alone, "shape": SHAPE, **variants, "observers": every, "observers, no batch": every}
        if against is not None:
            chains.update({"empty (against)": [], "observers (against)": every})

        def process(i: int, name: str, chain: list[dict[str, Any]]) -> SluiceProcess:
            return server_process(up, name, chain, tmp / f"c{i}", against)

        # per round and configuration: CPU ns per request, total and per thread (rounds of every set)
        per: dict[str, list[float]] = {k: [] for k in chains}
        threads: dict[str, dict[str, list[float]]] = {k: {} for k in chains}
        ticks = {k: 0.0 for k in chains}
        lat: dict[str, list[float]] = {k: [] for k in chains}
        # A server process keeps an offset of its own for its whole life (address layout, the hash seed
        # of its dicts): two processes of one tree differ by tens of us a request. Each set starts fresh
        # processes, so with several sets that offset is sampled too instead of fixed for the run.
        for set_no in range(sets):
            async with contextlib.AsyncExitStack() as stack:
                procs = {name: await stack.enter_async_context(process(i, name, chain))
                         for i, (name, chain) in enumerate(chains.items(), start=set_no * len(chains))}
                async with aiohttp.ClientSession() as http:
                    for p in procs.values():
                        await load(http, p.url, 300, concurrency)  # warm up: imports, pools, first windows
                        await settle(p.pid)
                    for r in range(rounds):
                        # rotate the order each round, so no configuration always follows the same one
                        for name in rotated(list(procs), r):
                            p = procs[name]
                            t0, th0 = cpu_ns(p.pid)
                            k0 = cpu_seconds(p.pid)
                            lat[name] += await load(http, p.url, per_round, concurrency)
                            await settle(p.pid)
                            t1, th1 = cpu_ns(p.pid)
                            ticks[name] += cpu_seconds(p.pid) - k0
                            per[name].append((t1 - t0) / per_round / 1000)
                            for t in th1:
                                threads[name].setdefault(t, []).append((th1[t] - th0.get(t, 0)) / per_round / 1000)
    rounds *= sets  # every set's rounds pooled from here on
    n = rounds * per_round

    med = {k: statistics.median(v) for k, v in per.items()}
    # the added CPU of a configuration: median over rounds of its difference from the empty chain in that round
    diffs = round_differences(per, against is not None)
    added = {k: statistics.median(v) for k, v in diffs.items()}
    ratios = [a / b for a, b in zip(per["observers"], per["empty"])]
    own = statistics.median(a - b for a, b in zip(per["observers"], per["shape"]))
    return {
        "requests_per_config": n,
        "rounds": rounds,
        "sets_of_processes": sets,
        "concurrency": concurrency,
        "mix": "3 buffered : 1 streamed chat requests",
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_us_per_request_median": {k: round(v, 1) for k, v in med.items()},
        "added_cpu_us_per_request_median": {k: round(v, 1) for k, v in added.items()},
        "added_observers_per_round": [round(x, 1) for x in diffs["observers"]],
        "added_observers_quartiles": quartiles(diffs["observers"]),
        # other work on a shared machine only adds CPU (cache and core contention): each
        # configuration's quietest round is the nearest to its cost on an idle machine
        "cpu_us_per_request_min": {k: round(min(v), 1) for k, v in per.items()},
        "added_from_minimums": {k: round(min(v) - min(per["empty (against)" if k == "observers (against)" else "empty"]), 1)
                                for k, v in per.items() if k != "empty"},
        "of_which_core_for_the_observers_shape": round(added["shape"], 1),
        "of_which_the_observers_own_work": round(own, 1),
        "cpu_ratio_observers_vs_empty_median": round(statistics.median(ratios), 3),
        "cpu_us_per_request_by_thread_median": {
            k: {t: round(statistics.median(v + [0.0] * (rounds - len(v))), 1) for t, v in sorted(th.items())}
            for k, th in threads.items() if k in ("empty", "shape", "observers", "observers (against)")},
        "cpu_us_per_request_from_ticks": {k: round(v / n * 1e6, 1) for k, v in ticks.items()},
        "latency_ms": {k: {"p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3), "mean": round(statistics.fmean(v), 3)}
                       for k, v in lat.items()},
        "latency_p50_ratio_observers_vs_empty": round(pct(lat["observers"], 50) / pct(lat["empty"], 50), 3),
        "latency_p99_ratio_observers_vs_empty": round(pct(lat["observers"], 99) / pct(lat["empty"], 99), 3),
        "otlp_exports": received[0],
        "otlp_bytes": received[1],
    }


# -- in situ: thread CPU around each hook and each chain phase of a live server ---------------

def serve_instrumented(config_path: str, ready_file: str, out: str) -> int:
    """``sluice serve`` with thread-CPU accounting: each observer hook, each chain phase, each thread.

    Started by ``--insitu`` as a child process (this file with ``--serve-instrumented``).
    SIGUSR1 starts counting, SIGUSR2 writes the totals (thread CPU ns, calls) to ``out``.
    The wrappers cost a few tenths of a microsecond a call, inside what they measure.
    """
    import functools
    import inspect
    import threading

    import proxy.chain as chain_module
    from plugins.drift import Drift
    from plugins.metering import Metering
    from plugins.metrics import Metrics
    from plugins.tracing import Tracing
    from proxy.server import serve

    now = time.thread_time_ns
    acc: dict[str, list[int]] = {}
    on = [False]

    def add(key: str, ns: int) -> None:
        if on[0]:
            v = acc.setdefault(key, [0, 0])
            v[0] += ns
            v[1] += 1

    def timed(fn: Any, key: str) -> Any:
        if inspect.iscoroutinefunction(fn):
            async def wrapper(*args: Any) -> Any:
                t0 = now()
                r = await fn(*args)  # these never suspend in this benchmark (no budgets, no remote state)
                add(key, now() - t0)
                return r
        else:
            def wrapper(*args: Any) -> Any:
                t0 = now()
                r = fn(*args)
                add(key, now() - t0)
                return r
        functools.update_wrapper(wrapper, fn)
        return wrapper

    for phase in ("run_request", "run_response", "run_done", "run_done_sync"):
        setattr(chain_module, phase, timed(getattr(chain_module, phase), f"chain.{phase}"))
    for cls in (Metrics, Metering, Drift, Tracing):
        for hook in ("on_request", "on_response", "on_done"):
            # metering's plain hooks (budgets not in Redis) are on_request_now / on_done_now
            for attr in (hook, hook + "_now"):
                if attr in cls.__dict__:
                    setattr(cls, attr, timed(cls.__dict__[attr], f"{cls.name}.{hook}"))

    def threads() -> dict[str, int]:
        found: dict[str, int] = {}
        for t in threading.enumerate():
            try:
                ns = int(Path(f"/proc/self/task/{t.native_id}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
            name = "thread " + t.name.rstrip("0123456789_")
            found[name] = found.get(name, 0) + ns
        return found

    start: dict[str, int] = {}

    def begin(*_: Any) -> None:
        acc.clear()
        start.clear()
        start.update(threads())
        on[0] = True

    def end(*_: Any) -> None:
        on[0] = False
        for name, ns in threads().items():
            acc[name] = [ns - start.get(name, 0), 0]
        Path(out + ".tmp").write_text(json.dumps(acc))
        os.replace(out + ".tmp", out)

    # garbage collections of the loop thread: their thread CPU by generation (inside whatever they interrupt)
    import gc

    gc_start = [0]

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            gc_start[0] = now()
        elif gc_start[0]:
            add(f"gc.gen{info['generation']}", now() - gc_start[0])
            gc_start[0] = 0

    gc.callbacks.append(gc_timer)
    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    return serve(config_path, ready_file=ready_file)


class CountingProcess(SluiceProcess):
    """``sluice serve`` through this file's ``mode`` (``--serve-instrumented``, ``--serve-profiled``): SIGUSR1
    starts counting, :meth:`dump` has the child write what it counted to ``out`` and waits for the file."""

    def __init__(self, config: dict[str, Any], tmp: Path, mode: str, out: str, env: dict[str, str] | None = PLUGIN_ENV) -> None:
        super().__init__(config, tmp, env=env)
        self.mode = mode
        self.out = tmp / out

    def command(self, ready: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), self.mode, str(self.config_path), str(ready), str(self.out)]

    def start_counting(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    async def dump(self, timeout: float = 30.0) -> Path:
        self.out.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR2)
        async with asyncio.timeout(timeout):
            while not self.out.exists():
                await asyncio.sleep(0.02)  # the child writes the file at SIGUSR2
        return self.out


async def insitu(rounds: int = 8, per_round: int = 1000, concurrency: int = 8) -> dict[str, Any]:
    """Where a live server's CPU goes, per hook, chain phase and thread; rounds interleaved.

    Four servers: the shape, the observers, and the observers without span export
    (``tracing: {exporter: none}``: propagation only) and without the ledger
    (``metering: {ledger: false}``), to price the spans and the ledger whole.
    """
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-insitu-"))
    out: dict[str, Any] = {"rounds": rounds, "requests_per_round": per_round, "loadavg_before": round(os.getloadavg()[0], 2)}
    async with demo_upstream(0.0) as up, otlp_sink() as (sink, _):
        every = observers(sink)
        chains = {
            "shape": SHAPE,
            "observers": every,
            "observers, tracing exporter none": [c if "tracing" not in c else {"tracing": {"exporter": "none"}} for c in every],
            "observers, metering ledger false": [c if "metering" not in c else {"metering": {"ledger": False}} for c in every],
        }
        seen: dict[str, dict[str, list[float]]] = {k: {} for k in chains}
        async with contextlib.AsyncExitStack() as stack:
            procs = {name: await stack.enter_async_context(
                         CountingProcess(config(up, chain), tmp / f"c{i}", "--serve-instrumented", "insitu.json"))
                     for i, (name, chain) in enumerate(chains.items())}
            async with aiohttp.ClientSession() as http:
                for p in procs.values():
                    await load(http, p.url, 300, concurrency)
                    await settle(p.pid)
                for r in range(rounds):
                    for name in rotated(list(procs), r):
                        p = procs[name]
                        p.start_counting()
                        await load(http, p.url, per_round, concurrency)
                        await settle(p.pid)
                        for k, v in json.loads((await p.dump()).read_text()).items():
                            seen[name].setdefault(k, []).append(v[0] / per_round / 1000)
                            if k.startswith("gc."):
                                seen[name].setdefault(k + " collections per 1000 requests", []).append(v[1] / per_round * 1000)
    for name, got in seen.items():
        med = {k: round(statistics.median(v + [0.0] * (rounds - len(v))), 1) for k, v in sorted(got.items()) if any(v)}
        phases = sum(med.get(f"chain.{p}", 0.0) for p in ("run_request", "run_done", "run_done_sync", "run_response"))
        med["loop thread outside the chain's phases"] = round(med.get("thread MainThread", 0.0) - phases, 1)
        out[name] = med
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    out["unit"] = "us of thread CPU per request, median over rounds"
    return out


def serve_profiled(config_path: str, ready_file: str, out: str) -> int:
    """``sluice serve`` with the event loop's thread under cProfile: SIGUSR1 starts counting, SIGUSR2
    writes the stats to ``out`` (started by ``--calls`` as a child process)."""
    import cProfile

    from proxy.server import serve

    prof = cProfile.Profile()

    def end(*_: Any) -> None:
        prof.disable()
        prof.dump_stats(out + ".tmp")
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, end)
    return serve(config_path, ready_file=ready_file)


async def calls(per_round: int = 2000, concurrency: int = 8, top: int = 25) -> dict[str, Any]:
    """Python and built-in calls per request on the event loop's thread of a live server: the empty
    chain, the shape and the observers, each loaded alone (3 buffered : 1 streamed).

    A count of calls does not depend on the machine's speed, so a change to the request path
    shows in it at once where CPU figures need many rounds; it says nothing of what a call
    costs. Requests are counted by the core's request ids. The exporter's and the ledger
    writer's threads are not counted.
    """
    import pstats

    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-calls-"))
    out: dict[str, Any] = {"requests_per_configuration": per_round, "concurrency": concurrency}
    per_fn: dict[str, dict[str, float]] = {}
    async with demo_upstream(0.0) as up, otlp_sink() as (sink, _):
        chains = {"empty": [], "shape": SHAPE, "observers": observers(sink)}
        for i, (name, chain) in enumerate(chains.items()):
            env = PLUGIN_ENV if name == "shape" else None
            async with CountingProcess(config(up, chain, name), tmp / f"c{i}", "--serve-profiled", "calls.pstats", env) as p:
                async with aiohttp.ClientSession() as http:
                    await load(http, p.url, 300, concurrency)  # warm up: imports, pools, first windows
                    await settle(p.pid)
                    p.start_counting()
                    await load(http, p.url, per_round, concurrency)
                    await settle(p.pid)  # the last on_done batch runs inside the count
                    dumped = await p.dump()
            stats = pstats.Stats(str(dumped)).stats  # type: ignore[attr-defined]
            n = sum(v[1] for (f, _, fn), v in stats.items() if fn == "new_request_id" and f.endswith("handler.py"))
            if n != per_round:
                raise RuntimeError(f"{name}: counted {n} request ids for {per_round} requests")
            fns: dict[str, float] = {}
            for (f, line, fn), v in stats.items():
                # built-ins by name (a type's address differs between processes), Python functions by file and line
                where = re.sub(r" at 0x[0-9a-f]+", "", fn) if f == "~" else f"{Path(f).parent.name}/{Path(f).name}:{line}:{fn}"
                fns[where] = fns.get(where, 0.0) + v[1] / n
            per_fn[name] = fns
    out["calls_per_request"] = {k: round(sum(v.values()), 1) for k, v in per_fn.items()}
    out["python_calls_per_request"] = {k: round(sum(c for f, c in v.items() if ":" in f), 1) for k, v in per_fn.items()}
    for a, b in (("empty", "shape"), ("shape", "observers")):
        diff = {f: per_fn[b].get(f, 0.0) - per_fn[a].get(f, 0.0) for f in set(per_fn[a]) | set(per_fn[b])}
        biggest = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]
        out[f"{b} minus {a}, largest differences"] = {f: round(d, 2) for f, d in biggest if abs(d) >= 0.005}
    return out


RESPONSE = orjson.dumps({
    "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1700000000, "model": "sluice-demo",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hamlet avenges his father. " * 4}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 28, "total_tokens": 49},
})


class _Capture:
    """Stands in for the span batcher: keeps the encoded spans so their batching is timed apart."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def add(self, span: bytes) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        return None


async def hooks(n: int = 2000, repeats: int = 3) -> dict[str, Any]:
    import gc

    from plugins._drift_stats import Snapshot, Thresholds, compare
    from plugins._otel_wire import encode_batch
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
                               ("drift (sampling; comparisons below)", Drift, {}), ("tracing (spans built and encoded; batching below)", Tracing, {"exporter": "none"})):
            plugin = await configure_plugin(cls, cfg, runtime=rt)
            cap = None
            if cls is Tracing:
                cap = _Capture()
                plugin.pipeline.wire = cap  # as with otlp_http, whose batcher takes encoded spans
            best = float("inf")
            for _ in range(repeats):
                ctxs = [finished() for _ in range(n)]
                gc.collect()
                gc.disable()
                t0 = time.process_time()
                for ctx in ctxs:
                    if getattr(plugin, "on_request", None) is not None:  # metering has none without budgets
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
                    encode_batch(plugin.pipeline.resource, plugin.pipeline.scope, spans[i:i + 512])
                out["tracing: its 2 spans in an OTLP batch (export thread)"] = round((time.process_time() - t0) / n * 1e6, 1)
            await rt.tasks.wait(30)
            await plugin.stop()
        # the ledger row metering appends, through the state's records writer (its thread included)
        from plugins.metering import LEDGER_COLUMNS, LEDGER_TABLE, ledger_table
        from plugins.metrics import route_name

        meter = await configure_plugin(Metering, {}, runtime=rt)
        rows = []
        for i in range(n):
            ctx = finished()
            ctx.request_id = f"req_{i:032x}"  # distinct rows, in arrival order as the core's ids are
            rows.append(meter._values(ctx, ctx.usage, "sluice-demo", 0.0001, True, False, route_name(ctx)))
        records = rt.state.records("bench-ledger")
        records.ensure(ledger_table())
        await records.flush()
        t0 = time.process_time()
        for i, row in enumerate(rows):
            records.append_values(LEDGER_TABLE, LEDGER_COLUMNS, row)  # as metering appends its rows
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
        # one reference against a new open window each time, as in a running monitor (the
        # reference's sorted values are computed once, the window's at every comparison)
        a, currents = snap(), [snap() for _ in range(51)]
        compare(a, currents.pop(), Thresholds())
        t0 = time.process_time()
        for b in currents:
            compare(a, b, Thresholds())
        one = (time.process_time() - t0) / len(currents)
        out["drift: one comparison (4 numeric x 1000, 3 categorical), us"] = round(one * 1e6, 1)
        out["drift: comparisons per request at check_every 100 with check_interval_s 0 (the default 1 s caps them at one a second)"] = round(one * 1e6 / 100, 1)
    finally:
        await rt.close_all()
    out["unit"] = "us of CPU per request unless stated"
    return out


# -- together: every configuration under one open loop, in the same seconds -----------------

def open_loop_command(rate: float, targets: list[tuple[str, SluiceProcess]]) -> list[str]:
    """``loadgen.py`` offering ``rate`` requests a second to each target (1 in 4 streamed, without stream_options)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--mode", "open", "--rate", str(rate),
           "--stream-fraction", "0.25", "--no-include-usage", "--prompt-words", "8"]
    for name, p in targets:
        cmd += ["--target", f"{name}={p.url}", "--target-pid", f"{name}={p.pid}"]
    return cmd


async def open_loop_round(cmd: list[str], seconds: float) -> dict[str, Any]:
    """One round of :func:`open_loop_command`: loadgen's report per target (raises on loadgen's failure and on any
    request's error)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--duration", str(seconds), "--warmup", "0.5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
    res = json.loads(out)["targets"]
    bad = {k: v["errors"] for k, v in res.items() if v["error_count"]}
    if bad:
        raise RuntimeError(f"errors under load: {bad}")
    return res


async def together(rate: float, seconds: float, rounds: int, sets: int, against: Path | None = None,
                   core: bool = False, pair: bool = False, pin: bool = False) -> dict[str, Any]:
    """The empty chain, the shape and the observers (with and without ``server.done_batch_ms``) under one
    open-loop load, arrivals interleaved.

    The rounds of :func:`main` load one configuration at a time, so a change in the
    machine's speed between two seconds falls into the difference (the empty chain's own
    CPU per request moved from 225 to 309 us between two runs a minute apart on a quiet
    machine). Here ``benchmarks/loadgen.py`` offers the same arrivals per second to all
    processes at once, in shuffled order, and reads each one's CPU over the same
    window: whatever the machine does then falls on all of them. 1 request in 4 is streamed,
    without ``stream_options`` (as the main mode's clients: metering adds it). With
    ``against``, that tree's empty chain and observers join the same loop; with ``core``, the
    shape's variants (``--core``) and a route with one no-op observer. With ``pair``, only the
    empty chain and the observers (and ``against``'s two): fewer processes share the machine's
    two cores with the load generator and the upstream. With ``pin``, every Sluice process runs on
    the last CPU, and this process, the load generator and the upstream on the others: Sluice's
    processes never migrate between CPUs, nor share one with the load.
    """
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least two CPUs")
        sluice_cpus, other_cpus = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, other_cpus)  # this thread, and what it starts from now: the upstream, loadgen
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-observers-"))
    load_before = os.getloadavg()
    per: dict[str, list[float]] = {}
    threads: dict[str, dict[str, list[float]]] = {}
    lat: dict[str, dict[str, list[float]]] = {}
    first_started: list[str] = []
    async with demo_upstream(0.0) as up, otlp_sink() as (sink, received):
        every = observers(sink)
        chains = {"empty": [], "observers": every} if pair else {
            "empty": [], "shape": SHAPE, "observers": every, "observers, no batch": every}
        if against is not None:
            chains.update({"empty (against)": [], "observers (against)": every})
        if core:
            chains.update({"shape, one no-op observer": [SHAPE[2]], **SHAPE_VARIANTS})
        if sets % len(chains):
            print(f"note: {sets} sets do not start each of the {len(chains)} configurations first equally often "
                  f"(a multiple of {len(chains)} would)", file=sys.stderr)
        for set_no in range(sets):
            async with contextlib.AsyncExitStack() as stack:
                procs = {}
                # the start order rotates by set (balanced when --sets is a multiple of the configurations):
                # the process started first cost a little more than the others (--offsets: above the round's
                # mean in 10 sets of 10, by 0.1-1.1%)
                order = rotated(list(chains.items()), set_no)
                first_started.append(order[0][0])
                for i, (name, chain) in enumerate(order):
                    procs[name] = await stack.enter_async_context(server_process(up, name, chain, tmp / f"s{set_no}c{i}", against))
                    if pin:
                        pin_threads(procs[name].pid, sluice_cpus)
                cmd = open_loop_command(rate, list(procs.items()))
                for r in range(rounds + 1):  # the first round warms up (imports, pools, first windows)
                    before = {name: thread_cpu_ns(p.pid) for name, p in procs.items()}
                    res = await open_loop_round(cmd, seconds)
                    after = {name: thread_cpu_ns(p.pid) for name, p in procs.items()}
                    if r:
                        for name, v in res.items():
                            per.setdefault(name, []).append(v["proxy"]["cpu_us_per_request"])
                            # each thread's share of the process's CPU over the whole call (warm-up and drain
                            # included), applied to loadgen's CPU per request of the measured window: an
                            # approximation, and each kind's median apart, so the kinds need not add up
                            spent = {k: max(ns - before[name].get(k, 0), 0) for k, ns in after[name].items()}
                            whole = sum(spent.values()) or 1
                            for k, ns in spent.items():
                                threads.setdefault(name, {}).setdefault(k, []).append(v["proxy"]["cpu_us_per_request"] * ns / whole)
                            for q in ("p50", "p99"):
                                lat.setdefault(name, {}).setdefault(q, []).append(v["latency_ms"][q])
                        print(f"set {set_no + 1} round {r}: " + ", ".join(f"{k} {v['proxy']['cpu_us_per_request']:.1f}" for k, v in res.items()),
                              file=sys.stderr, flush=True)
    diffs = round_differences(per, against is not None)
    return {
        "mode": "together: one open loop over all configurations",
        "rate_per_config": rate,
        "seconds_per_round": seconds,
        "rounds": len(per["empty"]),
        "sets_of_processes": sets,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_us_per_request_median": {k: round(statistics.median(v), 1) for k, v in per.items()},
        "added_cpu_us_per_request_median": {k: round(statistics.median(v), 1) for k, v in diffs.items()},
        "added_observers_quartiles": quartiles(diffs["observers"]),
        "added_observers_per_round": [round(x, 1) for x in diffs["observers"]],
        "cpu_ratio_observers_vs_empty_median": round(statistics.median(a / b for a, b in zip(per["observers"], per["empty"])), 3),
        "first_started_per_set": first_started,
        "cpu_us_per_request_by_thread_median": {
            k: {name: round(statistics.median(v), 1) for name, v in sorted(th.items())} for k, th in threads.items()},
        "latency_ms_median_of_rounds": {k: {q: round(statistics.median(v), 3) for q, v in qs.items()} for k, qs in lat.items()},
        "otlp_exports": received[0],
        "pinned": pin,
    }


async def offsets(rate: float, n: int, seconds: float, rounds: int, sets: int, hashseed: str | None) -> dict[str, Any]:
    """``n`` identical empty-chain processes under one open loop: each one's CPU per request against
    the round's mean, per set of fresh processes. Shows the offset a process keeps for its life,
    which any difference between two processes carries (``hashseed``: every process's PYTHONHASHSEED)."""
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-offsets-"))
    out: dict[str, Any] = {"rate_per_process": rate, "processes": n, "rounds": rounds, "sets_of_processes": sets,
                           "pythonhashseed": hashseed, "loadavg_before": round(os.getloadavg()[0], 2)}
    per_set = []
    async with demo_upstream(0.0) as up:
        for set_no in range(sets):
            async with contextlib.AsyncExitStack() as stack:
                procs = {}
                for i in range(n):
                    env = {"PYTHONHASHSEED": hashseed} if hashseed is not None else None
                    procs[f"p{i}"] = await stack.enter_async_context(SluiceProcess(config(up, []), tmp / f"s{set_no}p{i}", env=env))
                # processes start in their order; loadgen's order of targets (which sets the order of its
                # set-up and CPU reads; arrivals are shuffled) rotates by set
                cmd = open_loop_command(rate, rotated(list(procs.items()), set_no))
                rel: dict[str, list[float]] = {name: [] for name in procs}
                for r in range(rounds + 1):  # the first round warms up
                    res = await open_loop_round(cmd, seconds)
                    if r:
                        cpu = {k: v["proxy"]["cpu_us_per_request"] for k, v in res.items()}
                        mean = statistics.mean(cpu.values())
                        for k, v in cpu.items():
                            rel[k].append(v / mean)
                per_set.append({k: round(statistics.median(v), 3) for k, v in rel.items()})
    out["cpu_per_request_vs_round_mean_median"] = per_set
    out["widest_gap_within_a_set"] = round(max(max(s.values()) - min(s.values()) for s in per_set), 3)
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--hooks", action="store_true", help="time the plugins' own hooks in-process")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 15; --quick 3; --together 10; --offsets 6)")
    ap.add_argument("--per-round", type=int, help="requests per configuration and round (default 300; --quick 200)")
    ap.add_argument("--each", action="store_true", help="also each observer alone (noisier: rounds take longer)")
    ap.add_argument("--core", action="store_true", help="also the shape with one core feature off at a time")
    ap.add_argument("--against", type=Path, help="another source tree (a checkout of another commit): its empty chain "
                    "and observers run in the same rounds, for a before/after in one run")
    ap.add_argument("--sets", type=int, default=1, help="start fresh server processes this many times, --rounds each, "
                    "and pool the rounds (a process keeps an offset of its own for its life: sets sample it)")
    ap.add_argument("--insitu", action="store_true", help="thread CPU per hook, chain phase and thread in a live server")
    ap.add_argument("--together", type=float, metavar="RATE", help="instead: all configurations under one open loop, "
                    "RATE requests per second each, arrivals interleaved (with --rounds, --sets, --seconds)")
    ap.add_argument("--pair", action="store_true", help="--together: only the empty chain and the observers "
                    "(and --against's two), so fewer processes share the machine")
    ap.add_argument("--pin", action="store_true", help="--together: the Sluice processes on the last CPU, the load "
                    "generator and the upstream on the others")
    ap.add_argument("--seconds", type=float, default=4.0, help="--together, --offsets: measured seconds per round")
    ap.add_argument("--offsets", type=int, metavar="N", help="instead: N identical empty-chain processes under one open loop "
                    "at 150 requests a second each: every one's CPU per request against the round's mean")
    ap.add_argument("--hashseed", help="--offsets: every process's PYTHONHASHSEED (default: random)")
    ap.add_argument("--calls", action="store_true", help="calls per request on the loop's thread of a live server, "
                    "per configuration (cProfile's counts: independent of the machine's speed)")
    ap.add_argument("--serve-instrumented", nargs=3, metavar=("CONFIG", "READY", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-profiled", nargs=3, metavar=("CONFIG", "READY", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_instrumented:
        sys.exit(serve_instrumented(*args.serve_instrumented))
    if args.serve_profiled:
        sys.exit(serve_profiled(*args.serve_profiled))
    if args.hashseed is not None and args.offsets is None:
        ap.error("--hashseed is for --offsets")
    if args.offsets is not None and args.together is not None:
        ap.error("--offsets and --together are separate runs")
    if args.pair and (args.together is None or args.core):
        ap.error("--pair is for --together, without --core")
    if args.pin and args.together is None:
        ap.error("--pin is for --together")
    if args.calls and (args.together is not None or args.offsets is not None or args.hooks or args.insitu
                       or args.rounds is not None or args.sets != 1 or args.against is not None):
        ap.error("--calls is a run of its own (no --together, --offsets, --hooks, --insitu, --rounds, --sets or --against)")
    if args.sets < 1 or (args.rounds is not None and args.rounds < 1) or args.seconds <= 0:
        ap.error("--sets and --rounds must be at least 1, --seconds positive")
    if args.hooks:
        result = asyncio.run(hooks())
    elif args.calls:
        result = asyncio.run(calls())
    elif args.insitu:
        result = asyncio.run(insitu())
    elif args.offsets is not None:
        if args.offsets < 2:
            ap.error("--offsets needs at least 2 processes")
        result = asyncio.run(offsets(150.0, args.offsets, args.seconds, args.rounds or 6, args.sets, args.hashseed))
    elif args.together is not None:
        if args.together <= 0:
            ap.error("--together needs a positive rate")
        result = asyncio.run(together(args.together, args.seconds, args.rounds or 10, args.sets, args.against, args.core,
                                          args.pair, args.pin))
    else:
        result = asyncio.run(main(args.quick, args.rounds, args.per_round, args.each, args.core, args.against, args.sets))
    print(json.dumps(result, indent=2))
