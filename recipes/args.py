"""The knobs of the recipes and how they are read: jsonargparse, over dataclasses.

Defaults < a config file (``--config``; without one the recipe's digits config, or its ImageNet
config when ``--data_dir`` / ``--dataset_name`` is given) < that file's row of the paper's
per-node schedule < the command line: ``--lr 1e-3``, ``--ab_training.sync_every 500`` (the
block is :class:`ab_accel.ABConfig` itself), ``--model.hidden_size 384``, ``--betas 0.9,0.95``.
A wrong key, type or value raises :class:`ConfigError` before anything heavy is loaded.
"""

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonargparse import ActionConfigFile
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from ab_accel import ABConfig, ABConfigError, support
from ab_accel.cli import CommandLineError as ConfigError
from ab_accel.cli import make_parser, parse_argv

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("recipes")


UpToOne = restricted_number_type("UpToOne", float, [(">", 0), ("<=", 1)])  # (0, 1]
BelowOne = restricted_number_type("BelowOne", float, [(">=", 0), ("<", 1)])  # [0, 1)


def knob(default: Any, help: str) -> Any:
    """A dataclass field that carries its help text, as ABConfig's fields do."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataArgs:
    """Where the images come from (the image recipes and finetune.py)."""

    data_dir: str | None = knob(None, "ImageNet-style tree <data_dir>/{train,val}/<class>/<image> "
                                "(datasets' imagefolder). None, and no dataset_name: digits.")
    dataset_name: str | None = knob(None, "A hub dataset (online), e.g. uoft-cs/cifar10.")
    dataset_config_name: str | None = knob(None, "The hub dataset's configuration.")
    train_split: str = knob("train", "The split to train on.")
    eval_split: str = knob("auto", "auto: validation, val, valid or test; if none exists, "
                           "validation_split of train.")
    validation_split: OpenUnitInterval = knob(0.1, "Share of train held out without an eval split.")
    image_column: str = knob("auto", "auto: image, img or pixel_values.")
    label_column: str = knob("auto", "A ClassLabel column. auto: label, labels or fine_label.")
    cache_dir: str | None = knob(None, "datasets' cache (None: ~/.cache/huggingface/datasets).")
    max_train_samples: PositiveInt | None = knob(None, "Train on the first N images only.")
    max_eval_samples: PositiveInt | None = knob(None, "Evaluate on the first N images only.")
    seed: int = knob(0, "Seed of the model init, the shuffle order and the augmentation.")


@dataclass
class TrainArgs(DataArgs):
    """The knobs of recipes/vit.py and recipes/resnet.py (steps are optimizer steps)."""

    image_size: PositiveInt = knob(224, "Input size in pixels (square).")
    image_mean: list[float] = knob([0.485, 0.456, 0.406], "One per channel (num_channels).")
    image_std: list[float] = knob([0.229, 0.224, 0.225], "One per channel.")
    crop_scale: tuple[UpToOne, UpToOne] = knob((0.08, 1.0), "RandomResizedCrop scale (train).")
    hflip: bool = knob(True, "RandomHorizontalFlip (train).")
    eval_crop_ratio: UpToOne = knob(0.875, "Eval: resize to image_size / ratio, center crop.")
    num_workers: NonNegativeInt = knob(8, "DataLoader worker processes per rank.")
    model_type: str = knob("vit", "transformers model type built from scratch (AutoConfig).")
    model_name_or_path: str | None = knob(None, "Fine-tune from a save_pretrained folder or a "
                                          "hub id, instead of training from scratch.")
    model: dict[str, Any] = knob({}, "Config fields of the model from scratch: --model.KEY V.")
    orthogonal_init: bool | Literal["auto"] = knob("auto", "The paper's init (singular values "
                                                   "1). auto: from scratch, not fine-tuning.")
    epochs: PositiveInt = knob(150, "Epochs, unless max_steps is set.")
    max_steps: PositiveInt | None = knob(None, "Optimizer steps, instead of epochs.")
    batch_size: PositiveInt = knob(4096, "GLOBAL batch = per process x processes x accumulation.")
    gradient_accumulation_steps: PositiveInt = knob(1, "Micro-batches per optimizer step.")
    lr: PositiveFloat = knob(3.5e-3, "Peak learning rate (AdamW).")
    lr_start: NonNegativeFloat = knob(1e-5, "Learning rate at step 0, linear warm-up to lr.")
    min_lr: NonNegativeFloat = knob(1e-5, "Learning rate at the end of the cosine decay.")
    lr_warmup_epochs: NonNegativeFloat = knob(10.0, "LR warm-up (not ab_training.warmup_steps).")
    weight_decay: NonNegativeFloat = knob(0.1, "AdamW decay, not on biases and norms.")
    betas: tuple[float, float] = knob((0.9, 0.999), "AdamW betas.")
    label_smoothing: BelowOne = knob(0.1, "Cross-entropy label smoothing.")
    max_grad_norm: NonNegativeFloat = knob(1.0, "Clip the reduced gradients (0: off).")
    mixed_precision: Literal["no", "bf16", "fp16", "fp8"] = knob(
        "bf16", "no or bf16 (fp16 and fp8 are refused, with the reason).")
    no_ab: bool = knob(False, "--no-ab: plain data parallel (DDP), everything else identical.")
    ab_training: ABConfig = knob(ABConfig(), "ab_accel.ABConfig; group_size world: one group.")
    ab_schedule_by_nodes: dict[int, dict[str, Any]] = knob({}, "The paper's table: nodes -> "
                                                           "knobs of that row.")
    nodes: PositiveInt | Literal["auto"] = knob("auto", "The row to use. auto: processes / "
                                                "gpus_per_node.")
    gpus_per_node: PositiveInt = knob(4, "Processes per node (nodes: auto).")
    output_dir: str = knob("runs/recipe", "summary.json, metrics.jsonl, checkpoints/, model/.")
    eval_every_epochs: PositiveInt = knob(1, "Evaluate every N epochs (and at the end).")
    log_every: PositiveInt = knob(10, "Optimizer steps between train-loss records.")
    report_to: str = knob("tensorboard", "Accelerate tracker (tensorboard, wandb...) or none.")
    checkpointing_steps: PositiveInt | None = knob(None, "save_state every N optimizer steps.")
    resume_from_checkpoint: str | None = knob(None, "A checkpoint folder, or latest.")
    save_model: bool = knob(True, "Export the merged dense model (save_pretrained).")
    baseline_run: str | None = knob(None, "output_dir of a --no-ab run to compare traffic with.")
    cpu: bool | Literal["auto"] = knob("auto", "CPU (gloo). auto: when no CUDA is visible.")
    config: str | None = knob(None, "The config file this run read (set by --config).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # plain int / float, not jsonargparse's PositiveInt...
            value = getattr(self, f.name)  # (they would end up pickled in the optimizer state)
            if type(value) not in (int, float, bool) and isinstance(value, (int, float)):
                setattr(self, f.name, (int if isinstance(value, int) else float)(value))
        if self.data_dir and self.dataset_name:
            raise ConfigError("Give --data_dir (a local folder tree) or --dataset_name, not both.")
        if len(self.image_mean) != len(self.image_std) or self.crop_scale[0] > self.crop_scale[1]:
            raise ConfigError(f"image_mean {self.image_mean} and image_std {self.image_std} need "
                              f"one value per channel, crop_scale {list(self.crop_scale)} is "
                              f"[low, high].")


@dataclass(frozen=True)
class Recipe:
    """What vit.py and resnet.py set: the model family, its defaults and its config files."""

    name: str
    model_type: str
    model: dict[str, Any]
    digits_config: str
    imagenet_config: str
    imagenet_note: str  # what the ImageNet config trains, for the message on a small machine


def given_keys(argv: Sequence[str]) -> set[str]:
    """The knobs named on the command line (``--key V``, ``--key=V``, ``--ab_training.key V``):
    the user's own choices, which nothing derived from the data replaces."""
    keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return keys | {k.split(".", 1)[0] + ".*" for k in keys if "." in k}


