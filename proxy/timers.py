"""Cheap timeouts for the request path: one timer handle, no context manager per use."""

from __future__ import annotations

import asyncio
from typing import NoReturn


class Alarm:
    """Cancel the current task at a loop time unless disarmed first.

    What ``asyncio.timeout`` does, for the two timeouts every request has, at a
    fraction of its cost; the caller turns a fired alarm's cancellation into a
    timeout (``fired`` tells it apart from a client that went away).
    """

    __slots__ = ("task", "handle", "fired")

    def __init__(self, when: float, loop: asyncio.AbstractEventLoop | None = None, task: asyncio.Task | None = None) -> None:
        # the request path passes the loop and its task: looking them up costs more than the timer
        if loop is None:
            loop = asyncio.get_running_loop()
        self.task = task if task is not None else asyncio.current_task(loop)
        self.fired = False
        self.handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.fired = True
        assert self.task is not None
        self.task.cancel()

    def disarm(self) -> None:
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

    def cancel(self) -> None:
        self.handle.cancel()
