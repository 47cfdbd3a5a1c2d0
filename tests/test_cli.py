"""ab_accel.cli: ABConfig on a jsonargparse command line (help texts, did-you-mean, shorthands)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from ab_accel import ABConfig
from ab_accel.cli import CommandLineError, make_parser, parse_argv


@dataclass
class Args:
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast."})
    model: dict = field(default_factory=dict, metadata={"help": "Model config fields."})
    ab_training: ABConfig = field(default_factory=ABConfig, metadata={"help": "AB-training."})


def parse(*argv: str):
    parser = make_parser("train.py", "a test", Args)
    return parser.instantiate(parse_argv(parser, list(argv), Args))


def test_nested_ab_config_shorthands_and_the_no_ab_flag():
    ns = parse("--lr", "0.01", "--betas", "0.8,0.9", "--bf16", "--model.depths", "3,4",
               "--ab_training.sync_every", "500", "--no-ab")
    assert ns.lr == 0.01 and tuple(ns.betas) == (0.8, 0.9) and ns.bf16 is True
    assert ns.model == {"depths": [3, 4]} and ns.no_ab is True
    assert isinstance(ns.ab_training, ABConfig) and ns.ab_training.sync_every == 500
    assert parse().ab_training == ABConfig()


def test_unknown_keys_get_the_closest_known_one():
    with pytest.raises(CommandLineError, match="did you mean 'sync_every'"):
        parse("--ab_training.sync_evry", "5")
    with pytest.raises(CommandLineError, match="did you mean 'lr'"):
        parse("--lrr", "5")
    with pytest.raises(CommandLineError):  # a value of the wrong type
        parse("--ab_training.sync_every", "often")


def test_help_lists_every_field_with_its_help_text(capsys):
    parser = make_parser("train.py", "a test", Args)
    parser.print_help()
    text = capsys.readouterr().out
    assert "Peak learning rate." in text and "ab_training (ab_accel.ABConfig)" in text
    for f in dataclasses.fields(ABConfig):
        if "help" in f.metadata:
            assert f"--ab_training.{f.name}" in text, f.name
