"""The small state interfaces plugins use. Backends: memory, sqlite, redis.

* :class:`Counters`: smooth windowed limits with reserve-then-reconcile (GCRA),
  concurrency leases, and period sums (budgets). Atomic across keys: an acquire
  over several limits takes all or none.
* :class:`KV`: bytes with a TTL (cache, key lookups).
* :class:`Records`: append-only rows written in batches off the loop (ledgers,
  logs, samples, experiment results).

Every method that talks to Redis or SQLite is bounded by a timeout and raises
:class:`proxy.errors.StateUnavailable` when the backend is slow, down or its
breaker is open; plugins decide (via ``on_error``) whether that fails closed or open.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from ..errors import StateUnavailable


@dataclass(frozen=True, slots=True)
class Limit:
    """``limit`` units per ``period_s`` seconds on ``key``, ``cost`` units asked now.

    GCRA semantics: a burst of up to ``limit`` is admitted at once, and capacity
    refills steadily at ``limit / period_s`` per second.
    """

    key: str
    limit: float
    period_s: float
    cost: float = 1.0


@dataclass(frozen=True, slots=True)
class LimitStatus:
    limit: Limit
    #: units still available right after this decision
    remaining: float
    #: seconds until the bucket is full again
    reset_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: seconds to wait before the same request could be admitted (0 when allowed)
    retry_after_s: float
    statuses: tuple[LimitStatus, ...] = ()
    #: the limit that refused, when not allowed
    refused: Limit | None = None


@dataclass(frozen=True, slots=True)
class SumStatus:
    allowed: bool
    #: the period's total after this call (including ``amount`` only when allowed)
    total: float
    limit: float


class Counters(abc.ABC):
    @abc.abstractmethod
    async def acquire(self, limits: Sequence[Limit]) -> Decision:
        """Admit ``cost`` on every limit at once, or on none (all-or-nothing)."""

    @abc.abstractmethod
    async def adjust(self, limits: Sequence[Limit]) -> None:
        """Add ``cost`` (negative to give back) without checking: reconcile after the fact."""

    @abc.abstractmethod
    async def peek(self, limit: Limit) -> Decision:
        """Whether ``acquire([limit])`` would admit now, taking nothing (no statuses in the decision)."""

    @abc.abstractmethod
    async def lease(self, key: str, limit: int, ttl_s: float) -> str | None:
        """Take one of ``limit`` concurrent slots on ``key``; a lease token, or ``None`` when full.

        A lease not released expires after ``ttl_s`` (a crashed replica cannot leak slots).
        """

    @abc.abstractmethod
    async def release(self, key: str, token: str) -> None:
        """Give back a lease."""

    @abc.abstractmethod
    async def add_sum(self, key: str, amount: float, limit: float | None, expires_at: float,
                      mark: str | None = None, unmark: str | None = None) -> SumStatus:
        """Add ``amount`` to a period total if the total stays within ``limit`` (``None``: no limit).

        A negative ``amount`` always applies. ``expires_at`` (epoch seconds) ends the period.
        ``mark`` records the add under that name (a reservation), so that :meth:`undo_sum` can take it
        back exactly once, whether or not its answer arrived. ``unmark`` settles such a record: the record
        goes, and ``amount`` is added only if it was there, so a settlement sent again after its answer was
        lost applies once, and one whose reservation was undone or whose period ended applies nothing.
        """

    @abc.abstractmethod
    async def undo_sum(self, key: str, mark: str) -> None:
        """Take back the add recorded under ``mark``, if it was made and not yet settled or undone."""

    @abc.abstractmethod
    async def get_sum(self, key: str) -> float:
        """The current period total of ``key`` (0 when none)."""

    async def close(self) -> None:
        return None


class KV(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    async def close(self) -> None:
        return None


@dataclass
class Table:
    """A records table: its name, columns with SQLite types, primary key and indexes."""

    name: str
    columns: Mapping[str, type]
    pk: str | None = None
    indexes: Sequence[Sequence[str]] = field(default_factory=tuple)


class Records(abc.ABC):
    @abc.abstractmethod
    def ensure(self, table: Table) -> None:
        """Create the table (and indexes) if it does not exist; add missing columns."""

    @abc.abstractmethod
    def append(self, table: str, row: Mapping[str, Any]) -> None:
        """Queue one row for the batched writer. Never blocks, never drops silently."""

    def append_values(self, table: str, columns: tuple[str, ...], values: tuple[Any, ...]) -> None:
        """``append`` for a row given as its values in ``columns`` order (a writer of many rows of
        one shape passes the same tuple of columns each time); backends may queue it without a dict."""
        self.append(table, dict(zip(columns, values)))

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every row appended so far is durable."""

    @abc.abstractmethod
    async def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), *,
                    timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Run a read-only query off the loop (pending rows are flushed first).

        ``timeout_s`` bounds the wait for the answer (default: the backend's own timeout, the
        state's ``timeout_ms``): a report over a big table may need longer than a lookup."""

    async def close(self) -> None:
        return None


def chunks(it: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


async def settle_after_lost_answer(call: Callable[[], Awaitable[Any]], give_up: float, clock: Callable[[], float]) -> bool:
    """Carry out the idempotent ``call`` (a release, an undo) that repairs a call whose answer was lost:
    retried while the backend is away (0.2 s, doubling to 5 s) until ``clock()`` reaches ``give_up``,
    then once more a second after it went through, since the lost call may still run after it, on the
    connection it was sent on. ``False`` when it never went through."""
    wait = 0.2
    done = 0
    while done < 2:
        try:
            await call()
            done += 1
            if done == 1:
                await asyncio.sleep(1.0)
            continue
        except StateUnavailable:
            if clock() + wait >= give_up:
                return done > 0
        await asyncio.sleep(wait)  # a backoff while the backend is away, not a synchronisation
        wait = min(wait * 2, 5.0)
    return True
