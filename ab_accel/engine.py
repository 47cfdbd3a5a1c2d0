"""AB-training on a DeepSpeed engine: :func:`attach` (duck-typed: no DeepSpeed import).

* the engine's gradient all-reduce (``engine.allreduce_gradients``, run by ``engine.backward``
  at a gradient accumulation boundary) becomes the AB reduction: over the world in warm-up and
  rebound, inside the own group in an AB phase. Micro-steps between boundaries accumulate
  locally, as with DeepSpeed;
* the engine's fp32 gradient clipping (``"gradient_clipping"``) clips the reduced gradients of
  what this rank trains, with a group-local norm: DeepSpeed's own clip averages the norm over
  the world, which would mix the A-groups' and the B-groups' norms;
* ``engine.save_checkpoint`` / ``engine.load_checkpoint`` also write and read one shard per
  group (``<save_dir>/<tag>/ab_training``): DeepSpeed saves the module from rank 0 only, and
  mid-AB phase the groups hold different factors. A tag without shards is refused, the file
  named, before DeepSpeed loads anything (:mod:`ab_accel.attach`'s policy).

Used by every front end that runs DeepSpeed: :func:`ab_accel.deepspeed.initialize`,
``ab_accel.prepare`` under Accelerate's DeepSpeed plugin, and the ``ABTrainer``. The method
replacements are installed by :func:`ab_accel.patches.deepspeed_engine_methods`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import patches, support
from .attach import check_shards, load_shards, save_shards, wire
from .optimizer import ABOptimizer


def check_engine(engine: Any) -> None:
    """The runtime twin of :func:`check_config`, for engines built from any config (for example
    by ``accelerate launch --use_deepspeed --zero_stage 2`` without a JSON)."""
    ds_ = support.DEEPSPEED
    problems: list[str] = []
    stage = engine.zero_optimization_stage()
    if stage != 0:
        problems.append(support.problem("zero", f"ZeRO stage {stage}", support.ACCELERATE))
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        kind = "fp16" if engine.fp16_enabled() else "bf16"
        problems.append(support.problem("flat_optimizer", f"DeepSpeed's {kind} optimizer (remove "
                                        f'"{kind}"; accelerate: --mixed_precision no)', ds_))
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        problems.append(support.problem("fp16", 'float16 "torch_autocast"', ds_))
    if getattr(engine, "pipeline_parallelism", False):
        problems.append(support.problem("model_parallel", "a PipelineModule", ds_))
    if getattr(engine, "has_moe_layers", False):
        problems.append(support.problem("moe", "MoE layers", ds_))
    try:
        deepcompile = engine.is_deepcompile_enabled()
    except AttributeError:
        deepcompile = False
    if deepcompile:
        problems.append(support.problem("compile", "DeepCompile", ds_))
    if problems:
        support.refuse(problems, "this DeepSpeed engine")


def _ab_allreduce_gradients(self: Any, bucket_size: int | None = None) -> None:
    """Replaces ``DeepSpeedEngine.allreduce_gradients``: the AB reduction, at accumulation
    boundaries only (micro-steps in between accumulate locally, as DeepSpeed does)."""
    if self.is_gradient_accumulation_boundary():
        self.ab_optimizer.synchronize()


def _ab_clip_fp32_gradients(self: Any) -> torch.Tensor:
    """Replaces ``DeepSpeedEngine.clip_fp32_gradients``: clip the REDUCED gradients of what this
    rank trains, with the norm over its own scope (group in an AB phase) only."""
    norm = self.ab_optimizer.clip_grad_norm_(self.gradient_clipping())
    patches.set_deepspeed_grad_norm(self, norm)
    return norm


def _tag_dir(engine: Any, root: str, tag: Any) -> str | None:
    """The checkpoint tag's folder (None: no tag given and no ``latest`` file)."""
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as fh:
            tag = fh.read().strip()
    return os.path.join(root, str(tag))


