"""Number formats as values: pure maths on tensors, each format deriving its own constants.

>>> FloatFormat(exp=4, man=3).max
448.0
>>> IntFormat(bits=4).bit_cost((128, 256), PerGroup(axis=1, size=64))
4.25
>>> MXFP4.bit_cost(1024)
4.25

Every format is a frozen `Config` (so it round-trips through `to_dict`/`from_dict`) with
`quantize(x, scale=None)`, `encode`/`decode` of int32 codes, `bits` and `bit_cost`; see `base`.
"""
from .base import NumberFormat, pow2
from .binary import BinaryFormat, TernaryFormat
from .block import (MXFP4, MXFP6, MXFP6_E3M2, MXFP8, MXFP8_E5M2, MXINT8, BlockFloat, BlockFormat, BlockLog,
                    BlockMinifloat, from_blocks, to_blocks)
from .codebook import (LogFormat, Pow2Format, ScaledCodebook, fit_scaled_codebook, int_codebook, log_codebook,
                       nearest_level, pow2_codebook)
from .granularity import (Granularity, PerChannel, PerGroup, PerTensor, apply_grouped, expand_scale, group_amax,
                          group_min_max, group_reduce, merge_groups, num_groups, split_groups)
from .integer import FixedPoint, IntFormat, fake_quantize, int_qparams
from .minifloat import FloatFormat
from .packing import pack, packed_size, unpack

__all__ = [
    "NumberFormat", "pow2",
    "IntFormat", "FixedPoint", "int_qparams", "fake_quantize",
    "FloatFormat",
    "BlockFloat", "BlockMinifloat", "BlockLog", "BlockFormat", "to_blocks", "from_blocks",
    "MXINT8", "MXFP8", "MXFP8_E5M2", "MXFP6", "MXFP6_E3M2", "MXFP4",
    "Pow2Format", "LogFormat", "ScaledCodebook", "fit_scaled_codebook", "nearest_level",
    "int_codebook", "pow2_codebook", "log_codebook",
    "BinaryFormat", "TernaryFormat",
    "PerTensor", "PerChannel", "PerGroup", "Granularity", "split_groups", "merge_groups", "group_reduce",
    "group_amax", "group_min_max", "expand_scale", "apply_grouped", "num_groups",
    "pack", "unpack", "packed_size",
]
