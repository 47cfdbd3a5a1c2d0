"""What a run measures and writes down: evaluation (top-1, top-k), metrics.jsonl (an Accelerate
tracker), the run's history (checkpointed with it), the merged export, and summary.json (once,
at the end).

Each figure names what it is computed on: accuracy is the exported (merged) model's; traffic is
the ring estimate of the bytes counted by ab_accel's meter (or, for ``--no-ab``, by
``ab_accel.ddp.DDPTraffic``, a DDP comm hook); compression is the dense / AB parameter count of
the last factorization (``ABOptimizer.report()``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from accelerate.tracking import GeneralTracker

logger = logging.getLogger("recipes")


class JSONLTracker(GeneralTracker):
    """An Accelerate tracker: every ``accelerator.log`` call is one JSON line of ``path``."""

    name, requires_logging_directory = "jsonl", False

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.restart_from = path, []  # a resumed run: the records it restarts from

    @property
    def tracker(self) -> str:
        return self.path

    def start(self) -> None:  # main process only, from accelerator.init_trackers
        with open(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.restart_from)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")


def hyperparameters(args: Any) -> dict[str, Any]:
    """The scalar knobs, ab_training's flattened: what trackers take as hyperparameters."""
    values = {**dataclasses.asdict(args), **{f"ab_training.{k}": v for k, v in
                                             args.ab_training.to_dict().items()}}
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


