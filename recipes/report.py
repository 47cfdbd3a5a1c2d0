"""What a run writes down: metrics.jsonl (an Accelerate tracker), what plain DDP sends, the run's
history (checkpointed with it), the merged export, and summary.json (once, at the end).

Each figure names what it is computed on: accuracy is the exported (merged) model's; traffic is
the ring estimate of the bytes counted by ab_accel's meter (or, for ``--no-ab``, by a DDP comm
hook); compression is the dense / AB parameter count after the last factorization.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from accelerate.tracking import GeneralTracker

from ab_accel.comm import wire_factor

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


class DDPTraffic:
    """What plain DDP sends on this rank (the ``--no-ab`` baseline): a comm hook counts every
    gradient bucket and runs torch's all-reduce hook; a forward pre-hook counts the buffer
    broadcasts DDP decides to make. Wire bytes: the ring estimate of ab_accel's meter."""

    def __init__(self, ddp_model: Any, world_size: int) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.world_size, self.grad_bytes, self.buffer_bytes = world_size, 0, 0
        self._allreduce = default_hooks.allreduce_hook
        ddp_model.register_comm_hook(self, DDPTraffic._hook)
        self._buffers = sum(b.numel() * b.element_size() for b in ddp_model.buffers())
        ddp_model.register_forward_pre_hook(self._count_buffers)

    @staticmethod
    def _hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        state.grad_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return state._allreduce(None, bucket)  # the default (world) process group

    def _count_buffers(self, module: Any, args: Any) -> None:
        self.buffer_bytes += self._buffers if module.will_sync_module_buffers() else 0

    @property
    def wire_bytes(self) -> float:
        return (self.grad_bytes * wire_factor("all_reduce", self.world_size)
                + self.buffer_bytes * wire_factor("broadcast", self.world_size))

    def summary(self) -> dict[str, Any]:
        return {"measured_by": "DDP comm hook (gradients) + buffer broadcasts", "wire_bytes":
                self.wire_bytes, "bytes": self.grad_bytes + self.buffer_bytes, **self.state_dict()}

    def state_dict(self) -> dict[str, int]:
        return {"grad_bytes": self.grad_bytes, "buffer_bytes": self.buffer_bytes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__dict__.update(state)


class RunLog:
    """The run's history, the same on every rank: train loss (mean over the ranks), evaluations,
    and the wire bytes of every optimizer step (mean over the ranks, switches included).

    ``meter()``: this rank's cumulative (wire, DP-equivalent wire) bytes. :meth:`flush` (every
    ``log_every`` steps and before a checkpoint) reduces the losses and gathers the bytes, as
    bookkeeping the meter does not count. Saved with ``accelerator.save_state`` (registered for
    checkpointing: written by the main process, loaded by every rank).
    """

    def __init__(self, accelerator: Any, meter: Any, skipped: Any = lambda: 0) -> None:
        self.accelerator, self.meter, self.skipped = accelerator, meter, skipped
        self.step = self.epoch = self.batches_in_epoch = 0
        self.elapsed, self.losses = 0.0, []
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.wire: list[float] = []
        self.dp_wire: list[float] = []
        self._pending: list[tuple[float, float]] = []
        self._last, self._lr, self._phase = meter(), 0.0, ""

    def after_step(self, lr: float, phase: str) -> None:
        now = self.meter()
        self._pending.append((now[0] - self._last[0], now[1] - self._last[1]))
        self._last, self._lr, self._phase, self.step = now, lr, str(phase), self.step + 1

    def flush(self) -> dict[str, Any] | None:
        """Record the steps since the last flush; returns the loss record (logged)."""
        import torch

        acc = self.accelerator
        totals = acc.reduce(torch.tensor([sum(self.losses), len(self.losses)],
                                         dtype=torch.float64, device=acc.device), "sum")
        if self._pending:
            sent = acc.gather(torch.tensor(self._pending, dtype=torch.float64, device=acc.device))
            for wire, dp in sent.reshape(acc.num_processes, -1, 2).mean(0).tolist():
                self.wire.append(wire)
                self.dp_wire.append(dp)
        self.losses, self._pending = [], []
        if not totals[1]:
            return None
        record = {"step": self.step, "epoch": self.epoch, "loss": float(totals[0] / totals[1]),
                  "lr": self._lr, "phase": self._phase, "skipped_steps": self.skipped()}
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
                                              "train", "evals", "wire", "dp_wire")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last = self.meter()  # the meters are restored first (registered earlier)


