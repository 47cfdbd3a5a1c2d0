"""The SVD split and the rank cut: how a weight matrix W becomes the factors A and B.

W (out x in) = U S V^T; the cut keeps r singular values (the paper's r = #{i : s_i > tau * s_1},
or one of ABConfig's other rank rules: ``rank_energy``, ``rank_fraction``, ``fixed_rank``), at
least ``min_rank``, at most the break-even rank floor(m n / (m + n)), so a factored layer is never
larger than its dense weight, and sqrt(S) is split onto both sides (arXiv 2405.01067, Sec. 3):
A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T. Pure tensor functions: no module, no state.
"""

from __future__ import annotations

import math

import torch


def break_even_rank(out_dim: int, in_dim: int) -> int:
    """Largest rank r with r (m + n) <= m n: a factored layer is never larger than dense."""
    return max(1, (out_dim * in_dim) // (out_dim + in_dim))


def cut_rank(singular_values: torch.Tensor, rank_cutoff: float, min_rank: int,
             max_rank: int, *, energy: float | None = None, fraction: float | None = None,
             fixed: int | None = None) -> int:
    """The rank a factorization keeps, clamped to [min_rank, max_rank] (and at least 1).

    One rule: ``fixed`` (that rank), ``fraction`` (ceil(fraction * min(m, n))), ``energy``
    (the fewest leading singular values whose squares hold that share of sum(s_i^2)), or the
    paper's cutoff r = #{s_i > tau * s_1} with tau = ``rank_cutoff``.
    """
    s = singular_values
    if fixed is not None:
        count = fixed
    elif fraction is not None:
        count = math.ceil(fraction * s.numel())
    elif energy is not None:
        share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-300)
        count = int((share < energy - 1e-12).sum().item()) + 1
    else:
        count = int((s > rank_cutoff * s[0]).sum().item()) if s.numel() else 0
    r = max(count, min_rank, 1)
    return max(1, min(r, max_rank))


def svd_split(matrix: torch.Tensor, rank: int, svd: tuple[torch.Tensor, ...] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T for ``matrix`` (computed in float32 or wider)."""
    if svd is None:
        svd = _svd(matrix)
    u, s, vh = svd
    root = s[:rank].sqrt()
    a = u[:, :rank] * root.unsqueeze(0)
    b = root.unsqueeze(1) * vh[:rank]
    return a.to(matrix.dtype).contiguous(), b.to(matrix.dtype).contiguous()


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    return torch.linalg.svd(work, full_matrices=False)
