"""AB-training in a Hugging Face Accelerate script: one changed line.

    model, opt, train_dl, sched = accelerator.prepare(model, opt, train_dl, sched)  # before
    model, opt, train_dl, sched = ab_accel.prepare(accelerator, model, opt, train_dl, sched)

:func:`prepare` converts the model (:func:`ab_accel.convert`, before ``accelerator.prepare`` so
that Accelerate places the AB layers like any other module), wraps the optimizer in an
:class:`~ab_accel.ABOptimizer` unless it is one, prepares everything with Accelerate, takes
gradient reduction and buffer broadcast away from DDP (the DDP model stays in ``no_sync`` for
good: the ABOptimizer averages over the world in warm-up and rebound, inside the group in an AB
phase), and binds the optimizer to the prepared model.

The returned optimizer is Accelerate's own wrapper (``AcceleratedOptimizer``, so gradient
accumulation, ``step_was_skipped`` and LR schedulers keep working) with the AB attributes added:
``opt.phase``, ``opt.role``, ``opt.traffic``, ``opt.step_count``, ``opt.ranks``,
``opt.synchronize()`` and ``opt.ab_optimizer`` (the :class:`~ab_accel.ABOptimizer`, also
reachable as ``opt.optimizer`` or with :func:`ab_optimizer`).

What else :func:`prepare` sets up (DDP or one process; under DeepSpeed,
:func:`ab_accel.deepspeed.attach` does the same on the engine, whose ``gradient_clipping``,
``save_checkpoint`` and ``load_checkpoint`` Accelerate calls):

* ``accelerator.clip_grad_norm_`` / ``clip_grad_value_`` first reduce the gradients
  (:meth:`ABOptimizer.synchronize`) on an accumulation boundary, so they clip the REDUCED
  gradients, as they do under plain DDP. Inside an accumulation window nothing is reduced.
* ``accelerator.save_state`` also writes one shard per group (:mod:`ab_accel.checkpoint`) into
  ``<output_dir>/ab_training/`` (a save-state pre-hook): mid-AB-phase the groups hold different
  factors and optimizer states, while Accelerate saves the model and the optimizer from the
  main process only. ``accelerator.load_state`` restores each rank's own group shard (a
  load-state pre-hook) and keeps Accelerate from loading the main process's model and
  optimizer files over it.
* The DDP model does not manage the AB layers' weights (``_ddp_params_and_buffers_to_ignore``):
  its reducer would otherwise keep every dense W alive after a factorization released it.

Refused, before anything is changed: FSDP, Megatron-LM, XLA/TPU, tensor or context
parallelism, fp16 and fp8 mixed precision, ``torch.compile`` through Accelerate, and DDP
communication hooks or ``static_graph``: each error says what to use instead. Under DeepSpeed
:func:`ab_accel.ds_config.check_config` runs before and :func:`ab_accel.engine.attach` after
preparing (shared with the DeepSpeed integration, which this module does not import). What the
integrations share is in :mod:`ab_accel.attach`; every patch of an Accelerate object is in
:mod:`ab_accel.patches`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn

from . import patches, support
from .attach import (
    ab_optimizer,
    load_shards,
    reduce_before_clip,
    save_merged,
    save_shards,
    shards_dir,
    wire,
)
from .checkpoint import SHARDS_DIR
from .config import ABConfig, ABConfigError, resolve_config
from .ddp import ignore_factorized_weights
from .ds_config import check_config, zero_stage
from .engine import attach_prepared
from .model import ab_layers, convert, why_nothing_to_factorize
from .optimizer import ABOptimizer
from .zero import STAGES, fill_empty_groups

#: Sub-folder of an ``accelerator.save_state`` folder that holds the per-group AB shards.
CHECKPOINT_DIR = SHARDS_DIR

_DDP_TYPES = {
    "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
    "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON",
}

#: Accelerate's distributed types that AB-training refuses, and their entry in the table.
_REFUSED_TYPES = {"FSDP": "fsdp", "MEGATRON_LM": "megatron", "XLA": "xla"}


# ---------------------------------------------------------------------------------- public
def prepare(accelerator: Any, *objects: Any, config: ABConfig | dict | None = None) -> Any:
    """``accelerator.prepare(*objects)`` with AB-training (arXiv 2405.01067).

    Args:
        accelerator: the ``accelerate.Accelerator`` of the script.
        *objects: what ``accelerator.prepare`` takes (models, optimizers, data loaders, LR
            schedulers), in any order. Exactly one optimizer, and the model it trains, must be
            among them; other models, data loaders and schedulers are prepared as Accelerate
            does. The optimizer may be a plain torch optimizer (it is wrapped in an
            ABOptimizer) or an ABOptimizer built with ``model=None``.
        config: an :class:`ABConfig` or a dict of its fields. ``None``: the ABOptimizer's own
            config if one is passed, else the ``"ab_training"`` key of the accelerator's
            DeepSpeed config when there is one, else the defaults (group_size = world / 2:
            one A-group and one B-group).

    Returns:
        The prepared objects in the order given (a single object unwrapped, as Accelerate
        does). The optimizer is Accelerate's wrapper with ``phase``, ``role``, ``traffic``,
        ``step_count``, ``ranks``, ``synchronize()`` and ``ab_optimizer`` added.

    Raises:
        ABConfigError: a bad setting, or groups that do not fit the world.
        NotImplementedError: a setup AB-training cannot run (FSDP, Megatron-LM, XLA, fp16,
            ...); the message says what to use instead.
        ValueError / TypeError: the objects do not hold one optimizer and its model.
    """
    check_launch()
    opt_index, model_index = _find_optimizer_and_model(objects)
    given = objects[opt_index]
    cfg = _resolve_config(accelerator, given, config)
    if not cfg.enabled:
        plain = list(objects)
        if isinstance(given, ABOptimizer):
            plain[opt_index] = given.optimizer
        return accelerator.prepare(*plain)

    # Everything that can be refused is refused here, before the model is touched.
    deepspeed = _check_supported(accelerator)
    cfg.resolve_group_size(accelerator.num_processes)
    model = objects[model_index]
    if isinstance(given, ABOptimizer):
        if given.model is not None:
            raise ValueError(
                "The ABOptimizer passed to ab_accel.prepare is already bound to a model. Build "
                "it with model=None (ABOptimizer(torch_opt, None, config)) and let prepare "
                "bind it to the prepared model, or pass the plain torch optimizer."
            )
        ab = given
    else:
        ab = ABOptimizer(given, None, cfg)
    if deepspeed:
        check_config(accelerator.state.deepspeed_plugin.deepspeed_config)

    convert(model, cfg)
    if not any(True for _ in ab_layers(model)):
        raise ValueError(f"ab_accel.convert found no layer to factorize: "
                         f"{why_nothing_to_factorize(model)}")
    is_ddp = accelerator.distributed_type.value in _DDP_TYPES
    if is_ddp:
        ignore_factorized_weights(model)

    to_prepare = list(objects)
    # DeepSpeed's stage-0 engine must call ABOptimizer.step(); under ZeRO DeepSpeed's ZeRO
    # optimizer wraps the torch optimizer and steps; under DDP (or one process) Accelerate
    # prepares the plain optimizer (its state is moved to the device) and the ABOptimizer is
    # put inside Accelerate's wrapper afterwards.
    zero = deepspeed and zero_stage(accelerator.state.deepspeed_plugin.deepspeed_config) in STAGES
    if zero:
        fill_empty_groups(ab.optimizer, model)  # frozen groups: ZeRO cannot build an empty one
    to_prepare[opt_index] = ab if deepspeed and not zero else ab.optimizer
    result = accelerator.prepare(*to_prepare)
    prepared = list(result) if isinstance(result, (tuple, list)) else [result]
    prepared_model, prepared_opt = prepared[model_index], prepared[opt_index]

    if deepspeed:
        # The prepared model is the DeepSpeed engine. attach() replaces its gradient
        # all-reduce and fp32 clipping by the AB ones, binds the ABOptimizer to engine.module
        # and keeps one shard per group in engine.save_checkpoint / load_checkpoint (which
        # accelerator.save_state / load_state call under DeepSpeed).
        attach_prepared(prepared_model, ab, prepared_opt,
                        prepared_model.is_gradient_accumulation_boundary)
        patches.add_view_class(prepared_opt, ABOptimizerView)
        return result
    # The overlapped reduction launches only on accumulation boundaries.
    wire(ab, prepared_model, lambda: accelerator.sync_gradients, prepared_opt)
    patches.add_view_class(prepared_opt, ABOptimizerView)
    _register(accelerator, prepared_model, prepared_opt, ab)
    return result


# ---------------------------------------------------------------------------------- checks
def _find_optimizer_and_model(objects: tuple[Any, ...]) -> tuple[int, int]:
    if any(type(obj).__name__ == "DummyOptim" for obj in objects):
        support.refuse(support.problem("dummy_optim", frontend=support.ACCELERATE),
                       "through ab_accel.prepare")
    optimizers = [i for i, obj in enumerate(objects) if isinstance(obj, torch.optim.Optimizer)]
    if len(optimizers) != 1:
        raise ValueError(
            f"ab_accel.prepare needs exactly one optimizer and the model it trains in the same "
            f"call (got {len(optimizers)} optimizers). Prepare other models and optimizers with "
            f"accelerator.prepare."
        )
    opt_index = optimizers[0]
    opt = objects[opt_index]
    if isinstance(opt, AcceleratedOptimizer):
        raise ValueError(
            "This optimizer was already prepared by accelerator.prepare. Call ab_accel.prepare "
            "INSTEAD of accelerator.prepare, on the plain model and optimizer."
        )
    inner = opt.optimizer if isinstance(opt, ABOptimizer) else opt
    owned = {id(p) for group in inner.param_groups for p in group["params"]}
    candidates = [i for i, obj in enumerate(objects) if isinstance(obj, nn.Module)
                  and any(id(p) in owned for p in obj.parameters())]
    if not candidates:
        raise ValueError(
            "ab_accel.prepare needs the model the optimizer trains in the same call: none of "
            "the modules passed holds the optimizer's parameters. Build the optimizer over "
            "model.parameters() and pass both, e.g. prepare(accelerator, model, optimizer)."
        )
    if len(candidates) > 1:
        raise ValueError(
            "The optimizer trains parameters of more than one of the models passed; "
            "AB-training binds one optimizer to one model."
        )
    model = objects[candidates[0]]
    if getattr(model, "_is_accelerate_prepared", False) or isinstance(
            model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "This model was already prepared (or wrapped in DDP). Call ab_accel.prepare "
            "INSTEAD of accelerator.prepare, on the plain model."
        )
    return opt_index, candidates[0]


def _resolve_config(accelerator: Any, opt: Any, config: ABConfig | dict | None) -> ABConfig:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return resolve_config(
        config, optimizer_config=opt.config if isinstance(opt, ABOptimizer) else None,
        deepspeed=plugin.deepspeed_config if plugin is not None else None,
        fallback=ABConfig()).config


def _check_supported(accelerator: Any) -> bool:
    """Refuse what AB-training cannot run (the table in :mod:`ab_accel.support`). Returns
    whether Accelerate runs DeepSpeed."""
    kind = accelerator.distributed_type
    name = kind.value if isinstance(kind, DistributedType) else str(kind)
    where, acc = "under Accelerate", support.ACCELERATE
    if name in _REFUSED_TYPES:
        support.refuse(support.problem(_REFUSED_TYPES[name], frontend=acc), where)
    parallel = getattr(accelerator, "parallelism_config", None)
    if parallel is not None and (getattr(parallel, "tp_enabled", False)
                                 or getattr(parallel, "cp_enabled", False)):
        support.refuse(support.problem("model_parallel", "parallelism_config tp_size/cp_size > 1",
                                       acc), where)
    fp8 = str(getattr(getattr(accelerator, "fp8_backend", None), "value",
                      getattr(accelerator, "fp8_backend", "NO")))
    if accelerator.mixed_precision == "fp8" or fp8 not in ("NO", "None"):
        support.refuse(support.problem("fp8", f"mixed_precision='fp8' (fp8_backend {fp8})", acc),
                       where)
    dynamo = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
    if dynamo is not None and str(getattr(dynamo, "value", dynamo)).upper() != "NO":
        support.refuse(support.problem("compile", "torch.compile through Accelerate "
                                       "(dynamo_backend)", acc), where)
    if name == "DEEPSPEED":
        return True
    if name != "NO" and name not in _DDP_TYPES:
        raise support.UnsupportedSetupError(
            f"AB-training has not been made to run under distributed type {name}. Use plain "
            "data parallel (`accelerate launch --multi_gpu --num_processes N`).")
    support.check_mixed_precision(accelerator.mixed_precision, acc)
    handler = getattr(accelerator, "ddp_handler", None)
    if handler is not None:
        hook = str(getattr(handler.comm_hook, "value", handler.comm_hook)).lower()
        if hook != "no":
            support.refuse(support.problem(
                "ddp_comm_hook", f"DistributedDataParallelKwargs(comm_hook={hook!r})", acc), where)
        if handler.static_graph:
            support.refuse(support.problem(
                "ddp_static_graph", "DistributedDataParallelKwargs(static_graph=True)", acc), where)
    return False


# ---------------------------------------------------------------------------------- optimizer
class ABOptimizerView:
    """What :func:`prepare` adds to the optimizer Accelerate returns (AB attributes)."""

    @property
    def ab_optimizer(self) -> ABOptimizer:
        """The :class:`~ab_accel.ABOptimizer` inside."""
        return ab_optimizer(self.optimizer)

    @property
    def phase(self) -> str:
        """Phase of the NEXT optimizer step: "warmup", "ab" or "rebound"."""
        return self.ab_optimizer.phase

    @property
    def role(self) -> str | None:
        """"A" (A-group), "B" (B-group), "AB" (single process) or None outside AB phases."""
        return self.ab_optimizer.role

    @property
    def traffic(self) -> Any:
        """The :class:`~ab_accel.TrafficMeter` of this rank."""
        return self.ab_optimizer.traffic

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (accumulation boundaries, not micro-batches)."""
        return self.ab_optimizer.step_count

    @property
    def ranks(self) -> dict[str, int | None]:
        """Current rank of every AB layer."""
        return self.ab_optimizer.ranks

    def synchronize(self) -> None:
        """Reduce the gradients now (see :meth:`ABOptimizer.synchronize`)."""
        self.ab_optimizer.synchronize()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # accelerator.load_state reads the MAIN process's optimizer file into every rank, right
        # after its pre-hooks ran; the load pre-hook has already restored this rank's own
        # group shard and asked to skip that one load.
        if patches.take_skip_next_load(self):
            return
        super().load_state_dict(state_dict)  # type: ignore[misc]


