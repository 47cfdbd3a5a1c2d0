"""The fine-tuning benchmark's knobs: the methods it compares and every setting of a run
(the full run's defaults, the ``--quick`` and ``--large`` presets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
#: The layers every method adapts (Llama's attention and MLP projections).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Folders of the standard library that hold tests: never in the pretraining corpus.
TEST_DIRS = {"test", "tests", "idle_test"}
MB = 1e6


class Method(str, Enum):
    """The fine-tuning methods the benchmark compares (their names in the results file)."""

    FULL = "full"
    AB_PAPER = "ab-paper"
    AB_ENERGY = "ab-energy"
    AB_LEAN = "ab-lean"
    AB_LEAN_ENERGY = "ab-lean-energy"
    LORA = "lora"
    GALORE = "galore"
    LORA_HALF = "lora-half"
    PISSA = "pissa"
    PISSA_HALF = "pissa-half"
    AB_RESIDUAL = "ab-residual"
    AB_RESIDUAL_DOUBLE = "ab-residual-double"
    AB_RESIDUAL_2LR = "ab-residual-2lr"

    def __str__(self) -> str:
        return self.value

    @property
    def is_ab(self) -> bool:
        return self.value.startswith("ab-")

    @property
    def is_adapter(self) -> bool:
        """A peft adapter (LoRA or PiSSA) on a frozen base."""
        return self in (Method.LORA, Method.LORA_HALF, Method.PISSA, Method.PISSA_HALF)

    def rank(self, s: Settings) -> int | None:
        """The adapter or AB rank of the fine-tuning-at-a-rank methods (None for the others):
        ``lora_r`` for lora, pissa and ab-residual (equal rank); half of it for lora-half and
        pissa-half, whose bytes per rank equal ab-residual's (each AB rank sends one of the two
        factors); twice it for ab-residual-double, whose bytes equal lora's."""
        return {Method.LORA: s.lora_r, Method.PISSA: s.lora_r, Method.AB_RESIDUAL: s.lora_r,
                Method.LORA_HALF: max(1, s.lora_r // 2), Method.PISSA_HALF: max(1, s.lora_r // 2),
                Method.AB_RESIDUAL_DOUBLE: 2 * s.lora_r, Method.AB_RESIDUAL_2LR: s.lora_r
                }.get(self)

    def lr(self, s: Settings) -> float:
        """The peak LR: ``lora_lr`` for the rank methods (ab-residual-2lr: twice it, which
        undoes with-stale's halving of each group's change at a sync), ``lr`` for the
        others."""
        if self == Method.AB_RESIDUAL_2LR:
            return 2 * s.lora_lr
        return s.lora_lr if self.rank(s) else s.lr

    def alpha(self, s: Settings) -> int:
        """An adapter's lora_alpha: the scale alpha / r of ``lora_alpha / lora_r`` at every
        rank."""
        return max(1, round(s.lora_alpha * self.rank(s) / s.lora_r))


def knob(default: Any, help: str) -> Any:
    """A dataclass field that carries its help text (as ABConfig's fields do)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, list)
                     else dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Every knob of the benchmark (the full run's defaults; ``--quick`` swaps in QUICK)."""

    methods: list[str] = knob([str(m) for m in Method], "Methods to run, in order: "
                              + ", ".join(str(m) for m in Method) + ".")
    seeds: list[int] = knob([0, 1, 2], "Seeds (LoRA init, data order); one world trains each.")
    nproc: int = knob(4, "Processes (gloo ranks) in the fine-tuning world.")
    steps: int = knob(200, "Fine-tuning optimizer steps.")
    batch_size: int = knob(4, "Windows per rank per step (global batch: x nproc).")
    seq_len: int = knob(128, "Bytes per window (the context length).")
    lr: float = knob(1e-3, "Peak LR of the full-rank methods (full, AB, GaLore): AdamW.")
    lora_lr: float = knob(3e-3, "Peak LR of the rank methods: LoRA, PiSSA and ab-residual "
                                "(LoRA's usual higher LR, see BENCHMARKS.md; one LR for all "
                                "three, so they differ only in what they train and send).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    lr_warmup_ratio: float = knob(0.05, "Linear LR warm-up share of the steps, then cosine.")
    max_grad_norm: float = knob(1.0, "Gradient clipping (of the reduced gradients).")
    eval_windows: int = knob(256, "Held-out windows of seq_len bytes (spread over the files).")
    heldout_every: int = knob(10, "One fine-tuning file in this many is held out (by hash).")
    hidden_size: int = knob(192, "Model width.")
    intermediate_size: int = knob(512, "MLP width.")
    num_layers: int = knob(4, "Decoder layers.")
    num_heads: int = knob(4, "Attention heads.")
    pretrain_steps: int = knob(800, "Pretraining optimizer steps (one process).")
    pretrain_batch_size: int = knob(8, "Pretraining windows per step.")
    pretrain_lr: float = knob(2e-3, "Pretraining peak LR (AdamW, cosine).")
    pretrain_threads: int = knob(1, "torch threads of the pretraining process (2 threads "
                                    "ran 3x slower than 1 on a loaded 2-core machine).")
    ab_energy: float = knob(0.99, "rank_energy of ab-energy and ab-lean-energy.")
    ab_fixed_rank: int = knob(32, "fixed_rank of ab-lean.")
    ab_lean_cycles: int = knob(4, "AB cycles of the lean methods (sync_every = steps / this).")
    ab_residual: dict = knob({}, "ABConfig fields that override ABConfig.for_finetuning's "
                                 "defaults for ab-residual and ab-residual-double.")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA alpha (scale alpha / r).")
    galore_rank: int = knob(48, "GaLore projection rank.")
    galore_update_proj_gap: int = knob(50, "GaLore: steps between projector updates (SVDs).")
    galore_scale: float = knob(1.0, "GaLore scale of the projected update.")
    one_world: bool = knob(False, "Train every method in one world of processes (saves a "
                                  "start-up per method; peak RSS is then shared).")
    cache_dir: str = knob("~/.cache/ab_accel/finetune_bench", "Where pretrained models are "
                                                               "cached (one folder per hash).")
    out: str = knob(str(RESULTS / "finetune.json"), "Results JSON (table and plot beside it).")
    timeout: float = knob(3600.0, "Seconds one world may take.")
    report_only: bool = knob(False, "Only redraw the table and plot from the results file.")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in {str(x) for x in Method}]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: choose from "
                             f"{', '.join(str(m) for m in Method)}.")
        self.methods = [Method(m) for m in self.methods]
        problems = [what for ok, what in [
            (bool(self.methods) and bool(self.seeds), "methods and seeds must each name one"),
            (self.nproc >= 2 and self.nproc % 2 == 0, "nproc must be even and >= 2 (AB's "
             "A-groups and B-groups)"),
            (self.steps >= 16, "steps must be >= 16 (the scaled AB schedule needs 4 cycles)"),
            (self.hidden_size % self.num_heads == 0, "hidden_size must divide by num_heads"),
            (self.steps % self.ab_lean_cycles == 0, "steps must divide by ab_lean_cycles"),
        ] if not ok]
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def lr_warmup_steps(self) -> int:
        return max(1, round(self.lr_warmup_ratio * self.steps))


