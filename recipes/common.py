"""What recipes/vit.py and recipes/resnet.py share: knobs, data, evaluation, checkpoints, the end.

The training loop itself lives in each recipe, top to bottom, so that a reader can diff the two
(and diff either against a plain Accelerate loop: the AB-training change is one line,
``ab_accel.prepare`` in place of ``accelerator.prepare``).

Sections, in order: knobs and config files; the Accelerator; data; the learning rate; AB-training
helpers; evaluation; checkpoints; the end of a run (final sync, merged export, summary, plot).

Heavy libraries (torch, transformers, datasets) are imported inside the functions that need
them, so that a wrong config key stops the run in a second, before anything is loaded.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(RECIPES_DIR)
#: The local `evaluate` metric module (top-1 / top-5): loads without the hub.
METRIC_DIR = os.path.join(RECIPES_DIR, "metrics", "top_k_accuracy")
#: Label of an image that could not be read: ignored by the loss and by the metric.
IGNORE_INDEX = -100

logger = logging.getLogger("recipes")


# =============================================================================================
# Knobs. Defaults here < a config file (--config, YAML or JSON) < the command line.
# =============================================================================================

COMMON_KNOBS: dict[str, Any] = {
    # ---- config
    "config": "auto",          # YAML/JSON file of knobs; auto: the digits config when no data
                               # argument is given, else the recipe's ImageNet config
    # ---- data (no data argument: sklearn's digits, 1,797 real 8x8 images)
    "data_dir": None,          # ImageNet-style tree: <data_dir>/{train,val}/<class>/<image>
    "dataset_name": None,      # a hub dataset (needs the network), e.g. "uoft-cs/cifar10"
    "dataset_config_name": None,
    "train_split": "train",
    "eval_split": "auto",      # auto: the first of validation, val, valid, test that exists
    "image_column": "auto",    # auto: image, img or pixel_values
    "label_column": "auto",    # auto: label, labels or fine_label
    "cache_dir": None,         # datasets' cache (None: ~/.cache/huggingface/datasets)
    "max_train_samples": None,
    "max_eval_samples": None,
    "image_size": 224,
    "image_mean": [0.485, 0.456, 0.406],  # one value per channel (the model's num_channels)
    "image_std": [0.229, 0.224, 0.225],
    "crop_scale": [0.08, 1.0],  # RandomResizedCrop's scale range (train)
    "hflip": True,             # RandomHorizontalFlip (train)
    "eval_crop_ratio": 0.875,  # eval: resize to image_size / ratio, then center crop image_size
    "num_workers": 8,          # DataLoader worker processes per rank
    # ---- model
    "model_name_or_path": None,  # fine-tune from a local folder (or a hub id when online)
    "model": {},               # config fields of the model built from scratch
    "orthogonal_init": "auto",  # the paper's init from scratch; auto: on from scratch, off when
                                # fine-tuning (it would reset the pretrained singular values)
    # ---- optimization (the paper: AdamW, cosine LR with warm-up, label smoothing, clip, bf16)
    "epochs": 150,
    "max_steps": None,         # total optimizer steps, instead of epochs (the LR schedule follows)
    "batch_size": 4096,        # GLOBAL batch: per process = batch_size / (processes * accumulation)
    "gradient_accumulation_steps": 1,
    "lr": 3.5e-3,              # peak learning rate
    "lr_start": 1e-5,          # learning rate at step 0 (linear warm-up from here to `lr`)
    "min_lr": 1e-5,            # end of the cosine decay
    "lr_warmup_epochs": 10.0,  # LR warm-up (not AB-training's warm-up: that is ab_training)
    "weight_decay": 0.1,       # AdamW decay on matrices and factors (not biases and norms)
    "betas": [0.9, 0.999],
    "label_smoothing": 0.1,
    "max_grad_norm": 1.0,      # clip after reduction (ab_accel's prepare makes clip see it)
    "mixed_precision": "bf16",  # no | bf16 | fp16
    "seed": 0,
    # ---- AB-training (ab_accel.ABConfig fields; steps are optimizer steps)
    "no_ab": False,            # --no-ab: plain data parallel (DDP), everything else identical
    "ab_training": {},         # warmup_steps, sync_every, rebound_steps, lr_rebound_steps, ...;
                               # group_size: "world" means one group of every rank
    "ab_schedule_by_nodes": {},  # the paper's table: nodes -> knobs (batch_size, ab_training)
    "nodes": "auto",           # the row to use; auto: processes / gpus_per_node
    "gpus_per_node": 4,
    # ---- evaluation, logging, checkpoints, output
    "output_dir": "runs/recipe",
    "eval_every_epochs": 1,
    "log_every": 10,           # steps between loss logs (and the tqdm postfix)
    "report_to": "tensorboard",  # an accelerate tracker (tensorboard, wandb, ...) or none
    "checkpointing_steps": None,  # save_state every N optimizer steps to output_dir/checkpoints
    "resume_from_checkpoint": None,  # a checkpoint folder, or "latest" (in output_dir)
    "save_model": True,        # export the merged dense model with save_pretrained
    "baseline_run": None,      # output_dir of a --no-ab run: the plot and summary compare to it
    "cpu": "auto",             # auto: CPU (gloo) when no CUDA device is visible
}

#: Knobs whose value is a dict; a config file or `--name.key value` sets keys inside them.
DICT_KNOBS = ("model", "ab_training", "ab_schedule_by_nodes")
#: The data arguments: when none is given the recipe trains on sklearn's digits.
DATA_ARGS = ("data_dir", "dataset_name")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


class ConfigError(ValueError):
    """A bad knob, config file or data location. The message says what to change."""


class Config(dict):
    """The resolved knobs; read them as attributes (``cfg.lr``) or items (``cfg["lr"]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" Did you mean {hint[0]!r}?" if hint else ""


def parse_value(text: Any) -> Any:
    """A command-line or config-file value: YAML scalars, plus 3.5e-3 (YAML 1.1 reads a str)."""
    if not isinstance(text, str):
        return text
    if _FLOAT_RE.match(text.strip()):
        return float(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not value.startswith(("[", "{")):
        return [parse_value(v.strip()) for v in value.split(",")]
    return value


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """``value`` converted to the type of the knob's default; a clear error otherwise."""
    value = parse_value(value)
    if isinstance(value, list):
        value = [parse_value(v) for v in value]
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or value != int(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if isinstance(default, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(default, str):
            if isinstance(value, (dict, list)):
                raise TypeError
            if default == "auto":  # auto | a value of another type (nodes: 8, cpu: true)
                return value
            if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes as a bool
                return "no" if value is False else "yes"
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: {key} must be {type(default).__name__} like its default "
            f"{default!r}, got {value!r}."
        ) from None
    return value


def parse_cli(argv: Sequence[str]) -> list[tuple[str, Any]]:
    """``--key value``, ``--key=value``, ``--a.b value`` and bare ``--flag`` (true); ``--no-ab``.

    Dashes in names read as underscores. Returns (dotted key, raw value) pairs in order.
    """
    out: list[tuple[str, Any]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"Unexpected command-line argument {arg!r}: knobs are written --name value "
                f"or --name=value (see --help)."
            )
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("--") and not _FLOAT_RE.match(nxt)):
                value = True  # a bare flag
            else:
                value = nxt
                i += 1
        out.append((name, value))
        i += 1
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file of knobs (a mapping at the top level)."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file {path!r} does not exist. The shipped ones are in "
            f"{os.path.join(REPO_DIR, 'configs')}: {', '.join(list_configs())}."
        )
    with open(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Config file {path!r} is not valid {_kind(path)}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold a mapping of knobs, got "
                          f"{type(data).__name__}.")
    return data


def _kind(path: str) -> str:
    return "JSON" if path.endswith(".json") else "YAML"


def list_configs() -> list[str]:
    folder = os.path.join(REPO_DIR, "configs")
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml", ".json")))


def _merge(cfg: dict[str, Any], values: dict[str, Any], knobs: dict[str, Any], source: str
           ) -> None:
    """Set ``values`` (a config file's mapping, or a table row) into ``cfg``, checked."""
    for key, value in values.items():
        key = str(key)
        if key not in knobs:
            raise ConfigError(
                f"{source}: unknown key {key!r}.{_did_you_mean(key, list(knobs))} "
                f"Run the recipe with --help for the list of knobs."
            )
        if key in DICT_KNOBS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping (key: value lines), got "
                                  f"{value!r}.")
            target = cfg[key]
            for sub, sub_value in value.items():
                target[sub] = sub_value if isinstance(sub_value, dict) else parse_value(sub_value)
        else:
            cfg[key] = _coerce(key, value, knobs[key], source)


