"""ABOptimizer in a single process: phases, the LR rebound, state resets and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ab_accel import ABConfig, ABOptimizer, convert
from ab_accel.layers import factored_state_dict
from ab_accel.model import ab_layers


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(model, opt, start, end, sched=None):
    losses = []
    for t in range(start, end):
        x, y = data(t)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


CFG = dict(warmup_steps=2, sync_every=5, rebound_steps=1, lr_rebound_steps=2, rank_cutoff=0.3)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
], ids=["adamw", "sgd-momentum"])
def test_single_process_runs_every_phase_without_communication(make_opt):
    model = convert(mlp(), ABConfig(**CFG))
    opt = ABOptimizer(make_opt(model.parameters()), model, ABConfig(**CFG))
    seen = []
    for t in range(12):
        seen.append((opt.phase, opt.role))
        train(model, opt, t, t + 1)
    assert seen[:2] == [("warmup", None)] * 2
    assert seen[2:6] == [("ab", "AB")] * 4      # one process trains both factors
    assert seen[6] == ("rebound", None)
    assert opt.traffic.summary()["bytes"] == 0
    assert opt.traffic.summary()["steps"] == 12
    assert opt.step_count == 12


def test_lr_rebound_scales_the_update_and_leaves_the_scheduler_alone():
    model = convert(mlp(), ABConfig(**CFG))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ABOptimizer(inner, model, ABConfig(**CFG))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    head = model[6]  # dense: its update shows the learning rate actually used
    for t in range(8):
        scheduled = inner.param_groups[0]["lr"]
        factor = opt.lr_factor
        before = head.weight.detach().clone()
        x, y = data(t)
        nn.functional.cross_entropy(model(x), y).backward()
        grad = head.weight.grad.clone()
        opt.step()
        assert torch.allclose(head.weight, before - scheduled * factor * grad, atol=1e-7)
        assert inner.param_groups[0]["lr"] == scheduled  # restored for the scheduler
        sched.step()
        opt.zero_grad()
        assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (t + 1))
    assert opt.schedule.lr_factor(2) == pytest.approx(1 / 3)


def test_recreated_tensors_start_with_fresh_state_and_dense_state_survives():
    model = convert(mlp(), ABConfig(**CFG))
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, ABConfig(**CFG))
    train(model, opt, 0, 1)
    layer = model[2]
    old_weight = layer.weight
    assert old_weight in opt.state
    bias_state = opt.state[layer.bias]["exp_avg"].clone()
    train(model, opt, 1, 2)  # the factorize switch runs at the end of this step
    assert layer.mode == "ab"
    assert old_weight not in opt.state                       # released with its state
    assert layer.A not in opt.state and layer.B not in opt.state
    assert not torch.equal(opt.state[layer.bias]["exp_avg"], bias_state)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(layer.A) in params and id(layer.B) in params and id(old_weight) not in params


def test_state_dict_round_trip_continues_identically():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
    train(model, opt, 0, 4)  # mid-AB-phase
    with factored_state_dict():  # the exact-resume format (the factors themselves)
        state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, 4, 11)
    with factored_state_dict():
        expected = copy.deepcopy(model.state_dict())

    model2 = convert(mlp(), cfg)
    opt2 = ABOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model2, cfg)
    model2.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    assert opt2.step_count == 4 and opt2.phase == "ab"
    assert opt2.traffic.summary()["steps"] == 4
    train(model2, opt2, 4, 11)
    with factored_state_dict():
        got = model2.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_optimizer_state_before_model_state_is_refused():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
    train(model, opt, 0, 3)
    saved = opt.state_dict()
    model2 = convert(mlp(), cfg)
    opt2 = ABOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model2, cfg)
    with pytest.raises(ValueError, match="load the model's state_dict before the optimizer's"):
        opt2.load_state_dict(saved)


def test_model_without_ab_layers_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="call ab_accel.convert"):
        ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ABConfig(**CFG))


def test_synchronize_then_clip_then_step_reduces_once():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    x, y = data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    norm = opt.clip_grad_norm_(1e-3)
    assert norm > 1e-3
    total = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert total == pytest.approx(1e-3, rel=1e-4)
    opt.step()


def test_warmup_zero_factorizes_at_bind():
    cfg = ABConfig(warmup_steps=0, sync_every=4, rebound_steps=1, rank_cutoff=0.3)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    assert opt.phase == "ab"
    assert all(layer.mode == "ab" for _, layer in ab_layers(model))


def test_lr_scheduler_accepts_the_ab_optimizer():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    train(model, opt, 0, 10, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_disabled_config_is_plain_data_parallel_forever():
    cfg = ABConfig(enabled=False, **CFG)
    model = mlp()
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    train(model, opt, 0, 12)
    assert opt.phase == "warmup" and opt.role is None
    assert opt.traffic.summary()["steps_by_phase"] == {"warmup": 12}


def test_unbound_optimizer_round_trips_its_state():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), None, cfg)
    opt.load_state_dict(opt.state_dict())  # what Accelerate does before we bind
    opt.bind(model)
    train(model, opt, 0, 4)
    assert opt.phase == "ab"


def test_switch_time_is_recorded_by_event():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    train(model, opt, 0, 8)  # factorize at 2, sync at 6, factorize at 7
    assert set(opt.switch_seconds) == {"factorize", "sync"}
    assert all(v > 0 for v in opt.switch_seconds.values())
    assert 0 < opt.svd_seconds <= opt.switch_seconds["factorize"]
    assert opt.last_switch.event == "factorize" and opt.last_switch.step == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_sees_every_nan_and_inf_and_no_large_finite_values(dtype):
    """The step's finiteness check reads sums: each NaN, +inf, -inf, and +inf beside -inf (whose
    sum is NaN) is seen in any position; finite values whose sum exceeds fp16's range are not
    flagged (half tensors are summed in float32)."""
    from ab_accel.comm import nonfinite

    cpu = torch.device("cpu")
    big = torch.full((4096,), 6e4, dtype=dtype)  # finite in fp16; their sum (2.5e8) is not
    clean = [torch.randn(7, 5).to(dtype), big, torch.zeros(3, dtype=dtype)]
    assert not bool(nonfinite(clean, cpu)) and not bool(nonfinite([], cpu))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in range(len(clean)):
            tensors = [t.clone() for t in clean]
            tensors[where].view(-1)[-1] = bad
            assert bool(nonfinite(tensors, cpu)), (bad, where)
    both = torch.zeros(4, dtype=dtype)
    both[0], both[3] = float("inf"), float("-inf")
    assert bool(nonfinite([both], cpu))
