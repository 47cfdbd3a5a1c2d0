"""ZeRO stage 1 and 2 under AB-training: DeepSpeed's ZeRO optimizer reduces, clips and steps,
over the step's SCOPE (the world in warm-up and rebound, the own group in an AB phase).

DeepSpeed's ``DeepSpeedZeroOptimizer`` (runtime/zero/stage_1_and_2.py) partitions the optimizer
state (stage 2: the gradients too) over ONE process group, and reduces gradients, computes the
clip norm and all-gathers the updated parameters in it. Its flat buffers are built once, for the
parameters that are trainable then. So :class:`ZeroScope` REBUILDS it at every phase switch,
over the parameters trained next and the next scope: ranks holding different factors never
share a partition. In between, DeepSpeed runs unchanged.

What a switch does (:meth:`ZeroScope.begin_switch`, the AB switch, :meth:`ZeroScope.end_switch`):

1. read every trained parameter's fp32 master, and the optimizer state of the dense ones (the
   AB layers' tensors are re-created by the switch; DeepSpeed's ``safe_get_full_*``, collectives
   inside the old scope, metered as "sync"), destroy the old ZeRO optimizer, and
   put the module in fp32 with the masters' values (a bf16 run's switch computes in fp32: the
   SVD and ``W <- A B`` never see bf16 rounding of the trained tensors);
2. the AB switch itself (sync, factorization) on the fp32 module, exactly as without ZeRO; the
   kept parameters' optimizer state is averaged over the world at a sync (it diverged per group);
3. cast the module back (bf16 under ``"bf16"``), rebuild the ZeRO optimizer around the SAME
   torch optimizer (its param groups refilled, the current learning rates kept, so schedulers
   keep working), write the fp32 masters and the kept parameters' state into the new partitions.

ZeRO keeps one Adam step counter per param group (a flat partition): a tensor re-created at a
switch (W, A, B) starts with zero moments and its group's counter; the LR rebound that follows
every switch ramps the learning rate from ~0, which covers the restart (without ZeRO its counter
restarts at 0 with its moments; under ZeRO only the bias correction of its first steps differs).

The overflow (non-finite) decision is made over the WORLD (one 8-byte flag per step, metered as
"check"), so every rank skips the same steps; ZeRO's own flag covers its dp group only. Every
collective DeepSpeed makes in the engine's ``backward`` and optimizer step is counted by
:mod:`ab_accel.ds_meter`, labelled with the step's phase ("sync" inside a switch), in the dtype
DeepSpeed sends (``communication_data_type``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import torch
from torch import nn

from . import ds_meter, patches
from .layers import ABLayer
from .vocab import Phase, TrafficLabel

#: The ZeRO stages AB-training runs with (3 partitions the parameters themselves: refused).
STAGES = (1, 2)
#: Sub-folder of a DeepSpeed checkpoint tag with the ZeRO files of every scope (one folder per
#: AB group mid-AB-phase: DeepSpeed names its files by the rank in the dp group, which collide).
ZERO_DIR = "ab_training_zero"


# ------------------------------------------------------------------------------ empty groups
#: Name prefix of the placeholders of :func:`fill_empty_groups`.
PLACEHOLDER = "ab_training_placeholder"


def fill_empty_groups(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[nn.Parameter]:
    """Give every param group of ``optimizer`` with nothing to train one 1-element placeholder
    parameter; returns those made.

    DeepSpeed's ZeRO optimizer cannot be built over a group without a trainable parameter (an
    IndexError inside it), and the group count must stay (torch's LR schedulers zip their
    per-group values with the groups, strictly). ``freeze_untargeted`` empties the no-decay
    group of a usual (decay, no-decay) split. The placeholder never gets a gradient, so it
    stays 0; it is registered on ``module`` only until :meth:`ZeroScope.adopt` (DeepSpeed names
    the parameters it partitions after the module's), so no export or state dict ever holds it.
    """
    made = []
    first = next(iter(module.parameters()), None)
    for i, group in enumerate(optimizer.param_groups):
        if any(p.requires_grad for p in group["params"]):
            continue
        like = group["params"][0] if group["params"] else first
        p = nn.Parameter(torch.zeros(1, dtype=like.dtype if like is not None else None,
                                     device=like.device if like is not None else None))
        p._ab_placeholder = f"{PLACEHOLDER}_{i}"  # type: ignore[attr-defined]
        group["params"].append(p)
        module.register_parameter(p._ab_placeholder, p)
        made.append(p)
    return made


# ------------------------------------------------------------------------------ the scope
def _relink(zero: Any) -> None:
    """DeepSpeed links the parameters to Adam's state lazily, after the FIRST group's state
    exists; groups whose state appeared later stay unlinked. Link them all again."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _is_moment(value: Any) -> bool:
    """A per-element entry of an optimizer's state (Adam's moments), not a counter (``step``)."""
    return torch.is_tensor(value) and value.dim() > 0


class ZeroScope:
    """One engine's ZeRO optimizer, rebuilt over the step's scope at every AB switch.

    Made by :func:`ab_accel.engine.attach` for an engine with ZeRO stage 1 or 2; the
    :class:`~ab_accel.ABOptimizer` calls :meth:`begin_switch` / :meth:`end_switch` around its
    switches and :meth:`stepped` after DeepSpeed's optimizer step.
    """

    def __init__(self, engine: Any, ab: Any) -> None:
        from deepspeed import utils as ds_utils  # the documented access to ZeRO's fp32 state

        patches.require_zero_internals(engine)
        self.engine, self.ab, self.ds = engine, ab, ds_utils
        self.basic: torch.optim.Optimizer = engine.basic_optimizer
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.switching = False
        #: Whether this rank's own gradients were non-finite in the last overflow check.
        self.local_overflow = False
        #: Wall seconds spent rebuilding DeepSpeed's optimizer, and how many rebuilds ran.
        self.rebuild_seconds = 0.0
        self.rebuilds = 0
        #: Wrappers whose ``.optimizer`` must be the current ZeRO optimizer (Accelerate's
        #: DeepSpeedOptimizerWrapper reads its ``overflow``): see :meth:`follow`.
        self.followers: list[Any] = []
        #: The placeholders of :func:`fill_empty_groups`, by their names.
        self.placeholders: dict[nn.Parameter, str] = {}

    # -------------------------------------------------------------- the meter's label
    def label(self) -> str:
        return str(TrafficLabel.SYNC) if self.switching else str(self.ab.phase)

    @property
    def traffic(self) -> Any:
        return self.ab.traffic

    # -------------------------------------------------------------- attach
    def adopt(self) -> None:
        """At attach: give the torch optimizer back its parameter lists (ZeRO replaced them by
        its flat partitions), destroy DeepSpeed's first ZeRO optimizer and leave the module in
        fp32 for the binding (which may factorize at step 0). :meth:`end_switch` builds it
        again for the first step's scope."""
        ds_meter.install()
        zero = self.engine.optimizer
        for group, params in zip(self.basic.param_groups, zero.bit16_groups, strict=True):
            group["params"] = list(params)
            for p in params:
                if hasattr(p, "_ab_placeholder"):
                    self.placeholders[p] = p._ab_placeholder
        for name in self.placeholders.values():  # out of the module: nothing exports them
            self.engine.module._parameters.pop(name, None)
        self._drop(zero)
        self.basic.state.clear()
        self._to_fp32({})
        self.switching = True

    def metered(self) -> contextlib.AbstractContextManager[None]:
        """Meter DeepSpeed's collectives while the engine runs a call of its own (backward,
        the optimizer step and its switches): another engine's traffic is never counted."""
        return ds_meter.metered(self)

    def follow(self, wrapper: Any) -> None:
        """Keep ``wrapper.optimizer`` on the current ZeRO optimizer, now and after every
        rebuild (a framework's wrapper built around the engine's first one)."""
        self.followers.append(wrapper)
        wrapper.optimizer = self.engine.optimizer

    # -------------------------------------------------------------- a switch
    def begin_switch(self, carry: bool = True) -> None:
        """Before an AB switch: masters and (``carry``) optimizer state out of the old ZeRO
        optimizer, which is destroyed; the module in fp32 with the masters' values; the torch
        optimizer holds the module's parameters, and per-parameter state the switch can
        average (:func:`ab_accel.switches.dense_state`)."""
        start = time.perf_counter()
        self.switching = True
        zero = self.engine.optimizer
        _relink(zero)
        masters: dict[int, torch.Tensor] = {}
        carried: dict[torch.nn.Parameter, dict[str, Any]] = {}
        # Only the dense parameters keep their state through a switch: every AB layer's tensor
        # (W, A, B) is re-created by it and starts fresh (reading its moments would be traffic
        # for nothing).
        kept = {id(p) for p in self.ab._comm_set.dense} if carry else set()
        for i, params in enumerate(zero.bit16_groups):
            part = zero.single_partition_of_fp32_groups[i]
            state = self.basic.state.get(part, {})
            keys = sorted(k for k, v in state.items() if _is_moment(v))
            counters = {k: v.clone() if torch.is_tensor(v) else v
                        for k, v in state.items() if k not in keys}
            for p in params:
                masters[id(p)] = self.ds.safe_get_full_fp32_param(p).clone()
                if id(p) in kept and keys:
                    carried[p] = dict(counters, **{
                        k: self.ds.safe_get_full_optimizer_state(p, k).clone() for k in keys})
        self._drop(zero)
        self.basic.state.clear()
        self.ab._refresh()  # the torch optimizer's groups: the module's tensors again
        self.basic.state.update(carried)
        self._to_fp32(masters)
        self.rebuild_seconds += time.perf_counter() - start

    def end_switch(self) -> None:
        """After an AB switch: the module back in its training dtype, a new ZeRO optimizer over
        the trained parameters and the next step's scope, its masters and the kept state set."""
        start = time.perf_counter()
        module, basic, engine = self.engine.module, self.basic, self.engine
        masters = {id(p): p.data for p in [*module.parameters(), *self.placeholders]}
        carried = {id(p): st for p, st in basic.state.items()}
        basic.state.clear()
        self._to_dtype(module)
        group, _ = self.ab._scope()
        engine.param_names = {p: n for n, p in module.named_parameters()}
        engine.param_names.update(self.placeholders)
        keep = engine.seq_data_parallel_group
        engine.seq_data_parallel_group = group
        try:
            zero = engine._configure_zero_optimizer(basic)
        finally:
            engine.seq_data_parallel_group = keep
        engine.optimizer = zero
        self._wrap(zero)
        for wrapper in self.followers:
            wrapper.optimizer = zero
        if self.dtype != torch.float32:  # ZeRO built its masters from the bf16 copy
            for params in zero.bit16_groups:
                for p in params:
                    self.ds.safe_set_full_fp32_param(p, masters[id(p)])
        self._set_state(zero, carried)
        self.switching = False
        self.rebuilds += 1
        self.rebuild_seconds += time.perf_counter() - start

    def _set_state(self, zero: Any, carried: dict[int, dict[str, Any]]) -> None:
        """The kept parameters' optimizer state into the new partitions: a group with any kept
        parameter gets their counters (``step``) and zero moments for its new tensors."""
        for i, params in enumerate(zero.bit16_groups):
            kept = [carried[id(p)] for p in params if id(p) in carried]
            if not kept:
                continue  # all new: the torch optimizer creates fresh state at its first step
            part = zero.single_partition_of_fp32_groups[i]
            self.basic.state[part] = {
                key: torch.zeros_like(part) if _is_moment(value) else (
                    value.clone() if torch.is_tensor(value) else value)
                for key, value in kept[0].items()}
        _relink(zero)
        for params in zero.bit16_groups:
            for p in params:
                for key, value in carried.get(id(p), {}).items():
                    if _is_moment(value):
                        self.ds.safe_set_full_optimizer_state(p, value, key)

    # -------------------------------------------------------------- helpers
    def _drop(self, zero: Any) -> None:
        """Destroy a ZeRO optimizer and everything that would keep its buffers alive."""
        zero.destroy()
        for params in zero.bit16_groups:
            for p in params:
                p.__dict__.pop("_zero_optimizer", None)  # set under CPU offload
        self.engine.optimizer = None

    def _to_fp32(self, masters: dict[int, torch.Tensor]) -> None:
        """Every parameter as an fp32 tensor of its own (the masters' values where given): out
        of the destroyed optimizer's flat buffer, and exact for the switch's arithmetic."""
        for p in [*self.engine.module.parameters(), *self.placeholders]:
            value = masters.get(id(p))
            p.data = value.to(p.device) if value is not None else p.data.float().clone()
        for layer in self._layers():
            if layer.residual is not None and layer.residual_dtype is None:
                layer.residual = layer.residual.float()

    def _to_dtype(self, module: nn.Module) -> None:
        if self.dtype == torch.float32:
            return
        for p in [*module.parameters(), *self.placeholders]:
            p.data = p.data.to(self.dtype)
        for layer in self._layers():
            if layer.residual is not None and layer.residual_dtype is None:
                layer.residual = layer.residual.to(self.dtype)

    def _layers(self) -> list[ABLayer]:
        return [m for m in self.engine.module.modules() if isinstance(m, ABLayer)]

    def _wrap(self, zero: Any) -> None:
        """The new ZeRO optimizer: the overflow flag over the world, the LR rebound."""
        patches.zero_optimizer_methods(zero, self.ab,
                                       functools.partial(_world_has_overflow, self),
                                       self.ab._with_rebound)

    # -------------------------------------------------------------- the step
    def stepped(self) -> None:
        """After DeepSpeed's optimizer step: count it (skipped or not), run the switches."""
        self.ab._external_step(skipped=bool(getattr(self.engine.optimizer, "overflow", False)),
                               local_bad=self.local_overflow)

    def mean_buffers(self) -> None:
        """The float buffers (BatchNorm statistics) averaged over the step's scope, as every
        AB step does (DeepSpeed averages gradients only)."""
        buffers = self.ab._comm_set.buffers
        group, ranks = self.ab._scope()
        if buffers and len(ranks) > 1:
            self.ab.comm.mean_(buffers, group, ranks, self.ab.phase)

    # -------------------------------------------------------------- checkpoints
    def scope_dir(self, path: str, tag: Any) -> str:
        """This rank's scope's folder for DeepSpeed's ZeRO files inside a checkpoint tag."""
        groups = self.ab.groups
        name = f"group{groups.group_index}" if self.ab.phase == Phase.AB else "world"
        return os.path.join(path, str(tag), ZERO_DIR, name)

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state partitions and fp32 masters now."""
        zero = self.engine.optimizer
        total = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
        for part in zero.single_partition_of_fp32_groups:
            for value in self.basic.state.get(part, {}).values():
                if torch.is_tensor(value):
                    total += value.numel() * value.element_size()
        return total


def _world_has_overflow(scope: ZeroScope, zero: Any, partition_gradients: bool = True) -> bool:
    """ZeRO's ``has_overflow``, decided over the WORLD: one flag, max-reduced."""
    if zero.cpu_offload:
        local = bool(zero.local_overflow)
    else:
        local = bool(zero.has_overflow_partitioned_grads_serial())
    scope.local_overflow = local
    ab = scope.ab
    return ab.comm.max_int([int(local)], ab.groups.world, ab.groups.world_ranks,
                           TrafficLabel.CHECK)[0] > 0


__all__ = ["ZeroScope", "fill_empty_groups", "STAGES", "ZERO_DIR"]
