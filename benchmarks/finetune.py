"""Fine-tuning: AB-training against full fine-tuning, LoRA, PiSSA and GaLore, on the same run.

A byte-level causal LM (transformers' Llama architecture, built from a config, ~2M parameters)
is PRETRAINED here on one real corpus that ships with the machine's software, the Python
standard library's own modules (every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
outside ``site-packages`` and the test folders), saved with ``save_pretrained`` and cached on
disk under a hash of everything that decides it (corpus, model, pretraining knobs). Each method
then loads it with ``from_pretrained``, as a user's model would be, and FINE-TUNES it on a
disjoint corpus, the standard library's test suite (``test/``): one file in
``heldout_every`` (by a hash of its path) is held out, the held-out loss and perplexity are
measured on fixed windows of those files. Nothing is downloaded at any point.

Methods (:class:`Method`), 4 gloo processes under torchrun, the same data order, steps, LR
schedule and seeds for every one (each is a ``transformers.Trainer`` or a subclass):

* ``full``: full fine-tuning, the plain Trainer + DDP, AdamW;
* ``ab-paper``: :class:`ab_accel.trainer.ABTrainer` with the paper's defaults (rank cutoff
  0.15, with-stale, groups of world/2) on the paper's schedule scaled to the run
  (:func:`benchmarks.compare.ab_schedule_for`: a dense warm-up of ~10% of the run, four
  cycles, rebound 5% of a cycle, LR rebound 20% of a cycle);
* ``ab-energy``: the same schedule, rank by retained spectral energy (``rank_energy``);
* ``ab-lean``: ``lean_memory`` (no dense step: factorized at step 0, no rebound, switches layer
  by layer) at a ``fixed_rank``; ``ab-lean-energy``: the same with ``rank_energy``;
* ``lora``: peft's LoRA (rank ``lora_r``) on the attention and MLP projections, the plain
  Trainer + DDP;
* ``galore``: the Trainer's own ``optim="galore_adamw"`` (galore-torch) on the same layers;
* ``lora-half``: LoRA at half of ``lora_r`` (the bytes per rank of AB at ``lora_r``: each AB
  rank sends one factor); ``pissa``, ``pissa-half``: peft's PiSSA (``init_lora_weights=
  "pissa"``: the principal factors, the rest of the weight frozen) at those ranks;
* ``ab-residual``: :meth:`ab_accel.ABConfig.for_finetuning` at rank ``lora_r`` (the frozen
  residual, untargeted parameters frozen, lean_memory, with-stale); ``ab-residual-double`` at
  twice the rank (LoRA's bytes); ``ab-residual-2lr`` at rank ``lora_r`` and twice the LR
  (with-stale keeps half of each group's change at a sync).

The rank methods (LoRA, PiSSA, the residual methods) share ``lora_lr``; the others use ``lr``.

Every method targets the same layers (q, k, v, o, gate, up, down projections); embeddings,
norms and the LM head are trained densely by the full-rank methods and frozen by LoRA.

What is measured, per rank, over ``trainer.train()`` (see benchmarks/finetune_worker.py):
held-out loss and perplexity (mean and spread over the seeds), bytes per rank (the AB meter;
for the DDP methods the gradient buckets DDP handed its comm hook, counted with
:class:`ab_accel.ddp.DDPTraffic`) and the DP-equivalent (the bytes DDP all-reduces for
full fine-tuning of the same model over the same steps), peak training-state memory
(parameters + gradients + optimizer state, walked at every optimizer step), peak RSS and steps
per second.

    python -m benchmarks.finetune                      # the full run: 3 seeds
    python -m benchmarks.finetune --quick              # 1 seed, a smaller model, a few minutes
    python -m benchmarks.finetune --large              # 7.87M model: 100 steps, rank methods
    python -m benchmarks.finetune --report_only true   # table and plot from the results file

Results: ``benchmarks/results/finetune.json`` (``finetune_quick.json``, ``finetune_large.json``;
``finetune_v1.json`` is the first run, before the residual), ``*_table.md`` (the
table BENCHMARKS.md shows, from :func:`markdown_table`) and ``*.png`` (held-out loss against
bytes per rank and against peak training-state memory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from ab_accel.cli import field_help
from benchmarks.finetune_corpus import (  # noqa: F401  (the names the tests and docs use)
    ByteWindows,
    corpus_files,
    finetune_datasets,
    split_finetune_files,
    stdlib_root,
)
from benchmarks.finetune_markdown import markdown_run, markdown_table, write_report  # noqa: F401
from benchmarks.finetune_runs import ab_schedules, describe, run_benchmark  # noqa: F401
from benchmarks.finetune_settings import (  # noqa: F401
    LARGE,
    QUICK,
    RESULTS,
    TARGET_MODULES,
    Method,
    Settings,
)


def parse(argv: list[str] | None = None) -> Settings:
    """The Settings of a run: defaults < ``--quick``'s preset < the other flags."""
    parser = ArgumentParser(prog="python -m benchmarks.finetune",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="The quick variant: 1 seed, a smaller model, fewer steps.")
    parser.add_argument("--large", action="store_true",
                        help="The larger model (4.2x the parameters): 100 steps, full "
                             "fine-tuning and the rank methods.")
    parser.add_class_arguments(Settings, as_group=False)
    field_help(parser, Settings)  # jsonargparse reads docstrings only, not field metadata
    ns = parser.parse_args(argv)
    if ns.quick or ns.large:
        parser.set_defaults(**(QUICK if ns.quick else LARGE))
        ns = parser.parse_args(argv)
    values = parser.instantiate(ns).as_dict()
    values.pop("quick")
    values.pop("large")
    values.pop("__path__", None)
    return Settings(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse(argv)
    if s.report_only:
        res = json.loads(Path(s.out).read_text())
        print("\n".join(f"[finetune] wrote {p}" for p in write_report(res, s.out)))
        return res
    return run_benchmark(s, "python -m benchmarks.finetune " + " ".join(
        sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
