"""Every change ab_accel makes to an object of a framework it does not own, in one place.

AB-training reduces gradients itself (inside a group during an AB phase), so it must take the
gradient all-reduce, the clipping and the checkpoint files away from DDP, Accelerate, DeepSpeed
and the Trainer. Where a framework offers a public extension point the integrations use it
(Accelerate's save/load-state pre-hooks, DDP's ``no_sync`` switch, the Trainer's callbacks);
the patches below are the rest. Each says what it changes, why no public point serves, and is
guarded: :func:`require` refuses, naming the installed version, when the framework no longer
has what the patch replaces (a patch that silently stopped applying would let DDP or DeepSpeed
all-reduce over the world in an AB phase, undoing the groups).

==================================  ===========  ===============================================
patch                               framework    what
==================================  ===========  ===============================================
:func:`ddp_ignore_factorized`       torch DDP    private ``_set_params_and_buffers_to_ignore_for
                                                 _model``: the AB weights stay out of the reducer
:func:`ddp_stop_reducing`           torch DDP    ``require_backward_grad_sync`` (``no_sync``'s
                                                 switch) off for good, no buffer broadcast
:func:`swap_inner_optimizer`        Accelerate,  the wrapper's ``.optimizer`` (and DeepSpeed's
                                    DeepSpeed    ``basic_optimizer``) becomes the ABOptimizer
:func:`add_view_class`              Accelerate   class swap of the one AcceleratedOptimizer:
                                                 the AB attributes (``phase``, ``role``, ...)
:func:`skip_next_optimizer_load`    Accelerate   one ``load_state_dict`` of that object skipped
:func:`clip_reduces_first`          Accelerate   instance overrides of ``clip_grad_norm_`` /
                                                 ``clip_grad_value_``: reduce, then clip
:func:`deepspeed_engine_methods`    DeepSpeed    ``MethodType`` on one engine: ``allreduce_
                                                 gradients``, ``clip_fp32_gradients``, ``save_
                                                 checkpoint``, ``load_checkpoint``
:func:`set_deepspeed_grad_norm`     DeepSpeed    private ``_global_grad_norm`` (what the engine
                                                 reports after its own clip)
:func:`prepare_then`                Trainer      instance override of its accelerator's
                                                 ``prepare``: bind between prepare and resume
:data:`TRAINER_OVERRIDES`           Trainer      private methods ``ABTrainer`` overrides
==================================  ===========  ===============================================
"""

from __future__ import annotations

import functools
import importlib.metadata
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .support import UnsupportedSetupError

#: The framework versions these patches were written against (the project's lock file).
TESTED = {"torch": "2.x", "accelerate": "1.x", "deepspeed": "0.x", "transformers": "4.x-5.x"}

#: The private ``transformers.Trainer`` methods :class:`ab_accel.trainer.ABTrainer` overrides
#: (a subclass has no public hook for them), and why.
TRAINER_OVERRIDES = {
    "_clip_grad_norm": "clip the REDUCED gradients of what this rank trains",
    "_get_grad_norm": "report the norm of the reduced gradients, as under DDP",
    "_save_checkpoint": "write the groups' shards before the Trainer's own files",
    "_load_from_checkpoint": "keep the main process's model file off every group's model",
    "_load_optimizer_and_scheduler": "load this rank's own group shard",
}


def _version(framework: str) -> str:
    try:
        return importlib.metadata.version(framework)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def require(obj: Any, attr: str, framework: str, why: str) -> None:
    """The version guard of a patch: refuse when ``obj`` lacks ``attr`` (the framework changed
    what the patch replaces), naming the installed version and the tested range."""
    if not hasattr(obj, attr):
        owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise UnsupportedSetupError(
            f"{framework} {_version(framework)} has no {owner}.{attr}, which "
            f"ab_accel patches to {why}; ab_accel was made for {framework} "
            f"{TESTED[framework]}. Install a {framework} version of that range (see "
            f"requirements/lock.txt), or train without AB-training.")


# ---------------------------------------------------------------------------------- DDP
def ddp_ignore_factorized(model: nn.Module, names: list[str]) -> None:
    """Keep ``names`` (the AB layers' weights) out of DDP's reducer, before wrapping: DDP reads
    the private list at construction and has no public argument for it."""
    ddp = nn.parallel.DistributedDataParallel
    require(ddp, "_set_params_and_buffers_to_ignore_for_model", "torch",
            "keep the AB layers' weights out of DDP's reducer")
    ddp._set_params_and_buffers_to_ignore_for_model(model, names)


def ddp_stop_reducing(ddp: nn.parallel.DistributedDataParallel) -> None:
    """No gradient all-reduce and no buffer broadcast from DDP, for the rest of the run.

    ``require_backward_grad_sync = False`` is what ``ddp.no_sync()`` sets (and restores to the
    value it found, so ``accelerator.accumulate`` keeps it off); with it off DDP never sets
    ``require_forward_param_sync``, the switch of its buffer broadcast. DDP has no public way
    to stay in ``no_sync`` for good."""
    for attr in ("require_backward_grad_sync", "require_forward_param_sync"):
        require(ddp, attr, "torch", "hand gradient reduction to AB-training")
    ddp.require_backward_grad_sync = False
    ddp.require_forward_param_sync = False
    ddp.broadcast_buffers = False


