"""``sluice eval injection FILE``: run a labelled corpus through the configured detectors.

The corpus is JSON Lines, one object a line::

    {"text": "...", "label": "attack" | "benign", "category": "instruction_override", "source": "user" | "tool"}

``source`` defaults to ``user``. For attack rows the report gives the true-positive
rate per category; for benign rows the false-positive rate per category.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TextIO

from proxy import Command

if TYPE_CHECKING:  # pragma: no cover
    from proxy.config import LoadedConfig

    from ._injection_engine import Engine


@dataclass(frozen=True, slots=True)
class Row:
    text: str
    label: str
    category: str
    source: str = "user"
    id: str | None = None


@dataclass(slots=True)
class CategoryStats:
    label: str
    total: int = 0
    detected: int = 0
    missed_ids: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.detected / self.total if self.total else 0.0


@dataclass(slots=True)
class Report:
    categories: dict[str, CategoryStats]
    threshold: float
    tool_threshold: float
    version: str
    micros_per_row: float

    def _sum(self, label: str) -> tuple[int, int]:
        rows = [c for c in self.categories.values() if c.label == label]
        return sum(c.detected for c in rows), sum(c.total for c in rows)

    @property
    def tpr(self) -> float:
        d, t = self._sum("attack")
        return d / t if t else 0.0

    @property
    def fpr(self) -> float:
        d, t = self._sum("benign")
        return d / t if t else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "threshold": self.threshold,
            "tool_threshold": self.tool_threshold,
            "true_positive_rate": round(self.tpr, 4),
            "false_positive_rate": round(self.fpr, 4),
            "micros_per_row": round(self.micros_per_row, 1),
            "categories": {
                name: {
                    "label": c.label,
                    "rows": c.total,
                    "flagged": c.detected,
                    ("true_positive_rate" if c.label == "attack" else "false_positive_rate"): round(c.rate, 4),
                    ("missed" if c.label == "attack" else "false_positives"): c.missed_ids,
                }
                for name, c in sorted(self.categories.items(), key=lambda kv: (kv[1].label, kv[0]))
            },
        }

    def write_table(self, out: TextIO) -> None:
        out.write(f"detectors: {self.version}   threshold: {self.threshold} (tool: {self.tool_threshold})\n\n")
        out.write(f"{'category':<28} {'label':<7} {'rows':>5} {'flagged':>8} {'rate':>7}\n")
        for name, c in sorted(self.categories.items(), key=lambda kv: (kv[1].label, kv[0])):
            kind = "TPR" if c.label == "attack" else "FPR"
            out.write(f"{name:<28} {c.label:<7} {c.total:>5} {c.detected:>8} {kind} {c.rate:6.1%}\n")
        da, ta = self._sum("attack")
        db, tb = self._sum("benign")
        out.write(f"\nattacks: {da}/{ta} detected (TPR {self.tpr:.1%})   benign: {db}/{tb} flagged (FPR {self.fpr:.1%})\n")
        out.write(f"mean scan time: {self.micros_per_row:.0f} µs per row\n")


def load_corpus(path: str | Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("//"):
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("each line is a JSON object")
                missing = [k for k in ("text", "label") if k not in obj]
                if missing:
                    raise ValueError(f"missing field {missing[0]!r}")
                if not isinstance(obj["text"], str):
                    raise ValueError("text must be a string")
                label = obj["label"]
                if label not in ("attack", "benign"):
                    raise ValueError(f"label must be 'attack' or 'benign', not {label!r}")
                if obj.get("source", "user") not in ("user", "tool", "prompt", "system", "assistant"):
                    raise ValueError(f"unknown source {obj.get('source')!r}")
                rows.append(Row(obj["text"], label, obj.get("category") or label, obj.get("source", "user"), obj.get("id") or f"line{n}"))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    return rows


def evaluate(rows: Iterable[Row], engine: Engine) -> Report:
    stats: dict[str, CategoryStats] = {}
    count = 0
    start = time.perf_counter()
    for row in rows:
        count += 1
        score = engine.detect(row.text, row.source).score  # type: ignore[arg-type]
        hit = score >= engine.threshold_for(row.source)
        key = row.category
        c = stats.get(key)
        if c is None:
            c = stats[key] = CategoryStats(row.label)
        elif c.label != row.label:
            raise ValueError(f"category {key!r} has both attack and benign rows")
        c.total += 1
        if hit:
            c.detected += 1
        if hit != (row.label == "attack"):
            c.missed_ids.append(row.id or "?")
    elapsed = time.perf_counter() - start
    return Report(stats, engine.threshold, engine.tool_threshold, engine.version, elapsed / count * 1e6 if count else 0.0)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a JSON Lines corpus: {text, label: attack|benign, category, source: user|tool}")
    p.add_argument("--route", help="take the injection settings of this route (its name or path prefix); default: the first route using it")
    p.add_argument("--threshold", type=float, help="override the configured threshold (both user and tool)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--min-tpr", type=float, help="exit 1 when the overall true-positive rate is below this (0-1)")
    p.add_argument("--max-fpr", type=float, help="exit 1 when the overall false-positive rate is above this (0-1)")


def _settings(loaded: LoadedConfig, route: str | None, plugin_cls: type) -> Any:
    """The injection config of the chosen route, or the defaults when no route uses the plugin."""
    for ri, chain in enumerate(loaded.chains):
        rc = loaded.config.routes[ri]
        if route is not None and route not in (rc.name, rc.match.path, str(ri)):
            continue
        for cls, cfg in chain:
            if cls.name == plugin_cls.name:
                return cfg
    if route is not None:
        raise ValueError(f"no route {route!r} with an injection plugin in {loaded.source}")
    return plugin_cls.Config()


def eval_command(plugin_cls: type) -> Command:
    def run(args: argparse.Namespace, loaded: LoadedConfig) -> int:
        from .injection import build_engine

        try:
            config = _settings(loaded, args.route, plugin_cls)
            if args.threshold is not None:
                config = config.model_copy(update={"threshold": args.threshold, "tool_threshold": args.threshold})
            rows = load_corpus(args.file)
        except (OSError, ValueError) as e:
            print(f"sluice eval injection: {e}", file=sys.stderr)
            return 2
        engine = build_engine(config)
        engine.start()
        try:
            report = evaluate(rows, engine)
        finally:
            engine.stop()
        if args.json:
            print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
        else:
            report.write_table(sys.stdout)
        failed = (args.min_tpr is not None and report.tpr < args.min_tpr) or (args.max_fpr is not None and report.fpr > args.max_fpr)
        return 1 if failed else 0

    return Command(
        name="eval injection",
        help="Run a labelled corpus through the injection detectors; report true- and false-positive rates per category.",
        configure=_configure,
        run=run,
    )
