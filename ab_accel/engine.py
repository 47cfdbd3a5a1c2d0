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

With ZeRO stage 1 or 2 (:mod:`ab_accel.zero`), DeepSpeed's ZeRO optimizer keeps reducing,
clipping and stepping, rebuilt over the step's scope at every switch: the engine's optimizer
step is followed by AB-training's schedule (``_take_model_step``), its ZeRO files go to one
folder per scope (``<tag>/ab_training_zero/<world|groupN>``), and a resume loads this rank's
group shard first, then DeepSpeed's partitioned state into a ZeRO optimizer built for it.

Used by every front end that runs DeepSpeed: :func:`ab_accel.deepspeed.initialize`,
``ab_accel.prepare`` under Accelerate's DeepSpeed plugin, and the ``ABTrainer``. The method
replacements are installed by :func:`ab_accel.patches.deepspeed_engine_methods`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from . import patches, support
from .attach import check_shards, load_shards, save_shards, wire
from .optimizer import ABOptimizer
from .zero import STAGES, ZeroScope


def check_engine(engine: Any) -> None:
    """The runtime twin of :func:`check_config`, for engines built from any config (for example
    by ``accelerate launch --use_deepspeed --zero_stage 2`` without a JSON)."""
    ds_ = support.DEEPSPEED
    problems: list[str] = []
    stage = engine.zero_optimization_stage()
    if stage != 0 and stage not in STAGES:
        problems.append(support.problem("zero", f"ZeRO stage {stage}", support.ACCELERATE))
    if engine.fp16_enabled():
        problems.append(support.problem("fp16", 'DeepSpeed\'s "fp16" (a loss scaler)', ds_))
    elif engine.bfloat16_enabled() and stage == 0:
        problems.append(support.problem("flat_optimizer", "DeepSpeed's bf16 optimizer at ZeRO "
                                        "stage 0", support.ACCELERATE))
    if stage in STAGES and _autocast(engine):
        problems.append(support.problem("autocast_zero", '"torch_autocast" with ZeRO', ds_))
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


def _autocast(engine: Any) -> bool:
    try:
        return bool(engine.torch_autocast_enabled())
    except AttributeError:
        return False


def is_zero(engine: Any) -> bool:
    """Whether ``engine`` runs DeepSpeed's ZeRO stage 1 or 2 optimizer."""
    return engine.zero_optimization_stage() in STAGES


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
    return _save_with_shards(self, save_dir, tag, client_state, save_latest,
                             exclude_frozen_parameters)


def _save_with_shards(engine: Any, save_dir: str, tag: Any, client_state: Any,
                      save_latest: bool, exclude_frozen_parameters: bool) -> Any:
    if tag is None:
        tag = f"global_step{engine.global_steps}"
    save_shards(os.path.join(save_dir, str(tag)), engine.module, engine.ab_optimizer,
                extra={"global_steps": engine.global_steps})
    return engine._ab_original_save_checkpoint(
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


# ------------------------------------------------------------------------------ ZeRO 1 and 2
def _ab_take_model_step(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Replaces ``DeepSpeedEngine._take_model_step`` under ZeRO: the float buffers averaged
    over the scope, DeepSpeed's step (ZeRO's optimizer, the LR rebound around it, the overflow
    decided over the world, the scheduler), then AB-training's count and switches."""
    scope = self.ab_optimizer.external
    with scope.metered():
        scope.mean_buffers()
        out = self._ab_original__take_model_step(*args, **kwargs)
        scope.stepped()
    return out


def _ab_zero_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``DeepSpeedEngine.backward`` with DeepSpeed's collectives metered (ZeRO 2 reduces in
    the backward hooks, ZeRO 1 at the accumulation boundary)."""
    with self.ab_optimizer.external.metered():
        return self._ab_original_backward(*args, **kwargs)


def _ab_zero_ckpt_name(self: Any, checkpoints_path: str, tag: Any) -> str:
    """DeepSpeed names its ZeRO files by the rank in the dp group: mid-AB phase every group has
    a rank 0. One folder per scope keeps them apart."""
    name = os.path.basename(self._ab_original__get_zero_ckpt_name(checkpoints_path, tag))
    folder = self.ab_optimizer.external.scope_dir(checkpoints_path, tag)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def _ab_all_zero_checkpoint_names(self: Any, load_dir: str, tag: Any, bf16_mode: bool
                                  ) -> list[str]:
    """The ZeRO files of this rank's scope (the scope of the checkpoint's next step)."""
    folder = self.ab_optimizer.external.scope_dir(load_dir, tag)
    size = dist.get_world_size(group=self.optimizer.dp_process_group)
    return [os.path.join(folder, os.path.basename(self._get_rank_zero_ckpt_name(
        load_dir, tag, self.checkpoint_mp_rank, i, bf16_mode))) for i in range(size)]


def _keep_module(src: Any, dst: Any) -> None:
    """``custom_load_fn`` for DeepSpeed's load: the module came from the group shard."""