# ---------------------------------------------------------------------------------- accelerator
def _register(accelerator: Any, model: nn.Module, prepared_opt: Any, ab: ABOptimizer) -> None:
    """Clipping that reduces first, and save/load hooks for the per-group shards (DDP or a
    single process; under DeepSpeed, ab_accel.deepspeed.attach does both on the engine)."""
    raw_model = accelerator.unwrap_model(model)
    registered: list[ABOptimizer] = accelerator.__dict__.setdefault("_ab_optimizers", [])
    registered.append(ab)
    patches.clip_reduces_first(
        accelerator, lambda params: reduce_before_clip(accelerator.__dict__["_ab_optimizers"],
                                                       params))

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        save_shards(output_dir, model, ab)

    def load_hook(models: list[Any], input_dir: str) -> None:
        # Accelerate would load the main process's model file into every rank next (its
        # list holds the model as it was before the DDP wrapping). A folder without shards
        # is refused (the file named), before anything is loaded.
        models[:] = [m for m in models if m is not model and m is not raw_model]
        load_shards(input_dir, model, ab)
        patches.skip_next_optimizer_load(prepared_opt)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def started_one_of_several(environ: Any = None) -> bool:
    """Whether Accelerate's simple launcher started this ONE process where several were asked
    for: it sets MASTER_PORT for them but no WORLD_SIZE (a real multi-process launcher sets
    WORLD_SIZE, mpirun its own size variable)."""
    env = os.environ if environ is None else environ
    return ("ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env
            and not any(v in env for v in _SIZE_VARIABLES))


