"""The table of refused setups, the one resolution rule of the AB config, and the vocabulary."""

from __future__ import annotations

import json

import pytest

from ab_accel import ABConfig, ABConfigError
from ab_accel import deepspeed as ab_ds
from ab_accel.config import resolve_config
from ab_accel.support import UNSUPPORTED, UnsupportedSetupError, check_mixed_precision, problem
from ab_accel.vocab import Event, LayerMode, Phase, Role, SyncMode, TrafficLabel


# ----------------------------------------------------------------------------- support table
@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_every_entry_says_what_why_and_the_fix(key):
    entry = UNSUPPORTED[key]
    assert entry.what and len(entry.reason) > 30 and len(entry.fix) > 10
    line = problem(key)
    assert line.startswith(entry.what) and entry.reason in line and entry.fix in line


def test_fp16_is_refused_with_the_fix_of_each_frontend():
    for frontend, fix in (("accelerate", "mixed_precision='bf16'"),
                          ("trainer", "bf16=True"), ("deepspeed", '"dtype": "bfloat16"')):
        with pytest.raises(UnsupportedSetupError) as info:
            check_mixed_precision("fp16", frontend)
        assert "loss scaler" in str(info.value) and fix in str(info.value), str(info.value)
    with pytest.raises(UnsupportedSetupError, match="fp8"):
        check_mixed_precision("fp8")
    for fine in ("no", "bf16", None):
        check_mixed_precision(fine)


def test_a_refusal_is_a_config_error_and_a_not_implemented_error():
    with pytest.raises(ABConfigError):
        check_mixed_precision("fp16")
    with pytest.raises(NotImplementedError):
        check_mixed_precision("fp16")


def test_deepspeed_precision_left_on_auto_is_decided_by_the_flags_that_fill_it():
    """"auto" is filled in later from Accelerate's or the Trainer's flags: the config passes,
    the flag that would turn fp16 on is refused by its front end (Accelerate's mixed_precision,
    the Trainer's fp16), and an engine built with fp16 or stage-0 bf16 by check_engine."""
    config = {"zero_optimization": {"stage": 0}, "fp16": {"enabled": "auto"},
              "bf16": {"enabled": "auto"}, "ab_training": {}}
    ab_ds.check_config(config)
    with pytest.raises(UnsupportedSetupError, match="fp16"):
        check_mixed_precision("fp16")
    with pytest.raises(UnsupportedSetupError, match='"fp16"'):
        ab_ds.check_config({**config, "fp16": {"enabled": True}})


# ----------------------------------------------------------------------------- resolve_config
def test_one_source_is_used_as_given_with_its_name():
    resolved = resolve_config({"warmup_steps": 7})
    assert resolved.config.warmup_steps == 7 and resolved.source == "config="
    ds = {"ab_training": {"warmup_steps": 5}}
    resolved = resolve_config(deepspeed=ds)
    assert resolved.config.warmup_steps == 5 and '"ab_training" key' in resolved.source
    assert resolve_config().config is None
    assert resolve_config(fallback=ABConfig(sync_every=90)).config.sync_every == 90
    # the fallback never conflicts: a real source wins over it
    assert resolve_config(deepspeed=ds, fallback={"warmup_steps": 1}).config.warmup_steps == 5


def test_two_sources_that_differ_are_one_error_naming_both_and_the_fields():
    with pytest.raises(ABConfigError) as info:
        resolve_config({"warmup_steps": 7, "sync_every": 400},
                       deepspeed={"ab_training": {"warmup_steps": 5, "sync_every": 400}})
    text = str(info.value)
    assert "config=" in text and '"ab_training" key of the DeepSpeed JSON' in text
    assert "warmup_steps=7 vs 5" in text and "sync_every" not in text
    with pytest.raises(ABConfigError, match="the ABOptimizer's config"):
        resolve_config(optimizer_config=ABConfig(warmup_steps=3), deepspeed={"ab_training": {}})
    same = resolve_config({"warmup_steps": 5}, deepspeed={"ab_training": {"warmup_steps": 5}})
    assert same.config.warmup_steps == 5 and same.source == "config="


def test_accelerate_launch_with_a_deepspeed_file_is_read_from_the_environment(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"ab_training": {"sync_every": 330}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    resolved = resolve_config(environ=env, fallback=ABConfig())
    assert resolved.config.sync_every == 330 and str(path) in resolved.source
    off = resolve_config(environ={**env, "ACCELERATE_USE_DEEPSPEED": "false"}, fallback={})
    assert off.config == ABConfig() and off.source == "the fallback"


# ----------------------------------------------------------------------------- vocabulary
def test_the_words_are_their_strings():
    assert Phase.AB == "ab" and LayerMode.AB == "ab" and Event.SYNC == "sync"
    assert f"{Phase.REBOUND}" == "rebound" and str(Role.A) == "A"
    assert json.dumps({"phase": Phase.WARMUP, Event.FACTORIZE: 1}) == \
        '{"phase": "warmup", "factorize": 1}'
    assert [str(m) for m in TrafficLabel] == ["setup", "warmup", "ab", "sync", "rebound", "check"]
    assert {m.value for m in SyncMode} == {"with-stale", "only-learned", "full", "only-b"}
    assert type(str(Phase.AB)) is str  # what goes into checkpoints is a plain string


class _Engine:
    """What check_engine reads of a DeepSpeed engine (it only reads: no collective)."""

    def __init__(self, stage: int, fp16: bool = False, bf16: bool = False,
                 autocast: bool = False) -> None:
        self.stage, self.fp16, self.bf16, self.autocast = stage, fp16, bf16, autocast

    def zero_optimization_stage(self) -> int:
        return self.stage

    def fp16_enabled(self) -> bool:
        return self.fp16

    def bfloat16_enabled(self) -> bool:
        return self.bf16

    def torch_autocast_enabled(self) -> bool:
        return self.autocast


@pytest.mark.parametrize(("engine", "fragment"), [
    (_Engine(3), "ZeRO stage 3"), (_Engine(2, fp16=True), '"fp16"'),
    (_Engine(0, bf16=True), "bf16 optimizer at ZeRO stage 0"),
    (_Engine(2, bf16=True, autocast=True), '"torch_autocast" with ZeRO')])
def test_an_engine_built_from_auto_values_is_checked_before_step_one(engine, fragment):
    with pytest.raises(UnsupportedSetupError, match=fragment):
        ab_ds.check_engine(engine)


@pytest.mark.parametrize("engine", [_Engine(0), _Engine(1, bf16=True), _Engine(2, bf16=True),
                                    _Engine(0, autocast=True)])
def test_engines_ab_training_runs_on_pass_the_check(engine):
    ab_ds.check_engine(engine)
