"""What the injection plugin scans in a request, and how detector scores combine.

Kept apart from the plugin so the evaluation command and the benchmarks run the
exact code the proxy runs, without a server.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from ._injection_detectors import NOTHING, Detection, Detector, Source, load_detector, noisy_or

Combine = Literal["noisy_or", "max", "mean"]

_ROLE_SOURCE: dict[str, Source] = {
    "user": "user",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
}
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


@dataclass(frozen=True, slots=True)
class Item:
    """One text of a request, with where it came from (``where`` is a JSON path, never content)."""

    source: Source
    text: str
    where: str


#: Responses API input items that carry a tool's result (a function's, or a custom tool's)
_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


def extract(body: Any, endpoint: str, sources: frozenset[str], last_messages: int | None = None) -> list[Item]:
    """The texts of an OpenAI-style request a model will read as instructions or data.

    Chat ``messages`` (string content and text parts), completions ``prompt``,
    the responses API's ``input`` (messages, function and custom tool call outputs) and its
    ``instructions`` (a system message, scanned when ``system`` is a source).
    Embeddings inputs are never instructions to a model, so they are skipped (``endpoint`` is the
    request's whole path: a route's prefix may be all of ``/v1/embeddings``).
    """
    if not isinstance(body, dict) or endpoint.rstrip("/").endswith("embeddings"):
        return []
    out: list[Item] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        _messages(messages, "messages", sources, last_messages, out)
    prompt = body.get("prompt")
    if "prompt" in sources:
        if isinstance(prompt, str):
            out.append(Item("prompt", prompt, "prompt"))
        elif isinstance(prompt, list):
            out.extend(Item("prompt", p, f"prompt[{i}]") for i, p in enumerate(prompt) if isinstance(p, str))
    inp = body.get("input")
    if isinstance(inp, str):
        if "user" in sources:
            out.append(Item("user", inp, "input"))
    elif isinstance(inp, list):
        _messages(inp, "input", sources, last_messages, out)
    if inp is not None and "system" in sources and isinstance(body.get("instructions"), str):
        out.append(Item("system", body["instructions"], "instructions"))  # the Responses API's system message
    return out


def _messages(messages: list[Any], key: str, sources: frozenset[str], last: int | None, out: list[Item]) -> None:
    start = max(0, len(messages) - last) if last else 0
    for i in range(start, len(messages)):
        m = messages[i]
        if not isinstance(m, dict):
            continue
        if m.get("type") in _TOOL_OUTPUTS:
            output = m.get("output")
            if "tool" in sources:
                if isinstance(output, str):
                    out.append(Item("tool", output, f"{key}[{i}].output"))
                elif isinstance(output, list):  # a list of parts (input_text, ...), as the SDK types it too
                    for j, part in enumerate(output):
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            out.append(Item("tool", part["text"], f"{key}[{i}].output[{j}].text"))
                        elif isinstance(part, str):
                            out.append(Item("tool", part, f"{key}[{i}].output[{j}]"))
            continue
        source = _ROLE_SOURCE.get(str(m.get("role", "")))
        if source is None or source not in sources:
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(Item(source, content, f"{key}[{i}].content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
                    out.append(Item(source, part["text"], f"{key}[{i}].content[{j}].text"))
                elif isinstance(part, str):
                    out.append(Item(source, part, f"{key}[{i}].content[{j}]"))


@dataclass(slots=True)
class Finding:
    """The outcome for a whole request: the worst text decides."""

    score: float = 0.0
    detected: bool = False
    categories: dict[str, float] = field(default_factory=dict)
    signals: set[str] = field(default_factory=set)
    #: how many texts crossed their threshold, by source
    sources: dict[str, int] = field(default_factory=dict)
    #: JSON paths of the texts that crossed (no content)
    where: list[str] = field(default_factory=list)
    scanned: int = 0

    def summary(self) -> dict[str, Any]:
        """The request's annotation: details, plus ``findings`` (what observers count, see docs/plugins/metrics.md):
        each category found in a detected request, once."""
        return {
            "findings": {k: 1 for k, v in sorted(self.categories.items()) if v > 0} if self.detected else {},
            "score": round(self.score, 4),
            "detected": self.detected,
            "categories": {k: round(v, 4) for k, v in sorted(self.categories.items())},
            "signals": sorted(self.signals),
            "sources": dict(sorted(self.sources.items())),
            "where": self.where[:20],
            "scanned": self.scanned,
        }


class Engine:
    """Detectors, weights, thresholds, allow-list and a per-text result cache.

    ``detect(text, source)`` is synchronous and thread-safe apart from the
    cache, which only :meth:`cached` / :meth:`remember` touch (on the event loop).
    """

    def __init__(
        self,
        detectors: Sequence[tuple[Detector, float]],
        *,
        combine: Combine = "noisy_or",
        threshold: float = 0.5,
        tool_threshold: float | None = None,
        allow: Iterable[str] = (),
        cache_size: int = 4096,
    ) -> None:
        if not detectors:
            raise ValueError("at least one detector is needed")
        self.detectors = list(detectors)
        self.combine = combine
        self.threshold = threshold
        self.tool_threshold = threshold if tool_threshold is None else tool_threshold
        self.allow = [re.compile(p, re.IGNORECASE) for p in allow]
        self.blocking = any(d.blocking for d, _ in self.detectors)
        self.cache_size = cache_size
        # keyed by the text's hash, not the text: a cache of long documents must not hold them.
        # str hashes are keyed per process (SipHash), so a client cannot aim a collision.
        self._cache: OrderedDict[tuple[str, int, int], Detection] = OrderedDict()

    @classmethod
    def from_specs(cls, specs: Sequence[Mapping[str, Any]], **kw: Any) -> Engine:
        """Build from ``[{use, weight, options}]`` config entries."""
        return cls([(load_detector(s["use"], s.get("options") or {}), float(s.get("weight", 1.0))) for s in specs], **kw)

    def start(self) -> None:
        for d, _ in self.detectors:
            d.start()

    def stop(self) -> None:
        for d, _ in self.detectors:
            d.stop()

    @property
    def version(self) -> str:
        return "+".join(f"{d.name or type(d).__name__}@{d.version}" for d, _ in self.detectors)

    def threshold_for(self, source: str) -> float:
        return self.tool_threshold if source == "tool" else self.threshold

    # -- one text -----------------------------------------------------------------------
    def detect(self, text: str, source: Source) -> Detection:
        for pattern in self.allow:
            text = pattern.sub(" ", text)
        if not text or text.isspace():
            return NOTHING
        results = [(d.detect(text, source), w) for d, w in self.detectors]
        if len(results) == 1 and results[0][1] == 1.0:
            return results[0][0]
        return _combine(results, self.combine)

    def cached(self, text: str, source: Source) -> Detection | None:
        if self.cache_size <= 0:
            return None  # nothing is remembered: no need to hash the text
        key = (source, len(text), hash(text))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def remember(self, text: str, source: Source, result: Detection) -> None:
        if self.cache_size <= 0:
            return
        self._cache[(source, len(text), hash(text))] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- a request -----------------------------------------------------------------------
    def verdict(self, items: Sequence[Item], results: Sequence[Detection]) -> Finding:
        f = Finding(scanned=len(items))
        for item, r in zip(items, results):
            if r.score <= 0.0:
                continue
            f.score = max(f.score, r.score)
            for cat, s in r.categories.items():
                f.categories[cat] = max(f.categories.get(cat, 0.0), s)
            f.signals.update(r.signals)
            if r.score >= self.threshold_for(item.source):
                f.detected = True
                f.sources[item.source] = f.sources.get(item.source, 0) + 1
                f.where.append(item.where)
        return f

    def scan_sync(self, items: Sequence[Item]) -> Finding:
        return self.verdict(items, [self.detect(i.text, i.source) for i in items])


def _combine(results: Sequence[tuple[Detection, float]], how: Combine) -> Detection:
    weighted = [(r, min(1.0, r.score * w)) for r, w in results]
    if how == "max":
        score = max(s for _, s in weighted)
    elif how == "mean":
        total = sum(w for _, w in results)
        score = sum(r.score * w for r, w in results) / total if total else 0.0
    else:
        score = noisy_or(s for _, s in weighted)
    categories: dict[str, float] = {}
    signals: list[str] = []
    for r, _ in weighted:
        for cat, s in r.categories.items():
            categories[cat] = max(categories.get(cat, 0.0), s)
        signals.extend(r.signals)
    return Detection(round(score, 4), categories, tuple(sorted(set(signals))))
