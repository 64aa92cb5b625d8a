"""Optimizers for fine-tuning compressed models: `Adam8bit` (AdamW with 8-bit block-wise quantized
moments, Dettmers et al. 2022) and `optimizer_state_bytes` to report the memory saved.

    from nncompress.optim import Adam8bit, optimizer_state_bytes
    opt = Adam8bit(model.parameters(), lr=1e-4)

or, in the shared training loop, `TrainConfig(optimizer="adam8bit")`. A low layer: imports only
torch and core.
"""
from .adam8bit import Adam8bit, optimizer_state_bytes
from .blockwise import blockwise_bytes, dequantize_blockwise, dynamic_map, quantize_blockwise, quantize_to_map

__all__ = ["Adam8bit", "optimizer_state_bytes", "dynamic_map", "quantize_to_map", "quantize_blockwise",
           "dequantize_blockwise", "blockwise_bytes"]
