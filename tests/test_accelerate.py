"""ab_accel.prepare in real Accelerate runs: `accelerate launch` starts the processes (gloo on
CPU), tests/accel_scripts/train_digits.py trains a small CNN with BatchNorm on scikit-learn's
digits and records what it saw; the tests assert on those records.

Four runs: 4 processes with bf16 autocast, gradient accumulation, clipping, an LR scheduler and
save_state mid-AB-phase; 4 fresh processes that resume from that checkpoint; one process (no
launcher); 2 processes under Accelerate + DeepSpeed ZeRO-0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

from ab_accel import ABConfigError

import train_digits as td  # tests/accel_scripts (pytest's pythonpath): the script's constants
from distributed import free_port, script_env

SCRIPT = os.path.join(os.path.dirname(__file__), "accel_scripts", "train_digits.py")

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
RTOL, ATOL = 1e-5, 1e-7
TIMEOUT = 280  # seconds per launch (two launches share one test's 600 s pytest-timeout)


def _run(command: list[str], out_dir: str, world: int, env: dict[str, str]) -> list[dict]:
    full_env = {**script_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu", **env}
    # A stray ~/.cache/huggingface/accelerate/default_config.yaml must not change the launch:
    # the flags below say everything.
    full_env["HF_HOME"] = os.path.join(out_dir, "hf_home")
    # PATH is left as it is: torch builds DeepSpeed's CPU op with the first `ninja` on PATH,
    # and two ninja versions alternating on one build folder rebuild the op every time.
    # Own session, so that a timeout ends the launcher AND the training processes it started.
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(command)} ran past {TIMEOUT} s:\n"
                             f"{stderr[-8000:]}") from exc
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                             f"{stdout[-4000:]}\n{stderr[-8000:]}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def _launch(mode: str, out_dir: str, *extra: str, world: int = 4) -> list[dict]:
    """`accelerate launch --multi_gpu --num_processes 4` with ACCELERATE_USE_CPU=true: N gloo
    processes on CPU (the script also builds Accelerator(cpu=True))."""
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(world),
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), SCRIPT, mode, out_dir, *extra]
    return _run(command, out_dir, world, {"ACCELERATE_USE_CPU": "true"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 4-process run (saves mid-AB-phase) and the 4-process run that resumes from it."""
    root = tmp_path_factory.mktemp("accelerate")
    ckpt = str(root / "ckpt")
    main_dir, resume_dir = root / "main", root / "resume"
    main_dir.mkdir()
    resume_dir.mkdir()
    main = _launch("main", str(main_dir), ckpt)
    resume = _launch("resume", str(resume_dir), ckpt)
    return main, resume


