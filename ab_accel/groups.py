"""A-groups and B-groups: the process groups of AB-training.

The world of N ranks is split into G = N / group_size groups of consecutive ranks. The first
floor(G / 2) groups are A-groups (they train the A factors), the rest are B-groups. With sync
mode ``only-b`` every rank is in a B-group and G may be 1. A single process (N = 1) trains both
factors (role ``"AB"``): there is nobody to split the work with.

:func:`plan_groups` is the pure arithmetic (no torch.distributed). :func:`build_groups` creates
the torch.distributed groups, in the same order on every rank, as torch requires.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from .config import ABConfig
from .vocab import Role, SyncMode


@dataclass(frozen=True)
class GroupPlan:
    """Who is in which group, and which factor each group trains."""

    world_size: int
    group_size: int
    groups: tuple[tuple[int, ...], ...]
    roles: tuple[Role, ...]  # one per group

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_index(self, rank: int) -> int:
        return rank // self.group_size

    def role_of(self, rank: int) -> Role:
        return self.roles[self.group_index(rank)]

    def ranks_with_role(self, role: Role | str) -> tuple[int, ...]:
        return tuple(r for g, ranks in enumerate(self.groups) if self.roles[g] == role
                     for r in ranks)


def plan_groups(world_size: int, config: ABConfig) -> GroupPlan:
    """Split ``world_size`` ranks into groups and roles; raise ABConfigError if it cannot."""
    size = config.resolve_group_size(world_size)
    num = world_size // size
    groups = tuple(tuple(range(g * size, (g + 1) * size)) for g in range(num))
    if world_size == 1 and config.sync_mode != SyncMode.ONLY_B:
        roles: tuple[Role, ...] = (Role.AB,)
    elif config.sync_mode == SyncMode.ONLY_B:
        roles = (Role.B,) * num
    else:
        roles = tuple(Role.A if g < num // 2 else Role.B for g in range(num))
    return GroupPlan(world_size, size, groups, roles)


@dataclass
class ABGroups:
    """This rank's view of the groups, with the torch.distributed handles.

    ``world`` and ``group`` are process groups (None means the default world group, or no
    communication at all when torch.distributed is not initialized).
    """

    plan: GroupPlan
    rank: int
    world: Any = None
    group: Any = None
    _all_groups: list[Any] = field(default_factory=list, repr=False)

    @property
    def role(self) -> Role:
        return self.plan.role_of(self.rank)

    @property
    def group_index(self) -> int:
        return self.plan.group_index(self.rank)

    @property
    def group_ranks(self) -> tuple[int, ...]:
        return self.plan.groups[self.group_index]

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def distributed(self) -> bool:
        return self.plan.world_size > 1

    @property
    def world_ranks(self) -> tuple[int, ...]:
        """Every rank of the world, as ranks of ``world`` (what the meter records)."""
        return tuple(range(self.plan.world_size))

    def global_rank(self, rank: int) -> int:
        """The default group's rank of ``world``'s rank ``rank`` (a broadcast's ``src``)."""
        if self.world is None or not (dist.is_available() and dist.is_initialized()):
            return rank
        return dist.get_global_rank(self.world, rank)


def build_groups(config: ABConfig, world: Any = None) -> ABGroups:
    """Create this rank's groups. Collective: every rank of ``world`` must call it, in order.

    ``world`` is the data-parallel process group AB-training runs over (None: the default group).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return ABGroups(plan_groups(1, config), rank=0)
    world_size = dist.get_world_size(world)
    rank = dist.get_rank(world)
    plan = plan_groups(world_size, config)
    if world_size == 1:
        return ABGroups(plan, rank=rank, world=world)
    if world is not None:
        world_ranks = dist.get_process_group_ranks(world)
    else:
        world_ranks = list(range(world_size))
    timeout = (None if config.collective_timeout_s is None
               else datetime.timedelta(seconds=float(config.collective_timeout_s)))
    if timeout is not None:  # a world group of our own, with the configured timeout
        world = dist.new_group(world_ranks, timeout=timeout)
    handles = []
    own = None
    for g, ranks in enumerate(plan.groups):
        global_ranks = [world_ranks[r] for r in ranks]
        if plan.group_size == world_size:
            handle = world  # one group == the world: reuse it rather than create a copy
        else:
            handle = dist.new_group(global_ranks, timeout=timeout)
        handles.append(handle)
        if g == plan.group_index(rank):
            own = handle
    return ABGroups(plan, rank=rank, world=world, group=own, _all_groups=handles)
