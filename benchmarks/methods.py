"""The methods compared, each set up the way its own documentation says, over the same model.

=================  =============================================================================
``local``          NOT A TRAINING METHOD, A CLOCK: the same per-rank compute (forward, backward,
                   clipping, AdamW) with every collective skipped; each rank trains its shard
                   alone. Its step time is the zero-communication limit of every other method.
``ddp``            torch DDP with a counting all-reduce comm hook (torch's ``allreduce_hook``:
                   it still really all-reduces every bucket)
``ddp-fp16``,      DDP with torch's ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook``
``ddp-bf16``       (each bucket cast to 16 bits, all-reduced, cast back): half DDP's gradient
                   bytes; both run on gloo here (the NCCL-only one is ``bf16_compress_wrapper``)
``ab-<sync_mode>`` ab_accel's core API directly: ``convert`` + ``ABOptimizer`` over the plain
                   (non-DDP) model; the ABOptimizer does all reduction. ``ab-with-stale``,
                   ``ab-only-learned``, ``ab-only-b`` (and ``ab-full``); a ``-bf16`` or
                   ``-fp16`` suffix sets ``ABConfig.comm_dtype`` (the low-precision wire)
``powersgd-r<k>``  DDP + ``powerSGD_hook`` with ``PowerSGDState(matrix_approximation_rank=k)``,
                   error feedback and warm start on
``localsgd[-h<H>]``  post-local SGD: DDP + ``post_localSGD_hook`` (gradients all-reduced over
                   the world for the warm-up, then inside subgroups) + ``PeriodicModelAverager``
                   (parameters averaged over the world every H steps) + ``PostLocalSGDOptimizer``
``diloco[-h<H>]``  DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1): after the
                   dense warm-up every rank runs H inner AdamW steps on its shard alone, then
                   the pseudo-gradient (outer weights - inner weights) is averaged over the
                   world and an outer Nesterov SGD step (lr 0.7, momentum 0.9, the paper's)
                   moves the outer weights, which every rank then restarts from. Written here
                   (:class:`DiLoCo`): torchft's ``DiLoCo`` needs its lighthouse and Manager
=================  =============================================================================

Every method gets the same warm-up of plain data-parallel steps (AB's ``warmup_steps``,
PowerSGD's ``start_powerSGD_iter``, post-local SGD's ``start_localSGD_iter``), the same AdamW,
learning-rate schedule and gradient clipping.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ab_accel import ABConfig, ABOptimizer, compression, convert
from ab_accel.ddp import DDPTraffic

from .meters import state_bytes

AB_PREFIX = "ab-"
_POWERSGD = re.compile(r"^powersgd-r(\d+)$")
_LOCALSGD = re.compile(r"^localsgd(?:-h(\d+))?$")
_DILOCO = re.compile(r"^diloco(?:-h(\d+))?$")
_WIRE_DTYPES = ("bf16", "fp16")
#: The clock that is not a training method (see the module docstring).
LOCAL = "local"
#: DDP's bucket size for every DDP-based method, and AB's too (first bucket included): one
#: bucket for these models, the same layout on both sides.
DDP_BUCKET_MB = 25.0


@dataclass
class Knobs:
    """The training and method settings shared by every method (all from the command line)."""

    steps: int
    lr: float = 3e-3
    weight_decay: float = 0.01
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    clip: float = 1.0
    label_smoothing: float = 0.0
    ab_warmup: int = 0
    ab_sync_every: int = 1
    ab_rebound: int = 0
    ab_lr_rebound: int = 0
    rank_cutoff: float = 0.15
    ab_group_size: int | None = None
    orthogonal_init: bool = False
    powersgd_start: int = 2
    localsgd_start: int = 0
    localsgd_period: int = 8
    localsgd_subgroup_size: int = 2
    diloco_period: int = 16
    diloco_outer_lr: float = 0.7
    diloco_outer_momentum: float = 0.9


def split_wire_dtype(name: str) -> tuple[str, str | None]:
    """``"ab-with-stale-bf16"`` -> ``("ab-with-stale", "bf16")``; no suffix: ``(name, None)``."""
    for dtype in _WIRE_DTYPES:
        if name.endswith("-" + dtype):
            return name[:-len(dtype) - 1], dtype
    return name, None


def check_method(name: str, knobs: Knobs, world: int) -> None:
    """Raise ValueError with the fix when ``name`` is not a method this benchmark runs."""
    if name in ("ddp", "ddp-fp16", "ddp-bf16", LOCAL):
        return
    if _DILOCO.match(name):
        return
    if name.startswith(AB_PREFIX):
        base, dtype = split_wire_dtype(name)
        cfg = ab_config(base[len(AB_PREFIX):], knobs, dtype)
        cfg.resolve_group_size(world)
        return
    if _POWERSGD.match(name):
        return
    m = _LOCALSGD.match(name)
    if m:
        if world % knobs.localsgd_subgroup_size:
            raise ValueError(f"--localsgd-subgroup-size {knobs.localsgd_subgroup_size} does not "
                             f"divide the world size {world}")
        return
    raise ValueError(
        f"unknown method {name!r}: use local, ddp, ddp-fp16, ddp-bf16, ab-with-stale, "
        f"ab-only-learned, ab-only-b, ab-full (each optionally with -bf16 or -fp16), "
        f"powersgd-r<rank> (e.g. powersgd-r4), localsgd[-h<period>] or diloco[-h<period>]")


def ab_config(mode: str, knobs: Knobs, comm_dtype: str | None = None) -> ABConfig:
    return ABConfig(warmup_steps=knobs.ab_warmup, sync_every=knobs.ab_sync_every,
                    rebound_steps=knobs.ab_rebound, lr_rebound_steps=knobs.ab_lr_rebound,
                    rank_cutoff=knobs.rank_cutoff, group_size=knobs.ab_group_size,
                    sync_mode=mode, orthogonal_init=knobs.orthogonal_init,
                    comm_dtype=comm_dtype,
                    # the bucket layout of the benchmark's DDP (bucket_cap_mb=25, see _ddp)
                    bucket_mb=DDP_BUCKET_MB, first_bucket_mb=DDP_BUCKET_MB)


def lr_schedule(optimizer: torch.optim.Optimizer, knobs: Knobs
                ) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up to the peak over ``lr_warmup_steps`` (from 1/w of it), then cosine down to
    ``min_lr_ratio`` of it at ``steps``: torch's SequentialLR(LinearLR, CosineAnnealingLR),
    stepped once per optimizer step."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    w = knobs.lr_warmup_steps
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, knobs.steps - w),
                               eta_min=knobs.min_lr_ratio * knobs.lr)
    if not w:
        return cosine
    warm = LinearLR(optimizer, start_factor=1 / w, total_iters=w - 1)
    return SequentialLR(optimizer, [warm, cosine], milestones=[w])


@dataclass
class Method:
    """One method, ready to train: call :meth:`step` after ``loss.backward()``."""

    name: str
    forward_model: nn.Module  # what the loop calls (DDP wrapper or the plain model)
    model: nn.Module  # the plain model (evaluation, state size)
    optimizer: Any
    base_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: float
    ab: ABOptimizer | None = None
    bucket_count: DDPTraffic | None = None  # what DDP handed its comm hook
    extra_state: Callable[[], list[torch.Tensor]] = lambda: []
    finish: Callable[[], None] = lambda: None
    #: runs before clipping (DiLoCo's warm-up averages the gradients here)
    before_step: Callable[[], None] = lambda: None
    #: runs after the optimizer step, before zero_grad (DiLoCo's outer step)
    after_step: Callable[[], None] = lambda: None
    peak_state_bytes: int = 0
    peak_state_bytes_by_phase: dict[str, int] = field(default_factory=dict)

    def step(self) -> None:
        """Clip (after reduction), optimizer step, record the state size, zero, schedule."""
        phase = self.ab.phase if self.ab is not None else "dp"
        self.before_step()
        if self.ab is not None:
            if self.clip:
                self.ab.clip_grad_norm_(self.clip)
        elif self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.after_step()
        # Gradients are still allocated here: the peak of params + grads + optimizer state.
        now = self.state_bytes()
        self.peak_state_bytes = max(self.peak_state_bytes, now)
        self.peak_state_bytes_by_phase[phase] = max(now,
                                                    self.peak_state_bytes_by_phase.get(phase, 0))
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def switch_counts(self) -> dict[str, int]:
        return dict(Counter(str(s.event) for s in self.ab.switches)) if self.ab else {}

    @property
    def factorizations(self) -> list[dict[str, Any]]:
        """Every factorization: its boundary step, the ranks it chose, the layers' shapes."""
        layers = compression(self.model)["layers"]
        shapes = {n: layer["shape"] for n, layer in layers.items()}
        return [{"boundary": s.step, "ranks": s.ranks, "shapes": shapes, **s.compression}
                for s in (self.ab.switches if self.ab else []) if s.event == "factorize"]

    def state_bytes(self) -> int:
        return state_bytes(self.model, self.base_optimizer, self.extra_state())


