"""Group plans: consecutive ranks, A-groups first, built alike on every rank."""

from __future__ import annotations

import pytest

from ab_accel import ABConfig, ABConfigError
from ab_accel.groups import plan_groups


@pytest.mark.parametrize("world,gs,mode,groups,roles", [
    (4, None, "with-stale", ((0, 1), (2, 3)), ("A", "B")),
    (8, 2, "only-learned", ((0, 1), (2, 3), (4, 5), (6, 7)), ("A", "A", "B", "B")),
    (6, 2, "full", ((0, 1), (2, 3), (4, 5)), ("A", "B", "B")),
    (4, 4, "only-b", ((0, 1, 2, 3),), ("B",)),
    (4, 1, "only-b", ((0,), (1,), (2,), (3,)), ("B", "B", "B", "B")),
    (1, None, "with-stale", ((0,),), ("AB",)),
    (1, None, "only-b", ((0,),), ("B",)),
])
def test_plans(world, gs, mode, groups, roles):
    plan = plan_groups(world, ABConfig(group_size=gs, sync_mode=mode))
    assert plan.groups == groups
    assert plan.roles == roles
    for g, members in enumerate(groups):
        for r in members:
            assert plan.group_index(r) == g and plan.role_of(r) == roles[g]


def test_ranks_with_role():
    plan = plan_groups(8, ABConfig(group_size=2))
    assert plan.ranks_with_role("A") == (0, 1, 2, 3)
    assert plan.ranks_with_role("B") == (4, 5, 6, 7)


def test_world_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ABConfigError, match="group_size=3 does not divide the world size 8"):
        plan_groups(8, ABConfig(group_size=3))
