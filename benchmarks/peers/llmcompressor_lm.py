"""llm-compressor on the benchmark's causal LM, in its own virtual environment (it pins transformers
<= 5.17; nncompress runs on a newer one). It never imports nncompress: it reads a Hugging Face folder
and a safetensors file of token windows that benchmarks/lm.py wrote, compresses with llm-compressor's
`oneshot`, measures perplexity with the same formula, and prints one JSON line.

    .venv-peers/bin/python benchmarks/peers/llmcompressor_lm.py --model DIR --tokens FILE --method gptq_w4a16
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory import peak_mb, reset_peak  # noqa: E402  (benchmarks/memory.py: no nncompress import)


def perplexity(model, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits = model(input_ids=x[i:i + batch], use_cache=False).logits
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y[i:i + batch].flatten(),
                                                           reduction="sum"))
            n += y[i:i + batch].numel()
    return math.exp(nll / n)


def byte_tokenizer():
    """The model reads bytes (ids 0..255) and the windows come tokenized: llm-compressor still wants a
    processor, so it gets one whose vocabulary is the 256 byte values."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i:02x}>": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<00>")),
                                   pad_token="<00>")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--method", required=True, choices=("gptq_w4a16", "sparsegpt_24", "wanda_24"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot

    tokens = load_file(args.tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    calib = tokens["calib"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    if args.method == "gptq_w4a16":
        from llmcompressor.modifiers.quantization import GPTQModifier
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    elif args.method == "sparsegpt_24":
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        recipe = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    before = reset_peak()
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, processor=byte_tokenizer(), num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    model.eval()
    print(json.dumps({"method": args.method, "seconds": seconds, "memory_mb": peak - before,
                      "ppl": perplexity(model, tokens["test_x"], tokens["test_y"]),
                      "ppl_ood": perplexity(model, tokens["ood_x"], tokens["ood_y"])}))


if __name__ == "__main__":
    main()