# ---------------------------------------------------------------------------------- Accelerate
def swap_inner_optimizer(wrapper: Any, ab: Any, framework: str = "accelerate") -> None:
    """Make the ABOptimizer the optimizer inside a framework's wrapper (Accelerate's
    ``AcceleratedOptimizer``, a DeepSpeed engine, whose ``basic_optimizer`` follows): the
    wrapper was built around the torch optimizer (its state moved to the device, its LR
    scheduler bound), and it has no setter."""
    require(wrapper, "optimizer", framework, "put the ABOptimizer inside the wrapper")
    if getattr(wrapper, "basic_optimizer", None) is ab.optimizer:  # DeepSpeed's engine
        wrapper.basic_optimizer = ab
    if wrapper.optimizer is ab.optimizer:
        wrapper.optimizer = ab


_VIEW_CLASSES: dict[tuple[type, type], type] = {}


def add_view_class(obj: Any, view: type) -> None:
    """Give ``obj`` the attributes of the mixin ``view``, keeping its identity: its class
    becomes a subclass of ``view`` and its own class. Accelerate has no extension point for its
    optimizer wrapper, and a new wrapper object would not be the one its LR scheduler and
    ``save_state`` hold."""
    cls = type(obj)
    if issubclass(cls, view):
        return
    sub = _VIEW_CLASSES.get((cls, view))
    if sub is None:
        sub = type(f"AB{cls.__name__}", (view, cls), {"__module__": view.__module__})
        _VIEW_CLASSES[(cls, view)] = sub
    obj.__class__ = sub


def skip_next_optimizer_load(obj: Any) -> None:
    """Make ``obj.load_state_dict`` (of a :func:`add_view_class` view that honours it) skip its
    next call: ``accelerator.load_state`` loads the MAIN process's optimizer file into every
    rank right after its pre-hooks ran, and no hook can stop that one load."""
    obj.__dict__["_ab_skip_next_load"] = True


def take_skip_next_load(obj: Any) -> bool:
    """Whether :func:`skip_next_optimizer_load` asked to skip this load (and forget it)."""
    return bool(obj.__dict__.pop("_ab_skip_next_load", False))


