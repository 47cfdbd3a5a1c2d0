"""What the integrations share: wiring an ABOptimizer in, clipping after the reduction, the
groups' checkpoint shards, and the end of a run.

The three integrations (:mod:`ab_accel.accelerate`, :mod:`ab_accel.deepspeed`,
:mod:`ab_accel.trainer`) stand side by side over this module and the core; none imports
another. Each probes its framework, refuses what it cannot run, and then:

* **wires** the ABOptimizer in (:func:`wire`): DDP (if any) stops reducing for good, the
  ABOptimizer goes inside the framework's optimizer wrapper, its overlapped reduction launches
  only on the framework's accumulation boundaries, and it binds to the prepared model;
* **clips after reducing**: every clip runs on gradients the ABOptimizer has reduced
  (:meth:`ABOptimizer.synchronize`; :func:`reduce_before_clip` for a framework that clips a
  parameter list itself, :meth:`ABOptimizer.clip_grad_norm_` otherwise);
* keeps **one shard per group** in the framework's checkpoints (:func:`save_shards`,
  :func:`check_shards`, :func:`load_shards`). The policy for a checkpoint without shards is
  one: refuse, on every rank, with the missing file named (as
  :func:`ab_accel.load_checkpoint` does), before anything is loaded: continuing from the main
  process's files would silently replace every group's model by one;
* ends a run with :func:`save_merged` (reconcile, merge, save).

Every framework patch is in :mod:`ab_accel.patches`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from . import patches
from .checkpoint import SHARDS_DIR, check_checkpoint, load_checkpoint, save_checkpoint
from .optimizer import ABOptimizer


def ab_optimizer(obj: Any) -> ABOptimizer:
    """The :class:`~ab_accel.ABOptimizer` inside ``obj``.

    ``obj`` may be the ABOptimizer itself, the optimizer :func:`ab_accel.prepare` returned
    (Accelerate's ``AcceleratedOptimizer`` or DeepSpeed wrapper) or a DeepSpeed engine: the
    ``.optimizer`` chain is followed until the ABOptimizer is found.
    """
    seen: set[int] = set()
    current = obj
    while current is not None and id(current) not in seen:
        if isinstance(current, ABOptimizer):
            return current
        owner = getattr(current, "ab_optimizer", None)  # a DeepSpeed engine or ZeRO optimizer
        if isinstance(owner, ABOptimizer):
            return owner
        seen.add(id(current))
        current = getattr(current, "optimizer", None)
    raise TypeError(
        f"No ABOptimizer inside {type(obj).__name__}: pass the optimizer returned by "
        f"ab_accel.prepare (or ab_accel.deepspeed.initialize)."
    )


def wire(ab: ABOptimizer, model: nn.Module, launch_predicate: Callable[[], bool],
         wrapper: Any = None, framework: str = "accelerate") -> ABOptimizer:
    """Wire ``ab`` into a prepared run: a DDP ``model`` stops reducing (the ABOptimizer owns
    gradient reduction: the world in warm-up and rebound, the own group in an AB phase),
    ``wrapper`` (the framework's optimizer wrapper or engine, if any) holds ``ab`` instead of
    the torch optimizer, the overlapped reduction launches only while ``launch_predicate``
    (the framework's accumulation boundary) holds, and ``ab`` binds to ``model`` unless bound
    already. Binding is a collective: every rank calls it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        patches.ddp_stop_reducing(model)
    if wrapper is not None:
        patches.swap_inner_optimizer(wrapper, ab, framework)
    ab.launch_predicate = launch_predicate
    if ab.model is None:
        ab.bind(model)
    return ab


def reduce_before_clip(optimizers: list[ABOptimizer], parameters: list[Any]) -> None:
    """Reduce the gradients of every ABOptimizer that trains one of ``parameters`` (once per
    step), so that a clip of ``parameters`` clips REDUCED gradients, as it does under DDP."""
    ids = {id(p) for p in parameters}
    for ab in optimizers:
        if any(id(p) in ids for p in ab.trained_params()):
            ab.synchronize()


# ---------------------------------------------------------------------------------- shards
def shards_dir(checkpoint_dir: str | os.PathLike) -> str:
    """Where the groups' shards live inside a framework's checkpoint folder."""
    return os.path.join(os.fspath(checkpoint_dir), SHARDS_DIR)


def save_shards(checkpoint_dir: str | os.PathLike, model: nn.Module, ab: ABOptimizer,
                extra: dict[str, Any] | None = None) -> None:
    """One shard per group into ``<checkpoint_dir>/ab_training`` (collective)."""
    save_checkpoint(shards_dir(checkpoint_dir), model, ab, extra=extra)


def check_shards(checkpoint_dir: str | os.PathLike, ab: ABOptimizer) -> None:
    """Refuse a checkpoint whose shards are missing or unusable, before the framework loads
    anything from it (collective; the error names the file)."""
    check_checkpoint(shards_dir(checkpoint_dir), ab)


def load_shards(checkpoint_dir: str | os.PathLike, model: nn.Module, ab: ABOptimizer,
                model_only: bool = False) -> dict[str, Any]:
    """This rank's own group shard into ``model`` and ``ab`` (collective; refuses as
    :func:`check_shards` does). Returns the shard's ``extra``."""
    return load_checkpoint(shards_dir(checkpoint_dir), model, ab, model_only=model_only)


# ---------------------------------------------------------------------------------- the end
def save_merged(accelerator: Any, model: Any, optimizer: Any = None,
                output_dir: str | os.PathLike | None = None, *, processor: Any = None,
                sync_always: bool = False) -> dict[str, Any]:
    """The end of a run in one call: the model back as plain dense layers, saved.

    With the optimizer :func:`ab_accel.prepare` returned (None or a plain one: AB-training was
    off), :meth:`ABOptimizer.finalize` reconciles the groups if the run stopped inside an AB
    phase (one sync, metered; with ``sync_always``, :meth:`ABOptimizer.sync_now`: whenever a
    layer is factored); then :func:`ab_accel.merge` turns every AB layer of the unwrapped
    model into a dense one of its original type (W = A B) on every process, and the main
    process saves it with ``save_pretrained`` (plus ``processor.save_pretrained``: an image
    processor or tokenizer) into ``output_dir`` (None: nothing is saved): plain transformers
    loads the folder. A model without ``save_pretrained`` (a plain torch module) is saved with
    ``accelerator.save_model``: ``model.safetensors`` under the original module's keys.
    Collective: every process calls it. Training cannot continue afterwards; evaluate
    ``accelerator.unwrap_model(model)``, the merged model. Returns ``{"dir", "final_sync"}``
    (whether this call ran a sync) and, when AB-training ran, ``"compression"``: the dense /
    AB parameter count of the last factorization (:meth:`ABOptimizer.report`, which says what
    it is measured on).
    """
    from .model import merge

    opt = None
    if optimizer is not None:
        try:
            opt = ab_optimizer(optimizer)
        except TypeError:
            pass  # a plain optimizer: AB-training off
    facts: dict[str, Any] = {"dir": os.fspath(output_dir) if output_dir else None,
                             "final_sync": False}
    if opt is not None and sync_always:  # the compression as training left it
        facts["compression"] = opt.report()["compression"]
        facts["final_sync"] = opt.sync_now()
    elif opt is not None:
        facts["final_sync"] = opt.finalize()
        facts["compression"] = opt.report()["compression"]
    unwrapped = merge(accelerator.unwrap_model(model))  # forward left as prepared
    if output_dir and not hasattr(unwrapped, "save_pretrained"):  # a plain torch module
        accelerator.save_model(unwrapped, output_dir)  # model.safetensors (every process calls)
    elif output_dir and accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)
    if output_dir and processor is not None and accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    return facts


__all__ = ["ab_optimizer", "wire", "reduce_before_clip", "shards_dir", "save_shards",
           "check_shards", "load_shards", "save_merged"]
