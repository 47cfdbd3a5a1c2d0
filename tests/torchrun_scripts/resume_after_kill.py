"""Under `torchrun --max-restarts 1`: rank 1 is killed (SIGKILL) once, mid-AB-phase; torchrun
restarts every worker, each resumes from the newest complete checkpoint, and the run ends with
the model an uninterrupted run ends with.

    torchrun --nproc_per_node 4 --max-restarts 1 resume_after_kill.py OUT_DIR [--kill-at STEP]
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal

import torch
import torch.distributed as dist

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

from distributed import end_process
from scenarios import flat_named, loss_of, small_cnn

STEPS, EVERY = 16, 3
CFG = ABConfig(warmup_steps=2, sync_every=7, rebound_steps=2, lr_rebound_steps=2,
               rank_cutoff=0.5, collective_timeout_s=60)


def init_for_restarts() -> None:
    """The gloo world under `torchrun --max-restarts`, one store namespace per attempt.

    With env:// initialisation (torch 2.14), a restarted attempt reads the dead attempt's peer
    addresses from torchrun's store and fails in gloo's connectFullMesh ("Connection refused");
    prefixing the store with TORCHELASTIC_RESTART_COUNT gives every attempt fresh keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1)
    args = parser.parse_args()
    init_for_restarts()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = convert(small_cnn(), CFG)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, CFG)
    ckpts = os.path.join(args.out, "ckpts")
    latest = latest_checkpoint(ckpts)
    if latest is not None:
        load_checkpoint(latest, model, opt)
        if rank == 0:
            print(f"resumed from {latest} at step {opt.step_count}", flush=True)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    for t in range(opt.step_count, STEPS):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
        if opt.step_count % EVERY == 0:
            save_checkpoint(os.path.join(ckpts, f"step_{opt.step_count}"), model, opt)
        if rank == 1 and first_attempt and opt.step_count == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        torch.save({"params": flat_named(model), "step": opt.step_count,
                    "resumed_from": latest}, os.path.join(args.out, "final.pt"))
    end_process()


if __name__ == "__main__":
    main()
