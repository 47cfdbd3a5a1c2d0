"""ABConfig: every knob of AB-training, with validation that says what to change.

The fields are the paper's (Coquelin et al., "AB-Training: A Communication-Efficient Approach
for Distributed Low-Rank Learning", arXiv 2405.01067). They are declared, each with its own help
text in ``metadata["help"]``, in :mod:`ab_accel.config_fields`; the README's config reference is
generated from the same text. This module holds the validation, the rules derived from the fields
and the (de)serialization.

The config round-trips through plain dicts and JSON, and can be read from the top-level
``"ab_training"`` key of a DeepSpeed JSON config (:meth:`ABConfig.from_deepspeed_config`).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, NamedTuple

from .config_fields import ConfigFields
from .vocab import SyncMode

SYNC_MODES: tuple[str, ...] = tuple(m.value for m in SyncMode)
#: The top-level key of a DeepSpeed JSON config that holds the AB-training settings.
DEEPSPEED_KEY = "ab_training"


class ABConfigError(ValueError):
    """A bad AB-training setting. The message names the field and says what to change."""


@dataclass
class ABConfig(ConfigFields):
    """AB-training settings (arXiv 2405.01067). Steps are optimizer steps.

    The schedule, in the paper's words: ``warmup_steps`` of plain data-parallel training; then
    cycles of ``sync_every`` steps, each an AB phase of ``sync_every - rebound_steps`` steps
    (A-groups train A, B-groups train B, gradients averaged inside the group only), a sync that
    reconciles the groups, and a full-rank rebound of ``rebound_steps`` steps, after which every
    weight is factorized again with the ``rank_cutoff`` truncation. The fields, their defaults
    and their help texts are declared in :class:`ab_accel.config_fields.ConfigFields`.
    """

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise :class:`ABConfigError` naming the field and the fix."""

        def _int(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ABConfigError(
                    f"ab_training.{name} must be an integer, got {value!r} "
                    f"({type(value).__name__}). Write it as a whole number, e.g. {name}={low}."
                )
            if value < low:
                raise ABConfigError(
                    f"ab_training.{name} must be >= {low}, got {value}."
                )
            return value

        if not isinstance(self.enabled, bool):
            raise ABConfigError(
                f"ab_training.enabled must be true or false, got {self.enabled!r}."
            )
        _int("warmup_steps", 0)
        _int("sync_every", 1)
        _int("rebound_steps", 0)
        _int("lr_rebound_steps", 0)
        _int("min_rank", 1)
        _int("max_skipped_steps", 0)
        if self.rebound_steps >= self.sync_every:
            raise ABConfigError(
                f"ab_training.rebound_steps ({self.rebound_steps}) must be smaller than "
                f"sync_every ({self.sync_every}): a cycle of sync_every steps holds the AB "
                f"phase and then the rebound. Lower rebound_steps or raise sync_every."
            )
        tau = self.rank_cutoff
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < 1.0:
            raise ABConfigError(
                f"ab_training.rank_cutoff must be a number in [0, 1), got {tau!r}. The paper "
                f"uses 0.15 (keep singular values above 15% of the largest)."
            )
        self.rank_cutoff = float(tau)
        if self.sync_mode not in SYNC_MODES:
            hint = difflib.get_close_matches(str(self.sync_mode), SYNC_MODES, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ABConfigError(
                f"ab_training.sync_mode must be one of {', '.join(SYNC_MODES)}; got "
                f"{self.sync_mode!r}.{did_you_mean}"
            )
        if self.group_size == "world":
            if self.sync_mode != "only-b":
                raise ABConfigError(
                    "ab_training.group_size='world' (one group) needs sync_mode 'only-b': "
                    f"sync_mode {self.sync_mode!r} needs an A-group and a B-group. Set "
                    "sync_mode='only-b' or give group_size as a number of ranks.")
        elif self.group_size is not None:
            _int("group_size", 1)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ABConfigError(
                    f"ab_training.{name} must be a list of module-name suffixes or one regex "
                    f"string, got {value!r}."
                )
        timeout = self.collective_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout <= 0):
            raise ABConfigError(f"ab_training.collective_timeout_s must be a number of seconds "
                                f"> 0 (or null for the process group's own), got {timeout!r}.")
        rules = [n for n in ("rank_energy", "rank_fraction", "fixed_rank")
                 if getattr(self, n) is not None]
        if len(rules) > 1:
            raise ABConfigError(f"ab_training: give at most one of rank_energy, rank_fraction "
                                f"and fixed_rank (got {', '.join(rules)}); each replaces "
                                f"rank_cutoff with its own rule.")
        for name in ("rank_energy", "rank_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not 0.0 < value <= 1.0):
                raise ABConfigError(f"ab_training.{name} must be a number in (0, 1], got "
                                    f"{value!r}.")
        if self.fixed_rank is not None:
            _int("fixed_rank", 1)
        if not isinstance(self.lean_memory, bool):
            raise ABConfigError(f"ab_training.lean_memory must be true or false, got "
                                f"{self.lean_memory!r}.")
        if self.lean_memory and self.sync_mode == "full":
            raise ABConfigError(
                "ab_training.lean_memory averages the factors at a sync; sync_mode 'full' "
                "averages every rank's dense product A_i B_i, which needs the dense weights. Use "
                "sync_mode 'with-stale', 'only-learned' or 'only-b' with lean_memory.")
        if self.lean_memory and (self.warmup_steps or self.rebound_steps):
            raise ABConfigError(
                f"ab_training.lean_memory needs warmup_steps=0 and rebound_steps=0 (got "
                f"{self.warmup_steps} and {self.rebound_steps}): its point is that no step is "
                f"dense, so no dense weight ever gets gradients or optimizer state.")
        for name in ("residual", "freeze_untargeted"):
            if not isinstance(getattr(self, name), bool):
                raise ABConfigError(f"ab_training.{name} must be true or false, got "
                                    f"{getattr(self, name)!r}.")
        if self.residual_dtype in ("none", "None"):
            self.residual_dtype = None
        if self.residual_dtype not in (None, "bf16", "fp16", "fp32"):
            raise ABConfigError(f"ab_training.residual_dtype must be 'bf16', 'fp16', 'fp32' or "
                                f"null (the parameters' dtype), got {self.residual_dtype!r}.")
        if self.residual_dtype is not None and not self.residual:
            raise ABConfigError("ab_training.residual_dtype is set but residual is false: set "
                                "residual=true (or drop residual_dtype).")
        if not isinstance(self.overlap, bool):
            raise ABConfigError(f"ab_training.overlap must be true or false, got "
                                f"{self.overlap!r}.")
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) \
                or self.bucket_mb <= 0:
            raise ABConfigError(f"ab_training.bucket_mb must be a number of MiB > 0, got "
                                f"{self.bucket_mb!r}.")
        if isinstance(self.first_bucket_mb, bool) or not isinstance(
                self.first_bucket_mb, (int, float)) or self.first_bucket_mb <= 0:
            raise ABConfigError(f"ab_training.first_bucket_mb must be a number of MiB > 0, got "
                                f"{self.first_bucket_mb!r}.")
        if self.comm_dtype in ("none", "None", "fp32"):
            self.comm_dtype = None
        if self.comm_dtype not in (None, "bf16", "fp16"):
            hint = difflib.get_close_matches(str(self.comm_dtype), ["bf16", "fp16"], n=1)
            raise ABConfigError(
                f"ab_training.comm_dtype must be 'bf16', 'fp16' or null, got "
                f"{self.comm_dtype!r}." + (f" Did you mean {hint[0]!r}?" if hint else ""))
        if not isinstance(self.accept_resume_changes, bool):
            raise ABConfigError("ab_training.accept_resume_changes must be true or false, got "
                                f"{self.accept_resume_changes!r}.")
        if not isinstance(self.orthogonal_init, bool):
            raise ABConfigError(
                f"ab_training.orthogonal_init must be true or false, got {self.orthogonal_init!r}."
            )

    @classmethod
    def for_finetuning(cls, total_steps: int, rank: int = 16, cycles: int = 4,
                       **overrides: Any) -> ABConfig:
        """The settings a fine-tuner of a pretrained model should start from.

        What the fine-tuning benchmark (BENCHMARKS.md) found to beat LoRA at equal bytes: the
        frozen residual (``residual``: converting loses nothing, so the pretrained model's
        spectrum tail is kept), every parameter outside the targets frozen
        (``freeze_untargeted``, as LoRA does), ``lean_memory`` (no dense step, so no dense
        weight ever has a gradient or optimizer state), a ``fixed_rank`` of ``rank`` (each rank
        trains and sends ONE factor: about half of LoRA's bytes at the same rank), and
        ``cycles`` AB cycles over the run (each ends with a sync and a re-factorization of the
        whole W_res + A B), with an LR rebound of 20% of a cycle after each, and sync_mode
        ``"with-stale"``: to first order its W_res + mean(A) mean(B) is the mean of the two
        groups' models. ``"only-learned"`` keeps both groups' changes whole, which adds them:
        on the benchmark the loss jumped up after every sync (1.72 against 1.64 for LoRA).
        ``overrides`` set any other field (``target_modules``, ``sync_mode``,
        ``residual_dtype``, ...).
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or \
                total_steps < cycles or cycles < 1:
            raise ABConfigError(f"for_finetuning needs total_steps >= cycles >= 1 (whole "
                                f"numbers), got total_steps={total_steps!r}, cycles={cycles!r}.")
        sync_every = total_steps // cycles
        base: dict[str, Any] = {
            "warmup_steps": 0, "rebound_steps": 0, "sync_every": sync_every,
            "lr_rebound_steps": max(1, round(0.2 * sync_every)), "lean_memory": True,
            "residual": True, "freeze_untargeted": True, "fixed_rank": rank,
            "sync_mode": "with-stale"}
        return cls.from_dict({**base, **overrides})

    def rank_rule(self) -> dict[str, Any]:
        """The keywords of :func:`ab_accel.layers.cut_rank` for the configured rank rule."""
        return {"energy": self.rank_energy, "fraction": self.rank_fraction,
                "fixed": self.fixed_rank}

    def resolve_group_size(self, world_size: int) -> int:
        """The group size for a world of ``world_size`` ranks, checked to fit.

        Raises :class:`ABConfigError` when the groups cannot be formed.
        """
        if world_size < 1:
            raise ABConfigError(f"world_size must be >= 1, got {world_size}.")
        if world_size == 1:
            return 1
        if self.group_size == "world":
            return world_size
        size = self.group_size if self.group_size is not None else world_size // 2
        if self.group_size is None and world_size % 2:
            raise ABConfigError(
                f"AB-training splits the world into A-groups and B-groups; the default "
                f"group_size is world_size / 2, which does not fit a world of {world_size} "
                f"ranks. Set ab_training.group_size to a divisor of {world_size} that leaves at "
                f"least 2 groups ({_divisors_hint(world_size)}), or use sync_mode 'only-b' with "
                f"group_size {world_size}."
            )
        if world_size % size:
            raise ABConfigError(
                f"ab_training.group_size={size} does not divide the world size {world_size}: "
                f"groups are consecutive ranks and must all be the same size. Use one of "
                f"{_divisors_hint(world_size, allow_world=self.sync_mode == 'only-b')}."
            )
        groups = world_size // size
        if groups < 2 and self.sync_mode != "only-b":
            raise ABConfigError(
                f"ab_training.group_size={size} leaves {groups} group on {world_size} ranks, "
                f"but sync_mode {self.sync_mode!r} needs at least one A-group and one B-group. "
                f"Use group_size in {_divisors_hint(world_size)}, or sync_mode 'only-b'."
            )
        return size

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> ABConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | ABConfig) -> ABConfig:
        """Build from a dict; unknown keys are an error with a did-you-mean."""
        if isinstance(data, ABConfig):
            return data
        if not isinstance(data, dict):
            raise ABConfigError(
                f'"{DEEPSPEED_KEY}" must be a JSON object (a dict of settings), got '
                f"{type(data).__name__}."
            )
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ABConfigError(_unknown_keys_message(unknown, known, f'"{DEEPSPEED_KEY}"'))
        return cls(**data)

    @classmethod
    def from_deepspeed_config(cls, ds_config: dict[str, Any] | str | os.PathLike | None
                              ) -> ABConfig | None:
        """Read the top-level ``"ab_training"`` key of a DeepSpeed config (dict or JSON path).

        Returns None when the key is absent. A key placed inside one of DeepSpeed's own blocks
        (where DeepSpeed would reject it) is an error that says where it belongs.
        """
        if ds_config is None:
            return None
        if isinstance(ds_config, (str, os.PathLike)):
            ds_config = load_deepspeed_json(ds_config)
        if not isinstance(ds_config, dict):
            raise ABConfigError(
                f"A DeepSpeed config must be a dict or a JSON file path, got "
                f"{type(ds_config).__name__}."
            )
        misplaced = _find_misplaced(ds_config)
        if misplaced:
            raise ABConfigError(
                f'"{DEEPSPEED_KEY}" was found inside "{misplaced}" of the DeepSpeed config. It '
                f"belongs at the TOP LEVEL of the JSON, beside \"train_batch_size\" and "
                f"\"zero_optimization\": DeepSpeed's own blocks reject unknown keys."
            )
        if DEEPSPEED_KEY not in ds_config:
            return None
        return cls.from_dict(ds_config[DEEPSPEED_KEY])

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, in declaration order (used for the README reference)."""
        out = {}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            out[f.name] = f"{f.metadata.get('help', '')} (default: {default!r})"
        return out


def _refuse_unknown_keywords(cls: type) -> None:
    """``ABConfig(sync_evry=10)`` gets the did-you-mean of ``from_dict``, not a bare TypeError."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in cls.__dataclass_fields__]
        if unknown:
            raise ABConfigError(_unknown_keys_message(unknown, list(cls.__dataclass_fields__),
                                                      "ABConfig()"))
        generated(self, *args, **kwargs)

    cls.__init__ = __init__


def _unknown_keys_message(unknown: list[str], known: list[str], where: str) -> str:
    messages = []
    for key in unknown:
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        messages.append(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return f"Unknown key(s) in {where}: {', '.join(messages)}. Known keys: {', '.join(known)}."


_refuse_unknown_keywords(ABConfig)


class ResolvedConfig(NamedTuple):
    """The AB config of a run and where it came from (a phrase for the logs)."""

    config: ABConfig | None
    source: str


#: What ``accelerate launch --use_deepspeed --deepspeed_config_file X`` sets in the environment.
_ACCELERATE_USE_DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"
_ACCELERATE_DEEPSPEED_FILE = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def resolve_config(config: ABConfig | Mapping[str, Any] | None = None, *,
                   optimizer_config: ABConfig | None = None,
                   deepspeed: Mapping[str, Any] | str | os.PathLike | None = None,
                   environ: Mapping[str, str] | None = None,
                   fallback: ABConfig | Mapping[str, Any] | None = None) -> ResolvedConfig:
    """The one rule that decides a run's AB config from the places it can be given.

    Sources, in this order: ``config`` (an explicit ABConfig or dict: ``prepare(config=)``,
    ``ABTrainer(ab_config=)``), ``optimizer_config`` (the config of an ABOptimizer the user
    built), the top-level ``"ab_training"`` key of the DeepSpeed config ``deepspeed`` (a dict or
    a JSON path), and, when ``environ`` is given and ``deepspeed`` is not, the DeepSpeed JSON
    that ``accelerate launch --use_deepspeed --deepspeed_config_file`` names there. The first
    source that gives a config is used; every other source that gives one must agree with it,
    otherwise one :class:`ABConfigError` names both sources and the fields that differ.
    ``fallback`` is used only when no source gives a config (it never conflicts); without it
    the result's ``config`` is None.
    """
    sources: list[tuple[str, ABConfig]] = []
    if config is not None:
        sources.append(("config=", ABConfig.from_dict(dict(config) if isinstance(
            config, Mapping) else config)))
    if optimizer_config is not None:
        sources.append(("the ABOptimizer's config", optimizer_config))
    if deepspeed is None and environ is not None:
        use_ds = str(environ.get(_ACCELERATE_USE_DEEPSPEED, "false")).lower() == "true"
        if use_ds and environ.get(_ACCELERATE_DEEPSPEED_FILE):
            deepspeed = environ[_ACCELERATE_DEEPSPEED_FILE]
    if deepspeed is not None:
        where = (f" {os.fspath(deepspeed)}" if isinstance(deepspeed, (str, os.PathLike))
                 else "")
        from_ds = ABConfig.from_deepspeed_config(
            dict(deepspeed) if isinstance(deepspeed, Mapping) else deepspeed)
        if from_ds is not None:
            sources.append((f'the "{DEEPSPEED_KEY}" key of the DeepSpeed JSON{where}', from_ds))
    if not sources:
        if fallback is None:
            return ResolvedConfig(None, "none given")
        return ResolvedConfig(ABConfig.from_dict(dict(fallback) if isinstance(
            fallback, Mapping) else fallback), "the fallback")
    name, chosen = sources[0]
    for other_name, other in sources[1:]:
        differ = [k for k, v in chosen.to_dict().items() if other.to_dict()[k] != v]
        if differ:
            detail = ", ".join(f"{k}={getattr(chosen, k)!r} vs {getattr(other, k)!r}"
                               for k in differ)
            raise ABConfigError(
                f"The AB-training config is given twice and the two differ ({name} vs "
                f"{other_name}: {detail}). Keep one of them.")
    return ResolvedConfig(chosen, name)


def load_deepspeed_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON config file; a missing file or bad JSON is an ABConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ABConfigError(f"DeepSpeed config file {path!r} does not exist.")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ABConfigError(f"DeepSpeed config {path!r} is not valid JSON: {exc}") from exc


def _find_misplaced(ds_config: dict[str, Any], prefix: str = "") -> str | None:
    for key, value in ds_config.items():
        if isinstance(value, dict):
            path = f"{prefix}{key}"
            if DEEPSPEED_KEY in value:
                return path
            inner = _find_misplaced(value, prefix=path + ".")
            if inner:
                return inner
    return None


def _divisors_hint(world_size: int, allow_world: bool = False) -> str:
    options = [d for d in range(1, world_size + 1)
               if world_size % d == 0 and (world_size // d >= 2 or allow_world)]
    return ", ".join(str(d) for d in options) if options else "none"
