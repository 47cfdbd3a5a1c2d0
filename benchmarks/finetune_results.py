"""The fine-tuning benchmark's aggregation: the seeds of a method summarised (mean, spread)."""

from __future__ import annotations

import statistics
from typing import Any


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


SUMMARY_KEYS = ("eval_loss", "perplexity", "bytes", "wire_bytes", "dp_equivalent_bytes",
                "dp_equivalent_wire_bytes", "peak_state_bytes", "peak_rss_mb",
                "steps_per_second", "train_seconds", "trained_params_per_step")


def summarize(seeds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, spread, min and max over the seeds of each number in SUMMARY_KEYS (per-rank
    numbers averaged over the ranks of a seed first; peaks are the max over the ranks)."""
    return {k: spread([float(r[k]) for r in seeds]) for k in SUMMARY_KEYS
            if all(r.get(k) is not None for r in seeds)}


def ranks_kept(seeds: list[dict[str, Any]]) -> str | None:
    """The AB ranks of each factorization (seed 0): 'r0→r1→...' of the mean rank fraction."""
    facts = seeds[0].get("factorizations")
    if not facts:
        return None
    return "→".join(f"{f['rank_fraction']:.2f}" for f in facts)


#: The issue's comparisons: (AB method, the method it is compared with, what is equal).
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("ab-residual", "lora-half", "bytes"), ("ab-residual", "pissa-half", "bytes"),
    ("ab-residual-double", "lora", "bytes"), ("ab-residual-double", "pissa", "bytes"),
    ("ab-residual", "lora", "rank"), ("ab-residual", "pissa", "rank"),
    ("ab-residual-2lr", "lora-half", "bytes"), ("ab-residual-2lr", "pissa-half", "bytes"),
    ("ab-residual-2lr", "lora", "rank"),
)
#: At equal rank AB sends at most this share of LoRA's bytes (each rank sends one factor).
RANK_BYTES_TARGET = 0.55


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, checked on a results file (for every comparison whose two methods ran).

    At equal bytes per rank: AB's held-out loss is below the other's beyond the seed spread,
    i.e. AB's worst seed beats the other's best seed (``met``). At equal rank: AB sends at most
    RANK_BYTES_TARGET of the other's bytes (wire, ring estimate), its mean loss is within the
    larger seed std of the other's mean or better, and its peak training state (the frozen
    residual counted, as the adapter's frozen base is) is at most the other's."""
    out = []
    methods = res["methods"]
    for ab, other, equal in COMPARISONS:
        if ab not in methods or other not in methods:
            continue
        a, o = methods[ab]["summary"], methods[other]["summary"]
        la, lo = a["eval_loss"], o["eval_loss"]
        row = {"ab": ab, "other": other, "equal": equal,
               "loss_ab": la["mean"], "loss_other": lo["mean"], "gap": la["mean"] - lo["mean"],
               "std_ab": la["std"], "std_other": lo["std"], "worst_ab": la["max"],
               "best_other": lo["min"],
               "wire_ratio": a["wire_bytes"]["mean"] / o["wire_bytes"]["mean"],
               "bytes_ratio": a["bytes"]["mean"] / o["bytes"]["mean"],
               "state_ratio": a["peak_state_bytes"]["mean"] / o["peak_state_bytes"]["mean"]}
        if equal == "bytes":
            row["met"] = la["max"] < lo["min"]
        else:
            row["loss_ok"] = row["gap"] <= max(la["std"], lo["std"])
            row["met"] = (row["wire_ratio"] <= RANK_BYTES_TARGET and row["loss_ok"]
                          and row["state_ratio"] <= 1.0)
        out.append(row)
    return out
