"""Fine-tune an image classifier with the HF Trainer and AB-training (arXiv 2405.01067).

    python recipes/finetune.py --model_name_or_path <folder or hub id> --output_dir runs/ft \
        --ab_training '{"warmup_steps": 20, "sync_every": 20, "rebound_steps": 2}' --max_steps 100
    torchrun --nproc_per_node 4 recipes/finetune.py --model_name_or_path <model> \
        --data_dir /data/pets --output_dir runs/ft --ab_training.sync_every 50
    deepspeed --num_gpus 4 recipes/finetune.py --model_name_or_path <model> \
        --deepspeed configs/ds_ab_zero0_bf16.json --output_dir runs/ft  # the JSON's "ab_training"

Every ``TrainingArguments`` flag works beside the knobs below (one jsonargparse parser; --help).
The data is recipes/data.py's. At the end: the groups reconciled, the AB layers merged, the model
saved to ``<output_dir>/merged`` (plain transformers loads it) and ``ab_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from ab_accel import ABConfig
from ab_accel.cli import field_help, make_parser, parse_argv

import launch
from args import ConfigError, DataArgs, knob
from data import IGNORE_INDEX, ImageDataset, class_names, image_transform, load_splits


@dataclass
class FinetuneArgs(DataArgs):
    model_name_or_path: str | None = knob(None, "A save_pretrained folder or a hub id (required).")
    image_size: int | None = knob(None, "Input size; None: the model config's image_size.")
    ab_training: ABConfig | None = knob(None, "ABConfig: a JSON string or file, or --ab_training"
                                        ".KEY VALUE. None: the \"ab_training\" key of --deepspeed, "
                                        "else a schedule of quarters of the run.")
    no_ab: bool = knob(False, "Plain data parallel (the baseline).")


def parse(argv: list[str]) -> tuple[FinetuneArgs, Any]:
    """(the recipe's knobs, TrainingArguments); the seed is TrainingArguments'."""
    import torch
    from transformers import TrainingArguments

    parser = make_parser("finetune.py", __doc__.splitlines()[0], FinetuneArgs,
                         skip={"seed", "no_ab"}, sub_configs=True)
    parser.add_class_arguments(TrainingArguments, as_group=False)
    field_help(parser, TrainingArguments)
    argv = ["--ab_training" if a == "--ab_config" else a for a in argv]  # its former name
    if not any(a.split("=")[0] == "--log_level_replica" for a in argv):
        argv += ["--log_level_replica", "error"]  # the Trainer's switch: rank 0 warns, once
    if not torch.cuda.is_available():  # one gloo world before TrainingArguments exist
        argv += ["--dataloader_pin_memory", "false"]
        if "--deepspeed" in argv:
            if "WORLD_SIZE" not in os.environ:  # no launcher: no process group to join
                raise ConfigError(
                    "--deepspeed on CPU needs a launcher that starts the processes and their "
                    "group: `deepspeed --num_gpus N recipes/finetune.py ...` (N=1 for one "
                    "process) or `torchrun --nproc_per_node N recipes/finetune.py ...`; plain "
                    "`python recipes/finetune.py` runs without --deepspeed.")
            from cpu_deepspeed import setup_cpu_deepspeed

            argv += ["--accelerator_config", json.dumps(setup_cpu_deepspeed())]
        else:
            argv += ["--use_cpu", "true"]
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "--ddp_backend" not in argv:
                argv += ["--ddp_backend", "gloo"]
    ns = parse_argv(parser, argv, FinetuneArgs, TrainingArguments)
    values = parser.instantiate(ns).as_dict()
    own = {f.name for f in dataclasses.fields(FinetuneArgs)} - {"seed"}
    training = TrainingArguments(**{k: v for k, v in values.items() if k not in own})
    args = FinetuneArgs(**{k: v for k, v in values.items() if k in own}, seed=training.seed)
    if not args.model_name_or_path:
        raise ConfigError("--model_name_or_path is required.")
    return args, training


def main(argv: list[str]) -> dict[str, Any]:
    import numpy as np
    from accelerate.utils import gather_object
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers import default_data_collator as collate

    from ab_accel.comm import world_traffic
    from ab_accel.trainer import ABTrainer

    launch.quiet_libraries()  # once per process, after the imports (they reset log levels)
    args, training = parse(argv)
    training.remove_unused_columns = False  # the collator drops what the model does not take
    train, evaluation, _ = load_splits(args)
    id2label = dict(enumerate(class_names(train)))
    model = AutoModelForImageClassification.from_pretrained(  # a new head for these labels
        args.model_name_or_path, num_labels=len(id2label), id2label=id2label,
        label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True)
    channels = getattr(model.config, "num_channels", 3)
    size = args.image_size or getattr(model.config, "image_size", 224)
    mean, std = [0.5] * channels, [0.5] * channels
    try:  # the model's own normalization, when its folder holds an image processor
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        mean, std = list(processor.image_mean)[:channels], list(processor.image_std)[:channels]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    train_ds, eval_ds = (ImageDataset(split, image_transform(size, mean, std), channels, size,
                                      args.seed, warn=True) for split in (train, evaluation))

    config = ABConfig(enabled=False) if args.no_ab else args.ab_training
    if config is None and training.deepspeed is None:  # warm-up and cycles of a quarter run
        per_epoch = len(train_ds) // (training.per_device_train_batch_size
                                      * max(1, training.world_size))
        total = training.max_steps if training.max_steps > 0 else int(
            training.num_train_epochs * max(1, per_epoch // training.gradient_accumulation_steps))
        quarter = max(2, total // 4)
        rebound = max(1, quarter // 10)
        config = ABConfig(warmup_steps=quarter, sync_every=quarter, rebound_steps=rebound,
                          lr_rebound_steps=rebound)

    def accuracy(eval_pred: Any) -> dict[str, float]:
        logits, refs = eval_pred
        keep = refs != IGNORE_INDEX  # unreadable images
        return {"accuracy": float((np.argmax(logits, axis=-1) == refs)[keep].mean())}

    trainer = ABTrainer(model=model, args=training, ab_config=config, train_dataset=train_ds,
                        eval_dataset=eval_ds, compute_metrics=accuracy, data_collator=lambda rows:
                        collate([{k: v for k, v in r.items() if k != "index"} for r in rows]))
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)

    # The end: the groups reconciled, the AB layers merged into dense ones, saved; evaluated.
    opt = trainer.ab_optimizer
    summary: dict[str, Any] = {"ab_config": trainer.ab_config.to_dict()}
    if opt is not None:
        traffic = world_traffic(opt.traffic)  # every rank's bytes, summed (collective)
        summary.update(ranks=opt.ranks, traffic_rank0=opt.traffic.summary(), traffic={
            k: v for k, v in traffic.items() if k != "per_step"}, step_count=opt.step_count)
    summary.update(**trainer.save_merged(), eval=trainer.evaluate(),
                   world_size=max(1, training.world_size), skipped_images={  # every rank's
                       k: len(set().union(*gather_object([ds.warned])))  # (collective)
                       for k, ds in (("train", train_ds), ("eval", eval_ds))})
    if training.dataloader_num_workers:  # the workers' copies of the datasets met them
        summary["skipped_images"] = {"note": "not counted: DataLoader workers read the images "
                                     "(their warnings are in the log); set "
                                     "--dataloader_num_workers 0 to count them"}
    if trainer.is_world_process_zero():
        with open(os.path.join(training.output_dir, "ab_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return summary


if __name__ == "__main__":  # a refused setup: one line from rank 0, exit status 2 (launch.py)
    launch.run_main("finetune.py", lambda: main(sys.argv[1:]))
