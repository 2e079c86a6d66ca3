"""Prices, cost and token estimates for the metering plugin (and anyone who needs a cost).

Prices are per million tokens. The default table ships in ``plugins/data/prices.yaml``;
a config overrides or extends it per model (top-level ``prices:`` first, then the
metering plugin's own ``prices:``). Lookups are resolved once per model name and
cached, so pricing a request is a dict hit.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from proxy import Usage
from proxy.prices import PriceSpec, parse_table  # noqa: F401  (PriceSpec: part of this module's interface)

DEFAULT_PRICES = Path(__file__).with_name("data") / "prices.yaml"

log = logging.getLogger("sluice.metering")

#: what may follow a listed name for a model to be priced as it: a dated snapshot as OpenAI
#: names them (``-2024-08-06``, ``-0613``), or ``@20240620`` / ``-20240620``. Any other
#: suffix names another model (``o1-mini``, ``o3-pro``, ``gpt-4o-realtime-preview``) whose
#: price may be ten times off: unpriced is better than wrong.
_SNAPSHOT = re.compile(r"[-@](?:20\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])|(?:20\d\d)?(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))")


@dataclass(frozen=True, slots=True)
class Price:
    """A resolved price per token (not per million), ready to multiply."""

    model: str
    input: float
    cached_input: float
    output: float
    as_of: str | None = None

    @classmethod
    def from_spec(cls, model: str, spec: PriceSpec) -> Price:
        cached = spec.input if spec.cached_input is None else spec.cached_input
        return cls(model, spec.input / 1e6, cached / 1e6, spec.output / 1e6, spec.as_of)

    def cost(self, usage: Usage) -> float:
        """Money for one request's usage: cached prompt tokens at their own rate."""
        cached = min(max(usage.cached_tokens, 0), max(usage.prompt_tokens, 0))
        fresh = max(usage.prompt_tokens, 0) - cached
        return fresh * self.input + cached * self.cached_input + max(usage.completion_tokens, 0) * self.output

    def cost_of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input + completion_tokens * self.output


def load_default_table(path: Path = DEFAULT_PRICES) -> tuple[str, dict[str, PriceSpec]]:
    data = yaml.safe_load(path.read_text()) or {}
    return str(data.get("currency", "USD")), parse_table(data.get("models") or {}, "models")


class PriceTable:
    """Model name -> :class:`Price`, with provider-prefix and dated-snapshot matching.

    ``"*"`` in an override prices every model the table does not know. A model left
    unpriced is logged once per table: it costs 0 and no budget counts it.
    """

    def __init__(self, specs: Mapping[str, PriceSpec], currency: str = "USD") -> None:
        self.currency = currency
        self._prices = {m: Price.from_spec(m, s) for m, s in specs.items() if m != "*"}
        self._fallback = Price.from_spec("*", specs["*"]) if "*" in specs else None
        # longest first, so "gpt-4o-mini-2024-07-18" finds gpt-4o-mini before gpt-4o
        self._prefixes = sorted(self._prices, key=len, reverse=True)
        #: each name's own price (None: none), as found
        self._resolved: dict[str, Price | None] = {}
        #: the names logged as having no price at all
        self._unpriced: set[str] = set()

    @classmethod
    def build(cls, *overrides: Mapping[str, Any] | None, base: Path | None = DEFAULT_PRICES) -> PriceTable:
        """The default table, then each override mapping in order (later wins)."""
        currency, specs = load_default_table(base) if base is not None else ("USD", {})
        for o in overrides:
            if o:
                specs.update(parse_table(o, "prices"))
        return cls(specs, currency)

    def __contains__(self, model: str) -> bool:
        return self.lookup(model) is not None

    def models(self) -> list[str]:
        return sorted(self._prices)

    def lookup(self, model: str | None, also: str | None = None) -> Price | None:
        """``model``'s price; when it has none of its own, ``also``'s (the model a request was sent to, when
        its answer names another); else the ``"*"`` price; else ``None``, logged once per name."""
        found = self._own(model)
        if found is None and also and also != model:
            found = self._own(also)
        if found is not None:
            return found
        if self._fallback is None and model and model not in self._unpriced and len(self._unpriced) < 4096:
            # client-chosen names must not grow this forever (nor the log)
            self._unpriced.add(model)
            shown = model if len(model) <= 100 else model[:100] + "..."
            log.warning("prices: no price for model %r: its requests count as costing 0, in spend budgets "
                        "too (give it one in prices:)", shown)
        return self._fallback

    def _own(self, model: str | None) -> Price | None:
        """``model``'s own price (by name, provider prefix or dated snapshot), not the ``"*"`` one."""
        if not model:
            return None
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = self._resolve(model)
        if len(self._resolved) < 4096:  # client-chosen names must not grow this forever
            self._resolved[model] = found
        return found

    def _resolve(self, model: str) -> Price | None:
        names = [model]
        if "/" in model:
            names.append(model.rsplit("/", 1)[1])
        for name in names:
            p = self._prices.get(name)
            if p is not None:
                return p
        for name in names:
            for known in self._prefixes:
                if name.startswith(known) and _SNAPSHOT.fullmatch(name, len(known)):
                    return self._prices[known]
        return None


