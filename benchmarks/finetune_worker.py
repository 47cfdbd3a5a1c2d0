"""One rank of benchmarks/finetune.py's world (run by torchrun): fine-tunes the pretrained
model with each method of the spec, for each seed, and measures it.

Every method is a ``transformers.Trainer`` (or :class:`ab_accel.trainer.ABTrainer`) on the same
TrainingArguments, datasets and seed; only what the method changes differs (the trainer class,
peft's wrapper, the Trainer's ``optim``, the learning rate of LoRA). :class:`Measure`, a
TrainerCallback, takes the numbers:

* bytes: for AB the ABOptimizer's meter over ``train()`` (its set-up broadcast excluded, the
  final sync of ``finalize()`` included); for the DDP methods the gradient buckets DDP hands its
  comm hook (:class:`ab_accel.ddp.DDPTraffic` around torch's ``allreduce_hook``, the hook
  DDP runs by default), i.e. what DDP all-reduces. The DP-equivalent of every method is what
  full fine-tuning's DDP all-reduces over the same steps (the model's gradient bytes per step),
  the AB meter's own ``dp_equivalent_bytes`` for AB (the same plus the float buffers: the
  rotary ``inv_freq``). A :class:`benchmarks.meters.CollectiveCounter` also counts every
  torch.distributed collective during ``train()`` (the Trainer's loss gathers included);
* peak training state: parameters, gradients and optimizer state (galore-torch's projection
  matrices included), walked with :func:`benchmarks.meters.state_bytes` just before and just
  after every optimizer step (the gradients still exist there); AB's also by phase;
* peak RSS: this process's resident memory sampled at the same points (and ``ru_maxrss``, the
  process's peak so far, which in a shared world includes the methods before);
* steps per second: the Trainer's ``train_steps_per_second``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Any

import psutil
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from ab_accel import ABConfig
from ab_accel.comm import wire_factor
from ab_accel.ddp import DDPTraffic
from ab_accel.model import ab_layers
from ab_accel.trainer import ABTrainer
from benchmarks.finetune_corpus import finetune_datasets
from benchmarks.finetune_pretrain import training_arguments
from benchmarks.finetune_runs import ab_schedules
from benchmarks.finetune_settings import TARGET_MODULES, Method, Settings
from benchmarks.meters import CollectiveCounter, max_rss_mb, state_bytes


def projector_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Tensors the optimizer state holds inside objects (galore-torch keeps each parameter's
    projection matrix in a GaLoreProjector in its state)."""
    out = []
    for st in optimizer.state.values():
        for v in st.values():
            ortho = getattr(v, "ortho_matrix", None)
            if isinstance(ortho, torch.Tensor):
                out.append(ortho)
    return out


class Measure(TrainerCallback):
    """Bytes, training state, RSS and trained parameters of one run (see the module doc)."""

    def __init__(self, method: Method, counter: CollectiveCounter) -> None:
        self.method = method
        self.counter = counter
        self.trainer: Trainer | None = None
        self.buckets: DDPTraffic | None = None  # plain DDP: what it hands its comm hook
        self.meter_start: dict[str, Any] | None = None
        self.peak_state = 0
        self.peak_state_by_phase: dict[str, int] = {}
        self.peak_rss = 0
        self.trained: list[int] = []
        self._phase = "dense"
        self._process = psutil.Process()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        tr = self.trainer
        ab = getattr(tr, "ab_optimizer", None)
        if ab is not None:
            self.meter_start = ab.traffic.summary()
        else:
            # DDP runs allreduce_hook when no hook is registered: the same, counted.
            self.buckets = DDPTraffic(tr.model_wrapped)
        self.counter.reset()
        self.counter.active = True

    def _sample(self) -> None:
        tr = self.trainer
        # the frozen residuals of ab-residual count as LoRA's frozen base does (a parameter)
        residuals = [layer.residual for _, layer in ab_layers(tr.model)
                     if layer.residual is not None]
        now = state_bytes(tr.model, tr.optimizer, projector_tensors(tr.optimizer) + residuals)
        self.peak_state = max(self.peak_state, now)
        self.peak_state_by_phase[self._phase] = max(now, self.peak_state_by_phase.get(
            self._phase, 0))
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        ab = getattr(self.trainer, "ab_optimizer", None)
        self._phase = str(ab.phase) if ab is not None else "dense"
        if ab is not None:
            ab.synchronize()  # (already done by clipping) the gradients this step really uses
        self.trained.append(sum(p.numel() for p in self.trainer.model.parameters()
                                if p.grad is not None))
        self._sample()

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self._sample()

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.counter.active = False


