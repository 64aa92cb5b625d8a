"""Quantization: observers, fake-quant wrappers, PTQ (`quantize`), GPTQ (`gptq`), QAT (`qat`), BN folding,
cross-layer equalization.

    from nncompress.quant import QuantizeConfig, QuantSpec
    from nncompress.formats import IntFormat
    model = nncompress.apply(model, QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4))))

SmoothQuant (`smoothquant`, run before `quantize`) moves activation outliers into the weights:

    model = nncompress.apply(model, SmoothQuantConfig(alpha=0.5), context=nncompress.Context(data=data))

Importing this package registers the transforms `quantize`, `gptq`, `awq`, `qat`, `smoothquant`, `int8_dynamic` and
`mixed_precision` (per-layer formats under a budget), the observers
`minmax`, `moving_average_minmax`, `percentile`, `mse` and `kl`, and the checkpoint storage hints
(`storage`: quantized weights saved as bit-packed integer codes).
"""
from .bn_fold import equalization_scales, equalize, find_conv_bn_pairs, find_equalization_pairs, fold_batchnorm
from .fake_quant import (FakeQuant, GradScale, QuantConv, QuantEmbedding, QuantLinear, QuantSpec, QuantWrapper, STEQuantize,
                         calibrating, dorefa_weight, format_from_dict, format_to_dict, granularity_from_dict,
                         lsq_quantize, pact_quantize, qparams, quantize_ste, quantize_values, wrap)
from .gptq import GPTQConfig, gptq_quantize
from .awq import AWQConfig, awq_scales, round_to_nearest
from .observers import kl_threshold, observe
from .ptq import QuantizeConfig, bias_correct, calibrate, quant_sensitivity
from .smoothquant import (SmoothedLinear, SmoothGroup, SmoothQuantConfig, activation_maxima, find_smooth_groups,
                          migrate_into_norm, smoothing_scales, weight_input_max)
from .qat import QATConfig, frozen_weight_quant, kd_loss, refresh_weight_scales
from .storage import WeightCodes, dequantize_codes, storage_hints, weight_codes
from . import native  # noqa: F401,E402  (registers int8_dynamic: torch-native int8 Linear)
from .mixed import Choice, MixedLatency, MixedPrecisionConfig, plan_stages, plan_yaml, solve_plan  # noqa: E402

__all__ = [
    "QuantSpec", "QuantizeConfig", "QATConfig", "GPTQConfig", "gptq_quantize", "AWQConfig", "awq_scales", "round_to_nearest", "refresh_weight_scales", "kd_loss",
    "FakeQuant", "QuantWrapper", "QuantLinear", "QuantConv", "QuantEmbedding", "frozen_weight_quant", "wrap", "calibrating", "calibrate", "bias_correct",
    "quant_sensitivity", "STEQuantize", "GradScale", "quantize_ste", "quantize_values", "qparams",
    "lsq_quantize", "pact_quantize", "dorefa_weight", "format_from_dict", "format_to_dict", "granularity_from_dict",
    "observe", "kl_threshold",
    "fold_batchnorm", "find_conv_bn_pairs", "equalize", "equalization_scales", "find_equalization_pairs",
    "WeightCodes", "weight_codes", "dequantize_codes", "storage_hints",
    "SmoothQuantConfig", "SmoothedLinear", "SmoothGroup", "smoothing_scales",
    "weight_input_max", "migrate_into_norm", "activation_maxima", "find_smooth_groups",
    "Choice", "MixedLatency", "MixedPrecisionConfig", "plan_stages", "plan_yaml", "solve_plan",
]
