"""An Accelerate training script for tests/test_accelerate.py: a small CNN with BatchNorm on
scikit-learn's digits, AB-trained through ``ab_accel.prepare``. Every rank writes what it saw
to ``<out_dir>/rank<r>.pt``; the tests assert on those records.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 4 \
        tests/accel_scripts/train_digits.py main OUT_DIR CKPT_DIR

Modes:
    main    bf16 autocast, gradient accumulation 2, clipping, LR scheduler; records the
            parameters, gradients and meter counts the tests check; ``save_state`` mid-AB-phase
            into CKPT_DIR and trains on to the end.
    resume  a fresh run: first a refused setup (nothing may change), then ``load_state`` from
            CKPT_DIR and the rest of ``main``'s steps.
    single  one process, no launcher: plain training through all phases, then the refusals
            that need an accelerator of their own.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ab_accel
from ab_accel import ABConfigError, compression
from ab_accel.accelerate import CHECKPOINT_DIR, ab_optimizer, save_merged
from ab_accel.layers import ABLayer
from ab_accel.model import ab_layers

from distributed import end_process

# Schedule: warm-up t in [0, 3); cycle 0: AB t in [3, 6), sync at the end of t = 5, rebound
# t = 6; cycle 1: factorize at the end of t = 6, AB t in [7, 10), rebound t = 10; cycle 2: AB
# from t = 11.
CONFIG = {"warmup_steps": 3, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1}
STEPS = 12          # optimizer steps
ACCUM = 2           # micro-batches per optimizer step
BATCH = 16          # per rank
SAVE_AT = 8         # save_state after this many steps: the next step (t = 8) is mid-AB-phase
CHECK_STEPS = (1, 4)  # steps whose gradients are gathered: one warm-up step, one AB step
MAX_NORM = 0.05     # small enough that clipping always acts
SNAPSHOT_STEPS = (1, 4, 5, 6, 8, 9, 12)  # step counts after which parameters are recorded


def build_model() -> nn.Module:
    # No conv bias before a BatchNorm (its gradient would be rounding noise).
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def build(accumulation: int = ACCUM, cpu: bool = True, **accelerator_kwargs: Any
          ) -> tuple[Any, ...]:
    # Accelerator(cpu=True) turns DeepSpeed off: the DeepSpeed run finds the CPU itself.
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=accumulation,
                              **accelerator_kwargs)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.02 * s))
    return accelerator, model, opt, loader, sched


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in module.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()
                if b.is_floating_point()})
    return out


def calls_by_phase(meter: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in meter.records:
        out[row["phase"]] = out.get(row["phase"], 0) + row["calls"]
    return out


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a test-side collective, outside ab_accel and its meter)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train(accelerator: Any, model: Any, opt: Any, loader: Any, sched: Any, rec: dict[str, Any],
          ckpt_dir: str | None = None) -> None:
    """The plain Accelerate loop (accumulate / backward / clip / step), recording as it goes."""
    ab = ab_optimizer(opt)
    unwrapped = accelerator.unwrap_model(model)
    for x, y in loader:
        if opt.step_count >= STEPS:
            break
        with accelerator.accumulate(model):
            t, phase, role = opt.step_count, opt.phase, opt.role
            before = calls_by_phase(opt.traffic)
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            boundary = accelerator.sync_gradients
            if boundary and t in CHECK_STEPS:
                trained = ab.trained_params()
                names = {id(p): n for n, p in unwrapped.named_parameters()}
                local = {names[id(p)]: p.grad.detach().clone() for p in trained}
                everyone = gather(local)
                norm = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
                clipped = {names[id(p)]: p.grad.detach().clone() for p in trained}
                rec["grads"][t] = {"phase": phase, "local": everyone, "norm": float(norm),
                                   "clipped": clipped}
            elif boundary:
                accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
            after = calls_by_phase(opt.traffic)
        rec["micro"].append({"t": t, "phase": phase, "role": role, "boundary": boundary,
                             "loss": loss.item(),
                             "delta": {k: after.get(k, 0) - before.get(k, 0) for k in after}})
        if boundary:
            rec["lr"].append((opt.param_groups[0]["lr"], sched.get_last_lr()[0]))
            if opt.step_count in SNAPSHOT_STEPS:
                rec["snapshots"][opt.step_count] = snapshot(unwrapped)
            if ckpt_dir is not None and opt.step_count == SAVE_AT:
                rec["save_phase"] = opt.phase
                accelerator.save_state(ckpt_dir)
    rec["summary"] = opt.traffic.summary()
    rec["step_count"] = opt.step_count


def new_record(accelerator: Any) -> dict[str, Any]:
    return {"rank": accelerator.process_index, "world": accelerator.num_processes,
            "micro": [], "lr": [], "snapshots": {}, "grads": {}}


def main_run(out_dir: str, ckpt_dir: str) -> dict[str, Any]:
    accelerator, model, opt, loader, sched = build(mixed_precision="bf16")
    rec = new_record(accelerator)
    model, opt, loader, sched = ab_accel.prepare(accelerator, model, opt, loader, sched,
                                                 config=CONFIG)
    unwrapped = accelerator.unwrap_model(model)
    rec["ddp"] = {"type": type(model).__name__,
                  "unwrap_is_module": unwrapped is getattr(model, "module", None),
                  "require_backward_grad_sync": model.require_backward_grad_sync,
                  "require_forward_param_sync": model.require_forward_param_sync,
                  "broadcast_buffers": model.broadcast_buffers}
    rec["opt_is_ab"] = opt.optimizer is ab_optimizer(opt) and opt.ab_optimizer is opt.optimizer
    # The first AB layer's dense weight: it must be freed once the layer is factorized.
    _, first = next(ab_layers(unwrapped))
    weight_ref = weakref.ref(first.weight)
    dtypes: set[str] = set()
    first.register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
    train(accelerator, model, opt, loader, sched, rec, ckpt_dir=ckpt_dir)
    gc.collect()
    rec["weight_freed"] = weight_ref() is None
    rec["ab_layer_output_dtypes"] = sorted(dtypes)
    rec["output_dtype"] = str(model(torch.zeros(2, 1, 8, 8)).dtype)
    rec["compression"] = compression(unwrapped)["ratio"]
    rec["ab_layers_in_unwrapped"] = sum(isinstance(m, ABLayer) for m in unwrapped.modules())
    rec["ckpt_files"] = sorted(os.listdir(os.path.join(ckpt_dir, CHECKPOINT_DIR)))
    rec["accelerate_files"] = sorted(os.listdir(ckpt_dir))
    # The end: the run stops inside an AB phase (t = 11); save_merged reconciles and exports.
    rec["groups_differ_at_end"] = opt.ab_optimizer.groups_differ
    rec["export"] = save_merged(accelerator, model, opt, os.path.join(out_dir, "merged"))
    merged = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # fp32, no bf16 autocast
    rec["ab_layers_after_export"] = sum(isinstance(m, ABLayer) for m in merged.modules())
    merged.eval()
    with torch.no_grad():
        rec["merged_logits"] = merged(probe_images()).float()
    return rec


def probe_images() -> torch.Tensor:
    return torch.tensor(load_digits().images[:8], dtype=torch.float32).unsqueeze(1) / 16.0


def resume_run(out_dir: str, ckpt_dir: str) -> dict[str, Any]:
    accelerator, model, opt, loader, sched = build(mixed_precision="bf16")
    rec = new_record(accelerator)
    # Refused setups raise before anything is changed.
    refusals = {}
    try:
        ab_accel.prepare(accelerator, model, opt, loader, sched,
                         config={**CONFIG, "group_size": 3})
    except ABConfigError as exc:
        refusals["group_size"] = str(exc)
    accelerator.ddp_handler = DistributedDataParallelKwargs(static_graph=True)
    try:
        ab_accel.prepare(accelerator, model, opt, loader, sched, config=CONFIG)
    except NotImplementedError as exc:
        refusals["static_graph"] = str(exc)
    accelerator.ddp_handler = None
    rec["refusals"] = refusals
    rec["untouched_after_refusals"] = (
        not any(isinstance(m, ABLayer) for m in model.modules())
        and not getattr(model, "_is_accelerate_prepared", False)
        and not accelerator._models and not accelerator._optimizers)

    model, opt, loader, sched = ab_accel.prepare(accelerator, model, opt, loader, sched,
                                                 config=CONFIG)
    accelerator.load_state(ckpt_dir)
    unwrapped = accelerator.unwrap_model(model)
    rec["loaded"] = {"step_count": opt.step_count, "phase": opt.phase, "role": opt.role,
                     "params": snapshot(unwrapped)}
    loader = accelerator.skip_first_batches(loader, SAVE_AT * ACCUM)
    train(accelerator, model, opt, loader, sched, rec)
    return rec


def single_run(out_dir: str) -> dict[str, Any]:
    accelerator, model, opt, loader, sched = build(accumulation=1)
    rec = new_record(accelerator)
    rec["distributed"] = dist.is_available() and dist.is_initialized()
    model, opt, loader, sched = ab_accel.prepare(accelerator, model, opt, loader, sched,
                                                 config=CONFIG)
    rec["model_type"] = type(model).__name__
    ratios = []
    for x, y in loader:
        if opt.step_count >= STEPS:
            break
        phase, role = opt.phase, opt.role
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ratios.append(compression(accelerator.unwrap_model(model))["ratio"])
        rec["micro"].append({"phase": phase, "role": role, "loss": loss.item()})
    rec["ratios"] = ratios
    rec["summary"] = opt.traffic.summary()

    # Setups that need their own accelerator: each one is refused before the model changes.
    refusals = {}
    for name, kwargs in {"dynamo": {"dynamo_backend": "inductor"},
                         "fp16": {"mixed_precision": "fp16"}}.items():
        AcceleratorState._reset_state(True)
        try:
            accelerator, model, opt, loader, sched = build(accumulation=1, **kwargs)
        except (ValueError, RuntimeError) as exc:  # this accelerate cannot build it on CPU
            refusals[name] = f"not constructible: {exc}"
            continue
        try:
            ab_accel.prepare(accelerator, model, opt, loader, sched, config=CONFIG)
            refusals[name] = "accepted"
        except NotImplementedError as exc:
            refusals[name] = str(exc)
        refusals[name + "_untouched"] = not any(isinstance(m, ABLayer) for m in model.modules())
    rec["refusals"] = refusals

    # warmup_steps = 0: the first factorization runs when prepare binds the optimizer.
    AcceleratorState._reset_state(True)
    accelerator, model, opt, loader, sched = build(accumulation=1)
    model, opt, loader, sched = ab_accel.prepare(accelerator, model, opt, loader, sched,
                                                 config={**CONFIG, "warmup_steps": 0})
    rec["w0_zero"] = {"phase": opt.phase, "role": opt.role,
                      "modes": [layer.mode for _, layer in ab_layers(model)]}
    for i, (x, y) in enumerate(loader):
        if i == 2:
            break
        accelerator.backward(F.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
    rec["w0_zero"]["step_count"] = opt.step_count
    return rec


def deepspeed_run(out_dir: str) -> dict[str, Any]:
    """Accelerate + DeepSpeed ZeRO-0: config=None reads the "ab_training" key of the DeepSpeed
    config; prepare hands the engine to ab_accel.deepspeed."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
        "ab_training": CONFIG,
    }
    accelerator, model, opt, loader, sched = build(
        cpu=False, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rec = new_record(accelerator)
    rec["distributed_type"] = str(accelerator.distributed_type)
    live = accelerator.state.deepspeed_plugin.deepspeed_config
    live["zero_optimization"]["stage"] = 3
    try:
        ab_accel.prepare(accelerator, model, opt, loader, sched)
        rec["zero3"] = "accepted"
    except ABConfigError as exc:
        rec["zero3"] = str(exc)
    live["zero_optimization"]["stage"] = 0
    rec["zero3_untouched"] = not any(isinstance(m, ABLayer) for m in model.modules())

    model, opt, loader, sched = ab_accel.prepare(accelerator, model, opt, loader, sched)
    ab = ab_optimizer(opt)
    rec["config"] = ab.config.to_dict()
    unwrapped = accelerator.unwrap_model(model)
    for x, y in loader:
        if ab.step_count >= STEPS:
            break
        with accelerator.accumulate(model):
            t, phase, role = ab.step_count, opt.phase, opt.role
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        rec["micro"].append({"t": t, "phase": phase, "role": role, "loss": loss.item()})
        if ab.step_count in SNAPSHOT_STEPS and ab.step_count not in rec["snapshots"]:
            rec["snapshots"][ab.step_count] = snapshot(unwrapped)
    rec["summary"] = ab.traffic.summary()
    rec["step_count"] = ab.step_count
    return rec


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    ckpt_dir = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    if mode == "main":
        rec = main_run(out_dir, ckpt_dir)
    elif mode == "resume":
        rec = resume_run(out_dir, ckpt_dir)
    elif mode == "single":
        rec = single_run(out_dir)
    elif mode == "deepspeed":
        rec = deepspeed_run(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.save(rec, os.path.join(out_dir, f"rank{rec['rank']}.pt"))
    end_process()


if __name__ == "__main__":
    main()