def phase_of(ab_opt: Any) -> str:
    """The phase of the last optimizer step ("dp" without AB-training)."""
    return str(ab_opt.schedule.phase(max(0, ab_opt.step_count - 1))) if ab_opt else "dp"


def log_start(args: Any, accelerator: Any, model: Any, ab_opt: Any, total_steps: int) -> None:
    """Who runs what, for how long, with which schedule."""
    model, n = accelerator.unwrap_model(model), accelerator.num_processes
    logger.info("%d process(es) on %s (%s), %s parameters, %s, %d steps of %d images",
                n, accelerator.device.type, accelerator.distributed_type.value,
                f"{sum(p.numel() for p in model.parameters()):,}",
                f"fine-tuning {args.model_name_or_path}" if args.model_name_or_path
                else "from scratch", total_steps, args.batch_size)
    if ab_opt is None:
        logger.info("AB-training off (--no-ab): plain data parallel (DDP all-reduce)")
    else:
        spans = ab_opt.schedule.describe(total_steps)
        if never_ab(spans):
            logger.warning(never_ab(spans))
        logger.info("AB-training: %d layers, %s, groups %s, roles %s; %s%s", len(ab_opt.ranks),
                    ab_opt.config.sync_mode, [list(g) for g in ab_opt.groups.plan.groups],
                    [str(r) for r in ab_opt.groups.plan.roles],
                    ", ".join(f"{p} {a}-{b - 1}" for p, a, b in spans[:7]),
                    " ..." if len(spans) > 7 else "")


def never_ab(spans: list[tuple[Any, int, int]]) -> str | None:
    """What to say at the start of a run whose phases (``ABSchedule.describe``) hold no AB step."""
    if any(str(p) == "ab" for p, _, _ in spans):
        return None
    total = spans[-1][2] if spans else 0
    return (f"this run of {total} steps never reaches an AB phase (it ends within the "
            f"ab_training warm-up): it is plain data parallel throughout, so its traffic "
            f"reduction against DP will be ~0 (slightly below: one flag per parameter each "
            f"step). Lower --ab_training.warmup_steps or raise --max_steps / --epochs.")


def export_merged(model: Any, eval_ds: Any, args: Any, accelerator: Any) -> dict[str, Any]:
    """Merge the AB layers (every rank: they hold one model now), check the merged model gives
    the AB model's logits on a probe batch, save_pretrained (main process); the probe and the
    AB logits go to export_check.pt, to compare a plain-transformers load with."""
    import torch
    from transformers import ViTImageProcessor

    from ab_accel import merge

    n = min(8, len(eval_ds))
    probe = torch.stack([eval_ds[i]["pixel_values"] for i in range(n)]).to(accelerator.device)
    model.eval()
    with torch.no_grad():
        before = model(pixel_values=probe).logits.float()
        merge(model)
        after = model(pixel_values=probe).logits.float()
    out = os.path.join(args.output_dir, "model")
    if accelerator.is_main_process and args.save_model:
        model.save_pretrained(out)  # with an image processor: pipeline() works on the folder
        ViTImageProcessor(size={"height": args.image_size, "width": args.image_size},
                          image_mean=args.image_mean, image_std=args.image_std).save_pretrained(out)
        torch.save({"pixel_values": probe.cpu(), "logits": before.cpu()},
                   os.path.join(args.output_dir, "export_check.pt"))
    accelerator.wait_for_everyone()
    return {"dir": out if args.save_model else None, "probe_images": n,
            "max_abs_logit_diff_ab_vs_merged": float((before - after).abs().max())}


