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
