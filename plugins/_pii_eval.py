"""``sluice eval pii FILE``: precision and recall of the configured detector on a labelled corpus.

The corpus is JSON lines, one text each::

    {"id": "chat-17", "text": "mail me at ann@example.org", "entities": [{"type": "EMAIL_ADDRESS", "value": "ann@example.org"}]}

A finding counts as a true positive when its type and its exact text match a
labelled entity of that text (as many times as the label occurs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import orjson

if TYPE_CHECKING:  # pragma: no cover
    from proxy.config import LoadedConfig

    from ._pii_engine import PiiEngine


@dataclass
class Sample:
    id: str
    text: str
    entities: list[tuple[str, str]]


@dataclass
class TypeScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class Report:
    per_type: dict[str, TypeScore] = field(default_factory=dict)
    texts: int = 0
    seconds: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> TypeScore:
        t = TypeScore()
        for s in self.per_type.values():
            t.tp += s.tp
            t.fp += s.fp
            t.fn += s.fn
        return t

    def as_dict(self) -> dict[str, Any]:
        def row(s: TypeScore) -> dict[str, Any]:
            return {"tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": round(s.precision, 4), "recall": round(s.recall, 4), "f1": round(s.f1, 4)}

        return {
            "texts": self.texts,
            "seconds": round(self.seconds, 3),
            "types": {k: row(v) for k, v in sorted(self.per_type.items())},
            "total": row(self.total),
        }


def load_corpus(path: str | Path) -> list[Sample]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            text = row["text"]
            ents = [(e["type"], e["value"]) for e in row.get("entities", [])]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not a corpus line ({type(e).__name__}): "
                             "want {\"text\": \"...\", \"entities\": [{\"type\": ..., \"value\": ...}]}") from None
        if not isinstance(text, str) or not all(isinstance(t, str) and isinstance(v, str) for t, v in ents):
            raise ValueError(f"{path}:{n}: the text and each entity's type and value must be strings")
        for typ, value in ents:
            if value not in text:
                raise ValueError(f"{path}:{n}: a labelled {typ} value does not occur in the text")
        out.append(Sample(str(row.get("id", n)), text, ents))
    return out


def evaluate(engine: PiiEngine, samples: Iterable[Sample], full: bool = False, entities: Iterable[str] | None = None) -> Report:
    """Score ``engine`` on ``samples``; ``full`` uses plain Presidio instead of the fast path."""
    wanted = set(entities) if entities is not None else set(engine.entities)
    rep = Report()
    for typ in wanted:
        rep.per_type[typ] = TypeScore()
    t0 = time.perf_counter()
    for s in samples:
        rep.texts += 1
        found = engine.analyze_full(s.text) if full else engine.analyze(s.text)
        pred = Counter((f.type, s.text[f.start:f.end]) for f in found if f.type in wanted)
        gold = Counter((t, v) for t, v in s.entities if t in wanted)
        for key in pred.keys() | gold.keys():
            score = rep.per_type.setdefault(key[0], TypeScore())
            tp = min(pred[key], gold[key])
            score.tp += tp
            score.fp += pred[key] - tp
            score.fn += gold[key] - tp
            if pred[key] != gold[key]:
                rep.errors.append({"id": s.id, "type": key[0], "value": key[1], "kind": "fp" if pred[key] > gold[key] else "fn"})
    rep.seconds = time.perf_counter() - t0
    return rep


def format_report(rep: Report) -> str:
    lines = [f"{'type':<16} {'tp':>5} {'fp':>5} {'fn':>5} {'precision':>10} {'recall':>8} {'f1':>6}"]
    rows = sorted(rep.per_type.items()) + [("TOTAL", rep.total)]
    for name, s in rows:
        lines.append(f"{name:<16} {s.tp:>5} {s.fp:>5} {s.fn:>5} {s.precision:>10.3f} {s.recall:>8.3f} {s.f1:>6.3f}")
    lines.append(f"{rep.texts} texts in {rep.seconds:.2f} s")
    return "\n".join(lines)


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="labelled corpus, JSON lines: {id, text, entities: [{type, value}]}")
    p.add_argument("--plugin-id", default=None, help="which pii instance of the config to measure (default: the first, else the defaults)")
    p.add_argument("--full", action="store_true", help="plain Presidio on whole texts (no pre-scan or windows)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show-errors", action="store_true", help="list missed and spurious findings (prints corpus values)")
    p.add_argument("--min-precision", type=float, default=None, help="exit 1 when a type's precision is below this")
    p.add_argument("--min-recall", type=float, default=None, help="exit 1 when a type's recall is below this")


def pii_config_from(loaded: LoadedConfig | None, plugin_id: str | None = None) -> Any:
    from .pii import PiiConfig

    if loaded is not None:
        for chain in loaded.chains:
            for cls, conf in chain:
                if cls.name == "pii" and (plugin_id is None or (conf.id or cls.name) == plugin_id):
                    return conf
    if plugin_id is not None:
        raise ValueError(f"no pii plugin with id {plugin_id!r} in the config")
    return PiiConfig()


def run_eval(args: argparse.Namespace, loaded: LoadedConfig | None) -> int:
    from ._pii_engine import PiiEngine
    from .pii import engine_settings

    try:
        conf = pii_config_from(loaded, args.plugin_id)
        samples = load_corpus(args.file)
    except (OSError, ValueError) as e:
        print(f"sluice eval pii: {e}", file=sys.stderr)
        return 2
    engine = PiiEngine(engine_settings(conf))
    engine.load()
    rep = evaluate(engine, samples, full=args.full)
    if args.json:
        print(orjson.dumps(rep.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(rep))
    if args.show_errors:
        for e in rep.errors:
            print(f"{e['kind']} {e['id']} {e['type']} {e['value']!r}")
    status = 0
    for name, s in rep.per_type.items():
        if s.tp + s.fp + s.fn == 0:
            continue
        if args.min_precision is not None and s.precision < args.min_precision:
            print(f"{name}: precision {s.precision:.3f} is below {args.min_precision}", file=sys.stderr)
            status = 1
        if args.min_recall is not None and s.recall < args.min_recall:
            print(f"{name}: recall {s.recall:.3f} is below {args.min_recall}", file=sys.stderr)
            status = 1
    return status
