"""What the distributed tests share: small models and data, a spy on torch.distributed's
collectives, tensor comparisons. Each test file holds its own rank functions (run on every rank
of a real gloo world by tests/distributed.py) beside the asserts on what the ranks return."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ab_accel import (
    ABConfig,
    ABOptimizer,
)

SYNC_MODES = ("with-stale", "only-learned", "full", "only-b")


def small_cnn() -> nn.Module:
    """Stem conv (dense) -> BN -> conv (AB) -> BN -> linear (AB) -> linear (AB) -> head (dense)."""
    return nn.Sequential(
        # No conv bias before a BatchNorm: its gradient is pure rounding noise, which Adam
        # would amplify into different updates under any change of summation order.
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10),
    )


def batch(rank: int, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-(rank, step) data, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(1000 * step + rank + 7)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.cross_entropy(model(x), y)


def flat_named(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()
                if b.is_floating_point()})
    return out


#: Where a collective's payload (what this rank passes in) sits: the input of a gather or a
#: reduce-scatter is its second argument (the first is the output).
_INPUT_AT = {"all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter": 1,
             "reduce_scatter_tensor": 1}
_INPUT_KEYWORDS = ("tensor", "tensors", "input_tensor", "input_tensor_list", "input")


def _payload(name: str, args: tuple, kwargs: dict) -> Any:
    index = _INPUT_AT.get(name, 0)
    if len(args) > index:
        return args[index]
    return next(kwargs[k] for k in _INPUT_KEYWORDS if k in kwargs)


class CollectiveSpy:
    """Counts the bytes of every torch.distributed collective call that really runs (the one
    spy of the tests: ab_accel's collectives and deepspeed.comm's go through these functions).

    It wraps (does not replace) the functions: the real collective still runs; the spy adds up
    the sizes of the payload each call passes in (a gather's or reduce-scatter's INPUT, not its
    output; a list of tensors: their sum), positional or keyword (deepspeed.comm passes
    keywords). ``calls`` counts them;
    ``per_call`` holds (group ranks, bytes), ``sizes`` (bytes, dtype) of every call in issue
    order; ``groups`` and ``devices`` what they ran over and on.
    """

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "all_reduce_coalesced", "reduce")

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self.groups: list[tuple[int, ...]] = []
        self.per_call: list[tuple[tuple[int, ...], int]] = []
        self.sizes: list[tuple[int, str]] = []
        self.devices: set[str] = set()
        self._orig: dict[str, Callable] = {}
        self._backend: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> CollectiveSpy:
        for name in self.NAMES:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def wrapper(*args, _orig=orig, _name=name, **kwargs):
                self._count(_payload(_name, args, kwargs), kwargs.get("group"))
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        # deepspeed.comm keeps its own references to torch's all_gather_into_tensor and
        # reduce_scatter_tensor (taken when it starts): wrap those too.
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                           ("reduce_scatter_function", "reduce_scatter_tensor")):
            orig = getattr(backend, attr, None)
            if orig is None:
                continue
            self._backend.append((backend, attr, orig))

            def captured(*args, _orig=orig, _name=name, **kwargs):
                self._count(_payload(_name, args, kwargs), kwargs.get("group"))
                return _orig(*args, **kwargs)

            setattr(backend, attr, captured)
        return self

    def _count(self, tensor: Any, group: Any) -> None:
        tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None \
            else tuple(range(dist.get_world_size()))
        self.calls += 1
        self.bytes += nbytes
        self.groups.append(ranks)
        self.per_call.append((ranks, nbytes))
        if tensors:
            self.sizes.append((nbytes, str(tensors[0].dtype)))
            self.devices.add(str(tensors[0].device))

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
        for backend, attr, orig in self._backend:
            setattr(backend, attr, orig)
        self._backend.clear()


def dp_equivalent_bytes_per_step(model_factory: Callable[[], nn.Module]) -> int:
    """What DDP all-reduces per step for the DENSE model: all grads plus float buffers."""
    m = model_factory()
    return (sum(p.numel() * p.element_size() for p in m.parameters())
            + sum(b.numel() * b.element_size() for b in m.buffers() if b.is_floating_point()))


def switches_round_trip(model: nn.Module, opt: ABOptimizer, cfg: ABConfig) -> list[dict]:
    """The switch list survives state_dict / load_state_dict into an unbound optimizer."""
    other = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), None, cfg)
    other.load_state_dict(opt.state_dict())
    return [sw.to_dict() for sw in other.switches]


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    """The same keys, and every tensor within ``atol`` (exactly equal by default)."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flat_state(opt: ABOptimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, st in enumerate(opt.optimizer.state.values())
            for k, v in st.items() if torch.is_tensor(v)}
