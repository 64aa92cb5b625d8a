"""Quality metrics: top-1 accuracy of a classifier, how faithfully a compressed encoder embeds, and a
language model's perplexity.

>>> import torch
>>> ref = torch.eye(4)
>>> embedding_fidelity(ref, ref.clone(), k=2)
{'cosine': 1.0, 'overlap_at_k': 1.0}
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..core.errors import DataError
from .measure import Inputs, call_model, evaluating, first_tensor, move_inputs

_QUERY_CHUNK = 1024  # queries per block: keeps the similarity matrix at (1024, N) in memory


def accuracy(model: nn.Module, loader: Iterable, device: str = "cpu") -> float:
    """Top-1 accuracy (a fraction in [0, 1]) over `(x, y)` batches; x is a tensor or a dict of tensors.

    The model runs in eval mode under `inference_mode`; its mode and device are restored.

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2))
    >>> accuracy(model, [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))])
    0.5
    """
    correct = total = 0
    with evaluating(model, device), torch.inference_mode():
        for i, batch in enumerate(loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"accuracy: batch {i} is a {type(batch).__name__}; the loader must yield (inputs, labels)")
            x, y = batch[0], batch[1]
            logits = first_tensor(call_model(model, move_inputs(x, device)), f"accuracy: {type(model).__name__}")
            y = y.to(logits.device)
            if logits.shape[:-1] != y.shape:
                raise DataError(f"accuracy: batch {i} gives logits {tuple(logits.shape)} for labels {tuple(y.shape)}; "
                                "the model must return (B, classes) scores for (B,) integer labels")
            correct += int((logits.argmax(-1) == y).sum())
            total += y.numel()
    if total == 0:
        raise DataError("accuracy: the loader yielded no samples; give a non-empty test loader")
    return correct / total


def perplexity(model: nn.Module, loader: Iterable, device: str = "cpu") -> dict[str, float]:
    """A causal LM's perplexity over `(input_ids, targets)` batches: exp of the mean negative
    log-likelihood per target token (lower is better). The model returns logits (B, T, V).

    Returns {"perplexity", "nll" (nats per token), "tokens"}.

    >>> uniform = nn.Embedding(4, 4)  # logits all zero: every token equally likely among 4
    >>> _ = nn.init.zeros_(uniform.weight)
    >>> ids = torch.zeros(2, 3, dtype=torch.long)
    >>> round(perplexity(uniform, [(ids, ids + 1)])["perplexity"], 6)
    4.0
    """
    nll, tokens = 0.0, 0
    with evaluating(model, device), torch.inference_mode():
        for i, batch in enumerate(loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"perplexity: batch {i} is a {type(batch).__name__}; the loader must yield "
                                "(input_ids, targets)")
            logits = first_tensor(call_model(model, move_inputs(batch[0], device)), "perplexity")
            targets = batch[1].to(logits.device)
            if logits.dim() != 3 or logits.shape[:2] != targets.shape:
                raise DataError(f"perplexity: batch {i} gives logits {tuple(logits.shape)} for targets "
                                f"{tuple(targets.shape)}; the model must return (B, T, vocab) for (B, T) tokens")
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(),
                                                           reduction="sum"))
            tokens += targets.numel()
    if tokens == 0:
        raise DataError("perplexity: the loader yielded no tokens; give a non-empty test loader")
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": float(tokens)}


def embed(model: nn.Module, loader: Iterable, device: str = "cpu") -> torch.Tensor:
    """The model's outputs over `loader`, concatenated along the batch: (N, D) on the CPU.

    A batch is the model's inputs (a dict of tensors, or a tensor); from an `(x, y)` tuple, x is used.
    The model must return a tensor (wrap an encoder so forward pools to one vector per item).

    >>> embed(nn.Identity(), [torch.ones(2, 3), torch.zeros(1, 3)]).shape
    torch.Size([3, 3])
    """
    outs: list[torch.Tensor] = []
    with evaluating(model, device), torch.inference_mode():
        for batch in loader:
            x: Inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            out = call_model(model, move_inputs(x, device))
            if not isinstance(out, torch.Tensor):
                raise DataError(f"embed: {type(model).__name__} returned {type(out).__name__}, not a tensor; "
                                "wrap it so forward returns one (B, D) embedding per item")
            outs.append(out.detach().float().cpu())
    if not outs:
        raise DataError("embed: the loader yielded no batches; give a non-empty loader")
    return torch.cat(outs)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How well `candidate` embeddings (N, D) keep `reference` (N, D), row i being the same item.

    cosine:       mean over rows of the cosine between reference and candidate (L2-normalized)
    overlap_at_k: mean over queries of |kNN_ref(i) & kNN_cand(i)| / k, neighbours by cosine over the
                  corpus of all N rows, the query itself excluded (so k must be < N)

    >>> ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(embedding_fidelity(ref, ref * 3, k=1)["cosine"], 6)
    1.0
    """
    _check_pair(reference, candidate, k)
    ref = torch.nn.functional.normalize(reference.detach().double().cpu(), dim=1)  # (N, D)
    cand = torch.nn.functional.normalize(candidate.detach().double().cpu(), dim=1)  # (N, D)
    cosine = float((ref * cand).sum(1).mean())
    n = ref.shape[0]
    hits = 0
    for start in range(0, n, _QUERY_CHUNK):
        rows = torch.arange(start, min(start + _QUERY_CHUNK, n))
        nn_ref = _knn(ref, rows, k)  # (Q, k)
        nn_cand = _knn(cand, rows, k)  # (Q, k)
        hits += int((nn_ref[:, :, None] == nn_cand[:, None, :]).sum())  # indices are unique per row
    return {"cosine": cosine, "overlap_at_k": hits / (n * k)}


def _knn(emb: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb[rows] @ emb.T  # (Q, N)
    sim[torch.arange(len(rows)), rows] = -torch.inf  # a query is not its own neighbour
    return sim.topk(k, dim=1).indices


def _check_pair(reference: Any, candidate: Any, k: int) -> None:
    for name, t in (("reference", reference), ("candidate", candidate)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"embedding_fidelity: {name} must be a 2-D (N, D) tensor, got {shape}")
    if reference.shape != candidate.shape:
        raise DataError(f"embedding_fidelity: reference {tuple(reference.shape)} and candidate "
                        f"{tuple(candidate.shape)} differ; embed the same items with the same output width")
    if not 1 <= k < reference.shape[0]:
        raise DataError(f"embedding_fidelity: k={k} needs 1 <= k < N={reference.shape[0]} "
                        "(the query is excluded from its neighbours); lower k or embed more items")