@pytest.fixture(scope="module")
def main(runs):
    return runs[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accelerate_single"))
    return _run([sys.executable, SCRIPT, "single", out], out, 1, {})[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).sum(0) / len(tensors)


# ------------------------------------------------------------------------------ DDP and groups
def test_prepare_takes_gradient_and_buffer_sync_away_from_ddp(main):
    for rec in main:
        assert rec["ddp"] == {"type": "DistributedDataParallel", "unwrap_is_module": True,
                              "require_backward_grad_sync": False,
                              "require_forward_param_sync": False,
                              "broadcast_buffers": False}
        assert rec["opt_is_ab"]  # opt.optimizer / opt.ab_optimizer / ab_optimizer(opt) agree
        assert rec["ab_layers_in_unwrapped"] == 2  # unwrap_model gives the converted module


def test_ab_phase_groups_hold_identical_parameters_and_differ_across(main):
    for rec in main:
        roles = {m["role"] for m in rec["micro"] if m["phase"] == "ab"}
        assert roles == {"A" if rec["rank"] < 2 else "B"}
    for step in (4, 5, 8, 9, 12):  # after AB steps of cycles 0, 1 and 2
        snaps = [rec["snapshots"][step] for rec in main]
        assert _same(snaps[0], snaps[1]) and _same(snaps[2], snaps[3]), step
        assert not _same(snaps[0], snaps[2]), step


def test_every_rank_identical_in_warmup_and_after_each_sync(main):
    for step in (1, 6):  # after a warm-up step; after the sync that ends cycle 0's AB phase
        snaps = [rec["snapshots"][step] for rec in main]
        assert all(_same(snaps[0], s) for s in snaps[1:]), step


def test_gradients_are_reduced_by_ab_once_and_not_by_ddp(main):
    """Right after backward every rank still holds its own gradients (DDP's reducer did not
    run); what clip/step use is the mean over the step's scope: the world in warm-up, the own
    group in an AB phase, which differs from the world mean."""
    world = range(len(main))
    for t in td.CHECK_STEPS:
        local = main[0]["grads"][t]["local"]  # every rank's pre-reduction gradients
        phase = main[0]["grads"][t]["phase"]
        assert phase == ("warmup" if t < td.CONFIG["warmup_steps"] else "ab")
        dense = sorted(set.intersection(*(set(g) for g in local)))
        assert dense
        for name in dense:
            assert not torch.equal(local[0][name], local[1][name]), (t, name)
        for r in world:
            scope = list(world) if phase == "warmup" else [r - r % 2, r - r % 2 + 1]
            rec = main[r]["grads"][t]
            expected = {n: _mean([local[s][n] for s in scope]) for n in local[r]}
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))
            assert rec["norm"] == pytest.approx(float(norm), rel=1e-5)
            coef = min(1.0, td.MAX_NORM / (float(norm) + 1e-6))
            for n, g in expected.items():
                torch.testing.assert_close(rec["clipped"][n], g * coef, rtol=RTOL, atol=ATOL)
            if phase == "ab":
                world_mean = _mean([local[s][dense[0]] for s in world])
                assert not torch.allclose(expected[dense[0]], world_mean, rtol=1e-3, atol=0)


def test_clip_grad_norm_clips_the_reduced_gradients(main):
    for t in td.CHECK_STEPS:
        norms = [rec["grads"][t]["norm"] for rec in main]
        assert min(norms) > td.MAX_NORM  # clipping really acts
        assert norms[0] == norms[1] and norms[2] == norms[3]  # one norm per scope
        for rec in main:
            clipped = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in rec["grads"][t]["clipped"].values()]))
            assert float(clipped) == pytest.approx(td.MAX_NORM, rel=1e-4)


def test_gradient_accumulation_reduces_once_per_boundary(main):
    for rec in main:
        micro = rec["micro"]
        assert len(micro) == td.STEPS * td.ACCUM
        for m in micro:
            if not m["boundary"]:
                assert sum(m["delta"].values()) == 0, m  # nothing reduced inside accumulation
            else:
                # per step: one all-reduce, the gradient bucket launched during the boundary's
                # backward, with the flags and the buffers riding in it
                assert m["delta"][m["phase"]] == 1, m
        summary = rec["summary"]
        assert summary["steps"] == td.STEPS
        assert summary["steps_by_phase"] == {"warmup": 3, "ab": 7, "rebound": 2}
        assert 0.0 < summary["reduction"] < 1.0


def test_lr_scheduler_keeps_driving_the_wrapped_optimizer(main):
    for rec in main:
        lrs = rec["lr"]
        assert len(lrs) == td.STEPS
        assert all(group_lr == sched_lr for group_lr, sched_lr in lrs)
        assert all(lrs[i + 1][0] < lrs[i][0] for i in range(len(lrs) - 1))  # it really moves


def test_bf16_autocast_runs_the_ab_layers(main):
    for rec in main:
        assert rec["ab_layer_output_dtypes"] == ["torch.bfloat16"]
        assert rec["output_dtype"] == "torch.float32"  # Accelerate's fp32 output wrapper


