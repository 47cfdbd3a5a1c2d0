"""The one training loop of recipes/vit.py and recipes/resnet.py: image classification with
AB-training (Coquelin et al., arXiv 2405.01067) under `accelerate launch`.

It reads like Accelerate's complete_cv_example.py: knobs, Accelerator, data, model, optimizer,
prepare, LR schedule, the loop, evaluation, checkpoints, the end. The AB-training change is one
line, ``ab_accel.prepare`` in place of ``accelerator.prepare``, and at the end
``ABOptimizer.finalize()`` (the groups hold one model) and ``ab_accel.merge`` (a plain export).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import data
import launch
import modeling
from args import ConfigError, Recipe, TrainArgs, ab_config, derive, launched_world_size
from args import parse as parse_args

logger = logging.getLogger("recipes")


def make_accelerator(args: TrainArgs, trackers: list[Any]) -> Any:
    """CPU (gloo) when no CUDA device is visible, a seeded sampler, the trackers, quiet logs."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    cpu = not torch.cuda.is_available() if args.cpu == "auto" else args.cpu
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # cpu=True would turn
        # DeepSpeed off: on CPU the processes form one gloo world through the kwargs instead
        handlers, cpu = ([InitProcessGroupKwargs(backend="gloo")] if cpu else []), False
    if not torch.cuda.is_available():  # accelerate's unwrap_model imports deepspeed when it is
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # installed: no "no GPU found" warning
    accelerator = Accelerator(
        cpu=cpu, kwargs_handlers=handlers, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=trackers,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
        # The shuffle order is a function of (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True,
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    launch.quiet_libraries()
    return accelerator


# Knobs a resumed run may change without a word (the AB schedule and the world size are the
# core's to refuse: ab_accel.checkpoint); every other changed knob is reported.
QUIET_CHANGES = {"resume_from_checkpoint", "output_dir", "config", "report_to", "ab_training"}


def checkpoint_dir(args: TrainArgs) -> str | None:
    """--resume_from_checkpoint: a folder, or latest (the newest COMPLETE step_N of output_dir:
    ab_accel.latest_checkpoint; ab_accel.accelerate.save_state renames a folder in when whole)."""
    from ab_accel import latest_checkpoint

    path, folder = args.resume_from_checkpoint, os.path.join(args.output_dir, "checkpoints")
    if path == "latest":
        path = latest_checkpoint(folder)
        if path is None:  # the first start of a run launched to restart itself (torchrun)
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s yet: "
                           "starting from step 0", folder)
    elif path and not os.path.isdir(path):
        raise ConfigError(f"--resume_from_checkpoint {path!r} does not exist.")
    return path


def check_output_dir(args: TrainArgs, resume: str | None) -> None:
    """Never write over another data set's finished run: its summary.json names its data."""
    file = os.path.join(args.output_dir, "summary.json")
    if resume or not os.path.exists(file):
        return
    with open(file) as fh:
        before = json.load(fh).get("config", {})
    mine = (os.path.abspath(args.data_dir) if args.data_dir else None, args.dataset_name)
    theirs = (os.path.abspath(before["data_dir"]) if before.get("data_dir") else None,
              before.get("dataset_name"))
    if mine != theirs:
        def name(pair: tuple) -> str:
            return pair[0] or pair[1] or "digits"
        raise ConfigError(f"--output_dir {args.output_dir} holds a finished run on "
                          f"{name(theirs)}, not on {name(mine)}: pass another --output_dir "
                          f"(or remove that folder).")


