"""Multi-process scenarios for tests/test_deepspeed.py. Each function runs on every rank of a real
gloo world (tests/distributed.py) around a real DeepSpeed engine, and returns plain tensors and
dicts for the test to assert on."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ab_accel import ABConfig, ABOptimizer, convert
from ab_accel import deepspeed as ab_ds

from scenarios import CollectiveSpy  # the tests' one spy (tests/scenarios.py)

AB_KEY = {"warmup_steps": 2, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
          "rank_cutoff": 0.5, "group_size": 2}
MICRO_BATCH = 8


def tiny_net() -> nn.Module:
    """conv stem (dense) -> conv (AB) -> linear (AB) -> linear (AB) -> head (dense)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(12 * 4 * 4, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def micro_batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(MICRO_BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (MICRO_BATCH,),
                                                                         generator=g)


def ds_config(gas: int, clip: float, **extra: Any) -> dict[str, Any]:
    cfg = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
           "gradient_clipping": clip, "zero_optimization": {"stage": 0},
           "steps_per_print": 10_000, "ab_training": dict(AB_KEY)}
    cfg.update(extra)
    return cfg


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def initialize_path(rank: int, world: int, ckpt_dir: str) -> dict[str, Any]:
    """ab_accel.deepspeed.initialize with gradient accumulation 2 and clipping 0.05 (active), run
    beside a twin driven by the core ABOptimizer by hand (accumulate, clip after reduction, step).
    Then the JSON "optimizer" + "scheduler" blocks with torch autocast bf16, with a checkpoint
    saved mid-AB-phase and a resume that must continue exactly."""
    out: dict[str, Any] = {}
    gas, clip, steps = 2, 0.05, 8
    torch.manual_seed(0)
    model = tiny_net()
    twin = copy.deepcopy(model)
    engine, opt, _, _ = ab_ds.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        config=ds_config(gas, clip))
    cfg = ABConfig.from_dict(AB_KEY)
    convert(twin, cfg)
    twin_opt = ABOptimizer(torch.optim.AdamW(twin.parameters(), lr=3e-3), twin, cfg)
    out["optimizer_is_ab"] = opt is engine.optimizer and isinstance(opt, ABOptimizer)
    out["group_ranks"] = list(opt.groups.group_ranks)
    out["role_in_ab"] = opt.groups.role
    records = []
    for t in range(steps):
        phase, before = opt.phase, opt.traffic.bytes
        spy = CollectiveSpy()
        with spy:
            for micro in range(gas):
                x, y = micro_batch(rank, t, micro)
                loss = nn.functional.cross_entropy(engine(x), y)
                engine.backward(loss)
                engine.step()
        norm = float(engine._global_grad_norm)
        for micro in range(gas):
            x, y = micro_batch(rank, t, micro)
            loss = nn.functional.cross_entropy(twin(x), y) / gas
            if micro < gas - 1:
                with twin_opt.no_sync():  # accumulation micro-step: nothing is reduced
                    loss.backward()
            else:
                loss.backward()
        twin_norm = float(twin_opt.clip_grad_norm_(clip))
        twin_opt.step()
        twin_opt.zero_grad()
        records.append({"phase": phase, "params": snapshot(engine.module),
                        "twin": snapshot(twin), "norm": norm, "twin_norm": twin_norm,
                        "spy_bytes": spy.bytes, "meter_bytes": opt.traffic.bytes - before,
                        "spy_groups": sorted(set(spy.groups)), "spy_calls": spy.per_call})
    out["records"] = records
    out["step_count"] = opt.step_count
    out["global_steps"] = engine.global_steps
    out["micro_steps"] = engine.micro_steps
    out["traffic"] = opt.traffic.summary()
    out["ds_config_key"] = engine.config.get("ab_training")

    # JSON optimizer + scheduler blocks, torch autocast bf16; checkpoint mid-AB and resume.
    extra = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
             "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                          "warmup_max_lr": 3e-3,
                                                          "warmup_num_steps": 3}},
             "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    run_a = _autocast_run(rank, ds_config(1, 1.0, **extra), steps=9, save_at=4,
                          ckpt_dir=ckpt_dir)
    run_b = _autocast_run(rank, ds_config(1, 1.0, **extra), steps=9, load_from=ckpt_dir)
    out["autocast"] = run_a
    out["resumed"] = run_b

    # attach() takes an engine built without the key from a ZeRO config (as `accelerate
    # launch --use_deepspeed --zero_stage 1` builds it), around a converted model.
    import deepspeed

    torch.manual_seed(0)
    plain = convert(tiny_net(), cfg)
    zero1, *_ = deepspeed.initialize(
        model=plain, optimizer=torch.optim.AdamW(plain.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": MICRO_BATCH, "steps_per_print": 10_000,
                "zero_optimization": {"stage": 1}})
    try:
        ab_ds.attach(zero1, ABOptimizer(zero1.basic_optimizer, None, cfg))
        x, y = micro_batch(rank, 0, 0)
        zero1.backward(nn.functional.cross_entropy(zero1(x), y))
        zero1.step()
        out["zero1_attach"] = f"accepted: {type(zero1.optimizer).__name__}"
    except ab_ds.ABConfigError as exc:
        out["zero1_attach"] = str(exc)
    return out


def _autocast_run(rank: int, config: dict[str, Any], steps: int, save_at: int | None = None,
                  ckpt_dir: str | None = None, load_from: str | None = None) -> dict[str, Any]:
    torch.manual_seed(1)
    model = tiny_net()
    engine, opt, _, sched = ab_ds.initialize(model=model, config=config)
    start = 0
    if load_from is not None:
        path, _ = engine.load_checkpoint(load_from)
        start = opt.step_count
        assert path is not None
    rec: dict[str, Any] = {"inner": type(opt.optimizer).__name__,
                           "scheduler": type(sched).__name__, "start": start, "steps": {}}
    dtypes: set[str] = set()
    hook = model[-1].register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
    for t in range(start, steps):
        x, y = micro_batch(rank, t, 0)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        rec["steps"][t + 1] = {"phase_next": opt.phase, "params": snapshot(engine.module),
                               "lr": engine.get_lr()[0], "loss": float(loss.detach())}
        if save_at is not None and t + 1 == save_at:
            engine.save_checkpoint(ckpt_dir, tag="mid_ab")
            rec["saved_phase"] = opt.phase
            rec["saved_files"] = sorted(os.listdir(os.path.join(ckpt_dir, "mid_ab",
                                                                ab_ds.AB_CHECKPOINT_DIR)))
    hook.remove()
    rec["step_count"] = opt.step_count
    rec["logits_dtypes"] = sorted(dtypes)
    return rec