def test_factorized_dense_weight_is_released_under_ddp(main):
    """DDP's reducer does not keep the dense W of an AB layer alive after factorization."""
    for rec in main:
        assert rec["weight_freed"]
        assert rec["compression"] > 1.0


# ------------------------------------------------------------------------------ checkpoints
def test_save_merged_reconciles_merges_and_saves_a_plain_module(main, tmp_path):
    from safetensors.torch import load_file

    import train_digits  # tests/accel_scripts/train_digits.py

    # The run stopped inside an AB phase: save_merged ran the final sync (on every rank) ...
    assert all(r["groups_differ_at_end"] and r["export"]["final_sync"] for r in main)
    assert all(r["export"]["compression"]["factorized_ratio"] > 1 for r in main)
    assert all(r["ab_layers_after_export"] == 0 for r in main)  # ... and merged every AB layer
    for r in main[1:]:  # every rank holds the one model
        torch.testing.assert_close(r["merged_logits"], main[0]["merged_logits"])
    # The saved file is the plain module's state: strict load, the same outputs.
    plain = train_digits.build_model()
    plain.load_state_dict(load_file(os.path.join(main[0]["export"]["dir"], "model.safetensors")))
    plain.eval()
    with torch.no_grad():
        logits = plain(train_digits.probe_images())
    torch.testing.assert_close(logits, main[0]["merged_logits"], atol=1e-5, rtol=1e-5)


def test_save_state_mid_ab_phase_then_load_state_continues_exactly(runs):
    main, resume = runs
    assert main[0]["save_phase"] == "ab"
    assert main[0]["ckpt_files"] == ["ab_group0.pt", "ab_group1.pt", "ab_meta.json"]
    assert {"model.safetensors", "optimizer.bin"} <= set(main[0]["accelerate_files"])
    at_save = [rec["snapshots"][td.SAVE_AT] for rec in main]
    assert not _same(at_save[0], at_save[2])  # the groups really hold different states
    for r, rec in enumerate(resume):
        loaded = rec["loaded"]
        assert loaded["step_count"] == td.SAVE_AT and loaded["phase"] == "ab"
        assert loaded["role"] == ("A" if r < 2 else "B")
        assert _same(loaded["params"], at_save[r]), r  # its own group's state, not rank 0's
        assert rec["step_count"] == td.STEPS
        assert _same(rec["snapshots"][td.STEPS], main[r]["snapshots"][td.STEPS]), r
        assert rec["summary"] == main[r]["summary"]  # the traffic meter resumed too


# ------------------------------------------------------------------------------ refusals
def test_refused_setups_raise_before_anything_changes(runs, single):
    resume = runs[1]
    for rec in resume:
        assert "does not divide the world size 4" in rec["refusals"]["group_size"]
        assert "static_graph" in rec["refusals"]["static_graph"]
        assert rec["untouched_after_refusals"]
    refusals = single["refusals"]
    assert "dynamo_backend='no'" in refusals["dynamo"] and refusals["dynamo_untouched"]
    assert "mixed_precision='bf16'" in refusals["fp16"] and refusals["fp16_untouched"]


