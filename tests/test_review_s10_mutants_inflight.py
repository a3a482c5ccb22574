"""Mutant audit (session 10): cloud/inflight.py's promises, pinned on `InFlight` itself.

The cloud tests drive `InFlight` through real servers, slowly and only along a few paths; these
check, in threads of this process, each promise of its docstring. Each test names the one-line
mutants it kills.
"""

from __future__ import annotations

import threading
import time

import pytest

from splitdet.cloud.core import Cancelled
from splitdet.cloud.inflight import InFlight

KEY = ("answers", "fingerprint", "request-1")


def test_an_identical_call_waits_for_the_running_ones_answer():
    """Kills: an identical call never found (`by_digest.get(digest)` made None: both lead and
    compute), its follower count left alone, and `finish` not handing the answer over."""
    running = InFlight()
    lead, follow, conflict = running.lead_or_follow(KEY, "digest-a")
    assert lead is not None and follow is None and conflict is False
    again, follow, conflict = running.lead_or_follow(KEY, "digest-a")
    assert again is None and follow is lead and conflict is False
    assert lead.followers == 1
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(InFlight.wait(follow, lambda: False)))
    waiter.start()
    time.sleep(0.1)
    assert answers == []  # still computing
    running.finish(KEY, lead, {"boxes": []})
    waiter.join(5)
    assert answers == [{"boxes": []}]


def test_a_failed_first_call_gives_its_followers_none_and_the_next_call_leads():
    """Kills: `finish` leaving the entry in place (a later call of the same request would wait
    on an answer already given, not compute its own), and `finish` of no lead failing."""
    running = InFlight()
    lead, _, _ = running.lead_or_follow(KEY, "digest-a")
    _, follow, _ = running.lead_or_follow(KEY, "digest-a")
    running.finish(KEY, lead, None)
    assert InFlight.wait(follow, lambda: False) is None
    after, follow_after, conflict = running.lead_or_follow(KEY, "digest-a")
    assert after is not None and after is not lead and follow_after is None and not conflict
    running.finish(KEY, None, "ignored")  # (a follower led nothing: nothing to end)
    running.finish(KEY, after, "answer")
    # the key is free again: another request under the id is no conflict now
    fresh, _, conflict = running.lead_or_follow(KEY, "digest-b")
    assert fresh is not None and conflict is False


def test_another_request_under_a_running_id_is_a_conflict_and_so_is_its_retry():
    """Kills: `conflict = bool(by_digest)` made False (the second request's answer would be
    stored over the first's), and a follower told `False` instead of its lead's conflict (an
    edge's retry of the conflicting request would store its answer)."""
    running = InFlight()
    first, _, first_conflict = running.lead_or_follow(KEY, "digest-a")
    other, follow, conflict = running.lead_or_follow(KEY, "digest-b")
    assert first_conflict is False
    assert other is not None and other is not first and follow is None and conflict is True
    retry, follow, conflict = running.lead_or_follow(KEY, "digest-b")
    assert retry is None and follow is other and conflict is True
    retry_of_first, follow, conflict = running.lead_or_follow(KEY, "digest-a")
    assert retry_of_first is None and follow is first and conflict is False
    # another key (another model or id) is not concerned
    elsewhere, _, conflict = running.lead_or_follow(("answers", "fingerprint", "r2"), "digest-b")
    assert elsewhere is not None and conflict is False
    # the first ending leaves the second in place: its own retry still follows it
    running.finish(KEY, first, "a")
    again, follow, conflict = running.lead_or_follow(KEY, "digest-b")
    assert again is None and follow is other and conflict is True


def test_a_waiting_caller_that_goes_away_stops_waiting():
    """Kills: `wait` not asking `is_cancelled` (a retry whose edge left would hold its thread
    until the first call ends)."""
    running = InFlight()
    lead, _, _ = running.lead_or_follow(KEY, "digest-a")
    _, follow, _ = running.lead_or_follow(KEY, "digest-a")
    late = threading.Timer(3.0, running.finish, (KEY, lead, "answer"))  # (bounds a mutant)
    late.start()
    start = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="caller went away"):
            InFlight.wait(follow, lambda: time.monotonic() - start > 0.1, poll_s=0.01)
    finally:
        late.join()
