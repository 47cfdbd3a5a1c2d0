"""ab_accel.switches: lean-memory switches layer by layer give the same result (real gloo
processes).
"""

from __future__ import annotations

from typing import Any

import torch

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
)
from ab_accel.model import ab_layers

from distributed import run_distributed
from scenarios import loss_of, small_cnn


def lean_memory_run(rank: int, world: int) -> dict[str, Any]:
    """lean_memory (no dense step; switches layer by layer) against the same schedule without
    it: the same parameters after every step, no layer ever dense again after the first
    factorization, and no optimizer state of a dense weight."""
    out: dict[str, Any] = {}
    for lean in (False, True):
        cfg = ABConfig(warmup_steps=0, sync_every=4, rebound_steps=0, lr_rebound_steps=1,
                       rank_energy=0.9, lean_memory=lean)
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)
        layers = list(ab_layers(model))
        dense_shapes = {tuple(layer.weight_shape) for _, layer in layers}
        steps, full_modes, dense_state = [], 0, 0
        for t in range(9):
            loss_of(model, rank, t).backward()
            opt.step()
            opt.zero_grad()
            steps.append({k: v.detach().clone() for k, v in model.named_parameters()})
            full_modes += sum(layer.mode == "full" for _, layer in layers)
            dense_state += sum(1 for p, st in opt.optimizer.state.items()
                               if tuple(p.shape) in dense_shapes and st)
        out["lean" if lean else "plain"] = {
            "steps": steps, "full_modes": full_modes, "dense_state": dense_state,
            "switches": [(sw.event.value, sw.step) for sw in opt.switches],
            "ranks": opt.ranks}
    return out


def test_lean_memory_switches_layer_by_layer_with_the_same_result():
    for res in run_distributed(lean_memory_run, 4):
        plain, lean = res["plain"], res["lean"]
        assert lean["switches"] == plain["switches"] == [
            ("factorize", 0), ("sync", 4), ("factorize", 4), ("sync", 8), ("factorize", 8)]
        for a, b in zip(plain["steps"], lean["steps"], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert lean["full_modes"] == 0 and lean["dense_state"] == 0
        assert lean["ranks"] == plain["ranks"] and all(r for r in lean["ranks"].values())
