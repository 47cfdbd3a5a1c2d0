"""The public API under the real torchrun launcher, 4 and 8 processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port, script_env

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plain_torch.py"


@pytest.mark.parametrize("nproc,extra", [(4, []), (8, ["--group_size", "2"])],
                         ids=["4ranks", "8ranks-gs2"])
def test_plain_torch_example_under_torchrun(nproc, extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(SCRIPT), "--steps", "110", *extra]
    env = script_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = report["checks"]
    assert report["world_size"] == nproc
    assert report["role_plan"] == (["A", "B"] if nproc == 4 else ["A", "A", "B", "B"])
    # 110 steps: warm-up 40, AB 40..72, sync, rebound 72..80, AB 80..110 (ends mid-phase).
    assert checks["syncs"] == 1 and checks["syncs_identical"] == 1
    assert checks["ab_steps"] == 61
    assert checks["ab_steps_group_identical"] == checks["ab_steps"]
    assert checks["ab_steps_groups_differ"] == checks["ab_steps"]
    assert report["accuracy"] > 0.85
    assert report["compression"]["params_now"] < report["compression"]["params_dense"]
    assert 0.0 < report["traffic"]["reduction"] < 1.0


def _elastic_run(tmp: Path, *extra: str) -> dict:
    script = Path(__file__).resolve().parent / "torchrun_scripts" / "resume_after_kill.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
           "--max-restarts", "1", "--master_port", str(free_port()), str(script), str(tmp),
           *extra]
    env = script_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import torch

    return {"final": torch.load(tmp / "final.pt", weights_only=False), "log": proc.stderr}


def test_a_rank_killed_mid_ab_phase_is_restarted_and_ends_with_the_same_model(tmp_path):
    """torchrun --max-restarts 1 + resume from the newest complete checkpoint: rank 1 dies
    (SIGKILL) after step 11 (inside the second AB phase, after the checkpoint of step 9);
    every worker restarts from step 9 and the final model is the uninterrupted run's."""
    import torch

    straight = _elastic_run(tmp_path / "straight")
    killed = _elastic_run(tmp_path / "killed", "--kill-at", "11")
    assert straight["final"]["resumed_from"] is None
    assert killed["final"]["resumed_from"].endswith("step_9")
    assert killed["final"]["step"] == straight["final"]["step"] == 16
    a, b = straight["final"]["params"], killed["final"]["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
