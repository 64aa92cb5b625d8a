"""Pure maths of low-rank factorization: truncated SVD, spatial SVD and Tucker-2 of conv kernels.

Every function computes in float64 and returns factors in the input's dtype. Conventions:
a Linear weight is `(O, I)`; a conv kernel is `(O, C, *k)` (k = (k,) for Conv1d, (kh, kw) for Conv2d).

Truncated SVD keeps the `r` largest singular values; by Eckart-Young it is the best rank-r
approximation, and its squared Frobenius error is exactly the sum of the dropped singular values squared:

>>> _ = torch.manual_seed(0)
>>> w = torch.randn(6, 4, dtype=torch.float64)
>>> a, b = truncated_svd(w, 2)
>>> s = torch.linalg.svdvals(w)
>>> bool(torch.isclose((w - a @ b).pow(2).sum(), s[2:].pow(2).sum()))
True
>>> a, b = truncated_svd(w, 4)  # full rank: exact
>>> bool(torch.allclose(a @ b, w))
True
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mode_singular_values", "residual_energy", "singular_values", "spatial_kernel", "spatial_matrix",
           "spatial_svd", "truncated_svd", "tucker2", "tucker2_kernel",
           "whitened_svd", "whitening"]


def _check_rank(rank: int, full: int, what: str) -> None:
    if not 1 <= rank <= full:
        raise ValueError(f"{what}: rank must be in [1, {full}], got {rank}")


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D matrix in float64, largest first."""
    return torch.linalg.svdvals(matrix.detach().double())


def residual_energy(s: Tensor, rank: int) -> float:
    """Fraction of the squared Frobenius norm lost by keeping the `rank` largest of `s`.

    >>> residual_energy(torch.tensor([2.0, 1.0]), 1)
    0.2
    """
    total = float(s.double().pow(2).sum())
    return float(s[rank:].double().pow(2).sum()) / total if total > 0 else 0.0


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors `(a, b)` of `matrix` (O, I): `a @ b` ~ matrix, a (O, r), b (r, I).

    The singular values are split evenly (`a = U sqrt(S)`, `b = sqrt(S) V^T`) so both factors have the
    same scale, which keeps fine-tuning of the two layers well conditioned.
    """
    out_f, in_f = matrix.shape
    _check_rank(rank, min(out_f, in_f), "truncated_svd")
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)  # (O, R), (R,), (R, I)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root  # (O, r)
    b = root[:, None] * vh[:rank]  # (r, I)
    return a.to(matrix.dtype), b.to(matrix.dtype)


def whitening(gram: Tensor, damp: float = 1e-6) -> Tensor:
    """Lower-triangular `L` with `L @ L.T = gram + damp * mean(diag) * I` (Cholesky, float64).

    `gram` is `X^T X` of a layer's inputs X (N, I): then `||(W - W') X^T||_F = ||(W - W') L||_F`, so
    factorizing `W @ L` minimises the error of the layer's outputs on that data, not of its weights.
    """
    g = gram.detach().double()
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky(g + damp * g.diagonal().mean().clamp_min(1e-12) * eye)  # (I, I)


def whitened_svd(matrix: Tensor, chol: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors `(a (O, r), b (r, I))` minimising `||(matrix - a @ b) @ chol||_F` (data-aware SVD).

    With `chol = whitening(X^T X)` the squared output error on X is the sum of the dropped singular
    values of `matrix @ chol` squared (SVD-LLM's truncation-aware whitening):

    >>> x = torch.randn(50, 6, dtype=torch.float64)
    >>> w = torch.randn(4, 6, dtype=torch.float64)
    >>> chol = whitening(x.T @ x, damp=0.0)
    >>> a, b = whitened_svd(w, chol, 2)
    >>> s = torch.linalg.svdvals(w @ chol)
    >>> bool(torch.isclose(((w - a @ b) @ x.T).pow(2).sum(), s[2:].pow(2).sum()))
    True
    """
    a, b = truncated_svd(matrix.detach().double() @ chol, rank)  # (O, r), (r, I) of W L
    b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)  # b L^-1
    return a.to(matrix.dtype), b.to(matrix.dtype)


def spatial_matrix(kernel: Tensor) -> Tensor:
    """A Conv2d kernel (O, C, kh, kw) rearranged to the matrix (C*kh, O*kw) whose rank is the
    number of (kh x 1) -> (1 x kw) channel pairs needed to represent it exactly."""
    o, c, kh, kw = kernel.shape
    return kernel.detach().double().permute(1, 2, 0, 3).reshape(c * kh, o * kw)  # (C*kh, O*kw)


