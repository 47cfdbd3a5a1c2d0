"""The ABOptimizer's invariants (DESIGN.md), proven with real gloo processes: 4 ranks (one
A-group, one B-group) with AdamW, and 8 ranks with group_size 2 (two A-groups, two B-groups)
with SGD + momentum, for every sync mode; the end of a run stopped mid-AB-phase.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ab_accel import (
    ABConfig,
    ABOptimizer,
    compression,
    convert,
    merge,
)
from ab_accel.model import ab_layers

import scenarios
from distributed import run_distributed
from scenarios import (
    SYNC_MODES,
    CollectiveSpy,
    batch,
    dp_equivalent_bytes_per_step,
    flat_named,
    loss_of,
    small_cnn,
    switches_round_trip,
)
from scenarios import same as _same

ATOL = 1e-6


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
            "restored_switches": switches_round_trip(model, opt, cfg)}


@pytest.fixture(scope="module", params=[(4, 2, "adamw"), (8, 2, "sgd")],
                ids=["4ranks-adamw", "8ranks-gs2-sgd"])
def runs(request):
    world, group_size, opt_name = request.param
    results = run_distributed(invariants, world, group_size, opt_name)
    return world, results


def _groups(rec_by_rank):
    groups: dict[tuple, list[int]] = {}
    for r, rec in enumerate(rec_by_rank):
        groups.setdefault(tuple(rec["group_ranks"]), []).append(r)
    return list(groups.values())


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_warmup_steps_match_ddp(runs, mode):
    _, results = runs
    for rec in (r[mode] for r in results):
        warm = [e for e in rec["steps"] if e["phase"] == "warmup"]
        assert len(warm) == 3
        for e in warm:
            params = e.get("pre_switch", e["params"])
            ours = {k: v for k, v in params.items() if not k.startswith("buffer:")}
            assert _same(ours, e["ddp_params"], atol=ATOL), f"step {e['t']} differs from DDP"


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_rebound_gradients_are_ddp_gradients(runs, mode):
    _, results = runs
    for rec in (r[mode] for r in results):
        rebound = [e for e in rec["steps"] if e["phase"] == "rebound"]
        assert len(rebound) == 4
        for e in rebound:
            assert _same(e["grads"], e["ddp_grads"], atol=ATOL), f"step {e['t']}"


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_ab_phase_group_local_identity_and_divergence(runs, mode):
    world, results = runs
    recs = [r[mode] for r in results]
    groups = _groups(recs)
    expected_groups = world // (world if (mode == "only-b" and world == 4) else 2)
    assert len(groups) == expected_groups
    ab_steps = [i for i, e in enumerate(recs[0]["steps"]) if e["phase"] == "ab"]
    assert len(ab_steps) == 10
    diverged = 0
    for i in ab_steps:
        for members in groups:
            first = recs[members[0]]["steps"][i]["params"]
            for r in members[1:]:
                assert _same(first, recs[r]["steps"][i]["params"]), \
                    f"ranks {members[0]} and {r} of one group differ after AB step {i}"
        if len(groups) > 1:
            a, b = recs[groups[0][0]]["steps"][i]["params"], \
                recs[groups[-1][0]]["steps"][i]["params"]
            diverged += not _same(a, b)
    if len(groups) > 1:
        # Groups see different data: after every AB step (bar a sync boundary) they differ.
        assert diverged >= len(ab_steps) - 2


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_frozen_factor_never_changes(runs, mode):
    _, results = runs
    for rec in (r[mode] for r in results):
        steps = rec["steps"]
        for i, e in enumerate(steps):
            if e["phase"] != "ab" or i == 0 or steps[i - 1]["phase"] != "ab":
                continue
            if steps[i - 1]["ranks"] != e["ranks"] or any(v is None for v in e["ranks"].values()):
                continue  # a switch ran at the end of this step
            frozen = {"A": ".B", "B": ".A"}.get(e["role"])
            assert frozen, f"role {e['role']} in an AB phase"
            keys = [k for k in e["params"] if k.endswith(frozen)]
            assert keys
            for k in keys:
                assert torch.equal(steps[i - 1]["params"][k], e["params"][k]), \
                    f"{e['role']}-group rank changed {k} at step {e['t']}"
            trained = {"A": ".A", "B": ".B"}[e["role"]]
            assert any(not torch.equal(steps[i - 1]["params"][k], e["params"][k])
                       for k in e["params"] if k.endswith(trained))


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_ab_phase_collectives_stay_inside_the_group(runs, mode):
    world, results = runs
    for rank, rec in enumerate(r[mode] for r in results):
        own = tuple(rec["group_ranks"])
        assert rank in own
        if rec["pg_ranks"] is not None:  # the process group itself holds exactly the group
            assert tuple(rec["pg_ranks"]) == own
        ab_rows = [row for row in rec["records"] if row["phase"] == "ab"]
        assert ab_rows, "no AB-phase collective recorded"
        for row in ab_rows:
            assert tuple(row["group"]) == own
        if len(own) < world:
            assert all(len(row["group"]) == world for row in rec["records"]
                       if row["phase"] != "ab")


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_all_ranks_identical_after_every_sync(runs, mode):
    _, results = runs
    recs = [r[mode] for r in results]
    for i, e in enumerate(recs[0]["steps"]):
        if e["phase"] == "ab" and e["ranks"] and all(v is None for v in e["ranks"].values()):
            for r in range(1, len(recs)):
                assert _same(e["params"], recs[r]["steps"][i]["params"]), \
                    f"rank {r} differs from rank 0 after the sync at step {e['t']}"
                assert _same(e["dense_state"], recs[r]["steps"][i]["dense_state"],
                             atol=1e-7), "dense optimizer state not averaged at sync"


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_sync_follows_its_mode(runs, mode):
    """The weight after a sync is what the sync mode says, computed from every rank's factors."""
    _, results = runs
    recs = [r[mode] for r in results]
    roles = [e["role"] for e in (rec["steps"][3] for rec in recs)]
    syncs = [i for i, e in enumerate(recs[0]["steps"]) if "pre_sync" in e]
    assert len(syncs) == 2
    for i in syncs:
        for name in recs[0]["steps"][i]["pre_sync"]:
            a = torch.stack([rec["steps"][i]["pre_sync"][name][0] for rec in recs])
            b = torch.stack([rec["steps"][i]["pre_sync"][name][1] for rec in recs])
            if mode == "with-stale":
                expected = a.mean(0) @ b.mean(0)
            elif mode == "only-learned":
                is_a = torch.tensor([r == "A" for r in roles])
                expected = a[is_a].mean(0) @ b[~is_a].mean(0)
            elif mode == "full":
                expected = torch.stack([x @ y for x, y in zip(a, b, strict=True)]).mean(0)
            else:  # only-b: A was never trained, so every rank holds the same A
                assert all(torch.equal(a[0], x) for x in a)
                expected = a[0] @ b.mean(0)
            after = recs[0]["steps"][i]["params"][f"{name}.weight"]
            got = after.reshape(expected.shape[0], -1)
            assert torch.allclose(got, expected, atol=1e-5), f"{mode} sync of {name}"
        dense_names = recs[0]["steps"][i]["pre_sync_dense"].keys()
        for n in dense_names:
            mean = torch.stack([rec["steps"][i]["pre_sync_dense"][n] for rec in recs]).mean(0)
            assert torch.allclose(recs[0]["steps"][i]["params"][n], mean, atol=1e-6)


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_meter_counts_what_really_went_through_torch_distributed(runs, mode):
    world, results = runs
    for rec in (r[mode] for r in results):
        s = rec["summary"]
        assert s["bytes"] == rec["spy_bytes"]
        assert s["calls"] == rec["spy_calls"]
        # every tensor ab_accel hands to torch.distributed lives on the model's device (an
        # NCCL group reduces CUDA tensors only)
        assert rec["spy_devices"] == [rec["comm_device"]]
        assert s["bytes"] == sum(s["bytes_by_phase"].values())
        steps = len(rec["steps"])
        assert s["dp_equivalent_bytes"] == steps * rec["dp_step_bytes"]
        assert s["dp_equivalent_wire_bytes"] == pytest.approx(
            steps * rec["dp_step_bytes"] * 2 * (world - 1) / world)
        assert s["reduction"] == pytest.approx(1 - s["wire_bytes"] / s["dp_equivalent_wire_bytes"])
        # An AB step sends less than a DP step: the factor is smaller than the weight.
        ab_per_step = s["bytes_by_phase"]["ab"] / s["steps_by_phase"]["ab"]
        dp_per_step = s["bytes_by_phase"]["warmup"] / s["steps_by_phase"]["warmup"]
        assert ab_per_step < dp_per_step


