"""The model of the image recipes, its optimizer and its learning-rate schedule.

The model comes from transformers' Auto classes (``AutoConfig.for_model(model_type, **model)``
from scratch, ``from_pretrained`` to fine-tune), so ViT and ResNet share one loop; the schedule
is torch's (linear warm-up, then cosine), stepped once per optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from args import ConfigError, TrainArgs


def check_model_keys(model_type: str, values: dict[str, Any]) -> None:
    """The model block holds fields of the model type's config class (a typo stops here)."""
    import difflib

    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict())
    for key in values:
        if key in ("image_size", "num_channels", "num_labels", "id2label", "label2id"):
            raise ConfigError(f"model.{key} is set by the recipe (image_size and image_mean at "
                              f"the top level, the labels from the data): remove it.")
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            raise ConfigError(f"model.{key} is not a {cls.__name__} field."
                              + (f" Did you mean {hint[0]!r}?" if hint else ""))


def build_model(args: TrainArgs, labels: list[str]) -> Any:
    """AutoConfig.for_model(model_type, **model) from scratch, or from_pretrained (a new head)."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    heads = {"num_labels": len(labels), "id2label": id2label,
             "label2id": {name: i for i, name in id2label.items()}}
    if args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, ignore_mismatched_sizes=True, **heads)
        size = getattr(model.config, "image_size", args.image_size)
        if size != args.image_size:
            raise ConfigError(f"{args.model_name_or_path} was trained on {size}px images but "
                              f"image_size is {args.image_size}: pass --image_size {size}.")
    else:
        if "image_size" in CONFIG_MAPPING[args.model_type]().to_dict():
            heads["image_size"] = args.image_size
        model = AutoModelForImageClassification.from_config(AutoConfig.for_model(
            args.model_type, num_channels=len(args.image_mean), **heads, **args.model))
    if model.config.num_channels != len(args.image_mean):
        raise ConfigError(f"the model takes {model.config.num_channels}-channel images but "
                          f"image_mean has {len(args.image_mean)} values: one per channel.")
    return model


def same_init_without_ab(model: Any, config: Any) -> None:
    """--no-ab with orthogonal_init: the AB run's initial weights (convert, then merge back)."""
    import torch

    from ab_accel import convert, merge

    if not config.enabled and config.orthogonal_init:
        with torch.random.fork_rng(devices=[]):  # merge builds new layers: keep the RNG stream
            merge(convert(model, dataclasses.replace(config, enabled=True)))


def adamw(model: Any, args: TrainArgs) -> Any:
    """AdamW with weight decay on matrices and conv kernels, none on biases and norms (1-D)."""
    import torch

    params = list(model.parameters())
    return torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=args.lr, betas=args.betas)


def lr_schedule(optimizer: Any, total_steps: int, warmup_steps: int, lr_start: float,
                min_lr: float) -> Any:
    """Linear warm-up from lr_start to the optimizer's lr, then cosine to min_lr at total_steps:
    torch's SequentialLR(LinearLR, CosineAnnealingLR), stepped once per optimizer step (not
    prepared: Accelerate's wrapper would step it once per process). AB-training's LR rebound
    multiplies it inside ABOptimizer.step()."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_lr)
    if not warmup_steps:
        return cosine
    start = min(1.0, max(lr_start / optimizer.param_groups[0]["lr"], 1e-12))
    warm = LinearLR(optimizer, start_factor=start, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])
