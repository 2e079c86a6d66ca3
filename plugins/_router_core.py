"""The router's pure parts: per-target health and latency, strategies, vLLM metrics, complexity.

No I/O here; the plugin (``plugins/router.py``) feeds these from requests and probes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ._tokens import count_prompt_tokens

# -- target health ---------------------------------------------------------------

HEALTHY, EJECTED, PROBING = "healthy", "ejected", "probing"


@dataclass(slots=True)
class TargetStats:
    """What the router knows about one target (upstream + model) in this process.

    Passive outlier ejection: ``failures_to_eject`` consecutive failures take the
    target out for a cooldown that doubles with each ejection in a row (up to a
    ceiling). When the cooldown ends the target is half-open: one probe request
    may go to it; success brings it back, failure ejects it again for longer.
    """

    ewma_ms: float | None = None
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    probe_started: float | None = None
    successes: int = 0
    failures: int = 0
    #: the last vLLM scrape: (num_requests_waiting, num_requests_running, kv_cache_usage 0..1,
    #: outstanding at scrape, time of scrape)
    vllm: tuple[float, float, float, int, float] | None = None
    #: out because active health checks failed (a passing check ends only this kind of ejection)
    by_health: bool = False

    def state(self, now: float) -> str:
        if self.ejected_until > now:
            return EJECTED
        if self.ejections and self.consecutive_failures:
            return PROBING
        return HEALTHY

    def available(self, now: float, probe_timeout_s: float) -> bool:
        st = self.state(now)
        if st == EJECTED:
            return False
        if st == PROBING and self.probe_started is not None and now - self.probe_started < probe_timeout_s:
            return False  # one probe at a time while half-open
        return True

    def selected(self, now: float) -> None:
        if self.ejections and self.consecutive_failures and self.ejected_until <= now:
            self.probe_started = now

    def record(
        self, ok: bool, latency_ms: float | None, now: float, *, alpha: float, failures_to_eject: int,
        cooldown_s: float, max_cooldown_s: float,
    ) -> bool:
        """Account one outcome; True when it ejected the target."""
        if ok:
            self.successes += 1
            self.consecutive_failures = 0
            self.ejections = 0
            self.ejected_until = 0.0
            self.probe_started = None
            self.by_health = False
            if latency_ms is not None:
                self.ewma_ms = latency_ms if self.ewma_ms is None else alpha * latency_ms + (1 - alpha) * self.ewma_ms
            return False
        self.failures += 1
        self.consecutive_failures += 1
        if self.ejected_until > now:
            return False  # answers of requests sent before the ejection: already out
        probing = self.ejections > 0 and self.ejected_until <= now
        if probing or self.consecutive_failures >= failures_to_eject:
            self.ejected_until = now + min(max_cooldown_s, cooldown_s * (2 ** self.ejections))
            self.ejections += 1
            self.probe_started = None
            return True
        return False

    def eject_for(self, seconds: float, now: float) -> None:
        """Active health check failed: out until the next passing check (or ``seconds``)."""
        self.by_health = self.ejected_until <= now or self.by_health
        self.ejected_until = max(self.ejected_until, now + seconds)
        self.ejections = max(self.ejections, 1)
        self.consecutive_failures = max(self.consecutive_failures, 1)


# -- strategies ----------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """A target as a strategy sees it."""

    index: int
    weight: float
    outstanding: int
    stats: TargetStats


def order_weighted(cands: Sequence[Candidate], rnd: Callable[[], float] = random.random, **_: Any) -> list[Candidate]:
    """The first by weighted chance, the rest in their configured order (they are fallbacks)."""
    total = 0.0
    for c in cands:
        total += c.weight
    if total <= 0:
        return list(cands)
    x = rnd() * total
    for i, c in enumerate(cands):
        x -= c.weight
        if x < 0:
            return [c, *cands[:i], *cands[i + 1:]]
    return list(cands)


def order_round_robin(cands: Sequence[Candidate], turn: int = 0, **_: Any) -> list[Candidate]:
    n = len(cands)
    if n == 0:
        return []
    k = turn % n
    return [*cands[k:], *cands[:k]]


def order_least_outstanding(cands: Sequence[Candidate], turn: int = 0, **_: Any) -> list[Candidate]:
    # Rotating first keeps ties from always landing on the first configured target.
    rotated = order_round_robin(cands, turn)
    return sorted(rotated, key=lambda c: c.outstanding / (c.weight or 1.0))


def latency_score(c: Candidate) -> float:
    """Peak-EWMA style: expected latency times the queue we would join; untried targets first."""
    if c.stats.ewma_ms is None:
        return -1.0
    return c.stats.ewma_ms * (c.outstanding + 1) / (c.weight or 1.0)


def order_lowest_latency(cands: Sequence[Candidate], turn: int = 0, **_: Any) -> list[Candidate]:
    return sorted(order_round_robin(cands, turn), key=latency_score)


def vllm_score(c: Candidate, now: float, stale_after_s: float, kv_weight: float, running_weight: float = 0.25) -> float:
    """Waiting requests, the running batch and KV-cache pressure, plus what we sent since the scrape.

    A waiting request counts fully (it waits for a slot); a running one counts
    ``running_weight`` (it shares the engine's steps, so a bigger batch decodes
    each sequence slower). Without a fresh scrape the target is scored by our
    own in-flight count alone.
    """
    snap = c.stats.vllm
    if snap is None or now - snap[4] > stale_after_s:
        return float(c.outstanding) + kv_weight
    waiting, running, kv, outstanding_then, _ = snap
    return waiting + running * running_weight + kv * kv_weight + max(0, c.outstanding - outstanding_then)


def order_vllm(
    cands: Sequence[Candidate], turn: int = 0, now: float = 0.0, stale_after_s: float = 10.0, kv_weight: float = 4.0,
    running_weight: float = 0.25, **_: Any,
) -> list[Candidate]:
    return sorted(order_round_robin(cands, turn), key=lambda c: vllm_score(c, now, stale_after_s, kv_weight, running_weight))


STRATEGIES: dict[str, Callable[..., list[Candidate]]] = {
    "weighted": order_weighted,
    "round_robin": order_round_robin,
    "least_outstanding": order_least_outstanding,
    "lowest_latency": order_lowest_latency,
    "vllm": order_vllm,
}


# -- vLLM /metrics ------------------------------------------------------------------

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
#: current and older (before v0.10) names of the KV-cache gauge
KV_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(slots=True)
class VllmLoad:
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    seen: set[str] = field(default_factory=set)

    @property
    def valid(self) -> bool:
        return "vllm:num_requests_waiting" in self.seen


def parse_vllm_metrics(text: str, model: str | None = None) -> VllmLoad:
    """Sum the queue gauges over engines; the KV gauge is the highest engine's use.

    With ``model``, only samples labelled with that ``model_name`` count (a
    server may host several). Unknown lines and malformed values are skipped.
    """
    load = VllmLoad()
    kv_seen_current = False
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        if name not in ("vllm:num_requests_waiting", "vllm:num_requests_running", *KV_NAMES):
            continue
        if model is not None and labels:
            lab = dict(_LABEL.findall(labels))
            if "model_name" in lab and lab["model_name"] != model:
                continue
        try:
            v = float(value)
        except ValueError:
            continue
        if v != v:  # NaN
            continue
        if name == "vllm:num_requests_waiting":
            load.waiting += v
        elif name == "vllm:num_requests_running":
            load.running += v
        else:
            if name == KV_NAMES[0]:
                if not kv_seen_current:
                    load.kv_cache_usage = 0.0
                kv_seen_current = True
            elif kv_seen_current:
                continue
            load.kv_cache_usage = max(load.kv_cache_usage, min(1.0, max(0.0, v)))
        load.seen.add(name)
    return load


# -- prompt size and complexity --------------------------------------------------------

_CODE = re.compile(
    r"```|^\s*(def |class |import |from \S+ import |#include|public static|function\s*\w*\(|SELECT\s.+\sFROM\s)|[;{}]\s*$",
    re.MULTILINE | re.IGNORECASE,
)


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt's text: every message's text parts, or the ``prompt``/``input`` strings."""
    parts: list[str] = []
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    for k in ("prompt", "input"):
        v = body.get(k)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return "\n".join(parts)


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens as ``plugins/_tokens.py`` counts them (a tokenizer when one is mapped, else its estimate)."""
    return count_prompt_tokens(body)


@dataclass(slots=True)
class Features:
    prompt_tokens: int
    has_code: bool
    has_tools: bool
    turns: int
    keyword: bool


def features(body: dict[str, Any], keywords: Sequence[str] = ()) -> Features:
    text = prompt_text(body)
    msgs = body.get("messages")
    turns = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") in ("user", "assistant")) if isinstance(msgs, list) else 1
    tools = body.get("tools") or body.get("functions")
    low = text.lower() if keywords else ""
    return Features(
        prompt_tokens=estimate_tokens(body),
        has_code=bool(_CODE.search(text)),
        has_tools=bool(tools),
        turns=turns,
        keyword=any(k.lower() in low for k in keywords),
    )
