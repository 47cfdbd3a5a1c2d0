"""The knobs of AB-training: every field of :class:`~ab_accel.config.ABConfig`, its default
and its help text.

The declarations alone, in the paper's vocabulary (Coquelin et al., arXiv 2405.01067: W0, T, F,
R, tau): each field carries its help in ``metadata["help"]``, from which ``ABConfig.help()`` and
the README's config reference are made. :class:`ConfigFields` is the dataclass base that
``ABConfig`` (in :mod:`ab_accel.config`) extends with the validation, the derived rules and the
(de)serialization; build and import ``ABConfig``, never this base.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConfigFields:
    """The fields of :class:`~ab_accel.config.ABConfig` (declarations only: no validation)."""

    enabled: bool = field(
        default=True,
        metadata={"help": "Turn AB-training on. False leaves the model and optimizer untouched "
                          "(plain data parallel)."},
    )
    warmup_steps: int = field(
        default=1000,
        metadata={"help": "W0: optimizer steps of plain data-parallel training on the dense "
                          "weights before the first factorization. 0 factorizes at the start."},
    )
    sync_every: int = field(
        default=500,
        metadata={"help": "T: length of one AB cycle in optimizer steps (AB phase + rebound). "
                          "The groups are reconciled once per cycle."},
    )
    rebound_steps: int = field(
        default=50,
        metadata={"help": "F: full-rank data-parallel steps after each sync, before the "
                          "re-factorization. 0 <= F < sync_every; 0 skips the rebound."},
    )
    lr_rebound_steps: int = field(
        default=100,
        metadata={"help": "R: after every phase switch the learning rate is multiplied by "
                          "min(1, (k+1)/(R+1)) for the k-th step after the switch. 0 disables."},
    )
    rank_cutoff: float = field(
        default=0.15,
        metadata={"help": "tau: keep the singular values s_i > tau * s_1 (0 <= tau < 1). "
                          "0 keeps the full (break-even capped) rank."},
    )
    min_rank: int = field(
        default=1,
        metadata={"help": "Lower bound on the rank kept by a factorization."},
    )
    rank_energy: float | None = field(
        default=None,
        metadata={"help": "Instead of rank_cutoff: keep the fewest singular values whose "
                          "squares hold this share (0 < e <= 1) of the weight's spectral energy, "
                          "e.g. 0.99 (a fine-tuner's 'keep 99% of the energy')."},
    )
    rank_fraction: float | None = field(
        default=None,
        metadata={"help": "Instead of rank_cutoff: keep ceil(f * min(out, in)) singular values "
                          "(0 < f <= 1)."},
    )
    fixed_rank: int | None = field(
        default=None,
        metadata={"help": "Instead of rank_cutoff: keep this many singular values in every "
                          "factorized layer (e.g. 64), capped at the layer's break-even rank."},
    )
    group_size: int | str | None = field(
        default=None,
        metadata={"help": "Ranks per group; groups are consecutive ranks. The number of groups "
                          "G = world_size / group_size must be whole, and >= 2 unless sync_mode "
                          "is 'only-b'. None: world_size / 2 (world_size for a single process). "
                          "'world': one group of every rank (the paper's 'AB without groups', "
                          "with sync_mode 'only-b')."},
    )
    sync_mode: str = field(
        default="with-stale",
        metadata={"help": "How the groups are reconciled at a sync: 'with-stale' (world mean of "
                          "A and of B, stale copies included), 'only-learned' (A averaged over "
                          "A-group ranks, B over B-group ranks), 'full' (world mean of A_i B_i), "
                          "'only-b' (every rank trains B only; world mean of B)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Which layers to factorize (peft-style): a list of name suffixes, a "
                          "regex matched against the full module name, or 'all'. None: every "
                          "nn.Linear, nn.Conv2d (groups=1) and transformers Conv1D except the "
                          "first and the last one (stem / patch embedding and classifier head)."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers never to factorize (name suffixes or a regex), applied after "
                          "target_modules."},
    )
    orthogonal_init: bool = field(
        default=False,
        metadata={"help": "At conversion, set every factorized weight's singular values to 1 "
                          "(W <- U V^T), as the paper does when training from scratch."},
    )
    lean_memory: bool = field(
        default=False,
        metadata={"help": "For fine-tuning in little memory: every switch works layer by layer "
                          "(sync, W <- A B, SVD, factorize one layer at a time), so at most one "
                          "dense weight exists at a time and no dense weight ever gets "
                          "optimizer state. Needs warmup_steps=0 and rebound_steps=0 (no dense "
                          "steps at all)."},
    )
    residual: bool = field(
        default=False,
        metadata={"help": "Keep W_res = W - A B at every factorization as a frozen tensor of "
                          "the layer (PiSSA-style): the forward is x W_res^T + x B^T A^T, every "
                          "dense read (export, merge, sync, the next SVD) is W_res + A B, so "
                          "converting loses nothing. Never trained nor communicated; costs one "
                          "dense weight of memory per factorized layer (LoRA's frozen base)."},
    )
    residual_dtype: str | None = field(
        default=None,
        metadata={"help": "The residual's dtype: 'bf16' halves its memory under fp32 factors "
                          "(it is then rounded once, so conversion is no longer exact); None "
                          "keeps it in the parameters' dtype."},
    )
    freeze_untargeted: bool = field(
        default=False,
        metadata={"help": "Freeze every parameter outside the factorized layers (embeddings, "
                          "norms, head, the factorized layers' biases), as peft does: only the "
                          "factors (or the targets' dense weights in a dense step) get "
                          "gradients, so nothing else is reduced, synced or given optimizer "
                          "state."},
    )
    overlap: bool = field(
        default=True,
        metadata={"help": "Launch the gradient reduction during backward, bucket by bucket, as "
                          "DDP does (false: reduce after backward, in step())."},
    )
    bucket_mb: float = field(
        default=25.0,
        metadata={"help": "Size of one overlapped gradient bucket in MiB (DDP's default is 25)."},
    )
    first_bucket_mb: float = field(
        default=1.0,
        metadata={"help": "Size of the first overlapped bucket in MiB (at most bucket_mb), so "
                          "the first all-reduce starts early in backward. DDP's is 1 by "
                          "default and bucket_cap_mb when that is given: set both to DDP's "
                          "bucket_cap_mb for the same bucket layout."},
    )
    comm_dtype: str | None = field(
        default=None,
        metadata={"help": "The dtype on the wire: 'bf16' or 'fp16' halve the bytes of "
                          "gradients and sync payloads (divided by the group size first, summed "
                          "by the collective in that dtype, cast back into the parameters' "
                          "precision, as torch's compression hooks do); None sends them as "
                          "they are. fp16 cannot represent gradients beyond +-65504: bf16 is "
                          "the safe choice."},
    )
    max_skipped_steps: int = field(
        default=10,
        metadata={"help": "A step whose gradients are non-finite (NaN or inf) on any rank is "
                          "skipped on every rank (parameters and optimizer state untouched) and "
                          "counted. Up to this many are skipped in a row; one more stops "
                          "training with an error naming the step, the phase and the ranks. "
                          "0: stop at the first."},
    )
    collective_timeout_s: float | None = field(
        default=None,
        metadata={"help": "Seconds an AB collective waits for its peers before it fails with an "
                          "error naming the phase and the step (ab_accel then uses its own "
                          "process groups with this timeout). None: the process group's own "
                          "(30 minutes under torchrun and Accelerate)."},
    )
    accept_resume_changes: bool = field(
        default=False,
        metadata={"help": "Resuming from a checkpoint written with a different AB schedule "
                          "(warmup_steps, sync_every, rebound_steps, sync_mode, rank_cutoff, "
                          "group_size, ...) or world size is refused with what differs; true "
                          "accepts the change (a new world size only where the checkpoint's "
                          "groups held one model)."},
    )
