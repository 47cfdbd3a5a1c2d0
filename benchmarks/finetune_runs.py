"""The fine-tuning benchmark's orchestration: each method's configuration, one torchrun world
of benchmarks/finetune_worker.py per method (or one for all), and the run that ties the corpus,
the pretrained model, the worlds and the results file together."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.compare import ab_schedule_for, machine
from benchmarks.finetune_corpus import corpus_digest, read_bytes, split_finetune_files
from benchmarks.finetune_markdown import write_report
from benchmarks.finetune_pretrain import pretrain
from benchmarks.finetune_results import ranks_kept, summarize
from benchmarks.finetune_settings import MB, ROOT, TARGET_MODULES, Method, Settings


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(s: Settings, methods: list[Method], model_path: str) -> list[dict[str, Any]]:
    """torchrun ``nproc`` ranks of benchmarks/finetune_worker.py for ``methods`` (every seed);
    return rank 0's records (one per method and seed, every rank's numbers inside)."""
    with tempfile.TemporaryDirectory(prefix="ab-finetune-") as tmp:
        spec = {"settings": _settings_dict(s), "methods": [str(m) for m in methods],
                "model_path": model_path, "out": os.path.join(tmp, "world.json"),
                "work_dir": tmp}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(s.nproc), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "--module", "benchmarks.finetune_worker", spec_path]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=s.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # our own torchrun and its ranks only
            proc.wait()
            raise RuntimeError(f"the world of {methods} ran past {s.timeout} s") from None
        if rc != 0 or not os.path.exists(spec["out"]):
            raise RuntimeError(f"the world of {[str(m) for m in methods]} failed (exit {rc}); "
                               f"its ranks' errors are above")
        return json.loads(Path(spec["out"]).read_text())


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["methods"] = [str(m) for m in s.methods]
    return d


def ab_schedules(s: Settings) -> dict[str, dict[str, Any]]:
    """The AB methods' ABConfig keywords (one place: the worker builds its configs from it).
    The residual methods start from :meth:`ab_accel.ABConfig.for_finetuning` (what a
    fine-tuner is told to start from), at their rank; only the fields that differ from
    ABConfig's defaults are listed."""
    from ab_accel import ABConfig

    paper = ab_schedule_for(s.steps)
    scaled = {"warmup_steps": paper["ab_warmup"], "sync_every": paper["ab_sync_every"],
              "rebound_steps": paper["ab_rebound"], "lr_rebound_steps": paper["ab_lr_rebound"],
              "rank_cutoff": 0.15, "sync_mode": "with-stale", "target_modules": TARGET_MODULES}
    t = s.steps // s.ab_lean_cycles
    lean = {"warmup_steps": 0, "sync_every": t, "rebound_steps": 0,
            "lr_rebound_steps": max(1, round(0.2 * t)), "lean_memory": True,
            "sync_mode": "with-stale", "target_modules": TARGET_MODULES}
    defaults = ABConfig().to_dict()
    residual = {}
    for method in (Method.AB_RESIDUAL, Method.AB_RESIDUAL_DOUBLE, Method.AB_RESIDUAL_2LR):
        cfg = ABConfig.for_finetuning(s.steps, rank=method.rank(s), cycles=s.ab_lean_cycles,
                                      **{"target_modules": TARGET_MODULES, **s.ab_residual}
                                      ).to_dict()
        residual[str(method)] = {k: v for k, v in cfg.items() if v != defaults[k]}
    return {str(Method.AB_PAPER): scaled,
            str(Method.AB_ENERGY): {**scaled, "rank_energy": s.ab_energy},
            str(Method.AB_LEAN): {**lean, "fixed_rank": s.ab_fixed_rank},
            str(Method.AB_LEAN_ENERGY): {**lean, "rank_energy": s.ab_energy}, **residual}


