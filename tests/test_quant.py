"""quant/: observers, fake quantization, PTQ, QAT, BN folding, equalization (tiny, seeded, with oracles)."""
import copy
import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nncompress.core import ConfigError, Context, NNCompressError, TrainConfig, apply, fit, history, replay
from nncompress.formats import (MXFP4, BinaryFormat, FloatFormat, IntFormat, PerChannel, PerGroup, PerTensor,
                                TernaryFormat, expand_scale)
from nncompress.quant import (QATConfig, QuantizeConfig, QuantLinear, QuantSpec, STEQuantize, bias_correct, quantize_values,
                              calibrate, calibrating, equalization_scales, equalize,
                              find_equalization_pairs, fold_batchnorm, kl_threshold, lsq_quantize, observe,
                              quant_sensitivity, refresh_weight_scales, wrap)
from nncompress.quant import GPTQConfig, gptq_quantize
from nncompress.quant import bn_fold, fake_quant, gptq, observers, ptq, qat
from nncompress.graph.trace import trace
from nncompress.quant.observers import _histogram, kl_observer
from nncompress.recipe import parse_recipe
from nncompress.zoo.loaders import build_data, build_model
from nncompress.zoo.models import BasicBlock, mnist1d_cnn


@pytest.mark.parametrize("module", [observers, fake_quant, ptq, qat, bn_fold, gptq], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    return build_data({"name": "digits"})


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64]}})
    fit(model, digits.train, lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainConfig(epochs=8, lr=3e-3))
    return model.eval()


def accuracy(model, loader):
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def sqnr_db(ref, q):
    return 10 * math.log10(float(ref.double().pow(2).sum() / (ref.double() - q.double()).pow(2).sum()))


class TinyConvNet(nn.Module):
    """digits as (N, 1, 64): conv-bn-relu-conv-relu-linear, with a functional flatten (fx traceable)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))              # (N, 8, 64)
        return self.fc(torch.relu(self.conv2(x)).flatten(1))           # (N, 10)


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


# ------------------------------------------------------------------------------------------ observers

def test_minmax_observer_hand_cases():
    x = torch.tensor([[-1.0, 0.5, 2.0, 4.0], [0.0, 3.0, -4.0, 1.0]])
    lo, hi = observe("minmax", x, PerTensor())
    assert (lo.item(), hi.item()) == (-4.0, 4.0)
    lo, hi = observe("minmax", x, PerChannel(axis=0))
    assert lo.flatten().tolist() == [-1.0, -4.0] and hi.flatten().tolist() == [4.0, 3.0]
    lo, hi = observe("minmax", x, PerGroup(axis=1, size=2))          # groups [-1, .5] [2, 4] [0, 3] [-4, 1]
    assert lo.tolist() == [[-1.0, 2.0], [0.0, -4.0]] and hi.tolist() == [[0.5, 4.0], [3.0, 1.0]]
    s = observers.minmax_observer(torch.tensor([5.0, -1.0]), PerTensor(), IntFormat(), {"lo": lo.min(), "hi": hi.max()})
    assert (s["lo"].item(), s["hi"].item()) == (-4.0, 5.0)


def test_moving_average_observer_hand_case():
    fn = observers.moving_average_minmax_observer
    s = fn(torch.tensor([-1.0, 1.0]), PerTensor(), IntFormat(), momentum=0.25)
    s = fn(torch.tensor([-5.0, 9.0]), PerTensor(), IntFormat(), s, momentum=0.25)
    assert s["lo"].item() == pytest.approx(-1 + 0.25 * (-5 + 1)) and s["hi"].item() == pytest.approx(1 + 0.25 * 8)


def test_percentile_observer_hand_cases():
    x = torch.arange(-50.0, 51.0)                                       # |x|: 0, 1, 1, ..., 50, 50
    lo, hi = observe("percentile", x, PerTensor(), IntFormat(), percentile=100.0)
    assert (lo.item(), hi.item()) == (-50.0, 50.0)
    lo, hi = observe("percentile", torch.arange(0.0, 101.0), PerTensor(), IntFormat(symmetric=False), percentile=90.0)
    assert lo.item() == pytest.approx(10.0) and hi.item() == pytest.approx(90.0)
    rows = torch.stack([torch.arange(0.0, 11.0), 10 * torch.arange(0.0, 11.0)])   # per channel: 9 and 90
    _, hi = observe("percentile", rows, PerChannel(axis=0), IntFormat(), percentile=90.0)
    assert hi.flatten().tolist() == pytest.approx([9.0, 90.0])


def test_mse_observer_hand_case_and_brute_force():
    lo, hi = observe("mse", torch.tensor([-1.0, 0.0, 1.0, 2.0]), PerTensor(), IntFormat(bits=2))
    assert hi.item() == pytest.approx(1.34) and lo.item() == pytest.approx(-1.34)   # s = 4/3 lies nearest 0.67 * 2
    torch.manual_seed(1)
    w = torch.randn(3, 40).double() * torch.tensor([[1.0], [3.0], [0.1]], dtype=torch.float64)
    w[0, 0] = 8.0                                                        # an outlier worth clipping
    fmt = IntFormat(bits=3)
    _, hi = observe("mse", w.float(), PerChannel(axis=0), fmt)
    for row, h in zip(w, hi.flatten()):                                  # float64 oracle over the same ratios
        amax = row.abs().max()
        errs = []
        for k in range(1, 101):
            s = 0.01 * k * amax / fmt.qmax
            q = (row / s).round().clamp(fmt.qmin, fmt.qmax) * s
            errs.append(float((q - row).pow(2).sum()))
        best = 0.01 * (100 - int(np.argmin(errs[::-1]))) * float(amax)   # ties: the widest range
        assert float(h) == pytest.approx(best, rel=1e-4)
    assert hi.flatten()[0] < 8.0                                         # the outlier row is clipped


def _kl_reference(h, levels):
    """TensorRT's entropy calibration, written as the slides describe it (float64 loops)."""
    h = np.asarray(h, dtype=np.float64)
    best = (np.inf, len(h))
    for i in range(levels, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        q = np.zeros(i)
        chunk = np.arange(i) * levels // i
        for c in range(levels):
            nz = (chunk == c) & (h[:i] > 0)
            if nz.any():
                q[nz] = h[:i][chunk == c].sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))
        if kl < best[0] - 1e-12:
            best = (kl, i)
    return best[1]


