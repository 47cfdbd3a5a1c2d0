"""The fine-tuning benchmark's pretrained model: a byte-level Llama pretrained here on the
standard library's modules, cached on disk under a hash of everything that decides it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.finetune_corpus import (
    ByteWindows,
    corpus_digest,
    corpus_files,
    finetune_datasets,
    read_bytes,
    window_starts,
)
from benchmarks.finetune_settings import Settings


def model_config(s: Settings) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=s.hidden_size,
                       intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                       num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                       max_position_embeddings=s.seq_len, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def pretrain_key(s: Settings, digest: str) -> str:
    """The cache key of the pretrained model: a hash of what decides its weights."""
    import torch
    import transformers

    decided = {k: getattr(s, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "seq_len", "pretrain_steps",
                                          "pretrain_batch_size", "pretrain_lr")}
    decided.update(corpus=digest, torch=torch.__version__, transformers=transformers.__version__)
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def training_arguments(output_dir: str, **overrides: Any) -> Any:
    """The TrainingArguments every run here shares (CPU, no checkpoints, no trackers)."""
    from transformers import TrainingArguments

    base = dict(output_dir=output_dir, use_cpu=True, lr_scheduler_type="cosine",
                logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, per_device_eval_batch_size=32)
    return TrainingArguments(**{**base, **overrides})


def pretrain(s: Settings) -> dict[str, Any]:
    """The pretrained model's folder (built here if not cached) and how it was made."""
    import torch
    from transformers import LlamaForCausalLM, Trainer

    files = corpus_files("pretrain")
    digest = corpus_digest(files)
    folder = Path(os.path.expanduser(s.cache_dir)) / f"pretrained-{pretrain_key(s, digest)}"
    info_path = folder / "pretraining.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        print(f"[finetune] pretrained model from the cache: {folder}", flush=True)
        return {**info, "path": str(folder), "cached": True}
    print(f"[finetune] pretraining on {len(files)} stdlib modules, {s.pretrain_steps} steps "
          f"-> {folder}", flush=True)
    torch.set_num_threads(s.pretrain_threads)
    text = read_bytes(files)
    n = s.pretrain_steps * s.pretrain_batch_size
    data = ByteWindows(text, window_starts(len(text), s.seq_len, n, seed=12345), s.seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(s))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ab-pretrain-") as tmp:
        args = training_arguments(tmp, per_device_train_batch_size=s.pretrain_batch_size,
                                  max_steps=s.pretrain_steps, learning_rate=s.pretrain_lr,
                                  warmup_steps=max(1, s.pretrain_steps // 20), weight_decay=0.1,
                                  max_grad_norm=1.0, seed=0, logging_steps=50)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        out = trainer.train()
        seconds = time.perf_counter() - t0
        _, held = finetune_datasets(s, seed=0)
        heldout = trainer.evaluate(eval_dataset=held)["eval_loss"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        model.save_pretrained(staging)
        info = {"key": folder.name, "corpus": "stdlib modules (no tests)", "files": len(files),
                "bytes": len(text), "corpus_sha256": digest, "steps": s.pretrain_steps,
                "batch_size": s.pretrain_batch_size, "seq_len": s.seq_len, "lr": s.pretrain_lr,
                "seconds": seconds, "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None,
                "train_loss": out.training_loss,
                "finetune_heldout_loss_before": heldout,
                "parameters": sum(p.numel() for p in model.parameters()),
                "loadavg_after": list(os.getloadavg())}
        (staging / "pretraining.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(staging, folder)  # atomic: a folder in the cache is always complete
        except OSError:  # another run put it there first
            subprocess.run(["rm", "-rf", str(staging)], check=False)
    return {**info, "path": str(folder), "cached": False}
