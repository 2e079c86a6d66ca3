"""Usage, cost, a ledger row per request, and spend budgets per key and team.

* Usage comes from the upstream (``ctx.usage``, which the core fills from the answer's
  ``usage`` or the stream's usage event: ``needs_usage`` makes it ask for one on
  streams the client did not). Without one (a client gone mid-stream or before the
  answer, an upstream that reports none) Sluice counts: the prompt with
  plugins/_tokens.py, the completion from the buffered answer or the events relayed
  (none when the client left first), and marks the row ``estimated``.
* Cost comes from the price table (plugins/data/prices.yaml, overridden by the
  top-level ``prices:`` and this plugin's ``prices:``).
* The ledger is an append-only SQLite table written by the state's batched writer
  thread, keyed by request id (a row written twice is still one row).
* Budgets reserve the request's worst-case cost at admission (prompt estimate plus
  the output the client allowed) with an atomic ``add_sum`` that refuses past the
  limit, and give back the difference once the real cost is known. With Redis
  state the sums are shared, so the limit holds across replicas. Refusals are 429
  with OpenAI's ``insufficient_quota`` code. In-process sums start from what the
  ledger holds for the current day and month, so a restart does not reset them.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import logging
import os
import sqlite3
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy import (AdminRoute, Command, ConfigError, Context, Plugin, PluginConfig, ProxyError, StashKey, StateUnavailable, Usage,
                   hookimpl)
from proxy.openai import api_path
from proxy.state import check_backends, settle_after_lost_answer

from ._tokens import NO_COMPLETION_PATHS, count_prompt_tokens, estimate_text, load_tokenizer
from ._usage import (
    PriceTable,
    estimate_completion_tokens_from_response,
    estimate_completion_tokens_from_stream,
    estimate_prompt_tokens,
    max_output_tokens,
    parse_table,
    reported_usage,
    upstream_had_it,
)
from .metrics import ModelLabel, families, route_name, served_models

log = logging.getLogger("sluice.metering")

LEDGER_TABLE = "ledger"
RESERVED: StashKey[list[tuple[str, float, float]]] = StashKey("metering.reserved")
#: a prompt counted in the executor (at admission, or for the row's estimate): (the body counted, the model, its tokens)
PROMPT: StashKey[tuple[Any, str | None, int]] = StashKey("metering.prompt")
#: above this body size a configured tokenizer counts a prompt in the executor, off the loop
TOKENIZE_OFF_LOOP_BYTES = 32 * 1024


def _counted(ctx: Context, body: Any, model: str | None) -> int | None:
    """The prompt's count made in the executor earlier in this request, if the body and model are still those."""
    counted = ctx.stash.get(PROMPT)
    return counted[2] if counted is not None and counted[0] is body and counted[1] == model else None


GROUPS = {
    "key": "key_id",
    "team": "team",
    "user": "user",
    "model": "COALESCE(model_served, model_requested)",
    "day": "day",
    "route": "route",
    "upstream": "upstream",
}
SUMS = (
    "COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, "
    "SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens, "
    "ROUND(SUM(cost), 9) AS cost, SUM(estimated) AS estimated, SUM(cache_hit) AS cache_hits"
)


def ledger_table() -> Any:
    from proxy.state import Table

    return Table(
        LEDGER_TABLE,
        {
            "id": str, "ts": float, "day": str, "key_id": str, "key_name": str, "team": str, "user": str,
            "route": str, "endpoint": str, "model_requested": str, "model_served": str, "upstream": str,
            "attempts": int, "stream": int, "prompt_tokens": int, "completion_tokens": int, "cached_tokens": int,
            "reasoning_tokens": int, "total_tokens": int, "cost": float, "currency": str, "priced": int,
            "status": int, "outcome": str, "answered_by": str, "latency_ms": float, "ttft_ms": float,
            "cache_hit": int, "estimated": int, "variant": str, "tags": str,
        },
        pk="id",
        indexes=(("day",), ("key_id", "day"), ("team", "day")),
    )


#: the ledger's columns in the order metering gives a row's values (the table's own order)
LEDGER_COLUMNS: tuple[str, ...] = (
    "id", "ts", "day", "key_id", "key_name", "team", "user", "route", "endpoint", "model_requested", "model_served",
    "upstream", "attempts", "stream", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "total_tokens", "cost", "currency", "priced", "status", "outcome", "answered_by", "latency_ms", "ttft_ms",
    "cache_hit", "estimated", "variant", "tags",
)


# -- periods ---------------------------------------------------------------------------

_DAYS: dict[int, str] = {}


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of an epoch time in UTC (remembered per day: strftime costs more than the rest of a row)."""
    n = int(ts // 86400)
    day = _DAYS.get(n)
    if day is None:
        if len(_DAYS) > 64:
            _DAYS.clear()
        day = _DAYS[n] = datetime.fromtimestamp(n * 86400, timezone.utc).strftime("%Y-%m-%d")
    return day


def period_window(period: str, now: float) -> tuple[str, float]:
    """The UTC period containing ``now``: its label and its end (epoch seconds)."""
    dt = datetime.fromtimestamp(now, timezone.utc)
    if period == "day":
        start = calendar.timegm((dt.year, dt.month, dt.day, 0, 0, 0))
        return dt.strftime("%Y-%m-%d"), float(start + 86400)
    year, month = (dt.year + 1, 1) if dt.month == 12 else (dt.year, dt.month + 1)
    return dt.strftime("%Y-%m"), float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass(frozen=True, slots=True)
class BudgetRule:
    scope: str
    period: str
    limit: float
    ids: frozenset[str] | None


#: path segments of the calls that bill no tokens (a model list, files, audio, images, batches, moderations)
NO_TOKEN_SEGMENTS = frozenset({"models", "files", "uploads", "batches", "audio", "images", "moderations",
                               "fine_tuning", "vector_stores"})


#: most reservations a metering instance keeps trying to give back or settle while its counters are away
MAX_PENDING_REPAIRS = 1000


class PendingRepairs:
    """How many budget repairs (undos, settlements) wait in the background in this process."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


