"""The deadline watchdog on its own: finished calls do not pile up, and a short deadline that
arrives behind long ones still fires (the thread is woken only when the earliest one changes)."""

from __future__ import annotations

import time

from vidu_pipeline.api.deadline import Watchdog


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_finished_calls_leave_the_watchdog_and_a_short_deadline_behind_long_ones_fires():
    dog = Watchdog()
    for _ in range(1_000):
        with dog.deadline(60.0):
            pass
    assert len(dog._heap) <= 1  # not 1,000 finished calls waiting for their 60 s to pass

    with dog.deadline(60.0) as long_call:
        with dog.deadline(0.05) as short_call:
            assert wait_for(lambda: short_call.expired)
        assert not long_call.expired


def test_a_call_that_finishes_in_time_is_never_expired():
    dog = Watchdog()
    with dog.deadline(0.2) as call:
        pass
    time.sleep(0.4)
    assert call.done and not call.expired
