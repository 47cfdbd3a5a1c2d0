"""ABTrainer (ab_accel.trainer): the HF Trainer with AB-training, on real gloo processes.

* Trainer + DDP, GPT-2 (transformers' Conv1D layers) from save_pretrained: gradient accumulation,
  clipping, eval, AB numbers in the logs, checkpoints mid-AB phase and an exact resume, then a
  last sync, merge and a reload with plain transformers.
* Trainer + DeepSpeed (ZeRO-0, torch autocast bf16 from configs/), ViT from save_pretrained on
  sklearn's digits, launched by torchrun: the same claims through the engine.
* recipes/finetune.py on a ViT and an imagefolder of real PNG files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ab_accel import ABConfigError
from ab_accel.trainer import config_for_trainer

import trainer_scenarios  # tests/ds_scripts (pytest's pythonpath)
from distributed import free_port, run_distributed, script_env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "ds_scripts")

BIN = os.path.dirname(sys.executable)


def _env() -> dict[str, str]:
    # PATH is left as it is: torch builds DeepSpeed's CPU op with the first `ninja` on PATH,
    # and two ninja versions alternating on one build folder rebuild the op every time.
    return script_env(SCRIPTS)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _check_schedule(steps_by_rank: list[dict]) -> None:
    """Ranks {0,1} and {2,3} are the two groups: identical inside a group after every step;
    different across groups after AB steps (not after the one that ends with the sync)."""
    for step in sorted(steps_by_rank[0]):
        v = [s[step]["params"] for s in steps_by_rank]
        assert _equal(v[0], v[1]) and _equal(v[2], v[3]), step
        if step in (1, 2, 5, 6):  # warm-up (2 ends with the factorization), the sync at
            # the end of step 5, the rebound step (ends with the factorization)
            assert _equal(v[0], v[2]), step
        if step in (3, 4, 7, 8):
            assert not _equal(v[0], v[2]), step
    assert [steps_by_rank[0][s]["phase_next"] for s in sorted(steps_by_rank[0])] == \
        ["warmup", "ab", "ab", "ab", "rebound", "ab", "ab", "ab"]


def _check_resume(steps: dict, resumed: dict) -> None:
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, rec in resumed.items():
        assert _equal(rec["params"], steps[step]["params"]), step


# --------------------------------------------------------------------- config, no processes
def test_config_comes_from_the_deepspeed_key_or_the_argument():
    ds = {"zero_optimization": {"stage": 0}, "ab_training": {"warmup_steps": 5}}
    assert config_for_trainer(None, ds).warmup_steps == 5
    assert config_for_trainer({"warmup_steps": 7}, None).warmup_steps == 7
    with pytest.raises(ABConfigError, match="differ"):
        config_for_trainer({"warmup_steps": 7}, ds)
    with pytest.raises(ABConfigError, match="ab_config=ABConfig"):
        config_for_trainer(None, {"zero_optimization": {"stage": 0}})
    with pytest.raises(ABConfigError, match='"stage": 2'):  # the fix named: 3 -> 2
        config_for_trainer(None, {"zero_optimization": {"stage": 3}, "ab_training": {}})
    config_for_trainer(None, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                              "ab_training": {}})


def test_fp16_is_refused_when_the_trainer_is_built(tmp_path):
    from transformers import TrainingArguments

    from ab_accel.trainer import ABTrainer

    trainer_scenarios.save_gpt2(str(tmp_path / "gpt2"))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "gpt2"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, fp16=True,
                             report_to="none")
    with pytest.raises(ABConfigError, match="bf16=True"):
        ABTrainer(model=model, args=args, ab_config={"warmup_steps": 1})


# --------------------------------------------------------------------- Trainer + DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return run_distributed(trainer_scenarios.trainer_ddp_gpt2, 4,
                           str(tmp_path_factory.mktemp("trainer_ddp")), timeout=500)


def test_ddp_reducer_is_off_and_the_step_counter_follows_optimizer_steps(ddp_run):
    for out in ddp_run:
        assert out["wrapped_is_ddp"] == "DistributedDataParallel"
        assert out["ddp_grad_sync"] is False
        assert set(out["ab_weights"]) <= set(out["ddp_ignored"])  # W is not held by DDP
        assert out["step_count"] == out["global_step"] == 8  # 16 micro-batches, GAS 2
        assert out["traffic"]["steps_by_phase"] == {"warmup": 2, "ab": 5, "rebound": 1}
        assert len(out["conv1d_layers"]) == 7  # GPT-2's Conv1D layers but the first


def test_ddp_groups_hold_identical_params_and_sync_restores_identity(ddp_run):
    _check_schedule([out["steps"] for out in ddp_run])


def test_ddp_logs_carry_ab_traffic_and_compression(ddp_run):
    history = ddp_run[0]["log_history"]
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 8 and len(eval_logs) == 2
    assert [h["ab_step"] for h in train_logs] == list(range(1, 9))
    assert [h["ab_phase"] for h in train_logs] == [0, 1, 1, 1, 2, 1, 1, 1]
    last = train_logs[-1]
    summary = ddp_run[0]["traffic"]
    assert last["ab_wire_bytes"] == summary["wire_bytes"]
    assert last["ab_traffic_reduction"] == pytest.approx(summary["reduction"])
    assert last["ab_compression"] > 1.0  # factorized layers, ranks below full
    assert all("ab_phase" in h for h in eval_logs)


def test_ddp_checkpoint_holds_every_group_and_resume_continues_exactly(ddp_run):
    info = ddp_run[0]["ckpt4_loading_info"]  # the dense export, written mid-AB-phase
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for out in ddp_run:
        assert out["ckpt4"] == ["ab_group0.pt", "ab_group1.pt", "ab_meta.json"]
        _check_resume(out["steps"], out["resumed_steps"])
        assert out["resumed_step_count"] == 8
        assert out["resumed_traffic"]["steps"] == out["traffic"]["steps"]
        assert out["resumed_traffic"]["bytes"] == out["traffic"]["bytes"]


def test_merged_gpt2_loads_in_plain_transformers_with_the_same_outputs(ddp_run):
    for out in ddp_run:
        assert out["final_sync_ran"]  # training ended inside an AB phase
        assert out["export_final_sync"] is False  # train() had reconciled the groups already
        assert out["export_compression"] > 1.0  # of the last factorization, not of W <- A B
        assert _equal(out["synced_params"], ddp_run[0]["synced_params"])
        assert "Conv1D" in out["plain_types"]
        assert not any(t.startswith("AB") for t in out["plain_types"])
        torch.testing.assert_close(out["plain_logits"], out["ab_logits"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- Trainer + DeepSpeed
#: The shipped JSONs: ZeRO 0 with torch autocast bf16; ZeRO 2 with "bf16": "auto", filled in
#: from the Trainer's --bf16.
DS_VARIANTS = {"zero0_autocast": ("ds_ab_zero0_bf16.json", []),
               "zero2_bf16": ("ds_ab_zero2_bf16.json", ["--bf16"])}


def _run_trainer_ds(work: str, config: str, *flags: str) -> list[dict]:
    proc = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--nproc_per_node", "4", "--master_port",
         str(free_port()), os.path.join(SCRIPTS, "trainer_ds.py"), work,
         os.path.join(REPO, "configs", config), *flags],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(os.path.join(work, f"rank{r}.pt"), weights_only=False)
            for r in range(4)]


@pytest.fixture(scope="module", params=sorted(DS_VARIANTS))
def ds_run(request, tmp_path_factory):
    config, flags = DS_VARIANTS[request.param]
    return _run_trainer_ds(str(tmp_path_factory.mktemp("trainer_ds")), config, *flags)


def test_deepspeed_engine_runs_the_ab_optimizer(ds_run):
    for out in ds_run:
        assert out["engine"] == "DeepSpeedEngine" and out["gas"] == 2 and out["clip"] == 0.5
        if out["zero_stage"] == 0:  # the engine steps the ABOptimizer, autocast computes
            assert out["engine_optimizer_is_ab"] and out["autocast"]
            assert out["dtype"] == "torch.float32"
        else:  # DeepSpeed's ZeRO optimizer steps, over bf16 weights
            assert out["engine_optimizer"] == "DeepSpeedZeroOptimizer" and not out["autocast"]
            assert out["dtype"] == "torch.bfloat16"
        assert out["step_count"] == out["global_steps"] == 8
    assert [o["group_ranks"] for o in ds_run] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_deepspeed_groups_and_syncs(ds_run):
    _check_schedule([out["steps"] for out in ds_run])
    logs = [h for h in ds_run[0]["log_history"] if "loss" in h]
    assert [h["ab_phase"] for h in logs] == [0, 1, 1, 1, 2, 1, 1, 1]
    assert all(h["grad_norm"] > 0 for h in logs)  # the norm of the AB clip reaches the logs


def test_deepspeed_checkpoint_and_resume_continue_the_schedule(ds_run):
    for out in ds_run:
        assert out["ckpt_ab_files"] == ["ab_group0.pt", "ab_group1.pt", "ab_meta.json"]
        _check_resume(out["steps"], out["resumed_steps"])
        assert out["resumed_step_count"] == 8


def test_deepspeed_zero2_finetuning_settings_through_the_trainer(tmp_path):
    """The fine-tuning settings (residual, freeze_untargeted, lean_memory, no dense phase) in
    the JSON's key, ZeRO 2 with --bf16: the Trainer's no-decay group is left with nothing to
    train and ZeRO still builds (a placeholder stands in, saved nowhere); group mates agree,
    the syncs at steps 4 and 8 leave one model, and the resume from checkpoint-4 is exact."""
    ranks = _run_trainer_ds(str(tmp_path), "ds_ab_zero2_bf16.json", "--bf16", "--finetune")
    for out in ranks:
        assert out["engine_optimizer"] == "DeepSpeedZeroOptimizer"
        assert out["dtype"] == "torch.bfloat16" and out["step_count"] == 8
        assert "vit.embeddings.cls_token" in out["frozen"]
        assert not any("placeholder" in k for k in out["state_keys"])
        _check_resume(out["steps"], out["resumed_steps"])
    for step in sorted(ranks[0]["steps"]):
        v = [o["steps"][step]["params"] for o in ranks]
        assert _equal(v[0], v[1]) and _equal(v[2], v[3]), step
        assert _equal(v[0], v[2]) == (step in (4, 8)), step


# --------------------------------------------------------------------- the recipe
def _write_imagefolder(root: str) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, color in enumerate([(220, 40, 40), (40, 220, 40), (40, 40, 220)]):
        folder = os.path.join(root, f"class_{c}")
        os.makedirs(folder)
        for i in range(20):
            noise = rng.integers(0, 60, (16, 16, 3))
            Image.fromarray((np.array(color) * 0.7 + noise).astype(np.uint8)).save(
                os.path.join(folder, f"{i}.png"))


def test_finetune_recipe_vit_imagefolder_to_merged_model(tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5)).save_pretrained(
        str(tmp_path / "vit"))
    _write_imagefolder(str(tmp_path / "images"))
    out = tmp_path / "out"
    ab = {"warmup_steps": 3, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
          "rank_cutoff": 0.3}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "finetune.py"),
         "--model_name_or_path", str(tmp_path / "vit"), "--data_dir", str(tmp_path / "images"),
         "--output_dir", str(out), "--max_steps", "9", "--per_device_train_batch_size", "8",
         "--learning_rate", "2e-3", "--ab_config", json.dumps(ab), "--report_to", "none",
         "--save_strategy", "no", "--logging_steps", "5", "--disable_tqdm", "true"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out / "ab_summary.json") as fh:
        summary = json.load(fh)
    assert summary["step_count"] == 9
    assert summary["traffic_rank0"]["steps_by_phase"] == {"warmup": 3, "ab": 5, "rebound": 1}
    assert summary["traffic"]["per_rank"] == [summary["traffic_rank0"]]  # one process
    assert summary["final_sync"] is True  # 9 steps end inside the second AB phase
    assert summary["compression"]["factorized_ratio"] > 1.0
    assert all(r is not None for r in summary["ranks"].values())
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0
    model = AutoModelForImageClassification.from_pretrained(str(out / "merged"))
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert not any(type(m).__name__.startswith("AB") for m in model.modules())
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, 16, 16)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_finetune_recipe_skips_a_truncated_jpeg_with_one_warning(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=3)).save_pretrained(
        str(tmp_path / "vit"))
    _write_imagefolder(str(tmp_path / "images"))
    broken = tmp_path / "images" / "class_1" / "broken.jpg"
    Image.new("RGB", (16, 16), (40, 220, 40)).save(broken, quality=90)
    broken.write_bytes(broken.read_bytes()[:120])  # a truncated JPEG
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "finetune.py"),
         "--model_name_or_path", str(tmp_path / "vit"), "--data_dir", str(tmp_path / "images"),
         "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size",
         "8", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stderr.count("skipping unreadable image") == 1  # not once per epoch
    assert f"skipping unreadable image {broken}" in proc.stderr
    summary = json.loads((out / "ab_summary.json").read_text())
    assert sum(summary["skipped_images"].values()) == 1
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0


def test_a_run_that_never_reaches_an_ab_phase_says_so_when_training_starts(tmp_path, caplog):
    import logging

    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from ab_accel.trainer import ABTrainer

    trainer_scenarios.save_gpt2(str(tmp_path / "gpt2"))
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "gpt2"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=3,
                             per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    trainer = ABTrainer(model=model, args=args, ab_config={"warmup_steps": 5},
                        train_dataset=trainer_scenarios.TokenDataset(32, seed=1))
    with caplog.at_level(logging.WARNING, logger="ab_accel.trainer"):
        trainer.train()
    assert trainer.ab_optimizer.step_count == 3
    assert any("this run of 3 steps never reaches an AB phase" in r.getMessage()
               for r in caplog.records)
