"""The recipes as a newcomer meets them: own data in one flag, and no run that silently does
nothing.

Every claim about a launch is proven with a real `accelerate launch` (gloo on CPU): the bad
setups are refused before any training with ONE line from rank 0 that names the numbers and
the fix, a non-zero exit status, no traceback wall from the launcher and no per-rank noise;
`accelerate launch --multi_gpu --num_processes 4 recipes/vit.py --data_dir D` on a small RGB
folder written here trains through an AB phase with everything else derived from the data.
The runs start in a temporary folder, so the output folders named after the data land there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distributed import free_port, run_or_dump

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
sys.path.insert(0, RECIPES)
import args  # noqa: E402  (recipes/args.py)
import data  # noqa: E402
import vit  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
WALL = ("Traceback", "ChildFailedError", "CalledProcessError", "Connection closed")


def write_tree(root: str, classes: tuple[str, ...], n_train: int, n_val: int = 4,
               size: int = 32, extra: int = 0) -> str:
    """An ImageNet-layout folder of RGB PNGs, one colour per class (plus ``extra`` images)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n + (extra if split == "train" and c == 0 else 0)):
                pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                pixels[:, :, c % 3] += 150
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return root


def accelerate_launch(cwd: str, launcher: list[str], *script_args: str, timeout: float = 400
                      ) -> subprocess.CompletedProcess:
    cmd = [ACCELERATE, "launch", "--num_machines", "1", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *launcher, os.path.join(RECIPES, "vit.py"),
           "--report_to", "none", *script_args]
    return run_or_dump(cmd, timeout, ENV, cwd=cwd)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    return {"pets": write_tree(str(root / "pets"), ("ant", "bee", "cat"), 48),
            "tiny": write_tree(str(root / "tiny"), ("ant", "bee", "cat"), 20, extra=1),  # 61
            "one": write_tree(str(root / "one"), ("solo",), 10)}


# ----------------------------------------------------------------------------- the one rule
def test_scaled_schedule_is_the_one_rule_of_the_recipes_and_the_benchmarks():
    from ab_accel.schedule import ABSchedule, scaled_schedule
    from benchmarks.compare import ab_schedule_for

    for steps in (13, 48, 200, 600):
        s = scaled_schedule(steps)
        sched = ABSchedule(s["warmup_steps"], s["sync_every"], s["rebound_steps"])
        assert sched.never_ab(steps) is None and sched.phase(steps - 1) == "rebound"
        assert sched.events(steps) == ()  # the run ends before the next factorization
        assert ab_schedule_for(steps) == {"ab_warmup": s["warmup_steps"], "ab_sync_every": s[
            "sync_every"], "ab_rebound": s["rebound_steps"], "ab_lr_rebound": s[
            "lr_rebound_steps"]}
    with pytest.raises(ValueError, match="a run of 12 optimizer step.* at least 13 steps"):
        scaled_schedule(12)


def test_a_config_for_other_images_is_adapted_line_by_line(trees):
    """--config configs/vit_digits.yaml (8x8 grey) on 32x32 RGB images: every value that
    changes is said, the output folder is named after the data, not runs/vit_digits."""
    parsed = args.parse(vit.RECIPE, ["--config", "configs/vit_digits.yaml", "--data_dir",
                                     trees["pets"]], world_size=4)
    facts = data.survey(data.folder_images(trees["pets"]))
    assert (facts.size, facts.channels, facts.sampled) == (32, 3, 64)
    cfg, steps, said = args.derive(parsed, vit.RECIPE, 4, 144, facts)
    line = "; ".join(said)
    assert "image_size 32 (the images are 32x32; configs/vit_digits.yaml says 8)" in line
    assert "model.patch_size 8 (keeps configs/vit_digits.yaml's 4x4 patches)" in line
    assert "3 channel(s)" in line and "configs/vit_digits.yaml says 1 channel(s)" in line
    assert "output_dir runs/vit_pets (named after the data" in line
    assert (cfg.image_size, len(cfg.image_mean), cfg.output_dir) == (32, 3, "runs/vit_pets")
    assert steps == 24 * 2 and cfg.ab_training.warmup_steps == 9  # 144 // 64 = 2 steps/epoch
    # What the command line names is the user's: kept, and nothing derived over it.
    parsed = args.parse(vit.RECIPE, ["--data_dir", trees["pets"], "--image_size", "16",
                                     "--output_dir", "mine", "--ab_training.warmup_steps",
                                     "5"], world_size=4)
    cfg, _, said = args.derive(parsed, vit.RECIPE, 4, 144, facts)
    assert (cfg.image_size, cfg.output_dir, cfg.ab_training.warmup_steps) == (16, "mine", 5)
    assert not any(s.startswith(("image_size", "output_dir", "AB schedule")) for s in said)


