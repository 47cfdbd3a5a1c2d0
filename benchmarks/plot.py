"""Plots and a markdown table from compare.py's results JSON files.

    python benchmarks/plot.py benchmarks/results/local.json benchmarks/results/netns.json

For each file: ``<stem>_acc_vs_bytes.png`` (test accuracy against bytes sent per rank, every
method, mean over seeds), ``<stem>_acc_vs_time.png`` (test accuracy against training wall time;
on the rate-limited link this is the time-to-accuracy picture) and ``<stem>_table.md``.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import matplotlib
from jsonargparse import ArgumentParser

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

MB = 1e6


def mean_curve(seeds: list[dict[str, Any]], x_key: str) -> tuple[list[float], list[float]]:
    """x and accuracy averaged over seeds, point by point (same evaluation steps)."""
    n = min(len(s["curve"]) for s in seeds)
    xs = [statistics.fmean(s["curve"][i][x_key] for s in seeds) for i in range(n)]
    ys = [statistics.fmean(s["curve"][i]["acc"] for s in seeds) for i in range(n)]
    return xs, ys


def _style(name: str) -> dict[str, Any]:
    if name == "ddp":
        return {"color": "black", "linewidth": 2.2}
    if name.startswith("ab-"):
        return {"linewidth": 2.0}
    return {"linestyle": "--", "linewidth": 1.4}


def plot_file(path: str) -> list[str]:
    with open(path) as fh:
        res = json.load(fh)
    if res.get("skipped") or not res.get("methods"):
        print(f"[plot] {path}: nothing to plot ({res.get('skipped', 'no methods')})")
        return []
    stem = os.path.splitext(path)[0]
    mode = res.get("mode", "local")
    settings = res["settings"]
    title = (f"{settings['model']} on digits, {settings['nproc']} ranks, {settings['steps']} "
             f"steps, seeds {settings['seeds']}"
             + (f", link {settings['rate']}" if mode == "netns" else ", one machine"))
    target = res.get("comparison", {}).get("ddp_final_acc_mean")
    written = []
    plots = [("wire_bytes", "bytes sent per rank (MB, ring estimate; log scale)",
              "acc_vs_bytes", MB),
             ("seconds", "training wall time (s)", "acc_vs_time", 1.0)]
    if mode == "netns":
        plots.append(("link_tx_bytes", "bytes over the link, both directions (MB, kernel "
                      "counters; log scale)", "acc_vs_link_bytes", MB))
    for x_key, xlabel, suffix, scale in plots:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, m in res["methods"].items():
            xs, ys = mean_curve(m["seeds"], x_key)
            ax.plot([x / scale for x in xs], ys, label=name, **_style(name))
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                       label=f"DDP final accuracy ({target:.2f}%)")
        if x_key != "seconds":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%), rank 0's replica")
        lows = [min(mean_curve(m["seeds"], x_key)[1]) for m in res["methods"].values()]
        # zoom on the top when DDP ends above 90% (the mlp); a short vit run ends lower
        ax.set_ylim(max(min(lows) - 1, 80 if (target or 0) >= 90 else 0), 100)
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        out = f"{stem}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    table = f"{stem}_table.md"
    with open(table, "w") as fh:
        fh.write(markdown_table(res))
    written.append(table)
    for w in written:
        print(f"[plot] wrote {w}")
    return written


def _fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2,
         spread: bool = False) -> str:
    if not stat:
        return "-"
    text = f"{stat['mean'] / scale:.{digits}f}"
    if spread:
        text += f" ± {stat['std'] / scale:.{digits}f}"
    return text


def markdown_table(res: dict[str, Any]) -> str:
    comp = res.get("comparison", {})
    netns = res.get("mode") == "netns"
    head = ["method", "final acc % (mean ± std)", "acc − DDP", "MB sent/rank (wire)",
            "vs DDP", "payload MB/rank", "train s", "ms/step"]
    if netns:
        head += ["link MB (kernel)", "link vs DDP", "kernel / meter", "TCP payload / meter",
                 "s to DDP acc (seeds reaching)"]
    head += ["SVD s", "switch s", "rank frac", "peak state MB", "AB-phase state MB",
             "max RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in res["methods"].items():
        s = m["summary"]
        c = comp.get(name, {})
        row = [name, _fmt(s["final_acc"], spread=True),
               f"{c['acc_minus_ddp']:+.2f}" if c else "-",
               _fmt(s["wire_bytes"], 1e6, 1),
               f"{c['wire_bytes_vs_ddp']:.1%}" if c else "-",
               _fmt(s["bytes"], 1e6, 1), _fmt(s["train_seconds"], 1, 1),
               _fmt(s["seconds_per_step"], 1e-3, 1)]
        if netns:
            ttas = [t for t in c.get("time_to_ddp_acc", []) if t is not None]
            tta = (f"{statistics.fmean(ttas):.1f} ({len(ttas)}/{len(m['seeds'])})" if ttas
                   else f"never (0/{len(m['seeds'])})")
            row += [_fmt(s.get("link_tx_bytes"), 1e6, 1),
                    f"{c['link_bytes_vs_ddp']:.1%}" if "link_bytes_vs_ddp" in c else "-",
                    _fmt(s.get("kernel_over_predicted"), 1, 3),
                    _fmt(s.get("tcp_payload_over_predicted"), 1, 3), tta]
        row += [_fmt(s.get("svd_seconds"), 1, 2), _fmt(s.get("switch_seconds"), 1, 2),
                _fmt(s.get("rank_fraction"), 1, 3), _fmt(s["peak_state_bytes"], 1e6, 2),
                _fmt(s.get("ab_phase_state_bytes"), 1e6, 2), f"{m['max_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="compare.py results JSON files")
    args = p.parse_args(argv)
    for path in args.results:
        plot_file(path)


if __name__ == "__main__":
    main()
