"""A small training script for the two launchers of the DeepSpeed JSON key:

    deepspeed --num_gpus 2 tests/ds_scripts/train_ds.py --deepspeed \\
        --deepspeed_config <json> --out <dir>          # ab_accel.deepspeed.initialize(args=...)
    accelerate launch --use_deepspeed --deepspeed_config_file <json> --num_processes 2 \\
        tests/ds_scripts/train_ds.py --accelerate --out <dir>   # ab_accel.prepare, config=None

The tiny CNN trains on per-rank random batches for STEPS optimizer steps; every rank writes its
parameters after each step, its phases and its traffic to <dir>/rank<r>.pt.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from distributed import end_process
from ds_scenarios import micro_batch, snapshot, tiny_net

STEPS = 8


def run_deepspeed(args: argparse.Namespace) -> dict:
    from ab_accel import deepspeed as ab_ds

    torch.manual_seed(0)
    model = tiny_net()
    engine, opt, _, sched = ab_ds.initialize(args=args, model=model,
                                             model_parameters=model.parameters())
    rec = {"inner": type(opt.optimizer).__name__, "scheduler": type(sched).__name__,
           "steps": [], "gas": engine.gradient_accumulation_steps()}
    for t in range(STEPS):
        phase, role = opt.phase, opt.role
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = micro_batch(dist.get_rank(), t, micro)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()
        rec["steps"].append({"phase": phase, "role": role, "params": snapshot(engine.module)})
    rec["step_count"], rec["traffic"] = opt.step_count, opt.traffic.summary()
    rec["config"] = opt.config.to_dict()
    return rec


def run_accelerate() -> dict:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    import ab_accel
    from ab_accel.accelerate import ab_optimizer
    from ab_accel.model import ab_layers

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    torch.manual_seed(0)
    model = tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xs = torch.cat([micro_batch(accelerator.process_index, t, 0)[0] for t in range(STEPS)])
    ys = torch.cat([micro_batch(accelerator.process_index, t, 0)[1] for t in range(STEPS)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=8)
    model, opt, loader = ab_accel.prepare(accelerator, model, opt, loader)
    ab = ab_optimizer(opt)
    rec = {"distributed_type": str(accelerator.distributed_type), "steps": [],
           "gas": model.gradient_accumulation_steps(), "clip": model.gradient_clipping()}
    # The loader is not split by Accelerate here: each rank feeds its own batches.
    dtype = accelerator.unwrap_model(model)[0].weight.dtype  # bf16 under DeepSpeed's "bf16"
    for t in range(STEPS):
        phase, role = ab.phase, ab.role
        x, y = micro_batch(accelerator.process_index, t, 0)
        accelerator.backward(nn.functional.cross_entropy(model(x.to(dtype)).float(), y))
        opt.step()
        opt.zero_grad()
        rec["steps"].append({"phase": phase, "role": role,
                             "params": snapshot(accelerator.unwrap_model(model))})
    rec["step_count"], rec["traffic"] = ab.step_count, ab.traffic.summary()
    rec["config"] = ab.config.to_dict()
    rec["engine_optimizer_is_ab"] = model.optimizer is ab
    rec["engine_optimizer"] = type(model.optimizer).__name__
    rec["wrapper_follows"] = opt.optimizer is model.optimizer
    rec["zero_stage"] = model.zero_optimization_stage()
    rec["dtype"] = str(dtype)
    rec["skipped"] = ab.skipped_steps
    raw = accelerator.unwrap_model(model)
    rec["frozen"] = sorted(n for n, p in raw.named_parameters() if not p.requires_grad)
    rec["residuals"] = {n: layer.residual.clone() for n, layer in ab_layers(raw)
                        if layer.residual is not None}
    return rec


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerate", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)  # before training: the results go there at the end
    torch.set_num_threads(1)
    rec = run_accelerate() if args.accelerate else run_deepspeed(args)
    rec["world"] = dist.get_world_size()
    torch.save(rec, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    end_process()


if __name__ == "__main__":
    main()
