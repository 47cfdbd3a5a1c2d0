"""The AB-training phase state machine, as a pure function of the optimizer step count.

No torch, no torch.distributed (only the words of :mod:`ab_accel.vocab`): every rank evaluates
the same function of the same integer, so every rank switches at the same step without talking
to the others.

Notation (arXiv 2405.01067): W0 = warmup_steps, T = sync_every, F = rebound_steps,
R = lr_rebound_steps. ``t`` counts optimizer steps from 0.

* warm-up: t in [0, W0), plain data parallel on the dense weights;
* cycle k >= 0 starts at c = W0 + k*T: AB steps t in [c, c + T - F), rebound steps
  t in [c + T - F, c + T).

Switches happen at *boundaries*. Boundary ``b`` sits between step ``b - 1`` and step ``b``; the
optimizer runs the events of boundary ``t + 1`` at the end of step ``t`` so that the next forward
sees the new structure. Boundary 0 is the start of training (only used when W0 = 0).

* ``factorize`` at every boundary where an AB block starts (b = W0 + k*T);
* ``sync`` (reconcile the groups, then W <- A B) at every boundary where an AB block ends
  (b = W0 + k*T + T - F, k >= 0). With F = 0 that is the same boundary as the next
  ``factorize``; the events then run in the order sync, factorize.
"""

from __future__ import annotations

from dataclasses import dataclass

from .vocab import Event, Phase

#: AB cycles in a run scaled by :func:`scaled_schedule`.
SCALED_CYCLES = 4


