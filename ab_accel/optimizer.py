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

import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import Communicator, TrafficMeter
from .config import ABConfig
from .groups import ABGroups, build_groups
from .layers import AB, FULL, ABLayer
from .model import ab_layers
from .schedule import FACTORIZE, SYNC, ABSchedule

_SKIP_STATE_KEYS = ("step",)


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
        self.comm = Communicator(self.traffic)
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
        self.last_switch: dict[str, Any] = {}
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
    def phase(self) -> str:
        """Phase of the NEXT step: "warmup", "ab" or "rebound"."""
        return self.schedule.phase(self._step)

    @property
    def role(self) -> str | None:
        """"A" or "B" (or "AB" in a single process) during AB phases, None otherwise."""
        if self.phase != "ab" or self.groups is None:
            return None
        return self.groups.role

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
        self._layers = list(ab_layers(model))
        if not self._layers and self.config.enabled:
            raise ValueError(
                "The model has no AB layers: call ab_accel.convert(model, config) before "
                "building the ABOptimizer (and before accelerator.prepare), or check that "
                "target_modules matches some nn.Linear / nn.Conv2d / Conv1D layers."
            )
        self.groups = build_groups(self.config, world=self.process_group)
        self._collect_static()
        self._slots = [self._slots_for(g) for g in self.optimizer.param_groups]
        self._dp_bytes = self._dp_equivalent_bytes()
        # Start from identical replicas, as DDP does.
        self.comm.broadcast_(
            [p.data for p in self._all_params()] + self._buffers,
            src=self._global_rank(0), group=self.groups.world, ranks=self._world_ranks,
            phase="setup")
        self._refresh()
        if self._step == 0:
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
        role = self.groups.role if self.phase == "ab" else None
        for _, layer in self._layers:
            layer.set_role(role if layer.mode == AB else None)

    # ------------------------------------------------------------------ the step
    def _scope(self) -> tuple[Any, tuple[int, ...]]:
        if self.phase == "ab":
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
        if len(ranks) > 1 and self.comm.active():
            params = self.trained_params()
            grads: list[torch.Tensor] = []
            flags: list[float] = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                    flags.append(0.0)
                else:
                    flags.append(1.0)
                grads.append(p.grad)
            kind = grads[0] if grads else torch.empty(0)
            used = torch.tensor(flags, dtype=kind.dtype, device=kind.device)
            self.comm.mean_(grads + [used] + self._buffers, group, ranks, self.phase)
            for p, u in zip(params, used.tolist(), strict=True):
                if u == 0.0:
                    p.grad = None
        self._reduced = True

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
                "step() after sync_now(): the groups were reconciled mid-AB-phase for export, "
                "so the model no longer matches the schedule. Call sync_now() only at the end.")
        phase = self.phase
        self.synchronize()
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
            self._reduced = False
        self.traffic.record_step(phase, self._dp_bytes, self.world_size)
        self._step += 1
        for event in self.schedule.events(self._step):
            self._run_event(event)
        return loss

    def sync_now(self) -> bool:
        """Reconcile the groups now (as at a scheduled sync) and leave every layer dense.

        For the end of training (export, final evaluation): a run that stops mid-AB-phase leaves
        the groups with different factors. Returns True when a sync ran (False outside an AB
        phase, where all ranks already agree). Collective: every rank must call it. Training
        cannot continue after a sync_now() that ran: ``step()`` refuses.
        """
        if self.model is None or not any(layer.mode == AB for _, layer in self._layers):
            return False
        self._reduced = False
        self._run_event(SYNC)
        self._finalized = True
        return True

    @property
    def lr_factor(self) -> float:
        """The LR rebound multiplier the next step will apply."""
        return self.schedule.lr_factor(self._step)

    # ------------------------------------------------------------------ switches
    def _run_event(self, event: str) -> None:
        start = time.perf_counter()
        if event == SYNC:
            self._sync()
        elif event == FACTORIZE:
            self._factorize()
        self._refresh()
        self._apply_roles()
        seconds = time.perf_counter() - start
        self.switch_seconds[event] += seconds
        self.last_switch = {"event": event, "boundary": self._step, "seconds": seconds}

    @torch.no_grad()
    def _factorize(self) -> None:
        """SVD every W, cut at tau, agree the ranks (MAX), check every rank got the same A, B."""
        cfg = self.config
        layers = [layer for _, layer in self._layers if layer.mode == FULL]
        if not layers:
            return
        start = time.perf_counter()
        proposed = [layer.proposed_rank(cfg.rank_cutoff, cfg.min_rank) for layer in layers]
        self.svd_seconds += time.perf_counter() - start
        world, ranks = self.groups.world, self._world_ranks
        agreed = self.comm.max_int(proposed, world, ranks, "sync")
        for layer, rank in zip(layers, agreed, strict=True):
            layer.factorize(rank)
        if not self.comm.agree([_digest(layers)], world, ranks, "sync"):
            # Mixed hardware gave different SVDs: take rank 0's factors.
            self.comm.broadcast_([t for layer in layers for t in (layer.A.data, layer.B.data)],
                                 src=self._global_rank(0), group=world, ranks=ranks,
                                 phase="sync")

    @torch.no_grad()
    def _sync(self) -> None:
        """Reconcile the groups by ``sync_mode``, then W <- A B on every layer."""
        mode = self.config.sync_mode
        layers = [layer for _, layer in self._layers if layer.mode == AB]
        world, ranks = self.groups.world, self._world_ranks
        n = self.groups.world_size
        dense = [p.data for p in self._dense_params] + self._buffers
        if mode == "full":
            mats = [layer.matrix() for layer in layers]
            self.comm.mean_(mats + dense, world, ranks, "sync")
            for layer, mat in zip(layers, mats, strict=True):
                layer.to_full()
                layer.weight.copy_(layer._matrix_to_weight(mat))
        elif mode == "only-learned":
            # A averaged over the A-group ranks, B over the B-group ranks, dense over the
            # world: one SUM all-reduce of locally pre-scaled tensors.
            plan = self.groups.plan
            n_a = max(1, len(plan.ranks_with_role("A")))
            n_b = max(1, len(plan.ranks_with_role("B")))
            role = self.groups.role
            w_a = 1.0 / n_a if role in ("A", "AB") else 0.0
            w_b = 1.0 / n_b if role in ("B", "AB") else 0.0
            tensors = [t for layer in layers for t in (layer.A.data, layer.B.data)] + dense
            weights = [w for _ in layers for w in (w_a, w_b)] + [1.0 / n] * len(dense)
            self.comm.mean_(tensors, world, ranks, "sync", weights=weights, divisor=1.0)
        elif mode == "only-b":
            # A never trains: it is identical on every rank already.
            self.comm.mean_([layer.B.data for layer in layers] + dense, world, ranks, "sync")
        else:  # with-stale
            self.comm.mean_([t for layer in layers for t in (layer.A.data, layer.B.data)]
                            + dense, world, ranks, "sync")
        self._average_dense_state()
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
        self.comm.mean_(tensors, self.groups.world, self._world_ranks, "sync")

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
            self.optimizer.load_state_dict(state_dict["optimizer"])
            return
        if self.groups is not None and ab["world_size"] != self.world_size:
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
        self._refresh()
        self._apply_roles()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._reduced = False


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
    """A CRC32 of every factor's bytes (exact in a float64)."""
    crc = 0
    for layer in layers:
        for t in (layer.A, layer.B):
            data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
            crc = zlib.crc32(data, crc)
    return float(crc)
