"""Fine-grained masks as pure functions on tensors: importance scores, and the mask makers.

A mask is a bool tensor shaped like the weight, True where the weight is kept; pruning is
`w.mul_(mask)` (W_s = M * W, seed 001 eq. 1). Higher score means keep. Every maker prunes an exact
count, `pruned_count(numel, sparsity) = round(sparsity * numel)`, ties going to the lower index.

N:M follows NVIDIA's convention: N of every M contiguous weights along the input dimension are
KEPT, so 2:4 keeps 2 of 4 (50% sparse; Ampere sparse tensor cores). Some decks (seed 003) count
the pruned ones instead; for 2:4 both read the same.

>>> w = torch.tensor([[0.1, -2.0, 0.3, 4.0, 1.0, 0.0, -3.0, 0.2]])
>>> nm_mask(magnitude_scores(w), n=2, m=4).int()
tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.int32)
>>> int((~unstructured_mask(magnitude_scores(w), 0.25)).sum())
2
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError

# ---------------------------------------------------------------------------------------------- scores


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|w|: the magnitude criterion (Han et al.; the lottery ticket's)."""
    return w.detach().abs().float()


def random_scores(w: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores shaped like `w`: the control every criterion must beat."""
    return torch.rand(w.shape, generator=gen).to(w.device)


def taylor_scores(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w * dL/dw|: first-order Taylor estimate of the loss change when w is zeroed (seed 000);
    ranks like the seed's (g w)^2."""
    return (w.detach().float() * grad.detach().float()).abs()


def snip_scores(w: torch.Tensor, grad: torch.Tensor, total: float | torch.Tensor | None = None) -> torch.Tensor:
    """SNIP connection sensitivity |w * g| / sum |w * g|, taken at initialization.

    total: the normaliser; pass the sum over every pruned layer so scores compare across layers
           (the default normalises over `w` alone).

    >>> float(snip_scores(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 1.0])).sum())
    1.0
    """
    s = taylor_scores(w, grad)
    norm = s.sum() if total is None else torch.as_tensor(total, dtype=s.dtype)
    return s / norm.clamp_min(torch.finfo(s.dtype).tiny)


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over calibration
    tokens. `w` is (O, I, ...) and `input_norm` (I,): one norm per input feature / channel.

    >>> wanda_scores(torch.tensor([[1.0, 1.0]]), torch.tensor([0.5, 2.0]))
    tensor([[0.5000, 2.0000]])
    """
    if input_norm.numel() != w.shape[1]:
        raise ConfigError("importance", f"wanda: {input_norm.numel()} input norms for a weight with "
                          f"{w.shape[1]} inputs; grouped convolutions are not supported, exclude them")
    norm = input_norm.float().to(w.device).view(1, -1, *[1] * (w.dim() - 2))  # (1, I, 1...)
    return w.detach().abs().float() * norm


# ----------------------------------------------------------------------------------------------- masks


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` entries a mask at `sparsity` zeroes: round(sparsity * numel).

    >>> pruned_count(10, 0.25), pruned_count(8, 0.5)
    (2, 4)
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError("sparsity", f"must be in [0, 1], got {sparsity}")
    return int(round(sparsity * numel))


def keep_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the `k` lowest scores of `scores` (any shape); ties prune the lower index first."""
    flat = scores.reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.argsort(flat, stable=True)[:k]] = False
    return mask.view(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Element-wise mask of one layer: exactly round(sparsity * numel) zeros at the lowest scores.

    >>> unstructured_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5)
    tensor([[ True, False],
            [False,  True]])
    """
    return keep_mask(scores, pruned_count(scores.numel(), sparsity))


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers: exactly round(sparsity * total) zeros in total, so sensitive
    layers keep more (the lottery ticket's global magnitude pruning).

    >>> m = global_masks({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 0.5])}, 0.5)
    >>> m["a"].tolist(), m["b"].tolist()
    ([False, True], [True, False])
    """
    if not scores:
        return {}
    device = next(iter(scores.values())).device
    flat = torch.cat([s.detach().reshape(-1).float().to(device) for s in scores.values()])  # (total,)
    keep = unstructured_mask(flat, sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start: start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Element mask compared within each output row (dim 0), as Wanda does; the zeros are spread over
    the rows so the layer's total is still exactly round(sparsity * numel).

    >>> row_mask(torch.tensor([[1.0, 2.0], [4.0, 3.0]]), 0.5)
    tensor([[False,  True],
            [ True, False]])
    """
    rows = scores.reshape(scores.shape[0], -1)  # (O, K)
    n_rows = rows.shape[0]
    total = pruned_count(rows.numel(), sparsity)
    edges = (torch.arange(n_rows + 1) * total) // n_rows  # integer split: sums to `total` exactly
    k = (edges[1:] - edges[:-1]).to(rows.device)  # (O,) zeros per row
    rank = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1)  # (O, K) rank within the row
    return (rank >= k[:, None]).view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """N:M mask: in every contiguous group of `m` entries along `dim` keep the `n` highest scores.

    Use dim=1 (the input dimension) for both Linear (O, I) and Conv (O, I, kh, kw) weights; for a
    convolution the groups then run along input channels at each kernel position, as in NVIDIA ASP.

    >>> nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 1, 4)
    tensor([[ True, False, False, False]])
    """
    if not 1 <= n <= m:
        raise ConfigError("n", f"must be in [1, m={m}], got {n}")
    s = scores.movedim(dim, -1)  # (..., I)
    size = s.shape[-1]
    if size % m:
        raise ConfigError("m", f"dimension {dim} has {size} entries, not a multiple of m={m}; "
                          f"skip this layer or choose m dividing {size}")
    groups = s.reshape(*s.shape[:-1], size // m, m)  # (..., I/M, M)
    keep = groups.topk(n, dim=-1).indices  # (..., I/M, N)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(s.shape).movedim(-1, dim)


def vector_mask(scores: torch.Tensor, sparsity: float, dim: int = -1) -> torch.Tensor:
    """Vector-level mask: whole vectors running along `dim` are kept or pruned, ranked by the sum of
    their scores; round(sparsity * number of vectors) vectors go.

    dim=-1 on a Linear (O, I) prunes whole rows; on a conv (O, I, kh, kw) whole kernel rows.

    >>> vector_mask(torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.1, 0.1]]), 1 / 3)
    tensor([[ True,  True],
            [ True,  True],
            [False, False]])
    """
    per_vector = scores.sum(dim, keepdim=True)  # (..., 1, ...)
    return unstructured_mask(per_vector, sparsity).expand(scores.shape).clone()


def kernel_patterns() -> torch.Tensor:
    """The default pattern set for 3x3 kernels: 8 four-entry patterns that all keep the centre
    (PatDNN-style): the centre with 3 of its 4 arms, and the four 2x2 squares around the centre.

    >>> kernel_patterns().shape, kernel_patterns().sum((1, 2)).tolist()
    (torch.Size([8, 3, 3]), [4, 4, 4, 4, 4, 4, 4, 4])
    """
    arms = [(0, 1), (1, 0), (1, 2), (2, 1)]
    pats = []
    for skip in arms:  # centre + three arms
        p = torch.zeros(3, 3, dtype=torch.bool)
        p[1, 1] = True
        for a in arms:
            p[a] = a != skip
        pats.append(p)
    for r in (0, 1):  # the 2x2 squares containing the centre
        for c in (0, 1):
            p = torch.zeros(3, 3, dtype=torch.bool)
            p[r: r + 2, c: c + 2] = True
            pats.append(p)
    return torch.stack(pats)  # (8, 3, 3)


def pattern_mask(scores: torch.Tensor, patterns: torch.Tensor | None = None, sparsity: float = 0.0) -> torch.Tensor:
    """Kernel-pattern mask for a conv weight (O, I, kh, kw): each kernel keeps the pattern of
    `patterns` (P, kh, kw) that holds the most score. When `sparsity` asks for more zeros than the
    patterns give, whole kernels with the least kept score are removed too (connectivity pruning)
    until at least round(sparsity * numel) entries are zero.

    >>> s = torch.zeros(1, 1, 3, 3); s[0, 0, 0] = 1.0
    >>> pattern_mask(s)[0, 0].int()
    tensor([[1, 1, 0],
            [1, 1, 0],
            [0, 0, 0]], dtype=torch.int32)
    """
    pats = (kernel_patterns() if patterns is None else patterns).bool().to(scores.device)  # (P, kh, kw)
    if scores.dim() < 3 or tuple(scores.shape[2:]) != tuple(pats.shape[1:]):
        raise ConfigError("granularity", f"pattern pruning needs kernels of shape {tuple(pats.shape[1:])}, "
                          f"got a weight of shape {tuple(scores.shape)}; exclude the layer or give patterns")
    kernels = scores.reshape(-1, pats[0].numel()).float()  # (O*I, K)
    flat = pats.reshape(pats.shape[0], -1)  # (P, K)
    fit = kernels @ flat.float().T  # (O*I, P) score each pattern would keep
    best_fit, best = fit.max(1)  # (O*I,)
    mask = flat[best].clone()  # (O*I, K)
    need = pruned_count(scores.numel(), sparsity) - int((~mask).sum())
    if need > 0:
        order = torch.argsort(best_fit, stable=True)  # weakest kernels first
        gained = torch.cumsum(mask[order].sum(1), 0)  # zeros added by cutting the first j kernels
        cut = int(torch.searchsorted(gained, torch.tensor(need, device=gained.device))) + 1
        mask[order[:cut]] = False
    return mask.view(scores.shape)


# ------------------------------------------------------------------------------------------- sparsegpt


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning of a Linear weight (O, I) column by column.

    With H = 2 X^T X over calibration inputs, zeroing w_q costs w_q^2 / [H^-1]_qq and the optimal
    update of the remaining weights is -w_q / [H^-1]_qq * H^-1_{:,q} (seed 000's OBS formula). Columns
    are swept left to right using the upper Cholesky factor of H^-1 (dampened by `damp` times the
    mean diagonal), updates to later columns applied lazily per block of `block_size`. The mask is
    chosen per block (adaptive) from w^2 / [H^-1]_qq^2, or per group of M for `nm=(n, m)`.
    Returns (compensated weight with exact zeros, mask).

    >>> w = torch.tensor([[1.0, 0.9, 0.1, 0.2]])
    >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    >>> new, mask = sparsegpt_prune(w, 2 * x.T @ x, sparsity=0.5)
    >>> int(mask.sum()), bool((new[~mask] == 0).all())
    (2, True)
    """
    out_dtype = weight.dtype
    W = weight.detach().double().clone()  # (O, I)
    H = hessian.detach().double().to(W.device).clone()  # (I, I)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ConfigError("importance", f"sparsegpt: Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if nm is not None and block_size % nm[1]:
        raise ConfigError("m", f"sparsegpt: block_size {block_size} must be a multiple of m={nm[1]}")
    dead = H.diagonal() == 0  # inputs that never fire: nothing to preserve
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, damp)  # (I, I) upper factor of H^-1
    mask = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    total = pruned_count(W.numel(), sparsity) if nm is None else 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (O, B)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d = Hinv1.diagonal()  # (B,)
        err = torch.zeros_like(W1)  # (O, B)
        if nm is None:  # this block's share of the exact total
            k = (total * i2) // cols - (total * i1) // cols
            mask1 = keep_mask(W1.pow(2) / d.pow(2), k)
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                mask1[:, group] = nm_mask(W1[:, group].pow(2) / d[group].pow(2), nm[0], nm[1])
            w = W1[:, i]  # (O,)
            e = (w - w * mask1[:, i]) / d[i]  # (O,)
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]  # (O, B - i); column i becomes the kept value
            err[:, i] = e
        W[:, i1:i2] = W1 * mask1
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]  # (O, I - i2): the lazy update of later blocks
        mask[:, i1:i2] = mask1
    return (W * mask).to(out_dtype), mask


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, raising the dampening until H is positive definite."""
    mean_diag = H.diagonal().mean()
    for factor in (1, 10, 100):
        Hd = H + damp * factor * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise ConfigError("dampening", f"sparsegpt: the Hessian is not positive definite even with dampening "
                      f"{damp * 100:g}x; raise dampening or give more calibration data")