def test_kl_threshold_matches_reference():
    g = torch.Generator().manual_seed(0)
    for t in range(12):
        levels = (4, 8, 16)[t % 3]
        h = (torch.rand(64, generator=g) ** 3 * 10).floor()
        if t % 2:
            h[torch.randint(0, 64, (20,), generator=g)] = 0
        assert kl_threshold(h[None], levels).item() == _kl_reference(h.numpy(), levels)


def test_kl_observer_streams_exactly_and_clips_outliers():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1000, generator=g), 2 * torch.rand(1000, generator=g) + 0.5   # b's max needs 4x the range
    s = kl_observer(a, PerTensor(), IntFormat(), bins=64)
    s = kl_observer(b, PerTensor(), IntFormat(), s, bins=64)
    whole = _histogram(torch.cat([a, b]).abs()[None], s["range"], 64)
    assert torch.equal(s["hist"], whole)                                 # merging bin pairs is exact
    x = torch.cat([torch.randn(20000, generator=g), torch.full((5,), 40.0)])
    lo, hi = observe("kl", x, PerTensor(), IntFormat(bits=8))
    assert 2.5 < hi.item() < 5.0 and lo.item() == -hi.item()


# ------------------------------------------------------------------------------------------ fake quant

def test_ste_gradient_identity_inside_zero_outside():
    fmt = IntFormat(bits=4)                                              # codes -8..7, scale 0.5: [-4, 3.5]
    x = torch.tensor([-6.0, -4.0, -1.3, 0.0, 2.2, 3.5, 3.9, 9.0], requires_grad=True)
    y = STEQuantize.apply(x, torch.tensor(0.5), 0, fmt)
    assert torch.equal(y.detach(), fmt.quantize(x.detach(), 0.5))
    y.backward(torch.arange(1.0, 9.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]  # 3.9 rounds to code 8: outside


def test_lsq_step_gradient_matches_formula():
    fmt = IntFormat(bits=3)
    x = torch.tensor([0.3, -0.7, 2.9, -5.0])
    step = torch.tensor(0.5, requires_grad=True)
    lsq_quantize(x, step, fmt, per_step=4).sum().backward()
    v = x / 0.5                                                          # inside: round(v) - v; outside: the bound
    expected = torch.where(v < fmt.qmin, float(fmt.qmin), torch.where(v > fmt.qmax, float(fmt.qmax), v.round() - v))
    g = 1 / math.sqrt(4 * fmt.qmax)
    assert step.grad.item() == pytest.approx(float(expected.sum()) * g, rel=1e-6)


INT4_CHANNEL = QuantSpec(format=IntFormat(bits=4))
INT3_GROUP_MSE = QuantSpec(format=IntFormat(bits=3), granularity=PerGroup(axis=1, size=8), observer="mse")
UINT8_ASYM_PCT = QuantSpec(format=IntFormat(bits=8, symmetric=False), granularity=PerTensor(), observer="percentile",
                           observer_args={"percentile": 99.0})
GRID_CASES = {  # per group of 8 along the fan-in (in * kernel): 24 and 4 * 2 for the grouped conv
    "linear-int4-channel": (INT4_CHANNEL, lambda: nn.Linear(24, 6)),
    "linear-int3-group-mse": (INT3_GROUP_MSE, lambda: nn.Linear(24, 6)),
    "linear-uint8-asym-pct": (UINT8_ASYM_PCT, lambda: nn.Linear(24, 6)),
    "conv2d-int4-channel": (INT4_CHANNEL, lambda: nn.Conv2d(3, 5, 3, padding=1)),
    "conv2d-uint8-asym-pct": (UINT8_ASYM_PCT, lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")),
    "conv1d-groups-int3-group-mse": (INT3_GROUP_MSE, lambda: nn.Conv1d(8, 6, 2, groups=2)),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_fake_quant_weights_land_on_grid_and_merge_keeps_numbers(case):
    torch.manual_seed(0)
    spec, make = GRID_CASES[case]
    layer = make()
    wrapper = wrap(layer, spec)
    fq = wrapper.weight_quant
    w = wrapper.quantized_weight().flatten(1)                            # (O, I * k)
    scale = expand_scale(fq.scale, fq.granularity, w.shape)
    zp = 0 if fq.zero_point is None else expand_scale(fq.zero_point, fq.granularity, w.shape)
    assert (fq.zero_point is None) == fq.fmt.symmetric                   # symmetric grids store no zero point
    codes = w / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= fq.fmt.qmin and codes.round().max() <= fq.fmt.qmax
    x = torch.randn(2, 24) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, *([7] * (layer.weight.ndim - 2)))
    merged = wrapper.merge()
    assert type(merged) is type(layer) and torch.equal(merged(x), wrapper(x))
    assert torch.equal(wrapper.base.weight, layer.weight)                # the original is kept


def test_w4_per_group_sqnr_and_mse_never_worse():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    out = {}
    for obs in ("minmax", "mse"):
        layer = nn.Linear(256, 64)
        layer.weight.data.copy_(w)
        q = wrap(layer, QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=64), observer=obs))
        out[obs] = sqnr_db(w, q.quantized_weight().detach())
    assert out["minmax"] > 18.5                                          # measured 19.4 dB
    assert out["mse"] >= out["minmax"]                                   # the search includes ratio 1


