"""AB-training against plain DDP, PowerSGD and post-local SGD on the same run.

Same model, data, seeds and number of steps for every method; 4 gloo processes on CPU by
default. Every knob is a command-line flag. For each method, one world of processes trains every
seed in turn (fresh model, optimizer and process-group state per seed), and each rank records:
bytes it sent (the AB meter ``opt.traffic.summary()``; for the DDP-based methods the payload of
every torch.distributed collective their comm hook and averager made, counted as it goes out),
the bytes DDP would have sent, test accuracy along the way, training wall time, time in AB's
phase switches and SVDs, peak training-state bytes and peak RSS.

``--netns`` runs the ranks in two network namespaces ("nodes", ``--nproc`` / 2 ranks each)
joined by a veth pair limited to ``--rate`` with tbf (benchmarks/netns.sh), so the link, not the
CPU, is the bottleneck; the kernel's interface counters then measure what really crossed the
link, and the run reports each method's time to reach DDP's final accuracy. It needs root and
iproute2; without them it says so and skips.

    python -m benchmarks.compare --steps 600 --seeds 0,1,2 --out benchmarks/results/local.json
    python -m benchmarks.compare --netns --rate 100mbit --out benchmarks/results/netns.json

The results JSON holds the settings, the machine, per-seed records and per-method summaries;
``benchmarks/plot.py`` turns it into plots and a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ab_accel.schedule import scaled_schedule
from benchmarks.common import free_port, stats, write_json
from benchmarks.meters import predicted_link_bytes
from benchmarks.methods import AB_PREFIX, LOCAL, Knobs, check_method
from benchmarks.workloads import MODELS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NETNS = os.path.join(HERE, "netns.sh")
NODES = (("ab-node0", "abveth0", "10.200.0.1"), ("ab-node1", "abveth1", "10.200.0.2"))
#: Ethernet (14) + IPv4 (20) + TCP with timestamps (32) header bytes per frame.
TCP_FRAME_OVERHEAD = 66
DEFAULT_METHODS = ("local,ddp,ddp-bf16,ab-with-stale,ab-with-stale-bf16,ab-only-learned,ab-only-b,"
                   "powersgd-r2,powersgd-r8,localsgd,diloco")


# ---------------------------------------------------------------------------- settings
def ab_schedule_for(steps: int) -> dict[str, int]:
    """AB's schedule scaled to a run of ``steps`` optimizer steps: the one rule of the core
    (:func:`ab_accel.schedule.scaled_schedule`, which says why), under this script's flag
    names."""
    try:
        s = scaled_schedule(steps)  # the one rule, shared with the recipes
    except ValueError as exc:
        raise ValueError(f"--steps {steps}: {exc} (here: --ab-warmup, --ab-sync-every and "
                         f"--ab-rebound)") from None
    return {"ab_warmup": s["warmup_steps"], "ab_sync_every": s["sync_every"],
            "ab_rebound": s["rebound_steps"], "ab_lr_rebound": s["lr_rebound_steps"]}


def parse_args(argv: list[str] | None = None) -> Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML file of these flags (keys with underscores), e.g. one saved "
                        "with --print_config")
    g = p.add_argument_group("run")
    g.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: local (the zero-communication clock, not a "
                        "training method), ddp, ddp-fp16, ddp-bf16, ab-with-stale, "
                        "ab-only-learned, ab-only-b, ab-full (each with an optional -bf16 or "
                        "-fp16: the low-precision wire), powersgd-r<rank>, "
                        "localsgd[-h<period>], diloco[-h<period>]")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    g.add_argument("--nproc", type=int, default=4, help="ranks (processes) in the world")
    g.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: steps / 30)")
    g.add_argument("--out", default=os.path.join(HERE, "results", "compare.json"),
                   help="results JSON")
    g.add_argument("--timeout", type=float, default=3600, help="seconds per world")
    g.add_argument("--one-world", action="store_true",
                   help="train every method in one world of processes (saves the start-up "
                        "of a world per method; peak RSS is then shared by the methods)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="mlp")
    g.add_argument("--width", type=int, default=512, help="hidden width (mlp, cnn head, vit)")
    g.add_argument("--depth", type=int, default=3, help="hidden layers (mlp) / blocks (vit)")
    g.add_argument("--channels", type=int, default=16, help="first conv channels (cnn)")
    g = p.add_argument_group("optimizer (the same for every method)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--lr-warmup", type=int, default=None,
                   help="linear LR warm-up steps before the cosine (default: 5%% of steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.05)
    g.add_argument("--clip", type=float, default=1.0, help="gradient clip norm (0: off)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g = p.add_argument_group("AB-training (default schedule: see ab_schedule_for)")
    g.add_argument("--ab-warmup", type=int, default=None, help="W0")
    g.add_argument("--ab-sync-every", type=int, default=None, help="T")
    g.add_argument("--ab-rebound", type=int, default=None, help="F")
    g.add_argument("--ab-lr-rebound", type=int, default=None, help="R")
    g.add_argument("--rank-cutoff", type=float, default=0.15, help="tau")
    g.add_argument("--ab-group-size", type=int, default=None,
                   help="ranks per group (default: nproc / 2, one node in --netns mode)")
    g.add_argument("--orthogonal-init", action="store_true")
    g = p.add_argument_group("PowerSGD and post-local SGD")
    g.add_argument("--powersgd-start", type=int, default=None,
                   help="start_powerSGD_iter (default: AB's warm-up W0)")
    g.add_argument("--localsgd-start", type=int, default=None,
                   help="start_localSGD_iter and the averager's warm-up (default: W0)")
    g.add_argument("--localsgd-period", type=int, default=8,
                   help="PeriodicModelAverager period H for 'localsgd'")
    g.add_argument("--localsgd-subgroup-size", type=int, default=2,
                   help="ranks per post-local SGD subgroup (one node in --netns mode)")
    g = p.add_argument_group("DiLoCo (arXiv 2311.08105)")
    g.add_argument("--diloco-period", type=int, default=16,
                   help="H: inner AdamW steps per rank between outer steps")
    g.add_argument("--diloco-outer-lr", type=float, default=0.7, help="outer Nesterov lr")
    g.add_argument("--diloco-outer-momentum", type=float, default=0.9,
                   help="outer Nesterov momentum")
    g = p.add_argument_group("rate-limited link")
    g.add_argument("--netns", action="store_true",
                   help="two network namespaces joined by a tbf-limited veth (needs root)")
    g.add_argument("--rate", default="100mbit", help="tbf rate of the link, each direction")
    args = p.parse_args(argv)
    return finish_args(args, p)


def finish_args(args: Namespace, parser: ArgumentParser) -> Namespace:
    """Fill derived defaults and check everything before any process starts."""
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.method_list or not args.seed_list:
        parser.error("--methods and --seeds must each name at least one")
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    if args.netns and args.nproc % 2:
        parser.error("--netns splits the ranks over two nodes: --nproc must be even")
    keys = ("ab_warmup", "ab_sync_every", "ab_rebound", "ab_lr_rebound")
    if any(getattr(args, key) is None for key in keys):
        for key, value in ab_schedule_for(args.steps).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 30)
    if args.lr_warmup is None:
        args.lr_warmup = round(0.05 * args.steps)
    if args.powersgd_start is None:
        args.powersgd_start = max(2, args.ab_warmup)
    if args.localsgd_start is None:
        args.localsgd_start = args.ab_warmup
    knobs = make_knobs(args)
    for m in args.method_list:
        try:
            check_method(m, knobs, args.nproc)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def make_knobs(args: Namespace) -> Knobs:
    return Knobs(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                 lr_warmup_steps=args.lr_warmup, min_lr_ratio=args.min_lr_ratio,
                 clip=args.clip, label_smoothing=args.label_smoothing,
                 ab_warmup=args.ab_warmup, ab_sync_every=args.ab_sync_every,
                 ab_rebound=args.ab_rebound, ab_lr_rebound=args.ab_lr_rebound,
                 rank_cutoff=args.rank_cutoff, ab_group_size=args.ab_group_size,
                 orthogonal_init=args.orthogonal_init, powersgd_start=args.powersgd_start,
                 localsgd_start=args.localsgd_start, localsgd_period=args.localsgd_period,
                 localsgd_subgroup_size=args.localsgd_subgroup_size,
                 diloco_period=args.diloco_period, diloco_outer_lr=args.diloco_outer_lr,
                 diloco_outer_momentum=args.diloco_outer_momentum)


# ---------------------------------------------------------------------------- launching
def netns_available() -> str | None:
    """None when the rate-limited mode can run here, else the reason it cannot."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed: apt-get install iproute2"
    res = subprocess.run(["bash", NETNS, "check"], capture_output=True, text=True)
    if res.returncode != 0:
        return (res.stdout + res.stderr).strip() or "network namespaces are not available"
    return None


