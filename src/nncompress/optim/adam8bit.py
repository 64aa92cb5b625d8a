"""`Adam8bit`: AdamW whose two moments are stored as 8-bit block-wise dynamic codes (Dettmers et al. 2022).

Each step dequantizes m and v to float32, runs exactly torch's AdamW update on them (decoupled
weight decay, bias correction), updates the parameter from these float32 moments, and stores them
back as codes: quantization error enters only through the stored state, never through the current
update. Tensors smaller than `min_8bit_size` (biases, LayerNorm weights) keep float32 moments, as
in bitsandbytes: for them the absmax overhead outweighs the saving and they are the most sensitive.

    opt = Adam8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    ...
    optimizer_state_bytes(opt)    # ~ 2 bytes per parameter instead of 8

Not done here (bitsandbytes has them): percentile gradient clipping and `StableEmbedding`
(a LayerNorm'd embedding the paper recommends for NLP models trained from scratch).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..core.errors import ConfigError
from .blockwise import dequantize_blockwise, dynamic_map, quantize_blockwise

__all__ = ["Adam8bit", "optimizer_state_bytes"]

_CODES = ("m_codes", "v_codes")
_ABSMAX = ("m_absmax", "v_absmax")


class Adam8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise quantized moments.

    lr, betas, eps, weight_decay: as `torch.optim.AdamW` (same defaults)
    block_size:    elements per absmax block of the quantized moments (2048 in the paper)
    min_8bit_size: tensors with fewer elements keep float32 moments (4096, as bitsandbytes)

    >>> w = torch.nn.Parameter(torch.ones(8192))
    >>> opt = Adam8bit([w], lr=0.1)
    >>> w.grad = torch.full_like(w, 2.0)
    >>> opt.step()
    >>> round(float(w.detach()[0]), 6), opt.state[w]["m_codes"].dtype    # first step moves every weight by lr
    (0.899, torch.uint8)
    >>> optimizer_state_bytes(opt)   # 2 x (8192 codes + 4 blocks x 4 bytes) + step; AdamW: 65540
    16420
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, block_size: int = 2048,
                 min_8bit_size: int = 4096):
        if not lr >= 0:
            raise ConfigError("lr", f"must be >= 0, got {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"betas[{i}]", f"must be in [0, 1), got {b}")
        if not eps >= 0:
            raise ConfigError("eps", f"must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {weight_decay}")
        if block_size < 1:
            raise ConfigError("block_size", f"must be >= 1, got {block_size} (the paper uses 2048)")
        if min_8bit_size < 0:
            raise ConfigError("min_8bit_size", f"must be >= 0, got {min_8bit_size}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self._qmaps: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _maps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(signed map for m, unsigned map for v) on `device`, built once."""
        if device not in self._qmaps:
            self._qmaps[device] = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; `closure` re-evaluates the loss, as for any torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("params", "Adam8bit does not take sparse gradients; use torch.optim.SparseAdam")
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, block = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
        state = self.state[p]
        quantized = p.numel() >= group["min_8bit_size"]
        if not state:
            state["step"] = torch.tensor(0.0)
            if quantized:
                zeros = torch.zeros(p.numel(), device=p.device)
                for codes, absmax, qmap in zip(_CODES, _ABSMAX, self._maps(p.device)):
                    state[codes], state[absmax] = quantize_blockwise(zeros, qmap, block)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        step = float(state["step"])
        grad = p.grad.float()
        if quantized:
            qm, qv = self._maps(p.device)
            exp_avg = dequantize_blockwise(state["m_codes"], state["m_absmax"], qm, block).view_as(grad)
            exp_avg_sq = dequantize_blockwise(state["v_codes"], state["v_absmax"], qv, block).view_as(grad)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # torch.optim.AdamW's single-tensor update, op for op (the fp32 path matches it bit for bit)
        param = p if p.dtype == torch.float32 else p.float()
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if quantized:
            # An 8-bit second moment can round to 0 where the first does not (tiny gradients in a block
            # with large ones), and m / (sqrt(0) + eps) is a step of ~m / eps. Keep v_hat >= m_hat^2,
            # which bounds every element's step by lr, as AdamW's are in practice.
            floor = exp_avg.square() * ((1 - beta2 ** step) / (1 - beta1 ** step) ** 2)
            torch.maximum(exp_avg_sq, floor, out=exp_avg_sq)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if param is not p:
            p.copy_(param)
        if quantized:
            state["m_codes"], state["m_absmax"] = quantize_blockwise(exp_avg, qm, block)
            state["v_codes"], state["v_absmax"] = quantize_blockwise(exp_avg_sq, qv, block)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, then undo its cast of every state tensor to the parameter's dtype: codes are
        uint8 (0..255 survive the round trip through float exactly) and absmax/moments float32."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for key in _CODES:
                if key in st:
                    st[key] = st[key].round().to(torch.uint8)
            for key in _ABSMAX + ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].float()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of `optimizer.state` (moments, codes, scales, step counters).

    Works for any torch optimizer, so AdamW and Adam8bit are measured the same way. Adam8bit's two
    256-entry quantization maps (2 KiB, shared by all parameters) are not state and not counted.

    >>> w = torch.nn.Parameter(torch.zeros(10))
    >>> opt = torch.optim.AdamW([w]); w.grad = torch.ones(10); opt.step()
    >>> optimizer_state_bytes(opt)     # exp_avg + exp_avg_sq (2 x 10 x 4) + step (a float32 scalar)
    84
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
