"""AB layers: the SVD split and rank cut, the factored forward, and the two modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ab_accel import ABConv1D, ABConv2d, ABLinear
from ab_accel.layers import break_even_rank, cut_rank, factored_state_dict, svd_split


def matrix_with_spectrum(s: list[float], m: int = 12, n: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return u @ torch.diag(torch.tensor(s)) @ v.T


def test_full_rank_split_reproduces_w_with_sqrt_sigma_on_both_sides():
    w = torch.randn(12, 9, dtype=torch.float64)
    a, b = svd_split(w, 9)
    assert a.shape == (12, 9) and b.shape == (9, 9)
    assert torch.allclose(a @ b, w, atol=1e-10)
    s = torch.linalg.svdvals(w)
    # Balanced split: A^T A = B B^T = diag(s).
    assert torch.allclose(a.T @ a, torch.diag(s), atol=1e-10)
    assert torch.allclose(b @ b.T, torch.diag(s), atol=1e-10)


def test_truncated_split_is_the_best_rank_r_approximation():
    w = matrix_with_spectrum([10.0, 5.0, 2.0, 1.0, 0.5])
    a, b = svd_split(w, 2)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(w - a @ b, ord=2)
    assert err == pytest.approx(s[2].item(), rel=1e-4)  # Eckart-Young


def test_rank_cut_keeps_values_above_tau_times_the_largest():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert cut_rank(s, 0.15, 1, 100) == 3          # 5 and 2 > 1.5; 1 and 0.5 are not
    assert cut_rank(s, 0.15, 4, 100) == 4          # at least min_rank
    assert cut_rank(s, 0.0, 1, 100) == 5
    assert cut_rank(s, 0.9, 1, 100) == 1
    assert cut_rank(s, 0.0, 1, 2) == 2             # never above the break-even cap
    assert cut_rank(torch.zeros(3), 0.15, 1, 3) == 1


def test_break_even_rank():
    assert break_even_rank(64, 64) == 32
    assert break_even_rank(16, 72) == 13
    assert 13 * (16 + 72) <= 16 * 72 < 14 * (16 + 72)


def test_linear_modes_allocate_only_their_tensors():
    layer = ABLinear.from_module(nn.Linear(20, 30))
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    layer.proposed_rank(0.0)
    layer.factorize(5)
    assert [n for n, _ in layer.named_parameters()] == ["A", "B", "bias"]
    assert layer.A.shape == (30, 5) and layer.B.shape == (5, 20)
    assert "weight" not in layer._parameters
    assert layer.numel_now == 5 * 50
    layer.to_full()
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.shape == (30, 20)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(24, 16),
    lambda: nn.Linear(24, 16, bias=False),
    lambda: nn.Conv2d(6, 10, 3),
    lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
    lambda: nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
    lambda: nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect", bias=False),
    lambda: nn.Conv2d(6, 10, 1),
], ids=["linear", "linear-nobias", "conv", "conv-stride-pad", "conv-dilation",
        "conv-reflect", "conv-1x1"])
def test_factored_forward_equals_rebuilt_weight(make):
    torch.manual_seed(0)
    dense = make().double()
    layer = (ABLinear if isinstance(dense, nn.Linear) else ABConv2d).from_module(dense)
    x = torch.randn(3, 24) if isinstance(dense, nn.Linear) else torch.randn(2, 6, 11, 13)
    x = x.double()
    full_out = layer(x)
    rank = layer.proposed_rank(0.3)
    layer.factorize(rank)
    assert layer.use_factored(layer._positions(x))
    factored = layer._factored_forward(x)
    rebuilt = layer._dense_forward(x, layer._matrix_to_weight(layer.A @ layer.B))
    assert torch.allclose(factored, rebuilt, atol=1e-10)
    assert torch.allclose(layer(x), factored)
    merged = layer.to_dense_module()
    assert type(merged) is type(dense)
    assert torch.allclose(merged(x), factored, atol=1e-10)
    # At full rank the factorization changes nothing.
    full = (ABLinear if isinstance(dense, nn.Linear) else ABConv2d).from_module(make().double())
    full.load_state_dict(dense.state_dict())
    full.factorize(min(full.out_dim, full.in_dim))
    assert torch.allclose(full(x), full_out, atol=1e-8)


def test_conv1d_from_transformers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    dense = Conv1D(18, 12).double()  # nf=18 outputs, nx=12 inputs; weight is (12, 18)
    nn.init.normal_(dense.bias)
    layer = ABConv1D.from_module(dense)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    assert torch.allclose(layer(x), dense(x))
    layer.factorize(12)
    assert layer.A.shape == (18, 12) and layer.B.shape == (12, 12)
    assert torch.allclose(layer(x), dense(x), atol=1e-10)
    layer.to_full()
    layer.factorize(layer.proposed_rank(0.5))
    merged = layer.to_dense_module()
    assert type(merged) is Conv1D
    assert torch.allclose(merged(x), layer(x), atol=1e-10)


def test_weight_reads_as_ab_in_ab_mode_with_autograd():
    layer = ABLinear.from_module(nn.Linear(8, 6))
    layer.factorize(3)
    w = layer.weight
    assert torch.allclose(w, layer.A @ layer.B)
    w.sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None


def test_orthogonalize_sets_singular_values_to_one():
    layer = ABConv2d.from_module(nn.Conv2d(4, 8, 3))
    layer.orthogonalize()
    s = torch.linalg.svdvals(layer.matrix())
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


def test_roles_freeze_the_other_factor():
    layer = ABLinear.from_module(nn.Linear(8, 6))
    layer.factorize(3)
    layer.set_role("A")
    assert layer.A.requires_grad and not layer.B.requires_grad
    layer.set_role("B")
    assert layer.B.requires_grad and not layer.A.requires_grad
    layer.set_role("AB")
    assert layer.A.requires_grad and layer.B.requires_grad


def test_state_dict_loads_across_modes():
    torch.manual_seed(0)
    src = ABLinear.from_module(nn.Linear(10, 7))
    src.factorize(4)
    dst = ABLinear.from_module(nn.Linear(10, 7))
    with factored_state_dict():
        saved = src.state_dict()
    dst.load_state_dict(saved)                        # full -> AB, rank taken from the file
    assert dst.mode == "ab" and dst.rank == 4
    assert torch.equal(dst.A, src.A) and torch.equal(dst.B, src.B)
    src.to_full()
    dst.load_state_dict(src.state_dict())             # AB -> full
    assert dst.mode == "full" and torch.equal(dst.weight, src.weight)


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=1 only"):
        ABConv2d(nn.Conv2d(4, 8, 3, groups=2))


def test_the_export_state_dict_is_the_dense_weight_under_the_original_keys():
    """What the outside world loads: plain nn.Linear keys, W = A B, whatever the mode."""
    torch.manual_seed(0)
    dense = nn.Linear(10, 7)
    keys = list(dense.state_dict())
    layer = ABLinear.from_module(dense)
    layer.factorize(3)
    exported = layer.state_dict()
    assert list(exported) == keys == ["weight", "bias"]
    assert torch.equal(exported["weight"], layer.A.detach() @ layer.B.detach())
    plain = nn.Linear(10, 7)
    plain.load_state_dict(exported)  # strict: no missing, no unexpected keys
    x = torch.randn(5, 10)
    torch.testing.assert_close(plain(x), layer(x))
    with factored_state_dict():
        assert list(layer.state_dict()) == ["A", "B", "bias"]
    assert list(layer.state_dict()) == ["weight", "bias"]  # the context ended


def test_rank_rules_for_fine_tuning():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])  # energies 16, 4, 1, 1, 0.25 (sum 22.25)
    assert cut_rank(s, 0.15, 1, 5) == 4 and cut_rank(s, 0.3, 1, 5) == 2  # s_i > tau * 4
    assert cut_rank(s, 0.15, 1, 5, energy=0.7) == 1   # 16 / 22.25 = 0.719 >= 0.7
    assert cut_rank(s, 0.15, 1, 5, energy=0.9) == 3   # 20 / 22.25 = 0.899 < 0.9 <= 0.944
    assert cut_rank(s, 0.15, 1, 5, energy=0.95) == 4  # 0.944 < 0.95 <= 0.989
    assert cut_rank(s, 0.15, 1, 5, fraction=0.5) == 3  # ceil(2.5)
    assert cut_rank(s, 0.15, 1, 3, fixed=4) == 3       # capped at the break-even rank
    assert cut_rank(s, 0.15, 2, 5, fixed=1) == 2       # and at least min_rank
