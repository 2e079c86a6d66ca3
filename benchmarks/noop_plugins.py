"""Ten no-op plugins for the chain-cost benchmark, and a launcher that serves with them.

``bench_noop_0`` .. ``bench_noop_9`` are ten distinct plugin classes (distinct hook
functions, as ten real plugins would be), each implementing ``on_request``,
``on_response``, ``on_chunk`` and ``on_done`` as trivial synchronous functions that
do what every well-behaved hook does first (look at the context) and nothing else.
What they cost is the chain's own cost: hook dispatch, timing records, the onion walk,
and, because ``on_chunk`` is declared, parsing streams into events.

They are registered through the public registry API (``proxy.registry.register_plugin``)
rather than an entry point, so nothing needs installing. A ``sluice serve`` started by
``proxy.testing.SluiceProcess`` lives in another process and cannot see programmatic
registrations, hence this launcher: it registers the plugins in its own process, then
runs the ordinary server entry point, ``proxy.server.serve``::

    python benchmarks/noop_plugins.py -c sluice.yaml --ready-file ready.json
    python benchmarks/noop_plugins.py -c sluice.yaml --ready-file ready.json --profile out.prof

``--profile FILE`` adds a cProfile switched on by SIGUSR1 and off by SIGUSR2 (which
writes the stats to FILE): the way to see where the proxy's CPU goes without touching
``proxy/`` (``run_core.py --profile DIR`` drives it).

Only ``server.workers: 1`` works here: a multi-worker master starts fresh
``sluice serve`` processes, which would not have the plugins.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy import Context, Event, Plugin, hookimpl  # noqa: E402

COUNT = 10
NAMES = [f"bench_noop_{i}" for i in range(COUNT)]
#: the same plugins without on_chunk and on_done: to tell the chain's cost from the
#: background on_done queue's and from stream parsing
NAMES_RR = [f"bench_noop_rr_{i}" for i in range(COUNT)]
ALL_HOOKS = ("on_request", "on_response", "on_chunk", "on_done")


class _NoOp(Plugin):
    """Does nothing, on every request-path hook (a template for the ten classes below)."""

    kind = "observer"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        return None

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        return None

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        return None


def _make(i: int, name: str, hooks: tuple[str, ...]) -> type[Plugin]:
    # each class gets its own function objects: a chain of ten real plugins calls ten functions
    ns: dict[str, Any] = {"name": name, "__module__": __name__, "__doc__": f"No-op plugin {i} of {COUNT} (benchmark): {', '.join(hooks)}."}
    for hook in hooks:
        base = getattr(_NoOp, hook)
        fn = type(base)(base.__code__, base.__globals__, f"{hook}_{i}", base.__defaults__, base.__closure__)
        fn.__dict__.update(base.__dict__)  # keeps the @hookimpl marker
        ns[hook] = fn
    return type(f"BenchNoOp{i}" if hooks == ALL_HOOKS else f"BenchNoOpRR{i}", (Plugin,), {"kind": "observer", **ns})


PLUGINS: list[type[Plugin]] = [_make(i, NAMES[i], ALL_HOOKS) for i in range(COUNT)]
PLUGINS_RR: list[type[Plugin]] = [_make(i, NAMES_RR[i], ("on_request", "on_response")) for i in range(COUNT)]


def chain(n: int = COUNT, *, request_response_only: bool = False) -> list[dict[str, dict[str, Any]]]:
    """A config chain of the first ``n`` no-op plugins (all four hooks, or on_request/on_response only)."""
    return [{name: {}} for name in (NAMES_RR if request_response_only else NAMES)[:n]]


def register() -> None:
    """Register the benchmark classes in this process (``proxy.registry``'s public door)."""
    from proxy.registry import register_plugin

    for cls in PLUGINS + PLUGINS_RR:
        register_plugin(cls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="sluice serve, with the ten benchmark no-op plugins registered.")
    p.add_argument("-c", "--config", default=None, help="config file (as for `sluice serve`)")
    p.add_argument("--ready-file", default=None, help="write {pid, port, admin_port} as JSON here once listening")
    p.add_argument("--profile", default=None, help="profile CPU between SIGUSR1 and SIGUSR2; the stats are written here at SIGUSR2")
    args = p.parse_args(argv)
    register()
    from proxy.server import serve

    if args.profile is None:
        return serve(args.config, ready_file=args.ready_file)
    return _profiled(args)


def _profiled(args: argparse.Namespace) -> int:
    """Serve with a CPU-time profiler that SIGUSR1 switches on and SIGUSR2 off (stats written then).

    Thread CPU time, not wall time: on a shared machine wall time charges the
    scheduler's pauses to whatever function happened to be running. The event
    loop runs on the main thread, so that is the thread measured; start-up and
    warm-up stay out of the figures because the runner switches the profiler on
    only around the measured load.
    """
    import cProfile
    import signal
    import time

    from proxy.server import serve

    current: list[cProfile.Profile] = []

    def on(_sig: int, _frame: Any) -> None:
        if not current:
            current.append(cProfile.Profile(time.thread_time))
            current[0].enable()

    def off(_sig: int, _frame: Any) -> None:
        if current:
            prof = current.pop()
            prof.disable()
            tmp = f"{args.profile}.tmp"
            prof.dump_stats(tmp)
            os.replace(tmp, args.profile)  # the runner waits for the file: it must appear whole

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    return serve(args.config, ready_file=args.ready_file)

if __name__ == "__main__":
    sys.exit(main())
