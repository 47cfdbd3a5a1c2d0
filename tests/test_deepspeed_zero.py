"""The "ab_training" key with DeepSpeed ZeRO stage 1 and 2 (and 2 with CPU optimizer offload),
each with bf16 and gradient accumulation 2, on real DeepSpeed engines over a real 4-rank gloo
world (tests/ds_scripts/zero_scenarios.py): roles, group-local reduction (a spy on what reaches
torch.distributed), the resync at a sync, the partitioned state's size, exact resume mid-AB
phase (and a refused resume on another world size), and a non-finite step skipped by every
rank."""

from __future__ import annotations

import pytest
import torch
import zero_scenarios  # tests/ds_scripts (pytest's pythonpath)

from distributed import run_distributed

VARIANTS = {
    "zero1": (1, False, {}),
    "zero2": (2, False, {}),
    # the JSON's reduction precision is DeepSpeed's to honour: fp32 on the wire here
    "zero2_offload_fp32_wire": (2, True, {"communication_data_type": "fp32"}),
    # another sync: each factor averaged over the ranks that trained it
    "zero1_only_learned": (1, False, {"ab_training": {"sync_mode": "only-learned"}}),
}
WORLD_FLAG_BYTES = 8  # the world-wide non-finite decision: one int64 per step
ADAM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq, per trained element


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def zero_run(request, tmp_path_factory):
    stage, offload, extra = VARIANTS[request.param]
    ckpt = str(tmp_path_factory.mktemp(request.param))
    ranks = run_distributed(zero_scenarios.zero_run, 4, stage, offload, ckpt, extra,
                            timeout=900)
    return request.param, ranks, ckpt


def _layer_factors(names: list[str]) -> set[str]:
    return {n for n in names if n.endswith((".A", ".B"))}