def _set_dotted(cfg: dict[str, Any], knobs: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head not in knobs:
        raise ConfigError(
            f"command line: unknown option --{head}.{_did_you_mean(head, list(knobs))} "
            f"Run the recipe with --help for the list of knobs."
        )
    if rest:
        if head not in DICT_KNOBS:
            raise ConfigError(f"command line: --{key}: {head} is not a mapping; write --{head} "
                              f"value.")
        target = cfg[head]
        parts = rest.split(".")
        for part in parts[:-1]:
            target = target.setdefault(_table_key(part), {})
        target[parts[-1]] = parse_value(value)
    elif head in DICT_KNOBS:
        raise ConfigError(f"command line: --{head} needs a key: --{head}.<field> value.")
    elif value is True and not isinstance(knobs[head], bool) and knobs[head] != "auto":
        raise ConfigError(f"command line: --{head} needs a value (--{head} VALUE or "
                          f"--{head}=VALUE).")
    else:
        cfg[head] = _coerce(head, value, knobs[head], "command line")


def _table_key(part: str) -> Any:
    return int(part) if part.isdigit() else part


def load_config(knobs: dict[str, Any], argv: Sequence[str], *, recipe: str,
                default_configs: dict[str, str], world_size: int | None = None) -> Config:
    """Resolve the knobs: defaults, then the config file, then the nodes-table row, then argv.

    Args:
        knobs: the recipe's knobs with their defaults.
        argv: command-line arguments (without the program name).
        recipe: "vit" or "resnet" (for messages).
        default_configs: {"digits": path, "imagenet": path}: what ``config: auto`` reads.
        world_size: number of processes (None: $WORLD_SIZE, as set by accelerate launch).

    Raises :class:`ConfigError` for an unknown key, a value of the wrong type, or a nodes-table
    row that does not exist, before anything heavy is imported.
    """
    cli = parse_cli(argv)
    cfg = copy.deepcopy(knobs)
    config_path = knobs.get("config", "auto")
    for key, value in cli:
        if key == "config":
            config_path = value
    has_data = any(key.split(".")[0] in DATA_ARGS and value not in (None, "None", "null")
                   for key, value in cli)
    if config_path in ("auto", None, True):
        config_path = default_configs["imagenet" if has_data else "digits"]
    if config_path not in ("none", "None", ""):
        path = config_path if os.path.isabs(config_path) or os.path.exists(config_path) \
            else os.path.join(REPO_DIR, config_path)
        _merge(cfg, read_config_file(path), knobs, source=config_path)
        cfg["config"] = config_path
    # The command line wins over the config file; the nodes-table row sits in between, so it
    # is applied first with the command line's nodes / gpus_per_node.
    early = {k: v for k, v in cli if k in ("nodes", "gpus_per_node")}
    for key, value in early.items():
        _set_dotted(cfg, knobs, key, value)
    _apply_nodes_row(cfg, knobs, world_size)
    for key, value in cli:
        if key != "config":
            _set_dotted(cfg, knobs, key, value)
    _check_knobs(cfg, recipe)
    return Config(cfg)


def _apply_nodes_row(cfg: dict[str, Any], knobs: dict[str, Any], world_size: int | None) -> None:
    table = cfg.get("ab_schedule_by_nodes") or {}
    if not table:
        return
    table = {int(k): v for k, v in table.items()}
    nodes = cfg.get("nodes", "auto")
    if nodes == "auto":
        world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        per_node = int(cfg.get("gpus_per_node", 4))
        if world % per_node:
            raise ConfigError(
                f"{cfg['config']}: the schedule table is per number of nodes of "
                f"{per_node} processes (gpus_per_node), but this run has {world} processes. "
                f"Pick a row with --nodes N (rows: {sorted(table)}), or set --gpus_per_node."
            )
        nodes = world // per_node
    try:
        nodes = int(nodes)
    except (TypeError, ValueError):
        raise ConfigError(f"nodes must be 'auto' or a whole number, got {nodes!r}.") from None
    if nodes not in table:
        raise ConfigError(
            f"{cfg['config']}: the paper's schedule has no row for {nodes} node(s) "
            f"(rows: {sorted(table)}). Pick one with --nodes N, or set the schedule with "
            f"--ab_training.warmup_steps/sync_every/rebound_steps/lr_rebound_steps."
        )
    _merge(cfg, table[nodes], knobs, source=f"{cfg['config']} row for {nodes} nodes")
    cfg["nodes"] = nodes


def _check_knobs(cfg: dict[str, Any], recipe: str) -> None:
    """Checks that need no library: the ones a user can fix by editing one knob."""
    if cfg["data_dir"] and cfg["dataset_name"]:
        raise ConfigError("Give either --data_dir (a local folder tree) or --dataset_name (a hub "
                          "dataset), not both.")
    positive = ("epochs", "batch_size", "gradient_accumulation_steps", "log_every",
                "eval_every_epochs", "image_size")
    for key in positive:
        if cfg[key] is None or cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]!r}.")
    for key in ("max_steps", "checkpointing_steps", "max_train_samples", "max_eval_samples"):
        value = cfg[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ConfigError(f"{key} must be a whole number >= 1 (or null), got {value!r}.")
    if cfg["num_workers"] < 0:
        raise ConfigError(f"num_workers must be >= 0, got {cfg['num_workers']}.")
    if cfg["mixed_precision"] not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got "
                          f"{cfg['mixed_precision']!r}.")
    if cfg["orthogonal_init"] not in ("auto", True, False):
        raise ConfigError(f"orthogonal_init must be auto, true or false, got "
                          f"{cfg['orthogonal_init']!r}.")
    if "orthogonal_init" in cfg["ab_training"] or "enabled" in cfg["ab_training"]:
        raise ConfigError(
            "Set orthogonal_init at the top level (auto | true | false) and turn AB-training off "
            "with --no-ab, not inside ab_training: the recipe fills both in."
        )
    if len(cfg["image_mean"]) != len(cfg["image_std"]):
        raise ConfigError(f"image_mean {cfg['image_mean']} and image_std {cfg['image_std']} "
                          f"need one value per channel each.")
    if len(cfg["crop_scale"]) != 2 or not 0 < cfg["crop_scale"][0] <= cfg["crop_scale"][1] <= 1:
        raise ConfigError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got "
                          f"{cfg['crop_scale']}.")
    if not 0 < cfg["eval_crop_ratio"] <= 1:
        raise ConfigError(f"eval_crop_ratio must be in (0, 1], got {cfg['eval_crop_ratio']}.")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {cfg['label_smoothing']}.")
    if cfg["nodes"] != "auto" and (isinstance(cfg["nodes"], bool)
                                   or not isinstance(cfg["nodes"], int) or cfg["nodes"] < 1):
        raise ConfigError(f"nodes must be auto or a whole number >= 1, got {cfg['nodes']!r}.")
    if cfg["cpu"] not in ("auto", True, False):
        raise ConfigError(f"cpu must be auto, true or false, got {cfg['cpu']!r}.")


