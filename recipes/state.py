"""Whole-or-nothing Accelerate checkpoints for the recipes: :func:`save_state`,
:func:`check_state`, :func:`load_state`.

Not AB-training (it works with AB-training off too): ``accelerator.save_state`` into a
temporary folder that is renamed in once whole, with a manifest of every file and its size,
checked on every process before anything is loaded. With AB-training on, the per-group shards
are written and read by the save/load-state hooks ``ab_accel.prepare`` registered.
(Formerly ``ab_accel.accelerate.save_state`` and friends; that path still finds them here.)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ab_accel.checkpoint import STATE_MANIFEST, CheckpointError, check_files


def save_state(accelerator: Any, directory: str | os.PathLike, meta: Any = None) -> str:
    """``accelerator.save_state(directory)``, atomically: a folder named ``directory`` is whole.

    Everything is written into ``<directory>.tmp`` (the AB shards in ``ab_training/`` by the
    save-state hook :func:`prepare` registered), then the main process lists every file with
    its size in ``ab_state.json``, with ``meta`` (anything JSON can hold, e.g. the run's
    settings), and renames the folder. :func:`ab_accel.latest_checkpoint` picks the newest such
    folder and passes over a save that died half-way. Collective: every process calls it.
    Works with AB-training off too. Returns the folder.
    """
    final = os.path.normpath(os.fspath(directory))
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        with open(os.path.join(tmp, STATE_MANIFEST), "w") as fh:
            json.dump({"world_size": accelerator.num_processes, "files": files, "meta": meta},
                      fh, indent=1, default=str)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def check_state(accelerator: Any, directory: str | os.PathLike) -> Any:
    """Check a folder :func:`save_state` wrote, before anything is loaded from it.

    Every process checks the manifest (every file present, of its recorded size) and the
    processes agree: a missing or truncated file is one :class:`~ab_accel.CheckpointError`
    naming it, on every process. (The AB shards are checked again against their checksums by
    the load-state hook.) Returns the ``meta`` given to :func:`save_state`.
    """
    from accelerate.utils import gather_object

    directory = os.fspath(directory)
    problem, saved = None, None
    manifest = os.path.join(directory, STATE_MANIFEST)
    if not os.path.isfile(manifest):
        problem = (f"{directory!r} is not a complete checkpoint (no {STATE_MANIFEST}: "
                   f"ab_accel.accelerate.save_state writes it last): resume from another one.")
    else:
        with open(manifest) as fh:
            saved = json.load(fh)
        problem = check_files(directory, saved["files"])
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    return saved["meta"]


def load_state(accelerator: Any, directory: str | os.PathLike) -> Any:
    """:func:`check_state`, then ``accelerator.load_state(directory)``; returns the ``meta``."""
    meta = check_state(accelerator, directory)
    accelerator.load_state(directory)
    return meta


__all__ = ["save_state", "check_state", "load_state"]