def test_calibrating_restores_modes_and_sets_ranges():
    m = nn.Sequential(QuantLinear(nn.Linear(3, 4), activation=QuantSpec(format=IntFormat(signed=False))), nn.ReLU())
    fq = m[0].input_quant
    with pytest.raises(NNCompressError, match="calibrate first"):
        m(torch.ones(1, 3))
    x = torch.tensor([[0.0, 1.0, 2.55]])
    with calibrating(m):
        assert fq.observing and torch.equal(m[0](x), m[0].base(x))       # float pass-through while observing
    assert not fq.observing and fq.scale.item() == pytest.approx(0.01)


def test_spec_round_trips_and_reconciles_granularity():
    spec = QuantSpec.from_dict({"format": {"kind": "ternary"}, "granularity": {"kind": "per_channel"}})
    assert spec.format == TernaryFormat(granularity=PerChannel(0)) and spec.granularity == PerChannel(0)
    for s in (spec, QuantSpec(format=MXFP4), QuantSpec(format=FloatFormat(exp=2, man=1), observer="kl"),
              QuantSpec(format=BinaryFormat(granularity=PerChannel(0)))):
        assert QuantSpec.from_dict(s.to_dict()) == s


# ------------------------------------------------------------------------------------------ PTQ

def test_ptq_w8a8_digits_within_two_points(trained_mlp, digits):
    base = accuracy(trained_mlp, digits.test)
    cfg = QuantizeConfig(weight=QuantSpec(), activation=QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False)))
    q = apply(copy.deepcopy(trained_mlp), cfg, context=Context(data=digits))
    assert isinstance(q.net[0], QuantLinear) and q.net[0].input_quant.scale is not None
    assert base > 0.9 and abs(accuracy(q, digits.test) - base) <= 0.02