def parse(recipe: Recipe, argv: Sequence[str], world_size: int | None = None) -> TrainArgs:
    """The knobs of a run. ``world_size``: processes in the run (None: $WORLD_SIZE, set by the
    launcher), which picks the row of ``ab_schedule_by_nodes`` when ``nodes`` is auto.

    Without ``--config`` the recipe reads its small config (the digits one); with a data
    argument that is the base of a run on the user's own data, whose image size, channels,
    normalisation, output folder and AB schedule :func:`derive` then takes from the data and
    the run's length. ``--nodes N`` without ``--config`` reads the paper's ImageNet config and
    its schedule row for N nodes."""
    parser = make_parser(f"{recipe.name}.py", f"{recipe.name} image classification with "
                         f"AB-training (arXiv 2405.01067); see docs/recipes.md.", TrainArgs,
                         skip={"no_ab", "config"})
    parser.add_argument("--config", action=ActionConfigFile, help=f"A YAML file of knobs. "
                        f"Default: {recipe.digits_config} (own data: its knobs, the rest derived "
                        f"from the data); with --nodes N {recipe.imagenet_config}.")
    parser.set_defaults(model_type=recipe.model_type, model=recipe.model,
                        output_dir=f"runs/{recipe.name}")
    argv = [p for a in argv for p in (a.split("=", 1) if a.startswith("--config=") else [a])]
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    rest = [a for i, a in enumerate(argv) if "--config" not in (a, argv[i - 1] if i else "")]
    given = given_keys(rest)
    if not files:
        files = [recipe.imagenet_config if "nodes" in given else recipe.digits_config]
    config = files[-1]  # the command line wins over the files, wherever --config stands
    in_repo = [os.path.join(REPO_DIR, f) for f in files]  # configs/x.yaml from anywhere
    configs = [p for f, r in zip(files, in_repo, strict=True)
               for p in ("--config", r if not os.path.exists(f) and os.path.exists(r) else f)]
    ns = parse_argv(parser, configs + rest, TrainArgs)
    if ns.data_dir:  # a missing folder is said first, before any schedule or shape question
        check_data_dir(ns.data_dir)
    if ns.ab_schedule_by_nodes:  # the row goes between the config files and the command line
        row = ["--config", json.dumps(_nodes_row(ns, config, recipe, world_size))]
        ns = parse_argv(parser, configs + row + rest, TrainArgs)
    try:
        values = parser.instantiate(ns).as_dict()
        values.pop("__path__", None)
        args = TrainArgs(**{**values, "config": config})
        support.check_mixed_precision(args.mixed_precision)  # fp16, fp8: refused, with the fix
    except ABConfigError as exc:
        raise ConfigError(str(exc)) from None
    args.given = given  # type: ignore[attr-defined]  (not a knob: not saved, not compared)
    return args


