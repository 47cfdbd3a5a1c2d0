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

At ZeRO stage 0:

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

ZeRO stage 1 and 2 (with or without ``"offload_optimizer"``) and ``"bf16"`` run too: DeepSpeed's
ZeRO optimizer keeps reducing, clipping and stepping, partitioned over the step's scope (the
world in warm-up and rebound, the own group in an AB phase) and rebuilt at every switch; see
:mod:`ab_accel.zero`.

What is refused, before any step (see :func:`check_config`): ZeRO stage 3 (it partitions the
parameters over the whole world, while the groups hold different, shape-changing factors),
``fp16`` and float16 ``torch_autocast`` (a loss scaler), ``"bf16"`` at stage 0 (DeepSpeed's
stage-0 bf16 optimizer flattens the parameters into fixed buffers), ``torch_autocast`` with
ZeRO, and, at stage 0, settings of DeepSpeed's own all-reduce that the AB reduction would
silently ignore. Mixed precision: ``"bf16"`` with ZeRO 1/2, or ``"torch_autocast": {"enabled":
true, "dtype": "bfloat16"}`` at stage 0 (fp32 weights and gradients, bf16 compute).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import SHARDS_DIR
from .config import ABConfigError, resolve_config
from .ds_config import check_config, load_ds_config, read_config, zero_stage
from .engine import attach, check_engine, torch_optimizer
from .model import convert
from .optimizer import ABOptimizer
from .zero import STAGES, fill_empty_groups

#: Sub-folder of a DeepSpeed checkpoint tag (or of an HF Trainer checkpoint) with the group shards.
AB_CHECKPOINT_DIR = SHARDS_DIR


# ---------------------------------------------------------------------------------------- entry
def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               config: Mapping[str, Any] | str | os.PathLike | None = None,
               config_params: Any = None, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` plus the ``"ab_training"`` key of the DeepSpeed JSON.

    Same arguments and the same returns ``(engine, optimizer, training_dataloader,
    lr_scheduler)``; with the key present and enabled, ``optimizer`` is the
    :class:`~ab_accel.ABOptimizer` (at ZeRO stage 0 also ``engine.optimizer``). The model is
    converted in place (:func:`ab_accel.convert`) before DeepSpeed sees it.

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
    if zero_stage(ds) in STAGES and isinstance(optimizer, torch.optim.Optimizer):
        fill_empty_groups(optimizer, model)  # frozen groups: ZeRO cannot build an empty one
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, config=ds, **ds_kwargs)
    check_engine(engine)
    # Under ZeRO the engine's optimizer is DeepSpeed's: the torch optimizer inside is wrapped.
    inner = torch_optimizer(engine)
    if ab is None:
        ab = ABOptimizer(inner, None, cfg)
    elif inner is not ab.optimizer:
        raise RuntimeError("DeepSpeed replaced the optimizer; cannot attach AB-training.")
    attach(engine, ab)
    return engine, ab, dataloader, scheduler


__all__ = ["initialize", "attach", "check_config", "check_engine", "read_config",
           "load_ds_config", "AB_CHECKPOINT_DIR"]