def test_replay_from_record_rebuilds_identical_model(digits):
    torch.manual_seed(0)
    model = randomize_bn(TinyConvNet()).eval()
    cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4), observer="mse"),
                         activation=QuantSpec(format=IntFormat(bits=8), observer="kl"),
                         calib_batches=2, fold_bn=True, equalize=True, bias_correction=True)
    q = apply(copy.deepcopy(model), cfg, context=Context(data=digits))
    rec = history(q)[-1]["record"]
    assert rec["folded"] == [["conv1", "bn1"]] and rec["equalized"] == [["conv1", "conv2"]]
    assert set(rec["layers"]) == {"conv1", "conv2", "fc"}
    again = replay(copy.deepcopy(model), history(q))                      # no data: the structure
    again.load_state_dict(q.state_dict())                                 # ... and the checkpoint's tensors
    x = digits.example_batch(16)
    assert torch.equal(q(x), again(x))
    assert q.state_dict().keys() == again.state_dict().keys()


def test_save_load_of_quantized_model(tmp_path, trained_mlp, digits):
    import nncompress
    cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=16)),
                         activation=QuantSpec(format=IntFormat(bits=8, signed=False)))
    q = apply(copy.deepcopy(trained_mlp), cfg, context=Context(data=digits))
    nncompress.save(q, tmp_path / "m")
    x = digits.example_batch(8)
    assert torch.equal(nncompress.load(tmp_path / "m")(x), q(x))


def test_bias_correction_zeroes_the_mean_output_error():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(256, 16) + 2.0                                       # a non-zero mean input
    ref = layer(x).detach()
    w = wrap(copy.deepcopy(layer), QuantSpec(format=IntFormat(bits=3)))
    before = (w(x) - ref).mean(0).abs().max().item()
    means = calibrate(w, [(x, None)], 1, input_means={"": w})
    bias_correct(w, means[""])
    after = (w(x) - ref).mean(0).abs().max().item()
    assert before > 1e-2 and after < 1e-5


def test_group_size_that_does_not_divide_names_the_layer():
    model = nn.Sequential(nn.Conv1d(1, 4, 5), nn.Flatten(), nn.Linear(4 * 12, 2))
    cfg = QuantizeConfig(weight=QuantSpec(granularity=PerGroup(axis=1, size=16)))
    with pytest.raises(ConfigError, match=r"weight\.granularity\.size: layer '0' .*targets\.exclude"):
        apply(model, cfg)


def test_quant_sensitivity_ranks_every_layer(trained_mlp, digits):
    drops = quant_sensitivity(trained_mlp, digits, QuantSpec(format=IntFormat(bits=2)), max_batches=3)
    assert sorted(n for n, _ in drops) == ["net.0", "net.2"]
    assert [d for _, d in drops] == sorted((d for _, d in drops), reverse=True)
    assert [type(m) for m in trained_mlp.net] == [nn.Linear, nn.ReLU, nn.Linear]    # the model is restored


# ------------------------------------------------------------------------------------------ QAT

QAT_CASES = {
    "rtn-w4": (QuantSpec(format=IntFormat(bits=4)), None),
    "lsq-w4-a8": (QuantSpec(format=IntFormat(bits=4), method="lsq"), QuantSpec(format=IntFormat(bits=8), method="lsq")),
    "rtn-w4-pact-a4": (QuantSpec(format=IntFormat(bits=4)), QuantSpec(format=IntFormat(bits=4, signed=False), method="pact")),
    "rtn-w4-ema-a8": (QuantSpec(format=IntFormat(bits=4)),
                      QuantSpec(format=IntFormat(bits=8, symmetric=False), observer="moving_average_minmax")),
    "dorefa-w2": (QuantSpec(format=IntFormat(bits=2), method="dorefa"), None),
    "binary": (QuantSpec(format=BinaryFormat(), granularity=PerChannel(0)), None),
    "ternary": (QuantSpec(format=TernaryFormat()), None),
}