def scaled_schedule(total_steps: int, cycles: int = SCALED_CYCLES) -> dict[str, int]:
    """The one rule that scales the AB schedule to a run of ``total_steps`` optimizer steps.

    Returns ABConfig's fields ``warmup_steps`` (W0), ``sync_every`` (T), ``rebound_steps`` (F)
    and ``lr_rebound_steps`` (R). The paper's ViT-B/16 and ResNet-50 schedules spend ~25% of a
    150-epoch run in warm-up and run cycles of ~5% of it, with a rebound of 5-14% of a cycle and
    an LR rebound of ~1/3 of a cycle. A short run is different: the model learns most of what
    it will early, and every warm-up or rebound step costs a full DP step of traffic. So:
    warm-up W0 = 10% of the run (past the fast initial phase), ``cycles`` cycles of
    T = (steps - W0) / cycles (a re-factorization every few epochs lets the rank shrink as the
    spectrum sharpens), rebound F = 5% of T (at least 2 steps), LR rebound R = 20% of T. The
    warm-up is one step longer than that so the run ends one step before the next
    factorization: the last rebound is one step shorter and every rank ends with the same
    dense weights. The recipes and the benchmarks both use this rule.

    Raises:
        ValueError: the run is too short for every cycle to hold an AB step; the message gives
            the shortest run the rule accepts.
    """
    t = max(2, (total_steps - max(1, round(0.10 * total_steps))) // cycles)
    f = max(2, round(0.05 * t))
    if total_steps < 1 or f >= t:
        shortest = next(n for n in range(1, 10_000) if max(2, (n - max(1, round(0.10 * n)))
                                                           // cycles) > 2)
        raise ValueError(
            f"a run of {total_steps} optimizer step(s) is too short for the AB schedule scaled "
            f"to the run (warm-up 10%, {cycles} cycles of AB steps plus a rebound of at least "
            f"2 steps): it needs at least {shortest} steps. Train for more steps, or set "
            f"warmup_steps, sync_every and rebound_steps yourself.")
    return {"warmup_steps": total_steps - cycles * t + 1, "sync_every": t, "rebound_steps": f,
            "lr_rebound_steps": max(1, round(0.20 * t))}


@dataclass(frozen=True)
class ABSchedule:
    """When each phase runs and what happens at each boundary."""

    warmup_steps: int
    sync_every: int
    rebound_steps: int
    lr_rebound_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.sync_every < 1 or self.lr_rebound_steps < 0:
            raise ValueError(f"invalid schedule {self}")
        if not 0 <= self.rebound_steps < self.sync_every:
            raise ValueError(
                f"rebound_steps ({self.rebound_steps}) must be in [0, sync_every="
                f"{self.sync_every})"
            )

    @classmethod
    def from_config(cls, config) -> ABSchedule:  # ABConfig, untyped to keep this module alone
        return cls(config.warmup_steps, config.sync_every, config.rebound_steps,
                   config.lr_rebound_steps)

    @property
    def ab_steps(self) -> int:
        """Length of the AB block of one cycle: T - F."""
        return self.sync_every - self.rebound_steps

    def cycle(self, t: int) -> int:
        """The AB cycle step ``t`` belongs to; -1 during warm-up."""
        self._check(t)
        if t < self.warmup_steps:
            return -1
        return (t - self.warmup_steps) // self.sync_every

    def phase(self, t: int) -> Phase:
        """Phase of step ``t``: ``"warmup"``, ``"ab"`` or ``"rebound"``."""
        self._check(t)
        if t < self.warmup_steps:
            return Phase.WARMUP
        offset = (t - self.warmup_steps) % self.sync_every
        return Phase.AB if offset < self.ab_steps else Phase.REBOUND

    def events(self, boundary: int) -> tuple[Event, ...]:
        """Switches that run at ``boundary`` (between step boundary-1 and step boundary)."""
        self._check(boundary)
        if boundary < self.warmup_steps:
            return ()
        offset = (boundary - self.warmup_steps) % self.sync_every
        out: list[Event] = []
        # An AB block ends here: the last AB step was boundary - 1.
        if boundary > self.warmup_steps and offset == self.ab_steps % self.sync_every:
            out.append(Event.SYNC)
        if offset == 0:
            out.append(Event.FACTORIZE)
        return tuple(out)

    def steps_since_switch(self, t: int) -> int | None:
        """How many steps of the current phase ran before step ``t``; None in warm-up."""
        self._check(t)
        if t < self.warmup_steps:
            return None
        offset = (t - self.warmup_steps) % self.sync_every
        return offset if offset < self.ab_steps else offset - self.ab_steps

    def lr_factor(self, t: int) -> float:
        """LR rebound multiplier for step ``t``: min(1, (k+1)/(R+1)), k = steps since switch."""
        k = self.steps_since_switch(t)
        if k is None or self.lr_rebound_steps == 0:
            return 1.0
        return min(1.0, (k + 1) / (self.lr_rebound_steps + 1))

    def next_switch(self, t: int) -> int:
        """The first boundary > t that has events."""
        b = t + 1
        while not self.events(b):
            b += 1
        return b

    def describe(self, total_steps: int) -> list[tuple[Phase, int, int]]:
        """The phases of a run of ``total_steps`` steps as (phase, first, end) spans."""
        spans: list[tuple[Phase, int, int]] = []
        for t in range(total_steps):
            p = self.phase(t)
            if spans and spans[-1][0] == p and spans[-1][2] == t:
                spans[-1] = (p, spans[-1][1], t + 1)
            else:
                spans.append((p, t, t + 1))
        return spans

    def never_ab(self, total_steps: int) -> str | None:
        """The warning for a run of ``total_steps`` steps that holds no AB step (None if it
        reaches an AB phase): what to say at its start, before the time is spent."""
        if any(p == Phase.AB for p, _, _ in self.describe(total_steps)):
            return None
        return (f"this run of {total_steps} steps never reaches an AB phase (it ends within the "
                f"ab_training warm-up): it is plain data parallel throughout, so its traffic "
                f"reduction against DP will be ~0 (slightly below: one flag per parameter each "
                f"step). Lower ab_training.warmup_steps, or train for more steps (max_steps, "
                f"epochs).")

    def summary(self, total_steps: int) -> str:
        """The phases of a run as one line: ``warmup 0-54, ab 55-98, rebound 99-109, ...``."""
        spans = self.describe(total_steps)
        return ", ".join(f"{p} {a}-{b - 1}" for p, a, b in spans[:7]) + (
            " ..." if len(spans) > 7 else "")

    @staticmethod
    def _check(t: int) -> None:
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
