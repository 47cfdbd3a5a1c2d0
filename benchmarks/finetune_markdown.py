"""The fine-tuning benchmark's report: the paragraphs and the table BENCHMARKS.md shows,
generated from a results file (nothing typed by hand)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from benchmarks.finetune_plot import plot
from benchmarks.finetune_results import RANK_BYTES_TARGET, targets
from benchmarks.finetune_settings import MB, Method


def markdown_table(res: dict[str, Any]) -> str:
    """The results table of BENCHMARKS.md, from a results file (nothing typed by hand)."""
    full = res["methods"].get(str(Method.FULL))
    ref_loss = full["summary"]["eval_loss"]["mean"] if full else None
    ref_state = full["summary"]["peak_state_bytes"]["mean"] if full else None
    n = len(res["settings"]["seeds"])
    rows = [f"| method | held-out loss (mean ± std, {n} seed{'s' * (n > 1)}) | vs full | "
            "perplexity | MB sent/rank (wire) | vs DP-equivalent | peak state MB | vs full | "
            "peak RSS MB | steps/s | params trained/step | ranks kept | what |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        sm = m["summary"]
        loss, wire = sm["eval_loss"], sm["wire_bytes"]["mean"]
        dp = sm["dp_equivalent_wire_bytes"]["mean"]
        state = sm["peak_state_bytes"]["mean"]
        d_loss = f"{loss['mean'] - ref_loss:+.3f}" if ref_loss is not None else "-"
        d_state = f"{state / ref_state:.0%}" if ref_state else "-"
        rows.append(
            f"| {name} | {loss['mean']:.3f} ± {loss['std']:.3f} | {d_loss} | "
            f"{sm['perplexity']['mean']:.3f} | {wire / MB:.1f} | {wire / dp:.1%} | "
            f"{state / MB:.2f} | {d_state} | {sm['peak_rss_mb']['mean']:.0f} | "
            f"{sm['steps_per_second']['mean']:.2f} | "
            f"{sm['trained_params_per_step']['mean'] / 1e6:.2f}M | {m.get('ranks_kept', '-')} | "
            f"{m['what']} |")
    return "\n".join(rows) + "\n" + markdown_targets(res)


def markdown_targets(res: dict[str, Any]) -> str:
    """The issue's targets, checked on the results file (:func:`targets`): one row per
    comparison that ran; empty when none did."""
    rows = targets(res)
    if not rows:
        return ""
    out = ["", "| AB method | against | at equal | held-out loss AB / other (gap) | seed std AB / "
           "other | AB worst seed / other best seed | wire bytes AB / other | payload bytes "
           "AB / other | peak state AB / other | target met |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["equal"] == "bytes":
            verdict = "yes" if r["met"] else "no: AB's worst seed does not beat the other's best"
        else:
            misses = [what for ok, what in [
                (r["wire_ratio"] <= RANK_BYTES_TARGET, f"bytes above {RANK_BYTES_TARGET:g}x"),
                (r["loss_ok"], "loss beyond the seed spread"),
                (r["state_ratio"] <= 1.0, "peak state above the other's")] if not ok]
            verdict = "yes" if not misses else "no: " + ", ".join(misses)
        out.append(
            f"| {r['ab']} | {r['other']} | {r['equal']} | {r['loss_ab']:.3f} / "
            f"{r['loss_other']:.3f} ({r['gap']:+.3f}) | {r['std_ab']:.3f} / {r['std_other']:.3f} "
            f"| {r['worst_ab']:.3f} / {r['best_other']:.3f} | {r['wire_ratio']:.2f}x | "
            f"{r['bytes_ratio']:.2f}x | {r['state_ratio']:.2f}x | {verdict} |")
    return "\n".join(out) + "\n"


def markdown_run(res: dict[str, Any]) -> str:
    """The paragraphs on the run itself (data, model, knobs, machine load), from a results
    file: BENCHMARKS.md shows them above the table."""
    st, pre, fc = res["settings"], res["pretrained"], res["finetune_corpus"]
    mb, ma = res["machine_before"], res.get("machine_after", {})
    loads = [m["loadavg_before"][0] for m in res["methods"].values()] + [
        m["loadavg_after"][0] for m in res["methods"].values()]
    per_seed = "; ".join(
        f"{name} " + " / ".join(f"{r['eval_loss']:.3f}" for r in m["seeds"])
        for name, m in res["methods"].items())
    return (
        f"**The run.** A byte-level Llama ({pre['parameters'] / 1e6:.2f}M parameters: "
        f"{st['num_layers']} layers, width {st['hidden_size']}, MLP {st['intermediate_size']}, "
        f"{st['num_heads']} heads, vocabulary 256 bytes, context {st['seq_len']}) pretrained "
        f"here for {pre['steps']} steps of {pre['batch_size']} windows on {pre['files']} "
        f"standard-library modules ({pre['bytes'] / MB:.1f} MB, tests excluded; train loss "
        f"{pre['train_loss_first']:.2f} -> {pre['train_loss_last']:.2f}, {pre['seconds']:.0f} s), "
        f"then fine-tuned on the standard library's `test/` package: {fc['train_files']} files "
        f"({fc['train_bytes'] / MB:.1f} MB) to train on, {fc['heldout_files']} held out "
        f"({fc['heldout_bytes'] / MB:.1f} MB; {st['eval_windows']} windows of it are the "
        f"held-out set). The pretrained model's held-out loss before fine-tuning: "
        f"{pre['finetune_heldout_loss_before']:.3f} nats per byte. Fine-tuning: "
        f"{st['nproc']} gloo processes, {st['batch_size']} windows per rank, {st['steps']} "
        f"optimizer steps, AdamW, peak LR {st['lr']:g} (LoRA {st['lora_lr']:g}) with "
        f"{res['settings']['lr_warmup_ratio']:.0%} linear warm-up and cosine decay, clip "
        f"{st['max_grad_norm']:g}, weight decay {st['weight_decay']:g}; seeds "
        f"{', '.join(map(str, st['seeds']))} (same data order and LoRA init for every method "
        f"of a seed).\n\n"
        f"**The machine.** {mb.get('cpus')} cores ({mb.get('cpu', '?')}), Python "
        f"{mb.get('python')}, torch {mb.get('torch')}; shared with other engineers' tests: "
        f"load average {mb['loadavg'][0]:.1f} at the start, {ma.get('loadavg', [math.nan])[0]:.1f} "
        f"at the end, between {min(loads):.1f} and {max(loads):.1f} at the start and end of the "
        f"methods' worlds (each method's `loadavg_before` / `loadavg_after` in the JSON). Steps "
        f"per second and RSS are those of that loaded machine.\n\n"
        f"Held-out loss per seed: {per_seed}.\n")


def write_report(res: dict[str, Any], out: str) -> list[str]:
    stem = os.path.splitext(out)[0]
    table = stem + "_table.md"
    Path(table).write_text(markdown_run(res) + "\n" + markdown_table(res))
    return [table, plot(res, stem + ".png")]
