"""Multi-process training scenarios for the core tests. Every function here runs on each rank
of a real gloo world (tests/distributed.py) and returns plain tensors and dicts; the tests
assert on what the ranks return."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ab_accel import (
    ABConfig,
    ABOptimizer,
    compression,
    convert,
    load_checkpoint,
    merge,
    save_checkpoint,
)
from ab_accel.model import ab_layers

SYNC_MODES = ("with-stale", "only-learned", "full", "only-b")


def small_cnn() -> nn.Module:
    """Stem conv (dense) -> BN -> conv (AB) -> BN -> linear (AB) -> linear (AB) -> head (dense)."""
    return nn.Sequential(
        # No conv bias before a BatchNorm: its gradient is pure rounding noise, which Adam
        # would amplify into different updates under any change of summation order.
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10),
    )


def batch(rank: int, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-(rank, step) data, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(1000 * step + rank + 7)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.cross_entropy(model(x), y)


def flat_named(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()
                if b.is_floating_point()})
    return out


class CollectiveSpy:
    """Counts the bytes of every torch.distributed collective call that really runs.

    It wraps (does not replace) dist.all_reduce / dist.broadcast / dist.all_gather: the real
    collective still runs; the spy only adds up the sizes of the tensors passed in.
    """

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter")

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self.groups: list[tuple[int, ...]] = []
        self.sizes: list[tuple[int, str]] = []  # (bytes, dtype) of every call, in issue order
        self.devices: set[str] = set()
        self._orig: dict[str, Callable] = {}

    def __enter__(self) -> CollectiveSpy:
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapper(tensor, *args, _orig=orig, **kwargs):
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
                self.sizes.append((tensor.numel() * tensor.element_size(), str(tensor.dtype)))
                self.devices.add(str(tensor.device))
                group = kwargs.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None \
                    else tuple(range(dist.get_world_size()))
                self.groups.append(ranks)
                return _orig(tensor, *args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def dp_equivalent_bytes_per_step(model_factory: Callable[[], nn.Module]) -> int:
    """What DDP all-reduces per step for the DENSE model: all grads plus float buffers."""
    m = model_factory()
    return (sum(p.numel() * p.element_size() for p in m.parameters())
            + sum(b.numel() * b.element_size() for b in m.buffers() if b.is_floating_point()))


def invariants(rank: int, world: int, group_size: int, optimizer_name: str,
               modes: tuple[str, ...] = SYNC_MODES) -> dict[str, Any]:
    """Train the small CNN through warm-up, two AB cycles and into a third, once per sync mode,
    recording everything the invariants are checked on."""
    results: dict[str, Any] = {}
    for mode in modes:
        gs = world if (mode == "only-b" and world == 4) else group_size
        cfg = ABConfig(warmup_steps=3, sync_every=6, rebound_steps=2, lr_rebound_steps=2,
                       rank_cutoff=0.7, sync_mode=mode, group_size=gs)
        results[mode] = _run_mode(rank, world, cfg, optimizer_name)
    return results


def _make_opt(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _run_mode(rank: int, world: int, cfg: ABConfig, optimizer_name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)  # plain DDP twin for the warm-up steps
    convert(model, cfg)
    total = cfg.warmup_steps + 2 * cfg.sync_every + 2
    spy = CollectiveSpy()
    with spy:
        opt = ABOptimizer(_make_opt(optimizer_name, model.parameters()), model, cfg)
    ddp = DDP(reference)
    ddp_opt = _make_opt(optimizer_name, ddp.parameters())

    rec: dict[str, Any] = {"steps": [], "group_ranks": list(opt.groups.group_ranks),
                           "pg_ranks": dist.get_process_group_ranks(opt.groups.group)
                           if opt.groups.group is not None else None,
                           "role_plan": list(opt.groups.plan.roles)}
    for t in range(total):
        phase = opt.phase
        role = opt.role
        entry: dict[str, Any] = {"t": t, "phase": phase, "role": role}
        if phase == "rebound":
            # The reduced gradients of a rebound step are DDP's on the same weights and data.
            twin = DDP(merge(copy.deepcopy(model)))
            loss_of(twin, rank, t).backward()
            entry["ddp_grads"] = {n: p.grad.clone() for n, p in twin.module.named_parameters()}
        before_sync_factors = None
        if phase == "ab" and cfg.sync_every - cfg.rebound_steps - 1 == \
                (t - cfg.warmup_steps) % cfg.sync_every:
            before_sync_factors = "pending"
        loss = loss_of(model, rank, t)
        with spy:  # the overlapped reduction launches during backward
            loss.backward()
            opt.synchronize()
        if phase == "rebound":
            entry["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}
        if before_sync_factors == "pending":
            # Capture the factors after this last AB update, right before the sync runs.
            orig_sync = opt._sync

            def capture(*args, orig=orig_sync, entry=entry):
                entry["pre_sync"] = {n: (layer.A.detach().clone(), layer.B.detach().clone())
                                     for n, layer in ab_layers(model)}
                entry["pre_sync_dense"] = {n: p.detach().clone() for n, p in
                                           model.named_parameters()
                                           if not n.endswith((".A", ".B"))}
                orig(*args)

            opt._sync = capture
        orig_event = opt._run_event

        def snapshot_then_switch(event, *args, orig=orig_event, entry=entry):
            # The parameters as the step left them, before any switch restructures them.
            entry.setdefault("pre_switch", flat_named(model))
            orig(event, *args)

        opt._run_event = snapshot_then_switch
        with spy:
            opt.step()
        opt.zero_grad()
        del opt._run_event  # back to the class method
        if "pre_sync" in entry:
            del opt._sync
        if phase == "warmup":
            loss_of(ddp, rank, t).backward()
            ddp_opt.step()
            ddp_opt.zero_grad()
            entry["ddp_params"] = {n: p.detach().clone() for n, p in
                                   ddp.module.named_parameters()}
        entry["params"] = flat_named(model)
        entry["loss"] = loss.item()
        entry["ranks"] = dict(opt.ranks)
        factor_names = {f"{n}.{k}" for n, _ in ab_layers(model) for k in ("weight", "A", "B")}
        entry["dense_state"] = {
            f"{n}:{k}": v.clone()
            for n, p in model.named_parameters() if n not in factor_names
            for k, v in opt.optimizer.state.get(p, {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        }
        rec["steps"].append(entry)
    rec["summary"] = opt.traffic.summary()
    rec["records"] = opt.traffic.records
    rec["spy_bytes"] = spy.bytes
    rec["spy_devices"] = sorted(spy.devices)
    rec["comm_device"] = str(opt.comm.device)
    rec["spy_calls"] = spy.calls
    rec["spy_groups"] = spy.groups
    rec["dp_step_bytes"] = dp_equivalent_bytes_per_step(small_cnn)
    rec["compression"] = compression(model)
    x, _ = batch(rank, 999)
    model.eval()
    with torch.no_grad():
        ab_out = model(x)
        merged = merge(copy.deepcopy(model))
        rec["merge_diff"] = (merged(x) - ab_out).abs().max().item()
    return rec


def resume(rank: int, world: int, stop_at: int, total: int, mode: str) -> dict[str, Any]:
    """Uninterrupted run vs. a run checkpointed at ``stop_at`` (mid-AB-phase) and resumed in
    fresh objects; returns both final states."""
    cfg = ABConfig(warmup_steps=2, sync_every=6, rebound_steps=1, lr_rebound_steps=2,
                   rank_cutoff=0.5, sync_mode=mode)

    def fresh() -> tuple[nn.Module, ABOptimizer]:
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        return model, ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)

    def train(model, opt, start, end):
        for t in range(start, end):
            loss_of(model, rank, t).backward()
            opt.step()
            opt.zero_grad()

    model, opt = fresh()
    train(model, opt, 0, total)
    straight = flat_named(model)

    model, opt = fresh()
    train(model, opt, 0, stop_at)
    phase_at_stop, role_at_stop = opt.phase, opt.role
    shared = os.environ.get("AB_TEST_CKPT")
    if rank == 0:
        path = tempfile.mkdtemp(prefix="ab_ckpt_")
        obj = [path]
    else:
        obj = [None]
    dist.broadcast_object_list(obj, src=0)
    path = shared or obj[0]
    save_checkpoint(path, model, opt)
    del model, opt
    model, opt = fresh()  # a new process would start here: dense model, step 0
    load_checkpoint(path, model, opt)
    resumed_step = opt.step_count
    train(model, opt, resumed_step, total)
    return {"straight": straight, "resumed": flat_named(model), "phase_at_stop": phase_at_stop,
            "role_at_stop": role_at_stop, "resumed_step": resumed_step}


def sync_now_mid_ab(rank: int, world: int) -> dict[str, Any]:
    """Stop mid-AB-phase and reconcile for export: every rank ends with the same dense model.

    Also records ``groups_differ`` along the way, and what ``finalize()`` does where the ranks
    already agree (right after the factorization: nothing) and where they differ (a sync)."""
    cfg = ABConfig(warmup_steps=1, sync_every=6, rebound_steps=1, rank_cutoff=0.5)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)
    differ = [opt.groups_differ]
    for t in range(3):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
        differ.append(opt.groups_differ)
        if t == 0:  # the factorization just ran: the ranks agree, finalize has nothing to do
            early_finalize = opt.finalize()
    before = flat_named(model)
    sent_before = opt.traffic.summary()["bytes_by_phase"]["sync"]
    ran = opt.finalize()
    refused = False
    try:
        opt.step()
    except RuntimeError:
        refused = True
    return {"before": before, "after": flat_named(model), "ran": ran, "refused": refused,
            "modes": [layer.mode for _, layer in ab_layers(model)], "differ": differ,
            "early_finalize": early_finalize, "differ_after": opt.groups_differ,
            "sync_bytes": opt.traffic.summary()["bytes_by_phase"]["sync"] - sent_before,
            "switches": [sw.to_dict() for sw in opt.switches],
            "restored_switches": _switches_round_trip(model, opt, cfg)}


def _switches_round_trip(model: nn.Module, opt: ABOptimizer, cfg: ABConfig) -> list[dict]:
    """The switch list survives state_dict / load_state_dict into an unbound optimizer."""
    other = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), None, cfg)
    other.load_state_dict(opt.state_dict())
    return [sw.to_dict() for sw in other.switches]


def nonfinite_steps(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 (a B-group rank) makes NaN gradients at a warm-up step and at an AB step, then
    keeps making them until the consecutive-skip limit stops the run; and a switch on NaN
    parameters is refused before anything is averaged."""
    from ab_accel.optimizer import NonFiniteError

    cfg = ABConfig(warmup_steps=2, sync_every=6, rebound_steps=1, rank_cutoff=0.5,
                   max_skipped_steps=2)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)
    poison = {0, 3, 5, 6, 7}  # warm-up step 0; AB step 3; then 5, 6, 7 in a row
    out: dict[str, Any] = {"steps": [], "error": None}
    for t in range(9):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        state_before = {k: v.clone() for k, v in _flat_state(opt).items()}
        loss = loss_of(model, rank, t)
        if rank == 2 and t in poison:
            loss = loss * float("nan")
        loss.backward()
        phase = opt.phase
        try:
            opt.step()
        except NonFiniteError as exc:
            out["error"] = {"step": t, "message": str(exc)}
            break
        opt.zero_grad()
        after = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = [b.clone() for b in model.buffers() if b.is_floating_point()]
        out["steps"].append({
            "t": t, "phase": str(phase), "skipped_steps": opt.skipped_steps,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "state_unchanged": _same_tensors(_flat_state(opt), state_before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "buffers": torch.cat([b.reshape(-1) for b in buffers]),
            "step_count": opt.step_count})
    # A sync on NaN parameters: refused on every rank, nothing sent to the other ranks.
    cfg2 = ABConfig(warmup_steps=1, sync_every=3, rebound_steps=1, rank_cutoff=0.5)
    torch.manual_seed(0)
    model2 = convert(small_cnn(), cfg2)
    opt2 = ABOptimizer(torch.optim.SGD(model2.parameters(), lr=0.01), model2, cfg2)
    # warm-up step 0 (factorize after it), AB steps 1 and 2, sync after step 2
    for t in range(3):
        loss_of(model2, rank, t).backward()
        try:
            opt2.step()  # step 2: rank 1's NaN gradients are skipped, then the sync refuses
        except NonFiniteError as exc:
            out["switch_error"] = str(exc)
            out["others_finite"] = all(bool(torch.isfinite(v).all())
                                       for v in flat_named(model2).values())
            break
        opt2.zero_grad()
        if t == 1 and rank == 1:  # an update that overflowed, on one rank
            with torch.no_grad():
                next(iter(model2.parameters())).fill_(float("inf"))
    return out


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flat_state(opt: ABOptimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, st in enumerate(opt.optimizer.state.values())
            for k, v in st.items() if torch.is_tensor(v)}


def checkpoint_faults(rank: int, world: int) -> dict[str, Any]:
    """A mid-AB-phase checkpoint, then: a truncated shard, a missing shard, a save that died
    half-way, a changed schedule (refused, then accepted with the flag), an overwrite."""
    from ab_accel.checkpoint import CheckpointError, is_complete

    cfg = ABConfig(warmup_steps=1, sync_every=6, rebound_steps=1, rank_cutoff=0.5)

    def fresh(config: ABConfig = cfg) -> tuple[nn.Module, ABOptimizer]:
        torch.manual_seed(0)
        model = convert(small_cnn(), config)
        return model, ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, config)

    model, opt = fresh()
    for t in range(3):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
    obj = [tempfile.mkdtemp(prefix="ab_faults_") if rank == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    root = obj[0]
    path = os.path.join(root, "ckpt")
    save_checkpoint(path, model, opt)
    out: dict[str, Any] = {"complete": is_complete(path), "files": sorted(os.listdir(path)),
                           "leftovers": sorted(os.listdir(root))}
    dist.barrier()
    save_checkpoint(path, model, opt)  # overwriting a checkpoint leaves one whole folder
    out["leftovers_after_overwrite"] = sorted(os.listdir(root))

    def attempt(config: ABConfig = cfg) -> dict[str, Any]:
        m, o = fresh(config)
        before = flat_named(m)
        try:
            load_checkpoint(path, m, o)
            return {"error": None, "step": o.step_count}
        except CheckpointError as exc:
            return {"error": str(exc), "untouched": _same_tensors(flat_named(m), before),
                    "step": o.step_count}

    shard1 = os.path.join(path, "ab_group1.pt")
    data = open(shard1, "rb").read()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:
            fh.write(data[:-100])
    dist.barrier()
    out["truncated"] = attempt()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:  # same size, one byte flipped
            fh.write(data[:-1] + bytes([data[-1] ^ 1]))
    dist.barrier()
    out["corrupt"] = attempt()
    dist.barrier()
    if rank == 0:
        os.remove(shard1)
    dist.barrier()
    out["missing"] = attempt()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:
            fh.write(data)
    dist.barrier()
    out["changed"] = attempt(ABConfig(warmup_steps=1, sync_every=8, rebound_steps=1,
                                      rank_cutoff=0.5))
    out["accepted"] = attempt(ABConfig(warmup_steps=1, sync_every=8, rebound_steps=1,
                                       rank_cutoff=0.5, accept_resume_changes=True))
    out["intact"] = attempt()
    dist.barrier()
    if rank == 0:  # a save that died before its manifest: only the .tmp folder exists
        os.rename(path, path + ".tmp")
        os.remove(os.path.join(path + ".tmp", "ab_meta.json"))
    dist.barrier()
    out["unfinished"] = attempt()
    return out


def silent_peer(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 stops answering; rank 0's next collective fails after collective_timeout_s with
    an error that names the phase and the step (instead of waiting for 30 minutes)."""
    import time

    from ab_accel.comm import PeerError

    cfg = ABConfig(warmup_steps=5, sync_every=6, rebound_steps=1, collective_timeout_s=2.0)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, cfg)
    for t in range(2):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
    if rank == 1:
        time.sleep(8)  # alive, but silent
        return {"slept": True}
    loss_of(model, rank, 2).backward()
    start = time.monotonic()
    try:
        opt.step()
        return {"error": None}
    except PeerError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


def lean_memory_run(rank: int, world: int) -> dict[str, Any]:
    """lean_memory (no dense step; switches layer by layer) against the same schedule without
    it: the same parameters after every step, no layer ever dense again after the first
    factorization, and no optimizer state of a dense weight."""
    out: dict[str, Any] = {}
    for lean in (False, True):
        cfg = ABConfig(warmup_steps=0, sync_every=4, rebound_steps=0, lr_rebound_steps=1,
                       rank_energy=0.9, lean_memory=lean)
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)
        layers = list(ab_layers(model))
        dense_shapes = {tuple(layer.weight_shape) for _, layer in layers}
        steps, full_modes, dense_state = [], 0, 0
        for t in range(9):
            loss_of(model, rank, t).backward()
            opt.step()
            opt.zero_grad()
            steps.append({k: v.detach().clone() for k, v in model.named_parameters()})
            full_modes += sum(layer.mode == "full" for _, layer in layers)
            dense_state += sum(1 for p, st in opt.optimizer.state.items()
                               if tuple(p.shape) in dense_shapes and st)
        out["lean" if lean else "plain"] = {
            "steps": steps, "full_modes": full_modes, "dense_state": dense_state,
            "switches": [(sw.event.value, sw.step) for sw in opt.switches],
            "ranks": opt.ranks}
    return out


class _Branchy(nn.Module):
    """An MLP whose ``extra`` layer is used on rank 0 only, and ``never`` on no rank."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 48)
        self.hidden = nn.ModuleList(nn.Linear(48, 48) for _ in range(4))
        self.extra = nn.Linear(48, 48)
        self.never = nn.Linear(48, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        if use_extra:
            h = h + self.extra(h)
        return self.out(h)


def overlap_vs_after_backward(rank: int, world: int) -> dict[str, Any]:
    """The same steps with the reduction overlapped with backward and reduced after it, with
    gradient accumulation (2 micro-steps), a layer unused on some ranks and one unused on all,
    and small buckets (so several launch during backward); then the bf16 and fp16 wires."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(24)]
    for name, extra in (("after", {"overlap": False}), ("overlap", {"overlap": True}),
                        ("bf16", {"comm_dtype": "bf16"}), ("fp16", {"comm_dtype": "fp16"}),
                        ("fp32_after", {"overlap": False, "comm_dtype": None}),
                        ("first_small", {"first_bucket_mb": 2**-10})):
        cfg = ABConfig(warmup_steps=2, sync_every=4, rebound_steps=1, lr_rebound_steps=0,
                       rank_cutoff=0.3, bucket_mb=0.01, **extra)
        torch.manual_seed(0)
        model = convert(_Branchy(), cfg)
        opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, cfg)
        spy = CollectiveSpy()
        during_backward, micro_calls, grads, sizes, scopes = [], [], [], [], []
        for t in range(8):
            scopes.append(len(opt._scope()[1]))
            spy.sizes.clear()  # (the switches of the last step() are not this step's)
            for micro in range(2):
                x, y = data[(2 * t + micro) % len(data)]
                loss = nn.functional.cross_entropy(model(x, use_extra=rank == 0), y)
                spy.calls = 0
                with spy:
                    if micro == 0:
                        with opt.no_sync():
                            loss.backward()
                        micro_calls.append(spy.calls)
                    else:
                        loss.backward()
                        during_backward.append(spy.calls)
            with spy:
                opt.synchronize()
            sizes.append(spy.sizes[:])  # every collective of the step, in issue order
            spy.sizes.clear()
            grads.append({n: (None if p.grad is None else p.grad.clone())
                          for n, p in model.named_parameters()})
            with spy:
                opt.step()
            opt.zero_grad()
        out[name] = {"during_backward": during_backward, "micro_calls": micro_calls,
                     "scopes": scopes,
                     "grads": grads, "params": flat_named(model), "sizes": sizes,
                     "bytes": opt.traffic.summary()["bytes"],
                     "grad_bytes": opt.traffic.summary()["bytes_by_phase"]}
    return out


def wire_dtype_with_buffers(rank: int, world: int) -> dict[str, Any]:
    """Warm-up steps of small_cnn (BatchNorm: float buffers) with the fp32 and the bf16 wire:
    every collective of each step (bytes, dtype) and the buffers after the first step."""
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", None), ("bf16", "bf16")):
        cfg = ABConfig(warmup_steps=10, sync_every=4, rebound_steps=1, comm_dtype=dtype)
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, cfg)
        spy, sizes, buffers = CollectiveSpy(), [], None
        for t in range(3):
            spy.sizes.clear()
            with spy:
                loss_of(model, rank, t).backward()
                opt.step()
            sizes.append(spy.sizes[:])
            opt.zero_grad()
            if t == 0:
                buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
        out[name] = {"sizes": sizes, "buffers": buffers}
    return out


def ddp_traffic_counts_what_ddp_sends(rank: int, world: int) -> dict[str, Any]:
    """Plain DDP with ab_accel.ddp.DDPTraffic's comm hook: 3 SGD steps of small_cnn (BatchNorm
    buffers, broadcast by DDP before every forward)."""
    from ab_accel.ddp import DDPTraffic

    torch.manual_seed(0)
    model = small_cnn()
    ddp = DDP(model)
    counter = DDPTraffic(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        opt.step()
        counter.mark_step()
    again = DDPTraffic(DDP(copy.deepcopy(model)))
    again.load_state_dict(counter.state_dict())
    from ab_accel.comm import world_traffic

    return {"world": world_traffic(counter), "grad_bytes": counter.grad_bytes,
            "buffer_bytes": counter.buffer_bytes,
            "wire": counter.wire_bytes, "per_step": counter.per_step,
            "summary": counter.summary(), "restored": again.summary(),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buffer_total": sum(b.numel() * b.element_size() for b in model.buffers()),
            "grads": [p.grad.clone() for p in model.parameters()]}


def meter_keeps_the_bytes_of_every_step(rank: int, world: int) -> dict[str, Any]:
    """ABOptimizer's meter: the per-step bytes (switches included) add up to its totals."""
    torch.manual_seed(0)
    cfg = ABConfig(warmup_steps=2, sync_every=4, rebound_steps=1, rank_fraction=0.5)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, cfg)
    for step in range(9):
        opt.zero_grad()
        loss_of(model, rank, step).backward()
        opt.step()
    from ab_accel.comm import world_traffic

    return {"per_step": opt.traffic.per_step, "summary": opt.traffic.summary(),
            "world": world_traffic(opt.traffic),
            "phases": [str(opt.schedule.phase(t)) for t in range(9)], "report": opt.report(),
            "records": opt.traffic.records}


def accelerate_state_saved_whole_and_checked(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """ab_accel.accelerate.save_state / check_state around Accelerate's save_state, AB-training
    on (a mid-AB-phase save) and the checks of a damaged copy, on every rank."""
    import shutil

    from accelerate import Accelerator

    import ab_accel
    from recipes.state import check_state, load_state, save_state

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1, rank_fraction=0.5)
    model = small_cnn()
    model, opt = ab_accel.prepare(acc, model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                  config=cfg)
    for step in range(2):
        opt.zero_grad()
        acc.backward(loss_of(model, rank, step))
        opt.step()
    folder = os.path.join(tmp, "ckpts", "step_2")
    out: dict[str, Any] = {"saved": save_state(acc, folder, meta={"lr": 1e-3, "step": 2})}
    out["listing"] = sorted(os.listdir(os.path.join(tmp, "ckpts")))
    out["latest"] = ab_accel.latest_checkpoint(os.path.join(tmp, "ckpts"))
    out["meta"] = load_state(acc, folder)
    errors = {}
    for damage in ("truncate", "remove_manifest"):
        bad = os.path.join(tmp, f"bad_{damage}")
        if rank == 0:
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(folder, bad)
            if damage == "truncate":
                with open(os.path.join(bad, "model.safetensors"), "r+b") as fh:
                    fh.truncate(10)
            else:
                os.remove(os.path.join(bad, "ab_state.json"))
        acc.wait_for_everyone()
        try:
            check_state(acc, bad)
        except ab_accel.CheckpointError as exc:
            errors[damage] = str(exc)
    out["errors"] = errors
    return out
