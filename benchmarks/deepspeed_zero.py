"""DeepSpeed ZeRO under AB-training: per-rank optimizer state, bytes, accuracy and switch cost.

One world of ``--nproc`` gloo ranks (torchrun) trains the same MLP on sklearn's digits (embedded
data) with every method below, for every seed, through DeepSpeed's engine:

==================  ===========================================================================
stage0-ab           ZeRO stage 0, fp32: AB-training's own reduction (the reference: accuracy and
                    optimizer state)
zero1-ab            ZeRO stage 1, bf16, the "ab_training" key
zero2-ab            ZeRO stage 2, bf16, the key
zero2-offload-ab    ZeRO stage 2, bf16, CPU optimizer offload, the key
zero2-plain         DeepSpeed's own ZeRO stage 2, bf16, no key (the bytes baseline)
==================  ===========================================================================

Measured on every rank (rank 0's numbers are written, the others' checked equal where they must
be): the optimizer state held right after each optimizer step (Adam's moments; the fp32 master
partitions of ZeRO's bf16 runs apart), its peak per phase; the bytes every collective passed
(ab_accel's meter: under ZeRO it counts DeepSpeed's own collectives, ``deepspeed.comm``), payload
and ring-estimated wire bytes; test accuracy of the final (synced) model; wall seconds of
training and of the ZeRO rebuilds at the switches, with the machine's load beside them.

    python -m benchmarks.deepspeed_zero                 # 3 seeds, every method (~10 min idle)
    python -m benchmarks.deepspeed_zero --seeds [0] --steps 60   # a quick look

Results: ``benchmarks/results/deepspeed_zero.json``, ``deepspeed_zero_table.md`` (the table in
BENCHMARKS.md), ``deepspeed_zero.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("stage0-ab", "zero1-ab", "zero2-ab", "zero2-offload-ab", "zero2-plain")


@dataclasses.dataclass
class Settings:
    """The benchmark's knobs (``python -m benchmarks.deepspeed_zero --help``)."""

    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    nproc: int = 4
    steps: int = 120
    micro_batch: int = 16
    gas: int = 2
    lr: float = 2e-3
    hidden: int = 512
    warmup_steps: int = 20
    sync_every: int = 30
    rebound_steps: int = 3
    lr_rebound_steps: int = 3
    rank_cutoff: float = 0.15
    out: str = str(RESULTS / "deepspeed_zero.json")


# ---------------------------------------------------------------------------------- a rank
def _model(hidden: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 10))