@pytest.mark.parametrize("mode", scenarios.SYNC_MODES)
def test_truncation_compresses_and_merge_matches(runs, mode):
    _, results = runs
    for rec in (r[mode] for r in results):
        comp = rec["compression"]
        assert comp["params_now"] < comp["params_dense"]
        assert comp["factorized_ratio"] > 1.3
        # The cut truncated below the break-even rank (a factorized layer smaller than dense).
        assert any(layer["rank"] < layer["max_rank"] for layer in comp["layers"].values())
        assert rec["merge_diff"] < 1e-5


def test_sync_now_reconciles_a_run_stopped_mid_ab_phase():
    results = run_distributed(sync_now_mid_ab, 4)
    assert not _same(results[0]["before"], results[2]["before"])  # A- and B-group differed
    for res in results:
        assert res["ran"] and res["refused"]
        assert set(res["modes"]) == {"full"}
        assert _same(res["after"], results[0]["after"])


def test_the_optimizer_tells_when_groups_differ_and_what_switches_ran():
    results = run_distributed(sync_now_mid_ab, 4)
    for res in results:
        # before any step; after step 0 (factorized: ranks agree); after AB steps 1 and 2
        assert res["differ"] == [False, False, True, True]
        assert res["early_finalize"] is False and res["differ_after"] is False
        assert res["sync_bytes"] > 0  # the final sync is metered as sync traffic
        factorize, final = res["switches"]
        assert factorize["event"] == "factorize" and factorize["step"] == 1
        assert not factorize["final"] and factorize["compression"]["factorized_ratio"] > 1
        assert all(r >= 1 for r in factorize["ranks"].values())
        assert final["event"] == "sync" and final["step"] == 3 and final["final"]
        assert final["ranks"] is None and final["seconds"] > 0
        assert res["restored_switches"] == res["switches"]
