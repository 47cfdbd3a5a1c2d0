"""DESIGN.md's invariants, proven with real gloo processes: 4 ranks (one A-group, one B-group)
with AdamW, and 8 ranks with group_size 2 (two A-groups, two B-groups) with SGD + momentum, for
every sync mode."""

from __future__ import annotations

import json

import pytest
import torch

import scenarios
from distributed import run_distributed

ATOL = 1e-6


@pytest.fixture(scope="module", params=[(4, 2, "adamw"), (8, 2, "sgd")],
                ids=["4ranks-adamw", "8ranks-gs2-sgd"])
def runs(request):
    world, group_size, opt_name = request.param
    results = run_distributed(scenarios.invariants, world, group_size, opt_name)
    return world, results


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


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


@pytest.mark.parametrize("mode", ["with-stale", "only-learned"])
def test_resume_mid_ab_phase_continues_exactly(mode):
    results = run_distributed(scenarios.resume, 4, 5, 12, mode)
    for rank, res in enumerate(results):
        assert res["phase_at_stop"] == "ab"
        assert res["role_at_stop"] == ("A" if rank < 2 else "B")
        assert res["resumed_step"] == 5
        for k, v in res["straight"].items():
            assert torch.equal(v, res["resumed"][k]), f"rank {rank}: {k} differs after resume"


def test_sync_now_reconciles_a_run_stopped_mid_ab_phase():
    results = run_distributed(scenarios.sync_now_mid_ab, 4)
    assert not _same(results[0]["before"], results[2]["before"])  # A- and B-group differed
    for res in results:
        assert res["ran"] and res["refused"]
        assert set(res["modes"]) == {"full"}
        assert _same(res["after"], results[0]["after"])


def test_the_optimizer_tells_when_groups_differ_and_what_switches_ran():
    results = run_distributed(scenarios.sync_now_mid_ab, 4)
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


def test_a_nonfinite_step_is_skipped_on_every_rank_and_too_many_stop_training():
    results = run_distributed(scenarios.nonfinite_steps, 4)
    for rank, res in enumerate(results):
        steps = {s["t"]: s for s in res["steps"]}
        # step 0 (warm-up) and step 3 (AB phase: rank 2 is in the B-group, yet the A-group
        # ranks skip too) are skipped everywhere, with parameters and optimizer state untouched
        for t in (0, 3, 5):  # (after step 6 the scheduled sync changes the model anyway)
            assert steps[t]["unchanged"] and steps[t]["state_unchanged"], (rank, t)
        for t in (1, 2, 4):
            assert not steps[t]["unchanged"], (rank, t)
        assert [steps[t]["skipped_steps"] for t in range(7)] == [1, 1, 1, 2, 2, 3, 4]
        assert steps[3]["phase"] == "ab" and steps[0]["phase"] == "warmup"
        assert all(s["finite"] for s in res["steps"])
        # buffers stay finite and identical inside the scope even on skipped steps
        assert all(bool(torch.isfinite(s["buffers"]).all()) for s in res["steps"])
        group = [0, 1] if rank < 2 else [2, 3]
        for t in (0, 3):
            assert torch.equal(steps[t]["buffers"], {s["t"]: s for s in results[group[0]][
                "steps"]}[t]["buffers"]), (rank, t)
        assert steps[6]["step_count"] == 7  # a skipped step still counts: the schedule holds
        # the third NaN step in a row (max_skipped_steps=2) stops every rank, naming rank 2
        assert res["error"]["step"] == 7
        msg = res["error"]["message"]
        assert "Step 7 (rebound phase)" in msg and "rank(s) [2]" in msg
        assert "3 step(s) in a row" in msg
        assert "max_skipped_steps=2" in msg
        # a switch on non-finite parameters is refused on every rank before anything is sent
        assert "Refusing to sync at step 3" in res["switch_error"]
        assert "rank(s) [1]" in res["switch_error"]
        if rank != 1:
            assert res["others_finite"]


def test_checkpoints_are_atomic_and_a_bad_one_is_refused_before_anything_loads():
    results = run_distributed(scenarios.checkpoint_faults, 4)
    for res in results:
        assert res["complete"] and res["files"] == ["ab_group0.pt", "ab_group1.pt",
                                                    "ab_meta.json"]
        assert res["leftovers"] == res["leftovers_after_overwrite"] == ["ckpt"]
        # every rank refuses together (ranks 0 and 1 read a healthy shard 0), model untouched
        for case, words in (("truncated", "truncated"), ("missing", "is missing"),
                            ("corrupt", "checksum")):
            err = res[case]["error"]
            assert err is not None and res[case]["untouched"] and res[case]["step"] == 0, case
            assert ("ab_group1.pt" in err and words in err) or "Rank(s) [2, 3]" in err, err
        assert "sync_every: 6 -> 8" in res["changed"]["error"]
        assert "accept_resume_changes" in res["changed"]["error"]
        assert res["accepted"]["error"] is None and res["accepted"]["step"] == 3
        assert res["intact"]["error"] is None and res["intact"]["step"] == 3
        assert "not a complete AB checkpoint" in res["unfinished"]["error"]
        assert "did not finish" in res["unfinished"]["error"]
    # the ranks that read the damaged shard name it
    for rank in (2, 3):
        assert "ab_group1.pt" in results[rank]["truncated"]["error"]