async def _repair(call: Any, end: float, failed: str, pending: PendingRepairs) -> None:
    """One background repair (see ``Metering._repair_later``): a module function, so that the task holds
    the counters its ``call`` names and not the plugin instance."""
    try:
        if not await settle_after_lost_answer(call, end, time.time):
            log.error("metering: %s", failed)
    finally:
        pending.n -= 1


def _bills_tokens(ctx: Context) -> bool:
    """Whether an estimate can stand for the request's tokens when the upstream gave no usage: a POST to
    anything but the calls that bill none (chat, completions, responses, embeddings, and what else a model
    server offers: vLLM's messages, rerank, score...)."""
    return ctx.method == "POST" and NO_TOKEN_SEGMENTS.isdisjoint(api_path(ctx.path).split("/"))


class Budget(BaseModel):
    """One spend budget rule of the metering plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: Literal["key", "team"] = Field(..., description="Whose spend is summed: each API key, or each team.")
    period: Literal["day", "month"] = Field(..., description="The UTC calendar period the sum covers.")
    limit: float = Field(..., gt=0, le=1e12, description="Most money per scope and period, in the price table's currency.")
    ids: list[str] | None = Field(
        None, max_length=10000, description="Only these key ids or team names (default: every key or team separately).")


class Metering(Plugin):
    """Meters usage and cost into a ledger, and enforces spend budgets per key and team."""

    name = "metering"
    kind = "observer"
    needs_usage = True
    done_required = True  # a ledger row is never dropped
    #: a budget's reservation is priced at the model a router or an experiment chose (ctx.targets); before
    #: them, an alias the price table does not know reserves nothing
    follows = ("router", "experiments")

    Budget = Budget  # the rule's model, also as Metering.Budget

    class Config(PluginConfig):
        prices: dict[str, dict[str, Any]] = Field(
            default_factory=dict,
            description="Price overrides per model (input, cached_input, output per million tokens); win over the "
            "top-level prices and the defaults. '*' prices every unknown model.")
        ledger: bool = Field(True, description="Write one ledger row per request that reached an upstream or the cache.")
        ledger_name: str = Field(
            "ledger", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Records file of the ledger: <state.dir>/<name>.db.")
        record_answered: bool = Field(
            False, description="Also write rows for requests answered before any upstream (auth, limits, guards).")
        tokenizers: dict[str, str] = Field(
            default_factory=dict, description="Model glob -> local tokenizer.json, for exact prompt estimates.")
        budgets: list[Budget] = Field(
            default_factory=list, max_length=64, description="Spend limits per key or team per day or month.")
        budget_on_error: Literal["closed", "open"] = Field(
            "closed", description="When the counters backend is down: 'closed' answers 503, 'open' admits without "
            "reserving (spend is still reconciled once it is back).")
        budget_backend: Literal["auto", "memory", "redis"] = Field(
            "auto", description="Where budget sums live: Redis when configured (shared by replicas), else this process.")
        reserve_output_tokens: int = Field(
            1024, ge=0, le=10_000_000,
            description="Output tokens reserved at admission when the request sets no max_tokens / max_completion_tokens.")
        identity_budgets: bool = Field(
            True, description="Also apply per-key budgets an auth plugin puts in identity.limits "
            "(budget_per_day, budget_per_month).")

        @field_validator("prices")
        @classmethod
        def _prices(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            parse_table(v, "prices")
            return v

        @model_validator(mode="after")
        def _budgets(self) -> Metering.Config:
            seen = set()
            for b in self.budgets:
                key = (b.scope, b.period, tuple(sorted(b.ids)) if b.ids else None)
                if key in seen:
                    raise ValueError(f"two budgets for scope {b.scope} and period {b.period} over the same ids")
                seen.add(key)
            return self

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.config: Metering.Config = config
        top = getattr(getattr(runtime, "config", None), "prices", None) or {}
        self.prices = PriceTable.build(top, config.prices)
        self.rules = [BudgetRule(b.scope, b.period, b.limit, frozenset(b.ids) if b.ids else None) for b in config.budgets]
        self.ledger: Any = None
        self.counters: Any = None
        self.model_label = ModelLabel.for_runtime(runtime)
        self.families = families(runtime)
        self._tokenizers = config.tokenizers or None
        #: reservations being given back or settled in the background (counters away when they were to be),
        #: counted for the process: a repair outlives a reload, and holds the counters, not this instance
        self._repairs = runtime.shared("metering.repairs", PendingRepairs)
        self._tokenizer_failed = False
        #: the sluice_cost_total accumulator per (route, model label)
        self._cost: dict[tuple[str, str], Any] = {}
        #: some budget may apply: a rule, or a key's own (identity budgets): counters, and an admission hook
        self.budgeted = bool(self.rules or config.identity_budgets)
        if not self.budgeted:
            # no budget to reserve against: no on_request at all, so the core neither calls nor times one
            # (the chain builds its hook lists from the instance's attributes)
            self.on_request = None  # type: ignore[assignment]
        if not self._remote_budgets(runtime):
            # No budgets, or budgets on this process's counters, which answer at once: both hooks
            # are plain functions that run the same coroutines to their end on the spot. A route
            # whose on_done hooks are all plain runs them in the request's task, after the answer,
            # instead of through the core's on_done queue (a task switch and a queued context per
            # request). Budgets in Redis keep the async hooks.
            if self.budgeted and not self._tokenizers:
                # with a tokenizer, a big prompt's reservation is counted in the executor: that awaits
                self.on_request = self.on_request_now  # type: ignore[method-assign]
            # a big prompt the row must estimate is counted in the executor too: on_done_now hands the
            # core a coroutine for that one request
            self.on_done = self.on_done_now  # type: ignore[method-assign]

    def _remote_budgets(self, runtime: Any) -> bool:
        """Whether budget calls go to Redis (and can wait); the backend start() will choose."""
        if not self.budgeted:
            return False  # no counters at all
        backend = self.config.budget_backend
        if backend == "auto":
            backend = "redis" if getattr(getattr(runtime, "state", None), "has_redis", False) else "memory"
        return backend != "memory"

    @classmethod
    def check(cls, config: Config, sluice: Any) -> None:
        if config.budgets or config.identity_budgets:
            check_backends(sluice, budget_backend=config.budget_backend)
        # that each file is there; whether it loads is seen at start (loading takes a while, off the loop)
        for pattern, path in config.tokenizers.items():
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ValueError(f"tokenizers.{pattern}: cannot read {path}: no such readable file")

    async def start(self) -> None:
        for pattern, path in self.config.tokenizers.items():
            # here, not on the first request: a bad path would make that request's budget
            # fail open and lose its ledger row
            try:
                await self.runtime.run_cpu(load_tokenizer, path)
            except Exception as e:
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ConfigError(f"metering: tokenizers.{pattern}: cannot load {path}: {reason} (plugin {self.id})") from None
        state = self.runtime.state
        if self.config.ledger:
            self.ledger = state.records(self.config.ledger_name)
            self.ledger.ensure(ledger_table())
        if self.budgeted:
            self.counters = state.counters(self.config.budget_backend)
            workers = self.runtime.config.server.workers
            if self.rules and workers > 1 and not self._remote_budgets(self.runtime) and self.runtime.worker_id == 0:
                # every worker keeps its own sums: each admits up to the whole limit (said once, by worker 0)
                log.warning("metering (%s): budgets are counted in each process, and server.workers is %d: a key or team "
                            "can spend up to %d times its limit. Configure state.redis to share them.",
                            self.id, workers, workers)
            if self.ledger is not None and not self._remote_budgets(self.runtime):
                self._seed_budgets()
        self.runtime.shared("metering.instances", weakref.WeakSet).add(self)

    async def stop(self) -> None:
        if self.ledger is not None:
            try:
                await self.ledger.flush()
            except StateUnavailable:
                log.error("metering: the ledger did not flush before stop")

    # -- budgets -----------------------------------------------------------------------
    def _seed_budgets(self) -> None:
        """Start this process's budget sums from what the ledger says was spent this UTC day and month.

        Without it a restart would give every key and team its whole budget again. Once per
        process and ledger: the first instance to start with budgets in this process and this
        ledger reads, in the background, the ledger's spend per key and per team from the rows
        written before it started, and adds it to the sums; the rows written since are this
        process's own, which the sums count as they settle. Later instances (a reload) find it
        done or under way. The task is kept in ``runtime.shared("metering.seeded_ledgers")``
        under the ledger's name.
        """
        name = self.config.ledger_name
        seeded = self.runtime.shared("metering.seeded_ledgers", dict)
        if name not in seeded:
            # a function of the state's objects, not of this instance: a reload must not wait for it to free the instance
            seeded[name] = self.runtime.spawn(seed_budgets(self.ledger, self.counters, self.id, name, time.time()),
                                              f"metering-seed-{name}")

    def applicable(self, ctx: Context, now: float) -> list[tuple[str, float, float]]:
        """(counter key, limit, period end) of every budget this request counts against."""
        ident = ctx.identity
        if ident is None:
            return []
        out = []
        for r in self.rules:
            who = ident.key_id if r.scope == "key" else ident.team
            if not who or (r.ids is not None and who not in r.ids):
                continue
            label, end = period_window(r.period, now)
            _add_budget(out, f"budget:{r.scope}:{who}:{r.period}:{label}", r.limit, end)
        if self.config.identity_budgets and ident.limits:
            for period in ("day", "month"):
                limit = ident.limits.get(f"budget_per_{period}")
                if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
                    label, end = period_window(period, now)
                    _add_budget(out, f"budget:key:{ident.key_id}:{period}:{label}", float(limit), end)
        return out

    def reserve_amount(self, ctx: Context, prompt: int | None = None) -> float:
        """The request's worst case: its prompt (``prompt`` when already counted) and the most output it allows."""
        price = self.prices.lookup(self._priced_model(ctx))
        if price is None:
            return 0.0
        body = ctx.json_body
        if prompt is None:
            prompt = self._prompt_tokens(body, ctx.model)
        if ctx.path.endswith(NO_COMPLETION_PATHS):
            return price.cost_of(prompt, 0)  # embeddings and moderations generate nothing (ratelimit reserves none either)
        return price.cost_of(prompt, max_output_tokens(body, self.config.reserve_output_tokens))

    def _big_prompt(self, ctx: Context) -> tuple[Any, str | None] | None:
        """The body and model of a prompt for a configured tokenizer to count in the executor, off the loop (as
        ratelimit counts them): over 32 KiB of JSON and not counted there yet in this request."""
        if self._tokenizers is None or len(ctx.raw) <= TOKENIZE_OFF_LOOP_BYTES:
            return None
        body, model = ctx.json_body, ctx.model
        if body is None or _counted(ctx, body, model) is not None:
            return None
        return body, model

    async def _count_off_loop(self, ctx: Context, body: Any, model: str | None) -> int:
        """The prompt's count, made in the executor and kept for the rest of the request (the row's estimate)."""
        prompt = await self.runtime.run_cpu(self._prompt_tokens, body, model)
        ctx.stash[PROMPT] = (body, model, prompt)
        return prompt

    def _prompt_tokens(self, body: Any, model: str | None, ctx: Context | None = None) -> int:
        """The prompt's count: the configured tokenizer's, or the byte estimate if it fails on this text.
        With ``ctx``, the count made at admission is reused when the body and model are still the same."""
        if ctx is not None and (counted := _counted(ctx, body, model)) is not None:
            return counted
        try:
            return estimate_prompt_tokens(body, model, self._tokenizers)
        except Exception as e:
            # a tokenizer can fail on some inputs (a vocabulary without an unknown token): the
            # budget and the ledger row matter more than an exact count
            if not self._tokenizer_failed:
                self._tokenizer_failed = True
                log.warning("metering: a tokenizer failed (%s); prompts it cannot count are estimated from their bytes",
                            type(e).__name__)
            return count_prompt_tokens(body, model, tokenizer=estimate_text)

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        if ctx.answered or self.counters is None:
            return
        now = time.time()
        budgets = self.applicable(ctx, now)
        if budgets:
            if not _bills_tokens(ctx):
                self._count_unreserved(ctx, budgets)
                return
            await self._reserve(ctx, budgets, now)

    @staticmethod
    def _count_unreserved(ctx: Context, budgets: list[tuple[str, float, float]]) -> None:
        """A request admitted without a reservation still has its real cost added to ``budgets`` in on_done, as
        its ledger row counts it (and a restart's sums from the ledger): a call that bills no tokens (a model
        list, a file, audio, images; gpt-image-1 and gpt-4o-transcribe report usage), or one admitted while
        the counters were away (``budget_on_error: open``)."""
        ctx.stash[RESERVED] = [(key, 0.0, end) for key, _, end in budgets]

    async def _reserve(self, ctx: Context, budgets: list[tuple[str, float, float]], now: float) -> None:
        """Reserve the request's worst case on every budget that applies, or refuse it."""
        big = self._big_prompt(ctx)
        amount = self.reserve_amount(ctx, await self._count_off_loop(ctx, *big) if big is not None else None)
        taken: list[tuple[str, float, float]] = []
        ctx.stash[RESERVED] = taken
        mark = ctx.request_id  # each reservation is recorded under it: given back exactly once, whatever happens
        asking: tuple[str, float, float] | None = None
        try:
            for key, limit, end in budgets:
                asking = (key, amount, end)
                st = await self.counters.add_sum(key, amount, limit, end, mark=mark if amount > 0 else None)
                asking = None
                if not st.allowed:
                    await self._give_back(taken, mark)
                    taken.clear()
                    raise ProxyError(
                        429,
                        "You exceeded your current quota: the spend budget of this key or team for this period is used up.",
                        type="insufficient_quota",
                        code="insufficient_quota",
                        headers={"retry-after": str(max(int(end - now), 1))},
                        reason="budget_exceeded",
                    )
                taken.append((key, amount, end))
            if amount > 0:
                # the reservation is the worst case: it is given back to the real cost in on_done, which must
                # not wait for the observers' batch (the key's next request would see the worst case still held)
                ctx.settle_now = True
        except asyncio.CancelledError:
            # the client went away while a reservation's answer was on its way: it may have been made, and it is
            # in no list on_done reconciles (those in ``taken`` are): undone by its record once the counters answer
            if asking is not None and amount > 0:
                self._undo_later(asking[0], mark, asking[2])
            raise
        except StateUnavailable as e:
            if asking is not None and amount > 0 and e.ambiguous:
                # its answer was lost, not necessarily the add: undone in the background if it was made
                self._undo_later(asking[0], mark, asking[2])
            await self._give_back(taken, mark)
            taken.clear()
            self.runtime.on_plugin_error(self.id, "on_request")
            if self.config.budget_on_error == "closed":
                # a plain ProxyError is the plugin's decision; StateUnavailable would be judged by the
                # plugin-wide on_error, which is "open" for an observer
                raise ProxyError(
                    503, "Spend budgets cannot be checked right now; try again shortly.",
                    code="state_unavailable", reason="budget_state_unavailable", headers={"retry-after": "1"},
                ) from None
            log.warning("metering: budget counters unavailable; admitting without a reservation request_id=%s", ctx.request_id)
            self._count_unreserved(ctx, budgets)  # the real cost is still added in on_done, if the counters are back by then

    def on_request_now(self, ctx: Context) -> None:
        """``on_request`` with budgets on in-process counters (or none): finished before it returns."""
        if ctx.answered or self.counters is None or ctx.identity is None:
            return  # no budget can apply (applicable() needs an identity)
        now = time.time()
        budgets = self.applicable(ctx, now)
        if budgets:  # a coroutine only when there is something to reserve
            if not _bills_tokens(ctx):
                self._count_unreserved(ctx, budgets)
                return
            _drive(self._reserve(ctx, budgets, now))

    async def _give_back(self, taken: list[tuple[str, float, float]], mark: str) -> None:
        """Undo the reservations made under ``mark``; one the counters cannot take now is undone in the
        background once they answer (undoing is idempotent), else it stays counted until its period ends."""
        for key, amount, end in taken:
            if amount:
                try:
                    await self.counters.undo_sum(key, mark)
                except StateUnavailable:
                    self._undo_later(key, mark, end)

    def _undo_later(self, key: str, mark: str, end: float) -> None:
        counters = self.counters
        self._repair_later(lambda: counters.undo_sum(key, mark), end, "metering-undo-reservation",
                           "could not release a budget reservation (it stays counted until the period ends)")

    def _repair_later(self, call: Any, end: float, name: str, failed: str) -> None:
        """Carry out an idempotent counters ``call`` in the background once the counters answer (until
        ``end``, the period's end): an undo or a settlement whose answer was lost or never came. ``call``
        must not hold this instance: a reload would otherwise keep it until the repair ends."""
        pending = self._repairs
        if pending.n >= MAX_PENDING_REPAIRS:
            log.error("metering: %s", failed)
            return
        pending.n += 1
        self.runtime.spawn(_repair(call, end, failed, pending), name)

    # -- after the answer ----------------------------------------------------------------
    def _priced_model(self, ctx: Context) -> str | None:
        if ctx.upstream is not None and ctx.upstream.model:
            return ctx.upstream.model
        # at admission a router before us may already have chosen where the request goes
        if ctx.upstream is None and ctx.targets and ctx.targets[0].model:
            return ctx.targets[0].model
        return ctx.model

    @staticmethod
    def _answered(ctx: Context) -> bool:
        return any(a.status is not None and a.status < 400 for a in ctx.attempts)

    def usage_of(self, ctx: Context) -> Usage:
        """The request's usage: the upstream's, else an estimate marked so (for the endpoints that bill
        tokens: a model list, a file or an audio call has no tokens to estimate)."""
        u = reported_usage(ctx)
        if u is not None:
            return u
        if not _bills_tokens(ctx):
            return Usage()
        if not self._answered(ctx):
            if upstream_had_it(ctx):
                # the client left while the upstream had the request: it bills the prompt
                prompt = self._prompt_tokens(ctx.json_body, ctx.model, ctx)
                return Usage(prompt, 0, prompt, estimated=True)
            return Usage()  # nothing generated: connect errors and upstream 4xx/5xx bill nothing
        body = ctx.json_body
        prompt = self._prompt_tokens(body, ctx.model, ctx)
        if ctx.response is not None:
            completion = estimate_completion_tokens_from_response(ctx.response.json)
        else:
            completion = estimate_completion_tokens_from_stream(ctx)
        return Usage(prompt, completion, prompt + completion, estimated=True)

    def _estimated_big_prompt(self, ctx: Context) -> tuple[Any, str | None] | None:
        """:meth:`_big_prompt` when the row's usage is an estimate that counts the prompt (a cut stream, an
        upstream without usage: :meth:`usage_of`)."""
        if (len(ctx.raw) <= TOKENIZE_OFF_LOOP_BYTES or not ctx.attempts or reported_usage(ctx) is not None
                or not _bills_tokens(ctx) or not (self._answered(ctx) or upstream_had_it(ctx))):
            return None  # the size first: most requests stop there
        return self._big_prompt(ctx)

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        big = self._estimated_big_prompt(ctx) if self._tokenizers is not None else None
        if big is not None:
            await self._count_then_settle(ctx, big)
            return
        reserved = self._settle(ctx)
        if reserved:
            await self._reconcile(reserved, ctx.cost or 0.0, ctx.request_id)

    def on_done_now(self, ctx: Context) -> Any:
        """``on_done`` with budgets on in-process counters (or none): finished before it returns, but for a
        big prompt to count for the row's estimate, whose coroutine it returns (the core awaits it, then
        runs the hooks after this one)."""
        if self._tokenizers is not None and (big := self._estimated_big_prompt(ctx)) is not None:
            return self._count_then_settle(ctx, big)
        reserved = self._settle(ctx)
        if reserved:
            _drive(self._reconcile(reserved, ctx.cost or 0.0, ctx.request_id))
        return None

    async def _count_then_settle(self, ctx: Context, big: tuple[Any, str | None]) -> None:
        try:
            await self._count_off_loop(ctx, *big)
        except asyncio.CancelledError:
            try:
                self._settle(ctx)  # stopping: the row is written all the same, the prompt counted here
            except Exception as e:
                log.error("metering: a stopped count's row could not be written (%s)", type(e).__name__)
            raise
        reserved = self._settle(ctx)
        if reserved:
            await self._reconcile(reserved, ctx.cost or 0.0, ctx.request_id)

    def _settle(self, ctx: Context) -> list[tuple[str, float, float]] | None:
        """Usage, cost and the ledger row of a finished request; the reservations to reconcile."""
        reached = bool(ctx.attempts)
        tags = ctx.tags
        cache_hit = bool(tags) and tags.get("cache") == "hit"
        reserved = ctx.stash.get(RESERVED)
        if not (reached or cache_hit or reserved or self.config.record_answered):
            return None
        asked = ctx.model  # read once: each read looks into the request body
        usage = self.usage_of(ctx) if reached else Usage()
        if usage.estimated:
            ctx.usage = usage  # the plugins after this one (metrics, tracing, drift) count the estimate too
        served = self._served_model(ctx, asked)
        price = None
        if reached:
            priced_as = self._priced_model(ctx)
            # an answer's name the table does not know (a model server's path, an alias) costs what the model it
            # was sent to costs, as its reservation did, rather than nothing (or the "*" price)
            price = self.prices.lookup(served or priced_as, priced_as)
        cost = price.cost(usage) if price is not None else 0.0
        ctx.cost = cost
        route = route_name(ctx)
        if cost:
            label = self.model_label(ctx)  # as the metrics plugin labels the request
            acc = self._cost.get((route, label))
            if acc is None:
                f = self.families
                acc = self._cost[(route, label)] = f.acc(f.cost, route, label)  # bounded: routes x allowed models
            acc.inc(cost)
            if self.families.eager:
                self.families.flush()
        if self.ledger is not None and (reached or cache_hit or self.config.record_answered):
            self.ledger.append_values(LEDGER_TABLE, LEDGER_COLUMNS,
                                      self._values(ctx, usage, served, cost, price is not None, cache_hit, route))
        return reserved

    async def _reconcile(self, reserved: list[tuple[str, float, float]], cost: float, mark: str) -> None:
        for key, amount, end in reserved:
            delta = cost - amount
            if delta or amount:
                unmark = mark if amount > 0 else None
                try:
                    # settles the reservation: its record goes (an undo can no longer take it back)
                    await self.counters.add_sum(key, delta, None, end, unmark=unmark)
                except StateUnavailable:
                    if unmark is None:
                        log.error("metering: could not add a request's cost to a budget (the counters did not answer)")
                        continue
                    # a settlement applies only while its reservation's record is there: sent again until the
                    # counters answer, it still applies once (and not at all if the first one went through)
                    counters = self.counters
                    self._repair_later(
                        lambda key=key, delta=delta, end=end: counters.add_sum(key, delta, None, end, unmark=mark),
                        end, "metering-settle-reservation",
                        "could not settle a budget reservation (its worst case stays counted until the period ends)")

    def _served_model(self, ctx: Context, asked: str | None) -> str | None:
        """The model that answered: the answer's own ``model`` (``ctx.answer``, a buffered answer's when it is
        not an error), else the target's, else ``asked`` (``ctx.model``)."""
        if ctx.upstream is None:
            return None
        answered, target = served_models(ctx)
        return answered or target or asked

    def _values(self, ctx: Context, usage: Usage, served: str | None, cost: float, priced: bool, cache_hit: bool,
                route: str) -> tuple[Any, ...]:
        """The ledger row's values in LEDGER_COLUMNS order (``route``: the route's name). ``model_requested`` is
        what the client asked for, also when a router or an experiment sent another model (``model_served``)."""
        t = ctx.timings
        ident = ctx.identity
        started = time.time() - (time.perf_counter() - t.start)
        stream = ctx.stream
        ttft = (t.first_byte - t.start) * 1000 if (t.first_byte is not None and stream) else None
        tags = ctx.tags
        return (
            ctx.request_id,
            round(started, 6),
            utc_day(started),
            ident.key_id if ident else None,
            ident.name if ident else None,
            ident.team if ident else None,
            ident.user if ident else None,
            route,
            ctx.endpoint,
            ctx.requested_model,
            served,
            ctx.upstream.upstream if ctx.upstream is not None else None,
            len(ctx.attempts),
            int(stream),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
            cost,
            self.prices.currency,
            int(priced),
            ctx.status,
            ctx.outcome,
            ctx.answered_by,
            round((t.end - t.start) * 1000, 3) if t.end is not None else None,
            round(ttft, 3) if ttft is not None else None,
            int(cache_hit),
            int(usage.estimated),
            tags.get("variant"),
            orjson.dumps(tags).decode() if tags else None,
        )

    # -- reports -------------------------------------------------------------------------
    @classmethod
    def commands(cls) -> list[Command]:
        return [Command("usage", "Spend and tokens from the ledger, grouped by key, team, model or day.", _configure_cli, _run_cli)]

    @classmethod
    def admin_routes(cls) -> list[AdminRoute]:
        return [AdminRoute("GET", "usage", _admin_usage), AdminRoute("GET", "budgets", _admin_budgets)]


