"""Gradient reduction overlapped with backward: buckets launched as their gradients are ready.

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
  bad)`` returns the tensors to append (the ABOptimizer's flags, non-finite count and float
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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .comm import Communicator, PendingMean, nonfinite


class OverlapReducer:
    """Launches the gradient means of one step during backward; see the module docstring."""

    def __init__(self, comm: Communicator, bucket_bytes: int,
                 should_launch: Callable[[], bool], first_bucket_bytes: int = 2**20) -> None:
        self.comm = comm
        self.bucket_bytes = int(bucket_bytes)
        self.first_bucket_bytes = min(int(first_bucket_bytes), self.bucket_bytes)
        self.should_launch = should_launch
        self._tail: Callable[[dict[int, bool], torch.Tensor], list[torch.Tensor]] | None = None
        self._buckets: list[list[nn.Parameter]] = []
        self._bucket_of: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._scope: tuple[Any, tuple[int, ...], str] = (None, (), "")
        self._reset_step()

    # ------------------------------------------------------------------ arming
    def arm(self, params: list[nn.Parameter], group: Any, ranks: tuple[int, ...],
            phase: str, deferred: set[int] | frozenset[int] = frozenset(),
            tail: Callable[[dict[int, bool], torch.Tensor], list[torch.Tensor]] | None = None,
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
        self.tail_sent, self.used = False, {}

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
            if wire_ok and all((t.dtype, t.device) == kind for t in extra):
                tensors, self.tail_sent = grads + extra, True
        self._pending.append(self.comm.launch_mean(tensors, group, ranks, phase))
        self._next = index + 1

    # ------------------------------------------------------------------ at the step
    def finish(self) -> torch.Tensor | None:
        """Launch the buckets still waiting, wait for all of them. Returns whether any gradient
        this rank sent was non-finite (a 0-d bool tensor; None if nothing was sent)."""
        while self._next < len(self._buckets):
            self._launch(self._next)
        for pending in self._pending:
            pending.wait()
        bad, sent, used = self._local_bad, self.tail_sent, self._used
        self._reset_step()
        #: after finish(): whether the tail rode in the last bucket, and which parameters had
        #: a gradient of their own on this rank (by id)
        self.tail_sent, self.used = sent, used
        return bad


__all__ = ["OverlapReducer"]