def run_world(args: Namespace, methods: list[str]) -> list[dict[str, Any]]:
    """Launch one world that trains ``methods`` (every seed); return each rank's record."""
    nnodes = 2 if args.netns else 1
    nproc = args.nproc // nnodes
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as out_dir:
        spec = {
            "methods": methods, "seeds": args.seed_list, "knobs": asdict(make_knobs(args)),
            "model": args.model, "width": args.width, "depth": args.depth,
            "channels": args.channels, "batch_size": args.batch_size,
            "eval_every": args.eval_every, "out_dir": out_dir, "nnodes": nnodes,
            "nproc_per_node": nproc, "master_port": free_port(),
            "master_addr": NODES[0][2] if args.netns else "127.0.0.1",
        }
        procs = []
        for node in range(nnodes):
            node_spec = dict(spec, interface=NODES[node][1] if args.netns else None)
            spec_path = os.path.join(out_dir, f"spec{node}.json")
            with open(spec_path, "w") as fh:
                json.dump(node_spec, fh)
            cmd = [sys.executable, "-m", "benchmarks.worker", "--spec", spec_path,
                   "--node-rank", str(node)]
            if args.netns:
                cmd = ["ip", "netns", "exec", NODES[node][0], "env",
                       f"GLOO_SOCKET_IFNAME={NODES[node][1]}"] + cmd
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True))
        deadline = time.monotonic() + args.timeout
        failed = False
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    failed = True
                    break
                if time.monotonic() > deadline:
                    failed = True
                    break
                time.sleep(0.2)
        finally:
            for p in procs:  # only our own node processes (and their ranks), by group id
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        world = args.nproc
        errors = []
        for r in range(world):
            err = os.path.join(out_dir, f"rank{r}.err")
            if os.path.exists(err):
                with open(err) as fh:
                    errors.append(f"--- rank {r} ---\n{fh.read()}")
        if failed or any(p.returncode != 0 for p in procs) or errors:
            why = "timed out" if time.monotonic() > deadline else "failed"
            raise RuntimeError(f"methods {','.join(methods)} {why} (exit codes "
                               f"{[p.returncode for p in procs]}):\n" + "\n".join(errors))
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                ranks.append(json.load(fh))
        return ranks