def _ab_zero_save_checkpoint(self: Any, save_dir: str, tag: Any = None, client_state: Any = None,
                             save_latest: bool = True, exclude_frozen_parameters: bool = False
                             ) -> Any:
    """One shard per AB group (the module and AB's state), then DeepSpeed's checkpoint: its
    partitioned ZeRO state in the scope's folder. Frozen parameters are left out of DeepSpeed's
    files (``exclude_frozen_parameters``): rank 0 writes them, and mid-AB phase the groups
    freeze different factors; the group shards hold them."""
    return _save_with_shards(self, save_dir, tag, client_state, save_latest, True)


def _ab_zero_load_checkpoint(self: Any, load_dir: str, tag: Any = None,
                             load_module_strict: bool = True, load_optimizer_states: bool = True,
                             load_lr_scheduler_states: bool = True,
                             load_module_only: bool = False, custom_load_fn: Any = None) -> Any:
    """This rank's group shard first (the layers' modes, ranks and factors, AB's step), a ZeRO
    optimizer built for the phase it resumes in, then DeepSpeed's load of the partitioned
    state (fp32 masters, moments), the scheduler and the counters, into it."""
    ab, scope = self.ab_optimizer, self.ab_optimizer.external
    tag_dir = _tag_dir(self, load_dir, tag)
    if tag_dir is None:
        return self._ab_original_load_checkpoint(load_dir, tag)
    check_shards(tag_dir, ab)
    model_only = load_module_only or not load_optimizer_states
    scope.begin_switch(carry=False)
    load_shards(tag_dir, self.module, ab, model_only=model_only)
    scope.end_switch()
    out = self._ab_original_load_checkpoint(
        load_dir, tag, load_module_strict=load_module_strict,
        load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_lr_scheduler_states,
        load_module_only=load_module_only, custom_load_fn=_keep_module)
    self.optimizer.update_lp_params()
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
    if is_zero(engine):
        return _attach_zero(engine, ab_optimizer)
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


def attach_prepared(engine: Any, ab: ABOptimizer, wrapper: Any,
                    launch_predicate: Any) -> ABOptimizer:
    """:func:`attach` for an engine that Accelerate prepared (``accelerate launch
    --use_deepspeed``, the Trainer's ``--deepspeed``): ``wrapper`` is Accelerate's optimizer
    wrapper, which must hold the ABOptimizer (stage 0) or follow the rebuilt ZeRO optimizer;
    at stage 0 the overlapped reduction launches while ``launch_predicate`` holds."""
    attach(engine, ab)
    if ab.external is not None:
        ab.external.follow(wrapper)
    else:
        wire(ab, engine.module, launch_predicate, wrapper, framework="deepspeed")
    return ab


def torch_optimizer(engine: Any) -> Any:
    """The torch optimizer an ABOptimizer wraps on this engine: under ZeRO the one inside
    DeepSpeed's ZeRO optimizer, else the engine's optimizer."""
    return engine.basic_optimizer if is_zero(engine) else engine.optimizer


def _attach_zero(engine: Any, ab: ABOptimizer) -> ABOptimizer:
    """:func:`attach` for ZeRO stage 1 and 2 (see :mod:`ab_accel.zero`)."""
    if ab.optimizer is not engine.basic_optimizer:
        raise ValueError(
            f"Under ZeRO the ABOptimizer must wrap the engine's torch optimizer "
            f"(engine.basic_optimizer, a {type(engine.basic_optimizer).__name__}), not a "
            f"{type(ab.optimizer).__name__}.")
    if ab.model is not None:
        raise ValueError("Under ZeRO the engine binds the ABOptimizer: pass an unbound one.")
    scope = ZeroScope(engine, ab)
    scope.adopt()  # DeepSpeed's first ZeRO optimizer out, the module in fp32 for the binding
    wire(ab, engine.module, engine.is_gradient_accumulation_boundary, None,
         framework="deepspeed")
    if ab._reduction.overlap is not None:  # DeepSpeed reduces: no AB gradient hooks
        ab._reduction.overlap.disarm()
        ab._reduction.overlap = None
    ab.external = scope
    scope.end_switch()  # ZeRO over the first step's scope and trained parameters
    patches.deepspeed_engine_methods(
        engine, ab, _take_model_step=_ab_take_model_step, backward=_ab_zero_backward,
        _get_zero_ckpt_name=_ab_zero_ckpt_name,
        _get_all_zero_checkpoint_names=_ab_all_zero_checkpoint_names,
        save_checkpoint=_ab_zero_save_checkpoint, load_checkpoint=_ab_zero_load_checkpoint)
    return ab


__all__ = ["attach", "attach_prepared", "check_engine", "is_zero", "torch_optimizer"]