@pytest.mark.parametrize("case", list(QAT_CASES))
def test_qat_prepare_equals_convert_bit_for_bit(case, trained_mlp, digits):
    weight, act = QAT_CASES[case]
    step = QATConfig(weight=weight, activation=act, calib_batches=2, step="prepare")
    m = apply(copy.deepcopy(trained_mlp), step, context=Context(data=digits))
    first = m.net[0].base.weight.detach().clone()
    fit(m, digits.train, lambda mm, b: F.cross_entropy(mm(b[0]), b[1]), TrainConfig(epochs=1, max_steps=5),
        after_step=refresh_weight_scales)
    assert not torch.equal(first, m.net[0].base.weight)                  # it trained through the rounding
    m.eval()
    before = copy.deepcopy(m)
    converted = apply(m, dataclasses.replace(step, step="convert"))
    x = digits.example_batch(64)
    with torch.no_grad():
        assert torch.equal(before(x), converted(x))
    packed = case not in ("dorefa-w2",)                                    # formats stored as packed codes
    assert isinstance(converted.net[0], QuantLinear if packed or act is not None else nn.Linear)
    if packed:
        assert converted.net[0].weight_quant.spec.method == "rtn"
        assert not any(p.requires_grad for p in converted.net[0].weight_quant.parameters())


def test_qat_progressive_schedule_ends_on_the_last_grid(trained_mlp, digits):
    cfg = QATConfig(weight=QuantSpec(format=IntFormat(bits=8)), bits_schedule=(8, 4, 2), epochs=1, max_steps=4,
                    lr=1e-3, kd_alpha=0.5)
    q = apply(copy.deepcopy(trained_mlp), cfg, context=Context(data=digits, teacher=trained_mlp))
    rec = history(q)[-1]["record"]
    assert len(rec["epoch_losses"]) == 3 and rec["weight"]["format"]["bits"] == 2
    for layer in (q.net[0], q.net[2]):
        assert type(layer) is QuantLinear and not layer.training           # frozen: stored as 2-bit codes
        assert all(len(row.unique()) <= 4 for row in layer.quantized_weight())   # int2 per channel: <= 4 levels
    assert accuracy(q, digits.test) > 0.5


def test_qat_after_ptq_requantizes_and_replays(trained_mlp, digits):
    ptq_model = apply(copy.deepcopy(trained_mlp), QuantizeConfig(), context=Context(data=digits))
    cfg = QATConfig(weight=QuantSpec(format=IntFormat(bits=4), method="lsq"),
                    activation=QuantSpec(format=IntFormat(bits=8, signed=False), method="pact"), max_steps=3)
    q = apply(ptq_model, cfg, context=Context(data=digits))
    assert isinstance(q.net[0], QuantLinear) and q.net[0].weight_quant.spec.method == "rtn"   # frozen LSQ step
    again = replay(copy.deepcopy(trained_mlp), history(q))
    again.load_state_dict(q.state_dict())
    x = digits.example_batch(8)
    assert torch.equal(again(x), q(x))


# ------------------------------------------------------------------------------------------ GPTQ

@pytest.mark.parametrize("spec, act_order", [
    (QuantSpec(format=IntFormat(bits=3)), False),
    (QuantSpec(format=IntFormat(bits=3), granularity=PerGroup(axis=1, size=8)), False),
    (QuantSpec(format=IntFormat(bits=3), granularity=PerGroup(axis=1, size=8)), True),
    (QuantSpec(format=IntFormat(bits=4, symmetric=False), granularity=PerTensor()), True),
], ids=["channel", "group-lazy", "group-static-act-order", "tensor-asym-act-order"])
def test_gptq_beats_rtn_on_correlated_inputs_and_stays_on_grid(spec, act_order):
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(512, 8) @ torch.randn(8, 32) + 0.1 * torch.randn(512, 32)      # low-rank inputs
    h = 2 * x.double().T @ x.double() / len(x)
    w = layer.weight.detach()
    q, scale, zp = gptq_quantize(w, h, spec, block_size=16, act_order=act_order)
    rtn = wrap(copy.deepcopy(layer), spec).quantized_weight().detach()
    out_err = lambda wq: float(((x @ (w - wq).T) ** 2).mean())        # noqa: E731
    assert out_err(q) < 0.5 * out_err(rtn)                             # measured 0.1x to 0.2x
    g = spec.resolved("weight").granularity
    assert torch.equal(quantize_values(q, spec.format, expand_scale(scale, g, q.shape), expand_scale(zp, g, q.shape)), q)


