"""ab_accel.reducer: the overlapped reduction equals the one after backward; narrow wire dtypes
(real gloo processes).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ab_accel import (
    ABConfig,
    ABOptimizer,
    convert,
)
from ab_accel.model import ab_layers

from distributed import run_distributed
from scenarios import CollectiveSpy, flat_named, loss_of, small_cnn


class _Branchy(nn.Module):
    """An MLP whose ``extra`` layer is used on rank 0 only, and ``never`` on no rank."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 48)
        self.hidden = nn.ModuleList(nn.Linear(48, 48) for _ in range(4))
        self.extra = nn.Linear(48, 48)
        self.never = nn.Linear(48, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        if use_extra:
            h = h + self.extra(h)
        return self.out(h)


def overlap_vs_after_backward(rank: int, world: int) -> dict[str, Any]:
    """The same steps with the reduction overlapped with backward and reduced after it, with
    gradient accumulation (2 micro-steps), a layer unused on some ranks and one unused on all,
    and small buckets (so several launch during backward); then the bf16 and fp16 wires."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(24)]
    for name, extra in (("after", {"overlap": False}), ("overlap", {"overlap": True}),
                        ("bf16", {"comm_dtype": "bf16"}), ("fp16", {"comm_dtype": "fp16"}),
                        ("fp32_after", {"overlap": False, "comm_dtype": None}),
                        ("first_small", {"first_bucket_mb": 2**-10})):
        cfg = ABConfig(warmup_steps=2, sync_every=4, rebound_steps=1, lr_rebound_steps=0,
                       rank_cutoff=0.3, bucket_mb=0.01, **extra)
        torch.manual_seed(0)
        model = convert(_Branchy(), cfg)
        opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, cfg)
        spy = CollectiveSpy()
        during_backward, micro_calls, grads, sizes, scopes = [], [], [], [], []
        for t in range(8):
            scopes.append(len(opt._scope()[1]))
            spy.sizes.clear()  # (the switches of the last step() are not this step's)
            for micro in range(2):
                x, y = data[(2 * t + micro) % len(data)]
                loss = nn.functional.cross_entropy(model(x, use_extra=rank == 0), y)
                spy.calls = 0
                with spy:
                    if micro == 0:
                        with opt.no_sync():
                            loss.backward()
                        micro_calls.append(spy.calls)
                    else:
                        loss.backward()
                        during_backward.append(spy.calls)
            with spy:
                opt.synchronize()
            sizes.append(spy.sizes[:])  # every collective of the step, in issue order
            spy.sizes.clear()
            grads.append({n: (None if p.grad is None else p.grad.clone())
                          for n, p in model.named_parameters()})
            with spy:
                opt.step()
            opt.zero_grad()
        out[name] = {"during_backward": during_backward, "micro_calls": micro_calls,
                     "scopes": scopes,
                     "grads": grads, "params": flat_named(model), "sizes": sizes,
                     "bytes": opt.traffic.summary()["bytes"],
                     "grad_bytes": opt.traffic.summary()["bytes_by_phase"]}
    return out


def wire_dtype_with_buffers(rank: int, world: int) -> dict[str, Any]:
    """Warm-up steps of small_cnn (BatchNorm: float buffers) with the fp32 and the bf16 wire:
    every collective of each step (bytes, dtype) and the buffers after the first step."""
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", None), ("bf16", "bf16")):
        cfg = ABConfig(warmup_steps=10, sync_every=4, rebound_steps=1, comm_dtype=dtype)
        torch.manual_seed(0)
        model = convert(small_cnn(), cfg)
        opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, cfg)
        spy, sizes, buffers = CollectiveSpy(), [], None
        for t in range(3):
            spy.sizes.clear()
            with spy:
                loss_of(model, rank, t).backward()
                opt.step()
            sizes.append(spy.sizes[:])
            opt.zero_grad()
            if t == 0:
                buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
        out[name] = {"sizes": sizes, "buffers": buffers}
    return out


# Four ranks' fp32 gradients summed by gloo's ring in another order (another bucket layout
# moves the chunk boundaries) may differ by a few ulps of the SUMMANDS where the ranks' terms
# cancel: 1.2e-7 was seen on 2 of 1152 entries (9.5e-5 relative, of a 1.3e-3 mean), on the
# commit before the refactor too; the absolute tolerance is a few fp32 ulps of 1.
ORDER_ATOL = 8 * torch.finfo(torch.float32).eps  # ~9.5e-7


@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_reduction_equals_the_reduction_after_backward(world):
    results = run_distributed(overlap_vs_after_backward, world)
    for rank, res in enumerate(results):
        after, over = res["after"], res["overlap"]
        # buckets went out during backward wherever the step's scope has peers (from step 1:
        # step 0 learns that the "never" layer gets no gradient, and defers its bucket); on
        # the other ranks "extra" gets no gradient, which holds its bucket (and the ones after
        # it, launched in order) until step(): the same collectives, in the same order
        if rank == 0:
            assert [n > 0 for n in over["during_backward"][1:]] == \
                [s > 1 for s in over["scopes"][1:]]
            assert any(s > 1 for s in over["scopes"])
        assert all(n == 0 for n in after["during_backward"])
        assert all(n == 0 for n in over["micro_calls"] + after["micro_calls"])  # no_sync
        assert over["bytes"] == after["bytes"]                 # the meter is unchanged
        for a, b in zip(after["grads"], over["grads"], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] is None) == (b[k] is None), k
                if a[k] is None:
                    continue
                if world == 2:  # a + b in any order: bit-identical
                    assert torch.equal(a[k], b[k]), k
                else:           # a ring's summation order follows the buffer layout
                    torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=ORDER_ATOL)
        # first_bucket_mb caps the first bucket only: the same bytes, one bucket more
        small = res["first_small"]
        for t in range(2):  # warm-up steps
            first, rest = small["sizes"][t][0][0], [b for b, _ in small["sizes"][t][1:]]
            assert first <= 1024 < over["sizes"][t][0][0]
            assert first + rest[0] == over["sizes"][t][0][0]
            assert rest[1:] == [b for b, _ in over["sizes"][t][1:]]
        for a, b in zip(over["grads"], small["grads"], strict=True):
            for k in a:
                if a[k] is not None:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=ORDER_ATOL)
        assert all(v is None for g in over["grads"] for k, v in g.items()  # unused everywhere
                   if k.startswith("never."))
        assert all(g["extra.weight"] is not None for g in over["grads"][:2])  # used on rank 0
        # every rank issued the same collectives in the same order (per scope)
        peer = 0 if rank < world // 2 else world // 2
        assert [s for s in over["sizes"]] == [s for s in results[peer]["overlap"]["sizes"]]
        for t in range(2):  # warm-up: the whole world in step
            assert over["sizes"][t] == results[0]["overlap"]["sizes"][t]


def test_a_bf16_or_fp16_wire_halves_the_gradient_bytes_and_stays_close():
    results = run_distributed(overlap_vs_after_backward, 2)
    for res in results:
        fp32 = res["overlap"]
        for name in ("bf16", "fp16"):
            low = res[name]
            wire_dtype = "torch.bfloat16" if name == "bf16" else "torch.float16"
            for t in range(8):  # the buckets go in the wire dtype, with the step's flags in
                if low["scopes"][t] == 1:  # the last one (this model has no float buffers)
                    continue  # an AB step of a 2-rank world: groups of one, nothing sent
                assert {d for _, d in low["sizes"][t]} == {wire_dtype}
                assert [b * 2 for b, _ in low["sizes"][t]] == [b for b, _ in fp32["sizes"][t]]
            tol = 1e-2 if name == "bf16" else 2e-3
            for a, b in zip(fp32["grads"][:1], low["grads"][:1], strict=True):
                for k in a:
                    if a[k] is not None:
                        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol * 1e-2)


def test_a_narrow_wire_sends_float_buffers_and_flags_in_their_own_precision():
    for res in run_distributed(wire_dtype_with_buffers, 2):
        fp32, bf16 = res["fp32"], res["bf16"]
        for t in range(3):  # warm-up steps
            # fp32: one trip, the flags and BatchNorm statistics in the last gradient bucket;
            # bf16: the gradients in bf16 (half the bytes), then the flags and statistics in fp32
            assert [d for _, d in fp32["sizes"][t]] == ["torch.float32"]
            assert [d for _, d in bf16["sizes"][t]] == ["torch.bfloat16", "torch.float32"]
            grads, tail = bf16["sizes"][t][0][0], bf16["sizes"][t][1][0]
            assert grads * 2 + tail == fp32["sizes"][t][0][0]
        for name, buf in fp32["buffers"].items():  # the statistics' mean is exact in both
            assert torch.equal(buf, bf16["buffers"][name]), name


# ---------------------------------------------------------------------- one process
def test_what_is_communicated_leaves_frozen_and_integer_tensors_out_of_the_reduction():
    from ab_accel.reducer import communicated, dp_equivalent_bytes

    cfg = ABConfig(warmup_steps=0, sync_every=4, rebound_steps=1, rank_cutoff=0.5)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    frozen = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    frozen.requires_grad_(False)
    model.register_buffer("counter", torch.zeros(2, dtype=torch.long))
    layers = [layer for _, layer in ab_layers(model)]
    factors = {id(p) for layer in layers for p in layer.factor_params()}
    comm = communicated(model, layers)
    assert all(id(p) not in factors and p.requires_grad for p in comm.dense)
    assert all(p is not frozen for p in comm.dense)
    assert all(b.is_floating_point() for b in comm.buffers)
    assert any(t is frozen.data or t.data_ptr() == frozen.data_ptr() for t in comm.replicated)
    assert len(comm.replicated) == len(list(model.parameters())) + len(comm.buffers)
    dense_bytes = sum(layer.dense_numel * 4 for layer in layers)
    assert dp_equivalent_bytes(comm, layers) == dense_bytes + sum(
        t.numel() * t.element_size() for t in comm.dense + comm.buffers)


def test_one_process_reduction_only_checks_finiteness():
    from ab_accel.reducer import StepReduction
    from ab_accel.vocab import Phase

    cfg = ABConfig(warmup_steps=4, sync_every=4, rebound_steps=1)
    torch.manual_seed(0)
    model = convert(small_cnn(), cfg)
    opt = ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg)
    reduction = opt._reduction
    assert isinstance(reduction, StepReduction)
    assert reduction.scope(Phase.WARMUP)[1] == (0,)
    loss_of(model, 0, 0).backward()
    params = opt.trained_params()
    grads = [p.grad.clone() for p in params]
    assert reduction.reduce(Phase.WARMUP, params).skip is False
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    params[0].grad[0] = float("inf")
    health = reduction.reduce(Phase.WARMUP, params)
    assert health.skip and health.nonfinite_ranks == [0]
