"""ABConfig: defaults, validation messages that name the field and the fix, JSON round trip,
and the DeepSpeed "ab_training" key."""

from __future__ import annotations

import json

import pytest

from ab_accel import ABConfig, ABConfigError


def test_defaults_are_the_papers():
    cfg = ABConfig()
    assert cfg.rank_cutoff == 0.15
    assert cfg.sync_mode == "with-stale"
    assert cfg.min_rank == 1
    assert cfg.group_size is None
    assert cfg.enabled is True
    assert cfg.orthogonal_init is False


def test_dict_and_json_round_trip():
    cfg = ABConfig(warmup_steps=7, sync_every=20, rebound_steps=3, lr_rebound_steps=5,
                   rank_cutoff=0.2, min_rank=2, group_size=4, sync_mode="only-b",
                   target_modules=["fc1", "fc2"], exclude_modules=".*head.*",
                   orthogonal_init=True, enabled=False)
    assert ABConfig.from_dict(cfg.to_dict()) == cfg
    assert ABConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["target_modules"] == ["fc1", "fc2"]


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ABConfigError, match=r"'sync_evry' \(did you mean 'sync_every'\?\)"):
        ABConfig.from_dict({"sync_evry": 10})


@pytest.mark.parametrize("field,value,needle", [
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("sync_every", 0, "sync_every must be >= 1"),
    ("rank_cutoff", 1.5, "rank_cutoff must be a number in [0, 1)"),
    ("rank_cutoff", "0.1", "rank_cutoff must be a number in [0, 1)"),
    ("min_rank", 0, "min_rank must be >= 1"),
    ("sync_mode", "with_stale", "Did you mean 'with-stale'"),
    ("warmup_steps", 1.5, "warmup_steps must be an integer"),
    ("enabled", "yes", "enabled must be true or false"),
    ("target_modules", [1, 2], "target_modules must be a list"),
])
def test_out_of_range_values_name_the_field(field, value, needle):
    with pytest.raises(ABConfigError, match=__import__("re").escape(needle)):
        ABConfig(**{field: value})


def test_rebound_must_fit_in_a_cycle():
    with pytest.raises(ABConfigError, match="rebound_steps .* must be smaller than sync_every"):
        ABConfig(sync_every=10, rebound_steps=10)


@pytest.mark.parametrize("world,group_size,mode,expected", [
    (4, None, "with-stale", 2),
    (8, 2, "with-stale", 2),
    (8, None, "only-learned", 4),
    (4, 4, "only-b", 4),
    (1, None, "with-stale", 1),
    (6, 3, "full", 3),
])
def test_group_size_resolution(world, group_size, mode, expected):
    assert ABConfig(group_size=group_size, sync_mode=mode).resolve_group_size(world) == expected


@pytest.mark.parametrize("world,group_size,mode,needle", [
    (6, 4, "with-stale", "does not divide the world size 6"),
    (4, 4, "with-stale", "needs at least one A-group and one B-group"),
    (3, None, "with-stale", "does not fit a world of 3 ranks"),
])
def test_impossible_groups_say_what_fits(world, group_size, mode, needle):
    with pytest.raises(ABConfigError, match=needle):
        ABConfig(group_size=group_size, sync_mode=mode).resolve_group_size(world)


def test_deepspeed_key_read_from_dict_and_file(tmp_path):
    ds = {"train_batch_size": 8,
          "ab_training": {"warmup_steps": 5, "sync_every": 9, "rebound_steps": 2}}
    cfg = ABConfig.from_deepspeed_config(ds)
    assert (cfg.warmup_steps, cfg.sync_every) == (5, 9)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert ABConfig.from_deepspeed_config(str(path)) == cfg
    assert ABConfig.from_deepspeed_config({"train_batch_size": 8}) is None
    assert ABConfig.from_deepspeed_config(None) is None


def test_deepspeed_key_inside_a_deepspeed_block_says_where_it_belongs():
    ds = {"zero_optimization": {"stage": 0, "ab_training": {"warmup_steps": 1}}}
    with pytest.raises(ABConfigError, match='inside "zero_optimization".*TOP LEVEL'):
        ABConfig.from_deepspeed_config(ds)


def test_deepspeed_key_with_unknown_field():
    with pytest.raises(ABConfigError, match="rank_cuttoff"):
        ABConfig.from_deepspeed_config({"ab_training": {"rank_cuttoff": 0.1}})


def test_help_text_for_every_field():
    helps = ABConfig.help()
    assert set(helps) == set(ABConfig().to_dict())
    assert all(len(text) > 30 for text in helps.values())


def test_group_size_world_is_one_group_for_only_b():
    assert ABConfig(group_size="world", sync_mode="only-b").resolve_group_size(8) == 8
    with pytest.raises(ABConfigError, match="needs sync_mode 'only-b'"):
        ABConfig(group_size="world")
    with pytest.raises(ABConfigError, match="group_size must be an integer"):
        ABConfig(group_size="all", sync_mode="only-b")


def test_a_misspelt_keyword_gets_the_did_you_mean_of_the_dict_path():
    with pytest.raises(ABConfigError, match=r"'sync_evry' \(did you mean 'sync_every'\?\)"):
        ABConfig(sync_evry=10)
    assert ABConfig(sync_every=10, rebound_steps=2).sync_every == 10


def test_fine_tuning_options_are_checked():
    assert ABConfig(rank_energy=0.99).rank_rule() == {"energy": 0.99, "fraction": None,
                                                     "fixed": None}
    with pytest.raises(ABConfigError, match="at most one of rank_energy, rank_fraction"):
        ABConfig(rank_energy=0.9, fixed_rank=8)
    with pytest.raises(ABConfigError, match=r"rank_fraction must be a number in \(0, 1\]"):
        ABConfig(rank_fraction=1.5)
    with pytest.raises(ABConfigError, match="lean_memory needs warmup_steps=0 and "
                                            "rebound_steps=0"):
        ABConfig(lean_memory=True)
    with pytest.raises(ABConfigError, match="sync_mode 'full'"):
        ABConfig(lean_memory=True, warmup_steps=0, rebound_steps=0, sync_mode="full")
    ABConfig(lean_memory=True, warmup_steps=0, rebound_steps=0)