def test_gptq_with_diagonal_hessian_is_round_to_nearest_per_group():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    spec = QuantSpec(format=IntFormat(bits=3), granularity=PerGroup(axis=1, size=4))
    q, _, _ = gptq_quantize(layer.weight.detach(), torch.diag(torch.rand(16) + 0.5), spec, block_size=8)
    assert torch.equal(q, wrap(layer, spec).quantized_weight().detach())


def _gptq_reference(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool):
    """Textbook GPTQ in float64: one column at a time, no blocks; group scales fitted from the
    corrected weights when a group starts (from the original weights before the sweep with act_order)."""
    fmt, g = spec.format, spec.resolved("weight").granularity
    O, C = w.shape
    size = g.size if isinstance(g, PerGroup) else C
    W, H = w.double().clone(), h.double().clone()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    scales = torch.zeros(O, C // size, dtype=torch.float64)

    def group_scale(v):
        amax = v.abs().amax(1).float()                                            # symmetric minmax, per row
        return (amax / fmt.qmax).clamp_min(torch.finfo(torch.float32).eps).double()
    if act_order:
        scales = torch.stack([group_scale(W[:, k:k + size]) for k in range(0, C, size)], 1)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diag().mean() * torch.eye(C, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)                    # (C, C)
    Q = torch.zeros_like(W)
    for j in range(C):
        col = int(perm[j])
        if not act_order and col % size == 0:
            scales[:, col // size] = group_scale(W[:, j:j + size])
        s = scales[:, col // size]
        Q[:, j] = torch.round(W[:, j] / s).clamp(fmt.qmin, fmt.qmax) * s
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)], scales


@pytest.mark.parametrize("act_order", [False, True], ids=["lazy-groups", "act-order"])
def test_gptq_matches_a_per_column_float64_reference(act_order):
    torch.manual_seed(0)
    spec = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=8))
    w = torch.randn(12, 48)
    x = torch.randn(256, 6) @ torch.randn(6, 48) + 0.1 * torch.randn(256, 48)      # correlated inputs
    h = 2 * x.double().T @ x.double() / len(x)
    q, scale, _ = gptq_quantize(w, h, spec, block_size=16, act_order=act_order)   # 3 blocks of 2 groups
    ref_q, ref_scale = _gptq_reference(w, h, spec, 0.01, act_order)
    assert torch.allclose(scale.double(), ref_scale, rtol=1e-5, atol=0)
    codes = lambda v, s: torch.round(v.double() / s.repeat_interleave(8, 1))
    assert torch.equal(codes(q, scale), codes(ref_q, ref_scale))                  # the same integer codes
    assert torch.allclose(q.double(), ref_q, rtol=1e-5, atol=1e-7)


def test_gptq_transform_on_digits(tmp_path, trained_mlp, digits):
    import nncompress
    spec = QuantSpec(format=IntFormat(bits=3))
    g = apply(copy.deepcopy(trained_mlp), GPTQConfig(weight=spec, calib_batches=4), context=Context(data=digits))
    r = apply(copy.deepcopy(trained_mlp), QuantizeConfig(weight=spec), context=Context(data=digits))
    x = torch.cat([b[0] for b in digits.test])
    with torch.no_grad():
        ref = trained_mlp(x)
        assert float((g(x) - ref).pow(2).mean()) < 0.5 * float((r(x) - ref).pow(2).mean())   # measured ~0.08x
        plain = nn.Sequential(g.net[0].merge(), nn.ReLU(), g.net[2].merge())
        assert torch.equal(plain(x), g(x))                             # the base weights already lie on the grid
    nncompress.save(g, tmp_path / "g")
    assert torch.equal(nncompress.load(tmp_path / "g")(x[:8]), g(x[:8]))


# ------------------------------------------------------------------------------------------ BN folding

@pytest.mark.parametrize("name", ["sequential-conv2d", "linear-bn1d", "basic-block", "mnist1d-cnn-shape-branch"])
def test_bn_fold_is_exact_in_eval(name):
    torch.manual_seed(0)
    if name == "sequential-conv2d":
        model, x = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)), torch.randn(2, 3, 8, 8)
    elif name == "linear-bn1d":
        model, x = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU()), torch.randn(4, 5)
    elif name == "basic-block":
        model, x = BasicBlock(4, 8, stride=2, dim=2), torch.randn(2, 4, 8, 8)
    else:
        model, x = mnist1d_cnn(widths=(8, 16)), torch.randn(3, 40)      # x.dim() branch: fx could not trace it
    model = randomize_bn(model).eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ref = model(x)
    pairs = fold_batchnorm(model, x)
    assert len(pairs) == n_bn
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)


