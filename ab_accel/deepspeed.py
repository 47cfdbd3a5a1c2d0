"""DeepSpeed with AB-training (arXiv 2405.01067): the top-level ``"ab_training"`` JSON key.

    engine, optimizer, _, _ = ab_accel.deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config="ds.json")
    for x, y in loader:
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()

:func:`initialize` takes the arguments of ``deepspeed.initialize`` and returns the same four
objects, with the :class:`~ab_accel.ABOptimizer` as ``optimizer``. With ``"ab_training"`` present
and enabled it converts the model (:func:`ab_accel.convert`), wraps the optimizer, and
:func:`attach` es the optimizer to the engine:

* the engine's gradient all-reduce (``engine.allreduce_gradients``, run by ``engine.backward`` at
  a gradient accumulation boundary) becomes the AB reduction: over the world in warm-up and
  rebound, inside the own group in an AB phase (A-groups train A, B-groups train B). Micro-steps
  between boundaries accumulate locally, as with DeepSpeed;
* the engine's fp32 gradient clipping (``"gradient_clipping"``) clips the reduced gradients of
  what this rank trains, with a group-local norm: DeepSpeed's own clip averages the norm over the
  world, which would mix the A-groups' and the B-groups' norms;
* ``engine.step()`` runs the ABOptimizer once per optimizer step (at the accumulation boundary),
  so the step counter t, the syncs and the re-factorizations follow optimizer steps;
* ``engine.save_checkpoint`` / ``engine.load_checkpoint`` also write and read one shard per group
  (``<save_dir>/<tag>/ab_training``): DeepSpeed saves the module from rank 0 only, and mid-AB
  phase the groups hold different factors.

Without the key (or with ``"enabled": false``) :func:`initialize` is plain ``deepspeed.initialize``.

What is refused, before any step (see :func:`check_config`): ZeRO stages >= 1 (they shard the
optimizer state, gradients or parameters over the whole world, while the groups hold different,
shape-changing factors), DeepSpeed's ``fp16`` / ``bf16`` optimizers (they flatten the parameters
into fixed buffers), ``torch_autocast`` with float16 (its loss scaler skips steps per group, so the
groups' step counters would drift apart), and settings of DeepSpeed's own all-reduce that the AB
reduction would silently ignore. Mixed precision works through ``"torch_autocast": {"enabled":
true, "dtype": "bfloat16"}`` (fp32 weights and gradients, bf16 compute).
"""

from __future__ import annotations

import copy
import os
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import support
from .checkpoint import META, SHARDS_DIR, is_complete
from .checkpoint import load_checkpoint as _load_ab_checkpoint
from .checkpoint import save_checkpoint as _save_ab_checkpoint
from .config import DEEPSPEED_KEY, ABConfig, ABConfigError, load_deepspeed_json, resolve_config
from .model import convert
from .optimizer import ABOptimizer

#: Sub-folder of a DeepSpeed checkpoint tag (or of an HF Trainer checkpoint) with the group shards.
AB_CHECKPOINT_DIR = SHARDS_DIR

#: Optimizer types of a JSON "optimizer" block that tag every parameter at construction (Muon's
#: ``use_muon``, mup's ``infshape``): see support.UNSUPPORTED["tagging_optimizer"].
_TAGGING_OPTIMIZERS = ("muon", "muadam", "muadamw", "musgd")

#: DeepSpeed settings a user may put inside "ab_training" by mistake: where they belong.
_DEEPSPEED_KEYS = {
    "train_batch_size": "the top level", "train_micro_batch_size_per_gpu": "the top level",
    "gradient_accumulation_steps": "the top level", "gradient_clipping": "the top level",
    "steps_per_print": "the top level", "wall_clock_breakdown": "the top level",
    "optimizer": "the top level", "scheduler": "the top level", "fp16": "the top level",
    "bf16": "the top level", "torch_autocast": "the top level",
    "zero_optimization": "the top level", "communication_data_type": "the top level",
    "prescale_gradients": "the top level", "gradient_predivide_factor": "the top level",
    "stage": '"zero_optimization"', "offload_optimizer": '"zero_optimization"',
    "offload_param": '"zero_optimization"', "reduce_bucket_size": '"zero_optimization"',
    "allgather_bucket_size": '"zero_optimization"', "overlap_comm": '"zero_optimization"',
    "contiguous_gradients": '"zero_optimization"', "lr": '"optimizer"."params"',
    "betas": '"optimizer"."params"', "eps": '"optimizer"."params"',
    "weight_decay": '"optimizer"."params"', "warmup_num_steps": '"scheduler"."params"',
    "warmup_max_lr": '"scheduler"."params"', "warmup_min_lr": '"scheduler"."params"',
    "dtype": '"torch_autocast"',
}


