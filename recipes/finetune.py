"""Fine-tune an image-classification model with the HF Trainer and AB-training (arXiv 2405.01067).

    # one process (CPU or GPU), sklearn's digits, AB schedule from --ab_config
    python recipes/finetune.py --model_name_or_path <folder or hub id> --output_dir runs/ft \\
        --ab_config '{"warmup_steps": 20, "sync_every": 20, "rebound_steps": 2}' --max_steps 100
    # 4 CPU processes (Trainer + DDP over gloo), an ImageNet-style folder tree
    torchrun --nproc_per_node 4 recipes/finetune.py --model_name_or_path <model> \\
        --data_dir /data/pets --output_dir runs/ft --ab_config configs/ab_finetune.json
    # DeepSpeed ZeRO-0: the schedule comes from the JSON's "ab_training" key
    deepspeed --num_gpus 4 recipes/finetune.py --model_name_or_path <model> \\
        --deepspeed configs/ds_ab_zero0_bf16.json --output_dir runs/ft

Every ``transformers.TrainingArguments`` flag works (--learning_rate, --per_device_train_batch_size,
--gradient_accumulation_steps, --max_grad_norm, --save_steps, --resume_from_checkpoint, ...),
next to the recipe's own knobs below. At the end the groups are reconciled (a last sync if the
run stopped inside an AB phase), the AB layers are merged back into dense ones
(:func:`ab_accel.merge`) and the model is saved with ``save_pretrained`` to
``<output_dir>/merged``: it loads with plain transformers, without ab_accel.
``<output_dir>/ab_summary.json`` holds the final metrics, the traffic of rank 0 and the
compression reached before the merge.

On a machine without CUDA the recipe sets up gloo itself: ``--use_cpu --ddp_backend gloo`` for
DDP, and the pre-configured state the Trainer's DeepSpeed branch needs on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field


# ----------------------------------------------------------------------------- knobs
@dataclass
class RecipeArguments:
    model_name_or_path: str = field(
        metadata={"help": "A local folder written by save_pretrained, or a hub id."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "ImageNet-style tree read with datasets' imagefolder: "
                          "<data_dir>/<class>/<image>, or <data_dir>/{train,validation}/... "
                          "None: sklearn's digits (1,797 real 8x8 images, 10 classes)."})
    validation_split: float = field(
        default=0.1, metadata={"help": "Share held out for eval when there is no "
                                       "validation folder."})
    image_size: int | None = field(
        default=None, metadata={"help": "Input size; None: the model config's image_size."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    ab_config: str | None = field(
        default=None,
        metadata={"help": "ABConfig fields as a JSON string or a JSON file. None: the "
                          "\"ab_training\" key of --deepspeed, else a schedule scaled to the "
                          "run (warm-up and cycles of a quarter of the optimizer steps)."})
    no_ab: bool = field(default=False, metadata={"help": "Plain data parallel (the baseline)."})
# -----------------------------------------------------------------------------


def cpu_distributed_defaults(argv: list[str]) -> list[str]:
    """Without CUDA, make the processes one gloo world before TrainingArguments exist."""
    import torch

    if torch.cuda.is_available():
        return argv
    if "--deepspeed" in argv:
        from ab_accel.trainer import setup_cpu_deepspeed

        return argv + ["--accelerator_config", json.dumps(setup_cpu_deepspeed())]
    extra = [] if "--use_cpu" in argv else ["--use_cpu"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "--ddp_backend" not in argv:
        extra += ["--ddp_backend", "gloo"]
    return argv + extra


def load_images(recipe: RecipeArguments, seed: int):
    """(train, eval, label names): datasets with an ``image`` (PIL) and a ``label`` column."""
    import datasets

    if recipe.data_dir is None:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [Image.fromarray((img * 255 / 16).astype(np.uint8)) for img in digits.images]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=[str(i)
                                                                          for i in range(10)])})
        data = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()},
                                          features=features)
        data = datasets.DatasetDict({"train": data})
    else:
        data = datasets.load_dataset("imagefolder", data_dir=recipe.data_dir)
    eval_name = next((n for n in ("validation", "val", "test") if n in data), None)
    if eval_name is None:
        split = data["train"].train_test_split(test_size=recipe.validation_split, seed=seed,
                                               stratify_by_column="label")
        train, evaluation = split["train"], split["test"]
    else:
        train, evaluation = data["train"], data[eval_name]
    if recipe.max_train_samples is not None:
        train = train.select(range(min(recipe.max_train_samples, len(train))))
    if recipe.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    return train, evaluation, train.features["label"].names


def load_model(recipe: RecipeArguments, labels: list[str]):
    """The pretrained model with a head for these labels (a new head if the count differs)."""
    from transformers import AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    return AutoModelForImageClassification.from_pretrained(
        recipe.model_name_or_path, num_labels=len(labels), id2label=id2label,
        label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True)


def image_transform(model, recipe: RecipeArguments):
    """PIL image -> normalized tensor at the model's size and channel count."""
    from torchvision import transforms

    config = model.config
    size = recipe.image_size or getattr(config, "image_size", 224)
    channels = getattr(config, "num_channels", 3)
    mean, std = [0.5] * channels, [0.5] * channels
    try:  # the model's own normalization, when its folder holds an image processor
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(recipe.model_name_or_path)
        mean, std = list(processor.image_mean)[:channels], list(processor.image_std)[:channels]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    mode = "L" if channels == 1 else "RGB"
    pipeline = transforms.Compose([
        transforms.Lambda(lambda img: img.convert(mode)),
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])

    def apply(batch: dict) -> dict:
        return {"pixel_values": [pipeline(img) for img in batch["image"]],
                "labels": batch["label"]}

    return apply


