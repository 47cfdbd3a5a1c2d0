"""ab_accel.checkpoint: one shard per group, atomic, checked on every rank before anything loads;
a resume mid-AB-phase continues exactly (real gloo processes).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
    load_checkpoint,
    save_checkpoint,
)

from distributed import run_distributed
from scenarios import flat_named, loss_of, same_tensors, small_cnn


def resume(rank: int, world: int, stop_at: int, total: int, mode: str) -> dict[str, Any]:
    """Uninterrupted run vs. a run checkpointed at ``stop_at`` (mid-AB-phase) and resumed in
    fresh objects; returns both final states."""
    cfg = ABConfig(warmup_steps=2, sync_every=6, rebound_steps=1, lr_rebound_steps=2,
                   rank_cutoff=0.5, sync_mode=mode)

    def fresh() -> tuple[nn.Module, ABOptimizer]:
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        return model, ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, cfg)

    def train(model, opt, start, end):
        for t in range(start, end):
            loss_of(model, rank, t).backward()
            opt.step()
            opt.zero_grad()

    model, opt = fresh()
    train(model, opt, 0, total)
    straight = flat_named(model)

    model, opt = fresh()
    train(model, opt, 0, stop_at)
    phase_at_stop, role_at_stop = opt.phase, opt.role
    shared = os.environ.get("AB_TEST_CKPT")
    if rank == 0:
        path = tempfile.mkdtemp(prefix="ab_ckpt_")
        obj = [path]
    else:
        obj = [None]
    dist.broadcast_object_list(obj, src=0)
    path = shared or obj[0]
    save_checkpoint(path, model, opt)
    del model, opt
    model, opt = fresh()  # a new process would start here: dense model, step 0
    load_checkpoint(path, model, opt)
    resumed_step = opt.step_count
    train(model, opt, resumed_step, total)
    return {"straight": straight, "resumed": flat_named(model), "phase_at_stop": phase_at_stop,
            "role_at_stop": role_at_stop, "resumed_step": resumed_step}


def checkpoint_faults(rank: int, world: int) -> dict[str, Any]:
    """A mid-AB-phase checkpoint, then: a truncated shard, a missing shard, a save that died
    half-way, a changed schedule (refused, then accepted with the flag), an overwrite."""
    from ab_accel.checkpoint import CheckpointError, is_complete

    cfg = ABConfig(warmup_steps=1, sync_every=6, rebound_steps=1, rank_cutoff=0.5)

    def fresh(config: ABConfig = cfg) -> tuple[nn.Module, ABOptimizer]:
        torch.manual_seed(0)
        model = convert(small_cnn(), config)
        return model, ABOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, config)

    model, opt = fresh()
    for t in range(3):
        loss_of(model, rank, t).backward()
        opt.step()
        opt.zero_grad()
    obj = [tempfile.mkdtemp(prefix="ab_faults_") if rank == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    root = obj[0]
    path = os.path.join(root, "ckpt")
    save_checkpoint(path, model, opt)
    out: dict[str, Any] = {"complete": is_complete(path), "files": sorted(os.listdir(path)),
                           "leftovers": sorted(os.listdir(root))}
    dist.barrier()
    save_checkpoint(path, model, opt)  # overwriting a checkpoint leaves one whole folder
    out["leftovers_after_overwrite"] = sorted(os.listdir(root))

    def attempt(config: ABConfig = cfg) -> dict[str, Any]:
        m, o = fresh(config)
        before = flat_named(m)
        try:
            load_checkpoint(path, m, o)
            return {"error": None, "step": o.step_count}
        except CheckpointError as exc:
            return {"error": str(exc), "untouched": same_tensors(flat_named(m), before),
                    "step": o.step_count}

    shard1 = os.path.join(path, "ab_group1.pt")
    data = open(shard1, "rb").read()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:
            fh.write(data[:-100])
    dist.barrier()
    out["truncated"] = attempt()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:  # same size, one byte flipped
            fh.write(data[:-1] + bytes([data[-1] ^ 1]))
    dist.barrier()
    out["corrupt"] = attempt()
    dist.barrier()
    if rank == 0:
        os.remove(shard1)
    dist.barrier()
    out["missing"] = attempt()
    dist.barrier()
    if rank == 0:
        with open(shard1, "wb") as fh:
            fh.write(data)
    dist.barrier()
    out["changed"] = attempt(ABConfig(warmup_steps=1, sync_every=8, rebound_steps=1,
                                      rank_cutoff=0.5))
    out["accepted"] = attempt(ABConfig(warmup_steps=1, sync_every=8, rebound_steps=1,
                                       rank_cutoff=0.5, accept_resume_changes=True))
    out["intact"] = attempt()
    dist.barrier()
    if rank == 0:  # a save that died before its manifest: only the .tmp folder exists
        os.rename(path, path + ".tmp")
        os.remove(os.path.join(path + ".tmp", "ab_meta.json"))
    dist.barrier()
    out["unfinished"] = attempt()
    return out


@pytest.mark.parametrize("mode", ["with-stale", "only-learned"])
def test_resume_mid_ab_phase_continues_exactly(mode):
    results = run_distributed(resume, 4, 5, 12, mode)
    for rank, res in enumerate(results):
        assert res["phase_at_stop"] == "ab"
        assert res["role_at_stop"] == ("A" if rank < 2 else "B")
        assert res["resumed_step"] == 5
        for k, v in res["straight"].items():
            assert torch.equal(v, res["resumed"][k]), f"rank {rank}: {k} differs after resume"


def test_checkpoints_are_atomic_and_a_bad_one_is_refused_before_anything_loads():
    results = run_distributed(checkpoint_faults, 4)
    for res in results:
        assert res["complete"] and res["files"] == ["ab_group0.pt", "ab_group1.pt",
                                                    "ab_meta.json"]
        assert res["leftovers"] == res["leftovers_after_overwrite"] == ["ckpt"]
        # every rank refuses together (ranks 0 and 1 read a healthy shard 0), model untouched
        for case, words in (("truncated", "truncated"), ("missing", "is missing"),
                            ("corrupt", "checksum")):
            err = res[case]["error"]
            assert err is not None and res[case]["untouched"] and res[case]["step"] == 0, case
            assert ("ab_group1.pt" in err and words in err) or "Rank(s) [2, 3]" in err, err
        assert "sync_every: 6 -> 8" in res["changed"]["error"]
        assert "accept_resume_changes" in res["changed"]["error"]
        assert res["accepted"]["error"] is None and res["accepted"]["step"] == 3
        assert res["intact"]["error"] is None and res["intact"]["step"] == 3
        assert "not a complete AB checkpoint" in res["unfinished"]["error"]
        assert "did not finish" in res["unfinished"]["error"]
    # the ranks that read the damaged shard name it
    for rank in (2, 3):
        assert "ab_group1.pt" in results[rank]["truncated"]["error"]


# ---------------------------------------------------------------------- one process
def test_a_checkpoint_round_trips_and_the_latest_whole_one_is_found(tmp_path):
    from ab_accel import latest_checkpoint
    from ab_accel.checkpoint import is_complete

    cfg = ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1, rank_cutoff=0.5)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, cfg)
    for t in range(3):
        loss_of(model, 0, t).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path / "step_3", model, opt)
    (tmp_path / "step_9.tmp").mkdir()  # a save that did not finish: passed over
    assert is_complete(tmp_path / "step_3")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_3")
    torch.manual_seed(1)
    model2 = convert(small_cnn(), cfg)
    opt2 = ABOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-3), model2, cfg)
    load_checkpoint(tmp_path / "step_3", model2, opt2)
    assert opt2.step_count == 3 and same_tensors(flat_named(model2), flat_named(model))


def test_a_folder_without_shards_is_refused_naming_the_manifest(tmp_path):
    from ab_accel.checkpoint import META, CheckpointError

    cfg = ABConfig(warmup_steps=1, sync_every=4, rebound_steps=1)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    with pytest.raises(CheckpointError, match=META):
        load_checkpoint(tmp_path / "nothing_here", model, opt)
