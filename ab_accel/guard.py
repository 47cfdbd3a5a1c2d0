"""The non-finite guard: what the ABOptimizer does when a NaN or an inf shows up.

Two places can meet one, with two policies:

* a training step whose reduced gradients (or float buffers) are non-finite on some rank is
  SKIPPED on every rank alike (every rank reached the same decision through the reduction's
  flags): parameters and optimizer state stay as they are, the skip is counted and logged, and
  more than ``ABConfig.max_skipped_steps`` skips in a row stop training
  (:class:`NonFiniteGuard`);
* a phase switch over non-finite parameters is REFUSED before anything is averaged or
  factorized (:func:`check_finite`), so no rank ever receives another rank's NaN: the optimizer
  produced them from finite gradients, and only a resume can mend that.

Both errors are :class:`NonFiniteError`, with the step, the phase and the world ranks named.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .comm import Communicator, nonfinite
from .groups import ABGroups
from .vocab import Event, TrafficLabel

logger = logging.getLogger("ab_accel")


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values; the message names the step, phase and ranks."""


def ranks_with(comm: Communicator, groups: ABGroups, flag: bool) -> list[int]:
    """The world ranks where ``flag`` is True (one all-gather; used on the failure path)."""
    flags = comm.flags_of(flag, groups.world, groups.world_ranks, TrafficLabel.CHECK)
    return [r for r, f in enumerate(flags) if f]


def check_finite(comm: Communicator, groups: ABGroups, event: Event, step: int,
                 tensors: list[torch.Tensor]) -> None:
    """Refuse a switch on non-finite tensors (one flag over the world), before anything is
    averaged or factorized, so that no rank ever receives the NaN of another."""
    local = bool(nonfinite(tensors, comm.device).item())
    world, ranks = groups.world, groups.world_ranks
    if not comm.max_int([int(local)], world, ranks, TrafficLabel.SYNC)[0]:
        return
    bad = ranks_with(comm, groups, local) if len(ranks) > 1 and comm.active() else [0]
    raise NonFiniteError(
        f"Refusing to {event} at step {step}: the parameters are non-finite (NaN or "
        f"inf) on rank(s) {bad}; nothing was averaged or factorized. The optimizer produced "
        f"them from finite gradients (an update that overflowed): lower the learning rate "
        f"or clip gradients, and resume from the last checkpoint.")


class NonFiniteGuard:
    """Counts the skipped steps and stops training after ``max_skipped_steps`` in a row.

    ``skipped_steps`` (in total) and ``consecutive_skips`` (in a row just now) are kept in the
    ABOptimizer's ``state_dict`` across a resume.
    """

    def __init__(self, max_skipped_steps: int, comm_dtype: str | None = None) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.comm_dtype = comm_dtype
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def stepped(self) -> None:
        """A step ran: the run of skips (if any) is over."""
        self.consecutive_skips = 0

    def skipped(self, step: int, phase: Any, nonfinite_ranks: list[int],
                log: bool = True) -> None:
        """Step ``step`` was skipped on every rank (``nonfinite_ranks``: the world ranks whose
        own values were non-finite; none: only their sum overflowed). Count it, log it (when
        ``log``: rank 0), and raise :class:`NonFiniteError` after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        where = (f"rank(s) {nonfinite_ranks}" if nonfinite_ranks else
                 "no rank's own gradients, but their sum over the group overflowed"
                 + (" (comm_dtype fp16 holds no value beyond +-65504: use bf16)"
                    if self.comm_dtype == "fp16" else ""))
        limit = self.max_skipped_steps
        if self.consecutive_skips > limit:
            raise NonFiniteError(
                f"Step {step} ({phase} phase): the gradients were non-finite (NaN or inf) "
                f"on {where}, for {self.consecutive_skips} step(s) in a row "
                f"(ab_training.max_skipped_steps={limit}). The parameters and optimizer state "
                f"are those of step {step - self.consecutive_skips + 1}, before the first "
                f"skipped step. Lower the learning rate, clip gradients (max_grad_norm), or "
                f"check the data; raise max_skipped_steps to tolerate longer runs of skips.")
        if log:
            logger.warning(
                "step %d (%s phase) skipped on every rank: non-finite gradients on %s "
                "(%d skipped so far, %d in a row; max_skipped_steps=%d)", step, phase,
                where, self.skipped_steps, self.consecutive_skips, limit)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


__all__ = ["NonFiniteError", "NonFiniteGuard", "check_finite", "ranks_with"]
