"""The "ab_training" key of a DeepSpeed JSON: ab_accel.deepspeed.initialize on real DeepSpeed
engines over real gloo processes, the deepspeed launcher, `accelerate launch --use_deepspeed`
with the configs/ files, and every refused setting (before step 1)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from ab_accel import ABConfigError, ABLayer
from ab_accel import deepspeed as ab_ds

import ds_scenarios  # tests/ds_scripts (pytest's pythonpath)
from distributed import free_port, run_distributed, script_env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "ds_scripts")

BIN = os.path.dirname(sys.executable)
KEY = {"warmup_steps": 2, "sync_every": 4, "rebound_steps": 1, "lr_rebound_steps": 1,
       "rank_cutoff": 0.5}


# --------------------------------------------------------------------- refused before step 1
def base(**extra):
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
           "ab_training": dict(KEY)}
    cfg.update(extra)
    return cfg


REFUSED = {
    "zero3": (base(zero_optimization={"stage": 3}), ['"zero_optimization"', '"stage": 3',
                                                     "parameters themselves", '"stage": 2']),
    "fp16": (base(fp16={"enabled": True}), ['"fp16"', "loss scaler", '"bfloat16"']),
    "bf16": (base(bf16={"enabled": True}), ['"bf16"', "stage 0", "flattens", '"stage": 1']),
    "autocast_zero": (base(zero_optimization={"stage": 2},
                           torch_autocast={"enabled": True, "dtype": "bfloat16"}),
                      ['"torch_autocast"', "ZeRO stage 2", '"bf16": {"enabled": true}']),
    "predivide_zero": (base(zero_optimization={"stage": 2}, gradient_predivide_factor=2.0),
                       ["gradient_predivide_factor", "communication_data_type"]),
    "autocast_fp16": (base(torch_autocast={"enabled": True, "dtype": "float16"}),
                      ["float16", "loss scaler", '"dtype": "bfloat16"']),
    "muon": (base(optimizer={"type": "Muon", "params": {"lr": 1e-3}}), ["Muon", "AdamW"]),
    "comm_dtype": (base(communication_data_type="fp16"), ["communication_data_type"]),
    "predivide": (base(gradient_predivide_factor=2.0), ["gradient_predivide_factor"]),
    "misplaced_in_zero": ({"zero_optimization": {"stage": 0, "ab_training": dict(KEY)}},
                          ['inside "zero_optimization"', "TOP LEVEL"]),
    "misplaced_in_params": ({"optimizer": {"type": "AdamW", "params": {"ab_training": {}}}},
                            ['inside "optimizer.params"', "TOP LEVEL"]),
    "typo": (base(ab_training={"warmup_step": 3}), ["'warmup_step'", "did you mean",
                                                    "'warmup_steps'"]),
    "ds_key_inside": (base(ab_training={"gradient_clipping": 1.0}),
                      ['"gradient_clipping" is a DeepSpeed setting', "top level"]),
    "zero_key_inside": (base(ab_training={"stage": 0}), ['"stage"', '"zero_optimization"']),
    "out_of_range": (base(ab_training={"sync_every": 4, "rebound_steps": 4}),
                     ["rebound_steps", "sync_every"]),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_setting_names_the_setting_and_the_fix(name):
    config, fragments = REFUSED[name]
    with pytest.raises(ABConfigError) as info:
        ab_ds.check_config(config)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("name", ["zero3", "bf16", "typo", "misplaced_in_zero"])
def test_initialize_refuses_before_deepspeed_and_leaves_the_model_alone(name):
    """No process group exists here: the error comes before DeepSpeed is even started."""
    model = ds_scenarios.tiny_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ABConfigError):
        ab_ds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         config=REFUSED[name][0])
    assert not any(isinstance(m, ABLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_1_and_2_with_bf16_offload_and_their_wire_dtype_are_accepted():
    """What real DeepSpeed configs carry; "auto" values are checked on the engine built."""
    for stage in (1, 2):
        ab_ds.check_config(base(zero_optimization={"stage": stage}, bf16={"enabled": True}))
        ab_ds.check_config(base(
            zero_optimization={"stage": stage, "offload_optimizer": {"device": "cpu"},
                               "overlap_comm": True, "contiguous_gradients": True},
            bf16={"enabled": "auto"}, fp16={"enabled": "auto"}, communication_data_type="fp32"))


def test_disabled_or_absent_key_lets_any_deepspeed_setting_through():
    ab_ds.check_config({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    ab_ds.check_config(base(zero_optimization={"stage": 3},
                            ab_training={"enabled": False}))
    assert ab_ds.read_config({"zero_optimization": {"stage": 3}}) is None


def test_initialize_without_any_optimizer_says_what_to_add():
    model = ds_scenarios.tiny_net()
    with pytest.raises(ABConfigError, match='"optimizer" block'):
        ab_ds.initialize(model=model, config=base())


def test_shipped_configs_are_accepted_and_carry_the_key():
    for name in ("ds_ab_zero0.json", "ds_ab_zero0_bf16.json", "ds_ab_zero0_launcher.json"):
        path = os.path.join(REPO, "configs", name)
        ab_ds.check_config(path)
        cfg = ab_ds.read_config(path)
        assert cfg is not None and cfg.enabled and cfg.sync_mode == "with-stale"
    with open(os.path.join(REPO, "configs", "ds_ab_zero0_bf16.json")) as fh:
        assert json.load(fh)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


# --------------------------------------------------------------------- 4 gloo processes
@pytest.fixture(scope="module")
def initialize_run(tmp_path_factory):
    return run_distributed(ds_scenarios.initialize_path, 4,
                           str(tmp_path_factory.mktemp("ds_ckpt")), timeout=500)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_initialize_returns_the_ab_optimizer_and_keeps_the_key(initialize_run):
    for out in initialize_run:
        assert out["optimizer_is_ab"]
        assert out["ds_config_key"]["sync_every"] == 4
    assert [o["group_ranks"] for o in initialize_run] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["role_in_ab"] for o in initialize_run] == ["A", "A", "B", "B"]


def test_step_counter_advances_per_optimizer_step_not_micro_batch(initialize_run):
    for out in initialize_run:
        assert out["micro_steps"] == 16  # 8 optimizer steps x 2 micro-batches
        assert out["step_count"] == out["global_steps"] == 8
        assert out["traffic"]["steps_by_phase"] == {"warmup": 2, "ab": 5, "rebound": 1}


def test_accumulation_and_clipping_match_the_core_optimizer_by_hand(initialize_run):
    """The engine (GAS 2, clip 0.05 from the JSON) equals a twin that accumulates by hand,
    clips AFTER the AB reduction and steps the core ABOptimizer; the clip is active."""
    for out in initialize_run:
        for rec in out["records"]:
            assert _same(rec["params"], rec["twin"]), rec["phase"]
            assert rec["norm"] == pytest.approx(rec["twin_norm"], rel=1e-6, abs=0)
        assert min(r["norm"] for r in out["records"]) > 0.05  # every step was clipped


def test_ab_phase_is_group_local_and_sync_restores_identity(initialize_run):
    recs = [o["records"] for o in initialize_run]
    for t, rec0 in enumerate(recs[0]):
        params = [r[t]["params"] for r in recs]
        assert _same(params[0], params[1]) and _same(params[2], params[3])
        if rec0["phase"] == "ab" and t not in (4,):
            assert not _same(params[0], params[2]), t  # A-groups and B-groups differ
        if rec0["phase"] in ("warmup", "rebound") or t == 4:  # t = 4 ends with the sync
            assert _same(params[0], params[2]), t


def test_meter_counts_every_byte_and_ab_gradients_touch_only_the_group(initialize_run):
    for out in initialize_run:
        own = tuple(out["group_ranks"])
        for t, rec in enumerate(out["records"]):
            assert rec["spy_bytes"] == rec["meter_bytes"] > 0
            if rec["phase"] == "ab" and t != 4:
                # gradients inside the group; the world sees only the 8-byte finite-step flag
                world = tuple(range(len(initialize_run)))
                assert {g for g, _ in rec["spy_calls"] if g != world} == {own}
                assert [b for g, b in rec["spy_calls"] if g == world] == [8]
        summary = out["traffic"]
        assert summary["bytes"] == sum(r["meter_bytes"] for r in out["records"]) + \
            summary["bytes_by_phase"]["setup"]
        assert 0.0 < summary["wire_bytes_by_phase"]["ab"] < summary["dp_equivalent_wire_bytes"]


def test_json_optimizer_scheduler_and_bf16_autocast_blocks(initialize_run):
    for out in initialize_run:
        run = out["autocast"]
        assert run["inner"] == "AdamW" and run["scheduler"] == "WarmupLR"
        assert run["logits_dtypes"] == ["torch.bfloat16"]
        assert run["step_count"] == 9
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in run["steps"].values())


def test_engine_checkpoint_mid_ab_resumes_exactly(initialize_run):
    for out in initialize_run:
        run, resumed = out["autocast"], out["resumed"]
        assert run["saved_phase"] == "ab" and resumed["start"] == 4
        assert run["saved_files"] == ["ab_group0.pt", "ab_group1.pt", "ab_meta.json"]
        for t, step in resumed["steps"].items():
            assert _same(step["params"], run["steps"][t]["params"]), t
            assert step["lr"] == run["steps"][t]["lr"]
    a, b = (initialize_run[r]["autocast"]["steps"][4]["params"] for r in (0, 2))
    assert not _same(a, b)  # the checkpoint was taken while the groups differed


def test_attach_takes_a_zero_engine_built_without_the_key(initialize_run):
    """As `accelerate launch --use_deepspeed --zero_stage 1` builds it: attach() rebuilds its
    ZeRO optimizer over the first step's scope."""
    for out in initialize_run:
        assert out["zero1_attach"] == "accepted: DeepSpeedZeroOptimizer"


