"""Draw a recipe run from its summary.json: loss, accuracy and bytes per step, phases shaded.

    python recipes/plot.py runs/demo/ab [--baseline runs/demo/dp] [--out plot.png]

A recipe run draws <output_dir>/plot.png this way at its end; ``--baseline`` adds a ``--no-ab``
run (its loss, accuracy and the bytes its DDP comm hook counted).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import ArgumentParser

from report import read_summary

COLORS = {"warmup": "#d9d9d9", "ab": "#cfe3f7", "rebound": "#fde0c2"}
LABELS = {"warmup": "warm-up (DP)", "ab": "AB phase (groups)", "rebound": "full-rank rebound (DP)"}
AB, DP = "#1f4e9c", "#b5442b"


def draw(run: str, baseline: str | None = None, out: str | None = None) -> str:
    """Plot ``run`` (an output_dir or a summary.json) to ``out`` (default <run>/plot.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s, b = read_summary(run), read_summary(baseline) if baseline else None
    name = "AB" if s["ab"] else "DP"
    fig, (loss, acc, sent) = plt.subplots(3, 1, figsize=(10, 10), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 3, 2.4]})
    for ax in (loss, acc, sent):
        for phase, first, end in s["phases"]:
            ax.axvspan(first, end, color=COLORS.get(phase, "#ffffff"), lw=0, zorder=0)
        for step in s["sync_steps"]:
            ax.axvline(step, color="#4a4a4a", lw=0.8, ls=":", zorder=1)
        ax.grid(True, alpha=0.3)

    def series(ax: Any, summary: dict, key: str, scale: float = 1.0, **kw: Any) -> None:
        rows = [r for r in summary["history"]["train" if key == "loss" else "eval"]
                if r.get(key) is not None]
        ax.plot([r["step"] for r in rows], [scale * r[key] for r in rows], **kw)

    series(loss, s, "loss", color=AB, lw=1.6, label=f"{name} train loss", zorder=3)
    series(acc, s, "top1", 100, color=AB, marker="o", lw=1.6, label=f"{name} top-1", zorder=3)
    if s["accuracy"]["top5"] is not None:
        series(acc, s, "top5", 100, color=AB, marker="s", ls=":", ms=4, label=f"{name} top-5")
    acc.plot([s["steps"]], [100 * s["accuracy"]["top1"]], marker="*", ms=14, color=AB,
             ls="none", label="exported (merged) model top-1", zorder=4)
    if b:
        series(loss, b, "loss", color=DP, lw=1.2, ls="--", label="DP (--no-ab) train loss")
        series(acc, b, "top1", 100, color=DP, marker="o", ms=4, ls="--", label="DP top-1")
    loss.set_ylabel("train loss\n(label-smoothed CE)")
    acc.set_ylabel("eval accuracy (%)")

    per_step, unit = s["bytes_per_step"], 2.0**20
    dp_exact = per_step.get("dp_equivalent_wire")
    if dp_exact:
        sent.step(range(1, len(dp_exact) + 1), [v / unit for v in dp_exact], where="pre",
                  color="#e8a090", lw=4.5, alpha=0.8, label="DP, same steps: exact count")
    if b and b["bytes_per_step"]["wire"]:
        bw = b["bytes_per_step"]["wire"]
        sent.plot(range(1, len(bw) + 1), [v / unit for v in bw], ls="none", marker=".", ms=3,
                  color="#7a1f0e", markevery=max(1, len(bw) // 60), zorder=5,
                  label="DP --no-ab run: ring estimate of the bytes a DDP comm hook counted")
    sent.step(range(1, len(per_step["wire"]) + 1), [v / unit for v in per_step["wire"]],
              where="pre", color=AB, lw=1.4, zorder=4,
              label=f"{name}: ring estimate of the bytes {'ab_accel' if s['ab'] else 'DDP'} sent")
    sent.set(ylim=(0, None), ylabel="MiB sent per step\n(mean over ranks)",
             xlabel="optimizer step")
    handles = [Patch(color=COLORS[p], label=LABELS[p]) for p in COLORS
               if any(span[0] == p for span in s["phases"])]
    loss.legend(handles=loss.get_legend_handles_labels()[0] + handles, loc="upper right",
                fontsize=8)
    acc.legend(loc="lower right", fontsize=8)
    sent.legend(loc="upper right", fontsize=8)
    fig.suptitle(title(s), fontsize=11)
    fig.tight_layout()
    out = out or os.path.join(run if not run.endswith(".json") else os.path.dirname(run),
                              "plot.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def title(s: dict[str, Any]) -> str:
    what = (f"AB ({s['ab_config']['sync_mode']}, group size {s['group_size']})" if s["ab"]
            else "plain DP (--no-ab)")
    line = [f"top-1 {100 * s['accuracy']['top1']:.1f}% (merged export)"]
    if "reduction_vs_dp" in s["traffic"]:
        line.append(f"traffic {100 * s['traffic']['reduction_vs_dp']:.0f}% below DP's")
    if "compression" in s:
        line.append(f"compression {s['compression']['factorized_ratio']:.2f}:1 (factorized "
                    f"layers' parameters)")
    return (f"{s['recipe']} on {s['data_short']}, {s['ranks']} ranks, {s['steps']} steps, "
            f"{what}\n" + ", ".join(line))


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="output_dir of a recipe run (holds summary.json)")
    parser.add_argument("--baseline", type=str | None, help="output_dir of a --no-ab run")
    parser.add_argument("--out", type=str | None, help="PNG path (default: <run>/plot.png)")
    args = parser.parse_args(sys.argv[1:])
    print(draw(args.run, args.baseline, args.out))
