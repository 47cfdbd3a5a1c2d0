"""Project AB-training's traffic for the paper's ImageNet schedules, at 2 to 64 nodes.

No training: the per-rank bytes of every phase are counted from the real parameter shapes
(transformers' ViT-B/16 and ResNet-50 built from the configs in ``configs/``, offline, on the
meta device, converted with ``ab_accel.convert``; each AB layer's ``out_dim`` x ``in_dim``) and
the schedule (W0, T, F, global batch for each node count) of ``configs/*_imagenet*.yaml``, the
paper's table (Coquelin et al., arXiv 2405.01067). The rank each factorization keeps is the
one unknown: ``--rank-fraction`` gives it as a share of the full rank min(out, in) (clamped to
[1, the break-even rank]), or ``--from-results`` takes the mean share a benchmark run measured.

The arithmetic is that of ab_accel's TrafficMeter (ring estimate, bytes sent per rank):

* DDP step: every trainable gradient plus every float buffer, all-reduced over the world of
  n ranks: (P + buffers) * e * 2(n-1)/n. AB's warm-up and rebound steps send the same plus
  one "gradient used" flag per trained tensor (ab_accel keeps unused gradients None) and one
  non-finite count (the skip decision);
* AB step: the dense parameters (everything not factorized: biases, norms, first and last
  layer) + buffers + the trained factor (A: out x r; B: r x in) + the flags, over the own
  group of g ranks, times 2(g-1)/g; averaged over the A-group and B-group ranks (B only in
  ``only-b``); plus, with several groups, the world's finite-step flag (one int64, "check");
* sync (once per cycle): the factors (``with-stale`` / ``only-learned``: A and B; ``only-b``:
  B; ``full``: A B), the dense parameters, the buffers and the dense parameters' AdamW moments,
  over the world;
* factorize: one integer per layer (rank agreement) and a 2-double digest, over the world;
* every switch (sync or factorize) first checks that every rank's tensors are finite: one
  int64 over the world.

    python -m benchmarks.projection --rank-fraction 0.1,0.2,0.3
    python -m benchmarks.projection --from-results benchmarks/results/local.json
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import ArgumentParser
from torch import nn

from ab_accel import ABConfig, ABSchedule, convert
from ab_accel.comm import wire_factor
from ab_accel.layers import break_even_rank
from ab_accel.model import ab_layers
from benchmarks.meters import ring_crossings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: ImageNet-1k training images: steps per epoch = ceil(IMAGENET_TRAIN / global batch).
IMAGENET_TRAIN = 1_281_167
#: The paper's reported average traffic reduction against DP, across scales.
PAPER_REDUCTION = 0.70
#: The runs of the paper's table, read from the recipes' configs.
RUNS = (
    ("ViT-B/16 (only-b)", "vit_b16_imagenet.yaml", "vit"),
    ("ResNet-50 groups (with-stale)", "resnet50_imagenet.yaml", "resnet"),
    ("ResNet-50 no groups (only-b)", "resnet50_imagenet_nogroups.yaml", "resnet"),
)


@dataclass
class LayerShape:
    """One factorized layer: the matrix view out x in."""

    name: str
    out_dim: int
    in_dim: int

    def rank(self, fraction: float) -> int:
        r = math.ceil(fraction * min(self.out_dim, self.in_dim))
        return max(1, min(r, break_even_rank(self.out_dim, self.in_dim)))


@dataclass
class ModelShape:
    """What the traffic depends on: factorized shapes, dense parameters and float buffers."""

    layers: list[LayerShape]
    dense_params: int  # trainable parameters outside the factorized weights (biases included)
    buffers: int  # floating-point buffer elements (BatchNorm running statistics)
    dense_tensors: int = 0  # how many dense parameter tensors (one "used" flag each per step)

    @property
    def total_params(self) -> int:
        return self.dense_params + sum(la.out_dim * la.in_dim for la in self.layers)


def model_shape(model: nn.Module, config: ABConfig | None = None) -> ModelShape:
    """Convert ``model`` (in place, meta tensors are fine) and read its shapes."""
    convert(model, config if config is not None else ABConfig())
    layers = [LayerShape(n, la.out_dim, la.in_dim) for n, la in ab_layers(model)]
    factor_ids = {id(la.weight) for _, la in ab_layers(model)}
    seen: set[int] = set()
    dense = tensors = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in factor_ids or not p.requires_grad:
            continue
        seen.add(id(p))
        dense += p.numel()
        tensors += 1
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return ModelShape(layers, dense, buffers, tensors)


def project(shape: ModelShape, *, steps: int, world: int, group_size: int, sync_mode: str,
            warmup_steps: int, sync_every: int, rebound_steps: int, rank_fraction: float,
            bytes_per_element: int = 4, optimizer_moments: int = 2,
            ranks_per_node: int | None = None) -> dict[str, Any]:
    """Per-rank bytes sent (ring estimate) by DDP and by AB-training over ``steps`` steps.

    Returns the DDP total, AB's total and per-phase totals (the meter's phase labels), the
    steps per phase, the ranks used and the reduction 1 - AB / DDP. With ``ranks_per_node``,
    also the bytes that cross between nodes (mean per rank; rings over consecutive ranks, as
    :func:`benchmarks.meters.predicted_link_bytes` counts them): a group inside one node
    sends nothing between nodes.
    """
    e = bytes_per_element
    sched = ABSchedule(warmup_steps, sync_every, rebound_steps)
    ranks = [la.rank(rank_fraction) for la in shape.layers]
    n, g = world, group_size
    dp_step = (shape.total_params + shape.buffers) * e * wire_factor("all_reduce", n)
    full_flags = shape.dense_tensors + len(shape.layers) + 1  # per trained tensor, + non-finite
    full_step = dp_step + full_flags * e * wire_factor("all_reduce", n)
    base = shape.dense_params + shape.buffers
    ab_flags = shape.dense_tensors + len(shape.layers) + 1  # dense, one factor/layer, non-finite
    a_numel = sum(la.out_dim * r for la, r in zip(shape.layers, ranks, strict=True))
    b_numel = sum(r * la.in_dim for la, r in zip(shape.layers, ranks, strict=True))
    if sync_mode == "only-b":
        ab_numel = base + ab_flags + b_numel
    else:  # half the groups train A, half train B (G even; world / g groups)
        groups = n // g
        n_a = groups // 2
        ab_numel = base + ab_flags + (n_a * a_numel + (groups - n_a) * b_numel) / groups
    ab_step = ab_numel * e * wire_factor("all_reduce", g)
    # with several groups the world learns whether every group's step is finite: one int64
    check_step = 8 * wire_factor("all_reduce", n) if n // g > 1 else 0.0
    if sync_mode == "only-b":
        sync_factors = b_numel
    elif sync_mode == "full":
        sync_factors = sum(la.out_dim * la.in_dim for la in shape.layers)
    else:
        sync_factors = a_numel + b_numel
    sync_numel = sync_factors + base + optimizer_moments * shape.dense_params
    sync_bytes = sync_numel * e * wire_factor("all_reduce", n)
    # rank agreement (int64 per layer) and the SVD digest (2 float64), one MAX all-reduce each
    factorize_bytes = (8 * len(shape.layers) + 16) * wire_factor("all_reduce", n)
    switch_check = 8 * wire_factor("all_reduce", n)  # every switch: are all tensors finite?
    sync_bytes += switch_check
    factorize_bytes += switch_check

    steps_by_phase = {"warmup": 0, "ab": 0, "rebound": 0}
    for phase, first, end in sched.describe(steps):
        steps_by_phase[phase] += end - first
    syncs = factorizations = 0
    for b in range(1, steps + 1):
        events = sched.events(b)
        syncs += "sync" in events
        factorizations += "factorize" in events
    out_extra: dict[str, Any] = {}
    if ranks_per_node:
        def node_of(rank: int) -> int:
            return rank // ranks_per_node

        world_share = ring_crossings(range(n), node_of) / n
        group_share = statistics.fmean(
            ring_crossings(range(k * g, (k + 1) * g), node_of) / g for k in range(n // g))
        dense_phase_bytes = (steps_by_phase["warmup"] + steps_by_phase["rebound"]) * full_step
        ab_link = (world_share * (dense_phase_bytes + syncs * sync_bytes
                                  + factorizations * factorize_bytes)
                   + group_share * steps_by_phase["ab"] * ab_step
                   + world_share * steps_by_phase["ab"] * check_step)
        ddp_link = world_share * steps * dp_step
        out_extra = {"ranks_per_node": ranks_per_node, "ddp_internode_bytes": ddp_link,
                     "ab_internode_bytes": ab_link,
                     "internode_reduction": 1.0 - ab_link / ddp_link if ddp_link else 0.0}
    by_phase = {
        "warmup": steps_by_phase["warmup"] * full_step,
        "ab": steps_by_phase["ab"] * ab_step,
        "rebound": steps_by_phase["rebound"] * full_step,
        "sync": syncs * sync_bytes + factorizations * factorize_bytes,
        "check": steps_by_phase["ab"] * check_step,
    }
    ab_total = sum(by_phase.values())
    ddp_total = steps * dp_step
    dense_steps = steps_by_phase["warmup"] + steps_by_phase["rebound"]
    return {
        "steps": steps, "world": world, "group_size": group_size, "sync_mode": sync_mode,
        "schedule": {"warmup_steps": warmup_steps, "sync_every": sync_every,
                     "rebound_steps": rebound_steps},
        "rank_fraction": rank_fraction, "ranks": ranks,
        "steps_by_phase": steps_by_phase, "syncs": syncs, "factorizations": factorizations,
        "ddp_bytes_per_step": dp_step, "ab_bytes_per_ab_step": ab_step,
        "ddp_bytes": ddp_total, "ab_bytes": ab_total, "ab_bytes_by_phase": by_phase,
        "reduction": 1.0 - ab_total / ddp_total if ddp_total else 0.0,
        "ab_phase_reduction": 1.0 - ab_step / dp_step if dp_step else 0.0,
        # the reduction if AB phases and syncs sent nothing at all: the schedule's ceiling
        "schedule_ceiling": 1.0 - dense_steps / steps if steps else 0.0,
        **out_extra,
    }


# ---------------------------------------------------------------------------- the paper's runs
def load_config(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise SystemExit(
            f"{path} does not exist: projection.py reads the paper's schedules from the "
            f"recipes' configs (configs/vit_b16_imagenet.yaml, configs/resnet50_imagenet.yaml, "
            f"configs/resnet50_imagenet_nogroups.yaml). Pass --configs DIR.")
    with open(path) as fh:
        return yaml.safe_load(fh)


def build_imagenet_model(kind: str, cfg: dict[str, Any]) -> nn.Module:
    """transformers' ViT or ResNet from the config's ``model`` block, on the meta device."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    with torch.device("meta"):
        if kind == "vit":
            return ViTForImageClassification(ViTConfig(
                image_size=cfg.get("image_size", 224), num_labels=1000, **cfg["model"]))
        return ResNetForImageClassification(ResNetConfig(num_labels=1000, **cfg["model"]))


