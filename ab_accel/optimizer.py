"""ABOptimizer: wraps any torch optimizer and runs AB-training around its ``step()``.

It owns gradient reduction (so do not let DDP reduce as well: use ``ab_accel.prepare`` with
Accelerate, ``ab_accel.deepspeed.initialize`` with DeepSpeed, or no DDP at all) and the phase
switches of arXiv 2405.01067:

==========  ==================================================================================
warm-up     gradients of every trained parameter and the float buffers averaged over the world
AB phase    an A-group rank trains A (B frozen), a B-group rank trains B; gradients of the
            trained factor and of every dense parameter, and the buffers, averaged INSIDE THE
            GROUP only
sync        the groups are reconciled (``sync_mode``), dense parameters, buffers and the dense
            parameters' optimizer state averaged over the world, then W <- A B
rebound     plain data parallel over the world on W
factorize   SVD of every W, truncated at ``rank_cutoff``; ranks agreed with a MAX
==========  ==================================================================================

A switch runs at the end of ``step()``: ``phase`` and ``role`` describe the NEXT step. Tensors
re-created at a switch (W, A, B) start with fresh optimizer state; the LR rebound (the learning
rate ramps from ~0 back to the scheduled value over ``lr_rebound_steps`` steps after each
switch) makes that safe. The reference code padded or truncated stale Adam moments instead.

Clip gradients AFTER they are reduced: call :meth:`ABOptimizer.synchronize` (or use
:meth:`ABOptimizer.clip_grad_norm_`) before clipping; ``step()`` then does not reduce again.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import Communicator, TrafficMeter, nonfinite
from .config import ABConfig
from .groups import ABGroups, build_groups
from .layers import ABLayer
from .model import ab_layers, compression, why_nothing_to_factorize
from .reducer import OverlapReducer
from .schedule import ABSchedule
from .vocab import Event, LayerMode, Phase, Role, SyncMode, TrafficLabel

_SKIP_STATE_KEYS = ("step",)

logger = logging.getLogger("ab_accel")


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values; the message names the step, phase and ranks."""


