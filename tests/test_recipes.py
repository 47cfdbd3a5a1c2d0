"""The recipes (recipes/vit.py, recipes/resnet.py) end to end, through `accelerate launch`.

Real processes (gloo on CPU), real data (sklearn's digits, and JPEG files written here with PIL
and read through `datasets`' imagefolder), real transformers models. Each launched run is a
module fixture shared by the tests that read it:

* vit, 4 processes, digits: warm-up -> AB -> sync -> rebound -> AB -> sync -> rebound, ending on
  a factorization, so the export is the low-rank AB model merged;
* resnet, 2 processes, digits, checkpoints every 9 steps, and the same run resumed from its
  mid-AB-phase checkpoint;
* vit, 2 processes, fine-tuning a saved checkpoint on a JPEG folder with a corrupt file in
  train/ and in val/, with AB and with --no-ab (plain DDP).

The checks that stop before training run the recipe as a plain `python` process (no launcher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from distributed import free_port, run_or_dump

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
sys.path.insert(0, RECIPES)
import args  # noqa: E402  (recipes/args.py)
import data  # noqa: E402
import modeling  # noqa: E402
import report  # noqa: E402
import resnet  # noqa: E402
import train_image  # noqa: E402
import vit  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
# The short AB schedule of the digits runs: phases at 8 / 17 / 20 / 29 / 32.
VIT_SCHEDULE = ["--ab_training.warmup_steps", "8", "--ab_training.sync_every", "12",
                "--ab_training.rebound_steps", "3", "--ab_training.lr_rebound_steps", "2"]


def launch(script: str, nproc: int, out: str, *args: str, check: bool = True
           ) -> subprocess.CompletedProcess:
    """accelerate launch --multi_gpu --num_processes N (the recipe picks CPU/gloo itself)."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(RECIPES, script),
           "--output_dir", out, *args]
    proc = run_or_dump(cmd, 400, ENV, cwd=ROOT)
    assert proc.returncode == 0 or not check, (proc.stdout[-3000:] + "\n" + proc.stderr[-8000:])
    return proc


def run_plain(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(RECIPES, script), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)


