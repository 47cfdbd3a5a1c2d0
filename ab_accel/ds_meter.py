"""The traffic meter on DeepSpeed's own collectives (``deepspeed.comm``): what DeepSpeed's ZeRO
optimizer sends under AB-training, counted by payload, dtype and group, with the phase's label.

A collective is counted only while a meter is pushed (:func:`metered`): a
:class:`~ab_accel.zero.ZeroScope` pushes itself around its engine's ``backward`` and optimizer
step, so another engine's traffic never lands in its meter; :class:`PlainMeter` counts a run
without AB-training (a benchmark's baseline). A meter is any object with ``label()`` (the phase
label of the collectives now) and ``traffic`` (a :class:`~ab_accel.comm.TrafficMeter`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from . import patches
from .vocab import TrafficLabel

#: deepspeed.comm collectives -> (the meter's op, index of the payload tensor in the args).
COLLECTIVES = {
    "all_reduce": ("all_reduce", 0), "inference_all_reduce": ("all_reduce", 0),
    "reduce": ("reduce", 0), "broadcast": ("broadcast", 0),
    "all_gather": ("all_gather", 1), "all_gather_into_tensor": ("all_gather", 1),
    "allgather_fn": ("all_gather", 1), "reduce_scatter_tensor": ("reduce_scatter", 1),
    "reduce_scatter_fn": ("reduce_scatter", 1), "all_to_all_single": ("all_to_all", 1),
}
_METERS: list[Any] = []  # the meters pushed now, innermost last


def _group_ranks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _counting(name: str, fn: Any) -> Any:
    """``fn`` (deepspeed.comm's ``name``), counting its payload into the innermost meter."""
    op, index = COLLECTIVES[name]

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        if _METERS:
            meter = _METERS[-1]
            tensor = args[index] if len(args) > index else kwargs.get(
                "tensor", kwargs.get("input_tensor", kwargs.get("input")))
            if torch.is_tensor(tensor):
                meter.traffic.record(op, tensor.numel() * tensor.element_size(),
                                     _group_ranks(args, kwargs), meter.label())
        return fn(*args, **kwargs)

    return collective


def install() -> None:
    """Route deepspeed.comm's collectives through the meters (once per process; a collective
    made while no meter is pushed passes through untouched)."""
    patches.wrap_deepspeed_collectives(list(COLLECTIVES), _counting)


@contextlib.contextmanager
def metered(meter: Any) -> Iterator[None]:
    """Count DeepSpeed's collectives into ``meter`` inside this block."""
    install()
    _METERS.append(meter)
    try:
        yield
    finally:
        _METERS.remove(meter)


class PlainMeter:
    """A meter for DeepSpeed's collectives without AB-training (a benchmark's baseline):
    every collective under ``label`` into ``traffic`` (a :class:`~ab_accel.comm.TrafficMeter`).
    Use as a context manager around the run."""

    def __init__(self, traffic: Any, label: str = str(TrafficLabel.WARMUP)) -> None:
        self.traffic, self._label = traffic, label
        self._block: contextlib.AbstractContextManager[None] | None = None

    def label(self) -> str:
        return self._label

    def __enter__(self) -> PlainMeter:
        self._block = metered(self)
        self._block.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._block is not None
        self._block.__exit__(*exc)


__all__ = ["COLLECTIVES", "install", "metered", "PlainMeter"]
