"""recipes/state.py: save_state is whole or absent, and a damaged copy is refused on every rank
(real gloo processes running Accelerate).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ab_accel import (
    ABConfig,
)

from distributed import run_distributed
from scenarios import loss_of, small_cnn


def accelerate_state_saved_whole_and_checked(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """ab_accel.accelerate.save_state / check_state around Accelerate's save_state, AB-training
    on (a mid-AB-phase save) and the checks of a damaged copy, on every rank."""
    import shutil

    from accelerate import Accelerator

    import ab_accel
    from recipes.state import check_state, load_state, save_state

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1, rank_fraction=0.5)
    model = small_cnn()
    model, opt = ab_accel.prepare(acc, model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                  config=cfg)
    for step in range(2):
        opt.zero_grad()
        acc.backward(loss_of(model, rank, step))
        opt.step()
    folder = os.path.join(tmp, "ckpts", "step_2")
    out: dict[str, Any] = {"saved": save_state(acc, folder, meta={"lr": 1e-3, "step": 2})}
    out["listing"] = sorted(os.listdir(os.path.join(tmp, "ckpts")))
    out["latest"] = ab_accel.latest_checkpoint(os.path.join(tmp, "ckpts"))
    out["meta"] = load_state(acc, folder)
    errors = {}
    for damage in ("truncate", "remove_manifest"):
        bad = os.path.join(tmp, f"bad_{damage}")
        if rank == 0:
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(folder, bad)
            if damage == "truncate":
                with open(os.path.join(bad, "model.safetensors"), "r+b") as fh:
                    fh.truncate(10)
            else:
                os.remove(os.path.join(bad, "ab_state.json"))
        acc.wait_for_everyone()
        try:
            check_state(acc, bad)
        except ab_accel.CheckpointError as exc:
            errors[damage] = str(exc)
    out["errors"] = errors
    return out


def test_save_state_is_whole_or_absent_and_a_damaged_copy_is_refused_on_every_rank(tmp_path):
    results = run_distributed(accelerate_state_saved_whole_and_checked, 2, str(tmp_path))
    folder = str(tmp_path / "ckpts" / "step_2")
    for r in results:
        assert r["saved"] == r["latest"] == folder and r["listing"] == ["step_2"]  # no .tmp
        assert r["meta"] == {"lr": 1e-3, "step": 2}
        assert "model.safetensors' is 10 bytes" in r["errors"]["truncate"]
        assert "nothing was loaded" in r["errors"]["truncate"]
        assert "no ab_state.json" in r["errors"]["remove_manifest"]
    with open(tmp_path / "ckpts" / "step_2" / "ab_state.json") as fh:
        files = json.load(fh)["files"]
    assert "model.safetensors" in files and "ab_training/ab_meta.json" in files
