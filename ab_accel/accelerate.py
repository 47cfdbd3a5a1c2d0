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
communication hooks or ``static_graph``: each error says what to use instead. DeepSpeed is
handed to :mod:`ab_accel.deepspeed` (``check_config`` before, ``attach`` after preparing).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn

from . import support
from .checkpoint import (
    META,
    SHARDS_DIR,
    STATE_MANIFEST,
    CheckpointError,
    check_files,
    is_complete,
    load_checkpoint,
    save_checkpoint,
)
from .config import ABConfig, ABConfigError, resolve_config
from .ddp import hand_reduction_to_ab, ignore_factorized_weights
from .model import ab_layers, convert, why_nothing_to_factorize
from .optimizer import ABOptimizer

#: Sub-folder of an ``accelerator.save_state`` folder that holds the per-group AB shards.
CHECKPOINT_DIR = SHARDS_DIR

_DDP_TYPES = {
    "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
    "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON",
}

#: Accelerate's distributed types that AB-training refuses, and their entry in the table.
_REFUSED_TYPES = {"FSDP": "fsdp", "MEGATRON_LM": "megatron", "XLA": "xla"}


# ---------------------------------------------------------------------------------- public
def ab_optimizer(obj: Any) -> ABOptimizer:
    """The :class:`~ab_accel.ABOptimizer` inside ``obj``.

    ``obj`` may be the ABOptimizer itself, the optimizer :func:`prepare` returned (Accelerate's
    ``AcceleratedOptimizer`` or DeepSpeed wrapper) or a DeepSpeed engine: the ``.optimizer``
    chain is followed until the ABOptimizer is found.
    """
    seen: set[int] = set()
    current = obj
    while current is not None and id(current) not in seen:
        if isinstance(current, ABOptimizer):
            return current
        seen.add(id(current))
        current = getattr(current, "optimizer", None)
    raise TypeError(
        f"No ABOptimizer inside {type(obj).__name__}: pass the optimizer returned by "
        f"ab_accel.prepare (or ab_accel.deepspeed.initialize)."
    )


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
    deepspeed_hooks = _check_supported(accelerator)
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
    if deepspeed_hooks is not None:
        deepspeed_hooks[0](accelerator.state.deepspeed_plugin.deepspeed_config)

    convert(model, cfg)
    if not any(True for _ in ab_layers(model)):
        raise ValueError(f"ab_accel.convert found no layer to factorize: "
                         f"{why_nothing_to_factorize(model)}")
    is_ddp = accelerator.distributed_type.value in _DDP_TYPES
    if is_ddp:
        ignore_factorized_weights(model)

    to_prepare = list(objects)
    # DeepSpeed's engine must call ABOptimizer.step(); under DDP (or one process) Accelerate
    # prepares the plain optimizer (its state is moved to the device) and the ABOptimizer is
    # put inside Accelerate's wrapper afterwards.
    to_prepare[opt_index] = ab if deepspeed_hooks is not None else ab.optimizer
    result = accelerator.prepare(*to_prepare)
    prepared = list(result) if isinstance(result, (tuple, list)) else [result]
    prepared_model, prepared_opt = prepared[model_index], prepared[opt_index]

    if deepspeed_hooks is not None:
        # The prepared model is the DeepSpeed engine. attach() replaces its gradient
        # all-reduce and fp32 clipping by the AB ones, binds the ABOptimizer to engine.module
        # and keeps one shard per group in engine.save_checkpoint / load_checkpoint (which
        # accelerator.save_state / load_state call under DeepSpeed).
        deepspeed_hooks[1](prepared_model, ab)
        if ab.model is None:
            ab.bind(prepared_model.module)
        if getattr(prepared_opt, "optimizer", None) is ab.optimizer:
            prepared_opt.optimizer = ab
        _add_ab_view(prepared_opt)
        return result
    if isinstance(prepared_model, nn.parallel.DistributedDataParallel):
        hand_reduction_to_ab(prepared_model)
    prepared_opt.optimizer = ab
    # The overlapped reduction launches only on accumulation boundaries.
    ab.launch_predicate = lambda: accelerator.sync_gradients
    ab.bind(prepared_model)
    _add_ab_view(prepared_opt)
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