IMAGE_LAYOUT = ("expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image> "
                "(one folder per class, as ImageNet)")


def check_data_dir(data_dir: str) -> None:
    """Stop with a clear message when the folder tree is missing or not ImageNet-shaped, in the
    order a user fixes it: the folder, its splits, their class folders, their images."""
    layout = IMAGE_LAYOUT
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir {data_dir!r} does not exist (or is not a folder): "
                          f"{layout}.")
    for split in ("train", "val"):
        folder = os.path.join(data_dir, split)
        if split == "val" and not os.path.isdir(folder):
            folder = os.path.join(data_dir, "validation")
        if not os.path.isdir(folder):
            raise ConfigError(f"--data_dir {data_dir!r} has no {split}/ folder: {layout}.")
        classes = [os.path.join(folder, d) for d in sorted(os.listdir(folder))
                   if os.path.isdir(os.path.join(folder, d))]
        if not classes:
            raise ConfigError(f"{folder!r} holds no class folders: {layout}.")
        if not any(any(e.is_file() for e in os.scandir(c)) for c in classes):  # first file: stop
            names = ", ".join(os.path.basename(c) for c in classes[:5])
            raise ConfigError(f"the class folders of {folder!r} ({names}"
                              f"{', ...' if len(classes) > 5 else ''}) hold no image files: "
                              f"{layout}.")
        if split == "train":
            train_classes = classes
    if len(train_classes) < 2:  # datasets' imagefolder would drop the labels of one class
        raise ConfigError(f"{os.path.dirname(train_classes[0])!r} holds one class folder "
                          f"({os.path.basename(train_classes[0])!r}): a classifier needs at "
                          f"least two, one folder of images per class ({layout}).")


@dataclass
class ImageFacts:
    """What a sample of the training images says (recipes/data.py's survey)."""

    sampled: int
    size: int | None  # the side of a square crop that fits every sampled image; None: they vary
    shape: str  # e.g. "32x32" or "from 20x30 to 500x375"
    channels: int  # 1 when every sampled image is grey, else 3
    mean: list[float]
    std: list[float]


