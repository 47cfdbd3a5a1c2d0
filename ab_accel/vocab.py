"""The words of AB-training (arXiv 2405.01067), each defined once.

String enums: every member *is* its string (``Phase.AB == "ab"``, ``json.dumps(Phase.AB) ==
'"ab"'``, ``f"{Phase.AB}" == "ab"``), so values read from a checkpoint, a log or a user's
comparison with a literal keep working, while the code names each word in one place.

* :class:`Phase`: what an optimizer step does (``opt.phase`` is the phase of the NEXT step).
* :class:`Event`: what happens at a boundary between two steps.
* :class:`LayerMode`: how an AB layer holds its weight (``"full"``: W; ``"ab"``: A and B).
* :class:`Role`: which factor a rank trains in an AB phase.
* :class:`SyncMode`: how a sync reconciles the groups.
* :class:`TrafficLabel`: the labels of the traffic meter (the phases, plus ``"setup"`` for the
  start-up broadcast, ``"sync"`` for everything a switch sends, ``"check"`` for the finite-step
  flag of AB steps).
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    """A string enum whose str() and format() are the plain value on every Python >= 3.10."""

    __str__ = str.__str__
    __format__ = str.__format__

    def __repr__(self) -> str:
        return repr(self.value)


class Phase(_Word):
    """The phase of an optimizer step."""

    WARMUP = "warmup"    #: dense data parallel over the world, before the first factorization
    AB = "ab"            #: A-groups train A, B-groups train B; reduction inside the group only
    REBOUND = "rebound"  #: dense data parallel over the world, after a sync


class Event(_Word):
    """A switch that runs at the end of a step (so the next forward sees the new structure)."""

    FACTORIZE = "factorize"  #: SVD of every W, truncated at rank_cutoff: W -> (A, B)
    SYNC = "sync"            #: reconcile the groups (sync_mode), then W <- A B


class LayerMode(_Word):
    """How an AB layer holds its weight; only that mode's tensors are allocated."""

    FULL = "full"  #: the dense ``weight``
    AB = "ab"      #: the factors ``A`` (out x r) and ``B`` (r x in)


class Role(_Word):
    """Which factor a rank trains during an AB phase."""

    A = "A"    #: an A-group rank: trains A, B frozen
    B = "B"    #: a B-group rank: trains B, A frozen
    AB = "AB"  #: a single process: trains both (nobody to split the work with)


class SyncMode(_Word):
    """How the groups are reconciled at a sync (``ABConfig.sync_mode``)."""

    WITH_STALE = "with-stale"      #: world mean of A and of B, stale copies included
    ONLY_LEARNED = "only-learned"  #: A over the A-group ranks, B over the B-group ranks
    FULL = "full"                  #: world mean of the products A_i B_i
    ONLY_B = "only-b"              #: every rank trains B; world mean of B


class TrafficLabel(_Word):
    """What the traffic meter files each collective under."""

    SETUP = "setup"
    WARMUP = Phase.WARMUP.value
    AB = Phase.AB.value
    SYNC = Event.SYNC.value
    REBOUND = Phase.REBOUND.value
    #: the world-wide "is every rank's step finite" flag of an AB step (one number; in warm-up
    #: and rebound the flag rides in the gradient all-reduce and is counted there)
    CHECK = "check"


__all__ = ["Phase", "Event", "LayerMode", "Role", "SyncMode", "TrafficLabel"]
