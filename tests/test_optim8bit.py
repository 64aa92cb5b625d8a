"""optim/: the dynamic quantization map, block-wise quantization and Adam8bit (tiny, seeded, with oracles)."""
import doctest
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nncompress.core import ConfigError, TrainConfig, fit
from nncompress.core.train import make_optimizer
from nncompress.optim import (Adam8bit, blockwise_bytes, dequantize_blockwise, dynamic_map, optimizer_state_bytes,
                              quantize_blockwise, quantize_to_map)
from nncompress.optim import adam8bit, blockwise


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared 2-core machine


@pytest.mark.parametrize("module", [blockwise, adam8bit], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ the dynamic map

def reference_map(signed: bool) -> list[float]:
    """The dynamic-tree values written out from the paper's code layout, in float64: 7 decades
    10^-6..10^0, the decade 10^-E holding 2^(6-E) (signed) or 2^(7-E) (unsigned) midpoints of a
    linear split of [0.1, 1], both signs if signed, plus 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        k = 2 ** (6 - e) if signed else 2 ** (7 - e)
        mids = [0.1 + 0.9 * (j + 0.5) / k for j in range(k)]
        values += [10.0 ** -e * v for v in mids] + ([-(10.0 ** -e) * v for v in mids] if signed else [])
    return sorted(values)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_float64_reference(signed):
    qmap = dynamic_map(signed=signed, dtype=torch.float64)
    ref = torch.tensor(reference_map(signed), dtype=torch.float64)
    assert qmap.numel() == 256 and torch.allclose(qmap, ref, rtol=1e-15, atol=0)
    assert bool((qmap.diff() > 0).all())                       # 256 distinct codes, sorted
    assert float(qmap.max()) == 1.0 and float(qmap.abs().min()) == 0.0
    positive = qmap[qmap > 0]   # 7 decades below 1: the 10^-6 decade holds 1 (signed) or 2 midpoints
    assert float(positive.min()) == pytest.approx(1e-6 * (0.1 + 0.9 * (0.5 if signed else 0.25)))


@pytest.mark.parametrize("signed", [True, False])
def test_map_round_trip_and_nearest_code(signed):
    qmap = dynamic_map(signed=signed)
    # every table value maps back to its own code
    assert torch.equal(quantize_to_map(qmap, qmap), torch.arange(256, dtype=torch.uint8))
    # anything else goes to the nearest entry: brute-force argmin in float64 as the oracle
    lo = -1.0 if signed else 0.0
    x = torch.cat([torch.empty(4000).uniform_(lo, 1.0), torch.randn(4000).mul(1e-3).clamp(lo, 1.0),
                   torch.logspace(-8, 0, 500) * (-1 if signed else 1)])
    codes = quantize_to_map(x, qmap).long()
    dist = (x.double()[:, None] - qmap.double()[None, :]).abs()           # (N, 256)
    best = dist.min(dim=1).values
    assert torch.allclose(dist.gather(1, codes[:, None]).squeeze(1), best, rtol=0, atol=1e-7)


def test_relative_error_is_bounded_over_six_decades():
    # the point of the dynamic map: ~constant relative error from 1e-5 to 1, where a linear int8
    # grid (step 1/127) cannot even represent 1e-3
    qmap = dynamic_map(signed=False).double()
    x = torch.logspace(-5, 0, 2000, dtype=torch.float64)
    err = (qmap[quantize_to_map(x, qmap).long()] - x).abs() / x
    # worst case between two codes a < b is the midpoint: (b - a) / (a + b), read off the table
    a, b = qmap[1:-1], qmap[2:]                                       # skip 0
    bound = ((b - a) / (a + b))[a >= 1e-5 * 0.5]
    assert float(err.max()) <= float(bound.max()) + 1e-12 and float(bound.max()) < 0.3
    assert float(err[x > 0.1].max()) < 0.036   # top decade: 128 codes 0.9/128 apart, over values >= 0.1
    assert float(err[x < 1 / 254].min()) > 0 and float(err[x < 1 / 254].max()) < 0.3  # int8 linear: 100%


# ------------------------------------------------------------------------------ block-wise

def test_blockwise_matches_per_block_oracle():
    block = 64
    x = torch.randn(1000) * torch.logspace(-3, 1, 1000)                  # 16 blocks, the last partial
    qmap = dynamic_map(signed=True)
    codes, absmax = quantize_blockwise(x, qmap, block)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,) and absmax.shape == (math.ceil(1000 / block),)
    back = dequantize_blockwise(codes, absmax, qmap, block)
    for b in range(absmax.numel()):                                        # oracle: per block, by hand
        xb = x[b * block:(b + 1) * block].double()
        amax = xb.abs().max()
        assert float(absmax[b]) == float(amax)
        nearest = qmap.double()[(xb[:, None] / amax - qmap.double()[None, :]).abs().argmin(dim=1)] * amax
        assert torch.allclose(back[b * block:(b + 1) * block].double(), nearest, rtol=1e-6, atol=0)
        # error bound: half the widest gap of the map (0.9/64/2 near +-1), times the block's absmax;
        # reached at x = -absmax (the signed map has +1 but no -1), hence the float32 slack
        half_gap = float(qmap.diff().max()) / 2
        err = float((back[b * block:(b + 1) * block].double() - xb).abs().max())
        assert err <= half_gap * float(amax) * (1 + 1e-5)


def test_an_outlier_only_coarsens_its_own_block():
    x = torch.randn(4096) * 0.01
    qmap = dynamic_map(signed=True)
    clean = dequantize_blockwise(*quantize_blockwise(x, qmap, 2048), qmap, 2048)
    spiked = x.clone()
    spiked[5] = 100.0
    out = dequantize_blockwise(*quantize_blockwise(spiked, qmap, 2048), qmap, 2048)
    assert torch.equal(out[2048:], clean[2048:])                          # block 1 untouched
    err_block0 = (out[:2048] - x[:2048]).abs()[6:].max()
    assert float(err_block0) > 10 * float((clean[:2048] - x[:2048]).abs().max())  # block 0 does pay
    assert blockwise_bytes(4096, 2048) == 4096 + 2 * 4


def test_all_zero_block_stays_zero():
    codes, absmax = quantize_blockwise(torch.zeros(10), dynamic_map(signed=False), 4)
    assert torch.equal(dequantize_blockwise(codes, absmax, dynamic_map(signed=False), 4), torch.zeros(10))


# ------------------------------------------------------------------------------ Adam8bit

def regression(seed: int = 0):
    """A 32 -> 256 -> 1 tanh MLP on a noisy teacher; its 8192-weight layer gets 8-bit moments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g)) + 0.05 * torch.randn(256, 1, generator=g)
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 1)), x, y