def test_a_silent_peer_fails_the_collective_after_the_timeout_naming_phase_and_step():
    rank0, rank1 = run_distributed(scenarios.silent_peer, 2)
    assert rank1 == {"slept": True}
    assert rank0["error"] is not None and rank0["seconds"] < 7, rank0
    assert "warmup phase at step 2" in rank0["error"] and "all-reduce" in rank0["error"]
    assert "collective_timeout_s" in rank0["error"]


def test_lean_memory_switches_layer_by_layer_with_the_same_result():
    for res in run_distributed(scenarios.lean_memory_run, 4):
        plain, lean = res["plain"], res["lean"]
        assert lean["switches"] == plain["switches"] == [
            ("factorize", 0), ("sync", 4), ("factorize", 4), ("sync", 8), ("factorize", 8)]
        for a, b in zip(plain["steps"], lean["steps"], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert lean["full_modes"] == 0 and lean["dense_state"] == 0
        assert lean["ranks"] == plain["ranks"] and all(r for r in lean["ranks"].values())


@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_reduction_equals_the_reduction_after_backward(world):
    results = run_distributed(scenarios.overlap_vs_after_backward, world)
    for rank, res in enumerate(results):
        after, over = res["after"], res["overlap"]
        # buckets went out during backward wherever the step's scope has peers (from step 1:
        # step 0 learns that the "never" layer gets no gradient, and defers its bucket); on
        # the other ranks "extra" gets no gradient, which holds its bucket (and the ones after
        # it, launched in order) until step(): the same collectives, in the same order
        if rank == 0:
            assert [n > 0 for n in over["during_backward"][1:]] == \
                [s > 1 for s in over["scopes"][1:]]
            assert any(s > 1 for s in over["scopes"])
        assert all(n == 0 for n in after["during_backward"])
        assert all(n == 0 for n in over["micro_calls"] + after["micro_calls"])  # no_sync
        assert over["bytes"] == after["bytes"]                 # the meter is unchanged
        for a, b in zip(after["grads"], over["grads"], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] is None) == (b[k] is None), k
                if a[k] is None:
                    continue
                if world == 2:  # a + b in any order: bit-identical
                    assert torch.equal(a[k], b[k]), k
                else:           # a ring's summation order follows the buffer layout
                    torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
        # first_bucket_mb caps the first bucket only: the same bytes, one bucket more
        small = res["first_small"]
        for t in range(2):  # warm-up steps
            first, rest = small["sizes"][t][0][0], [b for b, _ in small["sizes"][t][1:]]
            assert first <= 1024 < over["sizes"][t][0][0]
            assert first + rest[0] == over["sizes"][t][0][0]
            assert rest[1:] == [b for b, _ in over["sizes"][t][1:]]
        for a, b in zip(over["grads"], small["grads"], strict=True):
            for k in a:
                if a[k] is not None:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
        assert all(v is None for g in over["grads"] for k, v in g.items()  # unused everywhere
                   if k.startswith("never."))
        assert all(g["extra.weight"] is not None for g in over["grads"][:2])  # used on rank 0
        # every rank issued the same collectives in the same order (per scope)
        peer = 0 if rank < world // 2 else world // 2
        assert [s for s in over["sizes"]] == [s for s in results[peer]["overlap"]["sizes"]]
        for t in range(2):  # warm-up: the whole world in step
            assert over["sizes"][t] == results[0]["overlap"]["sizes"][t]


def test_a_bf16_or_fp16_wire_halves_the_gradient_bytes_and_stays_close():
    results = run_distributed(scenarios.overlap_vs_after_backward, 2)
    for res in results:
        fp32 = res["overlap"]
        for name in ("bf16", "fp16"):
            low = res[name]
            wire_dtype = "torch.bfloat16" if name == "bf16" else "torch.float16"
            for t in range(8):  # the buckets go in the wire dtype, with the step's flags in
                if low["scopes"][t] == 1:  # the last one (this model has no float buffers)
                    continue  # an AB step of a 2-rank world: groups of one, nothing sent
                assert {d for _, d in low["sizes"][t]} == {wire_dtype}
                assert [b * 2 for b, _ in low["sizes"][t]] == [b for b, _ in fp32["sizes"][t]]
            tol = 1e-2 if name == "bf16" else 2e-3
            for a, b in zip(fp32["grads"][:1], low["grads"][:1], strict=True):
                for k in a:
                    if a[k] is not None:
                        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol * 1e-2)