# ---------------------------------------------------------------------------------------- config
def load_ds_config(config: Mapping[str, Any] | str | os.PathLike | None = None,
                   args: Any = None, config_params: Any = None) -> dict[str, Any]:
    """The DeepSpeed config as a dict, found where ``deepspeed.initialize`` looks for it: the
    ``config`` argument (dict or JSON path), ``config_params``, or ``args.deepspeed_config``."""
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass config=<dict or JSON path> or "
                         "args.deepspeed_config (the --deepspeed_config flag).")
    if isinstance(config, Mapping):
        return dict(config)
    return load_deepspeed_json(config)


def read_config(ds_config: Mapping[str, Any] | str | os.PathLike) -> ABConfig | None:
    """The :class:`ABConfig` of a DeepSpeed config (None without the key), after
    :func:`check_config`."""
    ds = load_ds_config(ds_config)
    check_config(ds)
    return ABConfig.from_deepspeed_config(ds)


def check_config(ds_config: Mapping[str, Any] | str | os.PathLike) -> None:
    """Raise a clear error for a DeepSpeed config that AB-training cannot run correctly.

    Always checked: ``"ab_training"`` sits at the top level (DeepSpeed's own blocks reject
    unknown keys) and holds only ABConfig fields (a DeepSpeed setting put inside it gets a
    message that says where it belongs). When the key is present and enabled, also: ZeRO stage 0,
    no ``fp16`` / ``bf16`` optimizer, no float16 ``torch_autocast``, no optimizer type that tags
    parameters at construction, and no setting of DeepSpeed's own gradient all-reduce (which the
    AB reduction replaces). Raises :class:`~ab_accel.ABConfigError`; returns None when fine.
    """
    ds = load_ds_config(ds_config)
    block = ds.get(DEEPSPEED_KEY)
    if isinstance(block, Mapping):
        for key in block:
            if key in _DEEPSPEED_KEYS and key not in ABConfig.__dataclass_fields__:
                where = _DEEPSPEED_KEYS[key]
                raise ABConfigError(
                    f'"{key}" is a DeepSpeed setting, not an AB-training one: move it out of '
                    f'"{DEEPSPEED_KEY}" to {where} of the DeepSpeed JSON. "{DEEPSPEED_KEY}" takes '
                    f"only: {', '.join(ABConfig.__dataclass_fields__)}."
                )
    # Misplaced key (inside a DeepSpeed block), unknown keys, out-of-range values.
    cfg = ABConfig.from_deepspeed_config(ds)
    if cfg is None or not cfg.enabled:
        return
    problems = _incompatible_settings(ds)
    if problems:
        support.refuse(problems, f'this DeepSpeed config ("{DEEPSPEED_KEY}" is enabled)',
                       hint=f'Or set "{DEEPSPEED_KEY}": {{"enabled": false}} to train with plain '
                            "DeepSpeed.")


def _switch(block: Any) -> bool | str:
    """The "enabled" of a DeepSpeed block: True, False, or "auto" (filled in later by the HF
    integrations from their own flags, so not known here)."""
    if isinstance(block, Mapping):
        value = block.get("enabled", False)
        if isinstance(value, str):
            return "auto" if value.lower() == "auto" else value.lower() == "true"
        return value is True
    return False


