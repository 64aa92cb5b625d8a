"""Built-in data, each builder registered in the `data` namespace, all offline and deterministic.

A builder returns a `DataBundle`: train/test/calibration loaders plus what the task is.
Classification loaders yield `(x, y)`; embedding loaders yield dicts `{input_ids, attention_mask}`.

>>> data = digits(batch_size=16)
>>> x, y = next(iter(data.train))
>>> tuple(x.shape), x.dtype, tuple(y.shape), data.num_classes
((16, 64), torch.float32, (16,), 10)
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..core import DataError, register
from ..core.calibration import batch_inputs

__all__ = ["DataBundle", "digits", "mnist1d", "sentence_corpus", "sentences", "default_cache_dir"]

Inputs = Any  # a tensor (classification) or a dict of tensors (embedding)


@dataclasses.dataclass
class DataBundle:
    """Loaders and task description for one data set.

    train/test/calib: DataLoaders; calib is small and unshuffled (for calibration and statistics)
    task:             "classification" (batches `(x, y)`), "embedding" (batches: dicts of tensors) or
                      "language_model" (batches `(input_ids, targets)`, both (B, T): next-token prediction)
    num_classes:      the number of classes (a language model's: its vocabulary), or None (embedding, unknown)
    name:             the data set's name, for reports
    """

    train: DataLoader
    test: DataLoader
    calib: DataLoader
    task: Literal["classification", "embedding", "language_model"] = "classification"
    num_classes: int | None = None
    name: str = ""

    def example_batch(self, batch_size: int = 2) -> Inputs:
        """Model inputs of exactly `batch_size` samples, taken in order from `calib` (deterministic).

        >>> tuple(digits().example_batch(3).shape)
        (3, 64)
        """
        _check_positive(self.name or "data", "batch_size", batch_size, 2)
        parts, have = [], 0
        for batch in self.calib:
            inputs = batch_inputs(batch)
            parts.append(inputs)
            have += _batch_len(inputs)
            if have >= batch_size:
                break
        if have < batch_size:
            raise DataError(f"data {self.name!r}: example_batch({batch_size}) asks for more samples than the "
                            f"calibration set holds ({have}); ask for at most {have}")
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts])[:batch_size] for k in parts[0]}
        return torch.cat(parts)[:batch_size]


def _batch_len(inputs: Inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def _check_positive(name: str, field: str, value: Any, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"data {name!r}: {field} must be a positive integer, got {value!r}; pass e.g. {field}={example}")


def _loaders(name: str, train: Dataset, test: Dataset, calib: Dataset, batch_size: int, seed: int
             ) -> tuple[DataLoader, DataLoader, DataLoader]:
    # a private seeded generator: the shuffle order is a function of `seed`, not of global RNG state
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(test, batch_size=batch_size, shuffle=False),
            DataLoader(calib, batch_size=batch_size, shuffle=False))


def default_cache_dir() -> Path:
    """`~/.cache/nncompress`: where generated data is kept between runs."""
    return Path.home() / ".cache" / "nncompress"


# ---------------------------------------------------------------------------------------------- mnist1d

def _mnist1d_arrays(cache_dir: Path) -> dict[str, np.ndarray]:
    """The standard MNIST-1D split (4000 train / 1000 test, length 40), cached as .npz in `cache_dir`."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args["package_version"] = importlib.metadata.version("mnist1d")  # a new generator invalidates the cache
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"mnist1d-{key}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in keys}
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a corrupt or foreign file: regenerate and overwrite it
    # make_dataset reseeds the global `random` and numpy RNGs; put them back afterwards
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
              "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}
    _atomic_savez(path, arrays)
    return arrays


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial write
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@register("mnist1d", namespace="data")
def mnist1d(batch_size: int = 128, seed: int = 0, cache_dir: str | Path | None = None) -> DataBundle:
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of 40 floats, 10 classes.

    The arrays are the package's standard split (its own fixed seed); `seed` sets the train shuffle
    order and which 512 training samples form `calib`. Generated once, then read from
    `cache_dir/mnist1d-<hash>.npz` (default `~/.cache/nncompress`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     data = mnist1d(cache_dir=cache)
    >>> tuple(data.example_batch(4).shape), len(data.train.dataset), len(data.calib.dataset)
    ((4, 40), 4000, 512)
    """
    _check_positive("mnist1d", "batch_size", batch_size, 128)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"data 'mnist1d': seed must be an integer, got {seed!r}; pass e.g. seed=0")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    a = _mnist1d_arrays(cache)
    x, y = torch.from_numpy(a["x"]), torch.from_numpy(a["y"])  # (4000, 40) float32, (4000,) int64
    xt, yt = torch.from_numpy(a["x_test"]), torch.from_numpy(a["y_test"])  # (1000, 40), (1000,)
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(x))[:512]))
    train, test, calib = _loaders("mnist1d", TensorDataset(x, y), TensorDataset(xt, yt),
                                  TensorDataset(x[idx], y[idx]), batch_size, seed)
    return DataBundle(train, test, calib, task="classification", num_classes=10, name="mnist1d")


# ----------------------------------------------------------------------------------------------- digits

@register("digits", namespace="data")
def digits(batch_size: int = 64, seed: int = 0) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits as (N, 64) floats in [0, 1]; stratified 80/20 split.

    >>> data = digits()
    >>> len(data.train.dataset), len(data.test.dataset), data.num_classes
    (1437, 360, 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_positive("digits", "batch_size", batch_size, 64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"data 'digits': seed must be an integer, got {seed!r}; pass e.g. seed=0")
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # (1797, 64), pixel values 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    y_tr, y_te = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    n_cal = min(512, len(x_tr))
    train, test, calib = _loaders("digits", TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te),
                                  TensorDataset(x_tr[:n_cal], y_tr[:n_cal]), batch_size, seed)
    return DataBundle(train, test, calib, task="classification", num_classes=10, name="digits")


# -------------------------------------------------------------------------------------------- sentences

def sentence_corpus(n: int | None = None) -> list[str]:
    """English sentences from the Python reference manual shipped with the interpreter (`pydoc_data`).

    Prose paragraphs of every topic (sorted keys; indented code and grammar blocks skipped) are split
    into sentences; kept are those of 40..200 characters, mostly letters, starting with a capital and
    ending with `.`, `!` or `?`, without duplicates. The order is then shuffled by a fixed seed so any
    prefix spans many topics. Returns the first `n` (all when None).

    >>> corpus = sentence_corpus()
    >>> len(corpus) >= 200, all(40 <= len(s) <= 200 for s in corpus)
    (True, True)
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(line.startswith("   ") for line in lines):  # indented: code, grammar or a table
                continue
            text = " ".join(line.strip() for line in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                if s not in seen and _is_prose(s):
                    seen.add(s)
                    out.append(s)
    random.Random(0).shuffle(out)  # a private RNG: deterministic, global state untouched
    return out if n is None else out[:n]


def _is_prose(s: str) -> bool:
    if not (40 <= len(s) <= 200 and s[0].isupper() and s[-1] in ".!?"):
        return False
    return sum(c.isalpha() or c == " " for c in s) / len(s) >= 0.9


class _Encoded(Dataset):
    """Tokenized sentences: item i is `{name: tensor (max_length,)}`; the default collate stacks them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


@register("sentences", namespace="data")
def sentences(tokenizer: Callable[..., Any] | None = None, batch_size: int = 32, max_length: int = 64,
              n: int = 512, seed: int = 0) -> DataBundle:
    """`n` sentences of the stdlib corpus (`sentence_corpus`), tokenized for an embedding model.

    Batches are `{"input_ids", "attention_mask"}` int64 tensors of shape (B, max_length).
    Split in corpus order: test is the last 25%, train the rest, calib the first min(128, train).

    >>> from nncompress.zoo.hf import load_hf
    >>> _, tok = load_hf("minilm")
    >>> batch = next(iter(sentences(tok, batch_size=4).train))
    >>> sorted(batch), tuple(batch["input_ids"].shape)
    (['attention_mask', 'input_ids'], (4, 64))
    """
    if tokenizer is None or not callable(tokenizer):
        raise DataError("data 'sentences': needs a Hugging Face tokenizer, got "
                        f"{type(tokenizer).__name__}; use it with an hf: model (e.g. model name 'hf:minilm')")
    _check_positive("sentences", "batch_size", batch_size, 32)
    _check_positive("sentences", "max_length", max_length, 64)
    _check_positive("sentences", "n", n, 512)
    corpus = sentence_corpus()
    if n < 4 or n > len(corpus):
        raise DataError(f"data 'sentences': n={n} is outside 4..{len(corpus)} (the corpus size); pass e.g. n=512")
    texts = corpus[:n]
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    tensors = {k: enc[k].to(torch.long) for k in ("input_ids", "attention_mask")}  # each (n, max_length)
    n_test = n // 4
    n_train = n - n_test
    def rows(a: int, b: int) -> _Encoded:
        return _Encoded({k: v[a:b] for k, v in tensors.items()})

    train, test, calib = _loaders("sentences", rows(0, n_train), rows(n_train, n), rows(0, min(128, n_train)),
                                  batch_size, seed)
    return DataBundle(train, test, calib, task="embedding", num_classes=None, name="sentences")