# ----------------------------------------------------------------------------- refused launches
def refusal_cases(trees: dict[str, str], tmp: str) -> dict[str, tuple]:
    """id -> (launcher flags, script args, what the one line says)."""
    os.makedirs(os.path.join(tmp, "other"))
    with open(os.path.join(tmp, "other", "summary.json"), "w") as fh:
        json.dump({"config": {"data_dir": trees["tiny"], "dataset_name": None}}, fh)
    block = {"warmup_steps": 3, "sync_every": 5, "rebound_steps": 1, "lr_rebound_steps": 1}
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 0},
          "ab_training": block}
    with open(os.path.join(tmp, "ds.json"), "w") as fh:
        json.dump(ds, fh)
    multi = ["--multi_gpu", "--mixed_precision", "no"]
    return {
        "61_images_global_batch_64_4_processes": (
            [*multi, "--num_processes", "4"], ["--data_dir", trees["tiny"], "--batch_size", "64"],
            ["61 training images with a global batch of 64 (16 per process x 4 processes x 1 "
             "accumulation) make 0 optimizer steps per epoch", "Pass --batch_size 60 or less"]),
        "num_processes_4_without_multi_gpu": (
            ["--num_processes", "4", "--mixed_precision", "no"], ["--data_dir", trees["pets"]],
            ["started ONE process, not the 4 asked for (without --multi_gpu",
             "run: accelerate launch --multi_gpu --num_machines 1 --dynamo_backend no "
             "--main_process_port ", f" --num_processes 4 --mixed_precision no {RECIPES}/vit.py "
             f"--report_to none --data_dir {trees['pets']}"]),
        "launcher_mixed_precision_fp16": (
            ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "fp16"],
            ["--data_dir", trees["pets"]],
            ["accelerate launch --mixed_precision fp16 is not used by this recipe",
             "pass --mixed_precision fp16 after the script name"]),
        "ab_training_flags_beside_a_deepspeed_json": (
            ["--use_deepspeed", "--deepspeed_config_file", os.path.join(tmp, "ds.json"),
             "--num_processes", "2"],
            ["--max_steps", "12", "--ab_training.warmup_steps", "10",
             "--ab_training.sync_every", "30"],
            ["--ab_training.warmup_steps 10 --ab_training.sync_every 30 on the command line",
             "warmup_steps=10 vs 3, sync_every=30 vs 5", "Change the JSON's block, or drop"]),
        "one_class_folder": (
            [*multi, "--num_processes", "2"], ["--data_dir", trees["one"]],
            ["holds one class folder ('solo'): a classifier needs at least two"]),
        "missing_folder_with_a_paper_row": (
            [*multi, "--num_processes", "2"], ["--data_dir", os.path.join(tmp, "nowhere"),
                                               "--nodes", "4"],
            ["nowhere' does not exist"]),
        "output_dir_of_a_run_on_other_data": (
            [*multi, "--num_processes", "2"], ["--data_dir", trees["pets"], "--output_dir",
                                               os.path.join(tmp, "other")],
            [f"holds a finished run on {trees['tiny']}, not on {trees['pets']}",
             "pass another --output_dir"]),
        # After the process group and the data loading: digits, the file's warm-up of 110.
        "digits_run_too_short_for_its_warm_up": (
            [*multi, "--num_processes", "4"], ["--max_steps", "5"],
            ["run of 5 steps never reaches an AB phase", "warmup_steps 110",
             "Or pass --no-ab"]),
    }


CASES = ["61_images_global_batch_64_4_processes", "num_processes_4_without_multi_gpu",
         "launcher_mixed_precision_fp16", "ab_training_flags_beside_a_deepspeed_json",
         "one_class_folder", "missing_folder_with_a_paper_row",
         "output_dir_of_a_run_on_other_data", "digits_run_too_short_for_its_warm_up"]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_launch_says_one_line_from_rank_0_and_exits_non_zero(case, trees, tmp_path):
    launcher, script_args, says = refusal_cases(trees, str(tmp_path))[case]
    proc = accelerate_launch(str(tmp_path), launcher, *script_args)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("vit.py: error: ")]
    assert len(errors) == 1, out[-6000:]  # once, from rank 0, one line
    for text in says:
        assert text in errors[0], errors[0]
    assert not any(w in out for w in WALL), out[-6000:]
    assert "--cpu" not in errors[0] or "--cpu" in launcher  # never blamed when not passed
    assert not os.path.exists(tmp_path / "runs")  # nothing trained, nothing written


