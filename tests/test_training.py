"""A short real training run on sklearn's digits with 4 gloo ranks: the loss keeps falling
across phase switches, the test accuracy is high, the model ends compressed."""

from __future__ import annotations

import torch
from torch import nn

from ab_accel import ABConfig, ABOptimizer, compression, convert

from distributed import run_distributed


def train_digits(rank: int, world: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train_idx, test_idx = perm[:1400], perm[1400:]
    shard = train_idx[rank::world]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    cfg = ABConfig(warmup_steps=40, sync_every=40, rebound_steps=8, lr_rebound_steps=5,
                   rank_cutoff=0.3, sync_mode="with-stale")
    convert(model, cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01),
                      model, cfg)
    losses, phases = [], []
    bg = torch.Generator().manual_seed(rank)
    for _ in range(200):
        idx = shard[torch.randint(0, len(shard), (32,), generator=bg)]
        phases.append(opt.phase)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return {"losses": losses, "phases": phases, "acc": acc, "compression": compression(model),
            "traffic": opt.traffic.summary(), "ranks": opt.ranks}


def test_loss_keeps_falling_across_phase_switches():
    results = run_distributed(train_digits, 4)
    for res in results:
        losses = torch.tensor(res["losses"])
        # Mean loss of each 40-step cycle falls from cycle to cycle.
        cycles = losses.reshape(5, 40).mean(1)
        assert all(cycles[i + 1] < cycles[i] for i in range(4)), cycles
        assert res["acc"] > 0.9
        assert res["compression"]["factorized_ratio"] > 2.0
        assert res["traffic"]["reduction"] > 0.3
        assert {"warmup", "ab", "rebound"} <= set(res["phases"])
