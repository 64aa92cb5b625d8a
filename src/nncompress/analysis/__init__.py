"""Analyses that run techniques and measure the result, to choose how to compress (recipe level).

>>> from nncompress.analysis import sensitivity, SensitivityResult
"""
from .sensitivity import DEFAULT_RATIOS, ChannelUnit, SensitivityResult, channel_units, sensitivity

__all__ = ["DEFAULT_RATIOS", "ChannelUnit", "SensitivityResult", "channel_units", "sensitivity"]
