"""ab_accel.patches: every framework patch refuses loudly when the framework no longer has what
it replaces, keeps the patched object's identity, and patches one object only."""

from __future__ import annotations

import types

import pytest
import torch

from ab_accel import patches
from ab_accel.support import UnsupportedSetupError


def test_a_patch_whose_target_is_gone_is_refused_naming_the_installed_version():
    with pytest.raises(UnsupportedSetupError, match=r"torch \S+ has no object\.gone.*2\.x"):
        patches.require(object(), "gone", "torch", "test the guard")


class _Wrapper:
    def __init__(self) -> None:
        self.loaded = 0

    def load_state_dict(self, state: dict) -> None:
        self.loaded += 1


class _View:
    @property
    def extra(self) -> str:
        return "view"

    def load_state_dict(self, state: dict) -> None:
        if patches.take_skip_next_load(self):
            return
        super().load_state_dict(state)  # type: ignore[misc]


def test_a_view_class_keeps_the_objects_identity_and_skips_one_load_when_asked():
    a, b = _Wrapper(), _Wrapper()
    patches.add_view_class(a, _View)
    patches.add_view_class(b, _View)
    assert type(a) is type(b) and isinstance(a, _Wrapper) and a.extra == "view"
    patches.skip_next_optimizer_load(a)
    a.load_state_dict({})
    a.load_state_dict({})
    assert a.loaded == 1 and type(_Wrapper()) is _Wrapper  # the class itself untouched


def test_clipping_reduces_first_on_a_boundary_only_and_on_this_accelerator_only():
    seen: list[tuple[str, int]] = []

    class Acc:
        sync_gradients = True

        def clip_grad_norm_(self, parameters, max_norm):
            seen.append(("clip", len(parameters)))

        def clip_grad_value_(self, parameters, value):
            seen.append(("clip_value", len(parameters)))

    acc, other = Acc(), Acc()
    patches.clip_reduces_first(acc, lambda params: seen.append(("reduce", len(params))))
    patches.clip_reduces_first(acc, lambda params: seen.append(("twice", 0)))  # once only
    acc.clip_grad_norm_((torch.zeros(1) for _ in range(3)), 1.0)  # a generator, read once
    acc.sync_gradients = False
    acc.clip_grad_value_([torch.zeros(1)], 1.0)
    other.clip_grad_norm_([torch.zeros(1)], 1.0)
    assert seen == [("reduce", 3), ("clip", 3), ("clip_value", 1), ("clip", 1)]


def test_engine_methods_are_replaced_on_one_engine_with_the_originals_kept():
    class Engine:
        def allreduce_gradients(self, bucket_size=None):
            return "deepspeed"

    engine, other = Engine(), Engine()
    ab = types.SimpleNamespace()
    patches.deepspeed_engine_methods(engine, ab, allreduce_gradients=lambda self, b=None: "ab")
    assert engine.allreduce_gradients() == "ab" and engine.ab_optimizer is ab
    assert engine._ab_original_allreduce_gradients() == "deepspeed"
    assert other.allreduce_gradients() == "deepspeed"
    with pytest.raises(ValueError, match="not a patched"):
        patches.deepspeed_engine_methods(engine, ab, step=lambda self: None)


def test_zero_internals_are_guarded_before_anything_is_rebuilt():
    """An engine whose ZeRO optimizer lacks what ab_accel.zero rebuilds is refused by name."""
    engine = types.SimpleNamespace(**dict.fromkeys(patches.ZERO_ENGINE))
    engine.optimizer = types.SimpleNamespace(**dict.fromkeys(patches.ZERO_OPTIMIZER[1:]))
    with pytest.raises(UnsupportedSetupError,
                       match=r"deepspeed \S+ has no SimpleNamespace\.bit16_groups.*rebuild ZeRO"):
        patches.require_zero_internals(engine)
    engine.optimizer.bit16_groups = []
    patches.require_zero_internals(engine)


def test_a_rebuilt_zero_optimizer_steps_inside_the_rebound_and_asks_the_world():
    calls: list[str] = []

    class _Zero:
        check_grad_overflow = False

        def step(self) -> str:
            calls.append("step")
            return "stepped"

    zero, ab = _Zero(), object()

    def around(step):  # the LR rebound's place
        calls.append("before")
        out = step()
        calls.append("after")
        return out

    patches.zero_optimizer_methods(zero, ab, lambda self, partition_gradients=True: True, around)
    assert zero.step() == "stepped" and calls == ["before", "step", "after"]
    assert zero.check_grad_overflow and zero.has_overflow() is True and zero.ab_optimizer is ab
    assert not hasattr(_Zero(), "ab_optimizer")  # one object only
