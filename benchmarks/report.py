"""BENCHMARKS.md's tables on the recipes' models, generated from compare.py's results files.

    python benchmarks/report.py --prefix quick_        # the `make bench-quick` files
    python benchmarks/report.py --prefix ""            # the `make bench` files

Reads ``benchmarks/results/<prefix><model>_{local,netns}.json`` for every model found, and
writes, between the ``<!-- BEGIN generated: recipes' models -->`` and ``<!-- END generated -->``
markers of BENCHMARKS.md (nothing else in the file is touched), one table per model and link
(every method's accuracy, bytes, time, step split and memory), the load of every run, and the
issue's targets, each with the measured ratio and whether it is met.

The step split: ``compute`` is the ms per step of the ``local`` clock in the same world (the same
model, data, batches and optimizer with every collective skipped); ``exposed comm`` is a
method's ms per step minus that: the communication (and the method's own extra work) that the
step did not hide. Dense ms/step: AB's warm-up and rebound steps only (every step for the
others), timed per step around forward, backward and the optimizer step, the factorizations'
time taken out (see :func:`dense_ms`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from jsonargparse import ArgumentParser

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN = "<!-- BEGIN generated: recipes' models -->"
END = "<!-- END generated -->"
MODELS = ("mlp", "vit", "resnet")
AB = "ab-with-stale"
AB_WIRE = "ab-with-stale-bf16"
PSGD = "powersgd-r2"


def load(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        res = json.load(fh)
    return None if res.get("skipped") or not res.get("methods") else res


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _mean(stat: dict[str, float] | None) -> float | None:
    return None if not stat else stat["mean"]


def load_line(res: dict[str, Any]) -> str:
    before = res.get("machine_before", {}).get("loadavg")
    after = res.get("machine_after", {}).get("loadavg")

    def fmt(la: list[float] | None) -> str:
        return "?" if not la else " / ".join(f"{x:.1f}" for x in la)

    return f"load (1/5/15 min) before {fmt(before)}, after {fmt(after)}"


def method_table(res: dict[str, Any]) -> str:
    """One row per method: everything issue 10 asks for, from one results file."""
    comp = res.get("comparison", {})
    netns = res.get("mode") == "netns"
    head = ["method", "final acc %", "acc − DDP", "MB/rank (wire)", "vs DDP"]
    if netns:
        head += ["link MB (kernel)", "link vs DDP"]
    head += ["s to DDP acc", "train s", "vs local", "ms/step", "compute ms", "exposed comm ms",
             "dense ms/step", "peak state MB", "max RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in res["methods"].items():
        s, c = m["summary"], comp.get(name, {})
        acc = s["final_acc"]
        acc_txt = f"{acc['mean']:.2f}" + (f" ± {acc['std']:.2f}" if acc["n"] > 1 else "")
        ttas = [t for t in c.get("time_to_ddp_acc", []) if t is not None]
        tta = (f"{sum(ttas) / len(ttas):.1f} ({len(ttas)}/{len(m['seeds'])})" if ttas
               else f"never (0/{len(m['seeds'])})")
        label = name + (" (clock, not a method)" if name == "local" else "")
        row = [label, acc_txt, _f(c.get("acc_minus_ddp"), "+.2f"),
               _f(s["wire_bytes"]["mean"] / 1e6), _f(c.get("wire_bytes_vs_ddp"), ".1%")]
        if netns:
            row += [_f(_mean(s.get("link_tx_bytes")) and _mean(s.get("link_tx_bytes")) / 1e6),
                    _f(c.get("link_bytes_vs_ddp"), ".1%")]
        row += [tta, _f(s["train_seconds"]["mean"]), _f(c.get("train_seconds_vs_local"), ".2f"),
                _f(1e3 * s["seconds_per_step"]["mean"]), _f(c.get("compute_ms_per_step")),
                _f(c.get("exposed_comm_ms_per_step")), _f(dense_ms_stat(m)),
                _f(s["peak_state_bytes"]["mean"] / 1e6, ".2f"), f"{m['max_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def dense_ms(seed: dict[str, Any]) -> float | None:
    """ms per dense step (AB: warm-up and rebound; others: every step) without AB's
    factorizations: each factorization runs inside the optimizer step that ends a dense phase
    (SVDs of every AB layer: a switch cost, counted in whole-run time, not a step cost)."""
    median = seed.get("median_ms_per_step_by_phase")
    if median:  # the median dense step (newer results files): robust to switches and spikes
        dense = [median[k] for k in median if k in ("dp", "warmup", "rebound")]
        return max(dense) if dense else None
    by, steps = seed.get("ms_per_step_by_phase") or {}, seed.get("steps_by_phase") or {}
    dense = [k for k in by if k in ("dp", "warmup", "rebound")]
    n = sum(steps.get(k, 0) for k in dense)
    if not n:
        return None
    total = sum(by[k] * steps[k] for k in dense)
    total -= 1e3 * seed.get("switch_seconds", {}).get("factorize", 0.0)
    return total / n


def dense_ms_stat(m: dict[str, Any]) -> float | None:
    values = [v for v in (dense_ms(x) for x in m["seeds"]) if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(value: float | None, limit: float, fmt: str = ".2f", below: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value <= limit if below else value >= limit
    return (f"**met** ({value:{fmt}} vs {limit:{fmt}})" if ok else
            f"**missed** by {format(abs(value - limit), fmt.lstrip('+'))} "
            f"({value:{fmt}} vs {limit:{fmt}})")


def dense_share(res: dict[str, Any], method: str) -> float | None:
    """AB's bytes in its dense steps (warm-up + rebound) over DDP's bytes, seed 0, rank mean."""
    m, ddp = res["methods"].get(method), res["methods"].get("ddp")
    if not m or not ddp or "ab_traffic_per_rank" not in m["seeds"][0]:
        return None
    per = m["seeds"][0]["ab_traffic_per_rank"]
    dense = sum(t["wire_bytes_by_phase"].get("warmup", 0) + t["wire_bytes_by_phase"].get(
        "rebound", 0) for t in per) / len(per)
    return dense / ddp["seeds"][0]["wire_bytes"]


def targets(runs: dict[str, dict[str, Any]]) -> str:
    """The targets of issue 10, per model, measured within one run each."""
    rows = ["| model | target | measured | verdict |", "|---|---|---|---|"]
    for model, pair in runs.items():
        loc, net = pair.get("local"), pair.get("netns")
        for ab in (AB, AB_WIRE):
            if loc and ab in loc["methods"] and "ddp" in loc["methods"]:
                s, d = loc["methods"][ab]["summary"], loc["methods"]["ddp"]["summary"]
                r = _ratio(s["train_seconds"]["mean"], d["train_seconds"]["mean"])
                ab_s, ddp_s = s["train_seconds"]["mean"], d["train_seconds"]["mean"]
                rows.append(f"| {model} | loopback: {ab} whole run ≤ DDP's | {ab_s:.1f} s vs "
                            f"{ddp_s:.1f} s: {_f(r, '.2f')}x | {_verdict(r, 1.0)} |")
                ab_ms = dense_ms_stat(loc["methods"][ab])
                ddp_ms = dense_ms_stat(loc["methods"]["ddp"])
                r = _ratio(ab_ms, ddp_ms)
                rows.append(f"| {model} | loopback: {ab} dense-phase step ≤ 1.05x DDP's step | "
                            f"{_f(ab_ms)} ms vs {_f(ddp_ms)} ms: {_f(r, '.2f')}x | "
                            f"{_verdict(r, 1.05)} |")
        if net and "local" in net["methods"]:
            c = net["comparison"]
            for ab in (AB, AB_WIRE):
                if ab not in c:
                    continue
                r = c[ab].get("train_seconds_vs_local")
                seed = net["methods"][ab]["seeds"][0]
                steps = seed.get("steps_by_phase") or {}
                n_dense = steps.get("warmup", 0) + steps.get("rebound", 0)
                # a dense AB step sends what a DDP step (with the same wire dtype) sends
                ref = "ddp-bf16" if ab.endswith("-bf16") and "ddp-bf16" in net["methods"] \
                    else "ddp"
                ddp_ms = 1e3 * net["methods"][ref]["summary"]["seconds_per_step"]["mean"]
                why = (f"; its {n_dense} dense steps at {ref}'s {ddp_ms:.0f} ms/step on this link "
                       f"alone take {n_dense * ddp_ms / 1e3:.1f} s of its "
                       f"{seed['train_seconds']:.1f} s (local: "
                       f"{net['methods']['local']['seeds'][0]['train_seconds']:.1f} s)")
                rows.append(f"| {model} | 100 Mbit: {ab} whole run ≤ 1.3x local | "
                            f"{_f(r, '.2f')}x{why} | {_verdict(r, 1.3)} |")
                ab_t = [t for t in c[ab]["time_to_ddp_acc"] if t is not None]
                ddp_t = [t for t in c["ddp"]["time_to_ddp_acc"] if t is not None]
                ps_t = [t for t in c.get(PSGD, {}).get("time_to_ddp_acc", []) if t is not None]
                if not ab_t:
                    rows.append(f"| {model} | 100 Mbit: {ab} reaches DDP's accuracy in ≤ 0.33x "
                                f"DDP's time, ≤ 0.8x PowerSGD's | never reached DDP's final "
                                f"accuracy ({c['ddp_final_acc_mean']:.2f}%) | **missed** |")
                    continue
                mean = sum(ab_t) / len(ab_t)
                r1 = _ratio(mean, sum(ddp_t) / len(ddp_t)) if ddp_t else None
                r2 = _ratio(mean, sum(ps_t) / len(ps_t)) if ps_t else None
                rows.append(f"| {model} | 100 Mbit: {ab} time to DDP's accuracy ≤ 0.33x DDP's |"
                            f" {mean:.1f} s: {_f(r1, '.2f')}x | {_verdict(r1, 0.33)} |")
                rows.append(f"| {model} | 100 Mbit: {ab} time to DDP's accuracy ≤ 0.8x "
                            f"PowerSGD r2's | {_f(r2, '.2f')}x" +
                            ("" if ps_t else " (PowerSGD never reached it)") +
                            f" | {_verdict(r2, 0.8) if ps_t else '**met** (PowerSGD: never)'} |")
        res = loc or net
        if res and "ddp" in res["comparison"]:
            c = res["comparison"]
            for ab in (AB, AB_WIRE):
                if ab not in c:
                    continue
                r, acc = c[ab]["wire_bytes_vs_ddp"], c[ab]["acc_minus_ddp"]
                share = dense_share(res, ab)
                why = f"; dense warm-up + rebound steps alone: {share:.1%} of DDP's" if share \
                    else ""
                rows.append(f"| {model} | bytes: {ab} ≤ 0.25x DDP at ≥ DDP − 0.5 points | "
                            f"{r:.1%} of DDP's bytes at {acc:+.2f} points{why} | "
                            f"bytes {_verdict(r, 0.25, '.3f')}; accuracy "
                            f"{_verdict(acc, -0.5, '+.2f', below=False)} |")
        if net and PSGD in net["comparison"]:
            c = net["comparison"]
            for ab in (AB, AB_WIRE):
                if ab not in c or "link_bytes_vs_ddp" not in c[ab]:
                    continue
                r = _ratio(c[ab]["link_bytes_vs_ddp"], c[PSGD]["link_bytes_vs_ddp"])
                dacc = c[ab]["acc_minus_ddp"] - c[PSGD]["acc_minus_ddp"]
                rows.append(f"| {model} | link: {ab} puts fewer bytes on the link than PowerSGD "
                            f"r2 at ≥ its accuracy | {_f(r, '.2f')}x PowerSGD's link bytes, "
                            f"{dacc:+.2f} points | bytes {_verdict(r, 1.0)}; accuracy "
                            f"{_verdict(dacc, 0.0, '+.2f', below=False)} |")
    return "\n".join(rows) + "\n"


def generate(prefix: str, results: str) -> str:
    runs: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        pair = {mode: load(os.path.join(results, f"{prefix}{model}_{mode}.json"))
                for mode in ("local", "netns")}
        if any(pair.values()):
            runs[model] = {k: v for k, v in pair.items() if v}
    out = [BEGIN, "", f"Generated by `python benchmarks/report.py --prefix '{prefix}'` from "
           f"`benchmarks/results/{prefix}<model>_{{local,netns}}.json`.", ""]
    for model, pair in runs.items():
        for mode, res in pair.items():
            st = res["settings"]
            where = ("one machine, gloo over loopback" if mode == "local"
                     else f"two network namespaces joined by a {st['rate']} link")
            out += [f"### {model}, {where} (`{prefix}{model}_{mode}.json`)", "",
                    f"{st['nproc']} ranks, {st['steps']} steps, seeds {st['seeds']}, per-rank "
                    f"batch {st['batch_size']}; AB schedule W0 {st['ab_warmup']}, T "
                    f"{st['ab_sync_every']}, F {st['ab_rebound']}; {load_line(res)}.", "",
                    method_table(res)]
    out += ["### Targets (issue 10), per model, each measured within one run", "",
            targets(runs), END]
    return "\n".join(out)


def write_into(path: str, block: str) -> None:
    with open(path) as fh:
        text = fh.read()
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text,
                      count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="quick_", help="results file prefix: quick_ or ''")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"),
                   help="the file whose generated block is replaced")
    args = p.parse_args(argv)
    write_into(args.markdown, generate(args.prefix, args.results))
    print(f"[report] wrote the generated block of {args.markdown}")


if __name__ == "__main__":
    main()