def _check_supported(accelerator: Any) -> tuple[Any, Any] | None:
    """Refuse what AB-training cannot run (the table in :mod:`ab_accel.support`). Returns
    DeepSpeed's (check_config, attach) under DeepSpeed, else None."""
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
        return _deepspeed_hooks()
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
    return None


def _deepspeed_hooks() -> tuple[Any, Any]:
    try:
        from . import deepspeed as ab_deepspeed
    except ImportError as exc:
        raise NotImplementedError(
            f"ab_accel.prepare under DeepSpeed needs ab_accel.deepspeed, which could not be "
            f"imported ({exc}). Use plain data parallel (`accelerate launch --multi_gpu`) "
            f"meanwhile."
        ) from exc
    check = getattr(ab_deepspeed, "check_config", None)
    attach = getattr(ab_deepspeed, "attach", None)
    if check is None or attach is None:
        raise NotImplementedError(
            "ab_accel.prepare under DeepSpeed needs ab_accel.deepspeed.check_config and "
            "ab_accel.deepspeed.attach, which this version of ab_accel does not provide. Use "
            "plain data parallel (`accelerate launch --multi_gpu`) meanwhile."
        )
    return check, attach


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
        if self.__dict__.pop("_ab_skip_next_load", False):
            return
        super().load_state_dict(state_dict)  # type: ignore[misc]


_VIEW_CLASSES: dict[type, type] = {}


def _add_ab_view(prepared_opt: Any) -> None:
    """Give the prepared optimizer the AB attributes, keeping its identity (Accelerate's
    ``_optimizers`` list and the LR scheduler wrappers refer to this very object).

    A patch of this one object's class (a subclass that adds read-only properties): Accelerate
    has no extension point for its optimizer wrapper, and a new wrapper object would not be
    the one its scheduler and ``save_state`` hold."""
    cls = type(prepared_opt)
    if issubclass(cls, ABOptimizerView):
        return
    view = _VIEW_CLASSES.get(cls)
    if view is None:
        view = type(f"AB{cls.__name__}", (ABOptimizerView, cls), {"__module__": __name__})
        _VIEW_CLASSES[cls] = view
    prepared_opt.__class__ = view


# ---------------------------------------------------------------------------------- accelerator
def _register(accelerator: Any, model: nn.Module, prepared_opt: Any, ab: ABOptimizer) -> None:
    """Clipping that reduces first, and save/load hooks for the per-group shards (DDP or a
    single process; under DeepSpeed, ab_accel.deepspeed.attach does both on the engine)."""
    raw_model = accelerator.unwrap_model(model)
    registered: list[ABOptimizer] = accelerator.__dict__.setdefault("_ab_optimizers", [])
    registered.append(ab)
    _wrap_clipping(accelerator)

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        save_checkpoint(os.path.join(output_dir, CHECKPOINT_DIR), model, ab)

    def load_hook(models: list[Any], input_dir: str) -> None:
        folder = os.path.join(input_dir, CHECKPOINT_DIR)
        if not is_complete(folder):
            warnings.warn(
                f"{input_dir!r} holds no AB-training shards ({CHECKPOINT_DIR}/{META}): every "
                f"rank loads the main process's model and optimizer state, and the AB step "
                f"count restarts from the optimizer file's.", stacklevel=3)
            return
        # Accelerate would load the main process's model file into every rank next (its
        # list holds the model as it was before the DDP wrapping).
        models[:] = [m for m in models if m is not model and m is not raw_model]
        load_checkpoint(folder, model, ab)
        prepared_opt.__dict__["_ab_skip_next_load"] = True

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _wrap_clipping(accelerator: Any) -> None:
    """Make this accelerator's clip_grad_norm_ / clip_grad_value_ clip REDUCED gradients.

    A patch, on this accelerator only: Accelerate clips whatever gradients the parameters hold,
    and it has no hook before clipping, while the AB reduction runs in the optimizer (under DDP
    the gradients are reduced by the end of backward, which is what its users expect)."""
    if accelerator.__dict__.get("_ab_clip_wrapped"):
        return
    accelerator.__dict__["_ab_clip_wrapped"] = True

    def reduce_first(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            parameters = list(parameters)  # often a generator: read it once, pass it on
            # Only on an accumulation boundary: inside an accumulation window nothing may be
            # reduced (the step at the boundary reduces the accumulated sum once).
            if accelerator.sync_gradients:
                ids = {id(p) for p in parameters}
                for ab in accelerator.__dict__.get("_ab_optimizers", []):
                    if any(id(p) in ids for p in ab.trained_params()):
                        ab.synchronize()
            return method(parameters, *args, **kwargs)
        return wrapper

    accelerator.clip_grad_norm_ = reduce_first(accelerator.clip_grad_norm_)
    accelerator.clip_grad_value_ = reduce_first(accelerator.clip_grad_value_)


def check_launch(environ: Any = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1): Accelerate's simple
    launcher starts ONE process then, with MASTER_ADDR/MASTER_PORT set for the N wanted but no
    WORLD_SIZE (a real multi-process launcher sets WORLD_SIZE, mpirun its own size variable).
    :func:`prepare` calls it; a script may call it first thing, before any work."""
    env = os.environ if environ is None else environ
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and not any(v in env for v in sizes):
        raise ABConfigError(
            "accelerate launch --cpu with --num_processes > 1 starts ONE process (accelerate's "
            "simple launcher), not the number asked for. For N CPU processes run `accelerate "
            "launch --multi_gpu --num_processes N ...` with ACCELERATE_USE_CPU=true (or "
            "Accelerator(cpu=True) in the script), e.g. `accelerate launch --config_file "
            "configs/accelerate_cpu.yaml`.")


# ---------------------------------------------------------------------------------- the end
def save_merged(accelerator: Any, model: Any, optimizer: Any = None,
                output_dir: str | os.PathLike | None = None, *, processor: Any = None
                ) -> dict[str, Any]:
    """The end of an Accelerate run in one call: the model back as plain dense layers, saved.

    With the optimizer :func:`prepare` returned (None or a plain one: AB-training was off),
    :meth:`ABOptimizer.finalize` reconciles the groups if the run stopped inside an AB phase
    (one sync, metered); then :func:`ab_accel.merge` turns every AB layer of the unwrapped
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
                             "final_sync": bool(opt and opt.finalize())}
    if opt is not None:
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