def test_roles_engine_and_bf16(zero_run):
    _, ranks, _ = zero_run
    assert [r["role"] for r in ranks] == ["A", "A", "B", "B"]
    assert [r["group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for r in ranks:
        assert r["zero_type"] == "DeepSpeedZeroOptimizer"
        assert r["dtype"] == "torch.bfloat16"
        assert r["step_count"] == zero_scenarios.STEPS and r["skipped"] == 0
        # the warm-up, the first factorization, sync + factorization at 5 and 6, the sync at 9
        assert r["report_zero"]["rebuilds"] == 5


def test_warmup_steps_equal_plain_deepspeed_zero(zero_run):
    """Before the first switch the run is DeepSpeed's own ZeRO, bit for bit (after step 1 the
    layers are factorized already: the parameters that stay dense are compared)."""
    _, ranks, _ = zero_run
    for r in ranks:
        first, second = r["records"][:zero_scenarios.AB_KEY["warmup_steps"]]
        assert first["phase"] == second["phase"] == "warmup"
        assert first["params"].keys() == first["plain"].keys()
        common = second["params"].keys() & second["plain"].keys()
        assert "0.weight" in common and "2.weight" not in common
        for rec, names in ((first, first["params"].keys()), (second, common)):
            for name in names:
                assert torch.equal(rec["params"][name], rec["plain"][name]), name


def test_ab_steps_reduce_inside_the_group_only(zero_run):
    """In an AB step every collective with a payload runs over the own group; the only world
    call is the one-flag non-finite decision. The spy (torch.distributed) and the meter agree
    on every step's bytes."""
    name, ranks, _ = zero_run
    for r in ranks:
        own = tuple(r["group"])
        for t, rec in enumerate(r["records"]):
            assert rec["meter_bytes"] == rec["spy_bytes"], (t, rec["meter_bytes"],
                                                            rec["spy_bytes"])
            if rec["phase"] != "ab" or t in (4, 8):  # steps 4 and 8 end with a sync
                continue
            world_calls = [b for g, b in rec["spy_calls"] if g != own]
            assert world_calls == [WORLD_FLAG_BYTES], (t, world_calls)
            wire = {"zero2_offload_fp32_wire": "torch.float32"}.get(name, "torch.bfloat16")
            assert wire in rec["spy_dtypes"], rec["spy_dtypes"]


def test_group_mates_agree_groups_differ_frozen_factor_unchanged(zero_run):
    _, ranks, _ = zero_run
    records = [r["records"] for r in ranks]
    for t in (2, 3, 6, 7):  # AB steps whose end is no switch
        a0, a1, b0, b1 = (rec[t]["params"] for rec in records)
        for name in a0:
            assert torch.equal(a0[name], a1[name]) and torch.equal(b0[name], b1[name]), name
        assert any(not torch.equal(a0[n], b0[n]) for n in a0)
        for r in ranks:
            trained = _layer_factors(r["records"][t]["trained"])
            frozen = _layer_factors(list(r["records"][t]["params"])) - trained
            assert frozen
            prev, now = r["records"][t - 1]["params"], r["records"][t]["params"]
            for n in frozen:
                if n in prev:  # (not right after a factorization)
                    assert torch.equal(prev[n], now[n]), n


def test_sync_restores_identity_then_rebound_is_world_dp(zero_run):
    _, ranks, _ = zero_run
    for t in (4, 5, 8):  # after the sync at 5 (run at the end of step 4), the rebound, 9
        first = ranks[0]["records"][t]["params"]
        for r in ranks[1:]:
            for name, value in r["records"][t]["params"].items():
                assert torch.equal(first[name], value), (t, name)
    rebound = [r["records"][5] for r in ranks]
    assert all(rec["phase"] == "rebound" and rec["scope"] == 4 for rec in rebound)


def test_optimizer_state_is_partitioned_over_the_scope(zero_run):
    """Per rank: the fp32 masters and Adam moments of 1/scope of what the scope trains (plus
    ZeRO's alignment padding), in warm-up (scope 4) and AB phases (scope 2)."""
    _, ranks, _ = zero_run
    for r in ranks:
        for t in (0, 2, 3, 6, 7):  # steps whose end is no switch: the state is still theirs
            rec = r["records"][t]
            ideal = ADAM_BYTES * rec["trained_numel"] / rec["scope"]
            assert ideal <= rec["state_bytes_after"] <= 1.05 * ideal + 2048, (t, rec["scope"])
        assert {r["records"][t]["scope"] for t in (0, 1)} == {4}
        assert {r["records"][t]["scope"] for t in (2, 3, 4, 6, 7, 8)} == {2}


def test_checkpoint_mid_ab_phase_resumes_exactly(zero_run):
    _, ranks, _ = zero_run
    for r in ranks:
        assert r["saved_phase"] == "ab" and r["resumed_step"] == zero_scenarios.SAVE_AT
        expected = [rec["params"] for rec in r["records"][zero_scenarios.SAVE_AT:]]
        assert len(expected) == len(r["resumed_records"]) == 2
        for want, got in zip(expected, r["resumed_records"], strict=True):
            for name in want:
                assert torch.equal(want[name], got[name]), name


def test_meter_reports_traffic_against_dp(zero_run):
    _, ranks, _ = zero_run
    for r in ranks:
        summary = r["traffic"]
        assert summary["steps_by_phase"] == {"warmup": 2, "ab": 6, "rebound": 1}
        assert summary["bytes_by_phase"]["ab"] > 0 and summary["dp_equivalent_bytes"] > 0


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere():
    ranks = run_distributed(zero_scenarios.overflow_run, 4, 2, timeout=600)
    for r in ranks:
        assert r["skipped"] == 1 and r["engine_skipped"] == 1
        assert r["unchanged"] and r["moved_after"]
        assert r["step_count"] == 5


def test_resume_on_another_world_size_is_refused_with_what_differs(zero_run):
    """Refused before DeepSpeed loads anything (the group shards' manifest is read first)."""
    name, _, ckpt = zero_run
    stage = zero_scenarios.zero_config(VARIANTS[name][0])["zero_optimization"]["stage"]
    errors = run_distributed(zero_scenarios.resume_other_world, 2, stage, ckpt, timeout=600)
    for error in errors:
        assert "4" in error and "2" in error and "processes" in error, error


def test_finetuning_settings_under_zero2_offload_bf16():
    """residual + freeze_untargeted + lean_memory, no dense phase: the frozen parameters never
    change, the residuals are the same on every rank (in bf16, the weights' dtype), group mates
    agree and every sync leaves one model; ZeRO builds although the biases' group has nothing to
    train (a placeholder stands in, in no state dict)."""
    ranks = run_distributed(zero_scenarios.finetune_run, 4, timeout=600)
    assert [r["role"] for r in ranks] == ["A", "A", "B", "B"]
    for r in ranks:
        assert r["frozen_unchanged"] and r["frozen_names"] and r["skipped"] == 0
        assert r["step_count"] == 6 and r["groups"][1] == 1  # the biases' group: a placeholder
        assert r["placeholder_exported"] is False
        assert r["residual_dtype"] == ["torch.bfloat16"] and r["residuals"]
        for a, b in zip(ranks[0]["residuals"], r["residuals"], strict=True):
            assert torch.equal(a, b)
    for t, _ in enumerate(ranks[0]["records"]):
        p = [r["records"][t]["params"] for r in ranks]
        for name in p[0]:
            assert torch.equal(p[0][name], p[1][name]) and torch.equal(p[2][name], p[3][name])
            if t in (2, 5):  # each ends with a sync (and the next factorization)
                assert torch.equal(p[0][name], p[2][name]), (t, name)