# ---------------------------------------------------------------------------- aggregation
def aggregate_seed(ranks: list[dict[str, Any]], method: str, seed_index: int, nodes: int
                   ) -> dict[str, Any]:
    """One seed of one method: rank 0's accuracy, per-rank bytes, link counters."""
    recs = [r["methods"][method]["seeds"][seed_index] for r in ranks]
    world = len(recs)
    per_node = world // nodes

    def node_of(rank: int) -> int:
        return rank // per_node

    r0 = recs[0]
    curve = []
    for i, pt in enumerate(r0["curve"]):
        point = {k: pt[k] for k in ("step", "seconds", "acc", "test_loss") if k in pt}
        point["bytes"] = statistics.fmean(r["curve"][i]["bytes"] for r in recs)
        point["wire_bytes"] = statistics.fmean(r["curve"][i]["wire_bytes"] for r in recs)
        links = [r["curve"][i]["link"] for r in recs if r["curve"][i].get("link")]
        if links:
            point["link_tx_bytes"] = sum(lk["tx_bytes"] for lk in links)
        if "phase" in pt:
            point["phase"] = pt["phase"]
        curve.append(point)
    out: dict[str, Any] = {
        "seed": r0["seed"],
        "final_acc": r0["final_acc"],
        "final_test_loss": r0["final_test_loss"],
        "train_seconds": r0["train_seconds"],
        "seconds_per_step": r0["train_seconds"] / max(1, r0["curve"][-1]["step"]),
        "setup_seconds": statistics.fmean(r["setup_seconds"] for r in recs),
        "bytes_per_rank": [r["bytes"] for r in recs],
        "wire_bytes_per_rank": [r["wire_bytes"] for r in recs],
        "bytes": statistics.fmean(r["bytes"] for r in recs),
        "wire_bytes": statistics.fmean(r["wire_bytes"] for r in recs),
        "intercepted_bytes_per_rank": [r["intercepted_bytes"] for r in recs],
        "dp_equivalent_bytes": statistics.fmean(r.get("dp_equivalent_bytes", 0) for r in recs),
        "peak_state_bytes": max(r["peak_state_bytes"] for r in recs),
        "peak_state_bytes_by_phase": {
            k: max(r["peak_state_bytes_by_phase"].get(k, 0) for r in recs)
            for k in r0["peak_state_bytes_by_phase"]},
        "replica_spread": r0["replica_spread"],
        # ms per step by phase, the slowest rank's (a step ends when the slowest rank's does)
        "steps_by_phase": r0.get("steps_by_phase", {}),
        "median_ms_per_step_by_phase": {
            k: 1e3 * max(r["median_step_seconds_by_phase"][k] for r in recs)
            for k in r0.get("median_step_seconds_by_phase", {})},
        "ms_per_step_by_phase": {
            k: 1e3 * max(r["step_seconds_by_phase"][k] for r in recs) / r0["steps_by_phase"][k]
            for k in r0.get("steps_by_phase", {})},
        "curve": curve,
        "collectives_rank0": r0["collectives"],
    }
    if "hook_calls" in r0:
        out["hook_calls"] = r0["hook_calls"]
    if "ab_traffic" in r0:
        out["ab_traffic_per_rank"] = [r["ab_traffic"] for r in recs]
        out["roles"] = [r["role"] for r in recs]
        out["switch_seconds"] = {k: statistics.fmean(r["switch_seconds"].get(k, 0.0)
                                                     for r in recs)
                                 for k in r0["switch_seconds"]}
        out["switch_counts"] = r0["switch_counts"]
        out["svd_seconds"] = statistics.fmean(r["svd_seconds"] for r in recs)
        out["factorizations"] = r0["factorizations"]
        out["rank_fraction"] = rank_fraction(r0["factorizations"])
        out["meter_equals_intercept"] = all(
            r["bytes"] == r["intercepted_bytes"] for r in recs)
    links = [r["link"] for r in recs if r.get("link")]
    if links:
        kernel_tx = sum(lk["tx_bytes"] for lk in links)
        packets = sum(lk["tx_packets"] for lk in links)
        records_key = "ab_meter_records" if "ab_meter_records" in r0 else "collectives"
        predicted = sum(predicted_link_bytes(r[records_key], node_of) for r in recs)
        # The kernel counts frames: TCP payload plus Ethernet, IP and TCP headers (with the
        # timestamp option, Linux's default: 66 bytes per frame as the veth counts it; a GSO
        # frame carries one set). Both sides' ACKs are frames too.
        payload = kernel_tx - TCP_FRAME_OVERHEAD * packets
        out["link"] = {"kernel_tx_bytes": kernel_tx,
                       "kernel_rx_bytes": sum(lk["rx_bytes"] for lk in links),
                       "kernel_tx_packets": packets,
                       "kernel_tcp_payload_bytes": payload,
                       "predicted_bytes": predicted,
                       "kernel_over_predicted": kernel_tx / predicted if predicted else None,
                       "tcp_payload_over_predicted": payload / predicted if predicted else None}
    return out