def test_bn_fold_skips_a_conv_whose_output_is_also_used_elsewhere():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y                                        # folding would change the second use

    assert fold_batchnorm(Branchy().eval()) == []


def test_bn_fold_in_float64_is_exact_and_finds_every_pair_from_one_trace(monkeypatch):
    import nncompress.graph.flow as flow_mod
    traced = []
    monkeypatch.setattr(flow_mod, "trace", lambda *a: traced.append(1) or trace(*a))
    torch.manual_seed(0)
    model = randomize_bn(mnist1d_cnn(widths=(8, 16))).double().eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    ref = model(x)
    pairs = fold_batchnorm(model)                                       # inputs from model.input_shape
    assert pairs == [("stem.0", "stem.1"), ("layers.0.conv1", "layers.0.bn1"), ("layers.0.conv2", "layers.0.bn2"),
                     ("layers.1.conv1", "layers.1.bn1"), ("layers.1.conv2", "layers.1.bn2"),
                     ("layers.1.shortcut.0", "layers.1.shortcut.1")] and len(traced) == 1
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)


class _Reuse(nn.Module):
    """conv1 runs twice; bn2 runs twice; conv3 reaches bn3 through an eval dropout (a no-op alias)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)
        self.conv2, self.bn2 = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)
        self.conv3, self.drop, self.bn3 = nn.Conv1d(2, 2, 1), nn.Dropout(0.3), nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.bn1(self.conv1(self.conv1(x)))
        y = self.bn2(self.bn2(self.conv2(y)))
        return self.bn3(self.drop(self.conv3(y)))


def test_bn_fold_skips_reused_modules_and_looks_through_eval_dropout():
    torch.manual_seed(0)
    model = randomize_bn(_Reuse()).double().eval()
    x = torch.randn(2, 2, 5, dtype=torch.float64)
    ref = model(x)
    assert fold_batchnorm(model, x) == [("conv3", "bn3")]
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)


class _ValueBranch(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2) if bn else nn.ReLU()

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x              # data-dependent: export cannot trace it


def test_bn_fold_of_an_untraceable_model_raises_a_typed_error():
    with pytest.raises(NNCompressError, match=r"fold_bn: cannot tell which layer feeds which: _ValueBranch: "
                                              r"torch.export cannot trace.*; or set fold_bn=False"):
        fold_batchnorm(_ValueBranch().eval(), torch.randn(2, 2, 4))
    assert fold_batchnorm(_ValueBranch(bn=False).eval()) == []           # no BN: nothing to trace


def test_bn_fold_next_to_int8_layers_traces_their_plain_view():
    from nncompress.quant.native import Int8DynamicConfig
    torch.manual_seed(0)
    model = randomize_bn(mnist1d_cnn(widths=(8, 16))).eval()
    model = apply(model, Int8DynamicConfig())                           # fc holds int8 codes: no fake-tensor kernel
    x = torch.randn(3, 40)
    ref = model(x)
    assert len(fold_batchnorm(model, x)) == 6 and type(model.fc).__name__ == "Int8DynamicLinear"
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)


class _FunctionalAct(nn.Module):
    """conv -> F.relu -> conv -> LeakyReLU module -> conv; a grouped conv ends the chain."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv1d(3, 6, 3), nn.Conv1d(6, 4, 1), nn.LeakyReLU(0.1)
        self.c3, self.c4 = nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1, groups=2)

    def forward(self, x):
        y = self.act(self.c2(F.relu(self.c1(x))))
        return self.c4(torch.relu(self.c3(y)))


def test_equalization_through_functional_relu_and_leaky_relu_is_exact():
    torch.manual_seed(0)
    m = _FunctionalAct().double()
    with torch.no_grad():
        m.c1.weight[:2] *= 40
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    ref = m(x)
    assert find_equalization_pairs(m) == [("c1", "c2"), ("c2", "c3")]   # c4 is grouped: left alone
    equalize(m, x)
    assert torch.allclose(m(x), ref, rtol=0, atol=1e-12)
    s = equalization_scales(m.c1.weight, m.c2.weight)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-3)             # converged: ranges even


