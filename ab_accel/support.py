"""What AB-training cannot run, why, and what to use instead: the one table of refused setups.

Every integration (:mod:`ab_accel.accelerate`, :mod:`ab_accel.deepspeed`, :mod:`ab_accel.trainer`)
and the recipes probe their own framework for these setups and refuse them through this table,
before the model or the optimizer is touched, so a user meets the same reason and a fix phrased
in the knobs of the tool they use.

The reasons come down to three facts of AB-training (arXiv 2405.01067):

* in an AB phase the A-groups and the B-groups hold *different* parameters (different factors,
  different optimizer state), so nothing may shard or average state over the whole world;
* every switch re-creates tensors with *new shapes* (W -> A, B -> W), so nothing may hold the
  parameters in buffers or graphs built once;
* the groups follow one schedule in lockstep, so nothing may skip a step on one group only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from .config import ABConfigError

#: Frontends a fix can be phrased for.
ACCELERATE, DEEPSPEED, TRAINER = "accelerate", "deepspeed", "trainer"

_USE_DDP = ("use plain data parallel (`accelerate launch --multi_gpu --num_processes N`; "
            "ab_accel takes the gradient reduction over from DDP)")
_BF16_AUTOCAST_DS = ('"torch_autocast": {"enabled": true, "dtype": "bfloat16"} (bf16 compute, '
                     'fp32 weights and gradients, no flat buffers)')


class UnsupportedSetupError(ABConfigError, NotImplementedError):
    """A setup AB-training cannot run. The message names the setting and what to use instead.

    Both an :class:`~ab_accel.ABConfigError` (a setting to change) and a NotImplementedError
    (what Accelerate integrations raise for unsupported features)."""


@dataclass(frozen=True)
class Unsupported:
    """One refused setup: what it is, why AB-training cannot run it, and the fix."""

    what: str
    reason: str
    fix: str
    #: The fix in the words of one frontend, where it differs from ``fix``.
    fixes: Mapping[str, str] = field(default_factory=dict)

    def fix_for(self, frontend: str | None) -> str:
        return self.fixes.get(frontend or "", self.fix)


UNSUPPORTED: dict[str, Unsupported] = {
    "fsdp": Unsupported(
        "FSDP",
        "FSDP shards every parameter over the whole world, while AB-training trains different, "
        "shape-changing factors in different groups.",
        f"Instead {_USE_DDP}, or DeepSpeed ZeRO stage 0, 1 or 2 through ab_accel.deepspeed."),
    "megatron": Unsupported(
        "Megatron-LM",
        "its tensor/pipeline parallel layers are not nn.Linear layers ab_accel can factorize, "
        "and it owns the gradient reduction.",
        f"Instead {_USE_DDP}."),
    "xla": Unsupported(
        "XLA/TPU",
        "AB-training reduces through torch.distributed process groups built per A-group and "
        "B-group, which XLA does not run.",
        "Train on GPUs or CPUs with `accelerate launch --multi_gpu`."),
    "model_parallel": Unsupported(
        "tensor, context, sequence or pipeline parallelism",
        "AB-training runs over a pure data-parallel world: model parallelism splits the very "
        "weights it factorizes, and its groups split the data-parallel ranks.",
        "Leave the model unsplit (data parallel only).",
        {ACCELERATE: "Leave parallelism_config unset (or data-parallel sizes only).",
         DEEPSPEED: 'Remove "tensor_parallel" / "sequence_parallel_size" and any '
                    "PipelineModule."}),
    "moe": Unsupported(
        "mixture-of-experts layers",
        "their experts are reduced over expert-parallel groups, while AB-training runs over a "
        "pure data-parallel world.",
        "Train a dense model, or leave AB-training off for this one."),
    "fp8": Unsupported(
        "fp8 training",
        "the fp8 backends replace nn.Linear by their own layers, which ab_accel cannot factorize.",
        "Use mixed_precision='bf16'.",
        {DEEPSPEED: f"Use {_BF16_AUTOCAST_DS}."}),
    "fp16": Unsupported(
        "fp16 mixed precision",
        "its loss scaler decides to skip a step on each rank's own gradients, and in an AB "
        "phase the groups see different gradients: one group would skip a step that another "
        "takes, and they would fall out of their common schedule.",
        "Use mixed_precision='bf16' (no loss scaling) or 'no'.",
        {DEEPSPEED: 'Use "dtype": "bfloat16" (no loss scaler).',
         TRAINER: "Use bf16=True (no loss scaler)."}),
    "flat_optimizer": Unsupported(
        "DeepSpeed's bf16 optimizer at ZeRO stage 0",
        "at stage 0 it flattens the parameters into fixed buffers built once, which cannot "
        "follow factors that are re-created with new shapes (under ZeRO 1/2 AB-training "
        "rebuilds DeepSpeed's optimizer at every switch).",
        'Add "zero_optimization": {"stage": 1} (or 2) to keep "bf16", or remove "bf16" and use '
        f"{_BF16_AUTOCAST_DS}.",
        {ACCELERATE: "Use --zero_stage 1 or 2 with --mixed_precision bf16.",
         TRAINER: 'Set "zero_optimization": {"stage": 1} (or 2) in the DeepSpeed JSON.'}),
    "zero": Unsupported(
        "ZeRO stage 3",
        "it partitions the parameters themselves over the whole data-parallel world and "
        "gathers them layer by layer, while in an AB phase the A-groups and B-groups hold "
        "different factors whose shapes change at every re-factorization.",
        'Use "zero_optimization": {"stage": 2} (or 1): under AB-training the optimizer state '
        "and gradients are partitioned over the ranks that hold the same factors.",
        {ACCELERATE: 'Use "zero_optimization": {"stage": 2} (accelerate: --zero_stage 2).'}),
    "autocast_zero": Unsupported(
        '"torch_autocast" together with ZeRO',
        "with ZeRO DeepSpeed's mixed precision is its \"bf16\" block (fp32 masters, bf16 "
        "weights); torch_autocast under ZeRO keeps fp32 weights and picks reduction dtypes per "
        "parameter, a combination AB-training's per-scope rebuild is not tested with.",
        'Use "bf16": {"enabled": true} with ZeRO (or torch_autocast at stage 0).'),
    "compile": Unsupported(
        "torch.compile / DeepCompile",
        "every phase switch replaces the AB layers' parameters (W by A and B and back), which "
        "invalidates a compiled graph, and DeepCompile reduces gradients inside the graph.",
        "Run eagerly.",
        {ACCELERATE: "Set dynamo_backend='no'.",
         DEEPSPEED: 'Remove "compile": {"deepcompile": true}.'}),
    "ddp_comm_hook": Unsupported(
        "a DDP communication hook",
        "it would never run: AB-training does the gradient reduction itself and keeps DDP's "
        "reducer off.",
        "Remove comm_hook (AB phases already cut traffic)."),
    "ddp_static_graph": Unsupported(
        "DDP static_graph",
        "the set of trained parameters changes at every phase switch.",
        "Remove static_graph."),
    "deepspeed_allreduce": Unsupported(
        "settings of DeepSpeed's gradient all-reduce",
        "at ZeRO stage 0 AB-training replaces that all-reduce by its group reduction (a plain "
        "mean), so they would be silently ignored; under ZeRO 1/2 DeepSpeed reduces, and "
        '"communication_data_type" is honoured, but prescaling and predivision are not tested '
        "with the per-scope rebuild.",
        'Remove the key (with ZeRO 1/2, "communication_data_type" may stay).'),
    "tagging_optimizer": Unsupported(
        "an optimizer that tags parameters at construction",
        "it reads attributes set on every parameter when the engine is built (Muon's use_muon, "
        "mup's infshape), but AB-training re-creates the factors A and B as new parameters at "
        "every switch.",
        'Use "AdamW" (the paper\'s optimizer), "Adam", "Adagrad" or a torch optimizer, in the '
        "JSON or passed as optimizer=."),
    "dummy_optim": Unsupported(
        "accelerate's DummyOptim (an \"optimizer\" block of the DeepSpeed config)",
        "ab_accel.prepare needs a torch optimizer it can wrap.",
        "Remove that block and build the optimizer in Python, e.g. torch.optim.AdamW(...)."),
    "auto_find_batch_size": Unsupported(
        "auto_find_batch_size=True",
        "it restarts training with a re-wrapped model and optimizer after an out-of-memory "
        "error, which would restart the AB schedule and groups half-way.",
        "Set per_device_train_batch_size yourself."),
}


def problem(key: str, setting: str | None = None, frontend: str | None = None) -> str:
    """One line: the setting as the user wrote it (or the entry's name), why, and the fix."""
    entry = UNSUPPORTED[key]
    return f"{setting or entry.what}: {entry.reason} {entry.fix_for(frontend)}"


def refuse(problems: str | Sequence[str], context: str = "this setup",
           hint: str | None = None) -> NoReturn:
    """Raise :class:`UnsupportedSetupError` for one or several lines of :func:`problem`."""
    lines = [problems] if isinstance(problems, str) else list(problems)
    if len(lines) == 1:
        text = f"AB-training cannot run {context} with {lines[0]}"
    else:
        text = f"AB-training cannot run {context}:\n" + "\n".join(f"  - {p}" for p in lines)
    raise UnsupportedSetupError(text + (f"\n{hint}" if hint else ""))


def check_mixed_precision(value: str | None, frontend: str = ACCELERATE) -> None:
    """Refuse fp16 (per-group loss scaling) and fp8 (layers ab_accel cannot factorize)."""
    name = str(value or "no").lower()
    if name in ("fp16", "float16", "half"):
        refuse(problem("fp16", f"mixed_precision={value!r}", frontend))
    if name == "fp8":
        refuse(problem("fp8", f"mixed_precision={value!r}", frontend))


__all__ = ["UNSUPPORTED", "Unsupported", "UnsupportedSetupError", "problem", "refuse",
           "check_mixed_precision", "ACCELERATE", "DEEPSPEED", "TRAINER"]