# ------------------------------------------------------------------------------ one process
def test_single_process_trains_every_phase_without_communication(single):
    assert not single["distributed"]
    assert single["model_type"] == "Sequential"  # no DDP wrapper
    phases = [m["phase"] for m in single["micro"]]
    assert phases == ["warmup"] * 3 + ["ab"] * 3 + ["rebound"] + ["ab"] * 3 + ["rebound", "ab"]
    assert {m["role"] for m in single["micro"] if m["phase"] == "ab"} == {"AB"}
    assert single["summary"]["bytes"] == 0 and single["summary"]["calls"] == 0
    assert max(single["ratios"]) > 1.0  # the AB phases really ran factorized
    losses = [m["loss"] for m in single["micro"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    w0 = single["w0_zero"]
    assert w0["phase"] == "ab" and w0["role"] == "AB" and w0["modes"] == ["ab", "ab"]
    assert w0["step_count"] == 2


# ------------------------------------------------------------------------------ DeepSpeed
def test_deepspeed_reads_ab_training_key_and_hands_the_engine_over(tmp_path):
    """Under `accelerate launch --use_deepspeed` (ZeRO-0, 2 processes) prepare reads the
    "ab_training" key of the DeepSpeed config, refuses ZeRO-3 before changing the model, and
    trains through ab_accel.deepspeed."""
    out = str(tmp_path)
    command = [ACCELERATE, "launch", "--use_deepspeed", "--zero_stage", "0",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               SCRIPT, "deepspeed", out]
    recs = _run(command, out, 2, {})
    for rec in recs:
        assert rec["distributed_type"] == "DistributedType.DEEPSPEED"
        assert '"stage": 3' in rec["zero3"] and rec["zero3_untouched"]
        assert {k: rec["config"][k] for k in td.CONFIG} == td.CONFIG
        assert rec["step_count"] == td.STEPS
        assert rec["summary"]["steps_by_phase"] == {"warmup": 3, "ab": 7, "rebound": 2}
    assert {m["role"] for m in recs[0]["micro"] if m["phase"] == "ab"} == {"A"}
    assert {m["role"] for m in recs[1]["micro"] if m["phase"] == "ab"} == {"B"}
    for step in (1, 6):
        assert _same(recs[0]["snapshots"][step], recs[1]["snapshots"][step]), step
    for step in (4, 8, 12):
        assert not _same(recs[0]["snapshots"][step], recs[1]["snapshots"][step]), step


def test_accelerate_launch_cpu_with_several_processes_is_refused_by_prepare():
    from ab_accel.accelerate import check_launch

    one_of_four = {"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ABConfigError, match="starts ONE process"):
        check_launch(one_of_four)
    check_launch({**one_of_four, "WORLD_SIZE": "4"})  # a real multi-process launch
    check_launch({"ACCELERATE_USE_CPU": "true"})  # one process, asked for
    # --num_processes 4 without --multi_gpu on a machine without GPUs: --cpu was not passed,
    # so the message must not blame it
    with pytest.raises(ABConfigError, match="without --multi_gpu") as info:
        check_launch({**one_of_four, "ACCELERATE_USE_CPU": "False"})
    assert "--cpu makes" not in str(info.value)


def accelerate_load_state_without_shards(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """accelerator.save_state mid-AB-phase, the AB shards removed, accelerator.load_state."""
    import shutil

    from accelerate import Accelerator

    import ab_accel

    from scenarios import flat_named, loss_of, small_cnn

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = ab_accel.ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1, rank_fraction=0.5)
    model = small_cnn()
    model, opt = ab_accel.prepare(acc, model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                  config=cfg)
    for step in range(2):
        opt.zero_grad()
        acc.backward(loss_of(model, rank, step))
        opt.step()
    folder = os.path.join(tmp, "state")
    acc.save_state(folder)
    acc.wait_for_everyone()
    if rank == 0:
        shutil.rmtree(os.path.join(folder, "ab_training"))
    acc.wait_for_everyone()
    before = flat_named(model)
    try:
        acc.load_state(folder)
        error = None
    except ab_accel.CheckpointError as exc:
        error = str(exc)
    after = flat_named(model)
    return {"error": error, "untouched": all(torch.equal(before[k], after[k]) for k in before)}


def test_a_state_folder_without_ab_shards_is_refused_naming_the_file_on_every_rank(tmp_path):
    from distributed import run_distributed

    for r in run_distributed(accelerate_load_state_without_shards, 2, str(tmp_path)):
        assert r["error"] is not None and "ab_meta.json" in r["error"], r["error"]
        assert os.path.join(str(tmp_path), "state", "ab_training") in r["error"]
        assert r["untouched"]