#: how long one day's spend may take to read from the ledger at start (a day of millions of rows takes seconds)
SEED_DAY_TIMEOUT_S = 120.0
#: how long the admin API's usage report may take (a month of a busy ledger is millions of rows, read at about a second a million)
REPORT_TIMEOUT_S = 120.0


async def seed_budgets(ledger: Any, counters: Any, plugin_id: str, name: str, before: float) -> None:
    """Add to ``counters`` the spend ``ledger`` (named ``name``) holds for the day and month of ``before``, in
    rows of requests started before it (:func:`ledger_spend`), per key and per team, a day at a time."""
    started = time.perf_counter()
    amounts = 0
    try:
        # each day added as it is read: a day the ledger cannot give leaves the sums short, never over
        async for period_spend in ledger_spend(ledger, before):
            for (scope, who, period), cost in period_spend.items():
                label, end = period_window(period, before)
                await counters.add_sum(f"budget:{scope}:{who}:{period}:{label}", cost, None, end)
                amounts += 1
    except (StateUnavailable, sqlite3.Error) as e:
        log.error("metering (%s): cannot read this period's spend from ledger %s (%s): budgets count only what "
                  "was read and what this process spends", plugin_id, name, type(e).__name__)
        return
    if amounts:
        log.info("metering (%s): budgets start from ledger %s: %d amounts in %.0f ms", plugin_id, name, amounts,
                 (time.perf_counter() - started) * 1000)


