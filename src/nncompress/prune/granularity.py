"""Sparsity granularities as values, like quantization's: what one mask decision covers.

    SparsityConfig(granularity=NM(2, 4))                   # in YAML: granularity: {kind: nm, n: 2, m: 4}
    SparsityConfig(granularity=Vector(dim=-1), ratio=0.5)   # whole vectors along the input dim

>>> granularity_from_dict({"kind": "nm", "n": 1, "m": 4}).sparsity
0.75
>>> granularity_from_dict("pattern")
Pattern()
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..core import Config, check
from ..core.config import tagged, tagged_dict

__all__ = ["Element", "NM", "Vector", "Pattern", "SPARSITY_KINDS", "granularity_from_dict", "granularity_to_dict"]


@dataclasses.dataclass(frozen=True)
class Element(Config):
    """Each weight on its own (unstructured)."""


@dataclasses.dataclass(frozen=True)
class NM(Config):
    """N kept of every M consecutive weights along the input dimension (2:4: sparse tensor cores)."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        check(self.m >= 1, "m", f"must be >= 1, got {self.m}")
        check(1 <= self.n <= self.m, "n", f"must be in [1, m={self.m}], got {self.n}")

    @property
    def sparsity(self) -> float:
        """The fraction of zeros it implies, 1 - n/m."""
        return 1 - self.n / self.m


@dataclasses.dataclass(frozen=True)
class Vector(Config):
    """Whole vectors along `dim` (a weight row of the input dimension by default)."""

    dim: int = -1


@dataclasses.dataclass(frozen=True)
class Pattern(Config):
    """3x3 kernel patterns (4 or 5 of 9 weights kept), plus whole kernels beyond that sparsity."""


SPARSITY_KINDS: dict[str, type] = {"element": Element, "nm": NM, "vector": Vector, "pattern": Pattern}


def granularity_from_dict(data: Any, path: str = "granularity") -> Any:
    """A granularity value from YAML (`element`, `{kind: nm, n: 2, m: 4}`, ...) or a value."""
    return tagged(data, path, SPARSITY_KINDS, "sparsity granularity")


def granularity_to_dict(g: Any) -> dict[str, Any]:
    return tagged_dict(g, SPARSITY_KINDS)