def rank_fraction(factorizations: list[dict[str, Any]]) -> float | None:
    """Mean over factorizations and layers of r / min(out, in): the share of the full rank
    the rank cutoff kept."""
    fracs = [f["ranks"][n] / min(f["shapes"][n]) for f in factorizations for n in f["ranks"]
             if f["ranks"][n] is not None]
    return statistics.fmean(fracs) if fracs else None


def dense_ms_per_step(seed: dict[str, Any]) -> float | None:
    """Mean ms of the dense steps: DDP-like methods' every step ("dp"), AB's warm-up and
    rebound steps (its full-traffic steps, the ones the overlap target compares with DDP's)."""
    by = seed.get("ms_per_step_by_phase") or {}
    steps = seed.get("steps_by_phase") or {}
    dense = [k for k in by if k in ("dp", "warmup", "rebound")]
    if not dense:
        return None
    if not steps:
        return statistics.fmean(by[k] for k in dense)
    n = sum(steps[k] for k in dense)
    return sum(by[k] * steps[k] for k in dense) / n


def time_to_accuracy(curve: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches ``target``."""
    for pt in curve:
        if pt.get("acc") is not None and pt["acc"] >= target - 1e-9:
            return pt["seconds"]
    return None


def summarize(method: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {
        "final_acc": stats([x["final_acc"] for x in seeds]),
        "bytes": stats([x["bytes"] for x in seeds]),
        "wire_bytes": stats([x["wire_bytes"] for x in seeds]),
        "dp_equivalent_bytes": stats([x["dp_equivalent_bytes"] for x in seeds]),
        "train_seconds": stats([x["train_seconds"] for x in seeds]),
        "seconds_per_step": stats([x["seconds_per_step"] for x in seeds]),
        "peak_state_bytes": stats([x["peak_state_bytes"] for x in seeds]),
        "dense_ms_per_step": stats([dense_ms_per_step(x) for x in seeds]),
    }
    if method.startswith(AB_PREFIX):
        s["svd_seconds"] = stats([x["svd_seconds"] for x in seeds])
        s["switch_seconds"] = stats([sum(x["switch_seconds"].values()) for x in seeds])
        s["rank_fraction"] = stats([x["rank_fraction"] for x in seeds])
        s["ab_phase_state_bytes"] = stats([x["peak_state_bytes_by_phase"].get("ab")
                                            for x in seeds])
        s["meter_reduction"] = stats([statistics.fmean(t["reduction"]
                                                        for t in x["ab_traffic_per_rank"])
                                       for x in seeds])
    if all("link" in x for x in seeds):
        s["link_tx_bytes"] = stats([x["link"]["kernel_tx_bytes"] for x in seeds])
        s["link_predicted_bytes"] = stats([x["link"]["predicted_bytes"] for x in seeds])
        s["kernel_over_predicted"] = stats([x["link"]["kernel_over_predicted"]
                                             for x in seeds])
        s["tcp_payload_over_predicted"] = stats([x["link"]["tcp_payload_over_predicted"]
                                                  for x in seeds])
    return s


def compare_to_ddp(methods: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, measured (not asserted): bytes and accuracy against DDP, time to
    DDP's final accuracy, meter against kernel counters."""
    if "ddp" not in methods:
        return {}
    ddp = methods["ddp"]
    target = ddp["summary"]["final_acc"]["mean"]
    ddp_wire = ddp["summary"]["wire_bytes"]["mean"]
    ddp_bytes = ddp["summary"]["bytes"]["mean"]
    out: dict[str, Any] = {"ddp_final_acc_mean": target}
    ddp_ttas = [time_to_accuracy(x["curve"], target) for x in ddp["seeds"]]
    ddp_tta = stats(ddp_ttas)
    local = methods.get(LOCAL, {}).get("summary")
    for name, m in methods.items():
        s = m["summary"]
        row: dict[str, Any] = {
            "wire_bytes_vs_ddp": s["wire_bytes"]["mean"] / ddp_wire if ddp_wire else None,
            "bytes_vs_ddp": s["bytes"]["mean"] / ddp_bytes if ddp_bytes else None,
            "acc_minus_ddp": s["final_acc"]["mean"] - target,
            "train_seconds_vs_ddp": (s["train_seconds"]["mean"]
                                     / ddp["summary"]["train_seconds"]["mean"]),
        }
        if local:
            # compute = the local clock's step (same model, data and optimizer, no
            # collective); exposed communication = what this method's step takes beyond it
            step = s["seconds_per_step"]["mean"]
            row["compute_ms_per_step"] = 1e3 * local["seconds_per_step"]["mean"]
            row["exposed_comm_ms_per_step"] = 1e3 * step - row["compute_ms_per_step"]
            row["train_seconds_vs_local"] = (s["train_seconds"]["mean"]
                                             / local["train_seconds"]["mean"])
        row["meets_bytes_target"] = bool(row["wire_bytes_vs_ddp"] is not None
                                         and row["wire_bytes_vs_ddp"] <= 0.25)
        row["meets_accuracy_target"] = bool(row["acc_minus_ddp"] >= -0.5)
        ttas = [time_to_accuracy(x["curve"], target) for x in m["seeds"]]
        row["time_to_ddp_acc"] = ttas
        row["seeds_reaching_ddp_acc"] = sum(t is not None for t in ttas)
        reached = stats(ttas)
        if reached and ddp_tta:
            row["time_to_ddp_acc_vs_ddp"] = reached["mean"] / ddp_tta["mean"]
        relaxed = [time_to_accuracy(x["curve"], target - 0.5) for x in m["seeds"]]
        row["time_to_ddp_acc_minus_half_point"] = relaxed
        if "link_tx_bytes" in s and "link_tx_bytes" in ddp["summary"]:
            row["link_bytes_vs_ddp"] = (s["link_tx_bytes"]["mean"]
                                        / ddp["summary"]["link_tx_bytes"]["mean"])
        for key, flag in (("kernel_over_predicted", "meter_kernel_within_5pct"),
                          ("tcp_payload_over_predicted", "meter_tcp_payload_within_5pct")):
            ratio = s.get(key)
            if ratio:
                row[flag] = bool(abs(ratio["min"] - 1) <= 0.05 and abs(ratio["max"] - 1) <= 0.05)
        out[name] = row
    return out


# ---------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    # what else was running (the machine is shared): the processes using >= 5% of a core
    ps = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                        text=True)
    if ps.returncode == 0:
        info["top_processes"] = busy_processes(ps.stdout.splitlines()[1:])
    return info


