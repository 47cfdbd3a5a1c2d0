"""AB layers: a weight matrix held either dense (``weight``) or as low-rank factors ``A`` and ``B``.

A layer is always in one of two modes, and only that mode's tensors exist:

* ``"full"``: the parameter ``weight``, exactly the wrapped layer's (same shape, same object
  right after conversion);
* ``"ab"``: the parameters ``A`` (out x r) and ``B`` (r x in; a conv's in*kh*kw), W = A B. The
  dense weight and its optimizer state are released, so the compression ratio is real memory.

The weight is viewed as a matrix out x in (a Conv2d weight as out x in*kh*kw, transformers'
Conv1D weight transposed). :meth:`ABLayer.factorize` takes its SVD W = U S V^T, keeps
r = #{i : s_i > tau * s_1} singular values (at least ``min_rank``, at most the break-even rank
floor(m n / (m + n)), so a factored layer is never larger than its dense weight) and splits
sqrt(S) onto both sides (arXiv 2405.01067, Sec. 3): A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T.

In AB mode the forward runs x -> B -> A (a Conv2d becomes a kh x kw conv to r channels followed
by a 1 x 1 conv) whenever that costs fewer multiply-adds than rebuilding W and running the dense
op; under the break-even cap it always does, but the rule is kept explicit.

Layers know nothing about groups or torch.distributed: the optimizer tells them what to train.

The frozen residual (``ABConfig.residual``, PiSSA-style, arXiv 2404.02948). A layer with
``keep_residual`` keeps, at every factorization, W_res = W - A B as a frozen tensor of the layer
(``layer.residual``, in the weight's layout): not a parameter and not a buffer, so it gets no
gradient and no optimizer state, and nothing that walks ``parameters()`` or ``buffers()``
(ab_accel's reductions and syncs, DDP, DeepSpeed) ever sends it; ``.to()`` / ``.half()`` move
it with the layer. It is computed on every rank from the same W and the same factors, so it is
identical everywhere. The forward is x W_res^T + x B^T A^T (+ bias), a conv likewise, and every
dense read (``matrix()``, ``weight``, the export, ``merge``, a sync's W <- A B, the next
factorization's SVD) is W = W_res + A B, so converting is lossless: right after the
factorization the layer computes what the dense layer computed (up to float rounding). Memory:
the residual is one dense weight (in the parameters' dtype, or ``residual_dtype``, e.g. bf16
under fp32 factors: half of it), on top of the factors; what it saves is the dense weight's
gradient and optimizer state (3x the weight with AdamW), as LoRA's frozen base does.

State dicts. What a layer saves for the outside world (``state_dict()``, so ``save_pretrained``,
the Trainer's model file, Accelerate's ``save_model``) is always the dense ``weight`` (W = A B in
AB mode) under the original key, so plain torch or transformers loads it with no missing or
unexpected keys. Inside :func:`factored_state_dict` (what ab_accel's per-group checkpoint shards
use) an AB-mode layer saves ``A`` and ``B`` instead (and its ``residual``, once): the
exact-resume format. Loading accepts both: a file with ``A``/``B`` puts the layer in AB mode at
that rank (with the file's residual, bit for bit, or none), one with ``weight`` in full mode.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .svd import _svd, break_even_rank, cut_rank, svd_split
from .vocab import LayerMode, Role

_FACTORS_IN_STATE_DICT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ab_accel_factors_in_state_dict", default=False)


@contextlib.contextmanager
def factored_state_dict() -> Iterator[None]:
    """Within this block, AB-mode layers put ``A`` and ``B`` in ``state_dict()`` (exact resume)
    instead of the dense ``weight = A B`` (export)."""
    token = _FACTORS_IN_STATE_DICT.set(True)
    try:
        yield
    finally:
        _FACTORS_IN_STATE_DICT.reset(token)


class ABLayer(nn.Module):
    """Common machinery of ABLinear, ABConv2d and ABConv1D. See the module docstring."""

    #: Set by subclasses: the wrapped module type the layer converts back to in merge().
    dense_type: type | None = None

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None,
                 out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.weight = weight
        self.register_parameter("bias", bias)  # registered even when None: see _release()
        self.out_dim = out_dim
        self.in_dim = in_dim
        self.weight_shape = tuple(weight.shape)
        self.mode = LayerMode.FULL
        self.rank: int | None = None
        #: Bumped on every change of structure, so an optimizer can tell its params are stale.
        self.structure_version = 0
        self._svd_cache: tuple[torch.Tensor, ...] | None = None
        #: Keep W_res = W - A B at every factorization (``ABConfig.residual``).
        self.keep_residual = False
        #: The residual's dtype (None: the parameters'); ``ABConfig.residual_dtype``.
        self.residual_dtype: torch.dtype | None = None
        #: The frozen residual W - A B in the weight's layout (AB mode with keep_residual), or
        #: None. A plain attribute: no parameter, no buffer (see the module docstring).
        self.residual: torch.Tensor | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _factored_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def _positions(self, x: torch.Tensor) -> int:
        """Number of output positions (tokens, pixels x batch) a forward on ``x`` computes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sizes
    @property
    def max_rank(self) -> int:
        return break_even_rank(self.out_dim, self.in_dim)

    @property
    def dense_numel(self) -> int:
        return self.out_dim * self.in_dim

    @property
    def numel_now(self) -> int:
        if self.mode == LayerMode.AB:
            return self.A.numel() + self.B.numel()
        return self.weight.numel()

    @property
    def residual_numel(self) -> int:
        """Elements of the frozen residual held now (0 without one)."""
        return self.residual.numel() if self.residual is not None else 0

    @property
    def param_dtype(self) -> torch.dtype:
        return self.factor_params()[0].dtype

    @property
    def param_device(self) -> torch.device:
        return self.factor_params()[0].device

    def matrix(self) -> torch.Tensor:
        """The current W as an out x in matrix (A B in AB mode), without autograd."""
        with torch.no_grad():
            if self.mode == LayerMode.AB:
                product = self.A @ self.B
                if self.residual is not None:
                    product = product + self._weight_to_matrix(self.residual).to(product.dtype)
                return product
            return self._weight_to_matrix(self.weight)

    def factor_params(self) -> list[nn.Parameter]:
        """The parameters that represent W now: [weight] or [A, B]."""
        if self.mode == LayerMode.AB:
            return [self.A, self.B]
        return [self.weight]

    # ------------------------------------------------------------------ switches
    def proposed_rank(self, rank_cutoff: float, min_rank: int = 1, **rule: Any) -> int:
        """Rank the cut would keep for the current W (``rule``: the keywords of
        :func:`cut_rank`). Caches the SVD for :meth:`factorize`."""
        self._svd_cache = _svd(self.matrix())
        return cut_rank(self._svd_cache[1], rank_cutoff, min_rank, self.max_rank, **rule)

    @torch.no_grad()
    def factorize(self, rank: int) -> None:
        """W -> (A, B) at ``rank``; releases ``weight``. Reuses the SVD of proposed_rank()."""
        if rank < 1 or rank > min(self.out_dim, self.in_dim):
            raise ValueError(f"rank {rank} out of range for a {self.out_dim}x{self.in_dim} "
                             f"weight")
        matrix = self.matrix()
        svd = self._svd_cache if self._svd_cache is not None else _svd(matrix)
        self._svd_cache = None
        a, b = svd_split(matrix, rank, svd)
        device = self.param_device
        residual = self._residual_of(matrix, a, b) if self.keep_residual else None
        del matrix, svd
        self._release()
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(b.to(device))
        self.residual = residual
        self.mode = LayerMode.AB
        self.rank = rank
        self._finish()

    def _residual_of(self, matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        """W_res = W - A B (in the weight's layout), from the factors exactly as stored, so that
        W_res + A B gives W back up to one rounding; computed in float32 or wider."""
        work = torch.float64 if matrix.dtype == torch.float64 else torch.float32
        res = matrix.to(work) - a.to(work) @ b.to(work)
        dtype = self.residual_dtype or matrix.dtype
        return self._matrix_to_weight(res).to(dtype).contiguous()

    @torch.no_grad()
    def to_full(self) -> None:
        """(A, B) -> W = A B; releases the factors."""
        if self.mode == LayerMode.FULL:
            return
        weight = self._matrix_to_weight(self.matrix()).contiguous()
        self._release()
        self.residual = None
        self.weight = nn.Parameter(weight)
        self.mode = LayerMode.FULL
        self.rank = None
        self._finish()

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor,
                    residual: torch.Tensor | None = None) -> None:
        """Put the layer in AB mode with the given factors (new parameters) and ``residual``
        (W = residual + a b; None: W = a b)."""
        device, dtype = self.param_device, self.param_dtype
        self._release()
        self.residual = None if residual is None else residual.to(device).clone()
        self.A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.B = nn.Parameter(b.to(device=device, dtype=dtype).contiguous())
        self.mode = LayerMode.AB
        self.rank = a.shape[1]
        self._finish()

    @torch.no_grad()
    def orthogonalize(self) -> None:
        """Set every singular value of W to 1: W <- U V^T (the paper's init from scratch)."""
        u, _, vh = _svd(self.matrix())
        matrix = (u @ vh).to(self.param_dtype)
        if self.mode == LayerMode.AB:
            a, b = svd_split(matrix, self.rank)
            self.A.copy_(a)
            self.B.copy_(b)
            if self.residual is not None:
                self.residual = self._residual_of(matrix, self.A, self.B)
        else:
            self.weight.copy_(self._matrix_to_weight(matrix))

    def set_role(self, role: Role | str | None) -> None:
        """Which factor trains: "A", "B", "AB" (both) or None (full mode: the weight)."""
        if self.mode == LayerMode.AB:
            self.A.requires_grad_(role in (Role.A, Role.AB))
            self.B.requires_grad_(role in (Role.B, Role.AB))
        else:
            self.weight.requires_grad_(True)

    def _release(self) -> None:
        for name in ("weight", "A", "B"):
            if name in self._parameters:
                del self._parameters[name]
        # Keep the registration order [weight | A, B], bias: the new tensors are registered
        # next, and the bias is re-appended after them by _finish().
        self.__dict__["_pending_bias"] = self._parameters.pop("bias", None)

    def _finish(self) -> None:
        self.register_parameter("bias", self.__dict__.pop("_pending_bias", None))
        self.structure_version += 1

    # ------------------------------------------------------------------ forward
    def use_factored(self, positions: int) -> bool:
        """x -> B -> A costs r (m + n) per position; dense costs m n per position plus m r n
        once to rebuild W. Take the cheaper (ties go to the factors: less memory)."""
        m, n, r = self.out_dim, self.in_dim, self.rank or 0
        return r * (m + n) * positions <= m * n * positions + m * r * n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == LayerMode.AB:
            if self.residual is not None:
                # x W_res^T (+ bias) + x B^T A^T: the residual is a constant, so autograd keeps
                # nothing for it and its matmul is the dense layer's, plus the adapter's r (m + n)
                # per position (peft's LoRA path; never the m n rebuild of W).
                residual = self.residual
                if residual.dtype != self.A.dtype:
                    residual = residual.to(self.A.dtype)
                return self._dense_forward(x, residual) + self._factored_forward(x, bias=False)
            if self.use_factored(self._positions(x)):
                return self._factored_forward(x)
            return self._dense_forward(x, self._matrix_to_weight(self.A @ self.B))
        return self._dense_forward(x, self.weight)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code that reads `layer.weight` (its dtype, device, or tied uses) keeps
            # working in AB mode: it gets W = A B, computed on demand, with autograd.
            params = self.__dict__.get("_parameters", {})
            if name == "weight" and params.get("A") is not None:
                weight = self._matrix_to_weight(params["A"] @ params["B"])
                residual = self.__dict__.get("residual")
                return weight if residual is None else weight + residual.to(weight.dtype)
            raise

    def _apply(self, fn: Any, recurse: bool = True) -> ABLayer:
        # .to(), .half(), .cuda() move the residual with the parameters (it is neither a
        # parameter nor a buffer: see the module docstring).
        out = super()._apply(fn, recurse)
        if self.residual is not None:
            self.residual = fn(self.residual)
        return out

    # ------------------------------------------------------------------ state dicts
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        if self.mode == LayerMode.AB and not _FACTORS_IN_STATE_DICT.get():
            # The export: the dense weight under its original key (see the module docstring).
            destination[prefix + "weight"] = self._matrix_to_weight(self.matrix())
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            return
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mode == LayerMode.AB and self.residual is not None:
            destination[prefix + "residual"] = self.residual

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint taken in the other mode restructures the layer first, so that
        # load_state_dict works across phases (the optimizer picks the new params up).
        residual = state_dict.get(f"{prefix}residual")
        if f"{prefix}A" in state_dict and self.mode == LayerMode.FULL:
            a, b = state_dict[f"{prefix}A"], state_dict[f"{prefix}B"]
            dtype, device = self.param_dtype, self.param_device
            self._release()
            self.A = nn.Parameter(torch.empty(a.shape, dtype=dtype, device=device))
            self.B = nn.Parameter(torch.empty(b.shape, dtype=dtype, device=device))
            self.mode, self.rank = LayerMode.AB, a.shape[1]
            self._finish()
        elif f"{prefix}A" in state_dict and tuple(state_dict[f"{prefix}A"].shape) != tuple(
                self.A.shape):
            a, b = state_dict[f"{prefix}A"], state_dict[f"{prefix}B"]
            self.set_factors(torch.empty(a.shape), torch.empty(b.shape))
        elif f"{prefix}weight" in state_dict and self.mode == LayerMode.AB:
            dtype, device = self.param_dtype, self.param_device
            self._release()
            self.weight = nn.Parameter(torch.empty(self.weight_shape, dtype=dtype,
                                                   device=device))
            self.mode, self.rank = LayerMode.FULL, None
            self._finish()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if f"{prefix}residual" in unexpected_keys:
            unexpected_keys.remove(f"{prefix}residual")
        if self.mode == LayerMode.AB and f"{prefix}A" in state_dict:
            # the file's residual, bit for bit (its own dtype), or none: the file is the truth
            self.residual = (None if residual is None else residual.detach().to(
                device=self.param_device, copy=True).contiguous())
        elif self.mode == LayerMode.FULL:
            self.residual = None

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.mode == LayerMode.AB else ""
        if self.residual is not None:
            rank += ", residual=True"
        return (f"out={self.out_dim}, in={self.in_dim}, mode={self.mode}{rank}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------------ merge
    def to_dense_module(self) -> nn.Module:
        raise NotImplementedError