# ---------------------------------------------------------------------------------- checkpoints
def save_state(accelerator: Any, directory: str | os.PathLike, meta: Any = None) -> str:
    """``accelerator.save_state(directory)``, atomically: a folder named ``directory`` is whole.

    Everything is written into ``<directory>.tmp`` (the AB shards in ``ab_training/`` by the
    save-state hook :func:`prepare` registered), then the main process lists every file with
    its size in ``ab_state.json``, with ``meta`` (anything JSON can hold, e.g. the run's
    settings), and renames the folder. :func:`ab_accel.latest_checkpoint` picks the newest such
    folder and passes over a save that died half-way. Collective: every process calls it.
    Works with AB-training off too. Returns the folder.
    """
    final = os.path.normpath(os.fspath(directory))
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        with open(os.path.join(tmp, STATE_MANIFEST), "w") as fh:
            json.dump({"world_size": accelerator.num_processes, "files": files, "meta": meta},
                      fh, indent=1, default=str)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def check_state(accelerator: Any, directory: str | os.PathLike) -> Any:
    """Check a folder :func:`save_state` wrote, before anything is loaded from it.

    Every process checks the manifest (every file present, of its recorded size) and the
    processes agree: a missing or truncated file is one :class:`~ab_accel.CheckpointError`
    naming it, on every process. (The AB shards are checked again against their checksums by
    the load-state hook.) Returns the ``meta`` given to :func:`save_state`.
    """
    from accelerate.utils import gather_object

    directory = os.fspath(directory)
    problem, saved = None, None
    manifest = os.path.join(directory, STATE_MANIFEST)
    if not os.path.isfile(manifest):
        problem = (f"{directory!r} is not a complete checkpoint (no {STATE_MANIFEST}: "
                   f"ab_accel.accelerate.save_state writes it last): resume from another one.")
    else:
        with open(manifest) as fh:
            saved = json.load(fh)
        problem = check_files(directory, saved["files"])
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    return saved["meta"]


def load_state(accelerator: Any, directory: str | os.PathLike) -> Any:
    """:func:`check_state`, then ``accelerator.load_state(directory)``; returns the ``meta``."""
    meta = check_state(accelerator, directory)
    accelerator.load_state(directory)
    return meta


__all__ = ["prepare", "ab_optimizer", "ABOptimizerView", "CHECKPOINT_DIR", "check_launch",
           "save_merged", "save_state", "check_state", "load_state"]
