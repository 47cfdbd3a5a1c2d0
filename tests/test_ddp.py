"""ab_accel.ddp: DDPTraffic counts what plain DDP sends, and DDP still reduces (real gloo
processes).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ab_accel import ABConfig, convert
from ab_accel.model import ab_layers

from distributed import run_distributed
from scenarios import loss_of, small_cnn


def ddp_traffic_counts_what_ddp_sends(rank: int, world: int) -> dict[str, Any]:
    """Plain DDP with ab_accel.ddp.DDPTraffic's comm hook: 3 SGD steps of small_cnn (BatchNorm
    buffers, broadcast by DDP before every forward)."""
    from ab_accel.ddp import DDPTraffic

    torch.manual_seed(0)
    model = small_cnn()
    ddp = DDP(model)
    counter = DDPTraffic(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        opt.step()
        counter.mark_step()
    again = DDPTraffic(DDP(copy.deepcopy(model)))
    again.load_state_dict(counter.state_dict())
    from ab_accel.comm import world_traffic

    return {"world": world_traffic(counter), "grad_bytes": counter.grad_bytes,
            "buffer_bytes": counter.buffer_bytes,
            "wire": counter.wire_bytes, "per_step": counter.per_step,
            "summary": counter.summary(), "restored": again.summary(),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buffer_total": sum(b.numel() * b.element_size() for b in model.buffers()),
            "grads": [p.grad.clone() for p in model.parameters()]}


def test_ddp_traffic_counts_every_bucket_and_buffer_broadcast_and_still_reduces():
    from ab_accel.comm import wire_factor

    results = run_distributed(ddp_traffic_counts_what_ddp_sends, 2)
    for r in results:
        assert r["grad_bytes"] == 3 * r["param_bytes"]  # every gradient, every step
        assert r["buffer_bytes"] == 3 * r["buffer_total"]  # BatchNorm stats before each forward
        assert r["wire"] == pytest.approx(r["grad_bytes"] * wire_factor("all_reduce", 2)
                                          + r["buffer_bytes"] * wire_factor("broadcast", 2))
        assert len(r["per_step"]) == 3 and sum(r["per_step"]) == pytest.approx(r["wire"])
        assert r["restored"] == r["summary"]  # state_dict / load_state_dict round trip
    # The counting hook still runs the all-reduce: different data, the same averaged gradients.
    for a, b in zip(results[0]["grads"], results[1]["grads"], strict=True):
        assert torch.equal(a, b)
    # world_traffic: both ranks' counts summed, the same answer on every rank; per step the mean
    world = results[0]["world"]
    assert world == results[1]["world"] and len(world["per_rank"]) == 2
    assert world["bytes"] == sum(r["summary"]["bytes"] for r in results)
    assert world["wire_bytes"] == pytest.approx(sum(r["wire"] for r in results))
    assert [w for w, _ in world["per_step"]] == pytest.approx(
        [(a + b) / 2 for a, b in zip(results[0]["per_step"], results[1]["per_step"], strict=True)])
    assert "reduction_vs_dp" not in world and world["measured_by"].startswith("DDP comm hook")


# ---------------------------------------------------------------------- one process
def test_the_ab_weights_stay_out_of_ddps_reducer_and_the_biases_in():
    from ab_accel.ddp import ignore_factorized_weights

    cfg = ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1)
    model = convert(small_cnn(), cfg)
    ignore_factorized_weights(model)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    names = {f"{n}.{p}" for n, layer in ab_layers(model)
             for p, _ in layer.named_parameters(recurse=False)}
    assert ignored and ignored <= names
    assert not any(name.endswith(".bias") for name in ignored)