def build_trainer(method: Method, s: Settings, seed: int, model_path: str, work_dir: str,
                  measure: Measure) -> Trainer:
    """The method's trainer over the pretrained model (loaded with from_pretrained)."""
    set_seed(seed)  # LoRA's initialisation; the Trainer seeds the data order itself
    train, _ = finetune_datasets(s, seed)
    model = LlamaForCausalLM.from_pretrained(model_path)
    common = dict(ddp_backend="gloo", per_device_train_batch_size=s.batch_size,
                  max_steps=s.steps, learning_rate=s.lr, warmup_steps=s.lr_warmup_steps,
                  weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, seed=seed,
                  data_seed=seed, ddp_find_unused_parameters=False,
                  logging_steps=max(1, s.steps // 20))
    out_dir = os.path.join(work_dir, f"{method}-{seed}")
    kwargs: dict[str, Any] = dict(train_dataset=train, callbacks=[measure])
    if method.is_ab:
        cfg = ABConfig(**ab_schedules(s)[str(method)])
        args = training_arguments(out_dir, **{**common, "learning_rate": method.lr(s)})
        trainer = ABTrainer(model=model, args=args, ab_config=cfg, **kwargs)
    elif method.is_adapter:
        from peft import LoraConfig, get_peft_model

        pissa = method in (Method.PISSA, Method.PISSA_HALF)
        lora = LoraConfig(r=method.rank(s), lora_alpha=method.alpha(s), lora_dropout=0.0,
                          bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM",
                          init_lora_weights="pissa" if pissa else True)
        args = training_arguments(out_dir, **{**common, "learning_rate": s.lora_lr})
        trainer = Trainer(model=get_peft_model(model, lora), args=args, **kwargs)
    elif method == Method.GALORE:
        optim_args = (f"rank={s.galore_rank},update_proj_gap={s.galore_update_proj_gap},"
                      f"scale={s.galore_scale},proj_type=std")
        args = training_arguments(out_dir, optim="galore_adamw",
                                  optim_target_modules=TARGET_MODULES, optim_args=optim_args,
                                  **common)
        trainer = Trainer(model=model, args=args, **kwargs)
    else:
        trainer = Trainer(model=model, args=training_arguments(out_dir, **common), **kwargs)
    trainer.remove_callback(PrinterCallback)  # one line per run instead (main)
    measure.trainer = trainer
    return trainer


def _ab_record(trainer: ABTrainer, measure: Measure) -> dict[str, Any]:
    opt = trainer.ab_optimizer
    now, start = opt.traffic.summary(), measure.meter_start
    full_rank = {name: min(layer.out_dim, layer.in_dim) for name, layer in
                 ab_layers(trainer.model)}
    facts = []
    for sw in opt.switches:
        if sw.ranks:
            facts.append({"step": sw.step, "seconds": sw.seconds,
                          "mean_rank": sum(sw.ranks.values()) / len(sw.ranks),
                          "rank_fraction": sum(sw.ranks.values())
                          / sum(full_rank[n] for n in sw.ranks),
                          "compression": sw.compression})
    by_phase = {p: now["bytes_by_phase"].get(p, 0) - start["bytes_by_phase"].get(p, 0)
                for p in now["bytes_by_phase"]}
    return {
        "bytes": now["bytes"] - start["bytes"],
        "wire_bytes": now["wire_bytes"] - start["wire_bytes"],
        "dp_equivalent_bytes": now["dp_equivalent_bytes"] - start["dp_equivalent_bytes"],
        "dp_equivalent_wire_bytes": (now["dp_equivalent_wire_bytes"]
                                     - start["dp_equivalent_wire_bytes"]),
        "bytes_by_phase": {p: b for p, b in by_phase.items() if b},
        "steps_by_phase": now["steps_by_phase"], "role": str(opt.groups.role),
        "switches": [sw.to_dict() for sw in opt.switches], "factorizations": facts,
        "skipped_steps": opt.skipped_steps, "switch_seconds": dict(opt.switch_seconds),
        "svd_seconds": opt.svd_seconds,
    }


def _residual_bytes(model: Any) -> int:
    return sum(layer.residual.numel() * layer.residual.element_size()
               for _, layer in ab_layers(model) if layer.residual is not None)


def run_one(method: Method, s: Settings, seed: int, spec: dict[str, Any],
            counter: CollectiveCounter) -> dict[str, Any]:
    """Fine-tune with ``method`` from ``seed``; this rank's numbers."""
    world = dist.get_world_size()
    measure = Measure(method, counter)
    trainer = build_trainer(method, s, seed, spec["model_path"], spec["work_dir"], measure)
    dist.barrier()
    out = trainer.train()
    counter.active = False
    _, held = finetune_datasets(s, seed)
    eval_loss = trainer.evaluate(eval_dataset=held)["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    grad_bytes = sum(p.numel() * p.element_size() for p in
                     LlamaForCausalLM.from_pretrained(spec["model_path"]).parameters())
    rec: dict[str, Any] = {
        "method": str(method), "seed": seed, "rank": dist.get_rank(),
        "eval_loss": eval_loss, "perplexity": math.exp(eval_loss),
        "train_losses": losses, "train_loss": out.training_loss,
        "train_seconds": out.metrics["train_runtime"],
        "steps_per_second": out.metrics["train_steps_per_second"],
        "global_step": trainer.state.global_step,
        "peak_state_bytes": measure.peak_state,
        "peak_state_bytes_by_phase": measure.peak_state_by_phase,
        "peak_rss_mb": measure.peak_rss / 2**20, "max_rss_mb": max_rss_mb(),
        "trained_params_per_step": sum(measure.trained) / max(1, len(measure.trained)),
        "intercepted_bytes": counter.bytes, "intercepted_wire_bytes": counter.wire_bytes,
        "loadavg": list(os.getloadavg()),
    }
    if isinstance(trainer, ABTrainer):
        rec.update(_ab_record(trainer, measure))
        rec["residual_bytes"] = _residual_bytes(trainer.model)
    else:
        rec.update({
            "bytes": measure.buckets.grad_bytes,
            "wire_bytes": measure.buckets.grad_bytes * wire_factor("all_reduce", world),
            "hook_calls": measure.buckets.calls,
            "dp_equivalent_bytes": s.steps * grad_bytes,
            "dp_equivalent_wire_bytes": s.steps * grad_bytes * wire_factor("all_reduce", world),
        })
    del trainer
    return rec


def merge_ranks(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's record from every rank's: rank 0's evaluation and curve (the same model on
    every rank after train()), bytes averaged over the ranks (A- and B-group ranks differ),
    peaks the max over the ranks."""
    r0 = recs[0]
    mean = {k: sum(r[k] for r in recs) / len(recs)
            for k in ("bytes", "wire_bytes", "dp_equivalent_bytes", "dp_equivalent_wire_bytes",
                      "intercepted_bytes", "intercepted_wire_bytes", "trained_params_per_step")}
    peak = {k: max(r[k] for r in recs) for k in ("peak_state_bytes", "peak_rss_mb",
                                                  "max_rss_mb")}
    per_rank = {k: [r[k] for r in recs] for k in ("bytes", "wire_bytes", "peak_state_bytes",
                                                   "peak_rss_mb", "eval_loss")}
    if "role" in r0:
        per_rank["role"] = [r["role"] for r in recs]
        per_rank["bytes_by_phase"] = [r["bytes_by_phase"] for r in recs]
    return {**r0, **mean, **peak, "per_rank": per_rank}


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    s = Settings(**spec["settings"])
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()
    warnings.filterwarnings("ignore", message="This implementation of AdamW is deprecated")
    dist.init_process_group("gloo")
    counter = CollectiveCounter().install()
    records = []
    try:
        for name in spec["methods"]:
            for seed in s.seeds:
                t0 = time.time()
                rec = run_one(Method(name), s, seed, spec, counter)
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, rec)
                if dist.get_rank() == 0:
                    records.append(merge_ranks(gathered))
                    print(f"[finetune rank 0] {name} seed {seed}: held-out loss "
                          f"{rec['eval_loss']:.4f}, {time.time() - t0:.1f} s", flush=True)
        if dist.get_rank() == 0:
            tmp = spec["out"] + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(records, fh)
            os.replace(tmp, spec["out"])
        dist.barrier()
    finally:
        counter.uninstall()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
