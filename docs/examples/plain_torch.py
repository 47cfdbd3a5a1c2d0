"""AB-training in a plain torch.distributed script: no Accelerate, no DDP.

    torchrun --nproc_per_node 4 docs/examples/plain_torch.py --steps 120

Trains an MLP on sklearn's digits (real 8x8 images shipped with scikit-learn) and prints, on
rank 0, one JSON line: accuracy, traffic, compression, and a check of the AB invariants made
with all_gather over the world (ranks of one group identical in an AB phase, all ranks identical
after a sync).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import zlib

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from ab_accel import ABConfig, ABOptimizer, compression, convert, merge


def digest(model: nn.Module) -> int:
    """CRC32 of every parameter's bytes: equal digests mean bit-identical replicas."""
    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.detach().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sync_mode", default="with-stale")
    parser.add_argument("--group_size", type=int, default=None)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1400], perm[1400:]
    shard = train_idx[rank::world]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    cfg = ABConfig(warmup_steps=40, sync_every=40, rebound_steps=8, lr_rebound_steps=5,
                   rank_cutoff=0.3, sync_mode=args.sync_mode, group_size=args.group_size)
    convert(model, cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)

    checks = {"ab_steps_group_identical": 0, "ab_steps_groups_differ": 0, "syncs_identical": 0,
              "ab_steps": 0, "syncs": 0}
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        phase, ranks_before = opt.phase, dict(opt.ranks)
        idx = shard[torch.randint(0, len(shard), (32,), generator=gen)]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        digests = [None] * world
        dist.all_gather_object(digests, digest(model))
        own = [digests[r] for r in opt.groups.group_ranks]
        synced = phase == "ab" and all(v is None for v in opt.ranks.values()) and any(
            v is not None for v in ranks_before.values())
        if synced:
            checks["syncs"] += 1
            checks["syncs_identical"] += len(set(digests)) == 1
        elif phase == "ab":
            checks["ab_steps"] += 1
            checks["ab_steps_group_identical"] += len(set(own)) == 1
            checks["ab_steps_groups_differ"] += len(set(digests)) > 1

    compressed = compression(model)  # measured in the AB phase: the factors are what is held
    opt.finalize()  # stopped mid-AB-phase (opt.groups_differ)? one sync before eval and export
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    report = {"world_size": world, "role_plan": list(opt.groups.plan.roles), "accuracy": acc,
              "traffic": opt.traffic.summary(), "compression": compressed,
              "checks": checks}
    if rank == 0:
        merge(model)
        print(json.dumps(report, default=str))
    # Leave cleanly: every rank done, the optimizer (which holds the AB groups and the reducer's
    # hooks) dropped while the interpreter is whole, then the groups destroyed. A gloo group
    # torn down by the interpreter's exit instead can abort a finished run ("terminate called
    # without an active exception"), rarely: seen once in this example's test.
    dist.barrier()
    del opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
