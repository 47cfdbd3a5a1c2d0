"""Every collective of ab_accel goes through here, and through the :class:`TrafficMeter`.

The meter is per rank. The payload of a collective is the bytes of the tensor this rank passes
to torch.distributed (its input for a gather). The wire estimate is the ring algorithm's bytes
sent per rank: an all-reduce over g ranks sends 2(g-1)/g of its payload, a broadcast (g-1)/g
(pipelined chain), an all-gather (g-1) times its input.

The meter also keeps the *DP-equivalent* count: what plain DDP would have all-reduced on this
rank for the same optimizer steps (all trainable dense gradients plus floating-point buffers,
over the world), so that ``summary()["reduction"]`` is measured against an exact baseline.

Collectives over a group of one rank move nothing and are skipped (and not counted).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .vocab import TrafficLabel

#: Coalesce tensors into flat buffers of at most this many bytes per collective (like DDP's
#: 25 MiB buckets): few calls, bounded extra memory.
BUCKET_BYTES = 32 * 1024 * 1024

#: The meter's labels, in the order summaries list them.
PHASES: tuple[TrafficLabel, ...] = tuple(TrafficLabel)


def wire_factor(op: str, group_size: int) -> float:
    """Bytes sent per rank per payload byte, for the ring algorithm."""
    g = group_size
    if g <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (g - 1) / g
    if op in ("broadcast", "reduce", "reduce_scatter", "all_to_all"):
        # a ring broadcast or reduce (to one root), a reduce-scatter, an all-to-all: each rank
        # sends (g-1)/g of its payload
        return (g - 1) / g
    if op == "all_gather":
        return float(g - 1)
    raise ValueError(f"unknown collective {op!r}")


class PendingMean:
    """An asynchronous bucket mean of :meth:`Communicator.launch_mean`; wait() finishes it."""

    def __init__(self, comm: Communicator, work: Any, flat: torch.Tensor, wire: torch.Tensor,
                 tensors: list[torch.Tensor], denom: float | None, ranks: Sequence[int],
                 phase: str) -> None:
        self.comm, self.work, self.flat, self.wire = comm, work, flat, wire
        self.tensors, self.denom, self.ranks, self.phase = tensors, denom, ranks, phase

    def wait(self) -> None:
        if self.work is not None:
            self.comm._run(self.work.wait, "all-reduce", self.ranks, self.phase)
        if self.wire is not self.flat:
            self.flat.copy_(self.wire)
        if self.denom is not None:
            self.flat.div_(self.denom)
        offset = 0
        for t in self.tensors:
            t.copy_(self.flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class PeerError(RuntimeError):
    """A collective failed because a peer died or stopped answering; names phase and step."""


class TrafficMeter:
    """Counts the bytes of every collective, by phase, op and group."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # (phase, op, group ranks) -> [calls, payload bytes, wire bytes]
        self._records: dict[tuple[str, str, tuple[int, ...]], list[float]] = defaultdict(
            lambda: [0, 0, 0.0]
        )
        self.dp_equivalent_bytes = 0
        self.dp_equivalent_wire_bytes = 0.0
        self.steps = 0
        self.steps_by_phase: dict[str, int] = defaultdict(int)
        #: [wire bytes, DP-equivalent wire bytes] of every optimizer step, its switches included
        #: (:meth:`mark_step`): this rank's traffic over time, for plots.
        self.per_step: list[list[float]] = []
        self._marked = (0.0, 0.0)

    # -------------------------------------------------------------- recording
    def record(self, op: str, nbytes: int, group_ranks: Sequence[int], phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase label {phase!r}")
        key = (str(phase), op, tuple(group_ranks))  # plain strings: checkpoints load anywhere
        rec = self._records[key]
        rec[0] += 1
        rec[1] += int(nbytes)
        rec[2] += nbytes * wire_factor(op, len(group_ranks))

    def record_step(self, phase: str, dp_bytes: int, world_size: int) -> None:
        """One optimizer step ran in ``phase``; DDP would have all-reduced ``dp_bytes``."""
        self.steps += 1
        self.steps_by_phase[str(phase)] += 1
        self.dp_equivalent_bytes += int(dp_bytes) if world_size > 1 else 0
        self.dp_equivalent_wire_bytes += dp_bytes * wire_factor("all_reduce", world_size)

    def mark_step(self) -> None:
        """An optimizer step ended (its switches too): append its bytes to :attr:`per_step`."""
        now = (self.wire_bytes, self.dp_equivalent_wire_bytes)
        self.per_step.append([now[0] - self._marked[0], now[1] - self._marked[1]])
        self._marked = now

    # -------------------------------------------------------------- reading
    @property
    def records(self) -> list[dict[str, Any]]:
        """One row per (phase, op, group): calls, bytes, wire_bytes, group ranks."""
        return [
            {"phase": p, "op": op, "group": list(g), "calls": int(c), "bytes": int(b),
             "wire_bytes": w}
            for (p, op, g), (c, b, w) in sorted(self._records.items())
        ]

    def groups_touched(self, phase: str) -> set[tuple[int, ...]]:
        return {g for (p, _, g) in self._records if p == phase}

    @property
    def bytes(self) -> int:
        return int(sum(rec[1] for rec in self._records.values()))

    @property
    def wire_bytes(self) -> float:
        return float(sum(rec[2] for rec in self._records.values()))

    def summary(self) -> dict[str, Any]:
        by_phase: dict[str, int] = {str(p): 0 for p in PHASES}
        wire_by_phase: dict[str, float] = {str(p): 0.0 for p in PHASES}
        calls = 0
        for (p, _, _), (c, b, w) in self._records.items():
            by_phase[p] += int(b)
            wire_by_phase[p] += w
            calls += int(c)
        wire = self.wire_bytes
        dp_wire = self.dp_equivalent_wire_bytes
        return {
            "bytes": self.bytes,
            "wire_bytes": wire,
            "calls": calls,
            "bytes_by_phase": by_phase,
            "wire_bytes_by_phase": wire_by_phase,
            "steps": self.steps,
            "steps_by_phase": dict(self.steps_by_phase),
            "dp_equivalent_bytes": self.dp_equivalent_bytes,
            "dp_equivalent_wire_bytes": dp_wire,
            "reduction": (1.0 - wire / dp_wire) if dp_wire > 0 else 0.0,
        }

    # -------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [[p, op, list(g), c, b, w] for (p, op, g), (c, b, w)
                        in self._records.items()],
            "dp_equivalent_bytes": self.dp_equivalent_bytes,
            "dp_equivalent_wire_bytes": self.dp_equivalent_wire_bytes,
            "steps": self.steps,
            "steps_by_phase": dict(self.steps_by_phase),
            "per_step": [list(v) for v in self.per_step],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for p, op, g, c, b, w in state["records"]:
            self._records[(p, op, tuple(g))] = [c, b, w]
        self.dp_equivalent_bytes = state["dp_equivalent_bytes"]
        self.dp_equivalent_wire_bytes = state["dp_equivalent_wire_bytes"]
        self.steps = state["steps"]
        self.steps_by_phase.update(state["steps_by_phase"])
        self.per_step = [list(v) for v in state.get("per_step", [])]
        self._marked = (self.wire_bytes, self.dp_equivalent_wire_bytes)


