"""ResNet image classification with AB-training (arXiv 2405.01067), launched by `accelerate launch`.

    # CPU, 4 processes, sklearn's digits (no data argument; a tiny ResNet, digits upsampled)
    accelerate launch --multi_gpu --num_processes 4 recipes/resnet.py
    # GPUs, ImageNet folder tree, the paper's ResNet-50 "groups" schedule for this many nodes
    accelerate launch --config_file configs/accelerate_multigpu.yaml recipes/resnet.py \\
        --data_dir /data/imagenet
    # the paper's ResNet-50 "AB without groups" runs (only-b)
    accelerate launch ... recipes/resnet.py --config configs/resnet50_imagenet_nogroups.yaml ...
    # the same run as plain data parallel (DDP), everything else identical
    accelerate launch ... recipes/resnet.py --no-ab

Every knob below can be set in a config file (--config, YAML or JSON; configs/) and then on the
command line: --lr 1e-3, --ab_training.sync_every 500, --model.depths 3,4,6,3. The training
loop is the one of recipes/vit.py line for line; only the model differs. See docs/recipes.md.
"""

from __future__ import annotations

import os
import sys

import common

# ----------------------------------------------------------------------------- knobs
KNOBS = {
    **common.COMMON_KNOBS,
    "output_dir": "runs/resnet",
    # ResNetConfig fields for training from scratch (ResNet-50 here; the configs override them)
    "model": {"embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048],
              "depths": [3, 4, 6, 3], "layer_type": "bottleneck"},
}
DEFAULT_CONFIGS = {"digits": "configs/resnet_digits.yaml",
                   "imagenet": "configs/resnet50_imagenet.yaml"}
# -----------------------------------------------------------------------------


def build_model(cfg: common.Config, labels: list[str]):
    """ResNetForImageClassification: from a config (from scratch) or --model_name_or_path."""
    from transformers import ResNetConfig, ResNetForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if cfg.model_name_or_path:
        return ResNetForImageClassification.from_pretrained(
            cfg.model_name_or_path, num_labels=len(labels), id2label=id2label,
            label2id=label2id, ignore_mismatched_sizes=True)  # a new head for these classes
    config = ResNetConfig(num_channels=len(cfg.image_mean), num_labels=len(labels),
                          id2label=id2label, label2id=label2id, **cfg.model)
    return ResNetForImageClassification(config)