async def ledger_spend(ledger: Any, before: float) -> AsyncIterator[dict[tuple[str, str, str], float]]:
    """Money the ledger holds for the UTC day and month containing ``before``, in rows of requests that
    started before it, per key and per team: one ``{(scope, who, period): cost}`` per day read (scope
    ``key`` or ``team``, period ``month``, and ``day`` too for the last day).

    Read a day at a time (each through the ledger's day index, with a timeout of its own), so a
    month of a busy ledger is not one query that must fit one timeout.
    """
    today = datetime.fromtimestamp(before, timezone.utc).date()
    for n in range(1, today.day + 1):
        day = today.replace(day=n).isoformat()
        rows = await ledger.query(SPEND_OF_DAY, (day, before), timeout_s=SEED_DAY_TIMEOUT_S)
        periods = ("day", "month") if n == today.day else ("month",)
        out: dict[tuple[str, str, str], float] = {}
        for r in rows:
            for scope, who in (("key", r["key_id"]), ("team", r["team"])):
                if who:
                    for period in periods:
                        out[(scope, who, period)] = out.get((scope, who, period), 0.0) + r["cost"]
        if out:
            yield out


SPEND_OF_DAY = (f"SELECT key_id, team, SUM(cost) AS cost FROM {LEDGER_TABLE} "
                "WHERE day = ? AND ts < ? AND cost > 0 AND (key_id IS NOT NULL OR team IS NOT NULL) GROUP BY key_id, team")


