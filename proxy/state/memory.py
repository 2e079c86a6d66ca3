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
    """Counters for one process. ``clock`` (epoch seconds) is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._sums: dict[str, tuple[float, float]] = {}
        self._ops = 0
        self._next_sweep = _SWEEP_EVERY
        self._tokens = itertools.count(1)

    def _tick(self, now: float) -> None:
        self._ops += 1
        if self._ops < self._next_sweep:
            return
        # a full sweep is O(entries): spacing sweeps by the entry count keeps it O(1) per call
        self._next_sweep = self._ops + max(_SWEEP_EVERY, len(self._tat) + len(self._sums) + len(self._leases))
        # a bucket whose TAT has passed is full, exactly as if it were absent
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]
        for k in [k for k, (_, exp) in self._sums.items() if exp <= now]:
            del self._sums[k]
        for k in [k for k, held in self._leases.items() if all(e <= now for e in held.values())]:
            del self._leases[k]

    async def acquire(self, limits: Sequence[Limit]) -> Decision:
        now = self._clock()
        self._tick(now)
        pending: dict[str, float] = {}
        statuses: list[LimitStatus] = []
        refused: Limit | None = None
        wait_max = 0.0
        for lim in limits:
            tat = pending.get(lim.key, self._tat.get(lim.key, 0.0))
            ok, new_tat, remaining, wait = gcra_check(tat, now, lim)
            if ok:
                pending[lim.key] = new_tat
                statuses.append(LimitStatus(lim, remaining, new_tat - now))
            else:
                statuses.append(LimitStatus(lim, remaining, max(0.0, max(tat, now) - now)))
                if refused is None or wait > wait_max:
                    refused, wait_max = lim, wait
        if refused is not None:
            # nothing was taken: every status shows the bucket as it stands
            statuses = []
            for lim in limits:
                base = max(self._tat.get(lim.key, 0.0), now)
                interval = lim.period_s / lim.limit
                statuses.append(LimitStatus(lim, max(0.0, (lim.period_s - (base - now)) / interval), base - now))
            return Decision(False, wait_max, tuple(statuses), refused)
        self._tat.update(pending)
        return Decision(True, 0.0, tuple(statuses), None)

    async def adjust(self, limits: Sequence[Limit]) -> None:
        now = self._clock()
        for lim in limits:
            if lim.cost == 0:
                continue
            interval = lim.period_s / lim.limit
            tat = self._tat.get(lim.key, 0.0)
            new_tat = max(tat, now) + lim.cost * interval
            if new_tat <= now:
                self._tat.pop(lim.key, None)
            else:
                self._tat[lim.key] = new_tat

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
        self._leases.setdefault(key, {})[token] = now + ttl_s
        return token

    async def lease(self, key: str, limit: int, ttl_s: float) -> str | None:
        now = self._clock()
        if not self._has_slot(key, limit, now):
            return None
        return self._take_slot(key, ttl_s, now)

    async def admit(
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
            await self.settle(*settle)
        now = self._clock()
        for key, limit, ttl_s in leases:
            if not self._has_slot(key, limit, now):
                return Decision(False, 1.0, (), Limit(key, limit, ttl_s, 1.0)), []
        decision = await self.acquire(limits) if limits else Decision(True, 0.0)
        if not decision.allowed:
            return decision, []
        return decision, [self._take_slot(key, ttl_s, now) for key, _, ttl_s in leases]

    async def settle(self, adjust: Sequence[Limit], releases: Sequence[tuple[str, str]]) -> None:
        """``adjust(adjust)`` and release every ``(key, token)`` lease."""
        if adjust:
            await self.adjust(adjust)
        for key, token in releases:
            await self.release(key, token)

    async def release(self, key: str, token: str) -> None:
        held = self._leases.get(key)
        if held is not None:
            held.pop(token, None)
            if not held:
                del self._leases[key]

    async def add_sum(self, key: str, amount: float, limit: float | None, expires_at: float) -> SumStatus:
        now = self._clock()
        total, exp = self._sums.get(key, (0.0, expires_at))
        if exp <= now:
            total, exp = 0.0, expires_at
        if amount < 0 or limit is None or total + amount <= limit:
            total += amount
            self._sums[key] = (total, max(exp, expires_at))
            return SumStatus(True, total, math.inf if limit is None else limit)
        return SumStatus(False, total, limit)

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
