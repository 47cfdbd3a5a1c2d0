"""One accelerator, the paper's models: a dense step against an AB-phase step, and the switch.

ViT-B/16 and ResNet-50 (transformers, random init, from their configs: no download) at the
paper's per-GPU batch (ResNet-50: its local batch of 256; ViT-B/16: 64, its global 4096 over
16 nodes of 4 GPUs), bf16 autocast, AdamW. For each model:

* dense step: forward, backward and AdamW on the dense weights (what warm-up and rebound
  steps, and DDP, compute per GPU), milliseconds per step;
* factorize: the SVD and split of every factorizable weight at ``rank_cutoff`` (the switch
  at the start of an AB phase), seconds for the whole model;
* AB step, as an A-group rank and as a B-group rank (A trained, B frozen; and the reverse):
  forward x -> B -> A, backward, AdamW on the trained factor and the dense parameters;
* peak memory of each (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS).

No communication: this measures the per-GPU compute side of the trade (the traffic side is
``benchmarks/compare.py``). On a machine without CUDA it runs the same code at tiny shapes
(``--tiny``, what the test does) and says so. Prints a table; writes a JSON results file.

    python -m benchmarks.gpu_step --out benchmarks/results/gpu_step.json
    python -m benchmarks.gpu_step --tiny --steps 2 --out /tmp/gpu_step.json
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ab_accel import ABConfig, compression, convert
from ab_accel.model import ab_layers


@dataclass
class Knobs:
    """What one run measures."""

    models: str = "vit,resnet"  #: comma-separated: vit (ViT-B/16), resnet (ResNet-50)
    steps: int = 10             #: timed steps per case (after 2 untimed ones)
    rank_cutoff: float = 0.15   #: the paper's tau
    tiny: bool = False          #: tiny shapes (what the CPU test runs)
    out: str = "benchmarks/results/gpu_step.json"


def build(kind: str, tiny: bool) -> tuple[torch.nn.Module, int, int]:
    """(model, per-device batch, image size) from transformers' configs (random init)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if kind == "vit":
        kwargs = ({"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 128} if tiny else
                  {"image_size": 224, "patch_size": 16})  # ViT-B/16's defaults otherwise
        config = AutoConfig.for_model("vit", num_labels=1000, **kwargs)
        batch = 4 if tiny else 64
        size = kwargs["image_size"]
    else:
        kwargs = ({"embedding_size": 16, "hidden_sizes": [32, 64, 64, 128],
                   "depths": [1, 1, 1, 1]} if tiny else {})  # ResNet-50's defaults otherwise
        config = AutoConfig.for_model("resnet", num_labels=1000, layer_type="bottleneck",
                                      **kwargs)
        batch = 4 if tiny else 256
        size = 32 if tiny else 224
    return AutoModelForImageClassification.from_config(config), batch, size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(model: torch.nn.Module, batch: int, size: int, steps: int,
               device: torch.device) -> dict[str, float]:
    """Milliseconds per training step (forward, backward, AdamW) and the peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16
    _reset_peak(device)
    times = []
    for i in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    del opt
    return {"ms_per_step": 1000 * sum(times) / len(times), "peak_bytes": _peak_bytes(device),
            "trained_params": sum(p.numel() for p in params)}


def measure(kind: str, knobs: Knobs, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model, batch, size = build(kind, knobs.tiny)
    cfg = ABConfig(rank_cutoff=knobs.rank_cutoff)
    convert(model, cfg)
    model.to(device).train()
    out: dict[str, Any] = {"model": kind, "batch_per_device": batch, "image_size": size}
    out["dense"] = time_steps(model, batch, size, knobs.steps, device)
    layers = [layer for _, layer in ab_layers(model)]
    _sync(device)
    start = time.perf_counter()
    for layer in layers:  # what ABOptimizer._factorize does, without the rank agreement
        layer.factorize(layer.proposed_rank(cfg.rank_cutoff, cfg.min_rank, **cfg.rank_rule()))
    _sync(device)
    out["factorize_s"] = time.perf_counter() - start
    comp = compression(model)
    out["compression"] = {k: comp[k] for k in ("ratio", "factorized_ratio")}
    for role in ("A", "B"):
        for layer in layers:
            layer.set_role(role)
        out[f"ab_{role}"] = time_steps(model, batch, size, knobs.steps, device)
    for case in ("ab_A", "ab_B"):
        out[case]["vs_dense"] = out[case]["ms_per_step"] / out["dense"]["ms_per_step"]
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| model | batch | dense ms/step | A-group ms/step | B-group ms/step | factorize s | "
            "peak GiB dense / A / B | compression |", "|---|---|---|---|---|---|---|---|"]
    gib = 2.0**30
    for r in results:
        rows.append(
            f"| {r['model']} | {r['batch_per_device']} | {r['dense']['ms_per_step']:.1f} | "
            f"{r['ab_A']['ms_per_step']:.1f} ({r['ab_A']['vs_dense']:.2f}x) | "
            f"{r['ab_B']['ms_per_step']:.1f} ({r['ab_B']['vs_dense']:.2f}x) | "
            f"{r['factorize_s']:.2f} | {r['dense']['peak_bytes'] / gib:.2f} / "
            f"{r['ab_A']['peak_bytes'] / gib:.2f} / {r['ab_B']['peak_bytes'] / gib:.2f} | "
            f"{r['compression']['factorized_ratio']:.2f}:1 |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jsonargparse import auto_cli

    knobs = auto_cli(Knobs, args=argv, as_positional=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not knobs.tiny:
        print("gpu_step.py: no CUDA device here; running the tiny shapes on CPU instead "
              "(the numbers are no GPU measurement).", file=sys.stderr)
        knobs.tiny = True
    results = [measure(kind, knobs, device) for kind in knobs.models.split(",")]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "knobs": asdict(knobs), "torch": torch.__version__,
              "peak_memory_measured_by": ("torch.cuda.max_memory_allocated" if device.type ==
                                          "cuda" else "the process's peak RSS (ru_maxrss)"),
              "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(knobs.out)), exist_ok=True)
    with open(knobs.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"device: {report['device']} ({'tiny shapes' if knobs.tiny else 'paper shapes'}, "
          f"bf16 autocast, AdamW)\n" + table(results))
    return report


if __name__ == "__main__":
    main()
