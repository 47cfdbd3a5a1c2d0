"""The DeepSpeed JSON and AB-training: where ``"ab_training"`` sits, and what it refuses.

Pure checks of a config dict (no DeepSpeed import): :func:`check_config` runs before any engine
exists, from every front end that can run DeepSpeed (:func:`ab_accel.deepspeed.initialize`,
``ab_accel.prepare`` under Accelerate's DeepSpeed plugin, the ``ABTrainer`` with
``--deepspeed``). The runtime twin for a built engine is :func:`ab_accel.engine.check_engine`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import support
from .config import DEEPSPEED_KEY, ABConfig, ABConfigError, load_deepspeed_json

#: Optimizer types of a JSON "optimizer" block that tag every parameter at construction (Muon's
#: ``use_muon``, mup's ``infshape``): see support.UNSUPPORTED["tagging_optimizer"].
_TAGGING_OPTIMIZERS = ("muon", "muadam", "muadamw", "musgd")

#: DeepSpeed settings a user may put inside "ab_training" by mistake: where they belong.
_DEEPSPEED_KEYS = {
    "train_batch_size": "the top level", "train_micro_batch_size_per_gpu": "the top level",
    "gradient_accumulation_steps": "the top level", "gradient_clipping": "the top level",
    "steps_per_print": "the top level", "wall_clock_breakdown": "the top level",
    "optimizer": "the top level", "scheduler": "the top level", "fp16": "the top level",
    "bf16": "the top level", "torch_autocast": "the top level",
    "zero_optimization": "the top level", "communication_data_type": "the top level",
    "prescale_gradients": "the top level", "gradient_predivide_factor": "the top level",
    "stage": '"zero_optimization"', "offload_optimizer": '"zero_optimization"',
    "offload_param": '"zero_optimization"', "reduce_bucket_size": '"zero_optimization"',
    "allgather_bucket_size": '"zero_optimization"', "overlap_comm": '"zero_optimization"',
    "contiguous_gradients": '"zero_optimization"', "lr": '"optimizer"."params"',
    "betas": '"optimizer"."params"', "eps": '"optimizer"."params"',
    "weight_decay": '"optimizer"."params"', "warmup_num_steps": '"scheduler"."params"',
    "warmup_max_lr": '"scheduler"."params"', "warmup_min_lr": '"scheduler"."params"',
    "dtype": '"torch_autocast"',
}


# ---------------------------------------------------------------------------------------- config
def load_ds_config(config: Mapping[str, Any] | str | os.PathLike | None = None,
                   args: Any = None, config_params: Any = None) -> dict[str, Any]:
    """The DeepSpeed config as a dict, found where ``deepspeed.initialize`` looks for it: the
    ``config`` argument (dict or JSON path), ``config_params``, or ``args.deepspeed_config``."""
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass config=<dict or JSON path> or "
                         "args.deepspeed_config (the --deepspeed_config flag).")
    if isinstance(config, Mapping):
        return dict(config)
    return load_deepspeed_json(config)


def read_config(ds_config: Mapping[str, Any] | str | os.PathLike) -> ABConfig | None:
    """The :class:`ABConfig` of a DeepSpeed config (None without the key), after
    :func:`check_config`."""
    ds = load_ds_config(ds_config)
    check_config(ds)
    return ABConfig.from_deepspeed_config(ds)


def check_config(ds_config: Mapping[str, Any] | str | os.PathLike) -> None:
    """Raise a clear error for a DeepSpeed config that AB-training cannot run correctly.

    Always checked: ``"ab_training"`` sits at the top level (DeepSpeed's own blocks reject
    unknown keys) and holds only ABConfig fields (a DeepSpeed setting put inside it gets a
    message that says where it belongs). When the key is present and enabled, also: ZeRO stage
    0, 1 or 2 (not 3); no ``fp16`` (a loss scaler) and no float16 ``torch_autocast``; ``bf16``
    only with ZeRO 1 or 2 (at stage 0 DeepSpeed's bf16 optimizer flattens the parameters);
    ``torch_autocast`` only at stage 0; no optimizer type that tags parameters at construction;
    and, at stage 0, no setting of DeepSpeed's own gradient all-reduce (which the AB reduction
    replaces; under ZeRO ``communication_data_type`` is DeepSpeed's and stays). ``"auto"``
    values are checked on the engine built from them. Raises
    :class:`~ab_accel.ABConfigError`; returns None when fine.
    """
    ds = load_ds_config(ds_config)
    block = ds.get(DEEPSPEED_KEY)
    if isinstance(block, Mapping):
        for key in block:
            if key in _DEEPSPEED_KEYS and key not in ABConfig.__dataclass_fields__:
                where = _DEEPSPEED_KEYS[key]
                raise ABConfigError(
                    f'"{key}" is a DeepSpeed setting, not an AB-training one: move it out of '
                    f'"{DEEPSPEED_KEY}" to {where} of the DeepSpeed JSON. "{DEEPSPEED_KEY}" takes '
                    f"only: {', '.join(ABConfig.__dataclass_fields__)}."
                )
    # Misplaced key (inside a DeepSpeed block), unknown keys, out-of-range values.
    cfg = ABConfig.from_deepspeed_config(ds)
    if cfg is None or not cfg.enabled:
        return
    problems = _incompatible_settings(ds)
    if problems:
        support.refuse(problems, f'this DeepSpeed config ("{DEEPSPEED_KEY}" is enabled)',
                       hint=f'Or set "{DEEPSPEED_KEY}": {{"enabled": false}} to train with plain '
                            "DeepSpeed.")


def zero_stage(ds: Mapping[str, Any]) -> int:
    """The config's ZeRO stage (0 when absent; -1 when it is not a number)."""
    zero = ds.get("zero_optimization") or {}
    try:
        return int(zero.get("stage", 0) if isinstance(zero, Mapping) else 0)
    except (TypeError, ValueError):
        return -1


def _switch(block: Any) -> bool | str:
    """The "enabled" of a DeepSpeed block: True, False, or "auto" (filled in later by the HF
    integrations from their own flags, so not known here)."""
    if isinstance(block, Mapping):
        value = block.get("enabled", False)
        if isinstance(value, str):
            return "auto" if value.lower() == "auto" else value.lower() == "true"
        return value is True
    return False


def _incompatible_settings(ds: Mapping[str, Any]) -> list[str]:
    """One line of support.problem per refused setting of a DeepSpeed config."""
    ds_ = support.DEEPSPEED
    problems: list[str] = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    stage_num = zero_stage(ds)
    zero_1_2 = stage_num in (1, 2)
    if stage_num not in (0, 1, 2):
        problems.append(support.problem(
            "zero", f'"zero_optimization": {{"stage": {stage!r}}}', ds_))
    # "auto" (filled in later by Accelerate or the Trainer from their own flags) is checked on
    # the engine they build (ab_accel.engine.check_engine), before the first step.
    if _switch(ds.get("fp16")) is True:
        problems.append(support.problem("fp16", '"fp16": {"enabled": true} (a loss scaler)', ds_))
    for key in ("bf16", "bfloat16"):
        if _switch(ds.get(key)) is True and not zero_1_2:
            problems.append(support.problem(
                "flat_optimizer", f'"{key}": {{"enabled": true}} at ZeRO stage {stage!r}', ds_))
    autocast = ds.get("torch_autocast")
    if _switch(autocast):
        dtype = str(autocast.get("dtype", "bfloat16")).lower().replace("torch.", "")
        if dtype in ("float16", "fp16", "half"):
            problems.append(support.problem(
                "fp16", f'"torch_autocast": {{"dtype": "{autocast.get("dtype")}"}} (float16 '
                f"autocast runs a loss scaler)", ds_))
        elif zero_1_2:
            problems.append(support.problem(
                "autocast_zero", f'"torch_autocast" with ZeRO stage {stage_num}', ds_))
    optimizer = ds.get("optimizer")
    if isinstance(optimizer, Mapping):
        kind = str(optimizer.get("type", "")).lower()
        if kind in _TAGGING_OPTIMIZERS:
            problems.append(support.problem(
                "tagging_optimizer", f'"optimizer": {{"type": "{optimizer.get("type")}"}}', ds_))
    touched = []
    if ds.get("communication_data_type") is not None and not zero_1_2:
        touched.append(f'"communication_data_type": {ds["communication_data_type"]!r}')
    if ds.get("prescale_gradients") is True:
        touched.append('"prescale_gradients": true')
    predivide = ds.get("gradient_predivide_factor")
    if predivide is not None and float(predivide) != 1.0:
        touched.append(f'"gradient_predivide_factor": {predivide!r}')
    problems += [support.problem("deepspeed_allreduce", t, ds_) for t in touched]
    tp = ds.get("tensor_parallel") or {}
    if isinstance(tp, Mapping) and int(tp.get("autotp_size", 0) or 0) > 1:
        problems.append(support.problem(
            "model_parallel", f'"tensor_parallel": {{"autotp_size": {tp["autotp_size"]}}}', ds_))
    sp = ds.get("sequence_parallel_size")
    if sp is not None and int(sp) > 1:
        problems.append(support.problem("model_parallel", f'"sequence_parallel_size": {sp}', ds_))
    compile_cfg = ds.get("compile") or {}
    if isinstance(compile_cfg, Mapping) and compile_cfg.get("deepcompile"):
        problems.append(support.problem("compile", '"compile": {"deepcompile": true}', ds_))
    return problems


__all__ = ["load_ds_config", "read_config", "check_config", "zero_stage"]