def _config(method: str, s: Settings) -> dict[str, Any]:
    stage = 0 if method.startswith("stage0") else int(method[4])
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.micro_batch, "gradient_accumulation_steps": s.gas,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage}}
    if stage:
        cfg["bf16"] = {"enabled": True}
    if "offload" in method:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the CPU partitions
    if method.endswith("-ab"):
        cfg["ab_training"] = {
            "warmup_steps": s.warmup_steps, "sync_every": s.sync_every,
            "rebound_steps": s.rebound_steps, "lr_rebound_steps": s.lr_rebound_steps,
            "rank_cutoff": s.rank_cutoff, "group_size": s.nproc // 2}
    return cfg


def _state_bytes(optimizer: Any) -> int:
    """Bytes of the per-element optimizer state tensors (Adam's moments) of ``optimizer``."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values()
               for v in st.values() if hasattr(v, "dim") and v.dim() > 0)


def train_one(method: str, seed: int, s: Settings) -> dict[str, Any]:
    """One method and seed on this rank; returns its measurements."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits

    from ab_accel import deepspeed as ab_ds
    from ab_accel.comm import TrafficMeter
    from ab_accel.ds_meter import PlainMeter

    rank, world = dist.get_rank(), dist.get_world_size()
    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x_all[:1500], y_all[:1500], x_all[1500:], y_all[1500:]
    torch.manual_seed(seed)
    model = _model(s.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    cfg = _config(method, s)
    plain_meter = None
    if method.endswith("-ab"):
        engine, ab, _, _ = ab_ds.initialize(model=model, optimizer=opt, config=cfg)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        ab, plain_meter = None, TrafficMeter()
    peaks: dict[str, dict[str, int]] = {}
    phase_now = ["warmup"]

    def measure(optimizer: Any, *_: Any) -> None:  # right after the torch optimizer's step
        zero = engine.optimizer if engine.zero_optimization_stage() else None
        masters = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups
                      ) if zero is not None else 0
        now = {"moments": _state_bytes(optimizer), "masters": masters,
               "weights": sum(p.numel() * p.element_size() for p in engine.module.parameters())}
        peak = peaks.setdefault(phase_now[0], dict.fromkeys(now, 0))
        for key, value in now.items():
            peak[key] = max(peak[key], value)

    opt.register_step_post_hook(measure)
    dtype = next(engine.module.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    ctx = PlainMeter(plain_meter) if plain_meter is not None else None
    if ctx is not None:
        ctx.__enter__()
    for _ in range(s.steps):
        phase_now[0] = str(ab.phase) if ab is not None else "warmup"
        for _micro in range(s.gas):
            idx = torch.randint(0, len(x_train), (s.micro_batch * world,), generator=g)
            idx = idx[rank * s.micro_batch:(rank + 1) * s.micro_batch]
            out = engine(x_train[idx].to(dtype)).float()
            engine.backward(torch.nn.functional.cross_entropy(out, y_train[idx]))
            engine.step()
    if ctx is not None:
        ctx.__exit__(None, None, None)
    seconds = time.perf_counter() - start
    final_sync = ab.finalize() if ab is not None else False
    with torch.no_grad():
        logits = engine.module.float()(x_test) if dtype != torch.float32 else engine.module(x_test)
        accuracy = float((logits.argmax(1) == y_test).float().mean())
    traffic = ab.traffic.summary() if ab is not None else plain_meter.summary()
    report = ab.report() if ab is not None else {}
    return {"method": method, "seed": seed, "accuracy": accuracy, "final_sync": final_sync,
            "train_seconds": round(seconds, 3), "loadavg": list(os.getloadavg()),
            "peak_bytes_by_phase": peaks, "traffic": traffic, "zero": report.get("zero"),
            "compression": report.get("compression", {}).get("ratio"),
            "skipped_steps": report.get("skipped_steps", 0)}


def worker(spec_path: str) -> None:
    """A rank of the benchmark's world: every method and seed of the spec, in order."""
    import torch
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**spec["settings"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    records = []
    for method in s.methods:
        for seed in s.seeds:
            rec = train_one(method, seed, s)
            mine = [rec["accuracy"], rec["traffic"]["bytes"]]
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            rec["per_rank"] = {"accuracy": [e[0] for e in every], "bytes": [e[1] for e in every]}
            records.append(rec)
            if dist.get_rank() == 0:
                print(f"[deepspeed_zero] {method} seed {seed}: accuracy {rec['accuracy']:.4f}, "
                      f"{rec['train_seconds']:.1f} s", flush=True)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- the run
def run(s: Settings, command: str) -> dict[str, Any]:
    from benchmarks.common import free_port, stats, write_json
    from benchmarks.compare import machine

    before = machine()
    with tempfile.TemporaryDirectory(prefix="ab-dszero-") as tmp:
        spec = {"settings": dataclasses.asdict(s), "out": os.path.join(tmp, "world.json")}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                        str(s.nproc), "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "--module", "benchmarks.deepspeed_zero", "--worker",
                        spec_path], cwd=ROOT, env=env, check=True)
        records = json.loads(Path(spec["out"]).read_text())
        world_seconds = time.perf_counter() - start
    methods: dict[str, Any] = {}
    for method in s.methods:
        recs = [r for r in records if r["method"] == method]
        phases = sorted({p for r in recs for p in r["peak_bytes_by_phase"]})
        methods[method] = {
            "runs": recs,
            "accuracy": stats([r["accuracy"] for r in recs]),
            "train_seconds": stats([r["train_seconds"] for r in recs]),
            "wire_bytes": stats([r["traffic"]["wire_bytes"] for r in recs]),
            "bytes": stats([r["traffic"]["bytes"] for r in recs]),
            "peak_moments_by_phase": {p: max(r["peak_bytes_by_phase"][p]["moments"]
                                             for r in recs if p in r["peak_bytes_by_phase"])
                                      for p in phases},
            "peak_masters_by_phase": {p: max(r["peak_bytes_by_phase"][p]["masters"]
                                             for r in recs if p in r["peak_bytes_by_phase"])
                                      for p in phases},
            "rebuild_seconds": stats([r["zero"]["rebuild_seconds"] for r in recs
                                      if r.get("zero")]),
            "rebuilds": recs[0]["zero"]["rebuilds"] if recs[0].get("zero") else 0,
        }
    result = {"command": command, "settings": dataclasses.asdict(s), "machine_before": before,
              "machine_after": machine(), "world_seconds": round(world_seconds, 1),
              "what": {
                  "moments": "bytes of Adam's moment tensors held by rank 0 right after an "
                             "optimizer step (a torch optimizer step post hook), peak per phase",
                  "masters": "bytes of ZeRO's fp32 master partitions on rank 0 (bf16 runs; "
                             "stage 0 trains the fp32 weights themselves)",
                  "bytes": "payload bytes of every collective rank 0 passed (ab_accel's meter; "
                           "under ZeRO and for zero2-plain: DeepSpeed's deepspeed.comm calls)",
                  "wire_bytes": "ring estimate of the bytes rank 0 sent",
                  "accuracy": "test accuracy of the final model (synced), 297 held-out digits"},
              "methods": methods}
    write_json(s.out, result)
    from benchmarks.deepspeed_zero_report import write_report

    write_report(result, s.out)
    return result


def parse(argv: list[str] | None = None) -> Settings:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m benchmarks.deepspeed_zero",
                            description=__doc__.split("\n\n")[0])
    parser.add_class_arguments(Settings, as_group=False)
    ns = parser.parse_args(argv)
    values = parser.instantiate(ns).as_dict()
    values.pop("__path__", None)
    unknown = [m for m in values["methods"] if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if values["nproc"] < 2 or values["nproc"] % 2:
        parser.error("nproc must be even and >= 2 (AB's A-groups and B-groups)")
    return Settings(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1])
        return {}
    s = parse(argv)
    return run(s, " ".join(["python -m benchmarks.deepspeed_zero", *argv]))


if __name__ == "__main__":
    main()