def _incompatible_settings(ds: Mapping[str, Any]) -> list[str]:
    """One line of support.problem per refused setting of a DeepSpeed config."""
    ds_ = support.DEEPSPEED
    problems: list[str] = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    try:
        stage_num = int(stage)
    except (TypeError, ValueError):
        stage_num = -1
    if stage_num != 0:
        problems.append(support.problem(
            "zero", f'"zero_optimization": {{"stage": {stage!r}}} (ZeRO stages >= 1 shard)', ds_))
    for key in ("fp16", "bf16", "bfloat16"):
        enabled = _switch(ds.get(key))
        if enabled == "auto":
            problems.append(support.problem(
                "flat_optimizer", f'"{key}": {{"enabled": "auto"}} (Accelerate or the Trainer '
                f"may turn DeepSpeed's {key} optimizer on from their own flags: write false)",
                ds_))
        elif enabled:
            problems.append(support.problem(
                "flat_optimizer", f'"{key}": {{"enabled": true}} (DeepSpeed\'s {key} optimizer)',
                ds_))
    autocast = ds.get("torch_autocast")
    if _switch(autocast):
        dtype = str(autocast.get("dtype", "bfloat16")).lower().replace("torch.", "")
        if dtype in ("float16", "fp16", "half"):
            problems.append(support.problem(
                "fp16", f'"torch_autocast": {{"dtype": "{autocast.get("dtype")}"}} (float16 '
                f"autocast runs a loss scaler)", ds_))
    optimizer = ds.get("optimizer")
    if isinstance(optimizer, Mapping):
        kind = str(optimizer.get("type", "")).lower()
        if kind in _TAGGING_OPTIMIZERS:
            problems.append(support.problem(
                "tagging_optimizer", f'"optimizer": {{"type": "{optimizer.get("type")}"}}', ds_))
    touched = []
    if ds.get("communication_data_type") is not None:
        touched.append(f'"communication_data_type": {ds["communication_data_type"]!r}')
    if ds.get("prescale_gradients") is True:
        touched.append('"prescale_gradients": true')
    predivide = ds.get("gradient_predivide_factor")
    if predivide is not None and float(predivide) != 1.0:
        touched.append(f'"gradient_predivide_factor": {predivide!r}')
    problems += [support.problem("deepspeed_allreduce", t, ds_) for t in touched]
    tp = ds.get("tensor_parallel") or {}
    if isinstance(tp, Mapping) and int(tp.get("autotp_size", 0) or 0) > 1:
        problems.append(support.problem(
            "model_parallel", f'"tensor_parallel": {{"autotp_size": {tp["autotp_size"]}}}', ds_))
    sp = ds.get("sequence_parallel_size")
    if sp is not None and int(sp) > 1:
        problems.append(support.problem("model_parallel", f'"sequence_parallel_size": {sp}', ds_))
    compile_cfg = ds.get("compile") or {}
    if isinstance(compile_cfg, Mapping) and compile_cfg.get("deepcompile"):
        problems.append(support.problem("compile", '"compile": {"deepcompile": true}', ds_))
    return problems


# ---------------------------------------------------------------------------------------- engine
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
    self._global_grad_norm = norm
    return norm


def _tag_dir(engine: Any, root: str, tag: Any) -> str | None:
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as fh:
            tag = fh.read().strip()
    return os.path.join(root, str(tag), AB_CHECKPOINT_DIR)


