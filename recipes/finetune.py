"""Fine-tune an image-classification model with the HF Trainer and AB-training (arXiv 2405.01067).

    python recipes/finetune.py --model_name_or_path <folder or hub id> --output_dir runs/ft \\
        --ab_training '{"warmup_steps": 20, "sync_every": 20, "rebound_steps": 2}' --max_steps 100
    torchrun --nproc_per_node 4 recipes/finetune.py --model_name_or_path <model> \\
        --data_dir /data/pets --output_dir runs/ft --ab_training.sync_every 50
    deepspeed --num_gpus 4 recipes/finetune.py --model_name_or_path <model> \\
        --deepspeed configs/ds_ab_zero0_bf16.json --output_dir runs/ft  # the JSON's "ab_training"

Every ``transformers.TrainingArguments`` flag works beside the knobs below (jsonargparse, as the
other recipes; ``--help`` lists them all). The data and its transforms are recipes/data.py's
(an unreadable image is skipped with one warning). At the end the groups are reconciled, the AB
layers merged (:func:`ab_accel.merge`) and the model saved to ``<output_dir>/merged``: it loads
with plain transformers. ``<output_dir>/ab_summary.json`` holds the final metrics, the traffic
of rank 0 and the compression before the merge. Without CUDA the recipe sets up gloo itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from args import ConfigError, DataArgs, help_from_metadata, knob
from data import IGNORE_INDEX, ImageDataset, class_names, image_transform, load_splits
from jsonargparse import ArgumentParser

from ab_accel import ABConfig, ABConfigError


@dataclass
class FinetuneArgs(DataArgs):
    model_name_or_path: str | None = knob(None, "A save_pretrained folder or a hub id (required).")
    image_size: int | None = knob(None, "Input size; None: the model config's image_size.")
    ab_training: ABConfig | None = knob(None, "ABConfig fields: a JSON string or file, or "
                                        "--ab_training.KEY VALUE. None: the \"ab_training\" key "
                                        "of --deepspeed, else a schedule scaled to the run.")
    no_ab: bool = knob(False, "--no-ab: plain data parallel (the baseline).")


def parse(argv: list[str]) -> tuple[FinetuneArgs, Any]:
    from transformers import TrainingArguments

    parser = ArgumentParser(prog="finetune.py", exit_on_error=False, description=__doc__)
    parser.add_class_arguments(FinetuneArgs, as_group=False, skip={"seed", "no_ab"},
                               sub_configs=True)
    parser.add_argument("--no-ab", "--no_ab", dest="no_ab", action="store_true")
    parser.add_class_arguments(TrainingArguments, as_group=False)
    for cls, prefix in ((FinetuneArgs, ""), (TrainingArguments, ""), (ABConfig, "ab_training.")):
        help_from_metadata(parser, cls, prefix)
    argv = ["--ab_training" if a == "--ab_config" else a for a in argv]  # the old name
    try:
        values = parser.instantiate(parser.parse_args(cpu_defaults(argv))).as_dict()
    except argparse.ArgumentError as exc:  # what jsonargparse raises (exit_on_error=False)
        raise ConfigError(str(exc)) from None
    own = {f.name for f in dataclasses.fields(FinetuneArgs)}
    training = TrainingArguments(**{k: v for k, v in values.items() if k not in own})
    args = FinetuneArgs(**{k: v for k, v in values.items() if k in own and k != "seed"},
                        seed=training.seed)
    if not args.model_name_or_path:
        raise ConfigError("--model_name_or_path is required.")
    return args, training


def cpu_defaults(argv: list[str]) -> list[str]:
    """Without CUDA, make the processes one gloo world before TrainingArguments exist."""
    import torch

    if torch.cuda.is_available():
        return argv
    extra = [] if "--dataloader_pin_memory" in argv else ["--dataloader_pin_memory", "false"]
    if "--deepspeed" in argv:
        from ab_accel.trainer import setup_cpu_deepspeed

        return argv + extra + ["--accelerator_config", json.dumps(setup_cpu_deepspeed())]
    extra += [] if "--use_cpu" in argv else ["--use_cpu", "true"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "--ddp_backend" not in argv:
        extra += ["--ddp_backend", "gloo"]
    return argv + extra


def main(argv: list[str]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers import default_data_collator as collate

    from ab_accel import compression, merge
    from ab_accel.trainer import ABTrainer

    args, training = parse(argv)
    training.remove_unused_columns = False  # the collator drops what the model does not take
    train, evaluation, _ = load_splits(args)
    labels = class_names(train)
    id2label = dict(enumerate(labels))
    model = AutoModelForImageClassification.from_pretrained(  # a new head for these labels
        args.model_name_or_path, num_labels=len(labels), id2label=id2label,
        label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True)
    channels = getattr(model.config, "num_channels", 3)
    size = args.image_size or getattr(model.config, "image_size", 224)
    mean, std = [0.5] * channels, [0.5] * channels
    try:  # the model's own normalization, when its folder holds an image processor
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        mean, std = list(processor.image_mean)[:channels], list(processor.image_std)[:channels]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    transform = image_transform(size, mean, std)
    train_ds, eval_ds = (ImageDataset(split, transform, channels, size, args.seed, warn=True)
                         for split in (train, evaluation))

    if args.no_ab:
        config = ABConfig(enabled=False)
    elif args.ab_training is not None or training.deepspeed is not None:
        config = args.ab_training  # None: the "ab_training" key of the DeepSpeed JSON
    else:  # warm-up and cycles of a quarter of the optimizer steps
        batches = len(train_ds) // (training.per_device_train_batch_size
                                    * max(1, training.world_size))
        total = training.max_steps if training.max_steps > 0 else int(
            training.num_train_epochs * max(1, batches // training.gradient_accumulation_steps))
        quarter = max(2, total // 4)
        config = ABConfig(warmup_steps=quarter, sync_every=quarter,
                          rebound_steps=max(1, quarter // 10), lr_rebound_steps=max(1, quarter // 10))

    def accuracy(eval_pred: Any) -> dict[str, float]:
        logits, refs = eval_pred
        keep = refs != IGNORE_INDEX  # unreadable images
        return {"accuracy": float((np.argmax(logits, axis=-1) == refs)[keep].mean())}

    trainer = ABTrainer(model=model, args=training, ab_config=config, train_dataset=train_ds,
                        eval_dataset=eval_ds, compute_metrics=accuracy,
                        data_collator=lambda rows: collate([{k: v for k, v in r.items()
                                                             if k != "index"} for r in rows]))
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)

    # The end: reconcile the groups, measure, merge into dense layers, evaluate, save.
    summary: dict[str, Any] = {"ab_config": trainer.ab_config.to_dict()}
    opt = trainer.ab_optimizer
    if opt is not None:
        summary["compression"] = {
            k: v for k, v in compression(trainer.model).items() if k != "layers"}
        summary["ranks"] = opt.ranks
        summary["final_sync"] = opt.sync_now()  # also in one process: W <- A B everywhere
        summary["traffic_rank0"] = opt.traffic.summary()
        summary["step_count"] = opt.step_count
    merge(trainer.model)
    summary.update(eval=trainer.evaluate(), world_size=max(1, training.world_size))
    summary["skipped_images"] = {"train": len(train_ds.warned), "eval": len(eval_ds.warned)}
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(os.path.join(training.output_dir, "merged"))
        with open(os.path.join(training.output_dir, "ab_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, ABConfigError) as exc:
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