#: The quick variant (``--quick``): one seed, a smaller model and shorter runs, in one world.
QUICK: dict[str, Any] = {
    "seeds": [0], "steps": 40, "batch_size": 4, "seq_len": 64, "eval_windows": 64,
    "hidden_size": 64, "intermediate_size": 176, "num_layers": 2, "num_heads": 4,
    "pretrain_steps": 200, "pretrain_batch_size": 16, "ab_fixed_rank": 8, "lora_r": 8,
    "lora_alpha": 16, "galore_rank": 16, "galore_update_proj_gap": 10, "one_world": True,
    "out": str(RESULTS / "finetune_quick.json"),
}

#: The larger model (``--large``): 4.2x the parameters of the default one (width 384, MLP
#: 1152), pretrained for 300 steps, fine-tuned for 100 steps with full fine-tuning and the
#: rank methods of the equal-bytes and equal-rank comparisons (the paper-style AB and GaLore
#: ran at the default size), to check that the finding does not rest on one tiny model.
LARGE: dict[str, Any] = {
    "hidden_size": 384, "intermediate_size": 1152, "pretrain_steps": 300, "steps": 100,
    "methods": ["full", "lora", "lora-half", "pissa", "pissa-half", "ab-residual",
                "ab-residual-double", "ab-residual-2lr"],
    "out": str(RESULTS / "finetune_large.json"),
}
