"""Checkpoints that hold every group's state.

Mid-AB-phase the groups hold different factors and optimizer states, while Accelerate and
DeepSpeed save from rank 0 only by default. :func:`save_checkpoint` writes one shard per group
(written by the group's first rank; the ranks of a group are identical), and
:func:`load_checkpoint` gives every rank its own group's shard back.

Layout of ``directory``::

    ab_meta.json          world size, groups, step, phase (written by rank 0)
    ab_group{g}.pt        {"model": ..., "optimizer": ..., "extra": ...} of group g
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .optimizer import ABOptimizer

META = "ab_meta.json"
#: The sub-folder of a framework's checkpoint (``accelerator.save_state``, a DeepSpeed tag, a
#: Trainer ``checkpoint-N``) that holds the per-group shards.
SHARDS_DIR = "ab_training"


def shard_name(group_index: int) -> str:
    return f"ab_group{group_index}.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: ABOptimizer,
                    extra: dict[str, Any] | None = None) -> None:
    """Write this group's shard (from its first rank) and the metadata. Collective."""
    directory = os.fspath(directory)
    groups = optimizer.groups
    rank = groups.rank if groups is not None else 0
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
    _barrier()
    os.makedirs(directory, exist_ok=True)
    leader = groups.group_ranks[0] if groups is not None else 0
    gi = groups.group_index if groups is not None else 0
    if rank == leader:
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "extra": extra or {}}
        tmp = os.path.join(directory, shard_name(gi) + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(directory, shard_name(gi)))
    if rank == 0:
        plan = groups.plan if groups is not None else None
        meta = {
            "world_size": optimizer.world_size,
            "step": optimizer.step_count,
            "phase": optimizer.phase,
            "groups": [list(g) for g in plan.groups] if plan else [[0]],
            "roles": list(plan.roles) if plan else ["AB"],
            "config": optimizer.config.to_dict(),
        }
        with open(os.path.join(directory, META), "w") as fh:
            json.dump(meta, fh, indent=2)
    _barrier()


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: ABOptimizer,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load this rank's group shard into ``model`` and ``optimizer``; returns ``extra``."""
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{directory!r} is not an AB checkpoint (no {META}).")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta["world_size"] != optimizer.world_size:
        raise ValueError(
            f"The checkpoint in {directory!r} was written by {meta['world_size']} ranks; this "
            f"run has {optimizer.world_size}. Resume with --num_processes "
            f"{meta['world_size']}, or merge() the model and start a new run."
        )
    gi = optimizer.groups.group_index if optimizer.groups is not None else 0
    state = torch.load(os.path.join(directory, shard_name(gi)), map_location=map_location,
                       weights_only=False)
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state.get("extra", {})


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
