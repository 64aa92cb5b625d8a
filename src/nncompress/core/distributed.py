"""Data-parallel training under `torchrun`: the one place that knows about process groups.

    torchrun --nproc_per_node 2 -m nncompress.cli run recipe.yaml --out runs/x

Every rank runs the whole recipe on the same data in the same order (the loaders are seeded from the
recipe seed, so their batches agree). Inside `fit`, each global batch is split into one shard per rank
(`shard`), each rank back-propagates its shard's loss weighted by its share of the batch, and
`GradientSync` sums the gradients of every trained parameter (adapters outside the model included) in
one flat all-reduce per step: the mean over the global batch, as one process computes it, up to the
order of float additions. BatchNorm in training normalises with the statistics of the whole global
batch (`data_parallel`: the sums are all-reduced inside the forward, with gradients), so a model with
BatchNorm takes the same steps as in one process too (torch's SyncBatchNorm would do this, but runs on
GPUs only); observers that keep tracking activations while training see the global batch's rows
(`global_rows`). Other floating buffers are averaged after each step so the replicas never drift; rank 0's parameters and buffers are broadcast before training starts. Only rank 0 writes
files (`is_main`).

Why not the `DistributedDataParallel` wrapper: a stage's loss reads the model by module name (feature
distillation, penalties) and may train parameters that live outside the model (feature adapters). The
all-reduce here is what DDP's reducer computes, without its overlap of communication and backward.

The backend is gloo on CPU and nccl when the run's device is CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import NNCompressError

__all__ = ["world", "rank", "is_main", "init_from_env", "shutdown", "shard", "GradientSync", "broadcast_state",
           "all_reduce_sum", "all_reduce_tensor", "all_gather_object", "data_parallel",
           "global_rows"]

# A rank waits this long at a collective while rank 0 measures and writes a stage (ONNX exports,
# latency tables): generous, because a shorter one kills long but healthy runs.
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> int:
    """The world size torchrun asked for (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise NNCompressError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun")


def init_from_env(device: str | torch.device = "cpu") -> int:
    """Join the process group torchrun describes in the environment (once); returns the world size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    size = launched()
    if size <= 1:
        return 1
    if not dist.is_available():
        raise NNCompressError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return dist.get_world_size()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True in a single process and on rank 0: the one process that writes files and measures."""
    return rank() == 0


def batch_size(batch: Any) -> int | None:
    """The leading size of the first tensor in `batch` (a tensor, tuple / list, or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = batch_size(item)
        if n is not None:
            return n
    return None


def shard(batch: Any, size: int, index: int, count: int) -> Any:
    """This rank's rows of a global batch of `size` rows: the `index`-th of `count` near-equal slices
    of every tensor whose first dimension is `size` (other values are shared as they are)."""
    lo, hi = size * index // count, size * (index + 1) // count
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, dict):
        return type(batch)({k: shard(v, size, index, count) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard(v, size, index, count) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, size, index, count) for v in batch)
    return batch


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                      for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: torch.Tensor, into: list[torch.Tensor]) -> None:
    offset = 0
    for t in into:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over the ranks (itself in one process)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor | None, op: str = "sum") -> torch.Tensor | None:
    """`t` summed (or maxed) over the ranks, in place; None stays None (on every rank alike)."""
    if t is None or world() == 1:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (small picklable metadata), in rank order."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_state(modules: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does when it wraps a model)."""
    if world() == 1:
        return
    with torch.no_grad():
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                dist.broadcast(t.data, src=0)


class GradientSync:
    """Averages gradients (and floating buffers) of data-parallel replicas; a no-op in one process.

    Per step: `weight(n)` is the factor a rank multiplies its shard loss by (its share of the global
    batch times the world size), `reduce(params, loss)` all-reduces the gradients and returns the
    global batch's mean loss, `buffers(modules)` averages the floating buffers.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.size = world()
        self.rank = rank()
        self.device = torch.device(device)  # where collectives run (nccl: the GPU)

    @property
    def active(self) -> bool:
        return self.size > 1

    def split(self, batch: Any) -> tuple[Any, float] | None:
        """(this rank's shard, the factor its mean loss is weighted by) for a global batch, or None
        (on every rank alike) for a batch too small to give each rank a row."""
        if not self.active:
            return batch, 1.0
        n = batch_size(batch)
        if n is None:
            raise NNCompressError("data-parallel training: a batch holds no tensor with a batch dimension to split "
                                  "across ranks; run one process")
        if n < self.size:
            return None
        part = shard(batch, n, self.rank, self.size)
        rows = n * (self.rank + 1) // self.size - n * self.rank // self.size
        return part, rows * self.size / n

    def reduce(self, params: list[torch.nn.Parameter], loss: float) -> float:
        """Average the gradients of `params` over the ranks; `loss` is this rank's weighted shard loss,
        the result the global batch's mean loss."""
        if not self.active:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else self.device
        flat = torch.cat([_flat(grads), torch.tensor([loss / self.size], dtype=torch.float32, device=device)]) \
            if grads else torch.tensor([loss / self.size], device=device)
        dist.all_reduce(flat)
        flat[:-1].div_(self.size)
        _unflat(flat[:-1], grads)
        return float(flat[-1])

    def buffers(self, modules: Iterable[nn.Module]) -> None:
        if not self.active:
            return
        bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = _flat(bufs)
        dist.all_reduce(flat)
        flat.div_(self.size)
        with torch.no_grad():
            _unflat(flat, bufs)


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, differentiable: the backward sums the ranks' gradients (each rank's loss
    reads every rank's rows through the statistics)."""
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t)


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training forward uses the statistics of the rows of every rank (the same
    mean and variance, and the same running-statistics update, as one process given the whole batch).
    Never constructed: `data_parallel` lends this class to existing BatchNorm modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1, *[1] * (x.ndim - 2)]
        rows = x.new_tensor([x.numel() // max(x.shape[1], 1)], dtype=torch.float64)
        sums = _global_sum(torch.cat([x.sum(dims, dtype=torch.float64), rows]))  # one all-reduce: sums, rows
        total, count = sums[:-1], sums[-1]
        mean = total / count
        centred = x - mean.to(x.dtype).view(shape)
        var = _global_sum((centred.double() ** 2).sum(dims)) / count  # two passes, as one process's BatchNorm
        out = centred * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                n = float(count)
                unbiased = var * n / max(n - 1, 1.0)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out


_TRAINING = False  # inside `data_parallel`: every rank runs the same forward passes in step


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[None]:
    """The training loop's section where ranks move in step: every BatchNorm of `model` normalises over
    the global batch (its class is lent `_GlobalBatchNorm`'s forward; parameters, buffers, names and
    hooks stay as they are, and its own class comes back afterwards), and `global_rows` gathers. A
    no-op in one process."""
    global _TRAINING
    if world() == 1:
        yield
        return
    swapped = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            cls = type(m)
            m.__class__ = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
            swapped.append((m, cls))
    _TRAINING = True
    try:
        yield
    finally:
        _TRAINING = False
        for m, cls in swapped:
            m.__class__ = cls


def global_rows(x: torch.Tensor) -> torch.Tensor:
    """Inside `data_parallel`, the rows of every rank's shard of `x`, in rank order: the tensor one
    process would see for the global batch (for statistics that cannot be summed, like an observer's
    quantiles). Elsewhere `x` itself: calibration and measurement run whole on each rank."""
    if not _TRAINING or world() == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world())]  # nccl: on the GPU
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    most = int(max(sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])
