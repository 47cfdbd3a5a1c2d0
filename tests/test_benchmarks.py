"""The benchmark scripts measure what they claim: a tiny real compare run, and the projection's
arithmetic checked by hand and against the AB meter of that run.

Benchmarks are scripts with results files, not timed tests: nothing here asserts a speed-up or
a target; it asserts that the numbers the benchmark reports are the right numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from ab_accel import ABSchedule
from benchmarks.compare import ab_schedule_for
from benchmarks.meters import predicted_link_bytes, ring_crossings
from benchmarks.projection import model_shape, project
from benchmarks.workloads import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS, W0, T, F = 21, 2, 10, 2  # warm-up 0-1, AB 2-9, rebound 10-11, AB 12-19, rebound 20
WIDTH, DEPTH, WORLD = 64, 4, 4
METHODS = ("local", "ddp", "ddp-bf16", "ab-with-stale", "ab-with-stale-bf16", "powersgd-r2",
           "diloco-h4")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    cmd = [sys.executable, "-m", "benchmarks.compare",
           "--methods", ",".join(METHODS), "--seeds", "0",
           "--steps", str(STEPS), "--nproc", str(WORLD), "--width", str(WIDTH),
           "--depth", str(DEPTH), "--batch-size", "8", "--eval-every", "6", "--one-world",
           "--ab-warmup", str(W0), "--ab-sync-every", str(T), "--ab-rebound", str(F),
           "--ab-lr-rebound", "1", "--rank-cutoff", "0", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as fh:
        return json.load(fh)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_compare_writes_results_with_exact_byte_counts(tiny_run: dict) -> None:
    res = tiny_run
    assert res["mode"] == "local"
    assert set(res["methods"]) == set(METHODS)
    assert res["settings"]["steps"] == STEPS and res["settings"]["nproc"] == WORLD
    model = build_model("mlp", WIDTH, DEPTH, 16, 0)
    grad_bytes = _param_bytes(model)  # no buffers: DDP's buckets hold exactly the gradients

    for name, m in res["methods"].items():
        (seed,) = m["seeds"]
        assert 0.0 <= seed["final_acc"] <= 100.0
        assert seed["train_seconds"] > 0 and m["max_rss_mb"] > 0
        assert [p["step"] for p in seed["curve"]] == [6, 12, 18, 21]
        assert seed["curve"][-1]["wire_bytes"] == pytest.approx(seed["wire_bytes"])
        if name != "local":  # the clock trains every rank alone: its replicas differ
            assert seed["replica_spread"] == 0.0, f"{name}: ranks ended with different models"
        assert len(seed["bytes_per_rank"]) == WORLD
        assert m["summary"]["final_acc"]["n"] == 1

    ddp = res["methods"]["ddp"]["seeds"][0]
    # params + grads + AdamW's two moments + its float32 step counter per tensor
    n_tensors = len(list(model.parameters()))
    assert ddp["peak_state_bytes"] == 4 * grad_bytes + 4 * n_tensors
    # The counting hook saw exactly the model's gradient bytes every step, and what went
    # through torch.distributed (the intercept) is exactly that: plain DDP sends nothing else.
    assert ddp["dp_equivalent_bytes"] == STEPS * grad_bytes
    assert ddp["bytes_per_rank"] == [STEPS * grad_bytes] * WORLD
    assert ddp["wire_bytes"] == pytest.approx(STEPS * grad_bytes * 2 * (WORLD - 1) / WORLD)
    assert ddp["hook_calls"] >= STEPS

    ab = res["methods"]["ab-with-stale"]["seeds"][0]
    psgd = res["methods"]["powersgd-r2"]["seeds"][0]
    assert ab["meter_equals_intercept"], "AB meter and the torch.distributed intercept disagree"
    assert ab["dp_equivalent_bytes"] == STEPS * grad_bytes
    assert ab["wire_bytes"] < 0.8 * ddp["wire_bytes"]
    # in the AB phase a rank sends the dense layers and one factor, inside its group of 2
    ab_phase = ab["ab_traffic_per_rank"][0]
    per_ab_step = ab_phase["wire_bytes_by_phase"]["ab"] / ab_phase["steps_by_phase"]["ab"]
    assert per_ab_step < 0.5 * ddp["wire_bytes"] / STEPS
    assert psgd["bytes"] < 0.5 * ddp["bytes"]
    assert psgd["dp_equivalent_bytes"] == STEPS * grad_bytes
    assert sorted(ab["roles"]) == ["A", "A", "B", "B"]
    assert ab["switch_counts"] == {"factorize": 2, "sync": 2}
    assert ab["svd_seconds"] > 0 and ab["switch_seconds"]["factorize"] >= 0
    # the dense warm-up is the peak; in AB phases the layers hold only A and B (and the
    # frozen factor has no gradient and no optimizer state)
    assert ab["peak_state_bytes"] == ddp["peak_state_bytes"]
    assert ab["peak_state_bytes_by_phase"]["ab"] < 0.8 * ddp["peak_state_bytes"]
    assert psgd["peak_state_bytes"] > ddp["peak_state_bytes"]  # + error feedback, P and Q
    # rank_cutoff 0 keeps the break-even rank: 64 x 64 -> 32, i.e. half of the full rank.
    assert all(r == 32 for f in ab["factorizations"] for r in f["ranks"].values())
    assert ab["rank_fraction"] == pytest.approx(0.5)

    comp = res["comparison"]
    assert comp["ddp"]["wire_bytes_vs_ddp"] == pytest.approx(1.0)
    assert comp["ab-with-stale"]["wire_bytes_vs_ddp"] == pytest.approx(
        ab["wire_bytes"] / ddp["wire_bytes"])


def test_projection_matches_the_ab_meter_of_the_run(tiny_run: dict) -> None:
    """The projection's arithmetic, fed the run's model and schedule, predicts the bytes the
    AB meter counted, phase by phase (mean over the A-group and B-group ranks)."""
    ab = tiny_run["methods"]["ab-with-stale"]["seeds"][0]
    shape = model_shape(build_model("mlp", WIDTH, DEPTH, 16, 0))
    proj = project(shape, steps=STEPS, world=WORLD, group_size=WORLD // 2,
                   sync_mode="with-stale", warmup_steps=W0, sync_every=T, rebound_steps=F,
                   rank_fraction=1.0)
    measured = {p: sum(t["wire_bytes_by_phase"][p] for t in ab["ab_traffic_per_rank"]) / WORLD
                for p in ("warmup", "ab", "sync", "rebound", "check")}
    for phase, value in measured.items():
        assert proj["ab_bytes_by_phase"][phase] == pytest.approx(value, rel=1e-9), phase
    assert proj["ab_bytes"] == pytest.approx(ab["wire_bytes"], rel=1e-9)
    assert proj["ddp_bytes"] == pytest.approx(
        tiny_run["methods"]["ddp"]["seeds"][0]["wire_bytes"], rel=1e-9)


def test_projection_arithmetic_by_hand() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    shape = model_shape(model)
    # first and last layer stay dense; the AB layers' biases are dense parameters
    assert [(la.out_dim, la.in_dim) for la in shape.layers] == [(16, 16), (16, 16)]
    assert shape.dense_params == (8 * 16 + 16) + 16 + 16 + (16 * 4 + 4) == 244
    assert shape.total_params == 756 and shape.buffers == 0 and shape.dense_tensors == 6
    out = project(shape, steps=10, world=4, group_size=2, sync_mode="with-stale",
                  warmup_steps=2, sync_every=4, rebound_steps=1, rank_fraction=0.25,
                  ranks_per_node=2)
    # r = ceil(0.25 * 16) = 4 (below the break-even rank 8)
    assert out["ranks"] == [4, 4]
    assert out["steps_by_phase"] == {"warmup": 2, "ab": 6, "rebound": 2}
    assert (out["syncs"], out["factorizations"]) == (2, 3)
    ring4, ring2 = 2 * 3 / 4, 1.0
    dp_step = 756 * 4 * ring4
    assert out["ddp_bytes"] == pytest.approx(10 * dp_step)
    # + one "used" flag per trained tensor (6 dense + 2) + the non-finite count
    full_step = dp_step + 9 * 4 * ring4
    ab_step = (244 + 9 + 2 * 16 * 4) * 4 * ring2  # dense + flags + A (16x4) or B (4x16) x 2
    check = 8 * ring4  # an AB step's world-wide finite flag (one int64)
    switch_check = 8 * ring4  # every switch first checks every rank's tensors are finite
    sync = (2 * (16 * 4 + 4 * 16) + 244 + 2 * 244) * 4 * ring4  # A, B, dense, AdamW moments
    factorize = (8 * 2 + 16) * ring4  # int64 rank per layer + a 2-double digest
    assert out["ab_bytes_by_phase"] == pytest.approx(
        {"warmup": 2 * full_step, "ab": 6 * ab_step, "rebound": 2 * full_step,
         "sync": 2 * (sync + switch_check) + 3 * (factorize + switch_check),
         "check": 6 * check})
    assert out["reduction"] == pytest.approx(1 - out["ab_bytes"] / out["ddp_bytes"])
    # Two nodes of two ranks: a world ring crosses between nodes on 2 of its 4 edges; each
    # group is one node, so AB steps send nothing between nodes but the world's finite flag.
    assert out["ddp_internode_bytes"] == pytest.approx(10 * dp_step / 2)
    assert out["ab_internode_bytes"] == pytest.approx(
        (4 * full_step + 2 * (sync + switch_check) + 3 * (factorize + switch_check)
         + 6 * check) / 2)
    assert out["schedule_ceiling"] == pytest.approx(1 - 4 / 10)
    only_b = project(shape, steps=10, world=4, group_size=4, sync_mode="only-b",
                     warmup_steps=2, sync_every=4, rebound_steps=1, rank_fraction=0.25)
    assert only_b["ab_bytes_per_ab_step"] == pytest.approx((244 + 9 + 2 * 4 * 16) * 4 * ring4)


def test_link_prediction_counts_ring_edges_between_nodes() -> None:
    def node_of(rank: int) -> int:
        return rank // 2  # two ranks per node

    assert ring_crossings([0, 1, 2, 3], node_of) == 2  # 1->2 and 3->0
    assert ring_crossings([0, 1], node_of) == 0  # a group inside one node never crosses
    assert ring_crossings([0, 2], node_of) == 2
    records = [{"group": [0, 1, 2, 3], "wire_bytes": 1500.0},
               {"group": [0, 1], "wire_bytes": 1000.0}]
    # one rank's share of a world ring: 2 crossing edges of 4 carry its 1500 wire bytes
    assert predicted_link_bytes(records, node_of) == pytest.approx(1500.0 * 2 / 4)


def test_default_ab_schedule_ends_inside_a_rebound() -> None:
    for steps in (200, 600, 1000):
        s = ab_schedule_for(steps)
        sched = ABSchedule(s["ab_warmup"], s["ab_sync_every"], s["ab_rebound"])
        assert sched.phase(steps - 1) == "rebound"
        assert sched.events(steps) == ()  # no factorization after the last step
        assert 0.08 * steps <= s["ab_warmup"] <= 0.12 * steps
    with pytest.raises(ValueError, match="too short"):
        ab_schedule_for(12)


def test_bad_method_is_refused_before_any_process_starts() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare",
                           "--methods", "ddp,powersgd", "--out", os.devnull],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "powersgd-r<rank>" in proc.stderr



def test_local_clock_sends_nothing(tiny_run: dict) -> None:
    local = tiny_run["methods"]["local"]["seeds"][0]
    assert local["bytes_per_rank"] == [0] * WORLD and local["wire_bytes"] == 0
    assert local["collectives_rank0"] == []
    assert local["replica_spread"] > 0  # every rank trained alone: not a training method
    comp = tiny_run["comparison"]
    assert comp["ddp"]["compute_ms_per_step"] == pytest.approx(
        1e3 * tiny_run["methods"]["local"]["summary"]["seconds_per_step"]["mean"])


def test_ddp_compress_hook_halves_ddp_bytes(tiny_run: dict) -> None:
    ddp = tiny_run["methods"]["ddp"]["seeds"][0]
    bf16 = tiny_run["methods"]["ddp-bf16"]["seeds"][0]
    assert bf16["bytes_per_rank"] == [b // 2 for b in ddp["bytes_per_rank"]]
    assert bf16["dp_equivalent_bytes"] == ddp["dp_equivalent_bytes"]


def test_ab_bf16_wire_halves_the_gradient_bytes(tiny_run: dict) -> None:
    fp32 = tiny_run["methods"]["ab-with-stale"]["seeds"][0]["ab_traffic_per_rank"][0]
    bf16 = tiny_run["methods"]["ab-with-stale-bf16"]["seeds"][0]["ab_traffic_per_rank"][0]
    assert bf16["steps_by_phase"] == fp32["steps_by_phase"]
    for phase in ("warmup", "ab", "rebound", "sync"):
        full, half = fp32["bytes_by_phase"][phase], bf16["bytes_by_phase"][phase]
        # gradients and sync payloads halve; the int "used" flags per step stay as they are
        assert full / 2 <= half <= full / 2 + 0.01 * full, phase


def test_diloco_sends_full_weights_every_h_steps(tiny_run: dict) -> None:
    """Warm-up W0 steps of averaged gradients, then one all-reduce of every parameter per
    H = 4 inner steps, and one more at the end for the steps not yet averaged."""
    seed = tiny_run["methods"]["diloco-h4"]["seeds"][0]
    grad_bytes = _param_bytes(build_model("mlp", WIDTH, DEPTH, 16, 0))
    outer_steps = -(-(STEPS - W0) // 4)
    assert seed["bytes_per_rank"] == [(W0 + outer_steps) * grad_bytes] * WORLD
    assert seed["replica_spread"] == 0.0


def test_diloco_outer_step_is_nesterov_on_the_averaged_pseudo_gradient(
        tmp_path: Path) -> None:
    """Two outer steps on a one-parameter model, by hand: delta = outer - inner,
    v = 0.9 v + delta, outer -= 0.7 (delta + 0.9 v) (torch's SGD with nesterov=True)."""
    import torch
    import torch.distributed as dist

    from benchmarks.methods import DiLoCo

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        model = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        algo = DiLoCo(model, warmup_steps=0, period=2, outer_lr=0.7, outer_momentum=0.9)
        outer = torch.tensor([[1.0, 2.0]])
        v = torch.zeros(1, 2)
        for inner in (torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 3.0]])):
            with torch.no_grad():
                model.weight.copy_(inner)
            algo.after_inner_step()  # step 1 of 2: no outer step yet
            assert torch.equal(model.weight.detach(), inner)
            algo.after_inner_step()  # step 2: the outer step
            delta = outer - inner
            v = 0.9 * v + delta
            outer = outer - 0.7 * (delta + 0.9 * v)
            assert torch.allclose(model.weight.detach(), outer, atol=1e-6)
        assert algo.outer_steps == 2
    finally:
        dist.destroy_process_group()
