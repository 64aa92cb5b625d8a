"""lowrank/: low-rank factorization. Linear layers by truncated SVD into two smaller Linears;
convolutions by channel SVD, spatial SVD (kh x 1 then 1 x kw) or Tucker-2 (1x1, kxk core, 1x1).

    import nncompress
    from nncompress.lowrank import LowRankConfig
    model = nncompress.apply(model, LowRankConfig(keep_params=0.5), targets=nncompress.Targets(types=("Linear",)))

Pure maths in `svd`, rank selection in `rank`, the layers in `layers`, the transform in `factorize`.
"""
from .factorize import LowRankConfig
from .layers import LowRankConv, LowRankLinear
from .rank import Ladder, allocate, energy_rank, round_rank
from .svd import (mode_singular_values, residual_energy, singular_values, spatial_kernel, spatial_matrix,
                  spatial_svd, truncated_svd, tucker2, tucker2_kernel, whitened_svd, whitening)

__all__ = ["Ladder", "LowRankConfig", "LowRankConv", "LowRankLinear", "allocate", "energy_rank",
           "mode_singular_values", "residual_energy", "round_rank",
           "singular_values", "spatial_kernel", "spatial_matrix", "spatial_svd", "truncated_svd", "tucker2",
           "tucker2_kernel", "whitened_svd", "whitening"]
