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

This module is the facade: the torch.optim surface, binding, the step's orchestration, the LR
rebound, finalize, checkpoints and the report. The jobs are done by one unit each:
:mod:`ab_accel.reducer` (what is communicated, and the step's reduction),
:mod:`ab_accel.switches` (factorize, the sync modes, the dense-state average),
:mod:`ab_accel.guard` (non-finite steps and switches), :mod:`ab_accel.comm` (the metered
collectives).

ABOptimizer is a real ``torch.optim.Optimizer``: ``register_step_pre_hook`` /
``register_step_post_hook`` hooks run around every ``step()``, a skipped one included (the skip
is decided inside the step, after the reduction: a post hook reads
:attr:`ABOptimizer.last_step_skipped`); the wrapped optimizer's own hooks run only when it
really steps. ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's, so LR
schedulers built on either object drive the same learning rates.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import bookkeeping
from . import switches as _switches
from .comm import Communicator, TrafficMeter
from .config import ABConfig
from .groups import ABGroups, build_groups
from .guard import NonFiniteError, NonFiniteGuard, check_finite, ranks_with
from .layers import ABLayer
from .model import ab_layers, compression, why_nothing_to_factorize
from .reducer import Communicated, StepHealth, StepReduction, communicated, dp_equivalent_bytes
from .schedule import ABSchedule
from .slots import ParamSlots
from .switches import Switch
from .vocab import Event, LayerMode, Phase, Role, TrafficLabel
from .wrapping import WrappingOptimizer

_NO_COMM = Communicated([], [], [])


class ABOptimizer(WrappingOptimizer):
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
        if isinstance(optimizer, ABOptimizer):
            raise TypeError("optimizer is already an ABOptimizer")
        super().__init__(optimizer)
        self.config = ABConfig() if config is None else ABConfig.from_dict(config)
        if self.config.enabled:
            self.schedule = ABSchedule.from_config(self.config)
        else:
            # Disabled: a warm-up that never ends, i.e. plain data parallel (still metered).
            self.schedule = ABSchedule(warmup_steps=2**62, sync_every=1, rebound_steps=0)
        self.traffic = TrafficMeter()
        self.comm = Communicator(self.traffic, where=lambda: f"step {self._step}")
        if self.config.comm_dtype is not None:
            self.comm.wire_dtype = {"bf16": torch.bfloat16,
                                    "fp16": torch.float16}[self.config.comm_dtype]
        self.process_group = process_group
        self.groups: ABGroups | None = None
        self.model: nn.Module | None = None
        self._step = 0
        self._reduced = False
        self._health = StepHealth(False, [])
        self._layers: list[tuple[str, ABLayer]] = []
        self._slots: ParamSlots | None = None
        self._comm_set = _NO_COMM
        self._reduction: StepReduction | None = None
        self._dp_bytes = 0
        self._finalized = False
        self._no_sync = False
        self.guard = NonFiniteGuard(self.config.max_skipped_steps, self.config.comm_dtype)
        #: Every phase switch run so far, in order (kept in ``state_dict`` across a resume).
        self.switches: list[Switch] = []
        #: When set (by the integrations), the overlapped reduction launches only while it is
        #: True: Accelerate's ``sync_gradients``, DeepSpeed's accumulation boundary.
        self.launch_predicate: Callable[[], bool] | None = None
        #: Wall seconds spent in phase switches, by event ("factorize", "sync"), and in the SVDs.
        self.switch_seconds: dict[str, float] = defaultdict(float)
        self.svd_seconds = 0.0
        #: DeepSpeed's ZeRO optimizer, when it reduces and steps (:class:`ab_accel.zero.ZeroScope`,
        #: set by :func:`ab_accel.engine.attach`): this object then runs the schedule only.
        self.external: Any = None
        if model is not None:
            self.bind(model)

    # ------------------------------------------------------------------ torch.optim surface
    def group_added(self) -> None:
        """A group added once bound: its AB layers' factors follow the switches too."""
        if self.model is not None:
            self._slots.added()
            self._refresh()
            self._apply_roles()

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

    @property
    def lr_factor(self) -> float:
        """The LR rebound multiplier the next step will apply."""
        return self.schedule.lr_factor(self._step)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because some rank's reduced gradients were non-finite (in total)."""
        return self.guard.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        """Skipped steps in a row just now; see ``ABConfig.max_skipped_steps``."""
        return self.guard.consecutive_skips

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped (non-finite gradients on some rank): what a
        step post hook reads before it trusts the parameters moved."""
        return self.guard.consecutive_skips > 0

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
        first = next(iter(model.parameters()), None)
        if first is not None:  # NCCL reduces CUDA tensors only: ab_accel's own small tensors
            self.comm.device = first.device  # (ranks, digests, flags) live with the model
        layers = [layer for _, layer in self._layers]
        self._comm_set = communicated(model, layers)
        self._reduction = StepReduction(self.comm, self.config, self.groups,
                                        self._comm_set.buffers, self._module_of_params,
                                        self._should_launch)
        self._slots = ParamSlots(self.optimizer, layers)
        self._dp_bytes = dp_equivalent_bytes(self._comm_set, layers)
        # Start from identical replicas, as DDP does.
        self.comm.broadcast_(self._comm_set.replicated, src=self.groups.global_rank(0),
                             group=self.groups.world, ranks=self.groups.world_ranks,
                             phase=TrafficLabel.SETUP)
        self._refresh()
        if self._step == 0 and not self.switches:
            self._run_events(self.schedule.events(0))
        self._apply_roles()
        return self

    def _refresh(self) -> None:
        """Point the wrapped optimizer at the tensors that exist now; drop stale state."""
        self._slots.refresh()

    def _apply_roles(self) -> None:
        if self.groups is None:
            return
        role = self.groups.role if self.phase == Phase.AB else None
        for _, layer in self._layers:
            layer.set_role(role if layer.mode == LayerMode.AB else None)
        # the trained tensors or the scope changed: new buckets
        self._reduction.arm(self.phase, self.trained_params())

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
        """The process group and ranks the next step reduces over."""
        return self._reduction.scope(self.phase)

    def trained_params(self) -> list[nn.Parameter]:
        """Parameters this rank trains in the current step, in a rank-independent order."""
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def synchronize(self) -> None:
        """Average the gradients of what is trained, and the float buffers, over the scope of
        this step (the world in warm-up and rebound, the own group in an AB phase); see
        :meth:`ab_accel.reducer.StepReduction.reduce`. Runs once per step."""
        if self.model is None:
            raise RuntimeError("ABOptimizer.step() before bind(model)")
        if self._reduced:
            return
        if self._slots.stale:
            self._refresh()
            self._apply_roles()
        self._health = self._reduction.reduce(self.phase, self.trained_params())
        self._reduced = True

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Reduce, then clip the gradients of what this rank trains."""
        self.synchronize()
        params = [p for p in self.trained_params() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Reduce (unless :meth:`synchronize` did), step the wrapped optimizer with the LR
        rebound applied (or skip the step on non-finite gradients, every rank alike), count
        the step, and run the switches the schedule puts at the new step count."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._finalized:
            raise RuntimeError(
                "step() after finalize() (or sync_now()): the groups were reconciled "
                "mid-AB-phase for export, so the model no longer matches the schedule. Call "
                "finalize() only at the end of training.")
        if self.external is not None:
            raise RuntimeError(
                "Under DeepSpeed ZeRO, engine.step() steps (DeepSpeed's ZeRO optimizer, with "
                "AB-training's schedule around it): call engine.step(), not optimizer.step().")
        phase = self.phase
        self.synchronize()
        self._reduced = False
        if self._health.skip:
            self.guard.skipped(self._step, phase, self._health.nonfinite_ranks,
                               log=self.groups is None or self.groups.rank == 0)
        else:
            self.guard.stepped()
            self._step_with_rebound()
        self._count_step(phase)
        return loss

    def _count_step(self, phase: Phase) -> None:
        """A step of ``phase`` ended (taken or skipped): count it, run the switches the schedule
        puts at the new step count, close the step's traffic."""
        self.traffic.record_step(phase, self._dp_bytes, self.world_size)
        self._step += 1
        self._run_events(self.schedule.events(self._step))
        self.traffic.mark_step()

    def _external_step(self, skipped: bool, local_bad: bool = False) -> None:
        """DeepSpeed's ZeRO optimizer stepped (or skipped a non-finite step, every rank alike;
        ``local_bad``: this rank's own gradients were non-finite)."""
        phase = self.phase
        if skipped:
            self.guard.skipped(self._step, phase, ranks_with(self.comm, self.groups, local_bad),
                               log=self.groups is None or self.groups.rank == 0)
        else:
            self.guard.stepped()
        self._count_step(phase)

    def _step_with_rebound(self) -> None:
        self._with_rebound(self.optimizer.step)

    def _with_rebound(self, step: Callable[[], Any]) -> Any:
        """``step()`` at ``lr * lr_factor`` (the LR rebound after a switch); the scheduled
        learning rates are put back right after."""
        factor = self.schedule.lr_factor(self._step)
        saved = [g["lr"] for g in self.optimizer.param_groups]
        if factor != 1.0:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * factor
        try:
            return step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # ------------------------------------------------------------------ switches
    def _run_events(self, events: list[Event], final: bool = False) -> None:
        """The switches at one step count; under ZeRO, DeepSpeed's optimizer is rebuilt around
        them (:class:`ab_accel.zero.ZeroScope`)."""
        if not events:
            return
        if self.external is not None:
            self.external.begin_switch()
        for event in events:
            self._run_event(event, final)
        if self.external is not None:
            self.external.end_switch()

    def _run_event(self, event: Event, final: bool = False) -> None:
        """Run one switch (refused on non-finite parameters) and record it."""
        start = time.perf_counter()
        layers = [layer for _, layer in self._layers]
        dense = [p.data for p in self._comm_set.dense] + self._comm_set.buffers
        check_finite(self.comm, self.groups, event, self._step,
                     [t for layer in layers for t in layer.factor_params()] + dense)
        if event == Event.SYNC:
            self._sync(final)
        elif event == Event.FACTORIZE:
            self.svd_seconds += _switches.factorize(layers, self.config, self.comm, self.groups)
        self._refresh()
        self._apply_roles()
        seconds = time.perf_counter() - start
        self.switch_seconds[str(event)] += seconds
        ranks = comp = None
        if event == Event.FACTORIZE:
            ranks = {name: layer.rank for name, layer in self._layers if layer.rank is not None}
            comp = {k: v for k, v in compression(self.model).items() if k != "layers"}
        self.switches.append(Switch(event, self._step, seconds, final, ranks, comp))

    def _sync(self, final: bool = False) -> None:
        """Reconcile the groups (:func:`ab_accel.switches.sync`)."""
        dense = [p.data for p in self._comm_set.dense] + self._comm_set.buffers
        _switches.sync([layer for _, layer in self._layers], dense,
                       _switches.dense_state(self.optimizer.state, self._comm_set.dense),
                       self.config, self.comm, self.groups, final)

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
        self._run_events([Event.SYNC], final=True)
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
        return bookkeeping.report(self)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state plus AB's: step, layer ranks, meter, groups."""
        return bookkeeping.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state from :meth:`state_dict`. Load the model's state first: the layers
        take their mode and rank from the model checkpoint."""
        bookkeeping.load_state_dict(self, state_dict)


__all__ = ["ABOptimizer", "NonFiniteError", "Switch"]
