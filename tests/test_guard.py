"""ab_accel.guard: a non-finite step is skipped on every rank alike and too many in a row stop
training; a switch over non-finite parameters is refused (real gloo processes).
"""

from __future__ import annotations

from typing import Any

import torch

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
)

from distributed import run_distributed
from scenarios import flat_named, flat_state, loss_of, same_tensors, small_cnn


def nonfinite_steps(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 (a B-group rank) makes NaN gradients at a warm-up step and at an AB step, then
    keeps making them until the consecutive-skip limit stops the run; and a switch on NaN
    parameters is refused before anything is averaged."""
    from ab_accel.optimizer import NonFiniteError

    cfg = ABConfig(warmup_steps=2, sync_every=6, rebound_steps=1, rank_cutoff=0.5,
                   max_skipped_steps=2)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)
    poison = {0, 3, 5, 6, 7}  # warm-up step 0; AB step 3; then 5, 6, 7 in a row
    out: dict[str, Any] = {"steps": [], "error": None}
    for t in range(9):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        state_before = {k: v.clone() for k, v in flat_state(opt).items()}
        loss = loss_of(model, rank, t)
        if rank == 2 and t in poison:
            loss = loss * float("nan")
        loss.backward()
        phase = opt.phase
        try:
            opt.step()
        except NonFiniteError as exc:
            out["error"] = {"step": t, "message": str(exc)}
            break
        opt.zero_grad()
        after = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = [b.clone() for b in model.buffers() if b.is_floating_point()]
        out["steps"].append({
            "t": t, "phase": str(phase), "skipped_steps": opt.skipped_steps,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "state_unchanged": same_tensors(flat_state(opt), state_before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "buffers": torch.cat([b.reshape(-1) for b in buffers]),
            "step_count": opt.step_count})
    # A sync on NaN parameters: refused on every rank, nothing sent to the other ranks.
    cfg2 = ABConfig(warmup_steps=1, sync_every=3, rebound_steps=1, rank_cutoff=0.5)
    torch.manual_seed(0)
    model2 = convert(small_cnn(), cfg2)
    opt2 = ABOptimizer(torch.optim.SGD(model2.parameters(), lr=0.01), model2, cfg2)
    # warm-up step 0 (factorize after it), AB steps 1 and 2, sync after step 2
    for t in range(3):
        loss_of(model2, rank, t).backward()
        try:
            opt2.step()  # step 2: rank 1's NaN gradients are skipped, then the sync refuses
        except NonFiniteError as exc:
            out["switch_error"] = str(exc)
            out["others_finite"] = all(bool(torch.isfinite(v).all())
                                       for v in flat_named(model2).values())
            break
        opt2.zero_grad()
        if t == 1 and rank == 1:  # an update that overflowed, on one rank
            with torch.no_grad():
                next(iter(model2.parameters())).fill_(float("inf"))
    return out


def test_a_nonfinite_step_is_skipped_on_every_rank_and_too_many_stop_training():
    results = run_distributed(nonfinite_steps, 4)
    for rank, res in enumerate(results):
        steps = {s["t"]: s for s in res["steps"]}
        # step 0 (warm-up) and step 3 (AB phase: rank 2 is in the B-group, yet the A-group
        # ranks skip too) are skipped everywhere, with parameters and optimizer state untouched
        for t in (0, 3, 5):  # (after step 6 the scheduled sync changes the model anyway)
            assert steps[t]["unchanged"] and steps[t]["state_unchanged"], (rank, t)
        for t in (1, 2, 4):
            assert not steps[t]["unchanged"], (rank, t)
        assert [steps[t]["skipped_steps"] for t in range(7)] == [1, 1, 1, 2, 2, 3, 4]
        assert steps[3]["phase"] == "ab" and steps[0]["phase"] == "warmup"
        assert all(s["finite"] for s in res["steps"])
        # buffers stay finite and identical inside the scope even on skipped steps
        assert all(bool(torch.isfinite(s["buffers"]).all()) for s in res["steps"])
        group = [0, 1] if rank < 2 else [2, 3]
        for t in (0, 3):
            assert torch.equal(steps[t]["buffers"], {s["t"]: s for s in results[group[0]][
                "steps"]}[t]["buffers"]), (rank, t)
        assert steps[6]["step_count"] == 7  # a skipped step still counts: the schedule holds
        # the third NaN step in a row (max_skipped_steps=2) stops every rank, naming rank 2
        assert res["error"]["step"] == 7
        msg = res["error"]["message"]
        assert "Step 7 (rebound phase)" in msg and "rank(s) [2]" in msg
        assert "3 step(s) in a row" in msg
        assert "max_skipped_steps=2" in msg
        # a switch on non-finite parameters is refused on every rank before anything is sent
        assert "Refusing to sync at step 3" in res["switch_error"]
        assert "rank(s) [1]" in res["switch_error"]
        if rank != 1:
            assert res["others_finite"]
