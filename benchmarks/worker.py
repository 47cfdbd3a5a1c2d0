"""One node of a benchmark world: spawns its local ranks; each rank trains one method per seed.

Run by :mod:`benchmarks.compare` (``python -m benchmarks.worker --spec spec.json --node-rank
K``), once per node; in rate-limited mode each node runs inside its own network namespace.
Every rank trains each method of the spec for each seed, in turn (a fresh model, optimizer and
method state each time), and writes ``rank<R>.json`` (one record per method and seed) into the
spec's ``out_dir``.

The timed region of a seed is the training loop only: it starts after a barrier that follows
the method's setup (DDP's and ABOptimizer's initial broadcast are not counted, by any meter),
and evaluation pauses it: at every evaluation point all ranks meet at a barrier, the clock
stops, rank 0 evaluates its own replica on the test split, and the clock restarts after a
second barrier. Bytes are counted over the same region.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import statistics
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from jsonargparse import ArgumentParser
from torch import nn

from .common import write_json
from .meters import CollectiveCounter, link_counters, max_rss_mb
from .methods import Knobs, Method, build_method
from .workloads import ShardedBatches, build_model, evaluate, load_digits_split


def _traffic(method: Method, counter: CollectiveCounter, start: dict[str, Any] | None
             ) -> dict[str, float]:
    """Bytes this rank sent since the start of the timed region, by the method's own meter."""
    if method.ab is not None:
        s = method.ab.traffic.summary()
        return {"bytes": s["bytes"] - start["bytes"],
                "wire_bytes": s["wire_bytes"] - start["wire_bytes"]}
    return {"bytes": counter.bytes, "wire_bytes": counter.wire_bytes}


def _link(spec: dict[str, Any], local_rank: int) -> dict[str, int] | None:
    iface = spec.get("interface")
    if not iface or local_rank != 0:
        return None
    return link_counters(iface)


