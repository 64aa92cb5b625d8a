"""PyTorch-native int8 Linear: exact integer GEMM, per-row dynamic activations, the int8_dynamic transform."""
import copy

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Targets, UnsupportedOpError
from nncompress.core.errors import TargetError
from nncompress.formats import IntFormat
from nncompress.quant import QuantizeConfig, QuantSpec
from nncompress.quant.native import (Int8DynamicConfig, Int8DynamicLinear, fbgemm_linear_reference, fbgemm_prepack,
                                     fbgemm_saturates, int8_linear_reference, quantize_rows, weight_int8)
from nncompress.zoo.loaders import build_model


def test_quantize_rows_hand_computed():
    q, s = quantize_rows(torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.01]]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[50, -127, 0], [0, 0, 0], [127, 50, 0]]
    assert s[:, 0].tolist()[0] == pytest.approx(0.01) and s[2, 0].item() == pytest.approx(0.02)
    assert s[1, 0].item() > 0   # an all-zero row: no division by zero


@pytest.mark.parametrize("shape", [(1, 3, 5), (7, 33, 9), (4, 64, 16)])
def test_int_gemm_is_exact_and_layer_matches_float64_reference(shape):
    torch.manual_seed(0)
    m, k, n = shape
    x, layer = torch.randn(m, k), nn.Linear(k, n)
    q = Int8DynamicLinear.from_linear(layer, kernel="int_mm")
    xq, _ = quantize_rows(x)
    acc = torch._int_mm(xq, q.weight_q.t())
    assert torch.equal(acc.double(), xq.double() @ q.weight_q.double().t())   # int32 accumulation: exact
    ref = int8_linear_reference(x, q.weight_q, q.weight_scale, q.bias)
    got = q(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6)            # float32 rescale only
    # and it is a quantization of the float layer: SQNR well above 30 dB at 8 bits
    with torch.no_grad():
        f = layer(x).double()
    sqnr = 10 * torch.log10(f.pow(2).sum() / (got.double() - f).pow(2).sum())
    assert sqnr > 30


