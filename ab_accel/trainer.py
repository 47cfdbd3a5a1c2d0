"""AB-training (arXiv 2405.01067) in the Hugging Face Trainer: :class:`ABTrainer`.

    trainer = ABTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_ab.json"), ...)
    trainer = ABTrainer(model=model, args=args, ab_config=ABConfig(warmup_steps=..., ...))
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

The config comes from ``ab_config=`` or from the ``"ab_training"`` key of the DeepSpeed JSON
given as ``--deepspeed``. The integration is thin; :class:`ABTrainer` changes only what
AB-training needs:

* the model is converted (:func:`ab_accel.convert`) when the trainer is built, layers chosen by
  type (nn.Linear, nn.Conv2d, transformers' Conv1D), so vision and text models alike work;
* right after the Trainer's ``accelerator.prepare``, the prepared optimizer's inner torch
  optimizer is wrapped in an :class:`~ab_accel.ABOptimizer` that is bound to the model. Under DDP
  the DDP reducer and buffer broadcast are switched off for good, and the AB layers' weights are
  kept out of the reducer, as :func:`ab_accel.prepare` does (the same helpers): the ABOptimizer
  owns all gradient reduction (world in warm-up and rebound, own group in an AB phase). Under
  DeepSpeed the engine is :func:`ab_accel.engine.attach` ed (what
  ``ab_accel.deepspeed.attach`` is);
* gradient accumulation is the Trainer's own: gradients accumulate locally over the micro-batches
  and are reduced once, at the optimizer step, so the ABOptimizer's step counter t advances once
  per optimizer step (``state.global_step``), never per micro-batch;
* ``max_grad_norm`` clips the REDUCED gradients of what this rank trains (the Trainer would clip
  the local ones);
* checkpoints hold every group's state: ``checkpoint-N/ab_training/`` has one shard per group
  (model and optimizer), and ``resume_from_checkpoint`` gives every rank its own group's shard
  back, so the AB schedule continues where it stopped (under DeepSpeed the shards sit in the
  engine's checkpoint tag folder, see :mod:`ab_accel.deepspeed`);
* every log line (training and eval) carries ``ab_phase`` (0 warm-up, 1 AB phase, 2 rebound: the
  phase of the next step), ``ab_step``, the traffic of this rank (``ab_wire_bytes``,
  ``ab_dp_equivalent_wire_bytes``, ``ab_traffic_reduction``) and ``ab_compression`` (dense
  parameters / parameters now).

Evaluation runs on the parameters each rank holds: during an AB phase the A-groups and the
B-groups hold different factors, and the Trainer's metrics average over the ranks, i.e. over the
groups. At the end of ``train()`` the ABTrainer calls :meth:`ABOptimizer.finalize` (one sync if
the run stopped inside an AB phase), so what comes after train() sees one reconciled model.

Mixed precision: ``bf16=True`` (torch autocast) works with DDP; ``fp16=True`` is refused (its
loss scaler skips steps per group, so the groups' schedules would drift apart). With DeepSpeed use
the JSON's ``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}`` block, not ``--bf16``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from . import patches, support
from .attach import check_shards, load_shards, save_merged, save_shards, shards_dir, wire
from .checkpoint import read_manifest
from .config import DEEPSPEED_KEY, ABConfig, ABConfigError, resolve_config
from .ddp import ignore_factorized_weights
from .ds_config import check_config, load_ds_config, zero_stage
from .engine import attach_prepared, torch_optimizer
from .model import compression, convert
from .optimizer import ABOptimizer
from .schedule import ABSchedule
from .vocab import Phase
from .zero import STAGES, fill_empty_groups

logger = logging.getLogger(__name__)

#: The numbers ``ab_phase`` takes in the logs (trackers want numbers).
PHASE_CODES = {Phase.WARMUP: 0, Phase.AB: 1, Phase.REBOUND: 2}


def config_for_trainer(ab_config: ABConfig | dict[str, Any] | None, deepspeed: Any
                       ) -> ABConfig:
    """The ABConfig of an :class:`ABTrainer`: ``ab_config=`` or the DeepSpeed JSON's key, by
    :func:`ab_accel.config.resolve_config`'s rule, after
    :func:`ab_accel.deepspeed.check_config` of the DeepSpeed config. Raises
    :class:`~ab_accel.ABConfigError` when neither gives a config, or both do and disagree."""
    if deepspeed is not None:
        deepspeed = load_ds_config(deepspeed)
        check_config(deepspeed)
    cfg = resolve_config(ab_config, deepspeed=deepspeed).config
    if cfg is None:
        raise ABConfigError(
            "ABTrainer needs an AB-training config: pass ab_config=ABConfig(...) or put an "
            f'"{DEEPSPEED_KEY}" block at the top level of the --deepspeed JSON. To train '
            'without AB-training use ab_config={"enabled": false} (or the plain Trainer).'
        )
    return cfg


class _WarnIfNeverAB(TrainerCallback):
    """At the start of training (when the number of steps is known): a run that never
    reaches an AB phase says so, before its time is spent."""

    def __init__(self, schedule: ABSchedule) -> None:
        self.schedule = schedule

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        message = self.schedule.never_ab(state.max_steps) if state.max_steps > 0 else None
        if message and state.is_world_process_zero:
            logger.warning(message)


class ABTrainer(Trainer):
    """``transformers.Trainer`` with AB-training. See the module docstring.

    Args:
        ab_config: the :class:`~ab_accel.ABConfig` (or a dict); ``None`` reads the
            ``"ab_training"`` key of ``args.deepspeed``.
        *args, **kwargs: those of ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, ab_config: ABConfig | dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.ab_config: ABConfig | None = None  # read by the hooks below during super().__init__
        self.ab_optimizer: ABOptimizer | None = None
        super().__init__(*args, **kwargs)
        ds = getattr(self.args, "hf_deepspeed_config", None)
        ds_config = ds.config if ds is not None else self.args.deepspeed
        cfg = config_for_trainer(ab_config, ds_config)
        if cfg.enabled:
            self._refuse_unsupported()
        self.ab_config = cfg
        if self.model is not None:
            self._convert(self.model)
        if cfg.enabled:
            self.add_callback(_WarnIfNeverAB(ABSchedule.from_config(cfg)))

    def _refuse_unsupported(self) -> None:
        where, tr = "in the Trainer", support.TRAINER
        if self.args.fp16:
            support.refuse(support.problem("fp16", "fp16=True", tr), where)
        if self.is_deepspeed_enabled and self.args.bf16 and self._zero_stage() == 0:
            support.refuse(support.problem(
                "flat_optimizer", "bf16=True with DeepSpeed at ZeRO stage 0 (DeepSpeed's bf16 "
                "optimizer)", tr), where)
        if self.args.auto_find_batch_size:
            support.refuse(support.problem("auto_find_batch_size", frontend=tr), where)

    def _zero_stage(self) -> int:
        ds = getattr(self.args, "hf_deepspeed_config", None)
        return zero_stage(ds.config) if ds is not None else 0

    def create_optimizer(self) -> Any:
        """``Trainer.create_optimizer``; under ZeRO 1/2 a group left with nothing to train
        (``freeze_untargeted`` empties the no-decay one) gets a placeholder, since DeepSpeed's
        ZeRO optimizer cannot be built over an empty group
        (:func:`ab_accel.zero.fill_empty_groups`)."""
        optimizer = super().create_optimizer()
        if self._enabled() and self.is_deepspeed_enabled and self._zero_stage() in STAGES:
            fill_empty_groups(optimizer, self.model)
        return optimizer

    def _enabled(self) -> bool:
        return self.ab_config is not None and self.ab_config.enabled

    def _convert(self, model: nn.Module) -> nn.Module:
        if self._enabled():
            convert(model, self.ab_config)
            if not self.is_deepspeed_enabled:
                # Keep the AB layers' weights out of DDP's reducer (it never reduces here, and
                # holding them would keep W allocated after a factorization released it).
                ignore_factorized_weights(model)
        return model

    def call_model_init(self, trial: Any = None) -> nn.Module:
        # Hyperparameter search builds a fresh model per trial: convert it too.
        return self._convert(super().call_model_init(trial))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # AB-training binds between the Trainer's accelerator.prepare and its checkpoint
        # loading (see ab_accel.patches.prepare_then).
        patches.prepare_then(self, lambda prepared: self._enabled() and self._attach_ab(prepared))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, then :meth:`ABOptimizer.finalize`: a run that stops inside an AB
        phase is reconciled (one sync), so evaluate(), save_model() and the exports after
        train() see one model on every rank."""
        output = super().train(*args, **kwargs)
        if self.ab_optimizer is not None:
            self.ab_optimizer.finalize()
        return output

    def save_merged(self, output_dir: str | None = None) -> dict[str, Any]:
        """The end of a run: the model back as a plain dense transformers model, saved.

        Reconciles the groups if they still differ (:meth:`ABOptimizer.sync_now`: W <- A B on
        every factored layer, even right after a factorization), merges every AB layer into a
        dense one of the original type (:func:`ab_accel.merge`; nn.Linear, nn.Conv2d,
        transformers' Conv1D: ``from_pretrained`` of plain transformers loads the folder), and
        saves it with ``save_pretrained`` (and the processing class, if the trainer has one)
        on the main process, into ``output_dir`` (default ``<args.output_dir>/merged``).
        Collective: every process calls it. Training cannot continue afterwards.

        Returns ``{"dir", "final_sync"}`` (whether this call ran a sync) and, when
        AB-training ran, ``"compression"``: the dense / AB parameter count of the last
        factorization (:meth:`ABOptimizer.report`, which says what it is measured on).
        """
        out = output_dir or os.path.join(self.args.output_dir, "merged")
        return save_merged(self.accelerator, self.model, self.ab_optimizer, out,
                           processor=self.processing_class, sync_always=True)

    # ------------------------------------------------------------------ wiring
    def _attach_ab(self, prepared: tuple[Any, ...]) -> None:
        from accelerate.optimizer import AcceleratedOptimizer

        wrapped = next((o for o in prepared if isinstance(o, AcceleratedOptimizer)), None)
        if wrapped is None or isinstance(wrapped.optimizer, ABOptimizer) or isinstance(
                getattr(wrapped.optimizer, "ab_optimizer", None), ABOptimizer):
            return  # nothing to train, or an optimizer prepared (and wrapped) before
        if self.is_deepspeed_enabled:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            # at stage 0 launched on the Trainer's accumulation boundaries, as without DeepSpeed
            ab = attach_prepared(engine, ABOptimizer(torch_optimizer(engine), None,
                                                     self.ab_config),
                                 wrapped, lambda: self.accelerator.sync_gradients)
        else:
            # AB-training owns gradient reduction; DDP's reducer would all-reduce over the
            # world (and cannot follow re-created factors): it stays off for the whole run.
            # The overlapped reduction launches only on the Trainer's accumulation boundaries.
            model = next((o for o in prepared if isinstance(o, nn.Module)), self.model)
            ab = wire(ABOptimizer(wrapped.optimizer, None, self.ab_config), model,
                      lambda: self.accelerator.sync_gradients, wrapped)
        self.ab_optimizer = ab

    # ------------------------------------------------------------------ clipping
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if self.ab_optimizer is None or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.ab_optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None and self.ab_optimizer is not None and not self.is_deepspeed_enabled:
            # Report the norm of the reduced gradients, as a DDP run would.
            self.ab_optimizer.synchronize()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ logging
    def ab_metrics(self) -> dict[str, float]:
        """AB-training's numbers for the logs: phase, step, traffic of this rank, compression."""
        opt = self.ab_optimizer
        if opt is None:
            return {}
        traffic = opt.traffic.summary()
        comp = compression(self.model)
        return {
            "ab_phase": PHASE_CODES[opt.phase],
            "ab_step": opt.step_count,
            "ab_wire_bytes": float(traffic["wire_bytes"]),
            "ab_dp_equivalent_wire_bytes": float(traffic["dp_equivalent_wire_bytes"]),
            "ab_traffic_reduction": float(traffic["reduction"]),
            "ab_compression": float(comp["ratio"]),
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs = {**logs, **self.ab_metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.ab_optimizer is not None and not self.is_deepspeed_enabled:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            # The groups' shards first: a checkpoint folder never lacks them.
            save_shards(os.path.join(self._get_output_dir(trial=trial), folder), self.model,
                        self.ab_optimizer)
        # Under DeepSpeed the attached engine's save_checkpoint writes the shards.
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: nn.Module | None = None) -> None:
        if not self._enabled() or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Every group's model state is loaded from ab_training/ after binding; a checkpoint
        # without it is refused here, the file named, before anything is loaded.
        if self.ab_optimizer is not None:
            check_shards(resume_from_checkpoint, self.ab_optimizer)
        else:  # before the optimizer exists: the manifest must be there
            read_manifest(shards_dir(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.ab_optimizer is None or self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_shards(checkpoint, self.model, self.ab_optimizer)
        from transformers.trainer import SCHEDULER_NAME

        sched = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(sched):
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))


def __getattr__(name: str) -> Any:
    """``setup_cpu_deepspeed`` moved to ``recipes/cpu_deepspeed.py`` (a launch helper, not
    AB-training): the old import path still finds it there, with a warning."""
    if name == "setup_cpu_deepspeed":
        import importlib
        import warnings

        warnings.warn("ab_accel.trainer.setup_cpu_deepspeed moved to recipes/cpu_deepspeed.py",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("recipes.cpu_deepspeed").setup_cpu_deepspeed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