# --------------------------------------------------------------------- launchers
def _config_copy(tmp_path, name: str, **extra) -> str:
    with open(os.path.join(REPO, "configs", name)) as fh:
        cfg = json.load(fh)
    cfg["ab_training"].update(KEY)
    cfg.update(extra)
    path = os.path.join(tmp_path, name)
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def _launch(command: list[str], out: str, world: int) -> list[dict]:
    # PATH is left as it is: torch builds DeepSpeed's CPU op with the first `ninja` on PATH,
    # and two ninja versions alternating on one build folder rebuild the op every time.
    env = script_env(SCRIPTS)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def _check_two_groups(recs: list[dict]) -> None:
    assert [r["world"] for r in recs] == [2, 2]
    for r in recs:
        assert r["step_count"] == ds_scenarios_steps()
        assert r["traffic"]["steps_by_phase"] == {"warmup": 2, "ab": 5, "rebound": 1}
    a, b = recs
    for t, (sa, sb) in enumerate(zip(a["steps"], b["steps"], strict=True)):
        if sa["phase"] == "ab":
            assert (sa["role"], sb["role"]) == ("A", "B")
        if t in (1, 4, 5):  # warm-up, the sync at the end of step 4, rebound
            assert _same(sa["params"], sb["params"]), t
        if t in (2, 3, 6, 7):
            assert not _same(sa["params"], sb["params"]), t