def check_launch(environ: Any = None) -> None:
    """Refuse a launch that started ONE process where several were asked for: Accelerate's
    simple launcher (``accelerate launch --cpu --num_processes N``, or ``--num_processes N``
    without ``--multi_gpu`` on a machine without GPUs) sets MASTER_ADDR/MASTER_PORT for the N
    wanted but no WORLD_SIZE (a real multi-process launcher sets WORLD_SIZE, mpirun its own
    size variable). :func:`prepare` calls it; a script may call it first thing, before any work.
    (The recipes run a richer check first that prints the exact command: recipes/launch.py.)"""
    env = os.environ if environ is None else environ
    if started_one_of_several(env):
        why = ("--cpu makes accelerate launch use its simple launcher"
               if env["ACCELERATE_USE_CPU"].lower() in ("true", "1") else
               "without --multi_gpu (or a --config_file that sets it) accelerate launch uses "
               "its simple launcher on a machine without GPUs")
        raise ABConfigError(
            f"accelerate launch starts ONE process here, not the number asked for ({why}). For N "
            f"CPU processes run `accelerate launch --multi_gpu --num_processes N ...` without "
            f"--cpu, with ACCELERATE_USE_CPU=true (or Accelerator(cpu=True) in the script), "
            f"e.g. `accelerate launch --config_file configs/accelerate_cpu.yaml`.")


def __getattr__(name: str) -> Any:
    """``save_state``, ``check_state`` and ``load_state`` moved to ``recipes/state.py`` (they
    are not AB-training): the old import path still finds them there, with a warning."""
    if name in ("save_state", "check_state", "load_state"):
        import warnings

        warnings.warn(f"ab_accel.accelerate.{name} moved to recipes/state.py (import "
                      f"recipes.state)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("recipes.state"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["prepare", "ab_optimizer", "ABOptimizerView", "CHECKPOINT_DIR", "check_launch",
           "started_one_of_several", "save_merged", "shards_dir"]