def test_a_narrow_wire_sends_float_buffers_and_flags_in_their_own_precision():
    for res in run_distributed(scenarios.wire_dtype_with_buffers, 2):
        fp32, bf16 = res["fp32"], res["bf16"]
        for t in range(3):  # warm-up steps
            # fp32: one trip, the flags and BatchNorm statistics in the last gradient bucket;
            # bf16: the gradients in bf16 (half the bytes), then the flags and statistics in fp32
            assert [d for _, d in fp32["sizes"][t]] == ["torch.float32"]
            assert [d for _, d in bf16["sizes"][t]] == ["torch.bfloat16", "torch.float32"]
            grads, tail = bf16["sizes"][t][0][0], bf16["sizes"][t][1][0]
            assert grads * 2 + tail == fp32["sizes"][t][0][0]
        for name, buf in fp32["buffers"].items():  # the statistics' mean is exact in both
            assert torch.equal(buf, bf16["buffers"][name]), name


def test_ddp_traffic_counts_every_bucket_and_buffer_broadcast_and_still_reduces():
    from ab_accel.comm import wire_factor

    results = run_distributed(scenarios.ddp_traffic_counts_what_ddp_sends, 2)
    for r in results:
        assert r["grad_bytes"] == 3 * r["param_bytes"]  # every gradient, every step
        assert r["buffer_bytes"] == 3 * r["buffer_total"]  # BatchNorm stats before each forward
        assert r["wire"] == pytest.approx(r["grad_bytes"] * wire_factor("all_reduce", 2)
                                          + r["buffer_bytes"] * wire_factor("broadcast", 2))
        assert len(r["per_step"]) == 3 and sum(r["per_step"]) == pytest.approx(r["wire"])
        assert r["restored"] == r["summary"]  # state_dict / load_state_dict round trip
    # The counting hook still runs the all-reduce: different data, the same averaged gradients.
    for a, b in zip(results[0]["grads"], results[1]["grads"], strict=True):
        assert torch.equal(a, b)
    # world_traffic: both ranks' counts summed, the same answer on every rank; per step the mean
    world = results[0]["world"]
    assert world == results[1]["world"] and len(world["per_rank"]) == 2
    assert world["bytes"] == sum(r["summary"]["bytes"] for r in results)
    assert world["wire_bytes"] == pytest.approx(sum(r["wire"] for r in results))
    assert [w for w, _ in world["per_step"]] == pytest.approx(
        [(a + b) / 2 for a, b in zip(results[0]["per_step"], results[1]["per_step"], strict=True)])
    assert "reduction_vs_dp" not in world and world["measured_by"].startswith("DDP comm hook")


def test_the_meter_keeps_each_steps_bytes_and_the_report_says_what_ran():
    r0, r1 = run_distributed(scenarios.meter_keeps_the_bytes_of_every_step, 2)
    per_step, total = r0["per_step"], r0["summary"]
    assert len(per_step) == 9 and per_step == r1["per_step"]
    assert sum(w for w, _ in per_step) == pytest.approx(total["wire_bytes"])
    assert sum(d for _, d in per_step) == pytest.approx(total["dp_equivalent_wire_bytes"])
    world = r0["world"]  # world_traffic: the two ranks' meters summed
    assert world == r1["world"] and world["per_step"] == [  # the mean of equal rows
        [(a + b) / 2 for a, b in zip(x, y, strict=True)]
        for x, y in zip(per_step, r1["per_step"], strict=True)]
    assert world["wire_bytes"] == pytest.approx(2 * total["wire_bytes"])
    assert world["wire_bytes_by_phase"]["ab"] == pytest.approx(
        r0["summary"]["wire_bytes_by_phase"]["ab"] + r1["summary"]["wire_bytes_by_phase"]["ab"])
    assert world["reduction_vs_dp"] == pytest.approx(total["reduction"])
    assert r0["phases"][3] == r0["phases"][7] == "ab"  # steps that end on no switch
    assert per_step[3][0] < 0.5 * per_step[0][0] and per_step[7][0] < 0.5 * per_step[0][0]
    report = r0["report"]
    assert report["groups"] == [[0], [1]] and report["roles"] == ["A", "B"]
    assert [(w["event"], w["step"]) for w in report["switches"]] == [
        ("factorize", 2), ("sync", 5), ("factorize", 6), ("sync", 9)]
    assert report["sync_steps"] == [5, 9] and report["skipped_steps"] == 0
    assert report["compression"]["factorized_ratio"] > 1 and "at step 6" in \
        report["compression"]["of"]
    json.dumps(report)  # plain JSON data
    # One collective per dense step: the "used" flags, the non-finite count and the BatchNorm
    # buffers ride in the overlapped reduction's last (here: only) gradient bucket.
    calls = {(r["phase"], len(r["group"])): r["calls"] for r in r0["records"]
             if r["op"] == "all_reduce"}
    assert calls[("warmup", 2)] == 2 and calls[("rebound", 2)] == 1  # 2 warm-up, 1 rebound step