def train(recipe: Recipe, argv: Sequence[str]) -> dict[str, Any]:
    # ---- knobs: every check that needs no heavy import runs first, in the order a user fixes
    # them: the knobs and the data folder (parse), the launch, the launcher's settings, the
    # run's length on this data, the AB groups
    parsed = parse_args(recipe, argv)
    launch.check_launch()  # accelerate launch --num_processes 4 on CPU starts one process
    world = launched_world_size()
    launch.check_launcher_settings(parsed.mixed_precision, parsed.gradient_accumulation_steps)
    facts = data.survey(data.folder_images(parsed.data_dir)) if parsed.data_dir else None
    early = None
    if parsed.data_dir:  # the folder's count: a run of 0 steps is refused before any start-up
        files = data.count_images(os.path.join(parsed.data_dir, "train"))
        early = min(files, parsed.max_train_samples or files)
    args, total_steps, _ = derive(parsed, recipe, world, early, facts)
    resume_dir, from_scratch = checkpoint_dir(args), not args.model_name_or_path
    check_output_dir(args, resume_dir)
    config = ab_config(args, world, from_scratch)  # groups that fit the launched world
    if total_steps is not None:
        never_ab(config, total_steps, args)
    if from_scratch:
        modeling.check_model_keys(args.model_type, args.model)
    started = time.time()

    import torch
    import torch.nn.functional as F
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    import ab_accel
    from ab_accel.accelerate import ab_optimizer
    from ab_accel.comm import world_traffic
    from ab_accel.config import DEEPSPEED_KEY
    from ab_accel.ddp import DDPTraffic

    import report
    from state import check_state, save_state

    jsonl = report.JSONLTracker(os.path.join(args.output_dir, "metrics.jsonl"))
    trackers = [jsonl] + ([args.report_to] if args.report_to != "none" else [])
    accelerator = make_accelerator(args, trackers)
    torch.manual_seed(args.seed)
    world, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    if args.batch_size % (world * accumulation):
        raise ConfigError(f"batch_size {args.batch_size} (global) does not split over {world} "
                          f"processes x {accumulation} accumulation steps: pass a multiple of "
                          f"{world * accumulation}.")

    # ---- data: what the run derives from it is decided on the exact count, and said once
    with accelerator.main_process_first():  # one process builds the datasets cache
        train_split, eval_split, data_desc = data.load_splits(args)
    labels = data.class_names(train_split)
    if len(labels) < 2:
        raise ConfigError(f"{data_desc} has {len(labels)} class(es): a classifier needs at "
                          f"least two.")
    if facts is None and parsed.dataset_name:
        facts = data.survey([train_split[i]["image"] for i in range(min(64, len(train_split)))])
    args, total_steps, said = derive(parsed, recipe, world, len(train_split), facts)
    config = ab_config(args, world, from_scratch)
    never_ab(config, total_steps, args)
    logger.info("data: %s", data_desc)
    if said:
        logger.info("derived from the data: %s", "; ".join(said))
    os.makedirs(args.output_dir, exist_ok=True)  # every refusal is behind: now it is a run
    size, channels, mean, std = args.image_size, len(args.image_mean), args.image_mean, \
        args.image_std
    train_ds = data.ImageDataset(train_split, data.image_transform(
        size, mean, std, train=True, crop_scale=args.crop_scale, hflip=args.hflip), channels,
        size, args.seed)
    eval_ds = data.ImageDataset(eval_split, data.image_transform(
        size, mean, std, eval_crop_ratio=args.eval_crop_ratio), channels, size, args.seed)
    train_dl, eval_dl = data.loaders(train_ds, eval_ds, args.batch_size // (world * accumulation),
                                     args.num_workers, pin_memory=accelerator.device.type == "cuda")

    # ---- model, optimizer, AB-training (the one changed line: ab_accel.prepare), LR schedule
    model = modeling.build_model(args, labels)
    modeling.same_init_without_ab(model, config)
    optimizer = modeling.adamw(model, args)
    plugin = accelerator.state.deepspeed_plugin  # the JSON's key was read by ab_config: give
    if plugin is not None and DEEPSPEED_KEY in plugin.deepspeed_config:  # prepare the one config
        plugin.deepspeed_config[DEEPSPEED_KEY] = config.to_dict()  # resolved (--no-ab, init)
    model, optimizer, train_dl, eval_dl = ab_accel.prepare(
        accelerator, model, optimizer, train_dl, eval_dl, config=config)
    ab_opt = ab_optimizer(optimizer) if config.enabled else None
    steps_per_epoch = -(-len(train_dl) // accumulation)
    if total_steps != (args.max_steps or args.epochs * steps_per_epoch):  # args.derive's count
        raise RuntimeError(f"{total_steps} steps planned, the loader gives "
                           f"{args.max_steps or args.epochs * steps_per_epoch}")
    scheduler = modeling.lr_schedule(optimizer, total_steps, round(
        args.lr_warmup_epochs * steps_per_epoch), args.lr_start, args.min_lr)
    ddp = None  # --no-ab: what plain DP sends, counted by a DDP comm hook
    if ab_opt is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ddp = DDPTraffic(model)
    record = report.RunLog(accelerator)
    bad_train, bad_eval = data.UnreadableImages(train_ds), data.UnreadableImages(eval_ds)
    for obj in (scheduler, ddp, bad_train, record):  # saved by accelerator.save_state
        if obj is not None:
            accelerator.register_for_checkpointing(obj)
    knobs = json.loads(json.dumps(dataclasses.asdict(args), default=str))
    if resume_dir:  # checked whole first (ab_accel.accelerate.check_state)
        saved = check_state(accelerator, resume_dir)
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in knobs.items()
                   if k not in QUIET_CHANGES and k in saved and saved[k] != v]
        if changed:  # the LR scheduler's state (its peak and length) comes from the checkpoint
            logger.warning("resuming with changed knobs: %s. The learning-rate schedule is the "
                           "checkpoint's (restored with it): a new lr does not apply, and a "
                           "new length runs the old cosine past its end.", "; ".join(changed))
        accelerator.load_state(resume_dir)  # ab_accel restores each rank's own group shard
        jsonl.restart_from = record.train + record.evals
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, record.step,
                    record.epoch, record.batches_in_epoch)
    accelerator.init_trackers(recipe.name, config=report.hyperparameters(args))
    report.log_start(args, accelerator, model, ab_opt, total_steps)

    # ---- train
    progress = tqdm(total=total_steps, initial=record.step, desc=recipe.name, dynamic_ncols=True,
                    disable=None if accelerator.is_main_process else True)  # None: a TTY only
    t0 = time.time()
    launch.PROGRESS.update(step=record.step,
                           checkpoints=os.path.join(args.output_dir, "checkpoints"))
    model.train()
    with logging_redirect_tqdm():  # log lines print above the progress bar, not into it
        while record.step < total_steps:
            train_dl.set_epoch(record.epoch)  # the shuffle order: a function of (seed, epoch)
            train_ds.set_epoch(record.epoch)  # augmentation: a function of (seed, epoch, index)
            batches = train_dl
            if record.batches_in_epoch:  # resuming mid-epoch
                batches = accelerator.skip_first_batches(train_dl, record.batches_in_epoch)
            for batch in batches:
                with accelerator.accumulate(model):
                    logits = model(pixel_values=batch["pixel_values"]).logits
                    targets = batch["labels"]
                    valid = (targets != data.IGNORE_INDEX).sum().clamp(min=1)
                    loss = F.cross_entropy(logits.float(), targets, reduction="sum",
                                           label_smoothing=args.label_smoothing,
                                           ignore_index=data.IGNORE_INDEX) / valid
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                record.batches_in_epoch += 1
                record.losses.append(loss.item())
                bad_train.add(batch["index"], targets)
                if not accelerator.sync_gradients:
                    continue
                record.step, record.lr, record.phase = record.step + 1, \
                    scheduler.get_last_lr()[0], phase_of(ab_opt)
                launch.PROGRESS["step"] = record.step
                scheduler.step()
                if ddp is not None:
                    ddp.mark_step()
                progress.update(1)
                save = args.checkpointing_steps and record.step % args.checkpointing_steps == 0
                if save or record.step % args.log_every == 0 or record.step == total_steps:
                    logged = record.flush(ab_opt.skipped_steps if ab_opt else 0)
                    bad_train.flush(gather_object, accelerator.is_main_process)
                    if logged:
                        progress.set_postfix(loss=f"{logged['loss']:.3f}", phase=logged["phase"])
                if save:
                    record.elapsed, t0 = record.elapsed + time.time() - t0, time.time()
                    save_state(accelerator, os.path.join(
                        args.output_dir, "checkpoints", f"step_{record.step}"), meta=knobs)
                if record.step >= total_steps:
                    break
            if record.batches_in_epoch >= len(train_dl):  # the epoch is complete
                record.batches_in_epoch, record.epoch = 0, record.epoch + 1
                if record.epoch % args.eval_every_epochs == 0:
                    differ = bool(ab_opt and ab_opt.groups_differ)
                    result = record.log_eval(report.evaluate(
                        model, eval_dl, accelerator, len(labels), bad_eval),
                        phase=phase_of(ab_opt), groups_differ=differ)
                    logger.info("epoch %d (step %d, %s phase): top-1 %.4f%s", record.epoch,
                                record.step, result["phase"], result["top1"],
                                " (the groups differ: each rank evaluates its group's model "
                                "on its shard)" if differ else "")
    progress.close()
    record.elapsed += time.time() - t0

    # ---- the end: one model on every rank, merged export, final evaluation, summary
    final_sync = "in sync"
    if ab_opt is not None and ab_opt.finalize():
        final_sync = f"final sync ({ab_opt.config.sync_mode}): the run stopped mid-AB-phase"
    ab = ab_opt.report() if ab_opt is not None else None  # the AB layers as they end
    export = report.export_merged(accelerator, model, optimizer, eval_ds, args)
    final = record.log_eval(report.evaluate(
        accelerator.unwrap_model(model), eval_dl, accelerator, len(labels), bad_eval),
        phase=phase_of(ab_opt), final=True)
    traffic = world_traffic(ab_opt.traffic if ab_opt is not None else ddp)  # collective
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        summary = report.summarize(
            recipe=recipe.name, args=args, ab=ab, record=record, traffic=traffic, final=final,
            classes=len(labels), export={**export, "final_sync": final_sync}, data=data_desc,
            wall_time_s=time.time() - started,
            skipped_images={"train": len(bad_train.seen), "eval": final["skipped"]})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def phase_of(ab_opt: Any) -> str:
    """The phase of the last optimizer step ("dp" without AB-training)."""
    return str(ab_opt.schedule.phase(max(0, ab_opt.step_count - 1))) if ab_opt else "dp"


def never_ab(config: Any, total_steps: int, args: TrainArgs) -> None:
    """A run with AB-training on that would never reach an AB phase is refused before it
    starts (it would be plain data parallel under another name)."""
    from ab_accel.schedule import ABSchedule

    if config.enabled and (why := ABSchedule.from_config(config).never_ab(total_steps)):
        raise ConfigError(f"{why[0].upper()}{why[1:]} (warmup_steps {config.warmup_steps}, "
                          f"sync_every {config.sync_every}). Or pass --no-ab for a plain "
                          f"data-parallel run.")


def main(recipe: Recipe, argv: Sequence[str]) -> None:
    """The command line: a refused setup is one line from rank 0 and exit status 2 on every
    rank, Ctrl-C one line (recipes/launch.py); a real crash keeps its traceback."""
    try:
        launch.run_main(f"{recipe.name}.py", lambda: train(recipe, argv))
    finally:  # the process groups go while the interpreter is whole (gloo's threads can
        dist = sys.modules.get("torch.distributed")  # abort a process in its teardown)
        if dist is not None and dist.is_available() and dist.is_initialized():
            gc.collect()  # no optimizer or model left holding a group
            dist.destroy_process_group()
