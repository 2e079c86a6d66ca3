"""The request path's alarms: exact when near, sharing a timer per slot when far, never early."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from proxy import timers
from proxy.timers import COARSE_AFTER, SLOTS_PER_SECOND, Alarm

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(factory, coro):
    loop = factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _wait_out(delay: float) -> tuple[Alarm, float, bool]:
    """Arm an alarm ``delay`` ahead and block on something that never ends; how long until it fired."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    alarm = Alarm(start + delay)
    timed_out = False
    try:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            alarm.timed_out()
        finally:
            alarm.disarm()
    except TimeoutError:
        timed_out = True
    return alarm, loop.time() - start, timed_out


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_near_alarm_has_its_own_timer_and_fires_on_time(loop_name):
    alarm, took, timed_out = run(LOOPS[loop_name], _wait_out(0.05))
    assert timed_out and alarm.fired
    assert alarm.wheel is None and alarm.handle is not None  # exact: a timer of its own
    assert 0.05 - 0.002 <= took < 0.05 + 1.0  # uvloop counts in milliseconds


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_far_alarm_shares_a_slot_and_fires_within_it_never_early(loop_name):
    delay = COARSE_AFTER + 0.05
    alarm, took, timed_out = run(LOOPS[loop_name], _wait_out(delay))
    assert timed_out and alarm.fired
    assert alarm.handle is None and alarm.wheel is not None  # no timer of its own
    assert delay - 0.002 <= took < delay + 1 / SLOTS_PER_SECOND + 1.0


@pytest.mark.parametrize("loop_name", LOOPS)
def test_far_alarms_in_one_slot_share_one_timer_and_a_disarmed_one_never_fires(loop_name):
    async def main():
        loop = asyncio.get_running_loop()
        # pick a moment in the middle of a slot, so all three land in the same one
        when = (int((loop.time() + COARSE_AFTER + 0.2) * SLOTS_PER_SECOND) + 0.5) / SLOTS_PER_SECOND
        sleepers = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
        await asyncio.sleep(0)  # the three are running
        alarms = [Alarm(when, loop, t) for t in sleepers]
        slots = timers._slots(loop)
        assert len(slots.due) == 1 and all(a.slot == alarms[0].slot for a in alarms)
        alarms[1].disarm()
        done, _ = await asyncio.wait([sleepers[0], sleepers[2]], timeout=when - loop.time() + 5)
        assert len(done) == 2 and all(t.cancelled() for t in done)
        assert [a.fired for a in alarms] == [True, False, True]
        assert not sleepers[1].done()  # the disarmed one's task goes on
        assert loop.time() >= when - 0.002
        assert not slots.due  # the slot is gone once rung
        sleepers[1].cancel()

    run(LOOPS[loop_name], main())


def test_disarmed_before_its_slot_leaves_the_task_alone_and_cancellation_still_propagates():
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        alarm = Alarm(loop.time() + COARSE_AFTER + 0.1, loop, task)
        alarm.disarm()
        alarm.disarm()  # twice is harmless
        # a cancellation that is not the alarm's stays a cancellation
        other = asyncio.ensure_future(asyncio.Event().wait())
        await asyncio.sleep(0)
        a2 = Alarm(loop.time() + COARSE_AFTER + 0.1, loop, other)
        other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await other
        a2.disarm()
        assert not alarm.fired and not a2.fired
        # an emptied slot is dropped at once; the timer set for it rings for nothing
        slots = timers._slots(loop)
        assert not slots.due and slots.armed is not None
        rung = loop.create_future()
        loop.call_at(slots.armed / SLOTS_PER_SECOND + 0.01, rung.set_result, None)
        await asyncio.wait_for(rung, 5)
        assert slots.armed is None and not alarm.fired

    run(asyncio.new_event_loop, main())


def test_a_closed_loop_and_its_slots_are_not_kept_alive():
    import gc
    import weakref

    loop = uvloop.new_event_loop()

    async def arm():
        a = Alarm(loop.time() + COARSE_AFTER + 5, loop, asyncio.current_task())
        a.disarm()

    loop.run_until_complete(arm())
    assert loop in timers._by_loop
    ref = weakref.ref(loop)
    loop.close()
    del loop
    uvloop.new_event_loop().close()  # another loop of the same kind takes nothing over
    gc.collect()
    assert ref() is None


def test_what_is_kept_is_bounded_by_the_alarms_armed_not_by_the_requests_served():
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        slots = timers._slots(loop)
        timers_before = len(loop._scheduled)
        for i in range(2000):  # a request's two far alarms, 2,000 requests over ten seconds of deadlines
            first = Alarm(loop.time() + 120 + i / 200, loop, task)
            total = Alarm(loop.time() + 900 + i / 200, loop, task)
            if i % 500 == 0:
                assert len(slots.due) == 2  # this request's two slots
            first.disarm()
            total.disarm()
        assert not slots.due
        assert len(loop._scheduled) - timers_before <= 2  # one loop timer, not one per slot

    run(asyncio.new_event_loop, main())


def test_when_the_timer_rings_the_due_slots_fire_and_it_is_set_again_for_the_next():
    async def main():
        loop = asyncio.get_running_loop()
        sleepers = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
        await asyncio.sleep(0)
        base = loop.time() + COARSE_AFTER
        a1 = Alarm(base + 0.05, loop, sleepers[0])
        a2 = Alarm(base + 0.35, loop, sleepers[1])
        a3 = Alarm(base + 60, loop, sleepers[2])
        slots = timers._slots(loop)
        assert slots.armed == a1.slot
        done, _ = await asyncio.wait(sleepers[:2], timeout=10)
        assert len(done) == 2 and a1.fired and a2.fired and not a3.fired
        assert slots.armed == a3.slot  # set again for the earliest slot left
        a3.disarm()
        sleepers[2].cancel()

    run(asyncio.new_event_loop, main())
