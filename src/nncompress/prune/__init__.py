"""Pruning: structured (coupled channel groups that physically shrink the model) and fine-grained
(element, N:M, vector, kernel-pattern masks), their criteria, schedules and lottery tickets.

Importing this package registers the stages `prune`, `sparsify`, `lottery`, `drop_layers` (whole
residual blocks) and `group_conv` (kernel-level pruning into grouped convolutions).
"""
from . import importance  # noqa: F401  (registers the structured criteria)
from .epi import EarlyPruningIndicator
from .granularity import NM, Element, Pattern, Vector
from .kernels import GroupConvConfig, GroupedConv, group_partition, kernel_group_mask
from .layers import DropLayersConfig, find_blocks, remove_blocks
from .lottery import LotteryConfig
from .masks import global_masks, nm_mask, pattern_mask, unstructured_mask, vector_mask
from .penalties import group_lasso, l1_penalty, regularizer
from .sparsity import SparsityConfig, cubic_sparsity
from .structural import apply_record, remove_channels, remove_groups
from .structured import PruneConfig, group_lasso_penalty

__all__ = ["EarlyPruningIndicator", "NM", "Element", "Pattern", "Vector", "GroupConvConfig", "GroupedConv", "group_partition",
           "kernel_group_mask", "DropLayersConfig", "find_blocks", "remove_blocks",
           "LotteryConfig", "global_masks", "nm_mask", "pattern_mask",
           "unstructured_mask", "vector_mask", "SparsityConfig", "cubic_sparsity", "group_lasso", "l1_penalty", "regularizer",
           "apply_record", "remove_channels", "remove_groups", "PruneConfig", "group_lasso_penalty"]
