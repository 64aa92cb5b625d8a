"""Hugging Face folders (the `save_pretrained` layout) that transformers loads alone, with the right weights.

    save_hf(model, "out/hf", inputs)

`model` is a transformers model or an nncompress wrapper holding one as `.model` (`CausalLM`,
`SentenceEncoder`). A compressed model is first merged into the plain layers it computes (quantized
weights dequantized, factorized layers multiplied out), so the folder holds float weights: it is no
smaller than the float model's (pruned shapes aside). The config is rewritten for the shapes it can
express: the number of layers, and per model type the widths a pruning changed (LLaMA: hidden size,
heads, key/value heads, head_dim, MLP width; BERT: MLP width), when every layer agrees.

Then the folder is checked the way a user would load it: transformers builds the model from the
folder alone and must find exactly the saved tensors with the saved shapes, and its outputs on
`inputs` must match the nncompress model's. Anything else (per-layer head counts BERT's config cannot
hold, a layer transformers does not know, a different output) is an `ExportError` naming why and the
alternatives, and nothing is written: never a folder that loads "successfully" with wrong weights.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import NNCompressError
from ..eval.measure import call_model
from ..core.merge import merge
from .atomic import atomic_dir

__all__ = ["ExportError", "save_hf", "save_compressed_tensors", "save_sentence_transformers", "hf_model_of", "token_inputs"]

REL_TOL = 1e-4
_ALTERNATIVES = "save it with nncompress.save (which replays the edits on load) or export ONNX instead"


class ExportError(NNCompressError):
    """A model that cannot be written in a format so that the format's own tool loads it correctly."""


def hf_model_of(model: nn.Module) -> nn.Module:
    """The transformers `PreTrainedModel` in `model` (itself, or the `.model` of a wrapper)."""
    from transformers import PreTrainedModel

    for m in (model, getattr(model, "model", None)):
        if isinstance(m, PreTrainedModel):
            return m
    raise ExportError(f"{type(model).__name__} is not a transformers model nor wraps one as .model; only Hugging "
                      f"Face models have a save_pretrained layout: {_ALTERNATIVES}")


def save_hf(model: nn.Module, folder: str | os.PathLike, inputs: Any = None, overwrite: bool = False) -> Path:
    """Write `model` as a transformers folder at `folder` (see the module docstring) and return it.

    inputs:    example inputs of `model` (its own call convention) on which transformers' reload must
               give the same outputs; default: token ids drawn from the vocabulary (`token_inputs`)
    overwrite: replace an existing folder (never done silently)
    """
    return _publish(folder, overwrite, lambda staged: _write_hf(model, staged, inputs))