@dataclass(frozen=True)
class Switch:
    """One phase switch the optimizer ran (``ABOptimizer.switches`` lists them in order).

    ``step`` is the boundary: the number of optimizer steps taken when it ran (it runs at the
    end of step ``step - 1``, so step ``step`` is the first to see the new structure).
    ``final`` marks the end-of-training sync of :meth:`ABOptimizer.finalize`. A factorization
    also records the agreed ``ranks`` and the model's ``compression`` right after it (the
    numbers of :func:`ab_accel.compression` without the per-layer table).
    """

    event: Event
    step: int
    seconds: float
    final: bool = False
    ranks: dict[str, int] | None = None
    compression: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (the event as its string)."""
        out = asdict(self)
        out["event"] = str(self.event)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Switch:
        return cls(**{**data, "event": Event(data["event"])})


class ABOptimizer(torch.optim.Optimizer):
    """AB-training around ``optimizer`` for ``model`` (converted with :func:`ab_accel.convert`).

    Args:
        optimizer: any torch optimizer over the model's parameters (AdamW in the paper).
        model: the converted model, or a DDP/Accelerate wrapper of it. ``None`` defers binding
            to :meth:`bind` (the integrations bind after ``accelerator.prepare``).
        config: the :class:`ABConfig` (or a dict). ``None`` uses the defaults.
        process_group: the data-parallel group AB-training runs over (None: the whole world).

    Binding broadcasts parameters and buffers from rank 0, as DDP does, and builds the groups
    (a collective: every rank must construct its ABOptimizer at the same point).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None,
                 config: ABConfig | dict[str, Any] | None = None, *,
                 process_group: Any = None) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called: param_groups, state and
        # defaults are the wrapped optimizer's own (see the properties below), so LR
        # schedulers built on either object drive the same learning rates.
        if isinstance(optimizer, ABOptimizer):
            raise TypeError("optimizer is already an ABOptimizer")
        self.optimizer = optimizer
        self.config = ABConfig() if config is None else ABConfig.from_dict(config)
        if self.config.enabled:
            self.schedule = ABSchedule.from_config(self.config)
        else:
            # Disabled: a warm-up that never ends, i.e. plain data parallel (still metered).
            self.schedule = ABSchedule(warmup_steps=2**62, sync_every=1, rebound_steps=0)
        self.traffic = TrafficMeter()
        self.comm = Communicator(self.traffic, where=lambda: f"step {self._step}")
        self.process_group = process_group
        self.groups: ABGroups | None = None
        self.model: nn.Module | None = None
        self._step = 0
        self._reduced = False
        self._layers: list[tuple[str, ABLayer]] = []
        self._slots: list[list[Any]] = []
        self._dense_params: list[nn.Parameter] = []
        self._buffers: list[torch.Tensor] = []
        self._dp_bytes = 0
        self._structure = -1
        self._finalized = False
        #: Every phase switch run so far, in order (kept in ``state_dict`` across a resume).
        self.switches: list[Switch] = []
        #: Steps skipped because some rank's reduced gradients were non-finite (in total, and
        #: in a row just now); see ``ABConfig.max_skipped_steps``.
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._skip = False
        self._nonfinite_ranks: list[int] = []
        self._no_sync = False
        #: When set (by the integrations), the overlapped reduction launches only while it is
        #: True: Accelerate's ``sync_gradients``, DeepSpeed's accumulation boundary.
        self.launch_predicate: Callable[[], bool] | None = None
        self._reducer: OverlapReducer | None = None
        self._tail_state: Any = None  # what rode in the reducer's last bucket (see _tail_of)
        # per scope (its ranks): modules none of whose grads arrived in its last step; learned
        # from the scope's reduced flags, so every rank of the scope holds the same set
        self._unused_layers: dict[tuple[int, ...], set[str]] = {}
        if self.config.comm_dtype is not None:
            self.comm.wire_dtype = {"bf16": torch.bfloat16,
                                    "fp16": torch.float16}[self.config.comm_dtype]
        #: Wall seconds spent in phase switches, by event ("factorize", "sync"), and in the SVDs.
        self.switch_seconds: dict[str, float] = defaultdict(float)
        self.svd_seconds = 0.0
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        if model is not None:
            self.bind(model)

    # ------------------------------------------------------------------ torch.optim surface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        if self.model is not None:
            self._slots.append(self._slots_for(self.optimizer.param_groups[-1]))

    def __repr__(self) -> str:
        return (f"ABOptimizer({type(self.optimizer).__name__}, phase={self.phase!r}, "
                f"role={self.role!r}, step={self._step})")

    # ------------------------------------------------------------------ where we are
    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (t in the paper's notation)."""
        return self._step

    @property
    def phase(self) -> Phase:
        """Phase of the NEXT step: "warmup", "ab" or "rebound"."""
        return self.schedule.phase(self._step)

    @property
    def role(self) -> Role | None:
        """"A" or "B" (or "AB" in a single process) during AB phases, None otherwise."""
        if self.phase != Phase.AB or self.groups is None:
            return None
        return self.groups.role

    @property
    def last_switch(self) -> Switch | None:
        """The most recent entry of :attr:`switches` (None before the first switch)."""
        return self.switches[-1] if self.switches else None

    @property
    def groups_differ(self) -> bool:
        """True when the groups hold different models now: the last step was an AB step of a
        world split into several groups, and no sync has run since (a run that stops here
        needs :meth:`finalize` before it evaluates or exports one model)."""
        if self.groups is None or self.groups.plan.num_groups < 2 or self._finalized:
            return False
        t = self._step
        return (t > 0 and self.schedule.phase(t - 1) == Phase.AB
                and Event.SYNC not in self.schedule.events(t))

    @property
    def world_size(self) -> int:
        return self.groups.world_size if self.groups is not None else 1

    @property
    def ranks(self) -> dict[str, int | None]:
        """Current rank of every AB layer (None for a layer in full mode)."""
        return {name: layer.rank for name, layer in self._layers}

    # ------------------------------------------------------------------ binding
    def bind(self, model: nn.Module) -> ABOptimizer:
        """Attach to ``model``: build the groups, broadcast from rank 0, run any step-0 switch."""
        if self.model is not None:
            raise RuntimeError("ABOptimizer is already bound to a model")
        self.model = model
        # Layer names as the user's model has them, not under a DDP wrapper's "module." prefix.
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._layers = list(ab_layers(inner))
        if not self._layers and self.config.enabled:
            raise ValueError(f"The model has no AB layers: {why_nothing_to_factorize(model)}")
        self.groups = build_groups(self.config, world=self.process_group)
        if self.config.overlap:
            self._reducer = OverlapReducer(
                self.comm, int(self.config.bucket_mb * 2**20), self._should_launch,
                first_bucket_bytes=int(self.config.first_bucket_mb * 2**20))
        first = next(iter(model.parameters()), None)
        if first is not None:  # NCCL reduces CUDA tensors only: ab_accel's own small tensors
            self.comm.device = first.device  # (ranks, digests, flags) live with the model
        self._collect_static()
        self._slots = [self._slots_for(g) for g in self.optimizer.param_groups]
        self._dp_bytes = self._dp_equivalent_bytes()
        # Start from identical replicas, as DDP does.
        self.comm.broadcast_(
            [p.data for p in self._all_params()] + self._buffers,
            src=self._global_rank(0), group=self.groups.world, ranks=self._world_ranks,
            phase=TrafficLabel.SETUP)
        self._refresh()
        if self._step == 0 and not self.switches:
            for event in self.schedule.events(0):
                self._run_event(event)
        self._apply_roles()
        return self

    def _collect_static(self) -> None:
        factor_ids = {id(p) for _, layer in self._layers for p in layer.factor_params()}
        self._dense_params = [p for p in _unique_params(self.model)
                              if id(p) not in factor_ids and p.requires_grad]
        self._buffers = [b for b in _unique_buffers(self.model) if b.is_floating_point()]

    def _slots_for(self, group: dict[str, Any]) -> list[Any]:
        owner = {id(p): layer for _, layer in self._layers for p in layer.factor_params()}
        slots: list[Any] = []
        seen: set[int] = set()
        for p in group["params"]:
            layer = owner.get(id(p))
            if layer is None:
                slots.append(p)
            elif id(layer) not in seen:
                seen.add(id(layer))
                slots.append(layer)
        return slots

    def _all_params(self) -> list[nn.Parameter]:
        return list(_unique_params(self.model))

    @property
    def _world_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.groups.world_size))

    def _global_rank(self, rank: int) -> int:
        if self.groups is None or self.groups.world is None or not self.comm.active():
            return rank
        return dist.get_global_rank(self.groups.world, rank)

    def _dp_equivalent_bytes(self) -> int:
        """Bytes DDP would all-reduce per step: trainable dense gradients plus float buffers."""
        total = sum(p.numel() * p.element_size() for p in self._dense_params)
        for _, layer in self._layers:
            elem = torch.empty((), dtype=layer.param_dtype).element_size()
            total += layer.dense_numel * elem
        total += sum(b.numel() * b.element_size() for b in self._buffers)
        return total

    # ------------------------------------------------------------------ structure bookkeeping
    def _structure_version(self) -> int:
        return sum(layer.structure_version for _, layer in self._layers)

    def _refresh(self) -> None:
        """Point the wrapped optimizer at the tensors that exist now; drop stale state."""
        live: set[int] = set()
        for group, slots in zip(self.optimizer.param_groups, self._slots, strict=True):
            params: list[nn.Parameter] = []
            for slot in slots:
                if isinstance(slot, ABLayer):
                    params.extend(slot.factor_params())
                else:
                    params.append(slot)
            group["params"] = params
            live.update(id(p) for p in params)
        for p in list(self.optimizer.state.keys()):
            if id(p) not in live:
                del self.optimizer.state[p]
        self._structure = self._structure_version()

    def _apply_roles(self) -> None:
        if self.groups is None:
            return
        role = self.groups.role if self.phase == Phase.AB else None
        for _, layer in self._layers:
            layer.set_role(role if layer.mode == LayerMode.AB else None)
        if self._reducer is not None:  # the trained tensors or the scope changed: new buckets
            self._arm_reducer()

    def _arm_reducer(self) -> None:
        group, ranks = self._scope()
        params = self.trained_params()
        # a scope's first step starts from what the world learned (the same on every rank)
        unused = self._unused_layers.get(ranks, self._unused_layers.get(self._world_ranks, set()))
        names = self._module_of_params()
        deferred = {id(p) for p in params if names.get(id(p), "") in unused}
        # Flags alone (no float buffers) may go in the wire dtype: 0 stays 0, and a mean of
        # 0/1 flags that is not 0 stays positive in bf16 and fp16 alike.
        self._reducer.arm(params, group, ranks, self.phase, deferred, tail=self._tail_of(params),
                          tail_on_wire=not self._buffers)

    def _tail_of(self, params: list[nn.Parameter]) -> Callable[..., list[torch.Tensor]]:
        """What rides with the step's gradients (in the overlapped reduction's last bucket, or
        in the all-reduce after backward): one "used" flag per trained tensor and last the
        non-finite flag of this rank (gradients and buffers), then the float buffers;
        ``self._tail_state`` keeps them for :meth:`synchronize`."""
        def tail(used: dict[int, bool], bad: torch.Tensor) -> list[torch.Tensor]:
            kind = params[0] if params else torch.empty(0, device=self.comm.device)
            flags = [1.0 if used.get(id(p), False) else 0.0 for p in params]
            local_bad = bad | nonfinite(self._buffers, kind.device)
            flag_tensor = torch.tensor(flags + [0.0], dtype=kind.dtype, device=kind.device)
            flag_tensor[-1] = local_bad.to(flag_tensor.dtype)
            self._tail_state = (flag_tensor, local_bad, [b.clone() for b in self._buffers])
            return [flag_tensor] + self._buffers
        return tail

    def _module_of_params(self) -> dict[int, str]:
        return {id(p): name.rpartition(".")[0] for name, p in self.model.named_parameters()}

    def _should_launch(self) -> bool:
        if self._no_sync:
            return False
        return self.launch_predicate() if self.launch_predicate is not None else True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation with plain torch: run every backward but the last of an
        optimizer step inside this block, so the overlapped reduction launches only once, on
        the accumulated sum (like ``DistributedDataParallel.no_sync``)."""
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    # ------------------------------------------------------------------ the step
    def _scope(self) -> tuple[Any, tuple[int, ...]]:
        if self.phase == Phase.AB:
            return self.groups.group, self.groups.group_ranks
        return self.groups.world, self._world_ranks

    def trained_params(self) -> list[nn.Parameter]:
        """Parameters this rank trains in the current step, in a rank-independent order."""
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average the gradients of what is trained, and the float buffers, over the scope of
        this step (the world in warm-up and rebound, the own group in an AB phase).

        A parameter whose gradient is None on every rank of the scope keeps None (an unused
        parameter is not decayed); one that is None on some ranks counts as zero there.
        """
        if self.model is None:
            raise RuntimeError("ABOptimizer.step() before bind(model)")
        if self._reduced:
            return
        if self._structure != self._structure_version():
            self._refresh()
            self._apply_roles()
        group, ranks = self._scope()
        params = self.trained_params()
        if len(ranks) > 1 and self.comm.active():
            if self._reducer is not None and self._reducer.armed:
                # The gradients went out during backward; the flags, the non-finite count and
                # the buffers rode in the last bucket (or, when they could not, go now).
                sent_bad = self._reducer.finish()
                grads = [p.grad for p in params]
                if not self._reducer.tail_sent:  # another dtype, or buffers beside a narrow wire
                    tail = self._tail_of(params)(self._reducer.used, sent_bad)
                    self.comm.mean_(tail, group, ranks, self.phase, wire=False)
                used, local_bad, own_buffers = self._tail_state
                self._tail_state = None
            else:
                # After backward: the same tail (flags, non-finite count, buffers) rides in the
                # gradient all-reduce, or beside it under a narrow wire with float buffers.
                had = {id(p): p.grad is not None for p in params}
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in params]
                tail = self._tail_of(params)(had, nonfinite(grads, self.comm.device))
                if self.comm.wire_dtype is None or not self._buffers:  # flags: any wire
                    self.comm.mean_(grads + tail, group, ranks, self.phase)
                else:
                    self.comm.mean_(grads, group, ranks, self.phase)
                    self.comm.mean_(tail, group, ranks, self.phase, wire=False)
                used, local_bad, own_buffers = self._tail_state
                self._tail_state = None
            kind = grads[0] if grads else used
            # The reduced sum can overflow although every rank's own gradients are finite.
            reduced_bad = nonfinite(grads, kind.device)
            values = torch.cat([used, reduced_bad.to(used.dtype).view(1)]).tolist()
            for p, u in zip(params, values[:-2], strict=True):
                if u == 0.0:
                    p.grad = None
            if self._reducer is not None:
                self._learn_unused(params, values[:-2])
            bad = values[-2] > 0 or values[-1] > 0
            if self.phase == Phase.AB and self.groups.plan.num_groups > 1:
                # The groups share no collective in an AB phase: one number tells the world.
                bad = self.comm.max_int([int(bad)], self.groups.world, self._world_ranks,
                                        TrafficLabel.CHECK)[0] > 0
            self._skip = bad
            if bad:
                self._nonfinite_ranks = self._ranks_with(bool(local_bad.item()))
                self._mend_buffers(own_buffers, bool(local_bad.item()),
                                   round(values[-2] * len(ranks)), group, ranks)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            self._skip = bool(nonfinite(grads, self.comm.device).item())
            self._nonfinite_ranks = [0] if self._skip else []
        self._reduced = True

    def _mend_buffers(self, own: list[torch.Tensor], local_bad: bool, n_bad: int, group: Any,
                      ranks: tuple[int, ...]) -> None:
        """A skipped step must not spread one rank's non-finite buffers (BatchNorm statistics
        of a NaN forward) through the mean that just ran: average the finite ranks' own values
        instead (an extra collective, on this failure path only)."""
        if n_bad == 0 or not self._buffers:
            return  # the scope's mean was of finite buffers
        for buf, saved in zip(self._buffers, own, strict=True):
            buf.copy_(saved)
        finite = len(ranks) - n_bad
        if finite > 0:
            if local_bad:  # contribute nothing (a weight of 0 would turn inf into NaN)
                for buf in self._buffers:
                    buf.zero_()
            self.comm.mean_(self._buffers, group, ranks, self.phase,
                            weights=[1.0 / finite] * len(self._buffers), divisor=1.0)

    def _learn_unused(self, params: list[nn.Parameter], used: list[float]) -> None:
        """Modules that got no gradient on any rank of the scope go to the last buckets from
        the next step on (the flags are the reduced ones: every rank learns the same)."""
        if all(used) and not self._unused_layers.get(self._scope()[1]):
            return  # the common step: everything got a gradient, as in the last one
        names = self._module_of_params()
        unused = {names.get(id(p), "") for p, u in zip(params, used, strict=True) if u == 0.0}
        used_layers = {names.get(id(p), "") for p, u in zip(params, used, strict=True) if u}
        unused -= used_layers
        scope = self._scope()[1]
        if unused != self._unused_layers.get(scope, set()):
            self._unused_layers[scope] = unused
            self._arm_reducer()

    def _ranks_with(self, flag: bool) -> list[int]:
        """The world ranks where ``flag`` is True (one all-gather; used on the failure path)."""
        flags = self.comm.flags_of(flag, self.groups.world, self._world_ranks, TrafficLabel.CHECK)
        return [r for r, f in enumerate(flags) if f]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Reduce, then clip the gradients of what this rank trains."""
        self.synchronize()
        params = [p for p in self.trained_params() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._finalized:
            raise RuntimeError(
                "step() after finalize() (or sync_now()): the groups were reconciled "
                "mid-AB-phase for export, so the model no longer matches the schedule. Call "
                "finalize() only at the end of training.")
        phase = self.phase
        self.synchronize()
        self._reduced = False
        if self._skip:
            self._skip_step(phase)
        else:
            self.consecutive_skips = 0
            factor = self.schedule.lr_factor(self._step)
            saved = [g["lr"] for g in self.optimizer.param_groups]
            if factor != 1.0:
                for g in self.optimizer.param_groups:
                    g["lr"] = g["lr"] * factor
            try:
                self.optimizer.step()
            finally:
                for g, lr in zip(self.optimizer.param_groups, saved, strict=True):
                    g["lr"] = lr
        self.traffic.record_step(phase, self._dp_bytes, self.world_size)
        self._step += 1
        for event in self.schedule.events(self._step):
            self._run_event(event)
        self.traffic.mark_step()
        return loss

    def _skip_step(self, phase: Phase) -> None:
        """Leave parameters and optimizer state as they are, on every rank alike (every rank
        reached the same decision), count the skip, and stop after too many in a row."""
        self._skip = False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        ranks = self._nonfinite_ranks
        where = (f"rank(s) {ranks}" if ranks else
                 "no rank's own gradients, but their sum over the group overflowed"
                 + (" (comm_dtype fp16 holds no value beyond +-65504: use bf16)"
                    if self.config.comm_dtype == "fp16" else ""))
        limit = self.config.max_skipped_steps
        if self.consecutive_skips > limit:
            raise NonFiniteError(
                f"Step {self._step} ({phase} phase): the gradients were non-finite (NaN or inf) "
                f"on {where}, for {self.consecutive_skips} step(s) in a row "
                f"(ab_training.max_skipped_steps={limit}). The parameters and optimizer state "
                f"are those of step {self._step - self.consecutive_skips + 1}, before the first "
                f"skipped step. Lower the learning rate, clip gradients (max_grad_norm), or "
                f"check the data; raise max_skipped_steps to tolerate longer runs of skips.")
        if self.groups is None or self.groups.rank == 0:
            logger.warning(
                "step %d (%s phase) skipped on every rank: non-finite gradients on %s "
                "(%d skipped so far, %d in a row; max_skipped_steps=%d)", self._step, phase,
                where, self.skipped_steps, self.consecutive_skips, limit)

    def _check_finite(self, event: Event, tensors: list[torch.Tensor]) -> None:
        """Refuse a switch on non-finite tensors (one flag over the world), before anything
        is averaged or factorized, so that no rank ever receives the NaN of another."""
        local = bool(nonfinite(tensors, self.comm.device).item())
        world, ranks = self.groups.world, self._world_ranks
        if not self.comm.max_int([int(local)], world, ranks, TrafficLabel.SYNC)[0]:
            return
        bad = self._ranks_with(local) if len(ranks) > 1 and self.comm.active() else [0]
        raise NonFiniteError(
            f"Refusing to {event} at step {self._step}: the parameters are non-finite (NaN or "
            f"inf) on rank(s) {bad}; nothing was averaged or factorized. The optimizer produced "
            f"them from finite gradients (an update that overflowed): lower the learning rate "
            f"or clip gradients, and resume from the last checkpoint.")

    def finalize(self) -> bool:
        """The end of training: make every rank hold the same model, for evaluation and export.

        A run that stops inside an AB phase leaves the groups with different factors
        (:attr:`groups_differ`); then the configured sync runs now (W <- A B on every layer),
        metered as sync traffic and listed in :attr:`switches` with ``final=True``. Anywhere
        else the ranks already agree and nothing is sent. Returns True when a sync ran.
        Collective: every rank must call it. After a sync ran, ``step()`` refuses.
        """
        if not self.groups_differ:
            return False
        return self.sync_now()

    def sync_now(self) -> bool:
        """Reconcile the groups now (as at a scheduled sync) and leave every layer dense.

        Unlike :meth:`finalize` it syncs whenever a layer is factored, even when the groups
        agree (right after a factorization). Returns True when a sync ran. Collective: every
        rank must call it. Training cannot continue after a sync_now() that ran.
        """
        if self.model is None or not any(layer.mode == LayerMode.AB for _, layer in self._layers):
            return False
        self._reduced = False
        self._run_event(Event.SYNC, final=True)
        self._finalized = True
        return True

    def report(self) -> dict[str, Any]:
        """What AB-training did so far, as plain JSON data (a summary file, a tracker).

        The config, the groups and their roles, the phases of the steps taken, every switch
        (:attr:`switches`), the layers' ranks now, the compression of the last factorization
        (dense / AB parameter count, from its switch, with what it is measured on), the steps
        skipped as non-finite, and this rank's traffic (:attr:`traffic`'s summary: sum it over
        the ranks for the run's). Local: no collective.
        """
        switches = [w.to_dict() for w in self.switches]
        facts = [w for w in switches if w["event"] == str(Event.FACTORIZE)]
        last = facts[-1]["compression"] if facts else {}
        when = "" if not facts else "at the end of the run" if facts[-1]["step"] >= \
            self._step else f"at step {facts[-1]['step']}"
        plan = self.groups.plan if self.groups is not None else None
        return {
            "config": self.config.to_dict(),
            "group_size": plan.group_size if plan else 1,
            "groups": [list(g) for g in plan.groups] if plan else [[0]],
            "roles": [str(r) for r in plan.roles] if plan else [str(Role.AB)],
            "phases": [(str(p), a, b) for p, a, b in self.schedule.describe(self._step)],
            "switches": switches,
            "sync_steps": [w["step"] for w in switches if w["event"] == str(Event.SYNC)],
            "layer_ranks": self.ranks,
            "compression": {
                "ratio": last.get("ratio", 1.0),
                "factorized_ratio": last.get("factorized_ratio", 1.0),
                "params_dense": last.get("params_dense"), "params_ab": last.get("params_now"),
                "of": f"parameter count, dense / AB, of the last factorization ({when}), from "
                      f"ABOptimizer.switches" if facts else "no factorization happened",
                "ratio_now": compression(self.model)["ratio"] if self.model is not None
                else 1.0},
            "skipped_steps": self.skipped_steps,
            "traffic": self.traffic.summary(),
        }

    @property
    def lr_factor(self) -> float:
        """The LR rebound multiplier the next step will apply."""
        return self.schedule.lr_factor(self._step)

    # ------------------------------------------------------------------ switches
    def _run_event(self, event: Event, final: bool = False) -> None:
        start = time.perf_counter()
        layers = [layer for _, layer in self._layers]
        self._check_finite(event, [t for layer in layers for t in layer.factor_params()]
                           + [p.data for p in self._dense_params] + self._buffers)
        if event == Event.SYNC:
            self._sync(final)
        elif event == Event.FACTORIZE:
            self._factorize()
        self._refresh()
        self._apply_roles()
        seconds = time.perf_counter() - start
        self.switch_seconds[str(event)] += seconds
        ranks = comp = None
        if event == Event.FACTORIZE:
            ranks = {name: layer.rank for name, layer in self._layers if layer.rank is not None}
            comp = {k: v for k, v in compression(self.model).items() if k != "layers"}
        self.switches.append(Switch(event, self._step, seconds, final, ranks, comp))

    @torch.no_grad()
    def _factorize(self) -> None:
        """SVD every W, cut at tau, agree the ranks (MAX), check every rank got the same A, B."""
        cfg = self.config
        world, ranks = self.groups.world, self._world_ranks
        if cfg.lean_memory:
            # Layer by layer: one SVD (and one dense matrix, W or A B) alive at a time; the
            # layers left in AB mode by a lean sync are re-factorized from their product.
            layers = [layer for _, layer in self._layers]
            for layer in layers:
                start = time.perf_counter()
                proposed = layer.proposed_rank(cfg.rank_cutoff, cfg.min_rank, **cfg.rank_rule())
                self.svd_seconds += time.perf_counter() - start
                layer.factorize(self.comm.max_int([proposed], world, ranks,
                                                  TrafficLabel.SYNC)[0])
        else:
            layers = [layer for _, layer in self._layers if layer.mode == LayerMode.FULL]
            if not layers:
                return
            start = time.perf_counter()
            proposed = [layer.proposed_rank(cfg.rank_cutoff, cfg.min_rank, **cfg.rank_rule())
                        for layer in layers]
            self.svd_seconds += time.perf_counter() - start
            agreed = self.comm.max_int(proposed, world, ranks, TrafficLabel.SYNC)
            for layer, rank in zip(layers, agreed, strict=True):
                layer.factorize(rank)
        if not self.comm.agree([_digest(layers)], world, ranks, TrafficLabel.SYNC):
            # Mixed hardware gave different SVDs: take rank 0's factors (and its frozen
            # residuals, which follow from them: the one case a residual is ever sent).
            self.comm.broadcast_([t for layer in layers for t in (layer.A.data, layer.B.data)]
                                 + [layer.residual for layer in layers
                                    if layer.residual is not None],
                                 src=self._global_rank(0), group=world, ranks=ranks,
                                 phase=TrafficLabel.SYNC)

    @torch.no_grad()
    def _sync(self, final: bool = False) -> None:
        """Reconcile the groups by ``sync_mode``, then W <- A B on every layer (with
        ``lean_memory``, except at the end of training, the layers keep their synced factors:
        the factorization that follows at the same boundary re-factorizes them one by one)."""
        mode = self.config.sync_mode
        layers = [layer for _, layer in self._layers if layer.mode == LayerMode.AB]
        world, ranks = self.groups.world, self._world_ranks
        n = self.groups.world_size
        dense = [p.data for p in self._dense_params] + self._buffers
        if mode == SyncMode.FULL:
            mats = [layer.matrix() for layer in layers]
            self.comm.mean_(mats + dense, world, ranks, TrafficLabel.SYNC)
            for layer, mat in zip(layers, mats, strict=True):
                layer.to_full()
                layer.weight.copy_(layer._matrix_to_weight(mat))
        elif mode == SyncMode.ONLY_LEARNED:
            # A averaged over the A-group ranks, B over the B-group ranks, dense over the
            # world: one SUM all-reduce of locally pre-scaled tensors.
            plan = self.groups.plan
            n_a = max(1, len(plan.ranks_with_role(Role.A)))
            n_b = max(1, len(plan.ranks_with_role(Role.B)))
            role = self.groups.role
            w_a = 1.0 / n_a if role in (Role.A, Role.AB) else 0.0
            w_b = 1.0 / n_b if role in (Role.B, Role.AB) else 0.0
            tensors = [t for layer in layers for t in (layer.A.data, layer.B.data)] + dense
            weights = [w for _ in layers for w in (w_a, w_b)] + [1.0 / n] * len(dense)
            self.comm.mean_(tensors, world, ranks, TrafficLabel.SYNC, weights=weights, divisor=1.0)
        elif mode == SyncMode.ONLY_B:
            # A never trains: it is identical on every rank already.
            self.comm.mean_([layer.B.data for layer in layers] + dense, world, ranks,
                            TrafficLabel.SYNC)
        else:  # with-stale
            self.comm.mean_([t for layer in layers for t in (layer.A.data, layer.B.data)]
                            + dense, world, ranks, TrafficLabel.SYNC)
        self._average_dense_state()
        if self.config.lean_memory and not final:
            return
        for layer in layers:
            layer.to_full()

    def _average_dense_state(self) -> None:
        """The dense parameters' optimizer moments diverged per group: average them."""
        tensors: list[torch.Tensor] = []
        for p in self._dense_params:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            for key in sorted(state):
                value = state[key]
                if (key not in _SKIP_STATE_KEYS and torch.is_tensor(value)
                        and value.is_floating_point() and value.dim() > 0):
                    tensors.append(value)
        self.comm.mean_(tensors, self.groups.world, self._world_ranks, TrafficLabel.SYNC)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state plus AB's: step, layer ranks, meter, groups."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "ab": {
                "step": self._step,
                "ranks": self.ranks,
                "config": self.config.to_dict(),
                "traffic": self.traffic.state_dict(),
                "world_size": self.world_size,
                "group_index": self.groups.group_index if self.groups else 0,
                "switches": [sw.to_dict() for sw in self.switches],
                "groups_differ": self.groups_differ,
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state from :meth:`state_dict`. Load the model's state first: the layers
        take their mode and rank from the model checkpoint."""
        if "ab" not in state_dict:  # a plain optimizer state: no AB bookkeeping to restore
            self.optimizer.load_state_dict(state_dict)
            return
        ab = state_dict["ab"]
        if self.model is None:
            # Not bound yet (e.g. Accelerate moving optimizer state to the device during
            # prepare): the parameter lists are the constructor's, restore as they are.
            self._step = int(ab["step"])
            self.traffic.load_state_dict(ab["traffic"])
            self._load_ab_counters(ab)
            self.optimizer.load_state_dict(state_dict["optimizer"])
            return
        same_model = not ab.get("groups_differ", True)
        if (self.groups is not None and ab["world_size"] != self.world_size
                and not (self.config.accept_resume_changes and same_model)):
            raise ValueError(
                f"This AB checkpoint was written by {ab['world_size']} ranks and is loaded by "
                f"{self.world_size}: AB groups hold different states, so resume with the same "
                f"number of processes (or merge() the model and start a new run)."
            )
        saved_ranks = ab["ranks"]
        for name, layer in self._layers:
            if saved_ranks.get(name) != layer.rank:
                raise ValueError(
                    f"Layer {name!r} has rank {layer.rank} but the optimizer checkpoint expects "
                    f"{saved_ranks.get(name)}: load the model's state_dict before the "
                    f"optimizer's."
                )
        self._step = int(ab["step"])
        self.traffic.load_state_dict(ab["traffic"])
        self._load_ab_counters(ab)
        self._refresh()
        self._apply_roles()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._reduced = False


    def _load_ab_counters(self, ab: dict[str, Any]) -> None:
        self.switches = [Switch.from_dict(sw) for sw in ab.get("switches", [])]
        self.skipped_steps = int(ab.get("skipped_steps", 0))
        self.consecutive_skips = int(ab.get("consecutive_skips", 0))


def _unique_params(model: nn.Module) -> Iterable[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _unique_buffers(model: nn.Module) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            yield b


def _digest(layers: list[ABLayer]) -> float:
    """A CRC32 of every factor's bytes (exact in a float64).

    Costs one copy of the factors to host memory per factorization (a switch, every
    ``sync_every`` steps; never in a training step): the price of checking that every rank's
    SVD gave the same factors."""
    crc = 0
    for layer in layers:
        for t in (layer.A, layer.B, layer.residual):
            if t is None:
                continue
            data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
            crc = zlib.crc32(data, crc)
    return float(crc)