def clip_reduces_first(accelerator: Any, reduce: Callable[[list[Any]], None]) -> None:
    """Make this accelerator's ``clip_grad_norm_`` / ``clip_grad_value_`` call ``reduce`` with
    the parameters (as a list) before they clip, on an accumulation boundary only (inside an
    accumulation window nothing may be reduced). Accelerate clips whatever gradients the
    parameters hold and has no hook before clipping, while the AB reduction runs in the
    optimizer. On this accelerator only; once."""
    if accelerator.__dict__.get("_ab_clip_wrapped"):
        return
    for attr in ("clip_grad_norm_", "clip_grad_value_", "sync_gradients"):
        require(accelerator, attr, "accelerate", "clip the reduced gradients")
    accelerator.__dict__["_ab_clip_wrapped"] = True

    def reduce_first(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            parameters = list(parameters)  # often a generator: read it once, pass it on
            if accelerator.sync_gradients:
                reduce(parameters)
            return method(parameters, *args, **kwargs)
        return wrapper

    accelerator.clip_grad_norm_ = reduce_first(accelerator.clip_grad_norm_)
    accelerator.clip_grad_value_ = reduce_first(accelerator.clip_grad_value_)


# ---------------------------------------------------------------------------------- DeepSpeed
_ENGINE_METHODS = ("allreduce_gradients", "clip_fp32_gradients", "save_checkpoint",
                   "load_checkpoint", "_take_model_step", "backward", "_get_zero_ckpt_name",
                   "_get_all_zero_checkpoint_names")


def deepspeed_engine_methods(engine: Any, ab: Any, **methods: Callable[..., Any]) -> None:
    """Give this engine ``engine.ab_optimizer`` (what the replacements call) and replace, on
    this engine only (``types.MethodType``), the methods named (of
    ``allreduce_gradients``, ``clip_fp32_gradients``, ``save_checkpoint``,
    ``load_checkpoint``; under ZeRO ``_take_model_step``, ``backward`` and the ZeRO file names
    ``_get_zero_ckpt_name`` / ``_get_all_zero_checkpoint_names``); the originals stay reachable
    as ``engine._ab_original_<name>``. DeepSpeed has no public hook for its gradient all-reduce
    (``engine.backward`` calls ``allreduce_gradients`` directly), its fp32 clipping, the end of
    its optimizer step or its checkpoint files, and AB-training must replace the first two and
    extend the others."""
    engine.ab_optimizer = ab
    for name, fn in methods.items():
        if name not in _ENGINE_METHODS:
            raise ValueError(f"not a patched DeepSpeed engine method: {name}")
        require(engine, name, "deepspeed", "run the AB reduction and keep the groups' shards")
        setattr(engine, f"_ab_original_{name}", getattr(engine, name))
        setattr(engine, name, types.MethodType(fn, engine))


#: What ab_accel.zero reads and rebuilds of DeepSpeed's engine and ZeRO 1/2 optimizer: the
#: engine builds a ZeRO optimizer over ``seq_data_parallel_group`` (swapped to the step's scope
#: for the call) and names its parameters from ``param_names``; the ZeRO optimizer's flat groups
#: and fp32 partitions, its state linking, its overflow check and its teardown.
ZERO_ENGINE = ("_configure_zero_optimizer", "seq_data_parallel_group", "param_names",
               "basic_optimizer")
ZERO_OPTIMIZER = ("bit16_groups", "single_partition_of_fp32_groups",
                  "_lazy_init_hp_params_optimizer_state", "has_overflow_partitioned_grads_serial",
                  "has_overflow", "check_grad_overflow", "update_lp_params", "destroy",
                  "dp_process_group")


def require_zero_internals(engine: Any) -> None:
    """The version guard of :mod:`ab_accel.zero`: every attribute it uses, on this engine and
    its ZeRO optimizer."""
    why = "rebuild ZeRO over each AB phase's scope"
    for attr in ZERO_ENGINE:
        require(engine, attr, "deepspeed", why)
    for attr in ZERO_OPTIMIZER:
        require(engine.optimizer, attr, "deepspeed", why)


def zero_optimizer_methods(zero: Any, ab: Any, has_overflow: Callable[..., bool],
                           around_step: Callable[[Callable[[], Any]], Any]) -> None:
    """A (re)built ZeRO optimizer for AB-training: ``zero.ab_optimizer`` (what
    :func:`ab_accel.attach.ab_optimizer` finds), the overflow check always on and decided by
    ``has_overflow`` (over the world, not ZeRO's dp group), and its ``step`` run inside
    ``around_step`` (the LR rebound). DeepSpeed has no hook for either decision."""
    zero.ab_optimizer = ab
    zero.check_grad_overflow = True
    zero.has_overflow = types.MethodType(has_overflow, zero)
    inner_step = zero.step

    def step(*args: Any, **kwargs: Any) -> Any:
        return around_step(lambda: inner_step(*args, **kwargs))

    zero.step = step


def wrap_deepspeed_collectives(names: list[str], wrap: Callable[[str, Any], Any]) -> None:
    """Replace each of deepspeed.comm's collectives ``names`` by ``wrap(name, original)``, once
    per process (the traffic meter of :mod:`ab_accel.ds_meter`). DeepSpeed's ZeRO code calls
    them as attributes of ``deepspeed.comm``; it has no hook on what it sends."""
    import deepspeed.comm as ds_comm

    for name in names:
        fn = getattr(ds_comm, name, None)
        if fn is not None and not getattr(fn, "_ab_wrapped", False):
            wrapped = wrap(name, fn)
            wrapped._ab_wrapped = True
            setattr(ds_comm, name, wrapped)


def set_deepspeed_grad_norm(engine: Any, norm: Any) -> None:
    """What ``engine.get_global_grad_norm()`` reports after a step: DeepSpeed's own clip sets
    the private ``_global_grad_norm``, which the AB clip replaces."""
    engine._global_grad_norm = norm


# ---------------------------------------------------------------------------------- Trainer
def prepare_then(trainer: Any, after: Callable[[tuple[Any, ...]], None]) -> None:
    """Make ``trainer.accelerator.prepare`` call ``after`` with what it prepared: the Trainer
    has no public hook between its ``accelerator.prepare`` (which makes the DDP wrapper) and
    its checkpoint loading, and AB-training must bind to the prepared model and optimizer in
    between. On this trainer's accelerator only."""
    # The overrides are ABTrainer's own methods: the guard checks that transformers' Trainer
    # still has each (a method it no longer calls would silently stop applying).
    base = next((k for k in type(trainer).__mro__ if k.__module__.startswith("transformers")),
                None)
    for name, why in TRAINER_OVERRIDES.items():
        require(base, name, "transformers", why)
    prepare = trainer.accelerator.prepare

    def prepare_with_ab(*objects: Any, **kwargs: Any) -> Any:
        out = prepare(*objects, **kwargs)
        after(out if isinstance(out, tuple) else (out,))
        return out

    trainer.accelerator.prepare = prepare_with_ab


__all__ = ["TESTED", "TRAINER_OVERRIDES", "require", "ddp_ignore_factorized",
           "ddp_stop_reducing", "swap_inner_optimizer", "add_view_class",
           "skip_next_optimizer_load", "take_skip_next_load", "clip_reduces_first",
           "deepspeed_engine_methods", "set_deepspeed_grad_norm", "prepare_then",
           "ZERO_ENGINE", "ZERO_OPTIMIZER", "require_zero_internals", "zero_optimizer_methods",
           "wrap_deepspeed_collectives"]