def world_traffic(meter: Any = None) -> dict[str, Any]:
    """The run's traffic: every rank's meter summed over the world. Collective (every rank).

    ``meter``: this rank's :class:`TrafficMeter` (``ABOptimizer.traffic``), an
    :class:`ab_accel.ddp.DDPTraffic` (what plain DDP sends), or None (nothing was sent: one
    process). Returns ``bytes`` and ``wire_bytes`` (payload, and its ring estimate), their
    ``wire_bytes_by_phase`` and, for a TrafficMeter, ``dp_equivalent_wire_bytes`` (plain DP's
    wire bytes for the same steps) and ``reduction_vs_dp``, each summed over the ranks;
    ``per_rank`` (every rank's ``summary()``), ``per_step`` ([wire, DP-equivalent wire] bytes
    of every step, the mean over the ranks; DP-equivalent 0 for DDPTraffic), ``measured_by``.
    """
    if meter is None:
        mine: tuple[dict[str, Any], list] = ({"bytes": 0, "wire_bytes": 0.0}, [])
    else:
        mine = (meter.summary(), [r if isinstance(r, list) else [r, 0.0] for r in meter.per_step])
    ranks = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    summaries = [s for s, _ in ranks]
    by_phase: dict[str, float] = defaultdict(float)
    for s in summaries:
        for phase, wire in s.get("wire_bytes_by_phase", {}).items():
            by_phase[phase] += wire
    out: dict[str, Any] = {
        "bytes": sum(s["bytes"] for s in summaries),
        "wire_bytes": sum(s["wire_bytes"] for s in summaries),
        "wire_bytes_by_phase": dict(by_phase), "per_rank": summaries,
        "per_step": [[sum(col) / len(ranks) for col in zip(*rows, strict=True)]
                     for rows in zip(*(steps for _, steps in ranks), strict=True)],
        "measured_by": "nothing sent (one process)" if meter is None else
        summaries[0].get("measured_by", "ab_accel's traffic meter")}
    dp = sum(s.get("dp_equivalent_wire_bytes", 0.0) for s in summaries)
    if dp:
        out.update(dp_equivalent_wire_bytes=dp, reduction_vs_dp=1.0 - out["wire_bytes"] / dp)
    return out


