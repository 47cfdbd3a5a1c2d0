"""ab_accel.comm: a silent peer fails the collective after the timeout, naming phase and step; the
meter keeps every step's bytes (real gloo processes).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
)

from distributed import run_distributed
from scenarios import loss_of, small_cnn


def silent_peer(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 stops answering; rank 0's next collective fails after collective_timeout_s with
    an error that names the phase and the step (instead of waiting for 30 minutes)."""
    import time

    from ab_accel.comm import PeerError

    cfg = ABConfig(warmup_steps=5, sync_every=6, rebound_steps=1, collective_timeout_s=2.0)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, cfg)
    for t in range(2):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
    if rank == 1:
        time.sleep(8)  # alive, but silent
        return {"slept": True}
    loss_of(model, rank, 2).backward()
    start = time.monotonic()
    try:
        opt.step()
        return {"error": None}
    except PeerError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


def meter_keeps_the_bytes_of_every_step(rank: int, world: int) -> dict[str, Any]:
    """ABOptimizer's meter: the per-step bytes (switches included) add up to its totals."""
    torch.manual_seed(0)
    cfg = ABConfig(warmup_steps=2, sync_every=4, rebound_steps=1, rank_fraction=0.5)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, cfg)
    for step in range(9):
        opt.zero_grad()
        loss_of(model, rank, step).backward()
        opt.step()
    from ab_accel.comm import world_traffic

    return {"per_step": opt.traffic.per_step, "summary": opt.traffic.summary(),
            "world": world_traffic(opt.traffic),
            "phases": [str(opt.schedule.phase(t)) for t in range(9)], "report": opt.report(),
            "records": opt.traffic.records}


def test_a_silent_peer_fails_the_collective_after_the_timeout_naming_phase_and_step():
    rank0, rank1 = run_distributed(silent_peer, 2)
    assert rank1 == {"slept": True}
    assert rank0["error"] is not None and rank0["seconds"] < 7, rank0
    assert "warmup phase at step 2" in rank0["error"] and "all-reduce" in rank0["error"]
    assert "collective_timeout_s" in rank0["error"]


def test_the_meter_keeps_each_steps_bytes_and_the_report_says_what_ran():
    r0, r1 = run_distributed(meter_keeps_the_bytes_of_every_step, 2)
    per_step, total = r0["per_step"], r0["summary"]
    assert len(per_step) == 9 and per_step == r1["per_step"]
    assert sum(w for w, _ in per_step) == pytest.approx(total["wire_bytes"])
    assert sum(d for _, d in per_step) == pytest.approx(total["dp_equivalent_wire_bytes"])
    world = r0["world"]  # world_traffic: the two ranks' meters summed
    assert world == r1["world"] and world["per_step"] == [  # the mean of equal rows
        [(a + b) / 2 for a, b in zip(x, y, strict=True)]
        for x, y in zip(per_step, r1["per_step"], strict=True)]
    assert world["wire_bytes"] == pytest.approx(2 * total["wire_bytes"])
    assert world["wire_bytes_by_phase"]["ab"] == pytest.approx(
        r0["summary"]["wire_bytes_by_phase"]["ab"] + r1["summary"]["wire_bytes_by_phase"]["ab"])
    assert world["reduction_vs_dp"] == pytest.approx(total["reduction"])
    assert r0["phases"][3] == r0["phases"][7] == "ab"  # steps that end on no switch
    assert per_step[3][0] < 0.5 * per_step[0][0] and per_step[7][0] < 0.5 * per_step[0][0]
    report = r0["report"]
    assert report["groups"] == [[0], [1]] and report["roles"] == ["A", "B"]
    assert [(w["event"], w["step"]) for w in report["switches"]] == [
        ("factorize", 2), ("sync", 5), ("factorize", 6), ("sync", 9)]
    assert report["sync_steps"] == [5, 9] and report["skipped_steps"] == 0
    assert report["compression"]["factorized_ratio"] > 1 and "at step 6" in \
        report["compression"]["of"]
    json.dumps(report)  # plain JSON data
    # One collective per dense step: the "used" flags, the non-finite count and the BatchNorm
    # buffers ride in the overlapped reduction's last (here: only) gradient bucket.
    calls = {(r["phase"], len(r["group"])): r["calls"] for r in r0["records"]
             if r["op"] == "all_reduce"}
    assert calls[("warmup", 2)] == 2 and calls[("rebound", 2)] == 1  # 2 warm-up, 1 rebound step


# ---------------------------------------------------------------------- one process
def test_wire_factor_is_the_ring_estimate():
    from ab_accel.comm import wire_factor

    assert wire_factor("all_reduce", 4) == pytest.approx(2 * 3 / 4)
    assert wire_factor("broadcast", 4) == pytest.approx(3 / 4)
    assert wire_factor("all_reduce", 1) == 0


def test_without_a_process_group_nothing_is_sent_or_counted():
    from ab_accel.comm import Communicator, TrafficMeter

    meter = TrafficMeter()
    comm = Communicator(meter)
    t = torch.ones(3)
    comm.mean_([t], None, (0, 1), "warmup")
    assert torch.equal(t, torch.ones(3)) and meter.summary()["bytes"] == 0


def test_the_meter_round_trips_its_state():
    from ab_accel.comm import TrafficMeter

    meter = TrafficMeter()
    meter.record("all_reduce", 400, (0, 1), "ab")
    meter.record_step("ab", 1000, 2)
    meter.mark_step()
    copy = TrafficMeter()
    copy.load_state_dict(meter.state_dict())
    assert copy.summary() == meter.summary()
    assert copy.summary()["bytes"] == 400 and copy.summary()["steps"] == 1
