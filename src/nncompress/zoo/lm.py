"""A causal language model workload that runs offline: byte-level text and a small LLaMA.

`text` (data) cuts the Python reference manual shipped with the interpreter (`pydoc_data`, ~466 kB
of English prose and code) into byte tokens: vocabulary 256, no tokenizer to download. Whole topics
are held out for the test split, so test text is never trained or calibrated on; `domain="legal"`
tests on the licence agreements shipped with the stdlib (`LICENSE.txt`) instead, a domain the
training text does not cover. Batches are `(input_ids, targets)`, both (B, seq_len) int64, targets
being the inputs shifted by one token: the task is `language_model`, judged by perplexity.

`tiny_llama` (model) is transformers' `LlamaForCausalLM` (RMSNorm, rotary positions, SwiGLU MLP,
grouped-query attention) at a size two CPU cores train in minutes, wrapped as `CausalLM` so that
`forward(input_ids)` returns the logits tensor (B, T, vocab). Its defaults keep every Linear's
input width a multiple of 128, so group-wise 4-bit schemes (g128) apply to all of them.

>>> data = text(batch_size=2, seq_len=16)
>>> x, y = next(iter(data.test))
>>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all()), data.task
((2, 16), True, 'language_model')
>>> model = tiny_llama(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
>>> tuple(model(x).shape)
(2, 16, 256)
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..core import DataError, ModelLoadError, register
from .data import DataBundle, _check_positive, _loaders

__all__ = ["CausalLM", "ByteWindows", "docs_topics", "legal_text", "text", "tiny_llama", "TEST_EVERY"]

TEST_EVERY = 8  # every 8th topic of the manual (sorted by name, from the 4th) is held out for testing
VOCAB = 256     # byte tokens


def docs_topics() -> dict[str, str]:
    """The reference manual's topics (`pydoc_data.topics`), name -> text."""
    from pydoc_data.topics import topics
    return dict(topics)


def legal_text() -> str:
    """The licence agreements shipped with the interpreter (`LICENSE.txt` of the stdlib)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise DataError(f"data 'text': domain 'legal' reads {path}, which this Python does not ship; "
                        "use domain: docs")
    return path.read_text(encoding="utf-8")


def _bytes(texts: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n\n".join(texts).encode("utf-8")), dtype=torch.long)


class ByteWindows(Dataset):
    """Non-overlapping windows of a token stream: item i is `(tokens[a:a+T], tokens[a+1:a+T+1])`,
    a = i*T, so every token after the first is predicted exactly once over the dataset."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = i * self.seq_len
        return self.tokens[a:a + self.seq_len], self.tokens[a + 1:a + self.seq_len + 1]


@register("text", namespace="data")
def text(batch_size: int = 16, seq_len: int = 128, calib: int = 64, domain: str = "docs", seed: int = 0
         ) -> DataBundle:
    """Byte-level text for a causal LM (see the module docstring).

    train:  the manual's topics but the held-out ones (every `TEST_EVERY`th), as one byte stream
    test:   the held-out topics (domain "docs"), or the stdlib licences (domain "legal")
    calib:  the first `calib` windows of the train stream, in order (never test text)
    """
    for field, value, example in (("batch_size", batch_size, 16), ("seq_len", seq_len, 128), ("calib", calib, 64)):
        _check_positive("text", field, value, example)
    if domain not in ("docs", "legal"):
        raise DataError(f"data 'text': domain must be 'docs' (held-out topics of the manual) or 'legal' "
                        f"(the stdlib licences), got {domain!r}")
    topics = docs_topics()
    names = sorted(topics)
    held = {k for i, k in enumerate(names) if i % TEST_EVERY == 3}
    train = ByteWindows(_bytes([topics[k] for k in names if k not in held]), seq_len)
    test = ByteWindows(_bytes([topics[k] for k in names if k in held] if domain == "docs" else [legal_text()]),
                       seq_len)
    if len(test) < 1 or len(train) < calib:
        raise DataError(f"data 'text': seq_len={seq_len} leaves {len(train)} train and {len(test)} test windows "
                        f"(need >= calib={calib} and >= 1); lower seq_len or calib")
    head = torch.utils.data.Subset(train, range(calib))
    loaders = _loaders("text", train, test, head, batch_size, seed)
    return DataBundle(*loaders, task="language_model", num_classes=VOCAB, name="text")


class CausalLM(nn.Module):
    """A transformers causal LM (kept as `.model`) whose forward maps input_ids (B, T) to logits (B, T, V)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # parameter names read `model.model.layers.0.self_attn.q_proj...`

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@register("tiny_llama", namespace="model")
def tiny_llama(hidden: int = 256, layers: int = 4, heads: int = 8, kv_heads: int = 4, intermediate: int = 768,
               vocab: int = VOCAB, max_len: int = 1024) -> CausalLM:
    """A LLaMA-architecture causal LM (about 3.3M parameters at the defaults), randomly initialised;
    train it with the recipe's `pretrain` (cached by content hash) on data `text`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for field, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv_heads", kv_heads),
                         ("intermediate", intermediate), ("vocab", vocab), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"model 'tiny_llama': {field} must be a positive integer, got {value!r}")
    if hidden % heads or heads % kv_heads:
        raise ModelLoadError(f"model 'tiny_llama': hidden={hidden} must divide by heads={heads}, and heads by "
                             f"kv_heads={kv_heads} (grouped-query attention); e.g. hidden 256, heads 8, kv_heads 4")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "eager"  # plain ops: exports to ONNX and traces like the rest of the model
    return CausalLM(LlamaForCausalLM(cfg)).eval()

