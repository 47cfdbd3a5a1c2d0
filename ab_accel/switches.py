"""The phase switches of arXiv 2405.01067: factorize and sync, as functions of the layers.

==========  ==================================================================================
factorize   SVD of every W, truncated at ``rank_cutoff``; ranks agreed with a MAX over the
            world; a digest of the factors checks that every rank got the same A, B
sync        the groups are reconciled by ``sync_mode`` (:data:`SYNC_MODES`, one function per
            mode), the dense parameters and buffers averaged over the world, the dense
            parameters' optimizer state averaged over the world, then W <- A B
==========  ==================================================================================

Every collective goes through the :class:`~ab_accel.comm.Communicator` (metered as sync
traffic) over the world of :class:`~ab_accel.groups.ABGroups`. The ABOptimizer decides WHEN a
switch runs (the schedule) and records it as a :class:`Switch`; this module does the switch.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .comm import Communicator
from .config import ABConfig
from .groups import ABGroups
from .layers import ABLayer
from .vocab import Event, LayerMode, Role, SyncMode, TrafficLabel

#: Optimizer-state entries that are counters, not moments: never averaged.
_SKIP_STATE_KEYS = ("step",)


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


# ---------------------------------------------------------------------------------- factorize
@torch.no_grad()
def factorize(layers: list[ABLayer], config: ABConfig, comm: Communicator,
              groups: ABGroups) -> float:
    """SVD every W, cut at tau, agree the ranks (MAX), check every rank got the same A, B.

    With ``lean_memory`` layer by layer (one SVD, and one dense matrix, alive at a time; the
    layers a lean sync left in AB mode are re-factorized from their product), else every layer
    in full mode at once. Returns the seconds spent in the SVDs."""
    world, ranks = groups.world, groups.world_ranks
    rule = config.rank_rule()
    svd_seconds = 0.0
    if config.lean_memory:
        for layer in layers:
            start = time.perf_counter()
            proposed = layer.proposed_rank(config.rank_cutoff, config.min_rank, **rule)
            svd_seconds += time.perf_counter() - start
            layer.factorize(comm.max_int([proposed], world, ranks, TrafficLabel.SYNC)[0])
    else:
        layers = [layer for layer in layers if layer.mode == LayerMode.FULL]
        if not layers:
            return svd_seconds
        start = time.perf_counter()
        proposed = [layer.proposed_rank(config.rank_cutoff, config.min_rank, **rule)
                    for layer in layers]
        svd_seconds += time.perf_counter() - start
        agreed = comm.max_int(proposed, world, ranks, TrafficLabel.SYNC)
        for layer, rank in zip(layers, agreed, strict=True):
            layer.factorize(rank)
    if not comm.agree([digest(layers)], world, ranks, TrafficLabel.SYNC):
        # Mixed hardware gave different SVDs: take rank 0's factors (and its frozen residuals,
        # which follow from them: the one case a residual is ever sent).
        comm.broadcast_([t for layer in layers for t in (layer.A.data, layer.B.data)]
                        + [layer.residual for layer in layers if layer.residual is not None],
                        src=groups.global_rank(0), group=world, ranks=ranks,
                        phase=TrafficLabel.SYNC)
    return svd_seconds


def digest(layers: list[ABLayer]) -> float:
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


# ---------------------------------------------------------------------------------- sync
def _sync_full(layers: list[ABLayer], dense: list[torch.Tensor], comm: Communicator,
               groups: ABGroups) -> None:
    """W = A B averaged over the world: every layer leaves dense."""
    mats = [layer.matrix() for layer in layers]
    comm.mean_(mats + dense, groups.world, groups.world_ranks, TrafficLabel.SYNC)
    for layer, mat in zip(layers, mats, strict=True):
        layer.to_full()
        layer.weight.copy_(layer._matrix_to_weight(mat))


def _sync_only_learned(layers: list[ABLayer], dense: list[torch.Tensor], comm: Communicator,
                       groups: ABGroups) -> None:
    """A averaged over the A-group ranks, B over the B-group ranks, dense over the world: one
    SUM all-reduce of locally pre-scaled tensors."""
    plan = groups.plan
    n_a = max(1, len(plan.ranks_with_role(Role.A)))
    n_b = max(1, len(plan.ranks_with_role(Role.B)))
    role = groups.role
    w_a = 1.0 / n_a if role in (Role.A, Role.AB) else 0.0
    w_b = 1.0 / n_b if role in (Role.B, Role.AB) else 0.0
    tensors = [t for layer in layers for t in (layer.A.data, layer.B.data)] + dense
    weights = [w for _ in layers for w in (w_a, w_b)] + [1.0 / groups.world_size] * len(dense)
    comm.mean_(tensors, groups.world, groups.world_ranks, TrafficLabel.SYNC, weights=weights,
               divisor=1.0)


def _sync_only_b(layers: list[ABLayer], dense: list[torch.Tensor], comm: Communicator,
                 groups: ABGroups) -> None:
    """B averaged over the world; A never trains: it is identical on every rank already."""
    comm.mean_([layer.B.data for layer in layers] + dense, groups.world, groups.world_ranks,
               TrafficLabel.SYNC)


def _sync_with_stale(layers: list[ABLayer], dense: list[torch.Tensor], comm: Communicator,
                     groups: ABGroups) -> None:
    """A and B both averaged over the world (the trained factor with the frozen one)."""
    comm.mean_([t for layer in layers for t in (layer.A.data, layer.B.data)] + dense,
               groups.world, groups.world_ranks, TrafficLabel.SYNC)


SyncFunction = Callable[[list[ABLayer], list[torch.Tensor], Communicator, ABGroups], None]

#: How the groups' factors are reconciled at a sync, by ``ABConfig.sync_mode``; each also
#: averages the dense tensors (dense parameters and float buffers) over the world.
SYNC_MODES: dict[SyncMode, SyncFunction] = {
    SyncMode.FULL: _sync_full,
    SyncMode.ONLY_LEARNED: _sync_only_learned,
    SyncMode.ONLY_B: _sync_only_b,
    SyncMode.WITH_STALE: _sync_with_stale,
}


@torch.no_grad()
def sync(layers: list[ABLayer], dense: list[torch.Tensor], dense_state: list[torch.Tensor],
         config: ABConfig, comm: Communicator, groups: ABGroups, final: bool = False) -> None:
    """Reconcile the groups by ``sync_mode`` (``dense``: the dense parameters and float buffers,
    averaged over the world with them; ``dense_state``: the dense parameters' optimizer
    moments, see :func:`dense_state`), then W <- A B on every layer (with ``lean_memory``,
    except at the end of training, the layers keep their synced factors: the factorization
    that follows at the same boundary re-factorizes them one by one)."""
    layers = [layer for layer in layers if layer.mode == LayerMode.AB]
    SYNC_MODES[SyncMode(config.sync_mode)](layers, dense, comm, groups)
    # The dense parameters' optimizer moments diverged per group: average them.
    comm.mean_(dense_state, groups.world, groups.world_ranks, TrafficLabel.SYNC)
    if config.lean_memory and not final:
        return
    for layer in layers:
        layer.to_full()


def dense_state(optimizer_state: Any, dense_params: list[torch.nn.Parameter]
                ) -> list[torch.Tensor]:
    """The averaged part of the dense parameters' optimizer state: every floating tensor entry
    (the moments), in a rank-independent order, without counters such as ``step``."""
    tensors: list[torch.Tensor] = []
    for p in dense_params:
        state = optimizer_state.get(p)
        if not state:
            continue
        for key in sorted(state):
            value = state[key]
            if (key not in _SKIP_STATE_KEYS and torch.is_tensor(value)
                    and value.is_floating_point() and value.dim() > 0):
                tensors.append(value)
    return tensors


__all__ = ["Switch", "SYNC_MODES", "factorize", "sync", "dense_state", "digest"]