def project_run(label: str, cfg: dict[str, Any], shape: ModelShape, nodes: list[int],
                rank_fraction: float, bytes_per_element: int) -> list[dict[str, Any]]:
    rows = []
    ab = cfg.get("ab_training", {})
    table = {int(k): v for k, v in (cfg.get("ab_schedule_by_nodes") or {}).items()}
    gpus = int(cfg.get("gpus_per_node", 4))
    for n_nodes in nodes:
        if n_nodes not in table:
            continue
        row_cfg = table[n_nodes]
        sched = {**ab, **row_cfg.get("ab_training", {})}
        batch = int(row_cfg.get("batch_size", cfg.get("batch_size")))
        world = n_nodes * gpus
        group = sched.get("group_size")
        group = world if group in (None, "world") else int(group)
        steps = int(cfg["epochs"]) * math.ceil(IMAGENET_TRAIN / batch)
        out = project(shape, steps=steps, world=world, group_size=group,
                      sync_mode=sched["sync_mode"], warmup_steps=int(sched["warmup_steps"]),
                      sync_every=int(sched["sync_every"]),
                      rebound_steps=int(sched["rebound_steps"]), rank_fraction=rank_fraction,
                      bytes_per_element=bytes_per_element, ranks_per_node=gpus)
        out.pop("ranks")
        rows.append({"run": label, "nodes": n_nodes, "global_batch": batch, **out})
    return rows