def describe(method: Method, s: Settings) -> str:
    """One line on what a method is, for the table."""
    ab = ab_schedules(s).get(str(method))
    if method == Method.FULL:
        return "Trainer + DDP, AdamW"
    if method in (Method.LORA, Method.LORA_HALF):
        return f"peft LoRA r={method.rank(s)}, alpha={method.alpha(s)}, lr {s.lora_lr:g}"
    if method in (Method.PISSA, Method.PISSA_HALF):
        return (f"peft PiSSA (init_lora_weights='pissa') r={method.rank(s)}, "
                f"alpha={method.alpha(s)}, lr {s.lora_lr:g}")
    if method == Method.GALORE:
        return (f"optim=galore_adamw, rank {s.galore_rank}, gap {s.galore_update_proj_gap}, "
                f"scale {s.galore_scale:g}")
    rule = (f"fixed_rank {ab['fixed_rank']}" if "fixed_rank" in ab else
            f"rank_energy {ab['rank_energy']}" if "rank_energy" in ab else
            f"rank_cutoff {ab['rank_cutoff']}")
    sched = f"W0={ab['warmup_steps']}, T={ab['sync_every']}, F={ab['rebound_steps']}, " \
            f"R={ab['lr_rebound_steps']}"
    extra = "".join(f"; {k}" for k in ("lean_memory", "residual", "freeze_untargeted")
                    if ab.get(k))
    lr = method.lr(s)
    mode = ab.get("sync_mode", "with-stale")  # the residual methods list non-defaults only
    return f"{rule}; {mode}; {sched}{extra}, lr {lr:g}"


def _write(path: str, result: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def run_benchmark(s: Settings, command: str) -> dict[str, Any]:
    """The whole run: the corpus, the pretrained model, one world per method (or one for all),
    the results file after each world (partial results survive an interruption), the report."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": command,
        "settings": _settings_dict(s), "machine_before": machine(), "methods": {}}
    train_files, held_files = split_finetune_files(s.heldout_every)
    result["finetune_corpus"] = {
        "what": "the stdlib's test/ package", "train_files": len(train_files),
        "heldout_files": len(held_files), "train_bytes": len(read_bytes(train_files)),
        "heldout_bytes": len(read_bytes(held_files)),
        "corpus_sha256": corpus_digest(train_files + held_files)}
    result["pretrained"] = pretrain(s)
    result["ab_configs"] = ab_schedules(s)
    worlds = [list(s.methods)] if s.one_world else [[m] for m in s.methods]
    for methods in worlds:
        t0 = time.time()
        load = list(os.getloadavg())
        print(f"[finetune] {','.join(map(str, methods))}: seeds {s.seeds}, {s.steps} steps, "
              f"{s.nproc} ranks; load {load}", flush=True)
        records = run_world(s, methods, result["pretrained"]["path"])
        for method in methods:
            seeds = [r for r in records if r["method"] == str(method)]
            m = {"what": describe(method, s), "seeds": seeds, "summary": summarize(seeds),
                 "world_seconds": time.time() - t0, "shared_world": len(methods) > 1,
                 "loadavg_before": load, "loadavg_after": list(os.getloadavg())}
            kept = ranks_kept(seeds)
            if kept:
                m["ranks_kept"] = kept
            result["methods"][str(method)] = m
            sm = m["summary"]
            print(f"[finetune] {method}: held-out loss {sm['eval_loss']['mean']:.4f} "
                  f"+- {sm['eval_loss']['std']:.4f}, {sm['wire_bytes']['mean'] / MB:.1f} "
                  f"MB/rank, peak state {sm['peak_state_bytes']['mean'] / MB:.2f} MB, "
                  f"{sm['steps_per_second']['mean']:.2f} steps/s", flush=True)
        _write(s.out, result)  # partial results survive an interruption
    result["machine_after"] = machine()
    _write(s.out, result)
    for p in [s.out, *write_report(result, s.out)]:
        print(f"[finetune] wrote {p}", flush=True)
    return result