def save_compressed_tensors(model: nn.Module, folder: str | os.PathLike, inputs: Any = None,
                            overwrite: bool = False) -> Path:
    """Write `model` as a transformers folder whose integer-quantized Linears are stored in the
    compressed-tensors format (`pack-quantized`: the codes packed into int32, one scale per group or
    channel, and a `quantization_config` in config.json), which transformers loads with the
    compressed-tensors package. Weight-only integer specs (2-8 bits, symmetric, per group along the
    fan-in, per channel or per tensor) are written quantized; any other layer as float. Checked by
    transformers' reload as `save_hf` is."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("the compressed-tensors format needs the compressed-tensors package (which transformers "
                          "also needs to load it): pip install compressed-tensors") from None
    return _publish(folder, overwrite, lambda staged: _write_hf(model, staged, inputs, packed=True))


def save_sentence_transformers(model: nn.Module, folder: str | os.PathLike, tokenizer: Any,
                               sentences: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write a `SentenceEncoder` (mean pooling, unit norm) as a sentence-transformers folder:
    the transformer and its tokenizer at the root, then Pooling (mean) and Normalize modules. Checked
    by `SentenceTransformer(folder)` encoding `sentences` as the nncompress model embeds them."""
    from ..zoo.hf import SentenceEncoder

    if not isinstance(model, SentenceEncoder):
        raise ExportError(f"{type(model).__name__}: a sentence-transformers folder is written for a SentenceEncoder "
                          f"(mean pooling, unit norm), e.g. hf:minilm; use the hf format for other models")
    sentences = sentences or ["A sentence to embed.", "Compression keeps what the model computes, in fewer bytes."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def fill(staged: Path) -> None:
        _write_hf(model, staged, inputs)
        _quietly(tokenizer.save_pretrained, staged)
        width = hf_model_of(model).config.hidden_size
        (staged / "1_Pooling").mkdir()
        (staged / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": width, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
        (staged / "2_Normalize").mkdir()
        longest = min(int(getattr(tokenizer, "model_max_length", 512)),
                      int(getattr(hf_model_of(model).config, "max_position_embeddings", 512)))
        (staged / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": longest, "do_lower_case": False}, indent=2))
        (staged / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], indent=2))
        _check_sentence_transformers(model, staged, sentences, inputs)

    return _publish(folder, overwrite, fill)


def _check_sentence_transformers(model: nn.Module, staged: Path, sentences: list[str], inputs: Any) -> None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ExportError("the sentence-transformers format is checked by loading it with sentence-transformers, "
                          "which is not installed: pip install sentence-transformers") from None
    with torch.no_grad():
        expected = merge(copy.deepcopy(model).eval())(**inputs).double()
    got = torch.as_tensor(SentenceTransformer(str(staged), device="cpu").encode(sentences, convert_to_numpy=True)
                          ).double()
    err = float((got - expected).norm() / expected.norm()) if got.shape == expected.shape else float("inf")
    if not err <= REL_TOL:
        raise ExportError(f"{type(model).__name__}: SentenceTransformer loads the folder but embeds differently "
                          f"(relative error {err:.2e} > {REL_TOL:.0e}); {_ALTERNATIVES}")


def _publish(folder: str | os.PathLike, overwrite: bool, fill: Any) -> Path:
    """Fill a staging folder beside `folder` with `fill(staged)` (which writes and checks everything),
    then move it into place: a failure leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} exists; choose another folder or pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nncompress-export-", dir=folder.parent) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        fill(staged)
        if folder.exists():
            shutil.rmtree(folder)
        with atomic_dir(folder) as out:
            for f in staged.iterdir():
                f.replace(out / f.name)
    return folder


def _write_hf(model: nn.Module, staged: Path, inputs: Any, packed: bool = False) -> None:
    """The transformers folder of `model` in `staged` (an empty folder), reloaded and compared;
    `packed`: the integer-quantized Linears in the compressed-tensors format."""
    quantized = _integer_linears(model) if packed else {}
    plain = merge(copy.deepcopy(model).eval())
    hf = hf_model_of(plain)
    inputs = token_inputs(plain) if inputs is None else inputs
    odd = sorted({type(m).__name__ for m in hf.modules() if type(m).__module__.startswith("nncompress")})
    if odd:
        raise ExportError(f"{type(hf).__name__}: layers {', '.join(odd)} have no transformers equivalent even merged; "
                          f"{_ALTERNATIVES}")
    hf.config = _rewritten_config(hf)
    with torch.no_grad():
        expected = call_model(plain, inputs)
    if quantized:
        compressor = _pack(hf, quantized)
        _quietly(hf.save_pretrained, staged)
        compressor.update_config(str(staged))
    else:
        _quietly(hf.save_pretrained, staged)
    _check_reload(plain, hf, staged, inputs, expected)


def _integer_linears(model: nn.Module) -> dict[str, tuple[Any, torch.Tensor]]:
    """{name relative to the transformers model: (compressed-tensors QuantizationArgs, scale)} of every
    weight-only integer-quantized Linear; an `ExportError` for a quantized layer the format cannot hold."""
    from compressed_tensors.quantization import QuantizationArgs

    from ..formats import IntFormat, PerChannel, PerGroup, PerTensor
    from ..quant.fake_quant import QuantWrapper

    hf = hf_model_of(model)
    out = {}
    for name, m in hf.named_modules():
        if not isinstance(m, QuantWrapper) or m.weight_quant is None:
            continue
        spec, fq = m.weight_quant.spec, m.weight_quant
        g = spec.granularity
        why = ("activations are quantized too (compressed-tensors here holds weight-only schemes)"
               if m.input_quant is not None else
               "not a Linear" if not isinstance(m.base, nn.Linear) else
               f"{type(spec.format).__name__} is not a signed symmetric integer grid of 2-8 bits"
               if not (isinstance(spec.format, IntFormat) and spec.format.symmetric and spec.format.signed
                       and 2 <= spec.format.bits <= 8) else
               "no scale (calibrate first)" if fq.scale is None else
               f"{type(g).__name__} is not per group along the fan-in, per channel or per tensor"
               if not (isinstance(g, (PerTensor, type(None))) or (isinstance(g, PerChannel) and g.axis == 0)
                       or (isinstance(g, PerGroup) and g.axis in (1, -1))) else None)
        if why:
            raise ExportError(f"{name}: {why}; export with format hf (float weights) or {_ALTERNATIVES}")
        strategy = ("group" if isinstance(g, PerGroup) else "channel" if isinstance(g, PerChannel) else "tensor")
        args = QuantizationArgs(num_bits=spec.format.bits, type="int", symmetric=True, strategy=strategy,
                                group_size=g.size if isinstance(g, PerGroup) else None)
        out[name] = (args, fq.scale.detach().clone())
    if not out:
        raise ExportError(f"{type(hf).__name__}: no integer-quantized Linear to pack; export with format hf")
    return out


def _pack(hf: nn.Module, quantized: dict[str, tuple[Any, torch.Tensor]]) -> Any:
    """Attach compressed-tensors schemes to the (merged, float) Linears named in `quantized`, with
    their scales, and compress them in place (codes = round(w / scale) of the dequantized weights:
    exactly the integer codes). Returns the compressor, which writes `quantization_config`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    by_args: dict[str, list[str]] = {}
    for name, (args, _) in quantized.items():
        by_args.setdefault(args.model_dump_json(), []).append(name)
    groups = {f"group_{i}": QuantizationScheme(targets=sorted(names), weights=quantized[names[0]][0])
              for i, names in enumerate(by_args.values())}
    apply_quantization_config(hf, QuantizationConfig(config_groups=groups, quantization_status="frozen"))
    modules = dict(hf.named_modules())
    with torch.no_grad():
        for name, (_, scale) in quantized.items():
            modules[name].weight_scale.data.copy_(scale.reshape(modules[name].weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(hf, quantization_format="pack-quantized")
    with contextlib.redirect_stderr(io.StringIO()):  # its per-module progress bar
        compressor.compress_model(hf)
    return compressor


def token_inputs(model: nn.Module, batch: int = 2, length: int = 16) -> Any:
    """Token ids (B, T) drawn from the vocabulary with a fixed seed, with an all-ones `attention_mask`
    when `model.forward` takes one (an encoder), in the call convention of `model`."""
    import inspect

    vocab = int(getattr(hf_model_of(model).config, "vocab_size", 0) or 256)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    if "attention_mask" in inspect.signature(model.forward).parameters:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return ids


def _rewritten_config(hf: nn.Module) -> Any:
    """A copy of `hf.config` with the widths the pruned layers now have, where every layer agrees."""
    config = copy.deepcopy(hf.config)
    layers = _layer_stack(hf)
    if layers is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(layers)
    if layers is None or not len(layers):
        return config
    kind = getattr(config, "model_type", "")
    if kind in ("llama", "mistral", "qwen2"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        widths = {"intermediate_size": [layer.mlp.gate_proj.out_features for layer in layers],
                  "num_attention_heads": [layer.self_attn.q_proj.out_features // head_dim for layer in layers],
                  "num_key_value_heads": [layer.self_attn.k_proj.out_features // head_dim for layer in layers]}
        config.head_dim = head_dim
        config.hidden_size = hf.get_input_embeddings().embedding_dim  # the residual stream, if it was pruned
    elif kind == "bert":
        widths = {"intermediate_size": [layer.intermediate.dense.out_features for layer in layers]}
    else:
        return config  # the reload check below decides
    for field, values in widths.items():
        if len(set(values)) > 1:
            raise ExportError(f"{type(hf).__name__}: {field} differs between layers ({_ranges(values)}), which a "
                              f"{kind} config cannot express (one value for every layer); prune every layer alike "
                              f"(scope: local with one ratio) for a Hugging Face folder, or {_ALTERNATIVES}")
        setattr(config, field, values[0])
    return config


def _layer_stack(hf: nn.Module) -> nn.ModuleList | None:
    for path in ("model.layers", "layers", "encoder.layer", "bert.encoder.layer"):
        try:
            stack = hf.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            return stack
    return None


def _quietly(fn: Any, *args: Any) -> Any:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _ranges(values: list[int]) -> str:
    return f"{min(values)}..{max(values)}" if min(values) != max(values) else str(values[0])


def _check_reload(plain: nn.Module, hf: nn.Module, staged: Path, inputs: Any, expected: Any) -> None:
    """Load `staged` as transformers would (its own class, from the folder alone), insist on every
    tensor being found with its shape, and compare the outputs of `plain` with the reloaded model."""
    from transformers.utils import logging as hf_logging

    was, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        reloaded, info = type(hf).from_pretrained(staged, output_loading_info=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers refusing the folder is the finding
        raise ExportError(f"{type(hf).__name__}: transformers cannot load the folder written for it ({_first(e)}); "
                          f"{_ALTERNATIVES}") from None
    finally:
        hf_logging.set_verbosity(was)
        if bars:
            hf_logging.enable_progress_bar()
    wrong = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if wrong:
        kind, keys = next(iter(wrong.items()))
        raise ExportError(f"{type(hf).__name__}: transformers loads the folder with {kind.replace('_', ' ')} "
                          f"({', '.join(map(str, list(keys)[:3]))}{', ...' if len(keys) > 3 else ''}), so its weights "
                          f"would be wrong; {_ALTERNATIVES}")
    if plain is hf:
        twin = reloaded.eval()
    else:  # the wrapper (pooling, logits) around the reloaded model: `plain` is a merged copy, ours to change
        plain.model, twin = reloaded.eval(), plain
    with torch.no_grad():
        got = call_model(twin, inputs)
    a, b = _tensor(expected), _tensor(got)
    err = float((a - b).norm() / a.norm().clamp(min=1e-12)) if a.shape == b.shape else float("inf")
    if not err <= REL_TOL:
        raise ExportError(f"{type(hf).__name__}: the folder reloaded by transformers gives different outputs "
                          f"(relative error {err:.2e} > {REL_TOL:.0e}); {_ALTERNATIVES}")


def _tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.double()
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr).double()
    return next(v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor)).double()


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