def summary_of(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- launched runs
@pytest.fixture(scope="module")
def vit4(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vit4"))
    proc = launch("vit.py", 4, out, "--max_steps", "32", "--log_every", "1", *VIT_SCHEDULE)
    return out, summary_of(out), proc


@pytest.fixture(scope="module")
def resnet2(tmp_path_factory):
    """ResNet, 2 processes, checkpoints at steps 9 and 18 (both inside an AB phase)."""
    out = str(tmp_path_factory.mktemp("resnet2"))
    args = ["--max_steps", "24", "--log_every", "1", "--report_to", "none",
            "--ab_training.warmup_steps", "6", "--ab_training.sync_every", "10",
            "--ab_training.rebound_steps", "3", "--ab_training.lr_rebound_steps", "2"]
    launch("resnet.py", 2, out, "--checkpointing_steps", "9", *args)
    return out, summary_of(out), args


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """An ImageNet-style tree of real JPEG files: 3 classes, 16 train / 6 val images each,
    plus one corrupt file in train/ and one truncated file in val/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
                pixels[:, :, c] += 150  # each class has its colour
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    (root / "train" / "bee" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = (root / "val" / "cat" / "0.JPEG").read_bytes()
    (root / "val" / "cat" / "broken.JPEG").write_bytes(good[:100])
    return str(root)


@pytest.fixture(scope="module")
def pretrained_vit(tmp_path_factory):
    """A small RGB ViT saved with save_pretrained: what --model_name_or_path fine-tunes from
    (10 labels: the recipe gives it a new head for the folder's 3 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10))
    path = str(tmp_path_factory.mktemp("pretrained"))
    model.save_pretrained(path)
    return path


def folder_args(jpeg_tree: str, cache: str, pretrained: str) -> list[str]:
    return ["--config", "configs/vit_digits.yaml", "--data_dir", jpeg_tree, "--cache_dir", cache,
            "--model_name_or_path", pretrained,
            "--image_mean", "0.5,0.5,0.5", "--image_std", "0.5,0.5,0.5", "--image_size", "8",
            "--batch_size", "8", "--max_steps", "12", "--log_every", "1", "--num_workers", "1",
            "--report_to", "none", "--ab_training.warmup_steps", "3",
            "--ab_training.sync_every", "4", "--ab_training.rebound_steps", "1",
            "--ab_training.lr_rebound_steps", "1"]


@pytest.fixture(scope="module")
def folder_runs(jpeg_tree, pretrained_vit, tmp_path_factory):
    """The same fine-tuning run on the JPEG tree twice, 2 processes: AB-training, then --no-ab
    (plain DDP)."""
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    ab_out, dp_out = (str(tmp_path_factory.mktemp(n)) for n in ("folder_ab", "folder_dp"))
    args = folder_args(jpeg_tree, cache, pretrained_vit)
    ab = launch("vit.py", 2, ab_out, *args)
    dp = launch("vit.py", 2, dp_out, "--no-ab", *args)
    return (ab_out, summary_of(ab_out), ab), (dp_out, summary_of(dp_out), dp)


# ----------------------------------------------------------------------------- end to end
def test_vit_4_processes_on_digits_crosses_every_phase(vit4):
    out, s, proc = vit4
    assert "sklearn digits" in proc.stderr  # the log says which data it trains on
    assert s["ranks"] == 4 and s["steps"] == 32 and s["ab"]
    assert s["groups"] == [[0, 1], [2, 3]] and s["roles"] == ["A", "B"]
    assert [tuple(p) for p in s["phases"]] == [
        ("warmup", 0, 8), ("ab", 8, 17), ("rebound", 17, 20), ("ab", 20, 29),
        ("rebound", 29, 32)]
    assert [(w["event"], w["step"]) for w in s["switches"]] == [
        ("factorize", 8), ("sync", 17), ("factorize", 20), ("sync", 29), ("factorize", 32)]
    # Every step was logged, with the loss averaged over the ranks, and it went down.
    losses = [r["loss"] for r in s["history"]["train"]]
    assert len(losses) == 32 and np.mean(losses[-5:]) < np.mean(losses[:5])
    # Epoch 1 ended at step 22, inside the second AB phase: the groups held different models.
    (ev,) = s["history"]["eval"]
    assert ev["step"] == 22 and ev["phase"] == "ab" and ev["groups_differ"]
    acc = s["accuracy"]
    assert acc["count"] == 360 and 0.1 < acc["top1"] <= acc["top5"] <= 1.0
    # Traffic: the world's wire bytes against the exact DP count of the same steps.
    t = s["traffic"]
    assert len(t["per_rank"]) == 4
    assert t["reduction_vs_dp"] == pytest.approx(
        1 - t["wire_bytes"] / t["dp_equivalent_wire_bytes"])
    assert 0.05 < t["reduction_vs_dp"] < 1
    per_step = s["bytes_per_step"]
    assert len(per_step["wire"]) == len(per_step["dp_equivalent_wire"]) == 32
    # AB steps (inside groups of 2, one factor) send less than a DP step; a warm-up step sends
    # what DP would (plus one flag per parameter: which gradients exist).
    assert per_step["wire"][3] == pytest.approx(per_step["dp_equivalent_wire"][3], rel=1e-3)
    assert per_step["wire"][12] < 0.6 * per_step["dp_equivalent_wire"][12]
    assert t["wire_bytes_by_phase"]["ab"] > 0 and t["wire_bytes_by_phase"]["sync"] > 0
    # Outputs: plot, trackers, the JSON log.
    with open(s["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(s["plot"]) > 20_000
    events = [f for _, _, files in os.walk(os.path.join(out, "logs")) for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        assert len(fh.readlines()) == 32 + 1 + 1  # 32 losses, 1 epoch eval, 1 final eval
    assert f"{100 * t['reduction_vs_dp']:.1f}% less" in proc.stdout


def test_summary_names_the_factorization_at_the_end_of_the_run_and_counts_skipped_steps(vit4):
    _, s, proc = vit4
    # The last factorization runs at boundary 32 = the run's length: at its end, not "after
    # the last step"; its numbers come from ABOptimizer.switches.
    last = s["switches"][-1]
    assert (last["event"], last["step"]) == ("factorize", s["steps"])
    c = s["compression"]
    assert "at the end of the run" in c["of"] and "after the last" not in proc.stdout
    assert c["factorized_ratio"] == last["compression"]["factorized_ratio"]
    assert s["skipped_steps"] == 0
    assert all(r["skipped_steps"] == 0 for r in s["history"]["train"])


def test_warmup_zero_summary_shows_the_factorization_at_step_0(tmp_path):
    out = tmp_path / "w0"
    proc = run_plain("vit.py", "--max_steps", "3", "--ab_training.warmup_steps", "0",
                     "--ab_training.sync_every", "10", "--ab_training.rebound_steps", "2",
                     "--ab_training.rank_fraction", "0.25", "--report_to", "none",
                     "--save_model", "false", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary_of(str(out))
    first = s["switches"][0]
    assert (first["event"], first["step"]) == ("factorize", 0)
    assert "at step 0" in s["compression"]["of"] and s["compression"]["factorized_ratio"] > 2
    assert s["layer_ranks_at_end"] == first["ranks"]


def test_a_run_shorter_than_the_warm_up_says_it_never_reaches_an_ab_phase():
    from ab_accel.schedule import ABSchedule

    schedule = ABSchedule(warmup_steps=44, sync_every=55, rebound_steps=11)
    assert "never reaches an AB phase" in schedule.never_ab(30)
    assert "traffic reduction against DP will be ~0" in schedule.never_ab(44)
    assert schedule.never_ab(45) is None


def test_merged_export_loads_in_plain_transformers_and_gives_the_ab_logits(vit4):
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    out, s, _ = vit4
    # The run ended on a factorization: the model was in AB mode (A and B, truncated ranks).
    ranks = s["layer_ranks_at_end"]
    assert len(ranks) == 24 and all(isinstance(r, int) for r in ranks.values())
    assert s["export"]["final_sync"] == "in sync"
    model, info = ViTForImageClassification.from_pretrained(
        os.path.join(out, "model"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    state = load_file(os.path.join(out, "model", "model.safetensors"))
    assert not any(k.endswith((".A", ".B")) for k in state)
    check = torch.load(os.path.join(out, "export_check.pt"))
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=check["pixel_values"]).logits
    torch.testing.assert_close(logits, check["logits"], atol=1e-5, rtol=1e-5)
    # The export is the low-rank model: each merged weight has at most its AB rank.
    w = model.vit.layers[1].mlp.fc1.weight.detach()
    assert torch.linalg.matrix_rank(w) <= ranks["vit.layers.1.mlp.fc1"] < min(w.shape)


def test_resnet_resumed_mid_ab_phase_ends_with_the_same_weights(resnet2, tmp_path):
    from safetensors.torch import load_file

    out, s, args = resnet2
    assert s["recipe"] == "resnet" and s["ranks"] == 2
    assert [tuple(p) for p in s["phases"]] == [
        ("warmup", 0, 6), ("ab", 6, 13), ("rebound", 13, 16), ("ab", 16, 23),
        ("rebound", 23, 24)]
    ckpt = os.path.join(out, "checkpoints", "step_9")
    with open(os.path.join(ckpt, "ab_training", "ab_meta.json")) as fh:
        meta = json.load(fh)
    assert meta["step"] == 9 and meta["phase"] == "ab"  # mid-AB: the two groups differ
    a = torch.load(os.path.join(ckpt, "ab_training", "ab_group0.pt"), weights_only=False)
    b = torch.load(os.path.join(ckpt, "ab_training", "ab_group1.pt"), weights_only=False)
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    resumed = str(tmp_path / "resumed")
    proc = launch("resnet.py", 2, resumed, "--resume_from_checkpoint", ckpt, *args)
    assert "resumed from" in proc.stderr and "at step 9" in proc.stderr
    r = summary_of(resumed)
    first = load_file(os.path.join(out, "model", "model.safetensors"))
    again = load_file(os.path.join(resumed, "model", "model.safetensors"))
    assert first.keys() == again.keys()
    for key in first:  # bit for bit: BatchNorm statistics included
        assert torch.equal(first[key], again[key]), key
    assert r["history"] == s["history"]
    assert r["traffic"]["wire_bytes"] == s["traffic"]["wire_bytes"]
    assert r["bytes_per_step"] == s["bytes_per_step"]


def test_checkpoint_folders_are_whole_and_latest_is_the_newest_complete_one(resnet2, tmp_path):
    import shutil

    out, _, _ = resnet2
    folder = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(folder)) == ["step_18", "step_9"]  # no step_N.tmp left behind
    with open(os.path.join(folder, "step_18", "ab_state.json")) as fh:  # save_state's manifest
        manifest = json.load(fh)
    assert "model.safetensors" in manifest["files"] and manifest["world_size"] == 2
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("model", "logs"))
    shutil.copytree(copy / "checkpoints" / "step_18", copy / "checkpoints" / "step_27.tmp")
    cfg = args.parse(resnet.RECIPE, ["--output_dir", str(copy), "--resume_from_checkpoint",
                                     "latest"], world_size=2)
    assert train_image.checkpoint_dir(cfg) == str(copy / "checkpoints" / "step_18")


def test_a_truncated_checkpoint_file_stops_the_resume_naming_it(resnet2, tmp_path):
    import shutil

    out, _, run_args = resnet2
    bad = tmp_path / "step_9"
    shutil.copytree(os.path.join(out, "checkpoints", "step_9"), bad)
    with open(bad / "model.safetensors", "r+b") as fh:  # accelerate's file: the recipe's manifest
        fh.truncate(100)
    proc = run_plain("resnet.py", "--resume_from_checkpoint", str(bad), *run_args,
                     "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "traceback" not in proc.stderr.lower()
    assert f"{bad / 'model.safetensors'!s}' is 100 bytes" in proc.stderr
    assert "truncated" in proc.stderr and "resumed from" not in proc.stderr
    shutil.copy(os.path.join(out, "checkpoints", "step_9", "model.safetensors"), bad)
    shard = bad / "ab_training" / "ab_group1.pt"  # an AB shard: the core's manifest
    with open(shard, "r+b") as fh:
        fh.truncate(1000)
    proc = run_plain("resnet.py", "--resume_from_checkpoint", str(bad), *run_args,
                     "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "traceback" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert f"{shard!s}' is 1000 bytes" in proc.stderr and "resumed from" not in proc.stderr


def test_resume_with_a_changed_schedule_is_refused_and_a_changed_lr_reported(resnet2, tmp_path):
    out, _, run_args = resnet2
    ckpt = os.path.join(out, "checkpoints", "step_9")
    changed = [*run_args, "--ab_training.sync_every", "11", "--lr", "1e-3"]
    proc = launch("resnet.py", 2, str(tmp_path / "changed"), "--resume_from_checkpoint", ckpt,
                  *changed, check=False)
    # one line from rank 0, a non-zero status, no launcher report, no per-rank traceback
    assert proc.returncode != 0 and proc.stderr.count("resnet.py: error: ") == 1
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    assert "resuming with changed knobs: lr 0.003 -> 0.001" in proc.stderr
    assert "different AB schedule (sync_every: 10 -> 11)" in proc.stderr
    assert "accept_resume_changes" in proc.stderr and "resumed from" not in proc.stderr


def test_jpeg_folder_through_imagefolder_skips_corrupt_files_with_a_warning(folder_runs,
                                                                            jpeg_tree):
    (out, s, proc), _ = folder_runs
    assert "datasets 'imagefolder'" in s["data"] and "49 train / 19 eval" in s["data"]
    # Fine-tuned from the saved checkpoint, with a new head for the 3 folder classes, and
    # without the orthogonal init (it would reset the pretrained spectrum).
    assert "fine-tuning" in proc.stderr and not s["ab_config"]["orthogonal_init"]
    with open(os.path.join(out, "model", "config.json")) as fh:
        assert json.load(fh)["id2label"] == {"0": "ant", "1": "bee", "2": "cat"}
    for path in ("train/bee/broken.JPEG", "val/cat/broken.JPEG"):
        assert f"skipping unreadable image {os.path.join(jpeg_tree, path)}" in proc.stderr
    assert s["steps"] == 12 and s["skipped_images"]["train"] >= 1
    assert s["skipped_images"]["eval"] == 1 and s["accuracy"]["count"] == 18
    assert [p[0] for p in s["phases"]] == ["warmup", "ab", "rebound", "ab", "rebound", "ab"]


def test_no_ab_is_plain_ddp_with_everything_else_identical(folder_runs):
    (_, ab, _), (_, dp, dp_proc) = folder_runs
    assert not dp["ab"] and "plain data parallel (DDP" in dp_proc.stderr
    assert dp["traffic"]["per_rank"][0]["measured_by"].startswith("DDP comm hook")
    # Warm-up is plain data parallel in both runs: same data, same initial weights, same loss.
    warm = [r for r in ab["history"]["train"] if r["phase"] == "warmup"]
    assert len(warm) == 3
    for a, d in zip(warm, dp["history"]["train"][:3], strict=True):
        assert a["loss"] == pytest.approx(d["loss"], rel=1e-6)
    # What DDP really sent each step (its comm hook) is what the AB meter counts as the DP
    # equivalent: the baseline of the reported reduction is exact.
    assert dp["bytes_per_step"]["wire"] == ab["bytes_per_step"]["dp_equivalent_wire"]
    assert ab["traffic"]["wire_bytes"] < dp["traffic"]["wire_bytes"]


# ----------------------------------------------------------------------------- stops early
def test_wrong_config_key_stops_before_training(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 2\nweight_decy: 0.1\n")
    out = tmp_path / "out"
    start = time.time()
    proc = run_plain("vit.py", "--config", str(config), "--output_dir", str(out))
    assert proc.returncode == 2
    assert "unknown key 'weight_decy'" in proc.stderr and "'weight_decay'" in proc.stderr
    assert not out.exists() and time.time() - start < 60  # nothing loaded, nothing written
    proc = run_plain("resnet.py", "--ab_training.sync_evry", "5")
    assert proc.returncode == 2 and "did you mean 'sync_every'" in proc.stderr
    with pytest.raises(args.ConfigError, match='key "betas"'):  # one value for two
        args.parse(vit.RECIPE, ["--betas", "0.9"], world_size=1)
    with pytest.raises(args.ConfigError, match="not a ViTConfig field. Did you mean "
                                               "'hidden_size'"):
        modeling.check_model_keys("vit", {"hiden_size": 8})


def test_missing_data_folder_stops_with_the_expected_layout(tmp_path):
    proc = run_plain("vit.py", "--data_dir", str(tmp_path / "nowhere"), "--config",
                     "configs/vit_digits.yaml")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "<data_dir>/train/<class>" in proc.stderr
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "train" / "a" / "0.png").write_bytes(b"")
    with pytest.raises(args.ConfigError, match="has no val/ folder"):
        data.check_data_dir(str(tmp_path / "tree"))
    (tmp_path / "tree" / "val").mkdir()
    with pytest.raises(args.ConfigError, match="holds no class folders"):
        data.check_data_dir(str(tmp_path / "tree"))
    (tmp_path / "tree" / "val" / "a").mkdir()  # class folders, no images
    with pytest.raises(args.ConfigError, match=r"class folders of .*val' \(a\) hold no image"):
        data.check_data_dir(str(tmp_path / "tree"))
    with pytest.raises(args.ConfigError, match=r"\(10 images\) is smaller than one per-process "
                                               r"batch \(16\)"):
        data.loaders(list(range(10)), list(range(4)), 16, 0, False)


def test_accelerate_launch_cpu_with_4_processes_is_refused_with_how_to_get_four(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run(
        [accelerate, "launch", "--cpu", "--num_processes", "4", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), os.path.join(RECIPES, "vit.py"), "--output_dir", str(tmp_path / "o")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "started ONE process, not the 4 asked for" in proc.stderr
    assert "--cpu makes accelerate launch use its simple launcher" in proc.stderr
    assert "run: accelerate launch --multi_gpu --num_processes 4 " in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_finetune_with_deepspeed_in_one_plain_process_names_the_launchers(tmp_path):
    proc = run_plain("finetune.py", "--model_name_or_path", str(tmp_path), "--output_dir",
                     str(tmp_path / "o"), "--deepspeed", "configs/ds_ab_zero0.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs a launcher" in proc.stderr and "deepspeed --num_gpus N" in proc.stderr


# ----------------------------------------------------------------------------- config layers
def test_config_file_then_nodes_row_then_command_line():
    cfg = args.parse(resnet.RECIPE, ["--lr", "1e-3", "--ab_training.rebound_steps", "7"],
                     world_size=1)
    assert cfg.config == "configs/resnet_digits.yaml"  # no data argument: digits
    assert cfg.lr == 1e-3 and cfg.ab_training.rebound_steps == 7
    assert cfg.ab_training.sync_every == 55 and cfg.model["depths"] == [1, 1, 1, 1]
    # The paper's table: 8 processes = 2 nodes of 4 -> that row; the command line still wins.
    cfg = args.parse(resnet.RECIPE, ["--dataset_name", "x/y", "--nodes", "2",
                                     "--ab_training.sync_every", "999"], world_size=8)
    assert cfg.config == "configs/resnet50_imagenet.yaml" and cfg.nodes == 2
    assert cfg.batch_size == 2048 and cfg.ab_training.warmup_steps == 24000
    assert cfg.ab_training.sync_every == 999 and cfg.lr == 3.5e-3
    ab = args.ab_config(cfg, 8, from_scratch=True)
    assert ab.group_size == 4 and ab.sync_mode == "with-stale" and ab.orthogonal_init
    with pytest.raises(args.ConfigError, match=r"no row for 3 node\(s\)"):
        args.parse(vit.RECIPE, ["--dataset_name", "x/y", "--nodes", "3"], world_size=4)
    cfg = args.parse(vit.RECIPE, ["--dataset_name", "x/y", "--nodes", "4", "--no-ab"],
                     world_size=4)
    ab = args.ab_config(cfg, 4, from_scratch=False)
    assert cfg.batch_size == 4096 and ab.group_size == 4 and ab.sync_mode == "only-b"
    assert not ab.enabled and not ab.orthogonal_init  # --no-ab; fine-tuning keeps the init
    with pytest.raises(args.ConfigError, match="group_size"):
        args.ab_config(args.parse(vit.RECIPE, []), 3, True)


def test_top_k_accuracy_counts_ranked_predictions():
    ranked = torch.tensor([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6], [3, 4, 5, 6, 7]])
    top1, top5 = report.top_k_hits(ranked, torch.tensor([1, 6, 0]))
    count = 3
    assert {"top1": top1 / count, "top5": top5 / count, "count": count} == {
        "top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3), "count": 3}


def test_learning_rate_warms_up_then_follows_the_cosine():
    # torch's schedulers, stepped once per optimizer step: the lr of steps 0 .. 110
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = modeling.lr_schedule(opt, total_steps=110, warmup_steps=10, lr_start=0.1,
                                    min_lr=0.0)
    lr = []
    for _ in range(111):
        lr.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lr[0] == pytest.approx(0.1)
    assert lr[5] == pytest.approx(0.55)
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.5)
    assert lr[110] == pytest.approx(0.0)