# -- token estimates ---------------------------------------------------------------
#
# Used only when the upstream reported no usage (a client that went away mid-stream,
# an upstream without usage); the record is then marked estimated. Prompts are
# counted by plugins/_tokens.py (a real tokenizer when one is configured, else
# OpenAI's rule of thumb), the same count rate limits use.

from ._tokens import completion_allowance, count_prompt_tokens, estimate_text  # noqa: E402


def estimate_prompt_tokens(body: Any, model: str | None = None, tokenizers: Mapping[str, str] | None = None) -> int:
    """Tokens of a chat, completions or embeddings request body."""
    return count_prompt_tokens(body, model, tokenizers=tokenizers)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_completion_tokens_from_response(body: Any) -> int:
    """Tokens of a buffered answer's generated text, estimated."""
    if not isinstance(body, dict):
        return 0
    n = 0
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message")
        if isinstance(msg, dict):
            n += estimate_text(_content_text(msg.get("content")))
            if msg.get("tool_calls"):
                n += estimate_text(str(msg["tool_calls"]))
        text = choice.get("text")
        if isinstance(text, str):
            n += estimate_text(text)
    return n


#: bytes of one streamed chat chunk event carrying one token (OpenAI and vLLM send 180-240)
EVENT_BYTES = 200


def reported_usage(ctx: Any) -> Usage | None:
    """The upstream's usage, if it gave one that can be billed: all-zero usage on an answer is how
    malformed usage reaches us (no real prompt has 0 tokens), and counts as none. Metering's ledger and
    the tokens-per-minute limit read usage this one way."""
    u = ctx.usage
    if u is not None and (u.prompt_tokens or u.completion_tokens or not ctx.attempts):
        return u
    return None


def upstream_had_it(ctx: Any) -> bool:
    """Whether a request with no answer bills its prompt: the client left, or the upstream did not answer
    in time, after it was sent (an attempt cancelled or timed out before it had a connection never reached
    the upstream). Either way Sluice hung up on an upstream that had the request: any attempt, not only the
    last (a timed-out attempt is followed by a retry or a fallback that may fail otherwise)."""
    return any(a.error in ("cancelled", "timeout") and not a.unsent for a in ctx.attempts)


def estimate_completion_tokens_from_stream(ctx: Any) -> int:
    """Tokens generated in a stream that gave no usage (cut short, or an upstream that reports none), from
    the events the upstream sent (``ctx.stream_events``: counted as they arrive, so what a stream guard
    held back from the client counts; ``[DONE]`` and a hidden usage event are not counted).

    A streamed answer carries at least one token per content event; each choice's role event carries
    none, and its finish event may carry none (OpenAI sends it apart, vLLM with the last token): both
    are taken off, a role event per choice asked for (``n``) and a finish event per choice that got
    that far. Servers merge tokens under load, so this is a lower bound. With no event count (no event
    boundary seen), events are reckoned from bytes.
    """
    events = ctx.stream_events
    if not events and ctx.stream_bytes:
        events = ctx.stream_bytes // EVENT_BYTES
    end = ctx.stream_end
    finished = len(end.reasons) if end is not None else 0
    body = ctx.json_body
    n = body.get("n") if body is not None else None
    choices = n if type(n) is int and 1 <= n <= 128 else 1
    return max(events - choices - finished, 0)


def max_output_tokens(body: Any, default: int) -> int:
    """The output the client allowed (``max_completion_tokens``, ``max_tokens``), else ``default``; times ``n``."""
    return completion_allowance(body, default)