def _ab_save_checkpoint(self: Any, save_dir: str, tag: Any = None, client_state: Any = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False
                        ) -> Any:
    """One shard per AB group under ``<save_dir>/<tag>/ab_training``, then DeepSpeed's own
    save_checkpoint (which writes the ``latest`` tag last)."""
    if tag is None:
        tag = f"global_step{self.global_steps}"
    _save_ab_checkpoint(os.path.join(save_dir, str(tag), AB_CHECKPOINT_DIR), self.module,
                        self.ab_optimizer, extra={"global_steps": self.global_steps})
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
    ab_dir = _tag_dir(self, load_dir, tag)
    has_shards = ab_dir is not None and is_complete(ab_dir)
    out = self._ab_original_load_checkpoint(
        load_dir, tag, load_module_strict=load_module_strict,
        load_optimizer_states=load_optimizer_states and not has_shards,
        load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
        custom_load_fn=custom_load_fn)
    if out is None or out[0] is None:
        return out
    if not has_shards:
        warnings.warn(
            f"The DeepSpeed checkpoint in {load_dir!r} holds no AB-training shards "
            f"({AB_CHECKPOINT_DIR}/{META}): every rank continues from rank 0's model and "
            f"optimizer state.", stacklevel=2)
        return out
    _load_ab_checkpoint(ab_dir, self.module, self.ab_optimizer,
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
    if engine.optimizer is not ab_optimizer:
        if engine.optimizer is ab_optimizer.optimizer:
            engine.optimizer = ab_optimizer
        else:
            raise ValueError(
                f"The engine's optimizer ({type(engine.optimizer).__name__}) is neither the "
                f"ABOptimizer nor the optimizer it wraps: build the ABOptimizer around "
                f"engine.optimizer (ZeRO stage 0, no fp16/bf16 block), or pass it to "
                f"deepspeed.initialize as optimizer=."
            )
    if getattr(engine, "basic_optimizer", None) is ab_optimizer.optimizer:
        engine.basic_optimizer = ab_optimizer
    if ab_optimizer.model is None:
        ab_optimizer.bind(engine.module)
    engine.ab_optimizer = ab_optimizer
    # The overlapped reduction launches only in the backward of an accumulation boundary.
    ab_optimizer.launch_predicate = engine.is_gradient_accumulation_boundary
    # Patches, on this engine only: DeepSpeed has no public hook for its gradient all-reduce,
    # its fp32 clipping or its checkpoint files (engine.backward calls allreduce_gradients
    # directly), and AB-training must replace the first two and extend the last two.
    engine.allreduce_gradients = types.MethodType(_ab_allreduce_gradients, engine)
    engine.clip_fp32_gradients = types.MethodType(_ab_clip_fp32_gradients, engine)
    engine._ab_original_save_checkpoint = engine.save_checkpoint
    engine._ab_original_load_checkpoint = engine.load_checkpoint
    engine.save_checkpoint = types.MethodType(_ab_save_checkpoint, engine)
    engine.load_checkpoint = types.MethodType(_ab_load_checkpoint, engine)
    return ab_optimizer


# ---------------------------------------------------------------------------------------- entry
def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               config: Mapping[str, Any] | str | os.PathLike | None = None,
               config_params: Any = None, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` plus the ``"ab_training"`` key of the DeepSpeed JSON.

    Same arguments and the same returns ``(engine, optimizer, training_dataloader,
    lr_scheduler)``; with the key present and enabled, ``optimizer`` is the
    :class:`~ab_accel.ABOptimizer` (also ``engine.optimizer``). The model is converted in place
    (:func:`ab_accel.convert`) before DeepSpeed sees it.

    The optimizer: a torch optimizer (or a callable, as DeepSpeed takes) passed as
    ``optimizer=`` is wrapped; without one, DeepSpeed builds the JSON's ``"optimizer"`` block
    (``"torch_adam": true`` gives torch's AdamW, which also runs on CPU) and that is wrapped. An
    :class:`~ab_accel.ABOptimizer` may be passed too; its config must then agree with the key.
    Tensors re-created at a switch (W, A, B) start with fresh optimizer state; the LR rebound
    covers the restart.

    Every refused setting raises :class:`~ab_accel.ABConfigError` here, before step 1.
    """
    import deepspeed

    ds = load_ds_config(config, args=args, config_params=config_params)
    check_config(ds)
    cfg = resolve_config(deepspeed=ds).config
    ds_kwargs = dict(kwargs, training_data=training_data, lr_scheduler=lr_scheduler,
                     model_parameters=model_parameters)
    if args is not None and (getattr(args, "deepspeed_config", None) is not None
                             or getattr(args, "deepscale_config", None) is not None):
        # deepspeed.initialize refuses a config given twice: pass the dict we read, only (on a
        # copy: the caller's args stay as they are).
        args = copy.copy(args)
        args.deepspeed_config = None
        if hasattr(args, "deepscale_config"):
            args.deepscale_config = None
    if cfg is None or not cfg.enabled:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=ds,
                                    **ds_kwargs)
    if model is None:
        raise ValueError("ab_accel.deepspeed.initialize needs model= to convert it to AB layers.")
    ab: ABOptimizer | None = None
    if isinstance(optimizer, ABOptimizer):
        # Both must agree (one error names the fields that differ otherwise).
        resolve_config(optimizer_config=optimizer.config, deepspeed=ds)
        if optimizer.model is not None:
            raise ValueError("Pass an unbound ABOptimizer (model=None): the engine binds it.")
        ab, optimizer = optimizer, optimizer.optimizer
    if optimizer is None and not isinstance(ds.get("optimizer"), Mapping):
        raise ABConfigError(
            'AB-training needs an optimizer to wrap: pass optimizer= (for example '
            'torch.optim.AdamW(model.parameters(), lr=...)) or add an "optimizer" block to the '
            'DeepSpeed JSON (for example {"type": "AdamW", "params": {"lr": 1e-3, '
            '"torch_adam": true}}).'
        )
    convert(model, cfg)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, config=ds, **ds_kwargs)
    check_engine(engine)
    if ab is None:
        ab = ABOptimizer(engine.optimizer, None, cfg)
    elif engine.optimizer is not ab.optimizer:
        raise RuntimeError("DeepSpeed replaced the optimizer; cannot attach AB-training.")
    attach(engine, ab)
    return engine, ab, dataloader, scheduler


__all__ = ["initialize", "attach", "check_config", "check_engine", "read_config",
           "load_ds_config", "AB_CHECKPOINT_DIR"]