def measured_rank_fraction(path: str, method: str) -> float:
    with open(path) as fh:
        res = json.load(fh)
    try:
        return float(res["methods"][method]["summary"]["rank_fraction"]["mean"])
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"{path} has no measured rank fraction for {method!r}: run "
                         f"benchmarks/compare.py with that method first") from exc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=os.path.join(ROOT, "configs"),
                   help="folder with the recipes' ImageNet configs")
    p.add_argument("--nodes", default="2,4,8,16,32,64", help="node counts (4 GPUs each)")
    p.add_argument("--rank-fraction", default=None,
                   help="comma-separated shares of the full rank kept at each factorization")
    p.add_argument("--from-results", default=None,
                   help="a compare.py results JSON: use the rank fraction it measured")
    p.add_argument("--method", default="ab-with-stale",
                   help="which AB method's measured rank fraction --from-results reads")
    p.add_argument("--bytes-per-element", type=int, default=4,
                   help="gradient element size on the wire (fp32: 4)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "projection.json"))
    args = p.parse_args(argv)

    fractions: list[tuple[str, float]] = []
    if args.rank_fraction:
        fractions += [("given", float(f)) for f in args.rank_fraction.split(",") if f.strip()]
    if args.from_results:
        fractions.append((f"measured ({args.method}, {os.path.basename(args.from_results)})",
                          measured_rank_fraction(args.from_results, args.method)))
    if not fractions:
        p.error("give --rank-fraction F[,F...] and/or --from-results RESULTS.json")
    for _, f in fractions:
        if not 0 < f <= 1:
            p.error(f"rank fractions must be in (0, 1], got {f}")
    nodes = [int(x) for x in args.nodes.split(",")]

    result: dict[str, Any] = {"paper_reduction": PAPER_REDUCTION,
                              "imagenet_train_images": IMAGENET_TRAIN,
                              "bytes_per_element": args.bytes_per_element, "models": {},
                              "rows": []}
    shapes: dict[str, ModelShape] = {}
    for label, fname, kind in RUNS:
        cfg = load_config(os.path.join(args.configs, fname))
        key = f"{kind}:{json.dumps(cfg['model'], sort_keys=True)}"
        if key not in shapes:
            shapes[key] = model_shape(build_imagenet_model(kind, cfg))
        shape = shapes[key]
        result["models"][label] = {
            "config": fname, "total_params": shape.total_params,
            "dense_params": shape.dense_params, "buffers": shape.buffers,
            "factorized_layers": len(shape.layers),
            "factorized_share": 1 - shape.dense_params / shape.total_params,
        }
        for source, frac in fractions:
            for row in project_run(label, cfg, shape, nodes, frac, args.bytes_per_element):
                row["rank_fraction_source"] = source
                result["rows"].append(row)

    summary: dict[str, Any] = {}
    for row in result["rows"]:
        key = f"{row['run']} @ {row['rank_fraction']:.3f}"
        summary.setdefault(key, {"run": row["run"], "rank_fraction": row["rank_fraction"],
                                 "source": row["rank_fraction_source"], "by_nodes": {}})
        summary[key]["by_nodes"][row["nodes"]] = {
            "reduction": row["reduction"], "schedule_ceiling": row["schedule_ceiling"],
            "ab_phase_reduction": row["ab_phase_reduction"],
            "internode_reduction": row["internode_reduction"]}
    for entry in summary.values():
        for key in ("reduction", "internode_reduction"):
            entry[f"mean_{key}"] = statistics.fmean(
                v[key] for v in entry["by_nodes"].values())
    result["summary"] = summary
    for key, what in (("reduction", "all bytes a rank sends"),
                      ("internode_reduction", "bytes between nodes")):
        print(f"\nTraffic reduction against DDP, {what} (1 - AB / DDP); in brackets the "
              f"schedule's ceiling (AB phases free). Paper: ~{PAPER_REDUCTION:.0%} on average.")
        print(f"{'run':31} {'rank frac':>9} " + " ".join(f"{n:>13}" for n in nodes)
              + "   mean")
        for entry in summary.values():
            cells = []
            for n in nodes:
                v = entry["by_nodes"].get(n)
                cells.append(f"{v[key]:5.1%} ({v['schedule_ceiling']:4.0%})" if v
                             else f"{'-':>13}")
            print(f"{entry['run']:31} {entry['rank_fraction']:9.3f} " + " ".join(cells)
                  + f"  {entry['mean_' + key]:5.1%}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    table = os.path.splitext(args.out)[0] + "_table.md"
    with open(table, "w") as fh:
        fh.write(markdown_table(summary, nodes))
    print(f"[projection] wrote {args.out} and {table}")
    return result


def markdown_table(summary: dict[str, Any], nodes: list[int]) -> str:
    """Reduction of all bytes and of inter-node bytes per run, rank fraction and node count."""
    lines = ["| run | rank fraction | " + " | ".join(f"{n} nodes" for n in nodes)
             + " | mean |", "|---|---|" + "---|" * (len(nodes) + 1)]
    for entry in summary.values():
        for metric, label in (("reduction", "all bytes"),
                              ("internode_reduction", "between nodes")):
            cells = []
            for n in nodes:
                v = entry["by_nodes"].get(n)
                cells.append(f"{v[metric]:.1%} ({v['schedule_ceiling']:.0%})" if v else "-")
            src = "measured " if entry["source"].startswith("measured") else ""
            lines.append(f"| {entry['run']}, {label} | {src}{entry['rank_fraction']:.3f} | "
                         + " | ".join(cells) + f" | {entry['mean_' + metric]:.1%} |")
    return ("Reduction against DDP per rank, 1 - AB bytes / DDP bytes (in brackets: the "
            "schedule's ceiling, if AB phases and syncs sent nothing):\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