def build_method(name: str, model: nn.Module, knobs: Knobs) -> Method:
    """Set up ``name`` on ``model`` (in place). Collective: every rank calls it together."""
    check_method(name, knobs, dist.get_world_size())
    if name.startswith(AB_PREFIX):
        return _build_ab(name, model, knobs)
    if name == LOCAL:
        return _build_local(name, model, knobs)
    if name in ("ddp", "ddp-fp16", "ddp-bf16"):
        return _build_ddp(name, model, knobs)
    m = _DILOCO.match(name)
    if m:
        return _build_diloco(name, model, knobs,
                             int(m.group(1)) if m.group(1) else knobs.diloco_period)
    m = _POWERSGD.match(name)
    if m:
        return _build_powersgd(name, model, knobs, int(m.group(1)))
    m = _LOCALSGD.match(name)
    assert m is not None
    period = int(m.group(1)) if m.group(1) else knobs.localsgd_period
    return _build_localsgd(name, model, knobs, period)


def _adamw(params: Any, knobs: Knobs) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=knobs.lr, weight_decay=knobs.weight_decay,
                             betas=(0.9, 0.999))


def _build_ab(name: str, model: nn.Module, knobs: Knobs) -> Method:
    base_name, dtype = split_wire_dtype(name)
    cfg = ab_config(base_name[len(AB_PREFIX):], knobs, dtype)
    convert(model, cfg)
    base = _adamw(model.parameters(), knobs)
    sched = lr_schedule(base, knobs)
    # The ABOptimizer lists its switches itself (opt.switches: event, boundary step, seconds,
    # ranks and compression of each factorization) and times its SVDs (svd_seconds).
    opt = ABOptimizer(base, None, cfg)
    method = Method(name, model, model, opt, base, sched, knobs.clip, ab=opt)
    opt.bind(model)
    return method


