"""A tiny, dependency-free text scorer: multinomial naive Bayes over words and word pairs.

It is the stand-in for a real classifier, so the detector interface can be
exercised (and tested) without a model download. It is *not* a good injection
classifier: train it on your own labelled data, or use the ``transformers``
backend with a model you trust.

Train from JSON Lines rows ``{"text": ..., "label": 0 | 1}``::

    python -m sluice_injection_classifier.tiny train data/train.jsonl data/tiny_model.json
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

_WORD = re.compile(r"[a-z0-9']+")


def features(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


class TinyScorer:
    """P(injection | text) from per-class feature log-likelihoods (Laplace smoothed)."""

    def __init__(self, log_prior: float, weights: dict[str, float], default: float) -> None:
        #: log P(injection) - log P(benign)
        self.log_prior = log_prior
        #: per feature: log P(f | injection) - log P(f | benign)
        self.weights = weights
        #: the same for a feature never seen in training
        self.default = default

    @classmethod
    def train(cls, rows: Iterable[tuple[str, int]], alpha: float = 1.0) -> TinyScorer:
        counts = {0: Counter[str](), 1: Counter[str]()}
        docs = Counter[int]()
        for text, label in rows:
            counts[label].update(features(text))
            docs[label] += 1
        if not docs[0] or not docs[1]:
            raise ValueError("training needs rows of both labels")
        vocab = set(counts[0]) | set(counts[1])
        totals = {k: sum(c.values()) + alpha * (len(vocab) + 1) for k, c in counts.items()}
        weights = {
            f: math.log((counts[1][f] + alpha) / totals[1]) - math.log((counts[0][f] + alpha) / totals[0]) for f in vocab
        }
        default = math.log(alpha / totals[1]) - math.log(alpha / totals[0])
        return cls(math.log(docs[1] / docs[0]), weights, default)

    def score(self, text: str) -> float:
        feats = features(text)
        if not feats:
            return 0.0
        known = [self.weights[f] for f in feats if f in self.weights]
        if not known:
            return 0.0
        # the mean log-likelihood ratio keeps long texts from saturating on length alone
        z = self.log_prior + sum(known) / math.sqrt(len(known))
        return 1.0 / (1.0 + math.exp(-z))

    def save(self, path: str | Path) -> None:
        data = {"log_prior": self.log_prior, "default": self.default, "weights": dict(sorted(self.weights.items()))}
        Path(path).write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TinyScorer:
        data = json.loads(Path(path).read_text())
        return cls(float(data["log_prior"]), {k: float(v) for k, v in data["weights"].items()}, float(data["default"]))


def read_rows(path: str | Path) -> list[tuple[str, int]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            rows.append((obj["text"], int(obj["label"])))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "train":
        print("usage: python -m sluice_injection_classifier.tiny train TRAIN.jsonl OUT.json", file=sys.stderr)
        return 2
    TinyScorer.train(read_rows(argv[1])).save(argv[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