# ----------------------------------------------------------------------------- own data
def test_own_folder_in_one_flag_reaches_an_ab_phase_on_4_processes(trees, tmp_path):
    from ab_accel.schedule import scaled_schedule

    proc = accelerate_launch(str(tmp_path), ["--multi_gpu", "--num_processes", "4"],
                             "--data_dir", trees["pets"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    derived = [line for line in out.splitlines() if "derived from the data: " in line]
    assert len(derived) == 1, out[-6000:]  # once, at the start, from rank 0
    for text in ("image_size 32 (the images are 32x32", "3 channel(s), image_mean [",
                 "output_dir runs/vit_pets (named after the data",
                 "AB schedule scaled to the run's 48 steps"):
        assert text in derived[0], derived[0]
    s = json.loads((tmp_path / "runs" / "vit_pets" / "summary.json").read_text())
    assert s["ranks"] == 4 and s["steps"] == 48  # 144 images / 64 = 2 steps x 24 epochs
    assert {k: s["ab_config"][k] for k in scaled_schedule(48)} == scaled_schedule(48)
    assert "ab" in [p[0] for p in s["phases"]] and s["traffic"]["reduction_vs_dp"] > 0
    assert s["config"]["image_size"] == 32 and len(s["config"]["image_mean"]) == 3
    assert not any(w in out for w in WALL) and "one process" not in out


def test_ctrl_c_ends_every_process_with_one_line(trees, tmp_path):
    """SIGINT to the launch's process group, as a terminal's Ctrl-C sends it, mid-training."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), os.path.join(RECIPES, "vit.py"), "--data_dir", trees["pets"],
           "--epochs", "5000", "--eval_every_epochs", "1000", "--checkpointing_steps", "4",
           "--report_to", "none"]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = tmp_path / "runs" / "vit_pets" / "checkpoints"
    deadline = time.time() + 300
    # a complete checkpoint (a save still under way is step_N.tmp)
    while not (checkpoints.exists() and any(not p.name.endswith(".tmp")
                                            for p in checkpoints.glob("step_*"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("vit.py: interrupted at step ")]
    assert len(lines) == 1 and "last checkpoint runs/vit_pets/checkpoints/step_" in lines[0], \
        out[-4000:]
    assert proc.returncode != 0 and not any(w in out for w in WALL), out[-4000:]
    time.sleep(2)
    alive = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert alive.stdout.strip() == ""  # no rank left behind


def test_launch_checks_name_the_right_cause_and_the_exact_command():
    import launch

    simple = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    cmd = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "4",
           "recipes/vit.py", "--data_dir", "my images"]
    with pytest.raises(args.ConfigError) as err:
        launch.check_launch(simple, cmd)
    assert "not the 4 asked for (without --multi_gpu" in str(err.value)
    assert "--cpu" not in str(err.value)  # not passed: not blamed
    assert str(err.value).endswith("run: accelerate launch --multi_gpu --num_processes 4 "
                                   "recipes/vit.py --data_dir 'my images'")
    with pytest.raises(args.ConfigError, match=r"\(--cpu makes .* run: accelerate launch "
                                                r"--multi_gpu --num_processes 4 recipes"):
        launch.check_launch({**simple, "ACCELERATE_USE_CPU": "True"},
                            cmd[:3] + ["--cpu"] + cmd[3:])
    launch.check_launch({**simple, "WORLD_SIZE": "4"}, cmd)  # a real multi-process launch
    launch.check_launch({}, cmd)  # plain python
    # A launcher setting the recipe's knobs override: refused when it differs, never dropped.
    with pytest.raises(args.ConfigError, match="--mixed_precision bf16 after the script name"):
        launch.check_launcher_settings("no", 1, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(args.ConfigError, match="--gradient_accumulation_steps 4 after the"):
        launch.check_launcher_settings("no", 1, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    launch.check_launcher_settings("bf16", 2, {"ACCELERATE_MIXED_PRECISION": "bf16",  # agree
                                               "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
