"""Multi-process scenarios for tests/test_deepspeed_zero.py: the "ab_training" key with ZeRO
stage 1 and 2 (with and without CPU optimizer offload), bf16 and gradient accumulation, on real
DeepSpeed engines over a real 4-rank gloo world. Each function returns plain tensors and dicts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ab_accel import deepspeed as ab_ds

import ds_scenarios  # tests/ds_scripts (pytest's pythonpath)
from scenarios import CollectiveSpy

#: warm-up 2, factorize at 2, AB steps 2-4, sync at 5, rebound step 5, factorize at 6, AB 6-8.
AB_KEY = {"warmup_steps": 2, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
          "rank_cutoff": 0.3, "group_size": 2}
GAS = 2
STEPS = 9
SAVE_AT = 7  # mid-AB phase (steps 6-8)


def zero_config(stage: int, offload: bool = False, bf16: bool = True, key: bool = True,
                **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds_scenarios.MICRO_BATCH,
        "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0, "steps_per_print": 10_000,
        # small buckets: several reduce and all-gather calls per step, as on a real model
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000,
                              "allgather_bucket_size": 2000},
        "bf16": {"enabled": bf16},
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the CPU partitions
    if key:
        cfg["ab_training"] = dict(AB_KEY, **extra.pop("ab_training", {}))
    else:
        extra.pop("ab_training", None)
    cfg.update(extra)
    return cfg


def _fp32(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _train_step(engine: Any, rank: int, t: int) -> None:
    for micro in range(GAS):
        x, y = ds_scenarios.micro_batch(rank, t, micro)
        loss = nn.functional.cross_entropy(engine(x.to(engine.module[0].weight.dtype)).float(), y)
        engine.backward(loss)
        engine.step()


def _new_engine(stage: int, offload: bool, key: bool = True, **extra: Any
                ) -> tuple[Any, Any, nn.Module]:
    torch.manual_seed(0)
    model = ds_scenarios.tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    config = zero_config(stage, offload, key=key, **extra)
    if key:
        engine, ab, _, _ = ab_ds.initialize(model=model, optimizer=opt, config=config)
    else:
        import deepspeed

        engine, ab, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, ab, model


def zero_run(rank: int, world: int, stage: int, offload: bool, ckpt_dir: str,
             extra: dict[str, Any]) -> dict[str, Any]:
    """9 optimizer steps of 2 micro-batches, bf16: a twin plain DeepSpeed engine (no key) for
    the warm-up, a spy per step, the partition sizes, a checkpoint after step 7 (mid-AB) and a
    fresh engine that resumes from it. ``extra``: more DeepSpeed settings."""
    engine, ab, model = _new_engine(stage, offload, **extra)
    plain, _, _ = _new_engine(stage, offload, key=False, **extra)
    out: dict[str, Any] = {"role": str(ab.groups.role), "group": list(ab.groups.group_ranks),
                           "zero_type": type(engine.optimizer).__name__,
                           "dtype": str(next(model.parameters()).dtype), "records": []}
    for t in range(STEPS):
        phase = str(ab.phase)
        trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        scope = torch.distributed.get_world_size(engine.optimizer.dp_process_group)
        before, spy = ab.traffic.bytes, CollectiveSpy()
        with spy:
            _train_step(engine, rank, t)
        rec = {"phase": phase, "trained": trained, "trained_numel": numel, "scope": scope,
               "params": _fp32(model),
               "spy_bytes": spy.bytes, "meter_bytes": ab.traffic.bytes - before,
               "spy_calls": list(spy.per_call), "spy_dtypes": sorted({d for _, d in spy.sizes}),
               "state_bytes_after": ab.external.state_bytes(),
               "lr": engine.get_lr()[0]}
        if t < AB_KEY["warmup_steps"]:
            _train_step(plain, rank, t)
            rec["plain"] = _fp32(plain.module)
        out["records"].append(rec)
        if t + 1 == SAVE_AT:
            engine.save_checkpoint(ckpt_dir, tag="mid_ab")
            out["saved_phase"] = str(ab.phase)
    out["step_count"] = ab.step_count
    out["skipped"] = ab.skipped_steps
    out["report_zero"] = ab.report()["zero"]
    out["traffic"] = ab.traffic.summary()
    out["trained_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    resumed, ab2, model2 = _new_engine(stage, offload, **extra)
    resumed.load_checkpoint(ckpt_dir, tag="mid_ab")
    out["resumed_step"] = ab2.step_count
    out["resumed_records"] = []
    for t in range(SAVE_AT, STEPS):
        _train_step(resumed, rank, t)
        out["resumed_records"].append(_fp32(model2))
    return out


def finetune_run(rank: int, world: int) -> dict[str, Any]:
    """The fine-tuning settings under ZeRO 2 + CPU offload + bf16: no dense phase, lean_memory,
    the frozen residual, every untargeted parameter frozen (so the torch optimizer's second
    group, the biases, has nothing to train: ZeRO must build without it)."""
    torch.manual_seed(0)
    model = ds_scenarios.tiny_net()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    config = zero_config(2, offload=True)
    config["ab_training"] = {"warmup_steps": 0, "sync_every": 3, "rebound_steps": 0,
                             "lr_rebound_steps": 1, "fixed_rank": 4, "lean_memory": True,
                             "residual": True, "freeze_untargeted": True, "group_size": 2}
    engine, ab, _, _ = ab_ds.initialize(model=model, optimizer=opt, config=config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
              and not n.endswith((".A", ".B"))}
    records = []
    for t in range(6):
        phase = str(ab.phase)
        _train_step(engine, rank, t)
        records.append({"phase": phase, "params": _fp32(model)})
    layers = [m for m in model.modules() if hasattr(m, "residual")]
    return {"records": records, "role": str(ab.groups.role),
            "frozen_unchanged": all(torch.equal(v, dict(model.named_parameters())[n])
                                    for n, v in frozen.items()),
            "frozen_names": sorted(frozen),
            "residuals": [layer.residual.float().clone() for layer in layers
                          if layer.residual is not None],
            "residual_dtype": sorted({str(layer.residual.dtype) for layer in layers
                                      if layer.residual is not None}),
            "groups": [len(g) for g in engine.optimizer.bit16_groups],
            "placeholder_exported": any("placeholder" in k for k in model.state_dict()),
            "skipped": ab.skipped_steps, "step_count": ab.step_count}


def overflow_run(rank: int, world: int, stage: int) -> dict[str, Any]:
    """One rank (3, a B-group rank) feeds an inf into an AB step: every rank skips it."""
    engine, ab, model = _new_engine(stage, False)
    for t in range(3):
        _train_step(engine, rank, t)
    before = _fp32(model)
    for micro in range(GAS):
        x, y = ds_scenarios.micro_batch(rank, 3, micro)
        if rank == 3 and micro == 1:
            x[0, 0, 0, 0] = float("inf")
        loss = nn.functional.cross_entropy(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
    after = _fp32(model)
    _train_step(engine, rank, 4)
    return {"skipped": ab.skipped_steps, "step_count": ab.step_count,
            "unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "moved_after": any(not torch.equal(after[n], p.detach().float())
                               for n, p in model.named_parameters()),
            "engine_skipped": engine.skipped_steps}


def resume_other_world(rank: int, world: int, stage: int, ckpt_dir: str) -> str:
    """A world of another size loads a 4-rank checkpoint: the refusal it gets, as text."""
    torch.manual_seed(0)
    model = ds_scenarios.tiny_net()
    config = zero_config(stage)
    config["ab_training"]["group_size"] = world // 2
    engine, _, _, _ = ab_ds.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), config=config)
    try:
        engine.load_checkpoint(ckpt_dir, tag="mid_ab")
    except Exception as exc:  # noqa: BLE001 (the test reads the message)
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


__all__ = ["zero_run", "finetune_run", "overflow_run", "resume_other_world", "zero_config",
           "AB_KEY"]
