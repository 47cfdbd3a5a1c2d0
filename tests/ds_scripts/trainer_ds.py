"""ABTrainer + DeepSpeed (ZeRO-0 with torch autocast bf16, or ZeRO-2 with DeepSpeed's "bf16"),
launched by torchrun on CPU (gloo).

    torchrun --nproc_per_node 4 tests/ds_scripts/trainer_ds.py <work_dir> <configs/ds json> [--bf16]

A ViT (image 8, patch 2) saved with save_pretrained and loaded back trains on sklearn's digits
for 8 optimizer steps with gradient accumulation 2 and clipping, checkpoints at step 4 (inside an
AB phase), and a second trainer resumes from that checkpoint. Every rank writes what the test
asserts on to <work_dir>/rank<r>.pt.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

from ab_accel.trainer import ABTrainer
from recipes.cpu_deepspeed import setup_cpu_deepspeed

from distributed import end_process

#: The fine-tuning settings (no dense phase, residual, untargeted parameters frozen): syncs at
#: the ends of steps 4 and 8.
FINETUNE = {"warmup_steps": 0, "sync_every": 4, "rebound_steps": 0, "lr_rebound_steps": 1,
            "fixed_rank": 4, "lean_memory": True, "residual": True, "freeze_untargeted": True,
            "group_size": 2}
AB = {"warmup_steps": 2, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
      "rank_cutoff": 0.3, "group_size": 2}


class Digits(Dataset):
    def __init__(self, start: int, stop: int) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.x = torch.tensor(d.images[start:stop], dtype=torch.float32).unsqueeze(1) / 16.0
        self.y = torch.tensor(d.target[start:stop], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.steps: dict[int, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        opt = self.trainer.ab_optimizer
        vec = torch.cat([p.detach().reshape(-1).float() for p in self.trainer.model.parameters()])
        self.steps[state.global_step] = {"params": vec, "phase_next": opt.phase}


def make_trainer(base: str, out: str, ds_json: str, accel_cfg: dict, bf16: bool) -> tuple:
    model = ViTForImageClassification.from_pretrained(base)
    args = TrainingArguments(
        output_dir=out, deepspeed=ds_json, accelerator_config=dict(accel_cfg), bf16=bf16,
        use_cpu=bf16,  # CPU test: transformers accepts bf16 without a GPU only with use_cpu
        per_device_train_batch_size=8, per_device_eval_batch_size=16,
        gradient_accumulation_steps=2, max_steps=8, learning_rate=2e-3,
        lr_scheduler_type="constant", max_grad_norm=0.5, logging_steps=1, save_strategy="steps",
        save_steps=4, eval_strategy="steps", eval_steps=4, report_to="none", seed=0,
        disable_tqdm=True)
    rec = Recorder()
    trainer = ABTrainer(model=model, args=args, train_dataset=Digits(0, 1200),
                        eval_dataset=Digits(1200, 1264), callbacks=[rec])
    rec.trainer = trainer
    return trainer, rec


def main() -> None:
    work, config_path = sys.argv[1], sys.argv[2]
    bf16 = "--bf16" in sys.argv[3:]  # the Trainer's flag, filling a JSON's "bf16": "auto"
    accel_cfg = setup_cpu_deepspeed()
    rank = dist.get_rank()
    with open(config_path) as fh:
        ds = json.load(fh)
    ds["ab_training"].update(FINETUNE if "--finetune" in sys.argv[3:] else AB)
    ds_json = os.path.join(work, "ds.json")
    base = os.path.join(work, "vit")
    if rank == 0:
        with open(ds_json, "w") as fh:
            json.dump(ds, fh)
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        num_labels=10)
        ViTForImageClassification(cfg).save_pretrained(base)
    dist.barrier()

    out: dict = {}
    trainer, rec = make_trainer(base, os.path.join(work, "run_a"), ds_json, accel_cfg, bf16)
    trainer.train()
    engine = trainer.model_wrapped
    opt = trainer.ab_optimizer
    out["engine"] = type(engine).__name__
    out["engine_optimizer_is_ab"] = engine.optimizer is opt
    out["engine_optimizer"] = type(engine.optimizer).__name__
    out["zero_stage"] = engine.zero_optimization_stage()
    out["dtype"] = str(next(engine.module.parameters()).dtype)
    out["frozen"] = sorted(n for n, p in engine.module.named_parameters() if not p.requires_grad)
    out["state_keys"] = sorted(trainer.model.state_dict())
    out["autocast"] = bool(engine.torch_autocast_enabled())
    out["gas"] = engine.gradient_accumulation_steps()
    out["clip"] = engine.gradient_clipping()
    out["group_ranks"] = list(opt.groups.group_ranks)
    out["step_count"] = opt.step_count
    out["global_steps"] = engine.global_steps
    out["steps"] = rec.steps
    out["log_history"] = trainer.state.log_history
    ckpt = os.path.join(work, "run_a", "checkpoint-4")
    with open(os.path.join(ckpt, "latest")) as fh:
        tag = fh.read().strip()
    out["ckpt_ab_files"] = sorted(os.listdir(os.path.join(ckpt, tag, "ab_training")))
    dist.barrier()

    # A second DeepSpeed Trainer in the same process needs a fresh AcceleratorState (the
    # process group, in PartialState, stays).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    resumed, rec_b = make_trainer(base, os.path.join(work, "run_b"), ds_json, accel_cfg, bf16)
    resumed.train(resume_from_checkpoint=ckpt)
    out["resumed_steps"] = rec_b.steps
    out["resumed_step_count"] = resumed.ab_optimizer.step_count
    torch.save(out, os.path.join(work, f"rank{rank}.pt"))
    end_process()


if __name__ == "__main__":
    main()
