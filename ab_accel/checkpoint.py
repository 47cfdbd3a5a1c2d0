"""Checkpoints that hold every group's state, written atomically and checked before loading.

Mid-AB-phase the groups hold different factors and optimizer states, while Accelerate and
DeepSpeed save from rank 0 only by default. :func:`save_checkpoint` writes one shard per group
(written by the group's first rank; the ranks of a group are identical), and
:func:`load_checkpoint` gives every rank its own group's shard back.

Layout of ``directory`` (``ab_training/`` inside a framework's checkpoint folder)::

    ab_meta.json          the manifest: world size, groups, step, phase, AB config, and the
                          size and SHA-256 of every shard (written last, by rank 0)
    ab_group{g}.pt        {"model": ..., "optimizer": ..., "extra": ...} of group g; the model
                          state holds the factors A and B themselves (exact resume)

Atomic: everything is written into ``<directory>.tmp`` and renamed to ``directory`` once the
manifest is complete, so a folder named ``directory`` is always whole; :func:`is_complete`
tells. Loading checks the manifest on every rank (every shard present, of its recorded size, the
own shard's checksum) and agrees on the verdict before anything is loaded, so a missing or
truncated shard is one error that names the file, on every rank.

Resuming with a different AB schedule (``warmup_steps``, ``sync_every``, ``rebound_steps``,
``sync_mode``, ...) is refused with what differs unless ``ABConfig.accept_resume_changes`` is
true; a different world size is refused (the groups hold different states) unless that flag is
set and the checkpoint was taken where every rank held the same model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ABConfigError
from .layers import factored_state_dict
from .optimizer import ABOptimizer
from .vocab import TrafficLabel

META = "ab_meta.json"
#: The sub-folder of a framework's checkpoint (``accelerator.save_state``, a DeepSpeed tag, a
#: Trainer ``checkpoint-N``) that holds the per-group shards.
SHARDS_DIR = "ab_training"
#: The manifest :func:`ab_accel.accelerate.save_state` writes last into a whole
#: ``accelerator.save_state`` folder (every file and its size, and the caller's metadata).
STATE_MANIFEST = "ab_state.json"
#: ABConfig fields that change the AB schedule or the groups: a resume that changes one is refused
#: unless ``accept_resume_changes`` is set (the other fields may change freely).
SCHEDULE_FIELDS = ("enabled", "warmup_steps", "sync_every", "rebound_steps", "lr_rebound_steps",
                   "rank_cutoff", "min_rank", "rank_energy", "rank_fraction", "fixed_rank",
                   "group_size", "sync_mode", "target_modules", "exclude_modules", "lean_memory",
                   "residual", "freeze_untargeted")
_TMP = ".tmp"


class CheckpointError(ABConfigError):
    """A checkpoint that is incomplete, corrupt, or does not fit this run; says what to do."""


def shard_name(group_index: int) -> str:
    return f"ab_group{group_index}.pt"


def is_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a manifest (it is renamed into place only when whole)."""
    return os.path.isfile(os.path.join(os.fspath(directory), META))


