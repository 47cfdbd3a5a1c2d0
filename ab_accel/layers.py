"""The AB layer of each factorizable module type, and :func:`wrap`, which picks it.

``ABLinear`` (nn.Linear), ``ABConv2d`` (nn.Conv2d with groups=1; W viewed as out x in*kh*kw, the
AB forward a kh x kw conv to r channels and then a 1 x 1 conv) and ``ABConv1D`` (transformers'
Conv1D, W viewed transposed) each supply the matrix view of their weight and their dense and
factored forwards; everything else (the two modes, the factorization, the frozen residual, the
state dicts) is the shared :class:`~ab_accel.layer_base.ABLayer` (see :mod:`ab_accel.layer_base`),
and the SVD split and the rank cut are :mod:`ab_accel.svd`. Both are re-exported here, so
``from ab_accel.layers import ABLayer, cut_rank, ...`` keeps working.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer_base import ABLayer, factored_state_dict
from .svd import break_even_rank, cut_rank, svd_split

__all__ = [
    "ABConv1D", "ABConv2d", "ABLayer", "ABLinear", "break_even_rank", "cut_rank",
    "dense_numel_of", "factored_state_dict", "is_factorizable", "is_transformers_conv1d",
    "svd_split", "wrap",
]


class ABLinear(ABLayer):
    """nn.Linear with an AB mode: y = x B^T A^T + bias."""

    dense_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, weight: nn.Parameter,
                 bias: nn.Parameter | None) -> None:
        super().__init__(weight, bias, out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_module(cls, module: nn.Linear) -> ABLinear:
        return cls(module.in_features, module.out_features, module.weight, module.bias)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    def _positions(self, x: torch.Tensor) -> int:
        return max(1, x.numel() // self.in_features)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def _factored_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias if bias else None)

    def to_dense_module(self) -> nn.Linear:
        w = self.matrix()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class ABConv2d(ABLayer):
    """nn.Conv2d (groups=1) with an AB mode: a kh x kw conv to r channels (B), then 1 x 1 (A)."""

    dense_type = nn.Conv2d

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.groups != 1:
            raise ValueError(
                f"ABConv2d supports groups=1 only (got groups={conv.groups}); grouped and "
                f"depthwise convs stay dense. Leave the layer out of target_modules."
            )
        out_c, in_c, kh, kw = conv.weight.shape
        super().__init__(conv.weight, conv.bias, out_c, in_c * kh * kw)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = 1
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> ABConv2d:
        return cls(module)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_dim, self.in_dim)

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.weight_shape)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def _positions(self, x: torch.Tensor) -> int:
        batch = x.shape[0] if x.dim() == 4 else 1
        h, w = x.shape[-2:]
        pads = self.padding if isinstance(self.padding, tuple) else (0, 0)
        if self.padding == "same":
            return batch * h * w
        sizes = []
        for size, k, s, d, p in zip((h, w), self.kernel_size, self.stride, self.dilation, pads,
                                    strict=True):
            sizes.append(max(1, (size + 2 * p - d * (k - 1) - 1) // s + 1))
        return batch * sizes[0] * sizes[1]

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation)

    def _factored_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        x, padding = self._pad(x)
        r = self.rank
        b = self.B.reshape(r, self.in_channels, *self.kernel_size)
        h = F.conv2d(x, b, None, self.stride, padding, self.dilation)
        a = self.A.reshape(self.out_channels, r, 1, 1)
        return F.conv2d(h, a, self.bias if bias else None)

    def to_dense_module(self) -> nn.Conv2d:
        w = self.matrix()
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, groups=1, bias=self.bias is not None,
                        padding_mode=self.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.reshape(self.weight_shape))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class ABConv1D(ABLayer):
    """transformers' Conv1D (GPT-2): y = x W + bias with W of shape (in, out).

    The matrix view is W^T (out x in), so A is out x r and B is r x in as for every layer.
    """

    def __init__(self, module: nn.Module) -> None:
        nx, nf = module.weight.shape
        super().__init__(module.weight, module.bias, nf, nx)
        self.nf, self.nx = nf, nx

    @classmethod
    def from_module(cls, module: nn.Module) -> ABConv1D:
        return cls(module)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()

    def _positions(self, x: torch.Tensor) -> int:
        return max(1, x.numel() // self.nx)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.nf,)
        out = x.reshape(-1, self.nx) @ weight
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(shape)

    def _factored_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias if bias else None)

    def to_dense_module(self) -> nn.Module:
        from transformers.pytorch_utils import Conv1D  # lazy: transformers is optional

        w = self.matrix()
        out = Conv1D(self.nf, self.nx)
        out.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.t())
            if self.bias is not None:
                out.bias.copy_(self.bias)
            else:
                out.bias = None
        return out


def is_transformers_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D, without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def wrap(module: nn.Module) -> ABLayer | None:
    """The AB layer for ``module``, or None when the module type cannot be factorized."""
    if isinstance(module, ABLayer):
        return module
    if isinstance(module, nn.Linear):
        return ABLinear.from_module(module)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return ABConv2d.from_module(module)
    if is_transformers_conv1d(module):
        return ABConv1D.from_module(module)
    return None


def is_factorizable(module: nn.Module) -> bool:
    if isinstance(module, ABLayer):
        return True
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return is_transformers_conv1d(module)


def dense_numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
