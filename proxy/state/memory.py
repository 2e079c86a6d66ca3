"""In-process state: GCRA counters, leases, sums and an LRU key-value store bounded by bytes.

Serves one process. Everything here runs on the event loop without awaiting, so
each call is atomic with respect to other requests of the process.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from typing import Callable, Sequence

from .base import KV, Counters, Decision, Limit, LimitStatus, SumStatus

#: slack for float rounding when a burst exactly fills a bucket (``limit * T == period``)
EPSILON_S = 1e-6
_SWEEP_EVERY = 4096
_ALLOWED = Decision(True, 0.0)


def gcra_check(tat: float, now: float, limit: Limit) -> tuple[bool, float, float, float]:
    """One GCRA step on a bucket whose theoretical arrival time is ``tat``.

    Returns ``(allowed, new_tat, remaining, wait_s)``: ``new_tat`` is what to store
    if the caller commits, ``remaining`` the units left after (or before, when
    refused) the decision, ``wait_s`` how long until ``cost`` would fit.
    """
    interval = limit.period_s / limit.limit
    base = tat if tat > now else now
    new_tat = base + limit.cost * interval
    used = new_tat - now
    if used <= limit.period_s + EPSILON_S:
        remaining = (limit.period_s - used) / interval
        return True, new_tat, max(0.0, remaining), 0.0
    remaining = (limit.period_s - (base - now)) / interval
    if limit.cost > limit.limit:
        # can never fit: report a full period so clients back off instead of hammering
        wait = limit.period_s
    else:
        wait = used - limit.period_s
    return False, new_tat, max(0.0, remaining), wait


class MemoryCounters(Counters):
    """Counters for one process. ``clock`` (epoch seconds) is injectable for tests.

    Every step is synchronous underneath: the ``*_now`` methods answer without a
    coroutine (callers on the request path that know they hold memory counters use
    them directly); the async methods of the :class:`Counters` interface wrap them.
    """

    #: the ``*_now`` methods exist: admission and settlement without awaiting
    synchronous = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._sums: dict[str, tuple[float, float]] = {}
        #: per sum, the adds recorded under a mark (reservations) and not yet settled or undone
        self._marks: dict[str, dict[str, float]] = {}
        self._ops = 0
        self._next_sweep = _SWEEP_EVERY
        self._tokens = itertools.count(1)

    def _sweep(self, now: float) -> None:
        # a full sweep is O(entries): spacing sweeps by the entry count keeps it O(1) per call
        self._next_sweep = self._ops + max(_SWEEP_EVERY, len(self._tat) + len(self._sums) + len(self._leases))
        # a bucket whose TAT has passed is full, exactly as if it were absent
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]
        for k in [k for k, (_, exp) in self._sums.items() if exp <= now]:
            del self._sums[k]
            self._marks.pop(k, None)
        for k in [k for k, held in self._leases.items() if all(e <= now for e in held.values())]:
            del self._leases[k]

    def _acquire(self, limits: Sequence[Limit], now: float) -> Decision:
        self._ops += 1
        if self._ops >= self._next_sweep:
            self._sweep(now)
        tats = self._tat
        pending: dict[str, float] = {}
        statuses: list[LimitStatus] = []
        for lim in limits:
            key = lim.key
            tat = pending[key] if key in pending else tats.get(key, 0.0)
            period = lim.period_s
            interval = period / lim.limit
            new_tat = (tat if tat > now else now) + lim.cost * interval
            used = new_tat - now
            if used > period + EPSILON_S:
                return self._refusal(limits, now)
            pending[key] = new_tat
            remaining = (period - used) / interval
            statuses.append(LimitStatus(lim, remaining if remaining > 0.0 else 0.0, used))
        tats.update(pending)
        return Decision(True, 0.0, tuple(statuses), None)

    def _refusal(self, limits: Sequence[Limit], now: float) -> Decision:
        """Some limit refused: which one waits longest, and every bucket as it stands (nothing is taken)."""
        refused: Limit | None = None
        wait_max = 0.0
        pending: dict[str, float] = {}
        for lim in limits:
            tat = pending.get(lim.key, self._tat.get(lim.key, 0.0))
            ok, new_tat, _, wait = gcra_check(tat, now, lim)
            if ok:
                pending[lim.key] = new_tat
            elif refused is None or wait > wait_max:
                refused, wait_max = lim, wait
        statuses = []
        for lim in limits:
            base = max(self._tat.get(lim.key, 0.0), now)
            interval = lim.period_s / lim.limit
            statuses.append(LimitStatus(lim, max(0.0, (lim.period_s - (base - now)) / interval), base - now))
        return Decision(False, wait_max, tuple(statuses), refused)

    def acquire_now(self, limits: Sequence[Limit]) -> Decision:
        return self._acquire(limits, self._clock())

    async def acquire(self, limits: Sequence[Limit]) -> Decision:
        return self._acquire(limits, self._clock())

    def adjust_now(self, limits: Sequence[Limit]) -> None:
        now = self._clock()
        tats = self._tat
        for lim in limits:
            if lim.cost == 0:
                continue
            tat = tats.get(lim.key, 0.0)
            new_tat = (tat if tat > now else now) + lim.cost * (lim.period_s / lim.limit)
            if new_tat <= now:
                tats.pop(lim.key, None)
            else:
                tats[lim.key] = new_tat

    async def adjust(self, limits: Sequence[Limit]) -> None:
        self.adjust_now(limits)

    async def peek(self, limit: Limit) -> Decision:
        ok, _, _, wait = gcra_check(self._tat.get(limit.key, 0.0), self._clock(), limit)
        return Decision(True, 0.0) if ok else Decision(False, wait, (), limit)

    def _has_slot(self, key: str, limit: int, now: float) -> bool:
        held = self._leases.get(key)
        if held is None or len(held) < limit:
            return True
        # only a full set is worth sweeping for expired slots
        for tok in [t for t, exp in held.items() if exp <= now]:
            del held[tok]
        return len(held) < limit

    def _take_slot(self, key: str, ttl_s: float, now: float) -> str:
        token = f"{next(self._tokens):x}"
        held = self._leases.get(key)
        if held is None:
            self._leases[key] = {token: now + ttl_s}
        else:
            held[token] = now + ttl_s
        return token

    def lease_now(self, key: str, limit: int, ttl_s: float) -> str | None:
        now = self._clock()
        if not self._has_slot(key, limit, now):
            return None
        return self._take_slot(key, ttl_s, now)

    async def lease(self, key: str, limit: int, ttl_s: float) -> str | None:
        return self.lease_now(key, limit, ttl_s)

    def admit_now(
        self,
        limits: Sequence[Limit],
        leases: Sequence[tuple[str, int, float]],
        settle: tuple[Sequence[Limit], Sequence[tuple[str, str]]] | None = None,
    ) -> tuple[Decision, list[str]]:
        """``acquire(limits)`` and a lease on every ``(key, limit, ttl_s)``, all or nothing.

        ``settle`` (adjustments, releases) is applied first, whatever the decision. A
        full lease set refuses with ``refused = Limit(key, limit, ttl_s, 1)`` and a
        retry of one second (when a slot frees is unknowable). Returns the decision
        and, when admitted, the lease tokens in order.
        """
        if settle:
            self.settle_now(*settle)
        now = self._clock()
        for key, limit, ttl_s in leases:
            if not self._has_slot(key, limit, now):
                return Decision(False, 1.0, (), Limit(key, limit, ttl_s, 1.0)), []
        decision = self._acquire(limits, now) if limits else _ALLOWED
        if not decision.allowed:
            return decision, []
        return decision, [self._take_slot(key, ttl_s, now) for key, _, ttl_s in leases]

    def take_now(
        self,
        buckets: Sequence[tuple[str, float, float, bool]],
        tokens: float,
        leases: Sequence[tuple[str, int, float]] = (),
    ) -> tuple[list[float], list[tuple[str, str]]] | None:
        """The admission's fast path, for callers that build their buckets once and reuse them.

        ``buckets[i]`` is ``(key, interval_s, period_s, counts_tokens)`` (``interval_s =
        period_s / limit``); a bucket that counts tokens is asked ``tokens`` units now, the
        others 1. Keys must be distinct. Every bucket and a slot of every ``(key, limit,
        ttl_s)`` lease are taken, or nothing is: ``None`` then, and :meth:`admit_now` tells
        why. Admitted, returns ``[remaining_0, reset_s_0, _, remaining_1, reset_s_1, _, ...]``
        (three numbers per bucket; the same figures as the statuses of :meth:`admit_now`,
        remaining not clamped at 0) and the leases taken as ``(key, token)``. Nothing is
        made per bucket but those numbers.
        """
        now = self._clock()
        held_by_key = self._leases
        for key, limit, _ in leases:
            held = held_by_key.get(key)
            if held is not None and len(held) >= limit and not self._has_slot(key, limit, now):
                return None
        self._ops += 1
        if self._ops >= self._next_sweep:
            self._sweep(now)
        tats = self._tat
        out: list[float] = []
        for key, interval, period, counts_tokens in buckets:
            tat = tats.get(key, 0.0)
            new_tat = (tat if tat > now else now) + (tokens if counts_tokens else 1.0) * interval
            used = new_tat - now
            if used > period + EPSILON_S:
                return None
            out += ((period - used) / interval, used, new_tat)
        i = 2
        for bucket in buckets:
            tats[bucket[0]] = out[i]
            i += 3
        return out, [(key, self._take_slot(key, ttl_s, now)) for key, _, ttl_s in leases]

    def give_back_now(self, buckets: Sequence[tuple[str, float, float, bool]], cost: float,
                      releases: Sequence[tuple[str, str]]) -> None:
        """Add ``cost`` (negative to give back) to every bucket of ``buckets`` (as for
        :meth:`take_now`) without checking, and release every ``(key, token)`` lease."""
        if cost:
            now = self._clock()
            tats = self._tat
            for key, interval, _, _ in buckets:
                tat = tats.get(key, 0.0)
                new_tat = (tat if tat > now else now) + cost * interval
                if new_tat <= now:
                    tats.pop(key, None)
                else:
                    tats[key] = new_tat
        leases = self._leases
        for key, token in releases:  # release_now, inline
            held = leases.get(key)
            if held is not None:
                held.pop(token, None)
                if not held:
                    del leases[key]

    async def admit(
        self,
        limits: Sequence[Limit],
        leases: Sequence[tuple[str, int, float]],
        settle: tuple[Sequence[Limit], Sequence[tuple[str, str]]] | None = None,
    ) -> tuple[Decision, list[str]]:
        """As :meth:`admit_now`."""
        return self.admit_now(limits, leases, settle)

    def settle_now(self, adjust: Sequence[Limit], releases: Sequence[tuple[str, str]]) -> None:
        """``adjust(adjust)`` and release every ``(key, token)`` lease."""
        if adjust:
            self.adjust_now(adjust)
        for key, token in releases:
            self.release_now(key, token)

    async def settle(self, adjust: Sequence[Limit], releases: Sequence[tuple[str, str]]) -> None:
        """``adjust(adjust)`` and release every ``(key, token)`` lease."""
        self.settle_now(adjust, releases)

    def release_now(self, key: str, token: str) -> None:
        held = self._leases.get(key)
        if held is not None:
            held.pop(token, None)
            if not held:
                del self._leases[key]

    async def release(self, key: str, token: str) -> None:
        self.release_now(key, token)

    async def add_sum(self, key: str, amount: float, limit: float | None, expires_at: float,
                      mark: str | None = None, unmark: str | None = None) -> SumStatus:
        now = self._clock()
        total, exp = self._sums.get(key, (0.0, expires_at))
        if exp <= now:
            total, exp = 0.0, expires_at
            self._marks.pop(key, None)
        if unmark is not None and self._marks.get(key, {}).pop(unmark, None) is None:
            return SumStatus(True, total, math.inf if limit is None else limit)  # settled or undone already
        if amount < 0 or limit is None or total + amount <= limit:
            total += amount
            self._sums[key] = (total, max(exp, expires_at))
            if mark is not None:
                self._marks.setdefault(key, {})[mark] = amount
            return SumStatus(True, total, math.inf if limit is None else limit)
        return SumStatus(False, total, limit)

    async def undo_sum(self, key: str, mark: str) -> None:
        amount = self._marks.get(key, {}).pop(mark, None)
        entry = self._sums.get(key)
        if amount is not None and entry is not None and entry[1] > self._clock():
            self._sums[key] = (entry[0] - amount, entry[1])

    async def get_sum(self, key: str) -> float:
        entry = self._sums.get(key)
        if entry is None or entry[1] <= self._clock():
            return 0.0
        return entry[0]


class MemoryKV(KV):
    """An LRU of bytes bounded by ``max_bytes`` (keys plus values), with per-entry TTL."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._clock = clock
        self._d: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return len(self._d)

    async def get(self, key: str) -> bytes | None:
        entry = self._d.get(key)
        if entry is None:
            return None
        value, exp = entry
        if exp is not None and exp <= self._clock():
            self._drop(key)
            return None
        self._d.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        cost = len(key) + len(value)
        self._drop(key)
        if cost > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything else
        exp = None if ttl_s is None else self._clock() + ttl_s
        self._d[key] = (bytes(value), exp)
        self.size += cost
        while self.size > self.max_bytes:
            old, (v, _) = self._d.popitem(last=False)
            self.size -= len(old) + len(v)

    async def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._d.pop(key, None)
        if entry is not None:
            self.size -= len(key) + len(entry[0])
