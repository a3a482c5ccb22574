"""Mutant audit (session 10): cloud/slots.py's arrival order against a call that barges in.

`FairSlots` exists because a call arriving as a slot is freed took it ahead of the ones that
had waited (cloud/slots.py's docstring: four edges, one got every answer). The existing test
released a slot with nobody arriving at that moment, so a `FairSlots` that let a newcomer take
a free slot while others wait passed it.
"""

from __future__ import annotations

import threading

from splitdet.cloud.slots import FairSlots, Outcome

from support import wait_for


def test_a_slot_freed_while_calls_wait_goes_to_them_not_to_a_newcomer():
    """Kills: `if self._free and not self._waiting` made `if self._free` (a call arriving just
    after a release takes the slot the waiting call was owed: the starvation FairSlots ends)."""
    barged = 0
    for _ in range(20):
        slots = FairSlots(1, 2)
        assert slots.acquire(0)
        got: list[Outcome] = []
        waiter = threading.Thread(target=lambda: got.append(slots.acquire(10)))  # noqa: B023
        waiter.start()
        wait_for(lambda: slots.waiting == 1, 5, "the call to queue")  # noqa: B023
        slots.release()  # the waiting call is owed this slot...
        newcomer = slots.acquire(0)  # ...whoever asks first after the release
        if newcomer:
            barged += 1
            slots.release()
        waiter.join(10)
        assert got == [Outcome.GRANTED]
        slots.release()
        assert slots.waiting == 0
    assert barged == 0, f"a newcomer took the slot owed to a waiting call {barged} time(s) in 20"