def _ddp(model: nn.Module) -> DDP:
    # The models have no buffers, so DDP sends nothing outside its comm hook. An explicit
    # bucket_cap_mb also caps DDP's first bucket (1 MiB by default), so models under 25 MiB
    # get one bucket. PowerSGD needs that on gloo: its hook issues collectives from future
    # callbacks, and with several buckets their order can differ between ranks (gloo aborts:
    # "Received data size doesn't match expected size"; seen here with two buckets).
    return DDP(model, bucket_cap_mb=DDP_BUCKET_MB)


def _build_ddp(name: str, model: nn.Module, knobs: Knobs) -> Method:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = {"ddp": default_hooks.allreduce_hook, "ddp-fp16": default_hooks.fp16_compress_hook,
            "ddp-bf16": default_hooks.bf16_compress_hook}[name]
    ddp = _ddp(model)
    count = DDPTraffic(ddp, hook)
    base = _adamw(model.parameters(), knobs)
    sched = lr_schedule(base, knobs)
    return Method(name, ddp, model, base, base, sched, knobs.clip, bucket_count=count)


def _build_powersgd(name: str, model: nn.Module, knobs: Knobs, rank: int) -> Method:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    ddp = _ddp(model)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                               start_powerSGD_iter=max(2, knobs.powersgd_start),
                               use_error_feedback=True, warm_start=True, random_seed=0)
    count = DDPTraffic(ddp, psgd.powerSGD_hook, state)
    base = _adamw(model.parameters(), knobs)
    sched = lr_schedule(base, knobs)

    def extra() -> list[torch.Tensor]:
        return (list(state.error_dict.values()) + list(state.p_memory_dict.values())
                + list(state.q_memory_dict.values()))

    return Method(name, ddp, model, base, base, sched, knobs.clip, bucket_count=count,
                  extra_state=extra)


def _build_localsgd(name: str, model: nn.Module, knobs: Knobs, period: int) -> Method:
    from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as plsgd
    from torch.distributed.algorithms.model_averaging import averagers
    from torch.distributed.algorithms.model_averaging.utils import average_parameters
    from torch.distributed.optim import PostLocalSGDOptimizer

    ddp = _ddp(model)
    subgroup, _ = dist.new_subgroups(group_size=knobs.localsgd_subgroup_size)
    start = knobs.localsgd_start
    state = plsgd.PostLocalSGDState(process_group=None, subgroup=subgroup,
                                    start_localSGD_iter=start)
    count = DDPTraffic(ddp, plsgd.post_localSGD_hook, state)
    base = _adamw(model.parameters(), knobs)
    averager = averagers.PeriodicModelAverager(period=period, warmup_steps=start)
    opt = PostLocalSGDOptimizer(optim=base, averager=averager)
    sched = lr_schedule(base, knobs)

    def finish() -> None:
        # A run ends with one more global average unless the last step just averaged, so that
        # every rank holds the same model (as a user of post-local SGD would do).
        last = averager.step - 1
        if last < start or (last - start) % period != 0:
            average_parameters(iter(model.parameters()), None)

    return Method(name, ddp, model, opt, base, sched, knobs.clip, bucket_count=count,
                  finish=finish)


