"""vLLM load signals read from its Prometheus ``/metrics`` endpoint.

vLLM's OpenAI server exposes, per engine (label ``engine``) and model
(``model_name``):

* ``vllm:num_requests_running``: sequences in the running batch;
* ``vllm:num_requests_waiting``: sequences queued for a batch slot;
* ``vllm:kv_cache_usage_perc``: fraction of KV-cache blocks in use, 0..1
  (``vllm:gpu_cache_usage_perc`` before vLLM 0.10, read as a fallback);
* ``vllm:prompt_tokens_total`` / ``vllm:generation_tokens_total``: counters of
  tokens processed, which the end-to-end tests compare with Sluice's ledger.

The parser reads only those families and skips the rest without tokenising
it: a vLLM ``/metrics`` page is mostly histogram buckets and runs to hundreds
of lines, and a router may poll several servers every few hundred
milliseconds. It has no dependency beyond the standard library so that it can
be vendored into a plugin module unchanged.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_LEGACY = "vllm:gpu_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"

_GAUGES_SUMMED = (RUNNING, WAITING, PROMPT_TOKENS, GENERATION_TOKENS)
_GAUGES_MAXED = (KV_CACHE, KV_CACHE_LEGACY)
WANTED = frozenset(_GAUGES_SUMMED + _GAUGES_MAXED)


@dataclass(frozen=True, slots=True)
class VllmLoad:
    """One reading of a vLLM server's load.

    Counts are summed over engines (a data-parallel server reports one series
    per engine); KV-cache use is the fullest engine's, since that is the one
    that will preempt first.
    """

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    #: ``time.monotonic()`` when the reading was taken
    at: float = field(default_factory=time.monotonic)

    def score(self, *, waiting_weight: float = 4.0, kv_weight: float = 8.0) -> float:
        """A single comparable number, lower is less busy.

        Waiting requests weigh more than running ones: a running request shares
        a batch step, a waiting one has not started at all. KV-cache use near 1
        predicts preemption (recomputation), the costliest outcome, so it is
        weighted as several queued requests' worth.
        """
        return self.running + waiting_weight * self.waiting + kv_weight * self.kv_cache_usage


class MetricsFormatError(ValueError):
    """The body was not Prometheus text, or had none of vLLM's load gauges."""


def _split_sample(line: str) -> tuple[str, str, float] | None:
    """``name{labels} value [timestamp]`` -> (name, labels, value); ``None`` when unparsable."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            return None
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    parts = rest.split()
    if not parts:
        return None
    try:
        value = float(parts[0])
    except ValueError:
        return None
    return name.strip(), labels, value


def _label(labels: str, key: str) -> str | None:
    # Label values in vLLM's output are model names and engine indices, never
    # containing '",' sequences, so a scan is enough; a quoted comma inside a
    # value would only make this return a truncated value, not crash.
    for part in labels.split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip().strip('"')
    return None


def parse_metrics(text: str, model: str | None = None) -> VllmLoad:
    """Parse a vLLM ``/metrics`` body into a :class:`VllmLoad`.

    With ``model``, only series whose ``model_name`` label equals it count (a
    server started with several ``--served-model-name`` aliases reports the
    first one). Raises :class:`MetricsFormatError` when none of the load gauges
    is present, so a misconfigured target (not a vLLM server) is noticed rather
    than read as idle.
    """
    sums: dict[str, float] = {}
    maxes: dict[str, float] = {}
    for raw in text.splitlines():
        if not raw.startswith("vllm:"):
            continue
        sample = _split_sample(raw)
        if sample is None:
            continue
        name, labels, value = sample
        if name not in WANTED or math.isnan(value):
            continue
        if model is not None and _label(labels, "model_name") not in (None, model):
            continue
        if name in _GAUGES_MAXED:
            maxes[name] = max(maxes.get(name, 0.0), value)
        else:
            sums[name] = sums.get(name, 0.0) + value
    if RUNNING not in sums and WAITING not in sums:
        raise MetricsFormatError("no vllm:num_requests_running or vllm:num_requests_waiting series")
    return VllmLoad(
        running=sums.get(RUNNING, 0.0),
        waiting=sums.get(WAITING, 0.0),
        kv_cache_usage=maxes.get(KV_CACHE, maxes.get(KV_CACHE_LEGACY, 0.0)),
        prompt_tokens_total=sums.get(PROMPT_TOKENS, 0.0),
        generation_tokens_total=sums.get(GENERATION_TOKENS, 0.0),
    )


def metrics_url(base_url: str) -> str:
    """``http://h:p/v1`` (an upstream URL as configured) -> ``http://h:p/metrics``."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/metrics"


async def fetch_load(session, base_url: str, *, timeout: float = 1.0, model: str | None = None) -> VllmLoad:
    """GET ``/metrics`` of the vLLM server behind ``base_url`` with an ``aiohttp`` session.

    Raises ``asyncio.TimeoutError``, ``aiohttp.ClientError`` or
    :class:`MetricsFormatError`; callers decide what an unreadable server means
    (a router should treat it as unknown, not as idle).
    """
    import aiohttp

    async with asyncio.timeout(timeout):
        async with session.get(metrics_url(base_url), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise MetricsFormatError(f"/metrics answered HTTP {resp.status}")
            text = await resp.text()
    return parse_metrics(text, model=model)


def least_busy(loads: Mapping[str, VllmLoad | None], order: Iterable[str]) -> list[str]:
    """``order`` re-sorted by load score, stable; unknown loads go last in their original order."""
    order = list(order)
    known = [n for n in order if loads.get(n) is not None]
    unknown = [n for n in order if loads.get(n) is None]
    known.sort(key=lambda n: loads[n].score())  # type: ignore[union-attr]
    return known + unknown