def ab_settings(recipe: RecipeArguments, args, total_steps: int):
    """The ABConfig, or None to read the --deepspeed JSON's "ab_training" key."""
    from ab_accel import ABConfig

    if recipe.no_ab:
        return ABConfig(enabled=False)
    if recipe.ab_config is not None:
        text = recipe.ab_config
        if os.path.isfile(text):
            with open(text) as fh:
                text = fh.read()
        return ABConfig.from_json(text)
    if args.deepspeed is not None:
        return None
    quarter = max(2, total_steps // 4)
    rebound = max(1, quarter // 10)
    return ABConfig(warmup_steps=quarter, sync_every=quarter, rebound_steps=rebound,
                    lr_rebound_steps=rebound)


def accuracy(eval_pred) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str]) -> dict:
    import torch
    from transformers import HfArgumentParser, TrainingArguments, default_data_collator

    from ab_accel import compression, merge
    from ab_accel.trainer import ABTrainer

    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    recipe, args = parser.parse_args_into_dataclasses(cpu_distributed_defaults(argv))
    args.remove_unused_columns = False  # the transform needs the "image" and "label" columns
    train, evaluation, labels = load_images(recipe, args.seed)
    model = load_model(recipe, labels)
    transform = image_transform(model, recipe)
    train.set_transform(transform)
    evaluation.set_transform(transform)

    world = max(1, args.world_size)
    batches = len(train) // (args.per_device_train_batch_size * world)
    total = args.max_steps if args.max_steps > 0 else int(
        args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps))
    trainer = ABTrainer(model=model, args=args, ab_config=ab_settings(recipe, args, total),
                        train_dataset=train, eval_dataset=evaluation,
                        data_collator=default_data_collator, compute_metrics=accuracy)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # The end: reconcile the groups, measure, merge into dense layers, evaluate, save.
    summary: dict = {"ab_config": trainer.ab_config.to_dict()}
    opt = trainer.ab_optimizer
    if opt is not None:
        summary["compression"] = {
            k: v for k, v in compression(trainer.model).items() if k != "layers"}
        summary["ranks"] = opt.ranks
        summary["final_sync"] = opt.sync_now()
        summary["traffic_rank0"] = opt.traffic.summary()
        summary["step_count"] = opt.step_count
    merge(trainer.model)
    summary["eval"] = trainer.evaluate()
    summary["world_size"] = world
    merged_dir = os.path.join(args.output_dir, "merged")
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(merged_dir)
        with open(os.path.join(args.output_dir, "ab_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
