"""`FairSlots`: Detect slots go to waiting calls in arrival order; a full queue, an expired
wait or a caller that left gets no slot (real threads)."""

from __future__ import annotations

import threading
import time

import pytest

from splitdet.cloud.slots import FairSlots, Outcome

from support import wait_for


def test_slots_go_to_waiting_calls_in_arrival_order():
    slots = FairSlots(1, 3)
    assert slots.acquire(0)  # free: taken at once
    order: list[str] = []

    def call(name: str) -> None:
        assert slots.acquire(10)
        order.append(name)
        time.sleep(0.02)
        slots.release()

    threads = []
    for k, name in enumerate("abc"):
        thread = threading.Thread(target=call, args=(name,))
        thread.start()
        threads.append(thread)
        wait_for(lambda k=k: slots.waiting == k + 1, 5, "the call to queue")  # queued in this order
    assert slots.acquire(10) is Outcome.FULL  # a fourth: the queue is full, refused at once
    slots.release()
    for thread in threads:
        thread.join(10)
    assert order == ["a", "b", "c"]
    assert slots.waiting == 0 and slots.acquire(0)  # every slot came back


def test_a_wait_that_ends_leaves_the_queue_to_the_next():
    slots = FairSlots(1, 2)
    assert slots.acquire(0)
    started = time.monotonic()
    assert slots.acquire(0.2) is Outcome.TIMED_OUT  # no slot within its wait
    assert 0.15 < time.monotonic() - started < 4  # about its 0.2 s (a loaded machine aside)
    left = threading.Event()
    outcome = slots.acquire(10, gave_up=lambda: left.set() or True)  # the caller went away
    assert outcome is Outcome.GAVE_UP and not outcome
    assert left.is_set() and slots.waiting == 0
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(10)))
    waiter.start()
    wait_for(lambda: slots.waiting == 1, 5, "the call to queue")
    slots.release()
    waiter.join(10)
    assert got == [Outcome.GRANTED]


def test_no_queue_refuses_at_once_and_bad_use_is_an_error():
    slots = FairSlots(2, 0)
    assert slots.acquire(5) and slots.acquire(5)
    started = time.monotonic()
    assert not slots.acquire(5)
    assert time.monotonic() - started < 4  # at once, not after its 5 s wait
    slots.release()
    slots.release()
    with pytest.raises(RuntimeError, match="released more slots"):
        slots.release()
    with pytest.raises(ValueError):
        FairSlots(0, 1)