def main(argv: list[str]) -> dict:
    if "--help" in argv or "-h" in argv:
        common.print_help(KNOBS, __doc__)
        return {}
    cfg = common.load_config(KNOBS, argv, recipe="resnet", default_configs=DEFAULT_CONFIGS)
    if cfg.data_dir:
        common.check_data_dir(cfg.data_dir)  # a missing folder stops here, before any import
    resume_dir = common.resolve_checkpoint(cfg)
    # The other knobs are checked before anything is loaded: the AB-training block (keys,
    # values, groups that fit the launched world) and the model block.
    common.ab_config(cfg, common.launched_world_size(), not cfg.model_name_or_path)
    if not cfg.model_name_or_path:
        from transformers import ResNetConfig

        common.check_model_keys(cfg.model, ResNetConfig, "ResNetConfig")
    started = common.now()

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    import ab_accel

    accelerator = common.make_accelerator(cfg, project_name="resnet")
    log = common.logger
    torch.manual_seed(cfg.seed)
    world = accelerator.num_processes
    batch_size = common.per_device_batch_size(cfg, world)

    # ---- data
    with accelerator.main_process_first():  # one process builds the datasets cache
        train_split, eval_split, data_desc = common.load_splits(cfg)
    labels = common.class_names(train_split)
    log.info("data: %s", data_desc)
    train_dl, eval_dl = common.make_loaders(cfg, train_split, eval_split, len(cfg.image_mean),
                                            batch_size, pin_memory=accelerator.device.type
                                            == "cuda")
    train_ds = train_dl.dataset

    # ---- model, optimizer, AB-training (the one changed line: ab_accel.prepare)
    model = build_model(cfg, labels)
    if model.config.num_channels != len(cfg.image_mean):
        raise common.ConfigError(
            f"the model takes {model.config.num_channels}-channel images but image_mean has "
            f"{len(cfg.image_mean)} values: give one mean and std per channel.")
    ab_config = common.ab_config(cfg, world, from_scratch=not cfg.model_name_or_path)
    common.same_init_without_ab(model, ab_config)  # --no-ab starts from the same weights
    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas))
    model, optimizer, train_dl, eval_dl = ab_accel.prepare(
        accelerator, model, optimizer, train_dl, eval_dl, config=ab_config)
    ab_opt = common.find_ab_optimizer(optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ddp_traffic = None
    if ab_opt is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ddp_traffic = common.DDPTraffic(model, world)  # measure what plain DP sends
    metric = common.load_metric(accelerator)

    steps_per_epoch = -(-len(train_dl) // cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)
    lr_warmup_steps = round(cfg.lr_warmup_epochs * steps_per_epoch)
    record = common.RunRecord(cfg, accelerator, ab_opt, ddp_traffic, unwrapped, total_steps,
                              steps_per_epoch)
    if resume_dir:
        accelerator.load_state(resume_dir)  # ab_accel restores each rank's own group shard
        record.load_state_dict(common.load_recipe_state(resume_dir, accelerator.process_index))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, record.step,
                 record.epoch, record.batches_in_epoch)
    common.log_start(cfg, accelerator, model, ab_opt, ab_config, total_steps, steps_per_epoch,
                     batch_size)

    # ---- train
    progress = tqdm(total=total_steps, initial=record.step, desc="resnet",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 5.0)
    t0 = common.now()
    model.train()
    for epoch in range(record.epoch, epochs):
        record.epoch = epoch
        train_dl.set_epoch(epoch)  # the shuffle order: a function of (seed, epoch)
        train_ds.set_epoch(epoch)  # the augmentation: a function of (seed, epoch, index)
        batches = train_dl
        if record.batches_in_epoch:  # resuming mid-epoch
            batches = accelerator.skip_first_batches(train_dl, record.batches_in_epoch)
        for batch in batches:
            lr = common.lr_at(record.step, total_steps, lr_warmup_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr  # AB's LR rebound multiplies this inside step()
            with accelerator.accumulate(model):
                logits = model(pixel_values=batch["pixel_values"]).logits
                targets = batch["labels"]
                valid = (targets != common.IGNORE_INDEX).sum().clamp(min=1)
                loss = F.cross_entropy(logits.float(), targets, reduction="sum",
                                       label_smoothing=cfg.label_smoothing,
                                       ignore_index=common.IGNORE_INDEX) / valid
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            record.batches_in_epoch += 1
            record.skipped += int((targets == common.IGNORE_INDEX).sum())
            record.add_loss(loss.item())
            if not accelerator.sync_gradients:
                continue
            logged = record.after_step(lr, force_log=record.step + 1 == total_steps)
            progress.update(1)
            if logged:
                progress.set_postfix(loss=f"{logged['loss']:.3f}", phase=logged["phase"])
            if cfg.checkpointing_steps and record.step % cfg.checkpointing_steps == 0:
                record.elapsed += common.now() - t0
                t0 = common.now()
                common.save_checkpoint(
                    accelerator, os.path.join(cfg.output_dir, "checkpoints",
                                              f"step_{record.step}"), record.state_dict())
            if record.step >= total_steps:
                break
        if record.batches_in_epoch >= len(train_dl):  # the epoch is complete
            record.batches_in_epoch = 0
            record.epoch = epoch + 1
            if (epoch + 1) % cfg.eval_every_epochs == 0:
                result = common.evaluate_model(model, eval_dl, accelerator, metric, len(labels))
                rec = record.log_eval(result)
                log.info("epoch %d (step %d, %s phase): top-1 %.4f, top-5 %.4f%s", epoch + 1,
                         record.step, rec["phase"], rec["top1"], rec["top5"],
                         " (the groups differ: each rank evaluates its group's model on its "
                         "shard)" if rec["groups_differ"] else "")
        if record.step >= total_steps:
            break
    progress.close()
    record.elapsed += common.now() - t0

    # ---- the end: one model on every rank, merged export, final evaluation, summary, plot
    return common.finish(cfg, accelerator, model, ab_opt, record, eval_dl, metric, labels,
                         data_desc, recipe="resnet", started=started)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except common.ConfigError as exc:
        print(f"resnet.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        common.shutdown()