def ds_scenarios_steps() -> int:
    import train_ds

    return train_ds.STEPS


def test_deepspeed_launcher_reads_the_key_from_args_deepspeed_config(tmp_path):
    """`deepspeed --num_gpus 2 script --deepspeed --deepspeed_config configs/...launcher.json`:
    the JSON's optimizer (torch AdamW), scheduler and bf16 autocast blocks, GAS 2; the results
    go to an --out folder that does not exist yet (the script creates it before training)."""
    config = _config_copy(tmp_path, "ds_ab_zero0_launcher.json",
                          train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    out = str(tmp_path / "results" / "run1")  # the documented command: --out need not exist
    recs = _launch([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(free_port()), os.path.join(SCRIPTS, "train_ds.py"), "--deepspeed",
                    "--deepspeed_config", config, "--out", out], out, 2)
    for r in recs:
        assert r["inner"] == "AdamW" and r["scheduler"] == "WarmupCosineLR" and r["gas"] == 2
    _check_two_groups(recs)


def _accelerate_use_deepspeed(config: str, out: str, *flags: str) -> list[dict]:
    """tests/ds_scripts/train_ds.py --accelerate on 2 processes under `accelerate launch
    --use_deepspeed --deepspeed_config_file <config> [flags]`."""
    return _launch([os.path.join(BIN, "accelerate"), "launch", "--config_file",
                    os.path.join(REPO, "configs", "accelerate_deepspeed.yaml"), "--use_deepspeed",
                    "--deepspeed_config_file", config, *flags, "--num_processes", "2",
                    "--num_machines", "1", "--main_process_port", str(free_port()),
                    os.path.join(SCRIPTS, "train_ds.py"), "--accelerate", "--out", out],
                   out, 2)


def test_accelerate_launch_use_deepspeed_picks_the_key_up(tmp_path):
    """`accelerate launch --use_deepspeed --deepspeed_config_file configs/ds_ab_zero0.json`
    (with configs/accelerate_deepspeed.yaml): Accelerate fills the "auto" values,
    ab_accel.prepare (config=None) reads the key and hands the engine to
    ab_accel.deepspeed.attach."""
    config = _config_copy(tmp_path, "ds_ab_zero0.json")
    out = str(tmp_path)
    recs = _accelerate_use_deepspeed(config, out)
    for r in recs:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED"
        assert r["engine_optimizer_is_ab"] and r["gas"] == 1
        assert {k: r["config"][k] for k in KEY} == KEY
    _check_two_groups(recs)


def test_accelerate_launch_use_deepspeed_zero2_bf16(tmp_path):
    """configs/ds_ab_zero2_bf16.json (ZeRO 2, "bf16": "auto") under `accelerate launch
    --use_deepspeed --mixed_precision bf16`: DeepSpeed's ZeRO optimizer steps (Accelerate's
    wrapper follows it through the rebuilds), bf16 weights, the roles, group-local AB steps and
    the sync as at stage 0."""
    config = _config_copy(tmp_path, "ds_ab_zero2_bf16.json")
    recs = _accelerate_use_deepspeed(config, str(tmp_path), "--mixed_precision", "bf16")
    for r in recs:
        assert r["zero_stage"] == 2 and r["engine_optimizer"] == "DeepSpeedZeroOptimizer"
        assert r["wrapper_follows"] and not r["engine_optimizer_is_ab"]
        assert r["dtype"] == "torch.bfloat16" and r["skipped"] == 0
    _check_two_groups(recs)


def test_residual_and_freeze_untargeted_through_accelerate_launch_use_deepspeed(tmp_path):
    """The fine-tuning settings (``residual``, ``freeze_untargeted``) from the JSON's key, run by
    Accelerate's DeepSpeed engine: the roles, group-local AB steps and the sync as without them;
    every parameter outside the AB layers frozen and never changed; after the last
    factorization each AB layer holds a residual W - A B, the same on both ranks."""
    config = _config_copy(tmp_path, "ds_ab_zero0.json")
    with open(config) as fh:
        cfg = json.load(fh)
    cfg["ab_training"].update(residual=True, freeze_untargeted=True)
    with open(config, "w") as fh:
        json.dump(cfg, fh)
    out = str(tmp_path)
    recs = _accelerate_use_deepspeed(config, out)
    _check_two_groups(recs)
    a, b = recs
    for r in recs:
        assert r["config"]["residual"] and r["config"]["freeze_untargeted"]
        # the stem and the head, and the AB layers' biases: frozen, and never moved
        assert {"0.weight", "0.bias", "9.weight", "9.bias", "5.bias"} <= set(r["frozen"])
        untargeted = [n for n in r["frozen"] if not n.endswith((".A", ".B"))]  # not the role's
        assert len(untargeted) == 7  # 0.*, 9.*, and the biases of 2, 5, 7
        first = r["steps"][0]["params"]
        for step in r["steps"]:
            for name in untargeted:
                assert torch.equal(step["params"][name], first[name]), name
    assert set(a["residuals"]) == {"2", "5", "7"}  # every AB layer, after the factorization
    for name, res in a["residuals"].items():
        assert res.abs().sum() > 0, name  # rank_cutoff 0.5 truncates: the tail is kept
        assert torch.equal(res, b["residuals"][name]), name  # identical on every rank

