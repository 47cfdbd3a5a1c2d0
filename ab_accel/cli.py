"""ABConfig on a command line: a jsonargparse parser over your dataclasses, ``ab_training``
nested inside (``--ab_training.sync_every 500``), every field's help text in ``--help``, and an
unknown knob refused with a did-you-mean. Needs jsonargparse (``pip install jsonargparse``).

    @dataclass
    class Args:
        lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
        ab_training: ABConfig = field(default_factory=ABConfig)

    parser = make_parser("train.py", "My training script.", Args)
    ns = parser.instantiate(parse_argv(parser, sys.argv[1:], Args))
    ns.lr, ns.ab_training, ns.no_ab  # a float, an ABConfig, a bool

What jsonargparse does not do, and this adds: the ``metadata["help"]`` of dataclass fields
(ABConfig's among them) in ``--help`` (jsonargparse reads docstrings only); the closest known
key to an unknown one; HfArgumentParser's shorthands (a bare boolean flag ``--bf16`` is true;
``--betas 0.9,0.95`` after a list knob is a list); one exception type, :class:`CommandLineError`,
whose message says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
from typing import TYPE_CHECKING, Any

from .config import ABConfig

if TYPE_CHECKING:  # jsonargparse is an optional extra: imported when a parser is made
    from jsonargparse import ArgumentParser


class CommandLineError(ValueError):
    """A bad knob, config file or value on the command line. The message says what to change."""


def make_parser(prog: str, description: str, *classes: type, **kwargs: Any) -> ArgumentParser:
    """A jsonargparse parser over dataclasses (their fields at the top level; ``kwargs`` go to
    ``add_class_arguments``, e.g. ``skip``), ``--no-ab`` a flag, and the fields' help texts."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError as exc:
        raise ImportError(
            f"ab_accel.cli needs jsonargparse, an optional extra ({exc}): pip install "
            f"jsonargparse (or ab-accel[recipes]).") from exc
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False,
                            allow_abbrev=False)  # --epoch is not --epochs: refused
    for cls in classes:
        parser.add_class_arguments(cls, as_group=False, **kwargs)
    parser.add_argument("--no-ab", "--no_ab", dest="no_ab", action="store_true",
                        help="AB-training off: plain data parallel, everything else identical.")
    return field_help(parser, *classes)


def field_help(parser: ArgumentParser, *classes: type) -> ArgumentParser:
    """Each dataclass field's ``metadata["help"]`` in --help (ABConfig's under ab_training.)."""
    helps = {f"{prefix}{f.name}": f.metadata["help"] for cls, prefix in [
        *((c, "") for c in classes), (ABConfig, "ab_training.")] for f in dataclasses.fields(cls)
        if "help" in f.metadata}
    for action in parser._actions:
        action.help = action.help or helps.get(action.dest)
    for group in parser._action_groups:  # the nested ABConfig: its name, not its repr
        if group.title == str(ABConfig):
            group.title = "ab_training (ab_accel.ABConfig)"
    return parser


def did_you_mean(message: str, parser: ArgumentParser) -> str:
    """The hint jsonargparse does not give: the closest knob to an unknown one."""
    match = (re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
             or re.search(r"Option '([\w.]+)' is not accepted", message)
             or re.search(r"unrecognized arguments: --([\w.-]+)", message))
    if not match:
        return ""
    block, _, name = ".".join(match.groups()).replace("-", "_").rpartition(".")
    known = [a.dest.rpartition(".")[2] for a in parser._actions
             if a.dest.rpartition(".")[0] == block]
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return (f" (unknown key {name!r}{f' in {block}' if block else ''}"
            + (f": did you mean {hint[0]!r}?)" if hint else ")"))


def parse_argv(parser: ArgumentParser, argv: list[str], *classes: type) -> Any:
    """``parser.parse_args`` with HfArgumentParser's shorthands: a bare boolean flag (``--bf16``)
    is true; ``a,b,c`` after a list knob (``--betas 0.9,0.95``) or a dict knob's key
    (``--model.depths 3,4,6,3``) is the list [a,b,c]. Raises :class:`CommandLineError`."""
    hints = {k: v for cls in classes for k, v in typing.get_type_hints(cls).items()}
    flags = {f"--{k}" for k, v in hints.items() if v in (bool, bool | None)} - {"--no_ab"}
    lists = tuple(f"--{k}" for k, v in hints.items() if typing.get_origin(v) in (list, tuple))
    lists += tuple(f"--{k}." for k, v in hints.items() if dict in (v, typing.get_origin(v)))
    out: list[str] = []
    for i, a in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if a in flags and following.startswith("--"):
            a += "=true"
        elif out and out[-1].startswith(lists) and "," in a and a[0] != "[":
            a = f"[{a}]"
        out.append(a)
    try:
        return parser.parse_args(out)
    except argparse.ArgumentError as exc:  # what jsonargparse raises (exit_on_error=False)
        raise CommandLineError(str(exc).strip() + did_you_mean(str(exc), parser)) from None


__all__ = ["CommandLineError", "make_parser", "field_help", "did_you_mean", "parse_argv"]
