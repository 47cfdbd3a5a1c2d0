"""The DeepSpeed ZeRO benchmark's table (``deepspeed_zero_table.md``, pasted in BENCHMARKS.md)
and plot (``deepspeed_zero.png``), from its results file (benchmarks/deepspeed_zero.py)."""

from __future__ import annotations

import os
from typing import Any

PHASES = ("warmup", "ab", "rebound")
REFERENCE = "stage0-ab"
BASELINE = "zero2-plain"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.3f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per method: accuracy (mean +- std over the seeds), rank 0's peak moment bytes
    per phase and their ratio to stage 0's, the fp32 masters, the wire bytes and their ratio to
    DeepSpeed's own ZeRO 2, the train seconds and the ZeRO rebuilds."""
    methods = result["methods"]
    ref = methods.get(REFERENCE, {}).get("peak_moments_by_phase", {})
    base = (methods.get(BASELINE, {}).get("wire_bytes") or {}).get("mean")
    lines = [
        "| method | test accuracy | Adam moments, MB per rank (x stage 0): warm-up / AB / "
        "rebound | fp32 masters, MB per rank: warm-up / AB / rebound | wire MB per rank (x "
        "ZeRO 2 without AB) | train s | ZeRO rebuilds (s each) |",
        "|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        acc = m["accuracy"]
        moments = m["peak_moments_by_phase"]
        masters = m["peak_masters_by_phase"]
        mom = " / ".join(f"{_mb(moments.get(p))} ({_ratio(moments.get(p), ref.get(p))})"
                         if p in moments else "-" for p in PHASES)
        mas = " / ".join(_mb(masters.get(p)) if p in masters else "-" for p in PHASES)
        wire = m["wire_bytes"]["mean"]
        rebuild = m.get("rebuild_seconds")
        per = (f"{m['rebuilds']} ({rebuild['mean'] / max(m['rebuilds'], 1):.3f})"
               if rebuild else "-")
        lines.append(
            f"| {name} | {acc['mean']:.4f} +- {acc['std']:.4f} | {mom} | {mas} | "
            f"{_mb(wire)} ({_ratio(wire, base)}) | {m['train_seconds']['mean']:.1f} | {per} |")
    return "\n".join(lines)


def markdown_run(result: dict[str, Any]) -> str:
    s = result["settings"]
    load = result["machine_before"].get("loadavg", [None])[0]
    load_after = result["machine_after"].get("loadavg", [None])[0]
    return (f"`{result['command']}`: {s['nproc']} gloo ranks on "
            f"{result['machine_before'].get('cpus')} cores, seeds {s['seeds']}, {s['steps']} "
            f"optimizer steps of {s['gas']} x {s['micro_batch']} samples per rank, MLP 64-"
            f"{s['hidden']}-{s['hidden']}-{s['hidden'] // 2}-10 on sklearn's digits, AB "
            f"schedule W0={s['warmup_steps']}, T={s['sync_every']}, F={s['rebound_steps']}, "
            f"R={s['lr_rebound_steps']}; load average {load:.2f} before, {load_after:.2f} "
            f"after; world {result['world_seconds']} s.")


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(PHASES)
    for i, phase in enumerate(PHASES):
        values = [methods[n]["peak_moments_by_phase"].get(phase, 0) / 2**20 for n in names]
        axes[0].bar([k + i * width for k in range(len(names))], values, width, label=phase)
    axes[0].set_xticks([k + width for k in range(len(names))], names, rotation=20, fontsize=8)
    axes[0].set_ylabel("MB on rank 0 (peak per phase)")
    axes[0].set_title("Adam moments per rank")
    axes[0].legend(fontsize=8)
    wire = [methods[n]["wire_bytes"]["mean"] / 2**20 for n in names]
    axes[1].bar(names, wire, color="tab:gray")
    axes[1].set_ylabel("MB sent by rank 0 (ring estimate)")
    axes[1].set_title("bytes on the wire, whole run")
    axes[1].tick_params(axis="x", rotation=20, labelsize=8)
    acc = [methods[n]["accuracy"] for n in names]
    axes[2].errorbar(names, [a["mean"] for a in acc], yerr=[a["std"] for a in acc], fmt="o",
                     capsize=4)
    axes[2].set_ylabel(f"test accuracy (mean +- std, {acc[0]['n']} seeds)")
    axes[2].set_title("accuracy")
    axes[2].tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle("AB-training under DeepSpeed ZeRO (4 gloo ranks, CPU)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out: str) -> None:
    stem = os.path.splitext(out)[0]
    with open(stem + "_table.md", "w") as fh:
        fh.write(markdown_run(result) + "\n\n" + markdown_table(result) + "\n")
    plot(result, stem + ".png")


__all__ = ["markdown_table", "markdown_run", "plot", "write_report"]
