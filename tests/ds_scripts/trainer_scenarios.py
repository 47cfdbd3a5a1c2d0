"""Multi-process HF Trainer scenarios for tests/test_trainer.py: every function runs on each rank
of a real gloo world (tests/distributed.py) and returns plain values for the test to assert on.

Models are real transformers models built from a config, written with save_pretrained to a
temporary folder and loaded back with from_pretrained (the fine-tuning load path, no hub)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

AB = {"warmup_steps": 2, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
      "rank_cutoff": 0.3, "group_size": 2}


class TokenDataset(Dataset):
    """Sequences of 12 tokens; the label is which third of the vocabulary the first token is in."""

    def __init__(self, n: int, seed: int, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] * 3 // vocab).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class ParamRecorder(TrainerCallback):
    """Flattened parameters of this rank and the AB phase, at the end of every optimizer step."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.steps: dict[int, dict[str, Any]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        opt = self.trainer.ab_optimizer
        vec = torch.cat([p.detach().reshape(-1).float() for p in self.trainer.model.parameters()])
        self.steps[state.global_step] = {"params": vec, "phase_next": opt.phase,
                                         "ab_step": opt.step_count,
                                         "traffic": opt.traffic.summary()}


def save_gpt2(path: str) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                     num_labels=3, pad_token_id=0)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)


def _gpt2_trainer(base: str, out: str, max_steps: int, extra: dict[str, Any] | None = None):
    from transformers import AutoModelForSequenceClassification

    from ab_accel.trainer import ABTrainer

    model = AutoModelForSequenceClassification.from_pretrained(base)
    args = TrainingArguments(
        output_dir=out, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=4,
        per_device_eval_batch_size=8, gradient_accumulation_steps=2, max_steps=max_steps,
        learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=0.5, logging_steps=1,
        save_strategy="steps", save_steps=4, eval_strategy="steps", eval_steps=4,
        report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **(extra or {}))
    recorder = ParamRecorder()
    trainer = ABTrainer(model=model, args=args, ab_config=AB,
                        train_dataset=TokenDataset(256, seed=1),
                        eval_dataset=TokenDataset(32, seed=2), callbacks=[recorder])
    recorder.trainer = trainer
    return trainer, recorder


def trainer_ddp_gpt2(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """GPT-2 (transformers Conv1D layers) through ABTrainer + DDP: 8 optimizer steps with
    gradient accumulation 2, clipping and eval; checkpoints at 4 (mid-AB phase) and 8. Then a
    second trainer resumes from checkpoint-4 and must end where the first one ended. Then
    the final sync of train() + ABTrainer.save_merged, reloaded with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    base = os.path.join(tmp, "gpt2")
    if rank == 0:
        save_gpt2(base)
    dist.barrier()
    out: dict[str, Any] = {}
    trainer, rec = _gpt2_trainer(base, os.path.join(tmp, "run_a"), max_steps=8)
    trainer.train()
    opt = trainer.ab_optimizer
    out["wrapped_is_ddp"] = type(trainer.model_wrapped).__name__
    out["ddp_grad_sync"] = bool(getattr(trainer.model_wrapped, "require_backward_grad_sync", 0))
    out["ddp_ignored"] = sorted(getattr(trainer.model_wrapped, "parameters_to_ignore", ()))
    out["ab_weights"] = sorted(f"{n}.weight" for n, m in trainer.model.named_modules()
                               if type(m).__name__.startswith("AB"))
    out["group_ranks"] = list(opt.groups.group_ranks)
    out["steps"] = rec.steps
    out["step_count"] = opt.step_count
    out["global_step"] = trainer.state.global_step
    out["log_history"] = trainer.state.log_history
    # The meter at the last optimizer step (train() then adds the final sync's bytes).
    out["traffic"] = rec.steps[max(rec.steps)]["traffic"]
    out["ranks"] = opt.ranks
    out["ckpt4"] = sorted(os.listdir(os.path.join(tmp, "run_a", "checkpoint-4", "ab_training")))
    # checkpoint-4 was written mid-AB-phase: its model file is the dense export, which plain
    # transformers loads with no missing or unexpected keys
    if rank == 0:
        plain_ckpt, info = AutoModelForSequenceClassification.from_pretrained(
            os.path.join(tmp, "run_a", "checkpoint-4"), output_loading_info=True)
        out["ckpt4_loading_info"] = {k: sorted(v) for k, v in info.items()}
    out["conv1d_layers"] = sorted(type(m).__name__ for n, m in trainer.model.named_modules()
                                  if type(m).__name__.startswith("AB"))
    dist.barrier()

    resumed, rec_b = _gpt2_trainer(base, os.path.join(tmp, "run_b"), max_steps=8)
    resumed.train(resume_from_checkpoint=os.path.join(tmp, "run_a", "checkpoint-4"))
    out["resumed_steps"] = rec_b.steps
    out["resumed_step_count"] = resumed.ab_optimizer.step_count
    out["resumed_traffic"] = rec_b.steps[max(rec_b.steps)]["traffic"]

    # Export: train() reconciled the groups (training stopped inside an AB phase); merged, saved.
    out["final_sync_ran"] = any(sw.final for sw in opt.switches)
    model = trainer.model.eval()
    x = TokenDataset(8, seed=3).ids
    with torch.no_grad():
        out["ab_logits"] = model(input_ids=x).logits
    out["synced_params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    export = trainer.save_merged(os.path.join(tmp, "merged"))
    out["export_final_sync"], out["export_compression"] = export["final_sync"], \
        export["compression"]["ratio"]
    plain = AutoModelForSequenceClassification.from_pretrained(export["dir"])
    with torch.no_grad():
        out["plain_logits"] = plain.eval()(input_ids=x).logits
    out["plain_types"] = sorted({type(m).__name__ for m in plain.modules()})
    return out