def print_help(knobs: dict[str, Any], doc: str | None) -> None:
    print((doc or "").strip() + "\n\nKnobs (--name value; --name.key value inside mappings):")
    for key, value in knobs.items():
        print(f"  --{key:<28} {value!r}")


# =============================================================================================
# The Accelerator
# =============================================================================================

def setup_logging(is_main: bool) -> None:
    """INFO on the main process, WARNING elsewhere (corrupt-image warnings show on every rank)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING, stream=sys.stderr, force=True)
    for noisy in ("datasets", "transformers", "accelerate", "evaluate", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_accelerator(cfg: Config, project_name: str) -> Any:
    """An Accelerator for ``cfg``: CPU (gloo) when no CUDA device is visible, seeded sampler.

    On a CPU machine launch with ``accelerate launch --multi_gpu --num_processes N`` (or
    configs/accelerate_cpu.yaml): the recipe builds ``Accelerator(cpu=True)`` itself, which is
    what makes the N processes one gloo world (``--cpu`` alone starts a single process).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    cpu = (not torch.cuda.is_available()) if cfg.cpu == "auto" else bool(cfg.cpu)
    handlers = []
    if deepspeed_launch():
        # `accelerate launch --use_deepspeed`: Accelerator(cpu=True) would turn DeepSpeed off;
        # on CPU the processes form one gloo world through the process-group kwargs instead.
        from accelerate.utils import InitProcessGroupKwargs

        if cpu:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False
    report_to = None if str(cfg.report_to).lower() in ("none", "", "false") else cfg.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logging.getLogger("recipes").warning("tensorboard is not installed: no tracker "
                                                 "(metrics.jsonl and summary.json still hold "
                                                 "every number)")
            report_to = None
    accelerator = Accelerator(
        cpu=cpu,
        kwargs_handlers=handlers,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
        # The shuffle order is a function of (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    setup_logging(accelerator.is_main_process)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise RuntimeError("accelerate started several processes that are not one world.")
    if report_to is not None:
        accelerator.init_trackers(project_name, config=flat_scalars(cfg))
    return accelerator


def flat_scalars(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The knobs as flat scalar key/values (what trackers accept as hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if key != "ab_schedule_by_nodes":
                out.update(flat_scalars(value, prefix=name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def per_device_batch_size(cfg: Config, num_processes: int) -> int:
    """The global ``batch_size`` split over processes and accumulation steps (must divide)."""
    parts = num_processes * cfg.gradient_accumulation_steps
    if cfg.batch_size % parts:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (global) does not split over {num_processes} "
            f"processes x {cfg.gradient_accumulation_steps} accumulation steps. Use a multiple "
            f"of {parts}."
        )
    return cfg.batch_size // parts


def check_model_keys(values: dict[str, Any], config_class: type, name: str) -> None:
    """The `model:` block must hold fields of the model's config class (a typo stops here)."""
    known = set(config_class().to_dict())
    for key in values:
        if key in ("image_size", "num_channels", "num_labels", "id2label", "label2id"):
            raise ConfigError(
                f"model.{key} is set by the recipe (image_size and image_mean at the top level, "
                f"the labels from the data): remove it from the model block.")
        if key not in known:
            raise ConfigError(f"model.{key} is not a {name} field.{_did_you_mean(key, known)}")


def shutdown() -> None:
    """Leave the process group (gloo aborts at interpreter exit otherwise)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def log_start(cfg: Config, accelerator: Any, model: Any, ab_opt: Any, ab_cfg: Any,
              total_steps: int, steps_per_epoch: int, batch_size: int) -> None:
    """One readable block: who runs what, for how long, with which schedule."""
    unwrapped = accelerator.unwrap_model(model)
    params = sum(p.numel() for p in unwrapped.parameters())
    lines = [
        f"{accelerator.num_processes} process(es) on {accelerator.device.type} "
        f"({accelerator.distributed_type.value}), mixed precision {cfg.mixed_precision}",
        f"model {type(unwrapped).__name__}: {params:,} parameters, "
        f"{'fine-tuning ' + cfg.model_name_or_path if cfg.model_name_or_path else 'from scratch'}",
        f"batch {cfg.batch_size} global = {batch_size} per process x "
        f"{accelerator.num_processes} x {cfg.gradient_accumulation_steps} accumulation; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps",
    ]
    if ab_opt is None:
        lines.append("AB-training off (--no-ab): plain data parallel (DDP all-reduce)")
    else:
        plan = ab_opt.groups.plan
        spans = ab_opt.schedule.describe(total_steps)
        phases = ", ".join(f"{p} {a}-{b - 1}" for p, a, b in spans[:7])
        more = f" ... ({len(spans)} spans)" if len(spans) > 7 else ""
        lines += [
            f"AB-training: {sum(1 for _ in ab_opt.ranks)} AB layers, sync_mode "
            f"{ab_cfg.sync_mode}, rank_cutoff {ab_cfg.rank_cutoff}, orthogonal_init "
            f"{ab_cfg.orthogonal_init}; groups {[list(g) for g in plan.groups]} roles "
            f"{list(plan.roles)}",
            f"schedule W0={ab_cfg.warmup_steps} T={ab_cfg.sync_every} F={ab_cfg.rebound_steps} "
            f"R={ab_cfg.lr_rebound_steps}: {phases}{more}",
        ]
    for line in lines:
        logger.info(line)


# =============================================================================================
# =============================================================================================
# Data: a folder tree (imagefolder), a hub dataset, or sklearn's digits
# =============================================================================================

def check_data_dir(data_dir: str) -> None:
    """Stop with a clear message when the folder tree is missing or not ImageNet-shaped."""
    layout = ("expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image> "
              "(one folder per class, as ImageNet)")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir {data_dir!r} does not exist (or is not a folder): "
                          f"{layout}.")
    for split in ("train", "val"):
        folder = os.path.join(data_dir, split)
        alt = os.path.join(data_dir, "validation")
        if split == "val" and not os.path.isdir(folder) and os.path.isdir(alt):
            folder = alt
        if not os.path.isdir(folder):
            raise ConfigError(f"--data_dir {data_dir!r} has no {split}/ folder: {layout}.")
        classes = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
        if not classes:
            raise ConfigError(f"{folder!r} holds no class folders: {layout}.")


def digits_splits(seed: int) -> tuple[Any, Any, str]:
    """sklearn's digits (1,797 real 8x8 grey images, 10 classes) as `datasets` splits.

    The 8x8 images (values 0..16) become 8-bit PIL images, so they go through exactly the
    transforms of the folder path. A fixed stratified 80/20 split (seed 0): 1,437 / 360.
    """
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((im * (255.0 / 16.0)).round().astype(np.uint8))
              for im in digits.images]
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
    })
    full = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()},
                                      features=features)
    split = full.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    desc = (f"sklearn digits (no --data_dir or --dataset_name given): 1,797 real 8x8 grey "
            f"images shipped with scikit-learn (load_digits), 10 classes; "
            f"{len(split['train'])} train / {len(split['test'])} eval")
    return split["train"], split["test"], desc


def load_splits(cfg: Config) -> tuple[Any, Any, str]:
    """(train, eval, description) as `datasets` Datasets with columns image and label."""
    import datasets

    if cfg.data_dir:
        check_data_dir(cfg.data_dir)
        ds = datasets.load_dataset("imagefolder", data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
        desc = f"image folder {cfg.data_dir} (datasets 'imagefolder')"
    elif cfg.dataset_name:
        ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name,
                                   cache_dir=cfg.cache_dir)
        desc = f"hub dataset {cfg.dataset_name}"
    else:
        train, evals, desc = digits_splits(cfg.seed)
        return _rename(train, cfg), _rename(evals, cfg), desc
    if cfg.train_split not in ds:
        raise ConfigError(f"{desc} has no split {cfg.train_split!r} (it has {list(ds)}). "
                          f"Set --train_split.")
    eval_split = cfg.eval_split
    if eval_split == "auto":
        eval_split = next((s for s in ("validation", "val", "valid", "test") if s in ds), None)
    if eval_split not in ds:
        raise ConfigError(f"{desc} has no evaluation split (it has {list(ds)}). Add a val/ "
                          f"folder, or set --eval_split.")
    train, evals = _rename(ds[cfg.train_split], cfg), _rename(ds[eval_split], cfg)
    return train, evals, f"{desc}: {len(train)} train / {len(evals)} eval ({eval_split})"


def _rename(ds: Any, cfg: Config) -> Any:
    """Columns image and label (found by name when 'auto'); images left undecoded."""
    import datasets

    def pick(knob: str, options: tuple[str, ...]) -> str:
        name = getattr(cfg, knob)
        if name == "auto":
            name = next((c for c in options if c in ds.column_names), None)
            if name is None:
                raise ConfigError(f"Cannot find the {knob.split('_')[0]} column among "
                                  f"{ds.column_names}; set --{knob}.")
        elif name not in ds.column_names:
            raise ConfigError(f"--{knob} {name!r} is not a column ({ds.column_names}).")
        return name

    image, label = pick("image_column", ("image", "img", "pixel_values")), \
        pick("label_column", ("label", "labels", "fine_label"))
    ds = ds.select_columns([image, label])
    if image != "image":
        ds = ds.rename_column(image, "image")
    if label != "label":
        ds = ds.rename_column(label, "label")
    if not isinstance(ds.features["label"], datasets.ClassLabel):
        raise ConfigError("The label column must be a ClassLabel (class names); got "
                          f"{ds.features['label']}.")
    # Decode in our __getitem__, where an unreadable file can be reported by its path.
    return ds.cast_column("image", datasets.Image(decode=False))


def build_transforms(cfg: Config, train: bool) -> Any:
    """torchvision.transforms.v2: the standard ImageNet recipe (random resized crop, flip,
    normalize) for training; resize + center crop + normalize for evaluation."""
    import torch
    from torchvision.transforms import v2

    size = cfg.image_size
    if train:
        ops = [v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale),
                                                  antialias=True)]
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [v2.ToImage(), v2.Resize(int(round(size / cfg.eval_crop_ratio)), antialias=True),
               v2.CenterCrop(size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.image_mean, cfg.image_std)]
    return v2.Compose(ops)


class ImageDataset:
    """A `datasets` split seen as (pixel_values, labels), decoded and augmented on the fly.

    Augmentation is a pure function of (seed, epoch, index): each sample's transform runs
    under its own RNG seed, so a resumed run (or any number of DataLoader workers) sees
    exactly the same crops and flips as an uninterrupted one.

    An image that cannot be read is skipped with a warning that names the file: the sample
    becomes a black image with label IGNORE_INDEX (-100), which the loss and the metric
    ignore, so every rank keeps the same batch shape and the same number of steps.
    """

    def __init__(self, ds: Any, transform: Any, num_channels: int, seed: int) -> None:
        self.ds = ds
        self.transform = transform
        self.mode = "L" if num_channels == 1 else "RGB"
        self.num_channels = num_channels
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        row = self.ds[index]
        entry = row["image"]
        try:
            image = open_image(entry).convert(self.mode)
        except (OSError, ValueError, SyntaxError) as exc:
            where = entry.get("path") if isinstance(entry, dict) else f"row {index}"
            logger.warning("skipping unreadable image %s (%s: %s); it is left out of the loss "
                           "and the metrics", where or f"row {index}", type(exc).__name__, exc)
            size = self.transform_size()
            return {"pixel_values": torch.zeros(self.num_channels, size, size),
                    "labels": IGNORE_INDEX}
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a CUDA seeding call
            torch.default_generator.manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(row["label"])}

    def transform_size(self) -> int:
        for op in getattr(self.transform, "transforms", []):
            size = getattr(op, "size", None)
            if size:
                return int(size[0] if isinstance(size, (list, tuple)) else size)
        return 1


def open_image(entry: Any) -> Any:
    """A PIL image from a `datasets` Image entry (path and/or bytes), fully decoded."""
    import io

    from PIL import Image

    if isinstance(entry, Image.Image):
        return entry
    if entry.get("bytes") is not None:
        image = Image.open(io.BytesIO(entry["bytes"]))
    elif entry.get("path"):
        image = Image.open(entry["path"])
    else:
        raise ValueError("empty image entry")
    image.load()  # decode now: a truncated file fails here, not later in the transform
    return image


def make_loaders(cfg: Config, train: Any, evals: Any, num_channels: int, batch_size: int,
                 pin_memory: bool) -> tuple[Any, Any]:
    """Train and eval DataLoaders (sharded over ranks later by prepare)."""
    from torch.utils.data import DataLoader

    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        evals = evals.select(range(min(cfg.max_eval_samples, len(evals))))
    train_ds = ImageDataset(train, build_transforms(cfg, train=True), num_channels, cfg.seed)
    eval_ds = ImageDataset(evals, build_transforms(cfg, train=False), num_channels, cfg.seed)
    common = {"num_workers": cfg.num_workers, "pin_memory": pin_memory}
    if cfg.num_workers > 0:
        common["prefetch_factor"] = 4
    # drop_last: every step sees a full batch on every rank (the steps per epoch are known).
    train_dl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True,
                          **common)
    eval_dl = DataLoader(eval_ds, batch_size=batch_size, shuffle=False, **common)
    if len(train_dl) == 0:
        raise ConfigError(f"The training set ({len(train_ds)} images) is smaller than one "
                          f"per-process batch ({batch_size}). Lower --batch_size.")
    return train_dl, eval_dl


def class_names(ds: Any) -> list[str]:
    return list(ds.features["label"].names)


# =============================================================================================
# Learning rate: linear warm-up from lr_start, cosine decay to min_lr (the paper's schedule)
# =============================================================================================

def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: Config) -> float:
    """The scheduled learning rate of optimizer step ``step`` (AB's LR rebound multiplies it)."""
    if step < warmup_steps:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and conv kernels, none on biases and norms (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# =============================================================================================
# AB-training helpers
# =============================================================================================

def deepspeed_launch() -> bool:
    """True under `accelerate launch --use_deepspeed` (or a DeepSpeed accelerate config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_ab_block() -> dict[str, Any] | None:
    """The top-level "ab_training" block of the DeepSpeed JSON this run was launched with."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not deepspeed_launch() or not path or not os.path.exists(path):
        return None
    from ab_accel import ABConfig, ABConfigError

    try:
        config = ABConfig.from_deepspeed_config(path)
    except ABConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config is None:
        return None
    logging.getLogger("recipes").info(
        'AB-training schedule: the "ab_training" key of the DeepSpeed JSON %s', path)
    return config.to_dict()


def ab_config(cfg: Config, world_size: int, from_scratch: bool) -> Any:
    """The ABConfig of this run (checked against the world size before any training).

    Launched with a DeepSpeed JSON that has a top-level "ab_training" key, that key is the
    schedule (it replaces the recipe config's ab_training block); otherwise the recipe's.
    """
    from ab_accel import ABConfig, ABConfigError

    from_json = deepspeed_ab_block()
    values = dict(cfg.ab_training) if from_json is None else from_json
    if values.get("group_size") == "world":
        values["group_size"] = world_size
    orthogonal = from_scratch if cfg.orthogonal_init == "auto" else bool(cfg.orthogonal_init)
    if from_json is not None:
        orthogonal = bool(from_json["orthogonal_init"]) or orthogonal
        values["enabled"] = bool(from_json["enabled"]) and not cfg.no_ab
        values["orthogonal_init"] = orthogonal
    else:
        values.update(enabled=not cfg.no_ab, orthogonal_init=orthogonal)
    try:
        config = ABConfig.from_dict(values)
        if config.enabled:
            config.resolve_group_size(world_size)
    except ABConfigError as exc:
        raise ConfigError(str(exc)) from None
    return config


def same_init_without_ab(model: Any, ab_cfg: Any) -> None:
    """--no-ab: give the plain model the initial weights the AB run starts from.

    With orthogonal_init the AB run sets the singular values of the factorizable layers to 1
    at conversion; the DP baseline gets the same (convert, then merge back to plain layers),
    so that the two runs differ only in AB-training.
    """
    import torch

    from ab_accel import ABConfig, convert, merge

    if ab_cfg.enabled or not ab_cfg.orthogonal_init:
        return
    with torch.random.fork_rng(devices=[]):  # merge builds new layers: keep the RNG stream
        merge(convert(model, ABConfig.from_dict({**ab_cfg.to_dict(), "enabled": True})))


def launched_world_size() -> int:
    """The number of processes the launcher started ($WORLD_SIZE; 1 for a plain python run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def find_ab_optimizer(optimizer: Any) -> Any:
    """The ABOptimizer inside a prepared optimizer (None for a plain DP run)."""
    from ab_accel.accelerate import ab_optimizer

    try:
        return ab_optimizer(optimizer)
    except TypeError:
        return None


class DDPTraffic:
    """What plain DDP really sends (the --no-ab baseline), counted on this rank.

    Gradients: a DDP comm hook that counts each bucket and then runs torch's own all-reduce
    hook. Buffers (BatchNorm statistics): DDP broadcasts them from rank 0 before a forward
    when ``will_sync_module_buffers()`` says so; a forward pre-hook asks the same question and
    counts their bytes. Wire bytes use the same ring estimate as
    ab_accel's meter (all-reduce 2(g-1)/g of the payload per rank, broadcast (g-1)/g).
    """

    def __init__(self, ddp_model: Any, world_size: int) -> None:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.world_size = world_size
        self.grad_bytes = 0
        self.buffer_bytes = 0
        self.calls = 0
        self._allreduce = default_hooks.allreduce_hook
        self._group = dist.group.WORLD
        ddp_model.register_comm_hook(self, DDPTraffic._hook)
        buffers = list(ddp_model.module.buffers())
        self._buffer_payload = sum(b.numel() * b.element_size() for b in buffers)
        if buffers:
            ddp_model.register_forward_pre_hook(self._count_buffers)

    @staticmethod
    def _hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        buf = bucket.buffer()
        state.grad_bytes += buf.numel() * buf.element_size()
        state.calls += 1
        return state._allreduce(state._group, bucket)

    def _count_buffers(self, module: Any, args: Any) -> None:
        # DDP's own test, just before its forward decides whether to broadcast the buffers.
        if module.will_sync_module_buffers():
            self.buffer_bytes += self._buffer_payload
            self.calls += 1

    @property
    def wire_bytes(self) -> float:
        from ab_accel.comm import wire_factor

        g = self.world_size
        return (self.grad_bytes * wire_factor("all_reduce", g)
                + self.buffer_bytes * wire_factor("broadcast", g))

    def summary(self) -> dict[str, Any]:
        return {"measured_by": "DDP comm hook (gradients) + buffer broadcasts",
                "bytes": self.grad_bytes + self.buffer_bytes, "wire_bytes": self.wire_bytes,
                "gradient_bytes": self.grad_bytes, "buffer_bytes": self.buffer_bytes,
                "calls": self.calls}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_bytes": self.grad_bytes, "buffer_bytes": self.buffer_bytes,
                "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_bytes = state["grad_bytes"]
        self.buffer_bytes = state["buffer_bytes"]
        self.calls = state["calls"]


def ranks_differ_now(ab_opt: Any) -> bool:
    """True when the groups hold different models: the last step was an AB step and no sync
    followed it (a run that stops mid-AB-phase)."""
    if ab_opt is None or ab_opt.world_size < 1 or ab_opt.world_size == 1:
        return False
    t = ab_opt.step_count
    schedule = ab_opt.schedule
    return t > 0 and schedule.phase(t - 1) == "ab" and "sync" not in schedule.events(t)


def final_sync(ab_opt: Any) -> str:
    """Make every rank hold the same model at the end of a run; returns what was done.

    A run that stops mid-AB-phase leaves the A-groups and B-groups with different factors; the
    export and the final evaluation need one model, so the optimizer runs its sync now
    (``ABOptimizer.sync_now``: the configured sync_mode, then W <- A B), counted by the meter
    as sync traffic. Anywhere else (warm-up, rebound, right after a factorization) the ranks
    already agree and nothing is sent.
    """
    if not ranks_differ_now(ab_opt):
        return "in sync"
    ab_opt.sync_now()
    return f"final sync ({ab_opt.config.sync_mode}): the run stopped mid-AB-phase"


# =============================================================================================
# Evaluation: top-1 / top-5 through `evaluate`, on every rank's shard, gathered
# =============================================================================================

def load_metric(accelerator: Any) -> Any:
    """The local top-k metric module (evaluate.load of a folder: no hub)."""
    import evaluate

    with accelerator.main_process_first():  # evaluate copies the module into its cache
        return evaluate.load(METRIC_DIR, keep_in_memory=True)


def evaluate_model(model: Any, loader: Any, accelerator: Any, metric: Any, num_labels: int
                   ) -> dict[str, float]:
    """Top-1 and top-5 over the whole eval set: each rank runs its shard, the predictions are
    gathered with gather_for_metrics (which drops the padding of the last batch)."""
    import torch

    k = min(5, num_labels)
    was_training = model.training
    model.eval()
    skipped = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            topk = logits.topk(k, dim=-1).indices
            preds, refs = accelerator.gather_for_metrics((topk, batch["labels"]))
            keep = refs != IGNORE_INDEX
            skipped += int((~keep).sum())
            metric.add_batch(predictions=preds[keep].cpu().tolist(),
                             references=refs[keep].cpu().tolist())
    result = metric.compute(k=k)
    model.train(was_training)
    return {"top1": result["top1"], "top5": result[f"top{k}"], "count": result["count"],
            "skipped": skipped}


# =============================================================================================
# Checkpoints: accelerator.save_state (every group's AB state) + the recipe's own counters
# =============================================================================================

def recipe_state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"recipe_state_rank{rank}.json")


def save_checkpoint(accelerator: Any, directory: str, state: dict[str, Any]) -> None:
    """save_state (collective) and this rank's recipe state (step, epoch, history)."""
    accelerator.save_state(directory)
    with open(recipe_state_path(directory, accelerator.process_index), "w") as fh:
        json.dump(state, fh)
    accelerator.wait_for_everyone()


def resolve_checkpoint(cfg: Config) -> str | None:
    path = cfg.resume_from_checkpoint
    if not path:
        return None
    if path == "latest":
        folder = os.path.join(cfg.output_dir, "checkpoints")
        steps = sorted((int(d.split("_")[-1]), d) for d in os.listdir(folder)
                       if d.startswith("step_")) if os.path.isdir(folder) else []
        if not steps:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {folder}.")
        path = os.path.join(folder, steps[-1][1])
    if not os.path.isdir(path):
        raise ConfigError(f"--resume_from_checkpoint {path!r} does not exist.")
    return path


def load_recipe_state(directory: str, rank: int) -> dict[str, Any]:
    path = recipe_state_path(directory, rank)
    if not os.path.exists(path):
        raise ConfigError(f"{directory!r} has no {os.path.basename(path)}: it was not written "
                          f"by this recipe with the same number of processes.")
    with open(path) as fh:
        return json.load(fh)


# =============================================================================================
# What a run writes down (checkpointed with it, so a resumed run has its whole history)
# =============================================================================================

class RunRecord:
    """Loss, learning rate, evaluations, bytes per step, phase switches and compression.

    Every rank keeps its own record (the bytes are per rank); the loss is averaged over the
    ranks every ``log_every`` steps (one 16-byte all-reduce: bookkeeping, not training
    traffic, so the AB meter does not count it).
    """

    def __init__(self, cfg: Config, accelerator: Any, ab_opt: Any, ddp_traffic: Any,
                 unwrapped: Any, total_steps: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.ab_opt = ab_opt
        self.ddp_traffic = ddp_traffic
        self.unwrapped = unwrapped
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.step = 0                 # optimizer steps taken
        self.epoch = 0                # current epoch
        self.batches_in_epoch = 0     # micro-batches of the current epoch already consumed
        self.elapsed = 0.0            # training seconds before this process started (resume)
        self.skipped = 0              # unreadable training images seen on this rank
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.switches: list[dict[str, Any]] = []
        self.cum_wire: list[float] = []
        self.cum_dp_wire: list[float] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._jsonl = os.path.join(cfg.output_dir, "metrics.jsonl")

    # ---------------------------------------------------------------- per step
    def phase_of(self, step: int) -> str:
        if self.ab_opt is None:
            return "dp"
        return self.ab_opt.schedule.phase(step)

    def add_loss(self, loss: float) -> None:
        self._loss_sum += loss
        self._loss_count += 1

    def after_step(self, lr: float, force_log: bool = False) -> dict[str, Any] | None:
        """Call after every optimizer step. Returns the log record when one was written."""
        self.step += 1
        if self.ab_opt is not None:
            meter = self.ab_opt.traffic
            self.cum_wire.append(meter.wire_bytes)
            self.cum_dp_wire.append(meter.dp_equivalent_wire_bytes)
            for event in self.ab_opt.schedule.events(self.step):
                record = {"step": self.step, "event": event}
                if event == "factorize":
                    from ab_accel import compression

                    comp = compression(self.unwrapped)
                    ranks = [v["rank"] for v in comp["layers"].values() if v["rank"]]
                    record.update(ratio=comp["ratio"], factorized_ratio=comp["factorized_ratio"],
                                  params_now=comp["params_now"],
                                  params_dense=comp["params_dense"],
                                  mean_rank=sum(ranks) / max(1, len(ranks)),
                                  ranks={k: v["rank"] for k, v in comp["layers"].items()})
                self.switches.append(record)
        elif self.ddp_traffic is not None:
            self.cum_wire.append(self.ddp_traffic.wire_bytes)
        if self.step % self.cfg.log_every and not force_log:
            return None
        return self.log_loss(lr)

    def log_loss(self, lr: float) -> dict[str, Any] | None:
        import torch

        totals = torch.tensor([self._loss_sum, float(self._loss_count)], dtype=torch.float64,
                              device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        self._loss_sum, self._loss_count = 0.0, 0
        if totals[1] == 0:
            return None
        record = {"step": self.step, "epoch": self.epoch, "loss": float(totals[0] / totals[1]),
                  "lr": lr, "phase": self.phase_of(self.step - 1)}
        self.train.append(record)
        self._emit(record, {"train/loss": record["loss"], "train/lr": lr})
        return record

    def log_eval(self, result: dict[str, Any], final: bool = False) -> dict[str, Any]:
        record = {"step": self.step, "epoch": self.epoch, "top1": result["top1"],
                  "top5": result["top5"], "count": result["count"],
                  "phase": self.phase_of(max(0, self.step - 1)),
                  "groups_differ": ranks_differ_now(self.ab_opt)}
        if final:
            record["final"] = True
        else:
            self.evals.append(record)
        prefix = "final" if final else "eval"
        self._emit(record, {f"{prefix}/top1": record["top1"], f"{prefix}/top5": record["top5"]})
        return record

    def _emit(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        if self.ab_opt is not None:
            scalars["traffic/wire_bytes_rank0"] = self.ab_opt.traffic.wire_bytes
        self.accelerator.log(scalars, step=self.step)
        if self.accelerator.is_main_process:
            with open(self._jsonl, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in (
            "step", "epoch", "batches_in_epoch", "skipped", "train", "evals", "switches",
            "cum_wire", "cum_dp_wire")}
        state["elapsed"] = self.elapsed
        if self.ddp_traffic is not None:
            state["ddp_traffic"] = self.ddp_traffic.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key == "ddp_traffic":
                if self.ddp_traffic is not None:
                    self.ddp_traffic.load_state_dict(value)
            else:
                setattr(self, key, value)
        if self.accelerator.is_main_process:  # the log stream restarts from the checkpoint
            with open(self._jsonl, "w") as fh:
                for record in self.train + self.evals:
                    fh.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- the end
    def bytes_per_step(self, all_cum: list[list[float]]) -> list[float]:
        """Mean over ranks of the wire bytes each step sent (switches included)."""
        per_rank = [[b - a for a, b in zip([0.0] + cum[:-1], cum, strict=True)]
                    for cum in all_cum]
        return [sum(col) / len(col) for col in zip(*per_rank, strict=True)] if per_rank else []

    def phases(self) -> list[tuple[str, int, int]]:
        if self.ab_opt is None:
            return [("dp", 0, self.step)]
        return self.ab_opt.schedule.describe(self.step)


# =============================================================================================
# The end of a run: merged export, summary, plot
# =============================================================================================

def export_merged(model: Any, out_dir: str, probe: Any, cfg: Config, accelerator: Any
                  ) -> dict[str, Any]:
    """Merge the AB layers into dense ones (every rank: they hold the same model now), check
    the merged model gives the AB model's logits on a probe batch, save_pretrained (main).

    Returns the check: max |logits difference| and the probe's size. The probe images and the
    AB model's logits are saved beside the model (``export_check.pt``) so that anyone can load
    the export with plain transformers and compare.
    """
    import torch

    from ab_accel import merge

    model.eval()
    with torch.no_grad():
        before = model(pixel_values=probe).logits.float()
    merge(model)
    with torch.no_grad():
        after = model(pixel_values=probe).logits.float()
    diff = float((before - after).abs().max())
    if accelerator.is_main_process and cfg.save_model:
        model.save_pretrained(out_dir, safe_serialization=True)
        torch.save({"pixel_values": probe.cpu(), "logits": before.cpu()},
                   os.path.join(os.path.dirname(out_dir), "export_check.pt"))
        _save_image_processor(out_dir, cfg)
    accelerator.wait_for_everyone()
    return {"dir": out_dir if cfg.save_model else None, "probe_images": int(probe.shape[0]),
            "max_abs_logit_diff_ab_vs_merged": diff}


def _save_image_processor(out_dir: str, cfg: Config) -> None:
    """An image processor beside the model, so pipeline("image-classification") works."""
    from transformers import ViTImageProcessor

    size = cfg.image_size
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=cfg.image_mean,
                      image_std=cfg.image_std).save_pretrained(out_dir)


def finish(cfg: Config, accelerator: Any, model: Any, ab_opt: Any, record: RunRecord,
           eval_dl: Any, metric: Any, labels: list[str], data_desc: str, recipe: str,
           started: float) -> dict[str, Any]:
    """The end of a run: one model on every rank (final sync), merged export checked against
    the AB model, final evaluation of the export, summary.json and the plot (main process)."""
    import torch
    from accelerate.utils import gather_object

    from ab_accel import compression
    from ab_accel.model import ab_layers

    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    layer_ranks = {name: layer.rank for name, layer in ab_layers(unwrapped)}
    how = final_sync(ab_opt)
    comp_now = compression(unwrapped) if ab_opt is not None else None
    eval_ds = eval_dl.dataset
    probe = torch.stack([eval_ds[i]["pixel_values"] for i in range(min(8, len(eval_ds)))])
    export = export_merged(unwrapped, os.path.join(cfg.output_dir, "model"),
                           probe.to(accelerator.device), cfg, accelerator)
    export["final_sync"] = how
    final = evaluate_model(unwrapped, eval_dl, accelerator, metric, len(labels))
    record.log_eval(final, final=True)

    if ab_opt is not None:
        traffic = ab_opt.traffic.summary()
    elif record.ddp_traffic is not None:
        traffic = record.ddp_traffic.summary()
    else:
        traffic = {"bytes": 0, "wire_bytes": 0.0, "measured_by": "single process: none"}
    gathered = gather_object([{"traffic": traffic, "cum_wire": record.cum_wire,
                                           "cum_dp_wire": record.cum_dp_wire,
                                           "skipped": record.skipped}])
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        summary = _summary(cfg, accelerator, ab_opt, record, gathered, final, export, comp_now,
                           layer_ranks, data_desc, recipe, started)
        baseline = read_baseline(cfg.baseline_run)
        if baseline:
            summary["baseline"] = _baseline(summary, baseline)
        summary["plot"] = plot_run(summary, os.path.join(cfg.output_dir, "plot.png"), baseline)
        write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
        _print_summary(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _summary(cfg: Config, accelerator: Any, ab_opt: Any, record: RunRecord,
             gathered: list[dict[str, Any]], final: dict[str, Any], export: dict[str, Any],
             comp_now: dict[str, Any] | None, layer_ranks: dict[str, Any], data_desc: str,
             recipe: str, started: float) -> dict[str, Any]:
    traffic = traffic_totals([g["traffic"] for g in gathered])
    factorizations = [s for s in record.switches if s["event"] == "factorize"]
    last = factorizations[-1] if factorizations else None
    summary: dict[str, Any] = {
        "recipe": recipe,
        "data": data_desc,
        "data_short": ("digits" if not (cfg.data_dir or cfg.dataset_name)
                       else os.path.basename(os.path.normpath(cfg.data_dir))
                       if cfg.data_dir else cfg.dataset_name),
        "ab": ab_opt is not None,
        "ranks": accelerator.num_processes,
        "steps": record.step,
        "epochs": record.step / record.steps_per_epoch,
        "accuracy": {"top1": final["top1"], "top5": final["top5"], "count": final["count"],
                     "of": "the exported (merged) model",
                     "best_epoch_top1": max((e["top1"] for e in record.evals), default=None)},
        "traffic": traffic,
        "wall_time_s": now() - started,
        "train_time_s": record.elapsed,
        "skipped_images": {"train": sum(g["skipped"] for g in gathered),
                           "eval": final["skipped"]},
        "export": export,
        "phases": record.phases(),
        "sync_steps": [s["step"] for s in record.switches if s["event"] == "sync"],
        "switches": record.switches,
        "bytes_per_step": {"wire": record.bytes_per_step([g["cum_wire"] for g in gathered])},
        "history": {"train": record.train, "eval": record.evals},
        "config": dict(cfg),
    }
    if ab_opt is not None:
        plan = ab_opt.groups.plan
        summary.update(
            ab_config=ab_opt.config.to_dict(), group_size=plan.group_size,
            groups=[list(g) for g in plan.groups], roles=list(plan.roles))
        summary["bytes_per_step"]["dp_equivalent_wire"] = record.bytes_per_step(
            [g["cum_dp_wire"] for g in gathered])
        summary["compression"] = {
            "ratio": last["ratio"] if last else 1.0,
            "factorized_ratio": last["factorized_ratio"] if last else 1.0,
            "params_dense": last["params_dense"] if last else None,
            "params_ab": last["params_now"] if last else None,
            "of": f"the model after the last factorization (step {last['step']})" if last
            else "no factorization happened",
            "at_end": {k: comp_now[k] for k in ("ratio", "factorized_ratio")} if comp_now
            else None,
            "per_factorization": [{k: s[k] for k in ("step", "ratio", "factorized_ratio",
                                                     "mean_rank")} for s in factorizations],
        }
        summary["layer_ranks"] = last.get("ranks", {}) if last else {}
        summary["layer_ranks_at_end"] = layer_ranks
    return summary


def _baseline(summary: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    out = {"top1": baseline["accuracy"]["top1"], "top5": baseline["accuracy"]["top5"],
           "wire_bytes": baseline["traffic"]["wire_bytes"], "steps": baseline["steps"],
           "ranks": baseline["ranks"]}
    if baseline["steps"] == summary["steps"] and baseline["ranks"] == summary["ranks"] \
            and baseline["traffic"]["wire_bytes"]:
        out["measured_reduction"] = 1.0 - summary["traffic"]["wire_bytes"] / \
            baseline["traffic"]["wire_bytes"]
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    acc = summary["accuracy"]
    t = summary["traffic"]
    lines = [f"== {summary['recipe']} on {summary['data_short']}: {summary['ranks']} ranks, "
             f"{summary['steps']} steps, {summary['wall_time_s']:.0f} s",
             f"   accuracy (exported merged model): top-1 {acc['top1']:.4f}, "
             f"top-5 {acc['top5']:.4f}",
             f"   traffic: {t['wire_bytes'] / 2**20:.2f} MiB sent over the wire (all ranks)"]
    if "reduction_vs_dp" in t:
        lines[-1] += (f", DP would send {t['dp_equivalent_wire_bytes'] / 2**20:.2f} MiB: "
                      f"{100 * t['reduction_vs_dp']:.1f}% less")
    if "compression" in summary:
        c = summary["compression"]
        lines.append(f"   compression: {c['factorized_ratio']:.2f}:1 on the factorized layers, "
                     f"{c['ratio']:.2f}:1 on the whole model ({c['of']})")
    if "baseline" in summary:
        b = summary["baseline"]
        line = f"   DP baseline run: top-1 {b['top1']:.4f}"
        if "measured_reduction" in b:
            line += f", measured traffic {100 * b['measured_reduction']:.1f}% below it"
        lines.append(line)
    lines.append(f"   export: {summary['export']['dir']} (max |logit diff| AB vs merged "
                 f"{summary['export']['max_abs_logit_diff_ab_vs_merged']:.2e}, "
                 f"{summary['export']['final_sync']})")
    print("\n".join(lines), flush=True)


def traffic_totals(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The world's traffic from every rank's meter summary."""
    wire = sum(s["wire_bytes"] for s in per_rank)
    dp = sum(s.get("dp_equivalent_wire_bytes", 0.0) for s in per_rank)
    by_phase: dict[str, float] = {}
    for s in per_rank:
        for phase, value in s.get("wire_bytes_by_phase", {}).items():
            by_phase[phase] = by_phase.get(phase, 0.0) + value
    out = {"wire_bytes": wire, "bytes": sum(s["bytes"] for s in per_rank),
           "wire_bytes_by_phase": by_phase, "per_rank": per_rank}
    if dp:
        out["dp_equivalent_wire_bytes"] = dp
        out["reduction_vs_dp"] = 1.0 - wire / dp
    return out


def write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_baseline(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    file = path if path.endswith(".json") else os.path.join(path, "summary.json")
    if not os.path.exists(file):
        raise ConfigError(f"--baseline_run {path!r}: no summary.json there (run the --no-ab "
                          f"recipe with that --output_dir first).")
    with open(file) as fh:
        return json.load(fh)


PHASE_COLORS = {"warmup": "#d9d9d9", "ab": "#cfe3f7", "rebound": "#fde0c2", "dp": "#ffffff"}
PHASE_LABELS = {"warmup": "warm-up (DP)", "ab": "AB phase (groups)",
                "rebound": "full-rank rebound (DP)"}


def plot_run(summary: dict[str, Any], path: str, baseline: dict[str, Any] | None = None) -> str:
    """Loss and accuracy against step with the phases shaded, and bytes per step AB vs DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    hist = summary["history"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True,
                             gridspec_kw={"height_ratios": [3, 3, 2.4]})
    ax_loss, ax_acc, ax_bytes = axes
    spans = summary.get("phases", [])
    for ax in axes:
        for phase, first, end in spans:
            ax.axvspan(first, end, color=PHASE_COLORS.get(phase, "#ffffff"), lw=0, zorder=0)
        for sync_step in summary.get("sync_steps", []):
            ax.axvline(sync_step, color="#4a4a4a", lw=0.8, ls=":", zorder=1)
        ax.grid(True, alpha=0.3, zorder=1)
    name = "AB" if summary.get("ab") else "DP"

    train = hist["train"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="#1f4e9c",
                 lw=1.6, label=f"{name} train loss", zorder=3)
    if baseline:
        bt = baseline["history"]["train"]
        ax_loss.plot([r["step"] for r in bt], [r["loss"] for r in bt], color="#b5442b", lw=1.2,
                     ls="--", label="DP (--no-ab) train loss", zorder=2)
    ax_loss.set_ylabel("train loss\n(label-smoothed CE)")

    ev = hist["eval"]
    steps = [r["step"] for r in ev]
    ax_acc.plot(steps, [100 * r["top1"] for r in ev], "o-", color="#1f4e9c", lw=1.6,
                label=f"{name} top-1", zorder=3)
    ax_acc.plot(steps, [100 * r["top5"] for r in ev], "s:", color="#1f4e9c", lw=1.0, ms=4,
                alpha=0.8, label=f"{name} top-5", zorder=3)
    final = summary.get("accuracy", {})
    if "top1" in final:
        ax_acc.plot([summary["steps"]], [100 * final["top1"]], marker="*", ms=14,
                    color="#1f4e9c", ls="none", label="exported (merged) model top-1",
                    zorder=4)
    if baseline:
        bev = baseline["history"]["eval"]
        ax_acc.plot([r["step"] for r in bev], [100 * r["top1"] for r in bev], "o--",
                    color="#b5442b", lw=1.2, ms=4, label="DP top-1", zorder=2)
    ax_acc.set_ylabel("eval accuracy (%)")

    per_step = summary.get("bytes_per_step", {})
    series = [per_step.get("wire", []), per_step.get("dp_equivalent_wire", [])]
    if baseline:
        series.append(baseline.get("bytes_per_step", {}).get("wire", []))
    unit, scale = _byte_unit(max((max(v) for v in series if v), default=1.0))
    if per_step.get("dp_equivalent_wire"):
        dp = per_step["dp_equivalent_wire"]
        ax_bytes.step(range(1, len(dp) + 1), [v / scale for v in dp], where="pre",
                      color="#e8a090", lw=4.5, alpha=0.8, label="DP, same steps: exact count",
                      zorder=2)
    if baseline and baseline.get("bytes_per_step", {}).get("wire"):
        bw = baseline["bytes_per_step"]["wire"]
        ax_bytes.plot(range(1, len(bw) + 1), [v / scale for v in bw], ls="none", marker=".",
                      ms=3, color="#7a1f0e", markevery=max(1, len(bw) // 60),
                      label="DP --no-ab run: measured (DDP comm hook)", zorder=5)
    wire = per_step.get("wire", [])
    if wire:
        ax_bytes.step(range(1, len(wire) + 1), [v / scale for v in wire], where="pre",
                      color="#1f4e9c", lw=1.4, label=f"{name}: measured (ab_accel meter)",
                      zorder=4)
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.set_ylabel(f"{unit} sent per step\n(mean over ranks)")
    ax_bytes.set_xlabel("optimizer step")
    traffic = summary.get("traffic", {})
    if traffic.get("dp_equivalent_wire_bytes"):
        total_unit, total_scale = _byte_unit(traffic["dp_equivalent_wire_bytes"])
        ax_bytes.text(0.01, 0.04, f"all ranks, whole run: {name} "
                      f"{traffic['wire_bytes'] / total_scale:.1f} {total_unit}, DP "
                      f"{traffic['dp_equivalent_wire_bytes'] / total_scale:.1f} {total_unit} "
                      f"({100 * traffic['reduction_vs_dp']:.0f}% less)",
                      transform=ax_bytes.transAxes, fontsize=8.5,
                      bbox={"facecolor": "white", "alpha": 0.85, "lw": 0})

    handles = [Patch(color=PHASE_COLORS[p], label=PHASE_LABELS[p])
               for p in ("warmup", "ab", "rebound") if any(s[0] == p for s in spans)]
    if summary.get("sync_steps"):
        handles.append(plt.Line2D([], [], color="#4a4a4a", lw=0.8, ls=":", label="sync"))
    for ax in axes:
        h, labels = ax.get_legend_handles_labels()
        ax.legend(h + (handles if ax is ax_loss else []), labels + (
            [p.get_label() for p in handles] if ax is ax_loss else []),
            loc="upper right" if ax is ax_loss else "lower right", fontsize=8, framealpha=0.9)
    ax_bytes.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(_title(summary), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def _title(summary: dict[str, Any]) -> str:
    acc = summary.get("accuracy", {})
    recipe = {"vit": "ViT", "resnet": "ResNet"}.get(summary["recipe"], summary["recipe"])
    parts = [f"{recipe} on {summary['data_short']}, {summary['ranks']} ranks, "
             f"{summary['steps']} steps"]
    if summary.get("ab"):
        ab = summary["ab_config"]
        parts.append(f"AB ({ab['sync_mode']}, group size {summary['group_size']})")
    else:
        parts.append("plain DP (--no-ab)")
    line2 = []
    if "top1" in acc:
        line2.append(f"top-1 {100 * acc['top1']:.1f}%  top-5 {100 * acc['top5']:.1f}%")
    red = summary.get("traffic", {}).get("reduction_vs_dp")
    if red is not None:
        line2.append(f"traffic {100 * red:.0f}% below DP")
    comp = summary.get("compression", {})
    if comp.get("factorized_ratio"):
        line2.append(f"compression {comp['factorized_ratio']:.2f}:1 (factorized layers)")
    return ", ".join(parts) + "\n" + ",  ".join(line2)


def now() -> float:
    return time.time()
