"""The fine-tuning benchmark's plot: held-out loss against bytes and against peak state."""

from __future__ import annotations

from typing import Any

from benchmarks.finetune_settings import MB


def plot(res: dict[str, Any], path: str) -> str:
    """Held-out loss against bytes per rank and against peak training-state memory, one
    marker per method (mean over seeds; bars: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = "osD^v<>ph*"
    panels = [("wire_bytes", "MB sent per rank (ring estimate, log scale)", True),
              ("peak_state_bytes", "peak training state per rank (MB: params + grads + "
                                   "optimizer state)", False)]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, (name, m) in enumerate(res["methods"].items()):
            sx, sy = m["summary"][key], m["summary"]["eval_loss"]
            ax.errorbar([sx["mean"] / MB], [sy["mean"]],
                        yerr=[[sy["mean"] - sy["min"]], [sy["max"] - sy["mean"]]],
                        xerr=[[(sx["mean"] - sx["min"]) / MB], [(sx["max"] - sx["mean"]) / MB]],
                        fmt=markers[i % len(markers)], markersize=8, capsize=3, label=name)
        before = res["pretrained"].get("finetune_heldout_loss_before")
        if before is not None:
            ax.axhline(before, color="grey", linestyle=":", linewidth=1,
                       label=f"pretrained, before fine-tuning ({before:.3f})")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    axes[1].legend(fontsize=8, loc="best")
    st = res["settings"]
    fig.suptitle(f"Fine-tuning a {res['pretrained']['parameters'] / 1e6:.1f}M-parameter byte "
                 f"LM on the stdlib's tests: {st['nproc']} ranks, {st['steps']} steps, seeds "
                 f"{st['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