def busy_processes(lines: list[str], min_cpu: float = 5.0, limit: int = 8) -> list[str]:
    """``ps -eo pcpu,etime,args`` lines of processes at >= ``min_cpu`` % CPU, shortened."""
    out = []
    for line in lines:
        fields = line.split(None, 2)
        try:
            busy = float(fields[0]) >= min_cpu
        except (ValueError, IndexError):
            continue
        if busy and not fields[-1].startswith("ps "):
            out.append(" ".join(fields)[:120])
    return out[:limit]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the namespaces are removed and the ranks stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = {
        "command": "python -m benchmarks.compare " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("method_list",
                                                                       "seed_list")},
        "machine_before": machine(),
        "mode": "netns" if args.netns else "local",
        "methods": {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.netns:
        why = netns_available()
        if why:
            print(f"compare.py --netns: skipped: {why}", flush=True)
            result["skipped"] = why
            write_json(args.out, result)
            return result
        subprocess.run(["bash", NETNS, "up", args.rate], check=True)
    try:
        nodes = 2 if args.netns else 1
        groups = ([args.method_list] if args.one_world
                  else [[m] for m in args.method_list])
        for methods in groups:
            t0 = time.time()
            print(f"[compare] {','.join(methods)}: seeds {args.seed_list}, {args.steps} steps, "
                  f"{args.nproc} ranks ({result['mode']})", flush=True)
            ranks = run_world(args, methods)
            for method in methods:
                seeds = [aggregate_seed(ranks, method, i, nodes)
                         for i in range(len(args.seed_list))]
                result["methods"][method] = {
                    "seeds": seeds, "summary": summarize(method, seeds),
                    "max_rss_mb": max(r["methods"][method]["max_rss_mb"] for r in ranks),
                    "world_seconds": time.time() - t0, "shared_world": len(methods) > 1,
                }
                s = result["methods"][method]["summary"]
                print(f"[compare] {method}: acc {s['final_acc']['mean']:.2f} "
                      f"+- {s['final_acc']['std']:.2f}, wire {s['wire_bytes']['mean'] / 1e6:.2f} "
                      f"MB/rank, {s['train_seconds']['mean']:.1f} s", flush=True)
            write_json(args.out, result)  # partial results survive an interruption
    finally:
        if args.netns:
            subprocess.run(["bash", NETNS, "down"], check=False)
    result["comparison"] = compare_to_ddp(result["methods"])
    result["machine_after"] = machine()
    write_json(args.out, result)
    print(f"[compare] wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