def spatial_svd(kernel: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Spatial SVD of a Conv2d kernel (O, C, kh, kw) into a vertical and a horizontal kernel.

    Returns `(vertical (r, C, kh, 1), horizontal (O, r, 1, kw))`: convolving with the vertical kernel
    and then the horizontal one equals the convolution with `spatial_kernel(vertical, horizontal)`;
    the squared error is the sum of the dropped singular values of `spatial_matrix(kernel)` squared.

    >>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> v, h = spatial_svd(k, 9)  # full rank = min(C*kh, O*kw) = 9
    >>> bool(torch.allclose(spatial_kernel(v, h), k))
    True
    """
    o, c, kh, kw = kernel.shape
    a, b = truncated_svd(spatial_matrix(kernel), rank)  # (C*kh, r), (r, O*kw)
    vertical = a.T.reshape(rank, c, kh, 1)  # (r, C, kh, 1)
    horizontal = b.reshape(rank, o, kw).permute(1, 0, 2).reshape(o, rank, 1, kw)  # (O, r, 1, kw)
    return vertical.to(kernel.dtype).contiguous(), horizontal.to(kernel.dtype).contiguous()


def spatial_kernel(vertical: Tensor, horizontal: Tensor) -> Tensor:
    """The (O, C, kh, kw) kernel equal to a (kh x 1) conv followed by a (1 x kw) conv."""
    # W[o, c, i, j] = sum_r H[o, r, 0, j] V[r, c, i, 0]
    return torch.einsum("orj,rci->ocij", horizontal[:, :, 0, :], vertical[..., 0])


def _unfold(t: Tensor, mode: int) -> Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)  # (n_mode, rest)


def _leading(matrix: Tensor, rank: int) -> Tensor:
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]  # (n, r), orthonormal columns


def mode_singular_values(kernel: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values of a kernel's output-channel and input-channel unfoldings (HOSVD spectra)."""
    k = kernel.detach().double()
    return torch.linalg.svdvals(_unfold(k, 0)), torch.linalg.svdvals(_unfold(k, 1))


def tucker2(kernel: Tensor, rank_out: int, rank_in: int, iters: int = 0
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a conv kernel (O, C, *k) over its two channel modes, by HOSVD (+ `iters` HOOI sweeps).

    Returns `(first (r_in, C), core (r_out, r_in, *k), last (O, r_out))`: a 1x1 conv to r_in channels,
    the kxk core conv, and a 1x1 conv back to O channels. `first` and `last` have orthonormal rows /
    columns, so full ranks (O, C) reproduce the kernel exactly. HOOI (alternating least squares on
    one factor with the other fixed) never increases the error of the HOSVD start.

    >>> k = torch.randn(5, 4, 3, dtype=torch.float64)
    >>> f, g, l = tucker2(k, 5, 4)
    >>> bool(torch.allclose(tucker2_kernel(f, g, l), k))
    True
    """
    o, c = kernel.shape[:2]
    _check_rank(rank_out, o, "tucker2 (output channels)")
    _check_rank(rank_in, c, "tucker2 (input channels)")
    k = kernel.detach().double()
    u_out = _leading(_unfold(k, 0), rank_out)  # (O, r_out)
    u_in = _leading(_unfold(k, 1), rank_in)  # (C, r_in)
    for _ in range(iters):
        projected_in = torch.tensordot(k, u_in, dims=([1], [0])).movedim(-1, 1)  # (O, r_in, *k)
        u_out = _leading(_unfold(projected_in, 0), rank_out)
        projected_out = torch.tensordot(k, u_out, dims=([0], [0])).movedim(-1, 0)  # (r_out, C, *k)
        u_in = _leading(_unfold(projected_out, 1), rank_in)
    core = torch.tensordot(u_out.T, k, dims=([1], [0]))  # (r_out, C, *k)
    core = torch.tensordot(core, u_in, dims=([1], [0])).movedim(-1, 1)  # (r_out, r_in, *k)
    dt = kernel.dtype
    return u_in.T.to(dt).contiguous(), core.to(dt).contiguous(), u_out.to(dt).contiguous()


def tucker2_kernel(first: Tensor, core: Tensor, last: Tensor) -> Tensor:
    """The (O, C, *k) kernel equal to the 1x1 (r_in, C) -> core (r_out, r_in, *k) -> 1x1 (O, r_out) chain."""
    w = torch.tensordot(last, core, dims=([1], [0]))  # (O, r_in, *k)
    return torch.tensordot(w, first, dims=([1], [0])).movedim(-1, 1)  # (O, C, *k)
