"""What the benchmark measures, and how.

* :class:`CollectiveCounter` counts the payload of every ``torch.distributed`` collective this
  process makes while it is active: it replaces ``dist.all_reduce`` (and broadcast, all_gather)
  by a wrapper that records the bytes of the tensor passed, the op and the group, then calls the
  real function. DDP's comm hooks (torch's ``allreduce_hook``, ``powerSGD_hook``,
  ``post_localSGD_hook``) and ``PeriodicModelAverager`` all call ``dist.all_reduce`` from
  Python, so their traffic is counted as it goes out, callbacks of chained futures included.
  ab_accel's own collectives go through the same functions, so for AB runs the counter is an
  independent check of ``opt.traffic`` (they must agree exactly).
* What plain DDP hands its comm hook (its DP-equivalent) is counted by ab_accel's own
  :class:`ab_accel.ddp.DDPTraffic`, around whichever hook a method runs.
* :func:`link_counters` reads the kernel's byte counters of a network interface
  (``/proc/net/dev`` of the caller's network namespace).
* :func:`predicted_link_bytes` turns per-rank collective records into the bytes a ring
  all-reduce sends over the links between nodes, for comparison with the kernel counters.

Byte conventions (the same as ab_accel's TrafficMeter): ``bytes`` is the payload passed to
torch.distributed; ``wire_bytes`` is the ring estimate of bytes sent per rank (an all-reduce
over g ranks sends 2(g-1)/g of its payload).
"""

from __future__ import annotations

import functools
import inspect
import resource
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ab_accel.comm import wire_factor

_COUNTED_OPS = {"all_reduce": "all_reduce", "broadcast": "broadcast", "all_gather": "all_gather",
                "all_gather_into_tensor": "all_gather"}


def group_ranks(group: Any) -> tuple[int, ...]:
    """Global ranks of ``group`` (None or WORLD: every rank)."""
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


class CollectiveCounter:
    """Counts payload bytes of torch.distributed collectives by (op, group), while active."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._originals: dict[str, Callable[..., Any]] = {}
        self.active = False
        self.reset()

    def reset(self) -> None:
        with self._lock:
            # (op, group ranks) -> [calls, payload bytes, wire bytes]
            self._records: dict[tuple[str, tuple[int, ...]], list[float]] = defaultdict(
                lambda: [0, 0, 0.0])

    def install(self) -> CollectiveCounter:
        """Wrap the collectives of torch.distributed (idempotent). They still really run."""
        for name, op in _COUNTED_OPS.items():
            if name in self._originals or not hasattr(dist, name):
                continue
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(original, op))

        # DDP broadcasts its module buffers (BatchNorm statistics) from rank 0 before every
        # forward through this private C++ binding, not through dist.broadcast.
        if "_broadcast_coalesced" not in self._originals and hasattr(dist, "_broadcast_coalesced"):
            original = dist._broadcast_coalesced
            self._originals["_broadcast_coalesced"] = original

            @functools.wraps(original)
            def counted(group: Any, tensors: list[torch.Tensor], *args: Any, **kwargs: Any
                        ) -> Any:
                if self.active:
                    self.record("broadcast", sum(t.numel() * t.element_size() for t in tensors),
                                group_ranks(group))
                return original(group, tensors, *args, **kwargs)

            dist._broadcast_coalesced = counted
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _wrap(self, original: Callable[..., Any], op: str) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                bound = signature.bind(*args, **kwargs)
                group = bound.arguments.get("group")
                tensor = bound.arguments.get("tensor")
                if op == "all_gather":
                    tensor = bound.arguments.get("input_tensor", tensor)
                if isinstance(tensor, torch.Tensor):
                    self.record(op, tensor.numel() * tensor.element_size(), group_ranks(group))
            return original(*args, **kwargs)

        return counted

    def record(self, op: str, nbytes: int, ranks: Sequence[int]) -> None:
        if len(ranks) <= 1:
            return
        with self._lock:
            rec = self._records[(op, tuple(ranks))]
            rec[0] += 1
            rec[1] += int(nbytes)
            rec[2] += nbytes * wire_factor(op, len(ranks))

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"op": op, "group": list(g), "calls": int(c), "bytes": int(b),
                     "wire_bytes": float(w)}
                    for (op, g), (c, b, w) in sorted(self._records.items())]

    @property
    def bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.records))

    @property
    def wire_bytes(self) -> float:
        return float(sum(r["wire_bytes"] for r in self.records))


def link_counters(interface: str) -> dict[str, int]:
    """rx/tx bytes and packets of ``interface`` in this process's network namespace."""
    with open("/proc/net/dev") as fh:
        for line in fh:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == interface:
                f = rest.split()
                return {"rx_bytes": int(f[0]), "rx_packets": int(f[1]),
                        "tx_bytes": int(f[8]), "tx_packets": int(f[9])}
    raise RuntimeError(f"interface {interface!r} not found in /proc/net/dev of this namespace")


def ring_crossings(ranks: Sequence[int], node_of: Callable[[int], int]) -> int:
    """How many edges of the ring ranks[0] -> ranks[1] -> ... -> ranks[0] join two nodes."""
    g = len(ranks)
    if g <= 1:
        return 0
    return sum(node_of(ranks[i]) != node_of(ranks[(i + 1) % g]) for i in range(g))


def predicted_link_bytes(records: Iterable[dict[str, Any]], node_of: Callable[[int], int]
                         ) -> float:
    """Bytes one rank's collectives put on inter-node links, summed over both directions.

    In a ring every rank sends its wire bytes to its right neighbour; a ring over g ranks with
    c edges between nodes puts c * wire bytes on those links, a share c / g per member. Summing
    this over every rank's records gives the total the kernels of the nodes count as sent.
    """
    total = 0.0
    for rec in records:
        group = rec["group"]
        total += rec["wire_bytes"] * ring_crossings(group, node_of) / len(group)
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                extra: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the training state now: parameters, their gradients, the optimizer state and
    ``extra`` tensors (e.g. PowerSGD's error-feedback memory)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(p.grad)
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                add(v)
    for t in extra:
        add(t)
    return total


def max_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
