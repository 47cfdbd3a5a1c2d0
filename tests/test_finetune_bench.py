"""benchmarks/finetune.py measures what it claims: the corpora are real, disjoint and split the
same way every time; the quick variant runs every method end to end (4 gloo processes) and its
results file holds what the docs read, with byte counts that add up exactly; the docs' table is
the generator's output on the committed results file.

Benchmarks are scripts with results files, not timed tests: nothing here asserts that a method
is better; it asserts that every method trained and that the numbers are the right numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.finetune import (
    QUICK,
    TARGET_MODULES,
    Method,
    Settings,
    corpus_files,
    finetune_datasets,
    markdown_run,
    markdown_table,
    parse,
    split_finetune_files,
    stdlib_root,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_pretraining_and_finetuning_corpora_are_disjoint_real_stdlib_files() -> None:
    pre, fine = corpus_files("pretrain"), corpus_files("finetune")
    assert len(pre) > 100 and len(fine) > 100
    assert not set(pre) & set(fine)
    root = stdlib_root()
    assert all(p.relative_to(root).parts[0] == "test" for p in fine)
    assert not any({"test", "tests", "idle_test"} & set(p.relative_to(root).parts[:-1])
                   for p in pre)
    assert pre == sorted(pre, key=lambda p: p.relative_to(root).as_posix())


def test_heldout_split_is_deterministic_and_about_one_file_in_ten() -> None:
    train, held = split_finetune_files(10)
    assert (train, held) == split_finetune_files(10)
    assert not set(train) & set(held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15


def test_same_seed_gives_every_method_the_same_windows() -> None:
    s = Settings(steps=16, ab_lean_cycles=4, eval_windows=8)
    (a, held_a), (b, held_b) = finetune_datasets(s, seed=3), finetune_datasets(s, seed=3)
    assert a.starts == b.starts and held_a.starts == held_b.starts
    assert len(a) == 16 * s.batch_size * s.nproc and len(held_a) == 8
    assert finetune_datasets(s, seed=4)[0].starts != a.starts
    item = a[0]
    assert item["input_ids"].shape == (s.seq_len,) and int(item["input_ids"].max()) < 256


def test_quick_preset_then_the_command_line() -> None:
    s = parse(["--quick", "--steps", "48", "--methods", "[full,lora]"])
    assert s.steps == 48 and s.seeds == QUICK["seeds"] and s.hidden_size == QUICK["hidden_size"]
    assert s.methods == [Method.FULL, Method.LORA]
    assert parse([]).seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown method"):
        Settings(methods=["qlora"])
    with pytest.raises(ValueError, match="nproc must be even"):
        Settings(nproc=3)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("finetune")
    out = tmp / "finetune_quick.json"
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--quick",
           "--cache_dir", str(tmp / "cache"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_quick_run_trains_every_method(quick: dict) -> None:
    res = quick
    before = res["pretrained"]["finetune_heldout_loss_before"]
    assert res["pretrained"]["cached"] is False and math.isfinite(before)
    assert res["pretrained"]["train_loss_last"] < res["pretrained"]["train_loss_first"]
    assert list(res["methods"]) == [str(m) for m in Method]
    for name, m in res["methods"].items():
        (seed,) = m["seeds"]
        assert seed["global_step"] == QUICK["steps"], name
        assert all(math.isfinite(x) for x in seed["train_losses"]), f"{name}: NaN loss"
        # trained: the held-out loss fell below the pretrained model's
        assert seed["eval_loss"] < before, f"{name}: {seed['eval_loss']} >= {before}"
        assert seed["perplexity"] == pytest.approx(math.exp(seed["eval_loss"]))
        assert len(set(seed["per_rank"]["eval_loss"])) == 1, f"{name}: ranks disagree"
        assert seed["bytes"] > 0 and seed["peak_state_bytes"] > 0 and seed["peak_rss_mb"] > 0
        assert seed["steps_per_second"] > 0
        for key in ("eval_loss", "perplexity", "wire_bytes", "dp_equivalent_wire_bytes",
                    "peak_state_bytes", "peak_rss_mb", "steps_per_second"):
            assert m["summary"][key]["n"] == 1, (name, key)
    assert (Path(res["settings"]["out"]).with_name("finetune_quick.png")).is_file()
    table = Path(res["settings"]["out"]).with_name("finetune_quick_table.md").read_text()
    assert table == markdown_run(res) + "\n" + markdown_table(res)


def test_quick_run_counts_bytes_and_memory_exactly(quick: dict) -> None:
    from transformers import LlamaForCausalLM

    res = quick
    steps, world = QUICK["steps"], res["settings"]["nproc"]
    model = LlamaForCausalLM.from_pretrained(res["pretrained"]["path"])
    params = list(model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    ring = 2 * (world - 1) / world
    m = {name: r["seeds"][0] for name, r in res["methods"].items()}

    # Full fine-tuning: DDP's buckets are exactly the model's gradients, every step; AdamW's
    # state is two moments and a float32 step counter per tensor.
    full = m["full"]
    assert full["bytes"] == full["dp_equivalent_bytes"] == steps * grad_bytes
    assert full["wire_bytes"] == pytest.approx(steps * grad_bytes * ring)
    assert full["peak_state_bytes"] == 4 * grad_bytes + 4 * len(params)
    # GaLore projects the optimizer state, not the gradients: DDP still reduces them all.
    assert m["galore"]["bytes"] == full["bytes"]
    assert m["galore"]["peak_state_bytes"] < full["peak_state_bytes"]
    # LoRA: DDP reduces the adapters only: r x (in + out) per target layer.
    lora_numel = sum(QUICK["lora_r"] * sum(mod.weight.shape) for name, mod in
                     model.named_modules() if name.rsplit(".", 1)[-1] in TARGET_MODULES)
    assert m["lora"]["bytes"] == steps * lora_numel * 4
    assert m["lora"]["dp_equivalent_bytes"] == full["bytes"]
    for name in ("ab-paper", "ab-energy", "ab-lean", "ab-lean-energy"):
        ab = m[name]
        # the meter's DP-equivalent is DDP's gradients plus the float buffers (rotary inv_freq)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers()
                      if b.is_floating_point())
        assert ab["dp_equivalent_bytes"] == steps * (grad_bytes + buffers), name
        assert ab["wire_bytes"] < full["wire_bytes"], name
        assert sorted(ab["per_rank"]["role"]) == ["A", "A", "B", "B"], name
        assert ab["factorizations"], name
    # No dense step: lean_memory's peak training state is the factored one.
    for name in ("ab-lean", "ab-lean-energy"):
        assert set(m[name]["peak_state_bytes_by_phase"]) == {"ab"}
        assert m[name]["peak_state_bytes"] < full["peak_state_bytes"]
    # with a dense warm-up and rebound, the peak is full fine-tuning's
    assert m["ab-paper"]["peak_state_bytes"] == full["peak_state_bytes"]
    ranks = [f["mean_rank"] for f in m["ab-lean"]["factorizations"]]
    assert ranks == [QUICK["ab_fixed_rank"]] * len(ranks)


@pytest.mark.parametrize("name", ["finetune.json", "finetune_large.json", "finetune_v1.json"])
def test_benchmarks_md_table_is_the_generated_one(name: str) -> None:
    path = RESULTS / name
    if not path.exists():
        pytest.skip("no full fine-tuning results committed yet")
    text = (ROOT / "BENCHMARKS.md").read_text()
    res = json.loads(path.read_text())
    assert markdown_run(res) in text and markdown_table(res) in text


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_full_benchmark_runs(tmp_path: Path) -> None:
    """The full run (3 seeds, every method): about 40 minutes on 2 cores; `make bench`."""
    out = tmp_path / "finetune.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=7000)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert all(m["summary"]["eval_loss"]["n"] == 3 for m in res["methods"].values())