def _build_local(name: str, model: nn.Module, knobs: Knobs) -> Method:
    """The zero-communication clock: the plain model and AdamW, nothing reduced."""
    base = _adamw(model.parameters(), knobs)
    sched = lr_schedule(base, knobs)
    return Method(name, model, model, base, base, sched, knobs.clip)


class DiLoCo:
    """DiLoCo's outer loop (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
    Training of Language Models", arXiv 2311.08105, Algorithm 1) around a per-rank inner
    optimizer.

    ``warmup_steps``: plain data-parallel steps first (gradients averaged over the world every
    step, as every method of this benchmark gets); the outer weights start where they end.
    ``period`` (the paper's H): inner steps between outer steps; each rank's inner optimizer
    (AdamW here, as in the paper) trains its own replica on its own shard with no communication.
    Outer step: the pseudo-gradient ``outer - inner`` of every rank is averaged over the world
    (one all-reduce of all parameters), an SGD step with Nesterov momentum (``outer_lr`` 0.7,
    ``outer_momentum`` 0.9, the paper's) moves the outer weights, and every rank restarts its
    inner replica from them. Float buffers (BatchNorm statistics) are averaged at the same
    time. The inner optimizer's state is kept across outer steps, as in the paper.
    """

    def __init__(self, model: nn.Module, warmup_steps: int, period: int, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, group: Any = None) -> None:
        if period < 1:
            raise ValueError(f"DiLoCo's period H must be >= 1, got {period}")
        self.model, self.warmup_steps, self.period, self.group = (
            model, warmup_steps, period, group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.outer = [p.detach().clone() for p in self.params]
        self.outer_opt = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum,
                                         nesterov=True)
        self.step_count = 0
        self.outer_steps = 0

    def average_gradients(self) -> None:
        """Warm-up steps: every gradient averaged over the world (one flat all-reduce)."""
        if self.step_count >= self.warmup_steps:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        self._mean_(grads)

    def after_inner_step(self) -> None:
        """Count the step; restart the outer weights after the warm-up, or take an outer step
        every ``period`` inner steps."""
        self.step_count += 1
        if self.step_count == self.warmup_steps:
            self._restart_outer()
        elif self.step_count > self.warmup_steps and \
                (self.step_count - self.warmup_steps) % self.period == 0:
            self.outer_step()

    def finish(self) -> None:
        """An outer step for inner steps not yet averaged, so every rank ends with one model."""
        if self.step_count > self.warmup_steps and \
                (self.step_count - self.warmup_steps) % self.period:
            self.outer_step()

    @torch.no_grad()
    def outer_step(self) -> None:
        """Average the pseudo-gradient over the world, take the outer Nesterov step, and copy
        the outer weights into the replica."""
        deltas = [o - p.detach() for o, p in zip(self.outer, self.params, strict=True)]
        self._mean_(deltas + self.buffers)
        for o, d in zip(self.outer, deltas, strict=True):
            o.grad = d
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)
        for o, p in zip(self.outer, self.params, strict=True):
            p.copy_(o)
        self.outer_steps += 1

    @torch.no_grad()
    def _restart_outer(self) -> None:
        for o, p in zip(self.outer, self.params, strict=True):
            o.copy_(p.detach())

    def _mean_(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def state(self) -> list[torch.Tensor]:
        return self.outer + [v for st in self.outer_opt.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor)]


def _build_diloco(name: str, model: nn.Module, knobs: Knobs, period: int) -> Method:
    base = _adamw(model.parameters(), knobs)
    sched = lr_schedule(base, knobs)
    algo = DiLoCo(model, knobs.ab_warmup, period, knobs.diloco_outer_lr,
                  knobs.diloco_outer_momentum)
    return Method(name, model, model, base, base, sched, knobs.clip, extra_state=algo.state,
                  finish=algo.finish, before_step=algo.average_gradients,
                  after_step=algo.after_inner_step)