def _diff(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    if a is None or b is None:
        return None
    return {k: b[k] - a[k] for k in a}


def _checksum(model: nn.Module) -> list[float]:
    total = torch.zeros(2, dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        d = p.detach().double()
        total += torch.stack([d.sum(), (d * d).sum()])
    return total.tolist()


def train_one(rank: int, local_rank: int, spec: dict[str, Any], method_name: str, seed: int,
              counter: CollectiveCounter, data: Any) -> dict[str, Any]:
    """Train ``method_name`` from ``seed``; return this rank's measurements."""
    world = dist.get_world_size()
    knobs = Knobs(**spec["knobs"])
    model = build_model(spec["model"], spec["width"], spec["depth"], spec["channels"], seed)
    t_setup = time.perf_counter()
    method = build_method(method_name, model, knobs)
    setup_seconds = time.perf_counter() - t_setup
    batches = ShardedBatches(data, spec["batch_size"], rank, world, seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=knobs.label_smoothing)
    eval_every = spec["eval_every"]

    dist.barrier()
    counter.reset()
    counter.active = True
    meter_start = method.ab.traffic.summary() if method.ab is not None else None
    link_start = _link(spec, local_rank)
    curve: list[dict[str, Any]] = []
    train_seconds = 0.0
    seg_start = time.perf_counter()
    phase_seconds: dict[str, float] = {}
    phase_steps: dict[str, int] = {}
    phase_times: dict[str, list[float]] = {}
    for step in range(knobs.steps):
        # the phase this step trains in (AB's schedule; "dp" for every other method)
        phase = method.ab.phase if method.ab is not None else "dp"
        switches = len(method.ab.switches) if method.ab is not None else 0
        t_step = time.perf_counter()
        x, y = batches.batch(step)
        loss = loss_fn(method.forward_model(x), y)
        loss.backward()
        method.step()
        took = time.perf_counter() - t_step
        phase_seconds[phase] = phase_seconds.get(phase, 0.0) + took
        if method.ab is None or len(method.ab.switches) == switches:
            # the median step of a phase: steps that also ran a factorization or a sync (an
            # SVD of every AB layer, a switch cost) are left out of it, not out of the means
            phase_times.setdefault(phase, []).append(took)
        phase_steps[phase] = phase_steps.get(phase, 0) + 1
        last = step + 1 == knobs.steps
        if last:
            method.finish()
        if (step + 1) % eval_every == 0 or last:
            dist.barrier()
            train_seconds += time.perf_counter() - seg_start
            point: dict[str, Any] = {"step": step + 1, "seconds": train_seconds,
                                     "train_loss": float(loss.item()),
                                     **_traffic(method, counter, meter_start)}
            if method.ab is not None:
                point["phase"] = method.ab.phase
            link_now = _diff(link_start, _link(spec, local_rank))
            if link_now is not None:
                point["link"] = link_now
            if rank == 0:
                point["acc"], point["test_loss"] = evaluate(model, data)
            curve.append(point)
            dist.barrier()
            seg_start = time.perf_counter()
    counter.active = False
    link = _diff(link_start, _link(spec, local_rank))

    sums = [None] * world
    dist.all_gather_object(sums, _checksum(model))
    spread = max(abs(s[i] - sums[0][i]) / (abs(sums[0][i]) + 1e-12)
                 for s in sums for i in range(2))
    out: dict[str, Any] = {
        "rank": rank, "seed": seed, "setup_seconds": setup_seconds,
        "train_seconds": train_seconds, "curve": curve,
        "final_acc": curve[-1].get("acc"), "final_test_loss": curve[-1].get("test_loss"),
        **_traffic(method, counter, meter_start),
        "collectives": counter.records,
        "intercepted_bytes": counter.bytes, "intercepted_wire_bytes": counter.wire_bytes,
        "peak_state_bytes": method.peak_state_bytes,
        "peak_state_bytes_by_phase": method.peak_state_bytes_by_phase, "link": link,
        "replica_spread": spread, "step_seconds_by_phase": phase_seconds,
        "steps_by_phase": phase_steps,
        # the median step of each phase: robust to the few steps that carry a switch (SVDs,
        # syncs) and to the neighbours' load spikes
        "median_step_seconds_by_phase": {k: statistics.median(v)
                                         for k, v in phase_times.items()},
    }
    if method.bucket_count is not None:
        out["dp_equivalent_bytes"] = method.bucket_count.grad_bytes
        out["hook_calls"] = method.bucket_count.calls
    if method.ab is not None:
        s = method.ab.traffic.summary()
        out["dp_equivalent_bytes"] = s["dp_equivalent_bytes"]
        out["ab_traffic"] = {k: s[k] for k in ("bytes", "wire_bytes", "bytes_by_phase",
                                               "wire_bytes_by_phase", "steps_by_phase",
                                               "dp_equivalent_bytes",
                                               "dp_equivalent_wire_bytes", "reduction")}
        out["ab_meter_records"] = [r for r in method.ab.traffic.records if r["phase"] != "setup"]
        out["role"] = method.ab.groups.role
        out["switch_seconds"] = dict(method.ab.switch_seconds)
        out["switch_counts"] = dict(method.switch_counts)
        out["svd_seconds"] = method.ab.svd_seconds
        out["factorizations"] = method.factorizations
    return out


def _rank_entry(local_rank: int, spec: dict[str, Any]) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: stacks
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if spec.get("interface"):
        os.environ["GLOO_SOCKET_IFNAME"] = spec["interface"]
    nproc = spec["nproc_per_node"]
    rank = spec["node_rank"] * nproc + local_rank
    world = spec["nnodes"] * nproc
    path = os.path.join(spec["out_dir"], f"rank{rank}")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{spec['master_addr']}:"
                                f"{spec['master_port']}", rank=rank, world_size=world)
        counter = CollectiveCounter().install()
        data = load_digits_split()
        payload: dict[str, Any] = {"rank": rank, "node": spec["node_rank"], "methods": {}}
        for name in spec["methods"]:
            seeds = [train_one(rank, local_rank, spec, name, seed, counter, data)
                     for seed in spec["seeds"]]
            # ru_maxrss is the process's peak so far: with several methods in one world it
            # includes the methods before this one.
            payload["methods"][name] = {"seeds": seeds, "max_rss_mb": max_rss_mb()}
        write_json(path + ".json", payload, indent=None)
        dist.barrier()
    except BaseException:
        with open(path + ".err", "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def node_main(spec: dict[str, Any]) -> None:
    """Spawn this node's ranks and wait for them."""
    mp.start_processes(_rank_entry, args=(spec,), nprocs=spec["nproc_per_node"],
                       start_method="spawn", join=True)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON file written by compare.py")
    parser.add_argument("--node-rank", type=int, required=True)
    args = parser.parse_args()
    with open(args.spec) as fh:
        spec = json.load(fh)
    spec["node_rank"] = args.node_rank
    node_main(spec)


if __name__ == "__main__":
    main()

