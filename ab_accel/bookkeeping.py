"""What the ABOptimizer keeps across a resume and what it tells: its checkpoint state
(``state_dict`` / ``load_state_dict``: the wrapped optimizer's state plus the AB bookkeeping,
with the refusals of a checkpoint that cannot continue this run) and its :meth:`report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import compression
from .switches import Switch
from .vocab import Event, Role

if TYPE_CHECKING:
    from .optimizer import ABOptimizer


def state_dict(opt: ABOptimizer) -> dict[str, Any]:
    """:meth:`ABOptimizer.state_dict`."""
    return {
        # under ZeRO, DeepSpeed's own checkpoint files hold the (partitioned) optimizer state
        "optimizer": None if opt.external is not None else opt.optimizer.state_dict(),
        "ab": {
            "step": opt._step,
            "ranks": opt.ranks,
            "config": opt.config.to_dict(),
            "traffic": opt.traffic.state_dict(),
            "world_size": opt.world_size,
            "group_index": opt.groups.group_index if opt.groups else 0,
            "switches": [sw.to_dict() for sw in opt.switches],
            "groups_differ": opt.groups_differ,
            **opt.guard.state_dict(),
        },
    }


def load_state_dict(opt: ABOptimizer, state_dict: dict[str, Any]) -> None:
    """:meth:`ABOptimizer.load_state_dict`: refuse another world size (unless allowed) or
    layer ranks the model does not have, then restore the step, the meter, the switches and
    the skip counters, and the wrapped optimizer's state."""
    if "ab" not in state_dict:  # a plain optimizer state: no AB bookkeeping to restore
        opt.optimizer.load_state_dict(state_dict)
        return
    ab = state_dict["ab"]
    if opt.model is None:
        # Not bound yet (e.g. Accelerate moving optimizer state to the device during
        # prepare): the parameter lists are the constructor's, restore as they are.
        opt._step = int(ab["step"])
        opt.traffic.load_state_dict(ab["traffic"])
        _load_counters(opt, ab)
        if state_dict["optimizer"] is not None:
            opt.optimizer.load_state_dict(state_dict["optimizer"])
        return
    same_model = not ab.get("groups_differ", True)
    if (opt.groups is not None and ab["world_size"] != opt.world_size
            and not (opt.config.accept_resume_changes and same_model)):
        raise ValueError(
            f"This AB checkpoint was written by {ab['world_size']} ranks and is loaded by "
            f"{opt.world_size}: AB groups hold different states, so resume with the same "
            f"number of processes (or merge() the model and start a new run)."
        )
    saved_ranks = ab["ranks"]
    for name, layer in opt._layers:
        if saved_ranks.get(name) != layer.rank:
            raise ValueError(
                f"Layer {name!r} has rank {layer.rank} but the optimizer checkpoint expects "
                f"{saved_ranks.get(name)}: load the model's state_dict before the "
                f"optimizer's."
            )
    opt._step = int(ab["step"])
    opt.traffic.load_state_dict(ab["traffic"])
    _load_counters(opt, ab)
    opt._refresh()
    opt._apply_roles()
    if state_dict["optimizer"] is not None:
        if opt.external is not None:
            raise ValueError("This checkpoint holds a stage-0 optimizer state and the engine runs "
                             "ZeRO: resume with the ZeRO stage the checkpoint was written with.")
        opt.optimizer.load_state_dict(state_dict["optimizer"])
    elif opt.external is None:
        raise ValueError("This checkpoint was written under DeepSpeed ZeRO (its optimizer state "
                         "is in DeepSpeed's ZeRO files): resume it with the same ZeRO stage.")
    opt._reduced = False


def _load_counters(opt: ABOptimizer, ab: dict[str, Any]) -> None:
    opt.switches = [Switch.from_dict(sw) for sw in ab.get("switches", [])]
    opt.guard.load_state_dict(ab)


def report(opt: ABOptimizer) -> dict[str, Any]:
    """:meth:`ABOptimizer.report`."""
    switches = [w.to_dict() for w in opt.switches]
    facts = [w for w in switches if w["event"] == str(Event.FACTORIZE)]
    last = facts[-1]["compression"] if facts else {}
    when = "" if not facts else "at the end of the run" if facts[-1]["step"] >= \
        opt._step else f"at step {facts[-1]['step']}"
    plan = opt.groups.plan if opt.groups is not None else None
    return {
        "config": opt.config.to_dict(),
        "group_size": plan.group_size if plan else 1,
        "groups": [list(g) for g in plan.groups] if plan else [[0]],
        "roles": [str(r) for r in plan.roles] if plan else [str(Role.AB)],
        "phases": [(str(p), a, b) for p, a, b in opt.schedule.describe(opt._step)],
        "switches": switches,
        "sync_steps": [w["step"] for w in switches if w["event"] == str(Event.SYNC)],
        "layer_ranks": opt.ranks,
        "compression": {
            "ratio": last.get("ratio", 1.0),
            "factorized_ratio": last.get("factorized_ratio", 1.0),
            "params_dense": last.get("params_dense"), "params_ab": last.get("params_now"),
            "of": f"parameter count, dense / AB, of the last factorization ({when}), from "
                  f"ABOptimizer.switches" if facts else "no factorization happened",
            "ratio_now": compression(opt.model)["ratio"] if opt.model is not None
            else 1.0},
        "skipped_steps": opt.skipped_steps,
        "traffic": opt.traffic.summary(),
        **({"zero": {"rebuilds": opt.external.rebuilds,
                     "rebuild_seconds": round(opt.external.rebuild_seconds, 4),
                     "what": "DeepSpeed's ZeRO optimizer rebuilt over each phase's scope, "
                             "wall seconds on this rank (reading and writing the fp32 state "
                             "included)"}} if opt.external is not None else {}),
    }


__all__ = ["state_dict", "load_state_dict", "report"]
