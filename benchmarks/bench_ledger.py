"""The ledger writer's CPU per row against rows per commit (why SQLite records wait up to ``state.flush_interval_ms``).

Each wake-up of the state's writer thread writes the rows that wait in one transaction,
and each commit has a cost of its own: SQLite writes every page the rows touched (the
table's and each index's) to the WAL and syncs it. So the fewer commits, the cheaper a
row: at a fixed request rate, rows per commit are the rate times the flush interval.

This runs the real writer (``SQLiteRecords``) on the real ledger table (metering's
columns, primary key and indexes), rows shaped as metering writes them, at several rows
per commit, on a table that already holds ``--prefill`` rows, and reads the writer
thread's CPU from ``/proc/self/task/<tid>/schedstat``. Repeats interleave the sizes;
medians are printed, in microseconds of the writer's CPU per row.

    .venv/bin/python benchmarks/bench_ledger.py
    .venv/bin/python benchmarks/bench_ledger.py --sizes 30,150 --rows 9000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugins.metering import LEDGER_COLUMNS, LEDGER_TABLE, ledger_table, utc_day  # noqa: E402
from proxy.handler import new_request_id  # noqa: E402
from proxy.state.sqlite import SQLiteRecords  # noqa: E402


def row(rnd: random.Random) -> tuple[Any, ...]:
    """One ledger row's values in LEDGER_COLUMNS order, as metering gives them for a buffered chat answer."""
    now = time.time()
    p, c = rnd.randint(10, 400), rnd.randint(1, 200)
    values = {
        "id": new_request_id(), "ts": round(now, 6), "day": utc_day(now), "key_id": f"key-{rnd.randrange(20)}",
        "key_name": "service", "team": f"team-{rnd.randrange(4)}", "user": None, "route": "main",
        "endpoint": "chat/completions", "model_requested": "sluice-demo", "model_served": "sluice-demo",
        "upstream": "primary", "attempts": 1, "stream": int(rnd.random() < 0.25), "prompt_tokens": p,
        "completion_tokens": c, "cached_tokens": 0, "reasoning_tokens": 0, "total_tokens": p + c,
        "cost": (p * 0.5 + c * 1.5) / 1e6, "currency": "USD", "priced": 1, "status": 200, "outcome": "ok",
        "answered_by": None, "latency_ms": round(rnd.uniform(5, 900), 3), "ttft_ms": None, "cache_hit": 0,
        "estimated": 0, "variant": None, "tags": None,
    }
    return tuple(values[c] for c in LEDGER_COLUMNS)


def thread_ns(native_id: int) -> int:
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])


async def per_row_us(directory: Path, per_commit: int, rows: int, prefill: int, rnd: random.Random) -> tuple[float, float]:
    """The writer thread's CPU per row, writing ``rows`` rows ``per_commit`` to a transaction; and the
    rows per transaction it really wrote (fewer when it woke while rows were still being queued)."""
    rec = SQLiteRecords(directory / "ledger.db", batch_size=per_commit, flush_interval_ms=60_000)
    try:
        rec.ensure(ledger_table())
        for _ in range(prefill):
            rec.append_values(LEDGER_TABLE, LEDGER_COLUMNS, row(rnd))
        await rec.flush()
        values = [row(rnd) for _ in range(rows)]
        tid = rec._thread.native_id
        assert tid is not None
        before, written, batches = thread_ns(tid), rec.written, rec.batches
        for v in values:
            # a full batch wakes the writer, which writes it as one transaction
            rec.append_values(LEDGER_TABLE, LEDGER_COLUMNS, v)
        await rec.flush()
        spent = thread_ns(tid) - before
        if rec.written - written != rows or rec.dropped:
            raise RuntimeError(f"wrote {rec.written - written} of {rows} rows ({rec.dropped} dropped)")
        return spent / rows / 1000, rows / max(rec.batches - batches, 1)
    finally:
        await rec.close()


async def main(sizes: list[int], rows: int, prefill: int, repeats: int) -> dict[str, Any]:
    rnd = random.Random(1)
    found: dict[int, list[float]] = {n: [] for n in sizes}
    real: dict[int, list[float]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-ledger-") as tmp:
        for rep in range(repeats):
            order = sizes if rep % 2 == 0 else list(reversed(sizes))
            for n in order:
                d = Path(tmp) / f"r{rep}n{n}"
                d.mkdir()
                us, per = await per_row_us(d, n, rows - rows % n, prefill, rnd)
                found[n].append(us)
                real[n].append(per)
    return {
        "rows_per_size": rows, "prefill_rows": prefill, "repeats": repeats, "loadavg": round(os.getloadavg()[0], 2),
        "writer_cpu_us_per_row_median": {str(n): round(statistics.median(v), 1) for n, v in found.items()},
        "writer_cpu_us_per_row_all": {str(n): [round(x, 1) for x in v] for n, v in found.items()},
        "rows_per_commit_written_mean": {str(n): round(statistics.mean(v), 1) for n, v in real.items()},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="15,30,75,150,300,500", help="rows per commit, comma-separated")
    ap.add_argument("--rows", type=int, default=6000, help="rows written per size and repeat")
    ap.add_argument("--prefill", type=int, default=20_000, help="rows in the table before measuring")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.rows < max(sizes) or args.repeats < 1 or args.prefill < 0:
        ap.error("sizes must be positive, --rows at least the largest size, --repeats at least 1")
    print(json.dumps(asyncio.run(main(sizes, args.rows, args.prefill, args.repeats)), indent=2))
