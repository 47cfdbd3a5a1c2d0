"""`accelerate launch --use_deepspeed --deepspeed_config_file <json> recipes/vit.py`: the recipe
takes its AB-training schedule from the JSON's top-level "ab_training" key (a command-line
--ab_training.* value that agrees with it is named beside it; one that differs is refused:
tests/test_recipes_newcomer.py) and trains under a real DeepSpeed engine (ZeRO-0, gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def test_vit_recipe_reads_the_ab_training_key_of_the_deepspeed_json(tmp_path):
    block = {"warmup_steps": 3, "sync_every": 5, "rebound_steps": 1, "lr_rebound_steps": 1,
             "rank_cutoff": 0.2, "sync_mode": "only-learned"}
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 0}, "ab_training": block}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "run"
    cmd = [accelerate, "launch", "--use_deepspeed", "--deepspeed_config_file",
           str(tmp_path / "ds.json"), "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "recipes/vit.py", "--max_steps", "12",
           "--ab_training.warmup_steps", "3",  # also in the JSON: two sources that agree
           "--output_dir", str(out), "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert ('the DeepSpeed JSON\'s "ab_training" key and --ab_training.warmup_steps 3 on the '
            'command line (both given; they agree)') in proc.stderr
    assert "(DEEPSPEED)" in proc.stderr
    # only rank 0 prints: DeepSpeed's plain print when its CPU communication op loads, once
    assert (proc.stdout + proc.stderr).count("built successfully") <= 1
    summary = json.loads((out / "summary.json").read_text())
    for key, value in block.items():
        assert summary["ab_config"][key] == value, key
    assert summary["roles"] == ["A", "B"]
    assert summary["traffic"]["reduction_vs_dp"] > 0
    assert summary["steps"] == 12