def losses(model, x, y, opt, steps):
    out = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out)


def test_fp32_path_is_adamw_bit_for_bit():
    # with min_8bit_size above every tensor, Adam8bit runs torch's AdamW update op for op
    model, x, y = regression()
    twin = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m for m in model])
    twin.load_state_dict(model.state_dict())
    a = losses(model, x, y, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01), 20)
    b = losses(twin, x, y, Adam8bit(twin.parameters(), lr=3e-3, weight_decay=0.01, min_8bit_size=10 ** 9), 20)
    assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("seed", [0, 1])
def test_tracks_adamw_loss_curve(seed):
    model, x, y = regression(seed)
    twin, _, _ = regression(seed)
    twin.load_state_dict(model.state_dict())
    steps = 100
    ref = losses(model, x, y, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01), steps)
    opt = Adam8bit(twin.parameters(), lr=3e-3, weight_decay=0.01)
    q = losses(twin, x, y, opt, steps)
    assert opt.state[twin[0].weight]["m_codes"].dtype == torch.uint8      # the big layer really is 8-bit
    # Tolerance: the stored moments are off by at most half a code gap, 0.7% of their block's absmax
    # (test above), and the current step always uses float32 moments, so the two runs drift apart
    # only slowly. Measured: max |difference| <= 0.5% of the initial loss over 100 steps (3 seeds);
    # 1.5% leaves a 3x margin while a broken update (wrong bias correction, a lost moment) is >10%.
    assert float((ref - q).abs().max()) <= 0.015 * float(ref[0])
    assert float(q[-1]) < 0.02 * float(q[0])                               # and it does train