def latest_checkpoint(parent: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder under ``parent`` (None if there is none).

    A child folder counts when it is an AB checkpoint itself, holds one in ``ab_training/``
    (a framework's checkpoint folder), or was written whole by
    ``save_state`` of recipes/state.py (AB-training on or off); newest means the largest
    number in its name (``step_120``, ``checkpoint-120``, ``global_step120``), then the latest
    modification.
    Folders of saves that did not finish (``*.tmp``, no manifest) are passed over.
    """
    parent = os.fspath(parent)
    if not os.path.isdir(parent):
        return None
    found = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.endswith((_TMP, ".old")) or not os.path.isdir(path):
            continue
        if is_complete(path) or os.path.isfile(os.path.join(path, STATE_MANIFEST)) \
                or is_complete(os.path.join(path, SHARDS_DIR)):
            digits = "".join(c if c.isdigit() else " " for c in name).split()
            found.append((int(digits[-1]) if digits else -1, os.path.getmtime(path), path))
    return max(found)[2] if found else None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: ABOptimizer,
                    extra: dict[str, Any] | None = None) -> None:
    """Write every group's shard and the manifest, atomically. Collective: every rank calls it."""
    directory = os.path.normpath(os.fspath(directory))
    tmp = directory + _TMP
    groups = optimizer.groups
    rank = groups.rank if groups is not None else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
        os.makedirs(tmp)
    _barrier()
    leader = groups.group_ranks[0] if groups is not None else 0
    gi = groups.group_index if groups is not None else 0
    if rank == leader:
        with factored_state_dict():  # the factors themselves: exact resume
            model_state = _unwrap(model).state_dict()
        buffer = io.BytesIO()
        torch.save({"model": model_state, "optimizer": optimizer.state_dict(),
                    "extra": extra or {}}, buffer)
        data = buffer.getvalue()
        with open(os.path.join(tmp, shard_name(gi)), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with open(os.path.join(tmp, shard_name(gi) + ".sha256"), "w") as fh:
            fh.write(hashlib.sha256(data).hexdigest())
    _barrier()
    if rank == 0:
        plan = groups.plan if groups is not None else None
        num_groups = plan.num_groups if plan else 1
        files = {}
        for g in range(num_groups):
            name = shard_name(g)
            sidecar = os.path.join(tmp, name + ".sha256")
            with open(sidecar) as fh:
                digest = fh.read().strip()
            os.remove(sidecar)
            files[name] = {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": digest}
        meta = {
            "world_size": optimizer.world_size,
            "step": optimizer.step_count,
            "phase": str(optimizer.phase),
            "groups_differ": optimizer.groups_differ,
            "groups": [list(g) for g in plan.groups] if plan else [[0]],
            "roles": [str(r) for r in plan.roles] if plan else ["AB"],
            "config": optimizer.config.to_dict(),
            "files": files,
        }
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        old = directory + ".old"
        if os.path.exists(directory):  # overwriting a checkpoint: keep the old one until here
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint folder; a clear error when there is none."""
    directory = os.fspath(directory)
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        partial = os.path.isdir(directory + _TMP)
        raise CheckpointError(
            f"{directory!r} is not a complete AB checkpoint: it has no {META}"
            + (f" ({directory + _TMP!r} is a save that did not finish)" if partial else "")
            + ". Resume from an earlier checkpoint.")
    with open(path) as fh:
        return json.load(fh)


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: ABOptimizer,
                    map_location: Any = "cpu", *, model_only: bool = False) -> dict[str, Any]:
    """Load this rank's group shard into ``model`` and ``optimizer``; returns ``extra``.

    Collective: every rank checks the checkpoint and the ranks agree on the verdict first, so
    a bad checkpoint stops every rank with the same error before anything is loaded. With
    ``model_only`` the optimizer state is left alone.
    """
    directory = os.fspath(directory)
    meta = check_checkpoint(directory, optimizer)
    gi = _shard_for(meta, optimizer)
    with open(os.path.join(directory, shard_name(gi)), "rb") as fh:
        state = torch.load(io.BytesIO(fh.read()), map_location=map_location, weights_only=False)
    _unwrap(model).load_state_dict(state["model"])
    if not model_only:
        optimizer.load_state_dict(state["optimizer"])
    return state.get("extra", {})


def check_checkpoint(directory: str | os.PathLike, optimizer: ABOptimizer) -> dict[str, Any]:
    """Check ``directory`` for this run before anything is loaded from it (or from the
    framework's files beside it); returns its manifest. Collective: the ranks agree on the
    verdict, and a folder without shards (no manifest), a missing or truncated shard, another
    world size or AB schedule is one :class:`CheckpointError` naming the file, on every rank."""
    problem, meta = _check(os.fspath(directory), optimizer)
    _agree_or_raise(problem, optimizer)
    return meta


def check_files(directory: str | os.PathLike, sizes: dict[str, int]) -> str | None:
    """What is wrong with the files a manifest lists ({relative path: bytes}): the first one
    missing or of another size, as a message that names it (None: all present and whole)."""
    for name, size in sizes.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"checkpoint file {path!r} is missing; nothing was loaded."
        if os.path.getsize(path) != size:
            return (f"checkpoint file {path!r} is {os.path.getsize(path)} bytes, the manifest "
                    f"records {size}: it is truncated or was replaced; nothing was loaded.")
    return None


def _shard_for(meta: dict[str, Any], optimizer: ABOptimizer) -> int:
    if meta["world_size"] != optimizer.world_size:
        return 0  # accepted only where every group held the same model (see _check)
    return optimizer.groups.group_index if optimizer.groups is not None else 0


def _check(directory: str, optimizer: ABOptimizer) -> tuple[str | None, dict[str, Any]]:
    """What is wrong with this checkpoint for this rank (None: nothing), and its manifest."""
    try:
        meta = read_manifest(directory)
    except CheckpointError as exc:
        return str(exc), {}
    problem = check_files(directory, {n: i["bytes"] for n, i in meta.get("files", {}).items()})
    if problem:
        return problem, meta
    accept = optimizer.config.accept_resume_changes
    if meta["world_size"] != optimizer.world_size:
        if not accept or meta.get("groups_differ", True):
            why = ("the checkpoint was taken inside an AB phase, where the groups hold "
                   "different models, so no world size but the old one can continue it"
                   if meta.get("groups_differ", True) else
                   "set ab_training.accept_resume_changes=true to continue from group 0's "
                   "model with the new world (the groups agreed when it was taken)")
            return (f"The checkpoint in {directory!r} was written by {meta['world_size']} ranks; "
                    f"this run has {optimizer.world_size}: {why}. Resume with "
                    f"{meta['world_size']} processes, or merge() the model and start a new "
                    f"run."), meta
    saved = meta.get("config", {})
    now = optimizer.config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in SCHEDULE_FIELDS
               if k in saved and saved.get(k) != now.get(k)]
    if changed and not accept:
        return (f"The checkpoint in {directory!r} was written with a different AB schedule ("
                f"{'; '.join(changed)}). Resume with the checkpoint's settings, or set "
                f"ab_training.accept_resume_changes=true to continue with the new ones."), meta
    own = os.path.join(directory, shard_name(_shard_for(meta, optimizer)))
    expected = meta.get("files", {}).get(os.path.basename(own), {}).get("sha256")
    if expected is not None:
        with open(own, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        if digest != expected:
            return (f"{own!r} does not match its checksum in the manifest: the file is "
                    f"corrupt."), meta
    return None, meta


def _agree_or_raise(problem: str | None, optimizer: ABOptimizer) -> None:
    """Every rank learns whether any rank found a problem; all raise together."""
    groups = optimizer.groups
    if groups is None or groups.world_size == 1 or not optimizer.comm.active():
        if problem:
            raise CheckpointError(problem)
        return
    ranks = tuple(range(groups.world_size))
    flags = optimizer.comm.flags_of(problem is not None, groups.world, ranks,
                                    TrafficLabel.SETUP)
    if problem:
        raise CheckpointError(problem)
    if any(flags):
        bad = [r for r, f in enumerate(flags) if f]
        raise CheckpointError(f"Rank(s) {bad} found the checkpoint unusable (see their error); "
                              f"nothing was loaded.")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