def _ab_save_checkpoint(self: Any, save_dir: str, tag: Any = None, client_state: Any = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False
                        ) -> Any:
    """One shard per AB group under ``<save_dir>/<tag>/ab_training``, then DeepSpeed's own
    save_checkpoint (which writes the ``latest`` tag last)."""
    if tag is None:
        tag = f"global_step{self.global_steps}"
    save_shards(os.path.join(save_dir, str(tag)), self.module, self.ab_optimizer,
                extra={"global_steps": self.global_steps})
    return self._ab_original_save_checkpoint(
        save_dir, tag, client_state={} if client_state is None else client_state,
        save_latest=save_latest, exclude_frozen_parameters=exclude_frozen_parameters)


def _ab_load_checkpoint(self: Any, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                        custom_load_fn: Any = None) -> Any:
    """DeepSpeed's load_checkpoint (rank 0's module state, the scheduler, the counters), then
    this rank's own group shard on top (its factors and its optimizer state: DeepSpeed's file
    holds rank 0's dense export and optimizer, which are not loaded into the ABOptimizer)."""
    tag_dir = _tag_dir(self, load_dir, tag)
    if tag_dir is not None:  # refused before DeepSpeed loads anything: no shards, the file named
        check_shards(tag_dir, self.ab_optimizer)
    out = self._ab_original_load_checkpoint(
        load_dir, tag, load_module_strict=load_module_strict,
        load_optimizer_states=load_optimizer_states and tag_dir is None,
        load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
        custom_load_fn=custom_load_fn)
    if out is None or out[0] is None or tag_dir is None:
        return out
    load_shards(tag_dir, self.module, self.ab_optimizer,
                model_only=load_module_only or not load_optimizer_states)
    return out


def attach(engine: Any, ab_optimizer: ABOptimizer) -> ABOptimizer:
    """Make a DeepSpeed engine run AB-training through ``ab_optimizer``.

    Replaces, on this engine only (``types.MethodType``), ``allreduce_gradients`` by the AB group
    reduction (so ``engine.backward`` never reduces over the world in an AB phase),
    ``clip_fp32_gradients`` by a clip of the reduced gradients, and wraps ``save_checkpoint`` /
    ``load_checkpoint`` so that every group's state is kept. Makes ``ab_optimizer`` the engine's
    optimizer if the engine holds the optimizer it wraps, and binds it to ``engine.module`` if it
    is not bound yet (a collective: call on every rank). Returns ``ab_optimizer``.

    Raises :class:`~ab_accel.ABConfigError` for engines AB-training cannot run on (ZeRO >= 1,
    fp16/bf16 optimizers, ...), before any step.
    """
    if not isinstance(ab_optimizer, ABOptimizer):
        raise TypeError(f"attach() needs an ABOptimizer, got {type(ab_optimizer).__name__}.")
    check_engine(engine)
    if getattr(engine, "ab_optimizer", None) is not None:
        if engine.ab_optimizer is ab_optimizer:
            return ab_optimizer
        raise RuntimeError("This DeepSpeed engine is already attached to another ABOptimizer.")
    if engine.optimizer is not ab_optimizer and engine.optimizer is not ab_optimizer.optimizer:
        raise ValueError(
            f"The engine's optimizer ({type(engine.optimizer).__name__}) is neither the "
            f"ABOptimizer nor the optimizer it wraps: build the ABOptimizer around "
            f"engine.optimizer (ZeRO stage 0, no fp16/bf16 block), or pass it to "
            f"deepspeed.initialize as optimizer=."
        )
    # The engine holds the ABOptimizer; the overlapped reduction launches only in the
    # backward of an accumulation boundary.
    wire(ab_optimizer, engine.module, engine.is_gradient_accumulation_boundary, engine,
         framework="deepspeed")
    patches.deepspeed_engine_methods(
        engine, ab_optimizer, allreduce_gradients=_ab_allreduce_gradients,
        clip_fp32_gradients=_ab_clip_fp32_gradients, save_checkpoint=_ab_save_checkpoint,
        load_checkpoint=_ab_load_checkpoint)
    return ab_optimizer


__all__ = ["attach", "check_engine"]
