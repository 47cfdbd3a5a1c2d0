"""ABOptimizer is a torch.optim.Optimizer like any other: step hooks, add_param_group, LR
schedulers and state_dict behave as they do on the optimizer it wraps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ab_accel import ABConfig, ABOptimizer, convert
from ab_accel.model import ab_layers

CFG = dict(warmup_steps=2, sync_every=5, rebound_steps=1, lr_rebound_steps=0, rank_cutoff=0.3)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def backward(model: nn.Module, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_constructing_leaves_the_wrapped_optimizers_groups_and_state_as_they_are():
    model = mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model, 0)
    inner.step()  # state before wrapping (e.g. loaded from a checkpoint)
    groups, state = inner.param_groups, inner.state
    moments = {id(p): s["exp_avg"].clone() for p, s in state.items()}
    opt = ABOptimizer(inner, None, ABConfig(**CFG))
    assert inner.param_groups is groups and inner.state is state
    assert opt.param_groups is groups and opt.state is state and opt.defaults is inner.defaults
    assert {id(p): s["exp_avg"] for p, s in state.items()}.keys() == moments.keys()
    assert all(torch.equal(state[p]["exp_avg"], moments[id(p)]) for p in state)


def test_step_hooks_run_in_order_around_the_wrapped_step():
    model = convert(mlp(), ABConfig(**CFG))
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ABConfig(**CFG))
    calls: list[tuple[str, int, bool]] = []
    before: list[torch.Tensor] = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        before.append(flat(model))
        calls.append(("pre", optimizer.step_count, False))

    def inner_pre(optimizer, args, kwargs):
        calls.append(("inner", opt.step_count, torch.equal(flat(model), before[-1])))

    def post(optimizer, args, kwargs):
        calls.append(("post", optimizer.step_count, torch.equal(flat(model), before[-1])))

    handles = [opt.register_step_pre_hook(pre), opt.optimizer.register_step_pre_hook(inner_pre),
               opt.register_step_post_hook(post)]
    for t in range(3):
        backward(model, t)
        opt.step()
        opt.zero_grad()
    # pre before the wrapped step (parameters not moved yet), post after the step was counted
    # and its switches ran (step 2 factorizes: the parameters changed shape, not equal)
    assert calls == [("pre", 0, False), ("inner", 0, True), ("post", 1, False),
                     ("pre", 1, False), ("inner", 1, True), ("post", 2, False),
                     ("pre", 2, False), ("inner", 2, True), ("post", 3, False)]
    for handle in handles:
        handle.remove()
    backward(model, 3)
    opt.step()
    assert len(calls) == 9


def test_a_skipped_nonfinite_step_runs_the_ab_hooks_not_the_wrapped_optimizers():
    """The skip is decided inside step(), after the reduction: the ABOptimizer's hooks run
    around every call, and a post hook tells a skipped step by ``last_step_skipped``; the
    wrapped optimizer did not step, so its own hooks do not run."""
    cfg = ABConfig(**CFG, max_skipped_steps=1)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    calls: list[tuple[str, bool]] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o.last_step_skipped)))
    opt.optimizer.register_step_pre_hook(lambda o, a, k: calls.append(("inner", False)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.last_step_skipped)))
    backward(model, 0)
    next(model.parameters()).grad[0, 0] = float("nan")
    before = flat(model)
    opt.step()
    opt.zero_grad()
    assert calls == [("pre", False), ("post", True)]
    assert torch.equal(flat(model), before) and opt.skipped_steps == 1
    backward(model, 1)
    opt.step()
    assert calls[2:] == [("pre", True), ("inner", False), ("post", False)]


def test_add_param_group_trains_the_new_group_through_the_switches():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    first, *rest = [layer for _, layer in ab_layers(model)]
    head = [p for p in model.parameters()
            if all(p is not q for q in first.factor_params())]
    opt = ABOptimizer(torch.optim.SGD(head, lr=0.1), model, cfg)
    opt.add_param_group({"params": list(first.factor_params()), "lr": 0.05})
    assert len(opt.param_groups) == 2 and opt.optimizer.param_groups[1]["lr"] == 0.05
    for t in range(4):  # factorizes at step 2: the new group follows the layer's new factors
        backward(model, t)
        before = {id(p): p.detach().clone() for p in first.factor_params()}
        opt.step()
        opt.zero_grad()
    assert first.mode == "ab"
    assert [id(p) for p in opt.param_groups[1]["params"]] == \
        [id(p) for p in first.factor_params()]
    assert all(not torch.equal(p, before[id(p)]) for p in opt.param_groups[1]["params"])


def test_an_lr_scheduler_on_the_ab_optimizer_drives_the_wrapped_learning_rate():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.4), model, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(3):
        backward(model, t)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sched.get_last_lr() == pytest.approx([0.05])


def test_state_dict_is_the_wrapped_optimizers_plus_the_ab_bookkeeping():
    cfg = ABConfig(**CFG)
    model = convert(mlp(), cfg)
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
    opt.register_step_post_hook(lambda o, a, k: None)
    for t in range(3):
        backward(model, t)
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert set(state) == {"optimizer", "ab"}
    assert state["optimizer"].keys() == opt.optimizer.state_dict().keys()
    assert state["ab"]["step"] == 3 and state["ab"]["skipped_steps"] == 0