def _add_budget(out: list[tuple[str, float, float]], key: str, limit: float, end: float) -> None:
    """One entry per sum: rules over the same key (or team) and period (one for every key, one for some ids;
    a key's own limit) share it, and the lowest limit holds; reserving on it twice would count twice."""
    for i, (k, other, _) in enumerate(out):
        if k == key:
            out[i] = (key, min(other, limit), end)
            return
    out.append((key, limit, end))


def _drive(coro: Any) -> Any:
    """Run a coroutine that never suspends to its end, here (budgets on in-process counters).

    ``MemoryCounters.add_sum`` answers without awaiting anything, so metering's hooks
    finish in their first step; one that suspended would be a bug, reported as such.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("metering: a budget call on in-process counters suspended")


def usage_query(group_by: list[str], since: float | None = None, until: float | None = None,
                key: str | None = None, team: str | None = None) -> tuple[str, list[Any]]:
    """SQL summing the ledger per group (names from GROUPS only: never client text in SQL)."""
    bad = [g for g in group_by if g not in GROUPS]
    if bad:
        raise ValueError(f"cannot group by {', '.join(map(repr, bad))} (choose from {', '.join(GROUPS)})")
    bounded = since is not None or until is not None
    # with a time bound, "+" keeps SQLite from walking a whole (key_id, day) or (team, day)
    # index just to have its groups in order: the day range is the narrower way in
    cols = [f"{'+' if bounded and GROUPS[g] in ('key_id', 'team') else ''}{GROUPS[g]} AS {g}" for g in group_by]
    where: list[str] = []
    params: list[Any] = []
    # ts is the exact bound; the day bound, a second wider (a row's day is taken before its
    # ts is rounded), changes no answer but lets SQLite find the rows through the ledger's
    # day indexes instead of reading the whole table
    if since is not None:
        where += ["ts >= ?", "day >= ?"]
        params += [since, _day_bound(since - 1)]
    if until is not None:
        where += ["ts < ?", "day <= ?"]
        params += [until, _day_bound(until + 1)]
    if key is not None:
        where.append("key_id = ?")
        params.append(key)
    if team is not None:
        where.append("team = ?")
        params.append(team)
    sql = f"SELECT {', '.join([*cols, SUMS])} FROM {LEDGER_TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if group_by:
        # by position: a name such as "team" would mean the column, not the expression selected
        sql += f" GROUP BY {', '.join(str(i) for i in range(1, len(group_by) + 1))} ORDER BY cost DESC, requests DESC"
    return sql, params


def _day_bound(ts: float) -> str:
    """The ledger day of a report's time bound, within the days a row can have (1970 to 9999: a
    bound outside them would format as a year that sorts wrongly, or not at all)."""
    return utc_day(min(max(ts, 0.0), 253402300799.0))


def parse_time(value: str | None) -> float | None:
    """``2025-01-31``, an ISO timestamp, or a relative ``7d`` / ``12h`` back from now.

    Anything else raises ``ValueError`` (the admin API's 400, the CLI's exit 2), an
    overflowing count too (``99...9d`` would otherwise be an ``OverflowError``).
    """
    if value is None or value == "":
        return None
    v = value.strip()
    try:
        if v[-1:] in ("d", "h", "m") and v[:-1].isascii() and v[:-1].isdigit():
            mult = {"d": 86400, "h": 3600, "m": 60}[v[-1]]
            return time.time() - int(v[:-1]) * mult
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except (ValueError, OverflowError, OSError):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(f"cannot read time {shown!r} (use 2025-01-31, an ISO timestamp, or 7d / 12h / 30m)") from None


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"
    if not rows:
        return "" if fmt == "csv" else "no usage recorded\n"
    cols = list(rows[0])
    # names come from clients (a model, a user): control characters are shown escaped, never sent to a
    # terminal (an escape sequence would clear it or forge rows)
    rows = [{c: _shown(v) if isinstance(v, str) else v for c, v in r.items()} for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cells = [[("" if r[c] is None else f"{r[c]:.6f}" if isinstance(r[c], float) else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(cols))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.rjust(widths[i]) if i >= len(cols) - 8 else v.ljust(widths[i]) for i, v in enumerate(row)))
    return "\n".join(lines) + "\n"


def _shown(text: str) -> str:
    """``text`` with what a terminal would act on (control and other unprintable characters) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
                   for ch in text)