class Communicator:
    """The reduce helpers. Holds the meter; every collective of ab_accel is one of these calls.

    ``group`` arguments are (process group handle or None for the default group, ranks tuple).
    ``device`` is where the small tensors it makes itself (ranks, digests, flags) live: the
    device of the model's parameters, since an NCCL process group reduces CUDA tensors only.
    """

    def __init__(self, meter: TrafficMeter | None = None,
                 device: torch.device | str = "cpu",
                 where: Callable[[], str] | None = None) -> None:
        self.meter = meter if meter is not None else TrafficMeter()
        self.device = torch.device(device)
        #: The dtype of floating-point payloads on the wire (None: their own); see launch_mean.
        self.wire_dtype: torch.dtype | None = None
        #: Says where training is (the optimizer's step) for the error of a failed collective.
        self.where = where or (lambda: "")

    def _run(self, call: Callable[[], Any], op: str, ranks: Sequence[int], phase: str) -> None:
        """A torch.distributed call; a failure (a dead or silent peer: gloo and NCCL raise once
        the peer's connection drops or the group's timeout passes) names the phase and step."""
        try:
            call()
        except (RuntimeError, dist.DistError) as exc:
            where = self.where()
            raise PeerError(
                f"The {op} of the {phase} phase{' at ' + where if where else ''} over ranks "
                f"{list(ranks)} failed: a peer process died or stopped answering ({exc}). "
                f"Resume every rank from the last complete checkpoint (the recipes: "
                f"--resume_from_checkpoint latest; torchrun --max-restarts does it for you); "
                f"ab_training.collective_timeout_s sets how long a collective waits.") from exc

    @staticmethod
    def active() -> bool:
        return dist.is_available() and dist.is_initialized()

    # -------------------------------------------------------------- primitives
    def all_reduce(self, tensor: torch.Tensor, group: Any, ranks: Sequence[int], phase: str,
                   op: Any = None) -> torch.Tensor:
        if len(ranks) <= 1 or not self.active():
            return tensor
        self.meter.record("all_reduce", tensor.numel() * tensor.element_size(), ranks, phase)
        self._run(lambda: dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM,
                                          group=group), "all-reduce", ranks, phase)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int, group: Any, ranks: Sequence[int],
                  phase: str) -> torch.Tensor:
        """Broadcast from global rank ``src``."""
        if len(ranks) <= 1 or not self.active():
            return tensor
        self.meter.record("broadcast", tensor.numel() * tensor.element_size(), ranks, phase)
        self._run(lambda: dist.broadcast(tensor, src=src, group=group), "broadcast", ranks, phase)
        return tensor

    # -------------------------------------------------------------- coalesced helpers
    def mean_(self, tensors: Iterable[torch.Tensor], group: Any, ranks: Sequence[int],
              phase: str, weights: Sequence[float] | None = None,
              divisor: float | None = None, wire: bool = True) -> None:
        """In place: every tensor <- the mean of that tensor over ``ranks``.

        Tensors are coalesced into flat buckets per dtype and device. With ``weights`` (one
        scalar per tensor), this rank contributes ``weight * tensor``; ``divisor`` replaces the
        group size as the denominator (used to average over a subset of the ranks).
        ``wire=False`` sends them in their own dtype whatever :attr:`wire_dtype` says.
        """
        tensors = list(tensors)
        if len(ranks) <= 1 or not self.active() or not tensors:
            if weights is not None and divisor is not None:
                for t, w in zip(tensors, weights, strict=True):
                    t.mul_(w / divisor)
            return
        scale = [1.0] * len(tensors) if weights is None else list(weights)
        for bucket in _buckets(tensors):
            self.launch_mean([tensors[i] for i in bucket], group, ranks, phase,
                             [scale[i] for i in bucket], divisor, wire).wait()

    def launch_mean(self, tensors: list[torch.Tensor], group: Any, ranks: Sequence[int],
                    phase: str, weights: Sequence[float] | None = None,
                    divisor: float | None = None, wire: bool = True) -> PendingMean:
        """Start the mean of one bucket (tensors of one dtype and device) as an asynchronous
        all-reduce; :meth:`PendingMean.wait` finishes it and writes the result back.

        With a ``wire_dtype`` narrower than the tensors', the bucket is divided by the
        denominator in its own precision first (so the sum on the wire cannot exceed the
        largest value a rank sent), cast to the wire dtype, summed by the collective, and cast
        back into the tensors' precision: what torch's bf16/fp16 compression hooks do. The
        meter counts the bytes sent, in the wire dtype.
        """
        denom = float(divisor if divisor is not None else len(ranks))
        scale = [1.0] * len(tensors) if weights is None else list(weights)
        flat = torch.cat([(t * w if w != 1.0 else t).reshape(-1)
                          for t, w in zip(tensors, scale, strict=True)])
        payload = flat
        cast = (wire and self.wire_dtype is not None and flat.is_floating_point()
                and flat.element_size() > torch.empty((), dtype=self.wire_dtype).element_size())
        if cast:
            flat.div_(denom)
            payload = flat.to(self.wire_dtype)
        work = None
        if len(ranks) > 1 and self.active():
            self.meter.record("all_reduce", payload.numel() * payload.element_size(), ranks,
                              phase)
            holder: list[Any] = []
            self._run(lambda: holder.append(dist.all_reduce(payload, group=group,
                                                            async_op=True)),
                      "all-reduce", ranks, phase)
            work = holder[0]
        return PendingMean(self, work, flat, payload, tensors, None if cast else denom, ranks,
                           phase)

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int, group: Any,
                   ranks: Sequence[int], phase: str) -> None:
        tensors = list(tensors)
        if len(ranks) <= 1 or not self.active() or not tensors:
            return
        for bucket in _buckets(tensors):
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            self.broadcast(flat, src, group, ranks, phase)
            offset = 0
            for i in bucket:
                t = tensors[i]
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_gather(self, tensor: torch.Tensor, group: Any, ranks: Sequence[int], phase: str
                   ) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in the order of ``ranks`` (the payload is this rank's)."""
        if len(ranks) <= 1 or not self.active():
            return [tensor]
        self.meter.record("all_gather", tensor.numel() * tensor.element_size(), ranks, phase)
        out = [torch.empty_like(tensor) for _ in ranks]
        self._run(lambda: dist.all_gather(out, tensor, group=group), "all-gather", ranks, phase)
        return out

    def flags_of(self, flag: bool, group: Any, ranks: Sequence[int], phase: str
                 ) -> list[bool]:
        """Every rank's boolean ``flag``, in the order of ``ranks`` (one all-gather)."""
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        return [bool(v.item()) for v in self.all_gather(t, group, ranks, phase)]

    def max_int(self, values: Sequence[int], group: Any, ranks: Sequence[int], phase: str
                ) -> list[int]:
        """Element-wise maximum of an integer vector over ``ranks``."""
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        t = self.all_reduce(t, group, ranks, phase, op=dist.ReduceOp.MAX if self.active()
                            else None)
        return [int(v) for v in t.tolist()]

    def agree(self, digest: Sequence[float], group: Any, ranks: Sequence[int], phase: str
              ) -> bool:
        """True when every rank passed the same ``digest`` vector (one MAX all-reduce)."""
        if len(ranks) <= 1 or not self.active():
            return True
        d = torch.tensor(list(digest), dtype=torch.float64, device=self.device)
        both = torch.cat([d, -d])
        self.all_reduce(both, group, ranks, phase, op=dist.ReduceOp.MAX)
        n = d.numel()
        return bool(torch.equal(both[:n], -both[n:]))


def nonfinite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor: does any of ``tensors`` hold a NaN or an inf? (No host sync.)

    Read from each tensor's sum: a NaN or an inf anywhere makes the sum NaN or inf (IEEE
    addition propagates both, and inf - inf is NaN), and a sum is one pass over the memory,
    where ``isfinite(t).all()`` writes a bool tensor of ``t``'s size first (about 40 times
    slower on CPU for a 2 MiB gradient). Half-precision tensors are summed in float32, so the
    only false alarm is a sum beyond float32's range (about 3e38), which gradients and
    statistics reach only when the step is broken anyway.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.bool, device=device)
    sums = [t.sum(dtype=torch.float32) if t.is_floating_point() and t.element_size() < 4
            else t.sum() for t in tensors]
    return ~torch.stack(sums).isfinite().all()


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), each bucket <= BUCKET_BYTES."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_kind[(t.dtype, t.device)].append(i)
    out: list[list[int]] = []
    for idx in by_kind.values():
        current: list[int] = []
        size = 0
        for i in idx:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and size + nbytes > BUCKET_BYTES:
                out.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            out.append(current)
    return out