@pytest.mark.parametrize("reduce_range", [None, False, True])
@pytest.mark.parametrize("shape", [(1, 3, 5), (7, 33, 9), (4, 64, 16)])
def test_fbgemm_kernel_matches_float64_reference_of_its_integer_arithmetic(shape, reduce_range):
    torch.manual_seed(0)
    m, k, n = shape
    x, layer = torch.randn(m, k) * 2 + 0.3, nn.Linear(k, n)   # asymmetric range: the zero point matters
    q = Int8DynamicLinear.from_linear(layer, reduce_range=reduce_range)
    assert q.kernel == "fbgemm" and q.reduce_range is reduce_range
    codes, scale, seven_bit = q.kernel_operands()
    assert seven_bit is bool(reduce_range)   # 7-bit activations only when asked for
    halved = reduce_range is None and fbgemm_saturates()   # auto on a saturating CPU: codes at half resolution
    assert torch.equal(codes, torch.round(q.weight_q / 2).to(torch.int8) if halved else q.weight_q)
    assert torch.equal(scale, q.weight_scale * 2 if halved else q.weight_scale)
    int_mm = Int8DynamicLinear.from_linear(layer, kernel="int_mm")
    assert torch.equal(q.weight_q, int_mm.weight_q)   # the same stored weight codes feed both kernels
    ref = fbgemm_linear_reference(x, codes, scale, q.bias, reduce_range=seven_bit)
    if reduce_range is False and fbgemm_saturates():
        # 8-bit activations asked for on a CPU whose kernel saturates (no AVX512-VNNI): it runs, and says so
        import nncompress.quant.native as native
        native._warned_saturation = False
        with pytest.warns(RuntimeWarning, match="saturates"):
            q(x)
        return
    got = q(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    x3 = x.reshape(1, m, k)
    assert torch.allclose(q(x3), got.reshape(1, m, n), rtol=1e-6, atol=1e-6)   # leading dims flatten


def test_auto_reduce_range_is_exact_on_this_cpu():
    """The default (reduce_range=None) never gives saturated sums, whichever CPU runs it: on inputs built
    to overflow int16 pair sums (activations at the top of the grid against codes +-127) the layer
    equals the float64 oracle of the integer arithmetic on the grid it resolved to."""
    torch.manual_seed(0)
    k, n = 256, 32
    layer = nn.Linear(k, n)
    q = Int8DynamicLinear.from_linear(layer)
    assert q.reduce_range is None and q.kernel_operands()[2] is False   # 8-bit activations on every CPU
    with torch.no_grad():   # every row holds codes +-127 throughout: worst case for pairwise int16 sums
        q.weight_q.copy_(torch.where(torch.rand(n, k) < 0.5, 127, -127).to(torch.int8))
        q.weight_q[::2] = 127
    x = torch.rand(6, k) * 0.1
    x[:, ::2] = 1.0         # half of each row quantizes to the grid's top (255)
    x[0] = 1.0
    codes, scale, seven_bit = q.kernel_operands()
    assert int(codes.abs().max()) == (64 if fbgemm_saturates() else 127)
    ref = fbgemm_linear_reference(x, codes, scale, q.bias, reduce_range=seven_bit)
    got = q(x).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the probe's answer is the kernel's behaviour: with 8-bit activations it is exact iff it does not saturate
    packed = fbgemm_prepack(q.weight_q, q.weight_scale, q.bias)
    full = torch.ops.quantized.linear_dynamic(x, packed, False).double()
    exact8 = fbgemm_linear_reference(x, q.weight_q, q.weight_scale, q.bias, reduce_range=False)
    assert torch.allclose(full, exact8, rtol=1e-5, atol=1e-5 * exact8.abs().max().item()) is not fbgemm_saturates()


def test_fbgemm_prepacked_weight_follows_the_buffers():
    torch.manual_seed(0)
    a, b = Int8DynamicLinear.from_linear(nn.Linear(16, 8)), Int8DynamicLinear.from_linear(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    out_b = b(x)
    a(x)                                   # packs a's weights
    a.load_state_dict(b.state_dict())      # must drop the stale pack
    assert torch.equal(a(x), out_b)
    c = copy.deepcopy(a)
    assert torch.equal(c(x), out_b)
    with torch.no_grad():
        c.weight_q.neg_()                  # written in place: the pack follows
    assert torch.allclose(c(x) - c.bias, -(out_b - b.bias), atol=1e-5)
    with pytest.raises(ConfigError, match="reduce_range"):
        Int8DynamicConfig(kernel="int_mm", reduce_range=True)
    assert Int8DynamicConfig().reduce_range is None   # auto: decided per CPU at run time


def test_batched_leading_dims_and_merge():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    q = Int8DynamicLinear.from_linear(layer)
    x = torch.randn(2, 5, 16)
    assert torch.equal(q(x), q(x.reshape(10, 16)).reshape(2, 5, 8))   # rows are independent
    merged = q.merge()
    assert type(merged) is nn.Linear
    codes, scale = weight_int8(layer.weight)
    assert torch.equal(merged.weight, codes.float() * scale[:, None])   # dequantized weight, bit for bit
    assert torch.equal(merged.bias, layer.bias)


def test_keeps_codes_of_a_weight_only_quantlinear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    wq = nncompress.apply(model, QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=8))))
    q = Int8DynamicLinear.from_linear(wq[0])
    assert torch.equal(q.dequantized_weight(), wq[0].quantized_weight().detach())   # same grid, same codes
    static = nncompress.apply(nn.Sequential(nn.Linear(16, 8)), QuantizeConfig(
        weight=QuantSpec(format=IntFormat(bits=4))))
    with pytest.raises(UnsupportedOpError, match="8-bit signed symmetric"):
        Int8DynamicLinear.from_linear(static[0])


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_transform_targets_and_save_load_roundtrip(tmp_path, kernel):
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
    q = nncompress.apply(copy.deepcopy(model), Int8DynamicConfig(kernel=kernel), targets=Targets(types=(nn.Linear,)))
    layers = [m for m in q.modules() if isinstance(m, Int8DynamicLinear)]
    assert len(layers) == len([m for m in model.modules() if isinstance(m, nn.Linear)])
    assert {m.kernel for m in layers} == {kernel}
    with torch.no_grad():
        out = q(x)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999
    nncompress.save(q, tmp_path / "m")
    again = nncompress.load(tmp_path / "m")
    assert {m.kernel for m in again.modules() if isinstance(m, Int8DynamicLinear)} == {kernel}
    # the auto setting is saved as such, to be resolved on the CPU that loads the checkpoint
    assert {m.reduce_range for m in again.modules() if isinstance(m, Int8DynamicLinear)} == {None}
    with torch.no_grad():
        assert torch.equal(again(x), out)
    assert again.state_dict()[next(k for k in again.state_dict() if k.endswith("weight_q"))].dtype == torch.int8
    with pytest.raises(TargetError, match="int8_dynamic: no Linear layer among the targets"):
        nncompress.apply(nn.Sequential(nn.ReLU()), Int8DynamicConfig())


def test_reduce_range_descriptions_old_and_new():
    """Checkpoints written before the auto setting hold a bool: it stays the explicit choice."""
    layer = Int8DynamicLinear(4, 2)
    assert layer.describe(None)["reduce_range"] is None and "reduce_range=auto" in repr(layer)
    for saved, loaded in ((None, None), (True, True), (False, False)):
        desc = {**layer.describe(None), "reduce_range": saved}
        assert Int8DynamicLinear.rebuild(desc, None).reduce_range is loaded
    old = {k: v for k, v in layer.describe(None).items() if k != "reduce_range"}
    assert Int8DynamicLinear.rebuild(old, None).reduce_range is False   # the oldest: no key, 8-bit as it ran