def test_steps_stay_bounded_like_adamw_when_the_second_moment_rounds_to_zero():
    # one block holds a few large gradients and many tiny ones: 8-bit v of the tiny ones rounds to 0
    # while m does not, which used to give steps of ~m / eps (measured 5.3 at lr 1e-3)
    torch.manual_seed(0)
    w8, w32 = nn.Parameter(torch.zeros(4096)), nn.Parameter(torch.zeros(4096))
    opts = {w8: Adam8bit([w8], lr=1e-3, min_8bit_size=0), w32: torch.optim.AdamW([w32], lr=1e-3, weight_decay=0)}
    worst = {w8: 0.0, w32: 0.0}
    for _ in range(20):
        g = torch.randn(4096) * 1e-4
        g[::512] = 10.0 * torch.sign(torch.randn(8))
        for p, opt in opts.items():
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            worst[p] = max(worst[p], float((p.detach() - before).abs().max()))
    assert worst[w32] <= 1.01e-3                           # AdamW's largest step: lr, to rounding
    assert worst[w8] <= 1.001e-3                           # bounded by lr too (v_hat >= m_hat^2)


def test_state_is_about_four_times_smaller_exact_bytes():
    w32, w8 = nn.Parameter(torch.randn(8192)), nn.Parameter(torch.randn(8192))
    small32, small8 = nn.Parameter(torch.randn(100)), nn.Parameter(torch.randn(100))
    opt32 = torch.optim.AdamW([w32, small32])
    opt8 = Adam8bit([w8, small8])
    for p in (w32, small32, w8, small8):
        p.grad = torch.randn_like(p)
    opt32.step()
    opt8.step()
    step = 4  # each parameter's step counter is a float32 scalar tensor in both
    assert optimizer_state_bytes(opt32) == 2 * 4 * 8192 + step + 2 * 4 * 100 + step
    # big: 2 x (8192 uint8 codes + 4 blocks x float32 absmax); small (< 4096): float32 moments
    assert optimizer_state_bytes(opt8) == 2 * (8192 + 4 * 4) + step + 2 * 4 * 100 + step
    big_ratio = (2 * 4 * 8192 + step) / (2 * (8192 + 4 * 4) + step)
    assert 3.99 < big_ratio < 4.0


def test_state_dict_round_trip_keeps_codes():
    model, x, y = regression()
    opt = Adam8bit(model.parameters(), lr=1e-3)
    losses(model, x, y, opt, 3)
    saved = opt.state_dict()
    again = Adam8bit(model.parameters(), lr=1e-3)
    again.load_state_dict(saved)
    st, st2 = opt.state[model[0].weight], again.state[model[0].weight]
    assert st2["m_codes"].dtype == torch.uint8 and torch.equal(st["m_codes"], st2["m_codes"])
    assert torch.equal(st["v_absmax"], st2["v_absmax"]) and optimizer_state_bytes(again) == optimizer_state_bytes(opt)


def test_bad_arguments_name_the_field():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match="betas\\[1\\]"):
        Adam8bit([w], betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="block_size"):
        Adam8bit([w], block_size=0)


def test_train_config_picks_adam8bit():
    model, x, y = regression()
    cfg = TrainConfig(epochs=3, lr=3e-3, optimizer="adam8bit", lr_schedule="constant")
    assert isinstance(make_optimizer(model.parameters(), cfg), Adam8bit)
    assert TrainConfig.from_dict(cfg.to_dict()).optimizer == "adam8bit"
    hist = fit(model, [(x, y)] * 10, lambda m, b: F.mse_loss(m(b[0]), b[1]), cfg)
    assert hist[-1] < 0.5 * hist[0]
