"""Cheap timeouts for the request path: no context manager, and mostly no timer, per use."""

from __future__ import annotations

import asyncio
import weakref
from typing import NoReturn

#: an alarm due at least this many seconds ahead shares its loop timer with the others
#: due in the same slot; nearer ones get a timer of their own (exact)
COARSE_AFTER = 1.0
#: slots per second: a shared alarm fires up to 1 / SLOTS_PER_SECOND late
SLOTS_PER_SECOND = 10


class _Slots:
    """The shared alarms of one loop, by tenth of a second, and one loop timer for them all.

    Every request arms two alarms (first byte, whole answer) that almost never
    fire and are due minutes ahead. A loop timer each costs more than the rest of
    the alarm (uvloop allocates, starts, stops and closes a libuv handle, about
    5 µs of CPU per request at a moderate rate). Here arming is a dict insert and
    disarming a delete; a slot goes when its last alarm is disarmed, so what is
    kept is bounded by the requests in flight, and a single loop timer is set for
    the earliest slot. When it rings, the slots that are due fire and it is set
    again for the earliest left. A slot earlier than the timer (a shorter timeout
    than any before) sets a new timer; the old one then rings for nothing.
    """

    __slots__ = ("due", "armed")  # not the loop (nor a timer handle, which holds it): the registry holds loops weakly

    def __init__(self) -> None:
        #: slot number -> the alarms armed in it (a dict as an ordered set)
        self.due: dict[int, dict[Alarm, None]] = {}
        #: the slot the loop timer is set for, if any
        self.armed: int | None = None

    def add(self, alarm: Alarm, when: float, loop: asyncio.AbstractEventLoop) -> int:
        """Arm ``alarm`` in the slot ``when`` falls in; that slot's number."""
        slot = int(when * SLOTS_PER_SECOND) + 1  # ends after ``when``: never early
        alarms = self.due.get(slot)
        if alarms is None:
            alarms = self.due[slot] = {}
            if self.armed is None or slot < self.armed:
                self._arm(slot, loop)
        alarms[alarm] = None
        return slot

    def remove(self, slot: int, alarm: Alarm) -> None:
        alarms = self.due.get(slot)  # None once rung: a slot number is never armed again after its time
        if alarms is not None:
            alarms.pop(alarm, None)
            if not alarms:
                del self.due[slot]

    def _arm(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        self.armed = slot
        loop.call_at(slot / SLOTS_PER_SECOND, self._ring, slot, loop)

    def _ring(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        if slot != self.armed:
            return  # replaced by an earlier one
        self.armed = None
        up_to = max(slot, int(loop.time() * SLOTS_PER_SECOND))  # a late ring fires every slot now past
        for s in [s for s in self.due if s <= up_to]:
            for alarm in self.due.pop(s):
                alarm._fire()
        if self.due:
            self._arm(min(self.due), loop)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref | None, _Slots | None] = (None, None)


def _slots(loop: asyncio.AbstractEventLoop) -> _Slots:
    global _last
    ref, slots = _last
    if ref is not None and ref() is loop:
        return slots  # type: ignore[return-value]
    slots = _by_loop.get(loop)
    if slots is None:
        slots = _by_loop[loop] = _Slots()
    _last = (weakref.ref(loop), slots)
    return slots


class Alarm:
    """Cancel the current task at a loop time unless disarmed first.

    What ``asyncio.timeout`` does, for the two timeouts every request has, at a
    fraction of its cost; the caller turns a fired alarm's cancellation into a
    timeout (``fired`` tells it apart from a client that went away). An alarm
    due ``COARSE_AFTER`` seconds or more ahead fires up to a tenth of a second
    late, sharing a timer (:class:`_Slots`); a nearer one fires on time.
    """

    __slots__ = ("task", "handle", "fired", "slot", "wheel")

    def __init__(self, when: float, loop: asyncio.AbstractEventLoop | None = None, task: asyncio.Task | None = None) -> None:
        # the request path passes the loop and its task: looking them up costs more than the timer
        if loop is None:
            loop = asyncio.get_running_loop()
        self.task = task if task is not None else asyncio.current_task(loop)
        self.fired = False
        if when - loop.time() >= COARSE_AFTER:
            self.handle = None
            self.wheel: _Slots | None = _slots(loop)
            self.slot = self.wheel.add(self, when, loop)
        else:
            self.wheel = None
            self.handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.fired = True
        assert self.task is not None
        self.task.cancel()

    def disarm(self) -> None:
        if self.wheel is not None:
            self.wheel.remove(self.slot, self)
        elif self.handle is not None:
            self.handle.cancel()

    def timed_out(self) -> NoReturn:
        """Call from ``except CancelledError``: a ``TimeoutError`` if this alarm fired, else the cancellation goes on."""
        if not self.fired:
            raise  # noqa: PLE0704 - re-raises the CancelledError being handled
        assert self.task is not None
        self.task.uncancel()
        raise TimeoutError from None


class Watchdog:
    """Cancels the relaying task when the upstream is idle too long or the deadline passes.

    One timer per stream, re-armed only when it fires, instead of a timeout
    context per read: a read costs one clock call.
    """

    __slots__ = ("loop", "idle", "deadline", "last", "fired", "task", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, deadline: float, task: asyncio.Task | None = None) -> None:
        self.loop = loop
        self.idle = idle
        self.deadline = deadline
        self.last = loop.time()
        self.fired = False
        self.task = task if task is not None else asyncio.current_task(loop)
        self.handle = loop.call_at(min(self.last + idle, deadline), self._check)

    def _check(self) -> None:
        due = min(self.last + self.idle, self.deadline)
        if self.loop.time() >= due:
            self.fired = True
            assert self.task is not None
            self.task.cancel()
        else:
            self.handle = self.loop.call_at(due, self._check)

    def overran(self) -> bool:
        """Having fired: the deadline passed (else the upstream was idle too long)."""
        return self.loop.time() >= self.deadline

    def cancel(self) -> None:
        self.handle.cancel()