class RunLog:
    """Where the run is (step, epoch, batch) and its history: the train loss (mean over the
    ranks, every ``log_every`` steps) and the evaluations. Registered for checkpointing."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator, self.losses, self.lr, self.phase = accelerator, [], 0.0, ""
        self.step = self.epoch = self.batches_in_epoch = 0
        self.elapsed, self.train, self.evals = 0.0, [], []

    def flush(self, skipped_steps: int) -> dict[str, Any] | None:
        """Log the mean loss since the last flush (collective); returns the record."""
        import torch

        acc = self.accelerator
        total, count = acc.reduce(torch.tensor([sum(self.losses), len(self.losses)],
                                               dtype=torch.float64, device=acc.device)).tolist()
        self.losses = []
        if not count:
            return None
        record = {"step": self.step, "epoch": self.epoch, "loss": total / count, "lr": self.lr,
                  "phase": self.phase, "skipped_steps": skipped_steps}
        self.train.append(record)
        acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    def log_eval(self, result: dict[str, Any], final: bool = False, **extra: Any
                 ) -> dict[str, Any]:
        record = {"step": self.step, "epoch": self.epoch, **result, **extra}
        self.evals += [] if final else [record]
        self.accelerator.log({f"{'final' if final else 'eval'}/{k}": v for k, v in record.items()
                              if k != "step" and v is not None}, step=self.step)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "epoch", "batches_in_epoch", "elapsed",
                                              "train", "evals")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def top_k_hits(ranked: Any, labels: Any) -> tuple[int, int]:
    """(top-1 hits, top-k hits) of class indices ranked best first, shape (N, k)."""
    hits = ranked == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def evaluate(model: Any, loader: Any, accelerator: Any, num_labels: int,
             unreadable: Any, k: int = 5) -> dict[str, Any]:
    """Top-1 and top-k of the whole eval set: each rank runs its shard, gather_for_metrics
    collects the predictions (without the last batch's padding). Top-k is not reported when
    k >= the number of classes (it would be 1.0 by construction)."""
    import torch
    from accelerate.utils import gather_object

    from data import IGNORE_INDEX

    was_training, hit1, hitk, count = model.training, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            ranked = model(pixel_values=batch["pixel_values"]).logits.topk(
                min(k, num_labels), dim=-1).indices
            ranked, labels = accelerator.gather_for_metrics((ranked, batch["labels"]))
            unreadable.add(batch["index"], batch["labels"])
            keep = labels != IGNORE_INDEX
            h1, hk = top_k_hits(ranked[keep], labels[keep])
            hit1, hitk, count = hit1 + h1, hitk + hk, count + int(keep.sum())
    model.train(was_training)
    unreadable.flush(gather_object, accelerator.is_main_process)
    return {"top1": hit1 / max(1, count), f"top{k}": hitk / max(1, count) if num_labels > k
            else None, "count": count, "skipped": len(unreadable.seen)}


def log_start(args: Any, accelerator: Any, model: Any, ab_opt: Any, total_steps: int) -> None:
    """Who runs what, for how long, with which schedule; a run that never reaches AB says so."""
    params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    logger.info("%d process(es) on %s (%s), %s parameters, %s, %d steps of %d images",
                accelerator.num_processes, accelerator.device.type,
                accelerator.distributed_type.value, f"{params:,}",
                f"fine-tuning {args.model_name_or_path}" if args.model_name_or_path
                else "from scratch", total_steps, args.batch_size)
    if accelerator.num_processes == 1:
        logger.warning("one process: nothing is sent between processes, so this run compares "
                       "nothing (its traffic is 0 with AB-training and without). For a real "
                       "comparison on CPU: accelerate launch --multi_gpu --num_processes 4 "
                       "recipes/%s.py ...", "vit" if "vit" in args.model_type else "resnet")
    if ab_opt is None:
        logger.info("AB-training off (--no-ab): plain data parallel (DDP all-reduce)")
        return
    if ab_opt.schedule.never_ab(total_steps):
        logger.warning(ab_opt.schedule.never_ab(total_steps))
    plan = ab_opt.groups.plan
    logger.info("AB-training: %d layers, %s, groups %s, roles %s; %s", len(ab_opt.ranks),
                ab_opt.config.sync_mode, [list(g) for g in plan.groups],
                [str(r) for r in plan.roles], ab_opt.schedule.summary(total_steps))


def export_merged(accelerator: Any, model: Any, optimizer: Any, eval_ds: Any, args: Any
                  ) -> dict[str, Any]:
    """``ab_accel.accelerate.save_merged`` (the AB layers merged on every rank, save_pretrained
    with an image processor: pipeline() works on the folder), checked: the merged model gives
    the AB model's logits on a probe batch. The probe and the AB logits go to export_check.pt,
    to compare a plain-transformers load with."""
    import torch
    from transformers import ViTImageProcessor

    from ab_accel.accelerate import save_merged

    n, net = min(8, len(eval_ds)), accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    probe = torch.stack([eval_ds[i]["pixel_values"] for i in range(n)]).to(accelerator.device)
    net.eval()
    with torch.no_grad():
        before = net(pixel_values=probe).logits.float()
        facts = save_merged(accelerator, model, optimizer, os.path.join(
            args.output_dir, "model") if args.save_model else None, processor=ViTImageProcessor(
            size={"height": args.image_size, "width": args.image_size},
            image_mean=args.image_mean, image_std=args.image_std))
        after = net(pixel_values=probe).logits.float()  # merged in place
    if accelerator.is_main_process and args.save_model:
        torch.save({"pixel_values": probe.cpu(), "logits": before.cpu()},
                   os.path.join(args.output_dir, "export_check.pt"))
    return {"dir": facts["dir"], "probe_images": n,
            "max_abs_logit_diff_ab_vs_merged": float((before - after).abs().max())}


def summarize(*, recipe: str, args: Any, ab: dict[str, Any] | None, record: RunLog,
              traffic: dict[str, Any], final: dict[str, Any], classes: int, **facts: Any
              ) -> dict[str, Any]:
    """summary.json (written once, main process), the printed line, and plot.png.

    ``ab``: ``ABOptimizer.report()`` (None for --no-ab); ``traffic``: every rank's bytes summed
    (``ab_accel.comm.world_traffic``); ``facts``: further entries (data, export, wall_time_s...).
    """
    wire, dp = traffic["wire_bytes"], traffic.get("dp_equivalent_wire_bytes", 0.0)
    s: dict[str, Any] = {
        "recipe": recipe, "ab": ab is not None, "ranks": len(traffic["per_rank"]),
        "steps": record.step,
        "data_short": os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir
        else args.dataset_name or "digits", **facts,
        "accuracy": {"top1": final["top1"], "top5": final["top5"], "count": final["count"],
                     "of": "the exported (merged) model"},
        "traffic": {**{k: v for k, v in traffic.items() if k != "per_step"},
                    "what": "ring estimate of the bytes all ranks sent (2(g-1)/g of an "
                            "all-reduce's payload over g ranks), summed over the ranks"},
        "train_time_s": record.elapsed,
        "bytes_per_step": {"wire": [w for w, _ in traffic["per_step"]]},
        "history": {"train": record.train, "eval": record.evals},
        "config": dataclasses.asdict(args), "plot": os.path.join(args.output_dir, "plot.png"),
        "skipped_steps": ab["skipped_steps"] if ab else 0,
        "phases": ab["phases"] if ab else [("dp", 0, record.step)],
        "switches": ab["switches"] if ab else [], "sync_steps": ab["sync_steps"] if ab else []}
    if final["top5"] is None:
        s["accuracy"]["top5_note"] = f"top-5 not reported: {classes} classes (it would be 1.0)"
    if ab is not None:
        s.update(ab_config=ab["config"], layer_ranks_at_end=ab["layer_ranks"],
                 **{k: ab[k] for k in ("group_size", "groups", "roles", "compression")})
        s["bytes_per_step"]["dp_equivalent_wire"] = [d for _, d in traffic["per_step"]]
    if args.baseline_run:
        base = read_summary(args.baseline_run)
        s["baseline"] = {"steps": base["steps"], "ranks": base["ranks"], "top1": base[
            "accuracy"]["top1"], "wire_bytes": base["traffic"]["wire_bytes"]}
        if (base["steps"], base["ranks"]) == (s["steps"], s["ranks"]) and wire:
            s["baseline"]["measured_reduction"] = 1.0 - wire / base["traffic"]["wire_bytes"]
    with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
        json.dump(s, fh, indent=2, default=str)
    c = s.get("compression")
    print(f"== {recipe} on {s['data_short']}: {s['ranks']} ranks, {s['steps']} steps, "
          f"{s['wall_time_s']:.0f} s; top-1 {final['top1']:.4f} (the exported merged model); "
          + (f"{wire / 2**20:.2f} MiB sent (ring estimate, all ranks, {traffic['measured_by']})"
             if s["ranks"] > 1 else "nothing sent (one process: this run compares nothing; "
             "launch several, e.g. --multi_gpu --num_processes 4)")
          + (f", {abs(100 * (1 - wire / dp)):.1f}% {'less' if wire <= dp else 'more'} than the "
             f"DP-equivalent count of the same steps" if dp else "")
          + (f"; {s['skipped_steps']} non-finite step(s) skipped" if s["skipped_steps"] else "")
          + (f"; compression {c['factorized_ratio']:.2f}:1 on the factorized layers "
             f"({c['of']})" if c else "") + f"; {args.output_dir}/summary.json", flush=True)
    try:  # drawn from the file just written, by recipes/plot.py
        import plot

        plot.draw(args.output_dir, args.baseline_run)
    except ImportError as exc:
        logger.warning("no plot (%s); later: python recipes/plot.py %s", exc, args.output_dir)
    return s


def read_summary(path: str) -> dict[str, Any]:
    """<path>/summary.json (or path itself when it is a .json file)."""
    file = path if path.endswith(".json") else os.path.join(path, "summary.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path!r} holds no summary.json: run the recipe with that "
                                f"--output_dir first.")
    with open(file) as fh:
        return json.load(fh)