def summarize(*, recipe: str, args: Any, ab_opt: Any, record: RunLog, per_rank: list[dict],
              final: dict[str, Any], classes: int, export: dict[str, Any],
              at_end: dict[str, Any] | None, data: str, wall_time_s: float,
              skipped: dict[str, int]) -> dict[str, Any]:
    """summary.json (written once, main process), the printed line, and plot.png."""
    switches = [w.to_dict() for w in ab_opt.switches] if ab_opt else []
    wire = sum(t["wire_bytes"] for t in per_rank)
    dp = sum(t.get("dp_equivalent_wire_bytes", 0.0) for t in per_rank)
    by_phase: dict[str, float] = {}
    for phase, value in (kv for t in per_rank for kv in t.get("wire_bytes_by_phase", {}).items()):
        by_phase[phase] = by_phase.get(phase, 0.0) + value
    s: dict[str, Any] = {
        "recipe": recipe, "data": data, "ab": ab_opt is not None, "ranks": len(per_rank),
        "data_short": os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir
        else args.dataset_name or "digits", "steps": record.step,
        "accuracy": {"top1": final["top1"], "top5": final["top5"], "count": final["count"],
                     "of": "the exported (merged) model"},
        "traffic": {"wire_bytes": wire, "bytes": sum(t["bytes"] for t in per_rank),
                    "wire_bytes_by_phase": by_phase, "per_rank": per_rank,
                    "what": "ring estimate of the bytes all ranks sent (2(g-1)/g of an "
                            "all-reduce's payload over g ranks), summed over the ranks"},
        "wall_time_s": wall_time_s, "train_time_s": record.elapsed, "export": export,
        "skipped_images": skipped, "switches": switches,
        "skipped_steps": ab_opt.skipped_steps if ab_opt else 0,
        "phases": ab_opt.schedule.describe(record.step) if ab_opt else [("dp", 0, record.step)],
        "sync_steps": [w["step"] for w in switches if w["event"] == "sync"],
        "bytes_per_step": {"wire": record.wire},
        "history": {"train": record.train, "eval": record.evals},
        "config": dataclasses.asdict(args), "plot": os.path.join(args.output_dir, "plot.png")}
    if final["top5"] is None:
        s["accuracy"]["top5_note"] = f"top-5 not reported: {classes} classes (it would be 1.0)"
    if dp:
        s["traffic"].update(dp_equivalent_wire_bytes=dp, reduction_vs_dp=1.0 - wire / dp)
    if ab_opt is not None:
        facts = [w for w in switches if w["event"] == "factorize"]
        last, plan = facts[-1]["compression"] if facts else {}, ab_opt.groups.plan
        when = "" if not facts else "at the end of the run" if facts[-1]["step"] >= \
            record.step else f"at step {facts[-1]['step']}"
        s.update(ab_config=ab_opt.config.to_dict(), group_size=plan.group_size,
                 groups=[list(g) for g in plan.groups], roles=[str(r) for r in plan.roles],
                 layer_ranks_at_end=at_end["ranks"], compression={
                     "ratio": last.get("ratio", 1.0),
                     "factorized_ratio": last.get("factorized_ratio", 1.0),
                     "params_dense": last.get("params_dense"), "params_ab": last.get("params_now"),
                     "of": f"parameter count, dense / AB, of the last factorization ({when}), "
                           f"from ABOptimizer.switches" if facts else "no factorization happened",
                     "ratio_at_end": at_end["compression"]["ratio"]})
        s["bytes_per_step"]["dp_equivalent_wire"] = record.dp_wire
    if args.baseline_run:
        base = read_summary(args.baseline_run)
        s["baseline"] = {"steps": base["steps"], "ranks": base["ranks"], "top1": base[
            "accuracy"]["top1"], "wire_bytes": base["traffic"]["wire_bytes"]}
        if (base["steps"], base["ranks"]) == (s["steps"], s["ranks"]) and wire:
            s["baseline"]["measured_reduction"] = 1.0 - wire / base["traffic"]["wire_bytes"]
    write_json(os.path.join(args.output_dir, "summary.json"), s)
    c = s.get("compression")
    print(f"== {recipe} on {s['data_short']}: {s['ranks']} ranks, {s['steps']} steps, "
          f"{wall_time_s:.0f} s; top-1 {final['top1']:.4f} (the exported merged model); "
          f"{wire / 2**20:.2f} MiB sent (ring estimate, all ranks, {per_rank[0]['measured_by']})"
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


def write_json(path: str, data: Any) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)