def test_equalization_keeps_outputs_and_evens_ranges():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].weight[:4] *= 30
    x = torch.randn(32, 8)
    ref = m(x)
    assert find_equalization_pairs(m) == [("0", "2")]
    equalize(m)
    assert torch.allclose(m(x), ref, atol=1e-5)
    r1, r2 = m[0].weight.abs().amax(1), m[2].weight.abs().amax(0)
    assert torch.allclose(r1, r2, rtol=1e-5)
    assert torch.allclose(equalization_scales(m[0].weight, m[2].weight), torch.ones(16, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ recipes

def test_recipe_stage_validates_and_round_trips():
    raw = {"model": "mlp", "data": "digits", "stages": [
        {"kind": "quantize", "weight": {"format": {"kind": "int", "bits": 4}, "granularity": {"kind": "per_group", "size": 64},
                                        "observer": "mse"},
         "activation": {"format": {"kind": "int", "bits": 8, "signed": False}, "observer": "percentile",
                        "observer_args": {"percentile": 99.9}}, "fold_bn": True},
        {"kind": "qat", "weight": {"format": {"kind": "int", "bits": 8}, "method": "lsq"}, "bits_schedule": [8, 4, 2]}]}
    recipe = parse_recipe(raw)
    cfg = recipe.stages[0].config
    assert cfg.weight.format == IntFormat(bits=4) and cfg.weight.granularity == PerGroup(axis=-1, size=64)
    assert cfg.activation.observer_args == {"percentile": 99.9}
    assert parse_recipe(recipe.to_dict()).stages == recipe.stages


@pytest.mark.parametrize("stage, message", [
    ({"kind": "quantize", "weight": {"format": {"kind": "int", "bits": 1}}}, r"stages\[0\]\.weight\.format\.bits: IntFormat takes 2\.\.16"),
    ({"kind": "quantize", "weight": {"format": {"kind": "intt"}}}, r"stages\[0\]\.weight\.format\.kind: unknown format kind 'intt'"),
    ({"kind": "quantize", "weight": {"observer": "foo"}}, r"stages\[0\]\.weight\.observer: unknown observer 'foo'"),
    ({"kind": "quantize", "weight": {"observer": "percentile", "observer_args": {"pct": 1}}}, r"stages\[0\]\.weight\.observer_args: .*takes percentile"),
    ({"kind": "quantize", "weight": {"granularity": {"kind": "per_group", "size": 0}}}, r"stages\[0\]\.weight\.granularity\.size"),
    ({"kind": "quantize", "weight": {"bits": 4}}, r"stages\[0\]\.weight\.bits: unknown field"),
    ({"kind": "quantize", "activation": {"method": "lsq"}}, r"stages\[0\]\.activation\.method: lsq learns"),
    ({"kind": "quantize", "activation": {"granularity": {"kind": "per_group", "size": 4}}}, r"stages\[0\]\.activation\.granularity"),
    ({"kind": "qat", "bits_schedule": [8, 1]}, r"stages\[0\]\.bits_schedule\[1\]"),
    ({"kind": "qat", "weight": {"format": {"kind": "float"}}, "bits_schedule": [8, 4]}, r"stages\[0\]\.weight\.format: a bits_schedule"),
    ({"kind": "qat", "activation": {"method": "pact"}}, r"stages\[0\]\.activation\.format\.signed"),
    ({"kind": "gptq", "weight": {"format": {"kind": "float"}}}, r"stages\[0\]\.weight\.format: GPTQ quantizes onto an integer"),
])
def test_recipe_bad_fields_name_their_path(stage, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe({"model": "mlp", "data": "digits", "stages": [stage]})


def test_qat_in_the_users_own_loop_saves_and_loads_after_each_step(tmp_path, trained_mlp, digits):
    import nncompress
    spec = QuantSpec(format=IntFormat(bits=4), method="lsq")
    prepared = apply(copy.deepcopy(trained_mlp), QATConfig(weight=spec, step="prepare"))
    assert prepared.training and isinstance(prepared.net[0], QuantLinear)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)          # the user's loop, the user's optimizer
    for x, y in list(digits.train)[:3]:
        opt.zero_grad()
        F.cross_entropy(prepared(x), y).backward()
        opt.step()
    x = digits.example_batch(16)
    nncompress.save(prepared.eval(), tmp_path / "prepared")        # mid-training checkpoints load too
    with torch.no_grad():
        assert torch.equal(nncompress.load(tmp_path / "prepared")(x), prepared(x))
    converted = apply(prepared, QATConfig(weight=spec, step="convert"))
    assert [e["config"]["step"] for e in history(converted)] == ["prepare", "convert"]
    nncompress.save(converted, tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(nncompress.load(tmp_path / "converted")(x), prepared(x))
