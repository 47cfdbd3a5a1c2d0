"""The phase state machine: a pure function of the optimizer step count."""

from __future__ import annotations

import pytest

from ab_accel import ABSchedule


def phases(s: ABSchedule, n: int) -> str:
    return "".join({"warmup": "w", "ab": "a", "rebound": "r"}[s.phase(t)] for t in range(n))


def test_phases_of_a_run():
    s = ABSchedule(warmup_steps=3, sync_every=5, rebound_steps=2)
    assert phases(s, 16) == "www" + "aaarr" + "aaarr" + "aaa"


def test_events_at_boundaries():
    s = ABSchedule(warmup_steps=3, sync_every=5, rebound_steps=2)
    events = {b: s.events(b) for b in range(16) if s.events(b)}
    assert events == {3: ("factorize",), 6: ("sync",), 8: ("factorize",), 11: ("sync",),
                      13: ("factorize",)}


def test_no_warmup_factorizes_at_the_start():
    s = ABSchedule(warmup_steps=0, sync_every=4, rebound_steps=1)
    assert s.events(0) == ("factorize",)
    assert phases(s, 8) == "aaar" + "aaar"


def test_no_rebound_syncs_and_refactorizes_at_one_boundary():
    s = ABSchedule(warmup_steps=2, sync_every=3, rebound_steps=0)
    assert phases(s, 8) == "ww" + "aaa" + "aaa"
    assert s.events(2) == ("factorize",)
    assert s.events(5) == ("sync", "factorize")
    assert s.events(8) == ("sync", "factorize")


def test_lr_rebound_ramps_after_every_switch():
    s = ABSchedule(warmup_steps=2, sync_every=6, rebound_steps=2, lr_rebound_steps=3)
    factors = [s.lr_factor(t) for t in range(12)]
    assert factors[:2] == [1.0, 1.0]                    # warm-up: untouched
    assert factors[2:6] == [0.25, 0.5, 0.75, 1.0]       # AB phase: (k+1)/(R+1)
    assert factors[6:8] == [0.25, 0.5]                  # rebound: a new switch
    assert factors[8:12] == [0.25, 0.5, 0.75, 1.0]      # next AB phase


def test_lr_rebound_disabled_with_zero():
    s = ABSchedule(warmup_steps=1, sync_every=4, rebound_steps=1, lr_rebound_steps=0)
    assert all(s.lr_factor(t) == 1.0 for t in range(20))


def test_cycle_and_next_switch_and_describe():
    s = ABSchedule(warmup_steps=4, sync_every=10, rebound_steps=3)
    assert [s.cycle(t) for t in (0, 3, 4, 13, 14, 30)] == [-1, -1, 0, 0, 1, 2]
    assert s.next_switch(0) == 4
    assert s.next_switch(4) == 11
    assert s.describe(20) == [("warmup", 0, 4), ("ab", 4, 11), ("rebound", 11, 14),
                              ("ab", 14, 20)]


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=0, sync_every=3, rebound_steps=3),
                                    dict(warmup_steps=-1, sync_every=3, rebound_steps=0)])
def test_invalid_schedules(kwargs):
    with pytest.raises(ValueError):
        ABSchedule(**kwargs)


def test_negative_step():
    with pytest.raises(ValueError):
        ABSchedule(1, 2, 0).phase(-1)