def _configure_cli(p: Any) -> None:
    p.add_argument("--by", default="key,model", help=f"comma-separated groups: {', '.join(GROUPS)} (default key,model)")
    p.add_argument("--since", help="start: 2025-01-31, an ISO time, or 7d / 12h (default: everything)")
    p.add_argument("--until", help="end, exclusive (same forms)")
    p.add_argument("--key", help="only this key id")
    p.add_argument("--team", help="only this team")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    p.add_argument("--ledger", default="ledger", help="ledger name, as in the plugin's ledger_name (default ledger)")


def _run_cli(args: Any, loaded: Any) -> int:
    import sys

    try:
        group_by = [g.strip() for g in args.by.split(",") if g.strip()]
        sql, params = usage_query(group_by, parse_time(args.since), parse_time(args.until), args.key, args.team)
    except ValueError as e:
        print(f"sluice usage: {e}", file=sys.stderr)
        return 2
    path = Path(loaded.config.state.dir) / f"{args.ledger}.db"
    if not path.exists():
        print(f"sluice usage: no ledger at {path} (is metering in a chain, and state.dir right?)", file=sys.stderr)
        return 1
    # as a URI, percent-encoded: a state.dir holding "?", "#" or "%" is still this file
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        cur = conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    except sqlite3.DatabaseError as e:  # a missing table, a locked file, a file that is not SQLite
        print(f"sluice usage: cannot read the ledger: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    sys.stdout.write(render(rows, args.format))
    return 0


async def _admin_usage(request: Any, runtime: Any) -> Any:
    from aiohttp import web

    q = request.query
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv", "table"):
        raise web.HTTPBadRequest(reason="format must be json, csv or table")
    try:
        group_by = [g.strip() for g in q.get("group_by", "key,model").split(",") if g.strip()]
        sql, params = usage_query(group_by, parse_time(q.get("since")), parse_time(q.get("until")), q.get("key"), q.get("team"))
    except ValueError as e:
        raise web.HTTPBadRequest(reason=str(e)) from None
    # only a ledger some metering instance writes: each name opens a file and a writer thread
    name = q.get("ledger", "ledger")
    known = {"ledger"} | {m.config.ledger_name for m in runtime.instances(Metering) if m.config.ledger}
    if name not in known:
        raise web.HTTPBadRequest(reason=f"ledger must be one of: {', '.join(sorted(known))}")
    ledger = runtime.state.records(name)
    ledger.ensure(ledger_table())
    rows = await ledger.query(sql, params, timeout_s=REPORT_TIMEOUT_S)
    if fmt == "json":
        return web.json_response({"group_by": group_by, "rows": rows}, dumps=lambda o: orjson.dumps(o).decode())
    return web.Response(text=render(rows, fmt), content_type="text/csv" if fmt == "csv" else "text/plain")


async def _admin_budgets(request: Any, runtime: Any) -> Any:
    """Spent and reserved money against each budget that applies to ``key`` (and ``team``) now."""
    from aiohttp import web

    key = request.query.get("key")
    team = request.query.get("team")
    if not key and not team:
        raise web.HTTPBadRequest(reason="give key=ID and/or team=NAME")
    now = time.time()
    out = []
    probe = await _probe_context(runtime, key or "", team)
    # the serving config's instances (a reload's retired config, still draining, would list each budget twice)
    for inst in runtime.instances(Metering) or list(runtime.shared("metering.instances", weakref.WeakSet)):
        if inst.counters is None:
            continue
        for ckey, limit, end in inst.applicable(probe, now):
            # budget:<scope>:<id>:<period>:<label>: an id may hold ':', the period and label never do
            head, period, label = ckey.rsplit(":", 2)
            _, scope, who = head.split(":", 2)
            if not key and scope == "key":
                continue
            try:
                spent = await inst.counters.get_sum(ckey)
            except StateUnavailable:
                spent = None
            out.append({"plugin": inst.id, "scope": scope, "id": who, "period": period, "period_label": label,
                        "limit": limit, "spent_and_reserved": spent, "resets_at": end})
    return web.json_response({"budgets": out})


async def _probe_context(runtime: Any, key: str, team: str | None) -> Context:
    """A bare context carrying only an identity, to ask which budgets apply to it: the key's own
    (its team and its limits' budgets, as auth knows them) when auth knows it."""
    from proxy import Identity

    from .auth import key_identity

    known = await key_identity(runtime, key) if key else None
    ctx = Context(request_id="admin", method="GET", path="/")
    ctx.identity = Identity(key_id=key, team=team or (known.team if known else None), limits=known.limits if known else {})
    return ctx

