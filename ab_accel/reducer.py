"""The step's reduction: what is communicated, and how the gradients of a step are averaged.

* :func:`communicated` is the one place that decides which tensors the ABOptimizer
  communicates besides the factors (reduced gradients, averaged buffers, the broadcast at
  bind): a tensor it leaves out is never reduced, synced nor broadcast.
* :class:`StepReduction` averages the gradients of what is trained over the step's scope (the
  world in warm-up and rebound, the own group in an AB phase), with the float buffers, one
  "used" flag per trained tensor and the non-finite flags riding along (a :class:`Tail`), and
  returns the step's :class:`StepHealth`; on a skipped step it mends the buffers.
* :class:`OverlapReducer` launches those means during backward, below.

Gradient reduction overlapped with backward: buckets launched as their gradients are ready.

DDP starts each bucket's all-reduce as soon as the bucket's last gradient has been accumulated,
and hides it behind the rest of backward. :class:`OverlapReducer` does the same for the
ABOptimizer, in the step's scope (the world in warm-up and rebound, the own group in an AB
phase):

* the trained parameters are cut into buckets of at most ``bucket_bytes``, in reverse
  registration order (roughly the order backward produces their gradients), by dtype and
  device: the same buckets on every rank; the first bucket holds at most
  ``first_bucket_bytes`` (1 MiB, as DDP's), so the first all-reduce starts early in backward
  even when the whole model would fit one bucket;
* a ``post-accumulate-grad`` hook on every trained parameter marks it ready; buckets are
  launched strictly in bucket order (a ready bucket waits for the ones before it), so every
  rank issues the same collectives in the same order, whatever order its gradients arrive in;
* nothing is launched while ``should_launch()`` is False (gradient-accumulation micro-steps:
  Accelerate's ``sync_gradients``, DeepSpeed's boundary, ``ABOptimizer.no_sync()``);
* :meth:`finish` (called by ``ABOptimizer.synchronize``) launches what is left (buckets with a
  parameter that got no gradient on this rank: its gradient is zero-filled, as the
  unoverlapped path does) and waits for every bucket;
* the ``tail`` (given to :meth:`arm`) rides in the last bucket: when it launches, every
  parameter's "got a gradient" flag is known (the buckets go out in order), and ``tail(used,
  bad)`` returns the :class:`Tail` to append (the flags, the non-finite count and the float
  buffers), so a step makes no extra round trip for them; they are sent separately only when
  their dtype or device differs from the bucket's, or under a narrower wire dtype unless
  ``tail_on_wire`` (given to :meth:`arm`: flags only, whose zero / non-zero survives any wire
  dtype; float buffers travel in their own precision);
* a layer whose parameters got a gradient on no rank of the scope in the last step (a branch
  the model skips) is put in the last buckets from the next step on (``deferred``: the same on
  every rank, since it comes from the reduced flags), so it cannot hold back the buckets after
  it; the first step, and the first step after a switch for the new factors, learn it.

The result equals the unoverlapped reduction: the same means, over the same ranks; only the
grouping of tensors into flat buffers differs, so with more than two ranks a ring's summation
order (and the last bit of a sum) may differ. The meter counts the same bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .comm import Communicator, PendingMean, nonfinite
from .config import ABConfig
from .groups import ABGroups
from .guard import ranks_with
from .layers import ABLayer
from .vocab import Phase, TrafficLabel


# ---------------------------------------------------------------------------------- what travels
@dataclass
class Communicated:
    """The tensors the ABOptimizer communicates besides the factors of the AB layers.

    ``dense``: the trainable parameters that are not factors (their gradients are reduced at
    every step, their values averaged over the world at a sync); ``buffers``: the floating
    buffers (averaged with every step's gradients and at a sync); ``replicated``: what is
    broadcast from rank 0 at bind, so that every rank starts from the same model, as DDP does.
    """

    dense: list[nn.Parameter]
    buffers: list[torch.Tensor]
    replicated: list[torch.Tensor]


def communicated(model: nn.Module, layers: Iterable[ABLayer]) -> Communicated:
    """What the ABOptimizer bound to ``model`` communicates (see :class:`Communicated`).

    The factors (A, B, or W in full mode) are the layers' own business (:mod:`ab_accel.switches`
    and the trained parameters of each step). A frozen parameter (``requires_grad`` False) is
    never reduced nor synced; only the broadcast at bind covers it. A tensor that must never
    travel (identical on every rank by construction) is left out HERE, and nowhere else."""
    factor_ids = {id(p) for layer in layers for p in layer.factor_params()}
    params = list(_unique(model.parameters()))
    buffers = [b for b in _unique(model.buffers()) if b.is_floating_point()]
    return Communicated(
        dense=[p for p in params if id(p) not in factor_ids and p.requires_grad],
        buffers=buffers,
        replicated=[p.data for p in params] + buffers)


def dp_equivalent_bytes(comm_set: Communicated, layers: Iterable[ABLayer]) -> int:
    """Bytes DDP would all-reduce per step: trainable dense gradients, every AB layer's dense
    weight, plus float buffers (the meter's exact DP equivalent)."""
    total = sum(p.numel() * p.element_size() for p in comm_set.dense)
    for layer in layers:
        elem = torch.empty((), dtype=layer.param_dtype).element_size()
        total += layer.dense_numel * elem
    total += sum(b.numel() * b.element_size() for b in comm_set.buffers)
    return total


def _unique(tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


@dataclass
class Tail:
    """What rides with a step's gradients (in the overlapped reduction's last bucket, or in
    the all-reduce after backward): ``flags``, one "used" flag per trained tensor and last the
    non-finite flag of this rank (gradients and buffers), then the float ``buffers`` (reduced
    in place). ``local_bad`` and ``own_buffers`` (this rank's values before the mean) stay
    here, for a skipped step."""

    flags: torch.Tensor
    local_bad: torch.Tensor
    own_buffers: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensors sent: the flags, then the buffers."""
        return [self.flags] + self.buffers


@dataclass(frozen=True)
class StepHealth:
    """The outcome of one step's reduction, the same on every rank of the world: ``skip``
    when some rank's gradients (or buffers), or their reduced sum, are non-finite;
    ``nonfinite_ranks`` the world ranks whose own values were (none: only the sum was)."""

    skip: bool
    nonfinite_ranks: list[int]


class StepReduction:
    """Averages a step's gradients over its scope; see the module docstring.

    Args:
        comm: the metered communicator.
        config: ``overlap``, ``bucket_mb`` and ``first_bucket_mb`` are read.
        groups: the world and this rank's group.
        buffers: the float buffers (:attr:`Communicated.buffers`).
        module_of: parameter id -> name of its module, for the parameters that exist now
            (they are re-created at a switch).
        should_launch: whether the overlapped reduction may launch now (accumulation).
    """

    def __init__(self, comm: Communicator, config: ABConfig, groups: ABGroups,
                 buffers: list[torch.Tensor], module_of: Callable[[], dict[int, str]],
                 should_launch: Callable[[], bool]) -> None:
        self.comm, self.groups, self.buffers, self.module_of = comm, groups, buffers, module_of
        self.overlap: OverlapReducer | None = None
        if config.overlap:
            self.overlap = OverlapReducer(
                comm, int(config.bucket_mb * 2**20), should_launch,
                first_bucket_bytes=int(config.first_bucket_mb * 2**20))
        # per scope (its ranks): modules none of whose grads arrived in its last step; learned
        # from the scope's reduced flags, so every rank of the scope holds the same set
        self._unused_layers: dict[tuple[int, ...], set[str]] = {}

    def scope(self, phase: Phase) -> tuple[Any, tuple[int, ...]]:
        """The process group and ranks a step of ``phase`` reduces over."""
        if phase == Phase.AB:
            return self.groups.group, self.groups.group_ranks
        return self.groups.world, self.groups.world_ranks

    def arm(self, phase: Phase, params: list[nn.Parameter]) -> None:
        """After a switch (new trained tensors, or a new scope): new buckets for ``params``."""
        if self.overlap is None:
            return
        group, ranks = self.scope(phase)
        # a scope's first step starts from what the world learned (the same on every rank)
        world = self._unused_layers.get(self.groups.world_ranks, set())
        unused = self._unused_layers.get(ranks, world)
        names = self.module_of()
        deferred = {id(p) for p in params if names.get(id(p), "") in unused}
        # Flags alone (no float buffers) may go in the wire dtype: 0 stays 0, and a mean of
        # 0/1 flags that is not 0 stays positive in bf16 and fp16 alike.
        self.overlap.arm(params, group, ranks, phase, deferred,
                         tail=functools.partial(self._tail, params),
                         tail_on_wire=not self.buffers)

    def _tail(self, params: list[nn.Parameter], used: dict[int, bool],
              bad: torch.Tensor) -> Tail:
        kind = params[0] if params else torch.empty(0, device=self.comm.device)
        flags = [1.0 if used.get(id(p), False) else 0.0 for p in params]
        local_bad = bad | nonfinite(self.buffers, kind.device)
        flag_tensor = torch.tensor(flags + [0.0], dtype=kind.dtype, device=kind.device)
        flag_tensor[-1] = local_bad.to(flag_tensor.dtype)
        return Tail(flag_tensor, local_bad, [b.clone() for b in self.buffers], self.buffers)

    @torch.no_grad()
    def reduce(self, phase: Phase, params: list[nn.Parameter]) -> StepHealth:
        """Average the gradients of ``params`` (what is trained, in a rank-independent order),
        and the float buffers, over the scope of a ``phase`` step.

        A parameter whose gradient is None on every rank of the scope keeps None (an unused
        parameter is not decayed); one that is None on some ranks counts as zero there.
        """
        group, ranks = self.scope(phase)
        if not (len(ranks) > 1 and self.comm.active()):
            grads = [p.grad for p in params if p.grad is not None]
            bad = bool(nonfinite(grads, self.comm.device).item())
            return StepHealth(bad, [0] if bad else [])
        if self.overlap is not None and self.overlap.armed:
            # The gradients went out during backward; the flags, the non-finite count and
            # the buffers rode in the last bucket (or, when they could not, go now).
            sent_bad, tail = self.overlap.finish()
            grads = [p.grad for p in params]
            if tail is None:  # another dtype, or buffers beside a narrow wire
                tail = self._tail(params, self.overlap.used, sent_bad)
                self.comm.mean_(tail.tensors, group, ranks, phase, wire=False)
        else:
            # After backward: the same tail (flags, non-finite count, buffers) rides in the
            # gradient all-reduce, or beside it under a narrow wire with float buffers.
            had = {id(p): p.grad is not None for p in params}
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            tail = self._tail(params, had, nonfinite(grads, self.comm.device))
            if self.comm.wire_dtype is None or not self.buffers:  # flags: any wire
                self.comm.mean_(grads + tail.tensors, group, ranks, phase)
            else:
                self.comm.mean_(grads, group, ranks, phase)
                self.comm.mean_(tail.tensors, group, ranks, phase, wire=False)
        return self._conclude(phase, params, grads, tail, group, ranks)

    def _conclude(self, phase: Phase, params: list[nn.Parameter], grads: list[torch.Tensor],
                  tail: Tail, group: Any, ranks: tuple[int, ...]) -> StepHealth:
        """Read the reduced flags: drop the gradients no rank had, learn the unused modules,
        agree on a skip over the world, and mend the buffers of a skipped step."""
        used = tail.flags
        kind = grads[0] if grads else used
        # The reduced sum can overflow although every rank's own gradients are finite.
        reduced_bad = nonfinite(grads, kind.device)
        values = torch.cat([used, reduced_bad.to(used.dtype).view(1)]).tolist()
        for p, u in zip(params, values[:-2], strict=True):
            if u == 0.0:
                p.grad = None
        if self.overlap is not None:
            self._learn_unused(phase, params, values[:-2])
        bad = values[-2] > 0 or values[-1] > 0
        if phase == Phase.AB and self.groups.plan.num_groups > 1:
            # The groups share no collective in an AB phase: one number tells the world.
            bad = self.comm.max_int([int(bad)], self.groups.world, self.groups.world_ranks,
                                    TrafficLabel.CHECK)[0] > 0
        if not bad:
            return StepHealth(False, [])
        local_bad = bool(tail.local_bad.item())
        nonfinite_ranks = ranks_with(self.comm, self.groups, local_bad)
        self._mend_buffers(phase, tail.own_buffers, local_bad, round(values[-2] * len(ranks)),
                           group, ranks)
        return StepHealth(True, nonfinite_ranks)

    def _mend_buffers(self, phase: Phase, own: list[torch.Tensor], local_bad: bool, n_bad: int,
                      group: Any, ranks: tuple[int, ...]) -> None:
        """A skipped step must not spread one rank's non-finite buffers (BatchNorm statistics
        of a NaN forward) through the mean that just ran: average the finite ranks' own values
        instead (an extra collective, on this failure path only)."""
        if n_bad == 0 or not self.buffers:
            return  # the scope's mean was of finite buffers
        for buf, saved in zip(self.buffers, own, strict=True):
            buf.copy_(saved)
        finite = len(ranks) - n_bad
        if finite > 0:
            if local_bad:  # contribute nothing (a weight of 0 would turn inf into NaN)
                for buf in self.buffers:
                    buf.zero_()
            self.comm.mean_(self.buffers, group, ranks, phase,
                            weights=[1.0 / finite] * len(self.buffers), divisor=1.0)

    def _learn_unused(self, phase: Phase, params: list[nn.Parameter], used: list[float]) -> None:
        """Modules that got no gradient on any rank of the scope go to the last buckets from
        the next step on (the flags are the reduced ones: every rank learns the same)."""
        scope = self.scope(phase)[1]
        if all(used) and not self._unused_layers.get(scope):
            return  # the common step: everything got a gradient, as in the last one
        names = self.module_of()
        unused = {names.get(id(p), "") for p, u in zip(params, used, strict=True) if u == 0.0}
        used_layers = {names.get(id(p), "") for p, u in zip(params, used, strict=True) if u}
        unused -= used_layers
        if unused != self._unused_layers.get(scope, set()):
            self._unused_layers[scope] = unused
            self.arm(phase, params)


class OverlapReducer:
    """Launches the gradient means of one step during backward; see the module docstring."""

    def __init__(self, comm: Communicator, bucket_bytes: int,
                 should_launch: Callable[[], bool], first_bucket_bytes: int = 2**20) -> None:
        self.comm = comm
        self.bucket_bytes = int(bucket_bytes)
        self.first_bucket_bytes = min(int(first_bucket_bytes), self.bucket_bytes)
        self.should_launch = should_launch
        self._tail: Callable[[dict[int, bool], torch.Tensor], Tail] | None = None
        self._buckets: list[list[nn.Parameter]] = []
        self._bucket_of: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._scope: tuple[Any, tuple[int, ...], str] = (None, (), "")
        self._reset_step()

    # ------------------------------------------------------------------ arming
    def arm(self, params: list[nn.Parameter], group: Any, ranks: tuple[int, ...],
            phase: str, deferred: set[int] | frozenset[int] = frozenset(),
            tail: Callable[[dict[int, bool], torch.Tensor], Tail] | None = None,
            tail_on_wire: bool = False) -> None:
        """(Re)build the buckets of ``params`` (the trained parameters, in a rank-independent
        order) for reductions over ``ranks``, and hook them; the parameters whose ids are in
        ``deferred`` (unused last step) go last; ``tail`` rides in the last bucket (see the
        module docstring). Call after every switch."""
        self.disarm()
        self._scope, self._tail, self._tail_on_wire = (group, ranks, phase), tail, tail_on_wire
        if len(ranks) <= 1 or not self.comm.active():
            return
        ordered = list(reversed(params))
        ordered = ([p for p in ordered if id(p) not in deferred]
                   + [p for p in ordered if id(p) in deferred])
        by_kind: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in ordered:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for kind_params in by_kind.values():
            bucket: list[nn.Parameter] = []
            size = 0
            for p in kind_params:
                nbytes = p.numel() * p.element_size()
                cap = self.bucket_bytes if self._buckets else self.first_bucket_bytes
                if bucket and size + nbytes > cap:
                    self._buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(p)
                size += nbytes
            if bucket:
                self._buckets.append(bucket)
        for index, bucket in enumerate(self._buckets):
            for p in bucket:
                self._bucket_of[id(p)] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._ready))
        self._reset_step()

    def disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._buckets, self._bucket_of = [], [], {}
        self._reset_step()

    @property
    def armed(self) -> bool:
        return bool(self._buckets)

    def _reset_step(self) -> None:
        self._ready_count = [0] * len(self._buckets)
        self._seen: set[int] = set()
        self._pending: list[PendingMean] = []
        self._next = 0
        self._local_bad: torch.Tensor | None = None
        self._used: dict[int, bool] = {}
        self.tail: Tail | None = None
        self.used: dict[int, bool] = {}

    # ------------------------------------------------------------------ during backward
    def _ready(self, param: torch.Tensor) -> None:
        if not self.should_launch():
            return  # an accumulation micro-step: the gradient keeps accumulating locally
        key = id(param)
        if key in self._seen:
            raise RuntimeError(
                "A parameter received its gradient twice before the optimizer step, with the "
                "overlapped reduction already launched for it. For gradient accumulation, run "
                "every backward but the last inside `with optimizer.no_sync():` (Accelerate, "
                "DeepSpeed and the Trainer do this for you), or set ab_training.overlap=false.")
        self._seen.add(key)
        index = self._bucket_of[key]
        self._ready_count[index] += 1
        while (self._next < len(self._buckets)
               and self._ready_count[self._next] == len(self._buckets[self._next])):
            self._launch(self._next)

    def _launch(self, index: int) -> None:
        group, ranks, phase = self._scope
        grads = []
        for p in self._buckets[index]:
            self._used[id(p)] = p.grad is not None
            if p.grad is None:  # no gradient on this rank: it counts as zero (as unoverlapped)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bad = nonfinite(grads, grads[0].device)
        self._local_bad = bad if self._local_bad is None else self._local_bad | bad
        tensors = grads
        if self._tail is not None and index == len(self._buckets) - 1:
            extra = self._tail(self._used, self._local_bad)
            kind = (grads[0].dtype, grads[0].device)
            wire_ok = self.comm.wire_dtype is None or self._tail_on_wire
            if wire_ok and all((t.dtype, t.device) == kind for t in extra.tensors):
                tensors, self.tail = grads + extra.tensors, extra
        self._pending.append(self.comm.launch_mean(tensors, group, ranks, phase))
        self._next = index + 1

    # ------------------------------------------------------------------ at the step
    def finish(self) -> tuple[torch.Tensor | None, Tail | None]:
        """Launch the buckets still waiting, wait for all of them. Returns whether any gradient
        this rank sent was non-finite (a 0-d bool tensor; None if nothing was sent) and the
        :class:`Tail` that rode in the last bucket (None: it could not, send it apart).
        Afterwards :attr:`used` says which parameters had a gradient of their own on this
        rank (by id)."""
        while self._next < len(self._buckets):
            self._launch(self._next)
        for pending in self._pending:
            pending.wait()
        bad, tail, used = self._local_bad, self.tail, self._used
        self._reset_step()
        self.used = used
        return bad, tail


__all__ = ["Communicated", "OverlapReducer", "StepHealth", "StepReduction", "Tail",
           "communicated", "dp_equivalent_bytes"]