def steps_per_epoch(n_train: int, batch_size: int, world: int, accumulation: int) -> int:
    """Optimizer steps in one epoch: the per-process loader drops its last partial batch, then
    Accelerate deals the batches round-robin over the processes and drops an incomplete round;
    an incomplete accumulation window still ends in a step."""
    per_process = batch_size // (world * accumulation)
    batches = (n_train // per_process if per_process else 0) // world
    return -(-batches // accumulation)


def derive(args: TrainArgs, recipe: Recipe, world: int, n_train: int | None,
           facts: ImageFacts | None) -> tuple[TrainArgs, int | None, list[str]]:
    """(the run's knobs, its optimizer steps, what was derived) for ``n_train`` training
    images over ``world`` processes (None: not known yet; the run's length is then not
    decided). Knobs named on the command line are kept. On the user's own data the image shape,
    the normalisation and the output folder come from the data, each change said in one line
    (a config file's value is adapted, never silently), and the AB schedule is scaled to the
    run's length (:func:`ab_accel.schedule.scaled_schedule`) unless the config is a paper
    config (one with ``ab_schedule_by_nodes``: its normalisation and schedule rows are kept) or
    the schedule is given on the command line. Refuses, before any training, a run of 0
    optimizer steps (and lowers a batch that no knob set to what the data holds)."""
    given: set[str] = getattr(args, "given", set())
    own = bool(args.data_dir or args.dataset_name)
    paper = bool(args.ab_schedule_by_nodes)  # a paper config: its shapes and schedule rows
    changes: dict[str, Any] = {}
    said: list[str] = []
    src = f"{args.config} says" if args.config else "the default is"
    if own and facts is not None and not args.model_name_or_path:
        size = facts.size if facts.size is not None else (None if paper else 224)
        if size is not None and "image_size" not in given and size != args.image_size:
            changes["image_size"] = size
            said.append(f"image_size {size} (the images are {facts.shape}; {src} "
                        f"{args.image_size})")
            patch = args.model.get("patch_size")
            if args.model_type == "vit" and patch and "model.patch_size" not in given:
                new = max(1, round(patch * size / args.image_size))
                changes["model"] = {**args.model, "patch_size": new}
                said.append(f"model.patch_size {new} (keeps {args.config}'s "
                            f"{args.image_size // patch}x{args.image_size // patch} patches)")
        if not {"image_mean", "image_std"} & given and (
                not paper or len(args.image_mean) != facts.channels):
            changes.update(image_mean=facts.mean, image_std=facts.std)
            said.append(f"{facts.channels} channel(s), image_mean {facts.mean}, image_std "
                        f"{facts.std} (measured on {facts.sampled} training images"
                        + ("" if len(args.image_mean) == facts.channels else
                           f"; {src} {len(args.image_mean)} channel(s)") + ")")
        elif len(args.image_mean) != facts.channels:
            said.append(f"the images have {facts.channels} channel(s), --image_mean gives "
                        f"{len(args.image_mean)}: they are converted")
    if own and "output_dir" not in given:
        name = os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else \
            args.dataset_name.replace("/", "_")
        out = f"runs/{recipe.name}_{name}"
        if out != args.output_dir:
            changes["output_dir"] = out
            said.append(f"output_dir {out} (named after the data; {src} {args.output_dir})")
    unit = world * args.gradient_accumulation_steps
    accumulation = args.gradient_accumulation_steps
    if args.batch_size % unit:
        raise ConfigError(f"batch_size {args.batch_size} (global) does not split over {world} "
                          f"processes x {accumulation} accumulation steps: pass a multiple of "
                          f"{unit} (e.g. --batch_size {max(unit, args.batch_size // unit * unit)}"
                          f").")
    if n_train is not None and steps_per_epoch(n_train, args.batch_size, world,
                                               accumulation) == 0:
        fits = n_train // unit * unit
        if "batch_size" not in given and own and fits:
            changes["batch_size"] = fits
            said.append(f"batch_size {fits} (global; {n_train} training images, {src} "
                        f"{args.batch_size})")
        else:
            fix = (f"Pass --batch_size {fits} or less (a multiple of {unit}), or add images"
                   if fits else f"Use fewer than {world} processes, or add images")
            raise ConfigError(
                f"{n_train} training images with a global batch of {args.batch_size} "
                f"({args.batch_size // unit} per process x {world} processes x "
                f"{args.gradient_accumulation_steps} accumulation) make 0 optimizer steps per "
                f"epoch: nothing would be trained. {fix}.")
    args = dataclasses.replace(args, **changes) if changes else args
    args.given = given  # type: ignore[attr-defined]
    if n_train is None:
        return args, None, said
    steps = args.max_steps or args.epochs * steps_per_epoch(
        n_train, args.batch_size, world, args.gradient_accumulation_steps)
    schedule_keys = {f"ab_training.{k}" for k in ("warmup_steps", "sync_every",
                                                  "rebound_steps", "lr_rebound_steps")}
    from ab_accel.config import resolve_config

    from_json = resolve_config(environ=os.environ).config is not None  # DeepSpeed's key wins
    if own and not paper and not args.no_ab and not schedule_keys & given and \
            "ab_training" not in given and not from_json:
        from ab_accel.schedule import scaled_schedule

        try:
            scaled = scaled_schedule(steps)
        except ValueError as exc:
            run = (f"--max_steps {steps}" if args.max_steps else f"{args.epochs} epochs x "
                   f"{steps // args.epochs} step(s)")
            raise ConfigError(f"this run ({run}): {exc} Here: --epochs N or --max_steps N, or "
                              f"--ab_training.warmup_steps/sync_every/rebound_steps; or --no-ab "
                              f"for plain data parallel.") from None
        args.ab_training = dataclasses.replace(args.ab_training, **scaled)
        said.append(f"AB schedule scaled to the run's {steps} steps ("
                    + ", ".join(f"{k} {v}" for k, v in scaled.items()) + ")")
    return args, steps, said


def _nodes_row(ns: Any, config: str | None, recipe: Recipe, world_size: int | None
               ) -> dict[str, Any]:
    table, nodes = ns.ab_schedule_by_nodes, ns.nodes
    world = world_size if world_size is not None else launched_world_size()
    small = "" if config != recipe.imagenet_config else (
        f" ({config}: {recipe.imagenet_note}. For your own data set leave out --nodes and a paper "
        f"--config: the recipe then derives the image shape and the schedule from the data.)")
    if nodes == "auto" and world % ns.gpus_per_node:
        raise ConfigError(
            f"{config}: the schedule table is per number of nodes of {ns.gpus_per_node} "
            f"processes (gpus_per_node), but this run has {world} processes. Pick a row with "
            f"--nodes N (rows: {sorted(table)}), or set --gpus_per_node.{small}")
    nodes = world // ns.gpus_per_node if nodes == "auto" else nodes
    if nodes not in table:
        raise ConfigError(
            f"{config}: the paper's schedule has no row for {nodes} node(s) (rows: "
            f"{sorted(table)}). Pick one with --nodes N, or set the schedule with "
            f"--ab_training.warmup_steps/sync_every/rebound_steps/lr_rebound_steps.{small}")
    return {**table[nodes], "nodes": nodes}


# ------------------------------------------------------------------------------- AB config
def launched_world_size() -> int:
    """The number of processes the launcher started ($WORLD_SIZE; 1 for a plain python run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ab_config(args: TrainArgs, world_size: int, from_scratch: bool,
              environ: Any = None) -> ABConfig:
    """The ABConfig of this run, checked against the world size before any training.

    Under ``accelerate launch --use_deepspeed`` the top-level "ab_training" key of the DeepSpeed
    JSON, when it has one, is the schedule (:func:`ab_accel.config.resolve_config`: its one
    precedence rule). ``--ab_training.*`` given on the command line as well are a second source
    of that rule: they must agree with the JSON's block (then both are named in the log), or the
    run is refused naming the fields that differ; they are never silently dropped. The recipe's
    config file's block is the fallback. Then ``--no-ab`` and ``orthogonal_init`` apply.
    """
    from ab_accel.config import resolve_config

    env = os.environ if environ is None else environ
    given = getattr(args, "given", set())
    fields = [f.name for f in dataclasses.fields(ABConfig)
              if "ab_training" in given or f"ab_training.{f.name}" in given]
    try:
        from_json = resolve_config(environ=env).config  # the JSON's block, or None
        if fields and from_json is not None:  # two sources: the command line's fields ...
            flags = " ".join(f"--ab_training.{k} {getattr(args.ab_training, k)}" for k in fields)
            try:  # ... must agree with the JSON's: resolve_config's rule
                config, _ = resolve_config(config=dataclasses.replace(from_json, **{
                    k: getattr(args.ab_training, k) for k in fields}), environ=env)
            except ABConfigError as exc:
                raise ABConfigError(
                    f"{flags} on the command line (\"config=\" below) and the DeepSpeed "
                    f"JSON's \"ab_training\" block both set the AB-training schedule. {exc} "
                    f"Change the JSON's block, or drop the command-line flags.") from None
            source = (f"the DeepSpeed JSON's \"ab_training\" key and {flags} on the command "
                      f"line (both given; they agree)")
        else:
            config, source = resolve_config(environ=env, fallback=args.ab_training)
        if source != "the fallback":
            logger.info("AB-training schedule: %s", source)
        orthogonal = (config.orthogonal_init or from_scratch) if args.orthogonal_init == "auto" \
            else args.orthogonal_init
        config = dataclasses.replace(
            config, enabled=config.enabled and not args.no_ab, orthogonal_init=orthogonal,
            group_size=world_size if config.group_size == "world" else config.group_size)
        if config.enabled:
            config.resolve_group_size(world_size)
    except ABConfigError as exc:
        raise ConfigError(str(exc)) from None
    return config
