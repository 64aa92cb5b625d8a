"""Typed errors. Each message is one line that names the culprit and the fix.

The CLI turns any `NNCompressError` into that line on stderr and exit code 2.
"""
from __future__ import annotations


class NNCompressError(Exception):
    """Base of every error a user can cause (bad recipe, bad file, bad data)."""


class ConfigError(NNCompressError, ValueError):
    """A config or recipe field is wrong. `path` is where, in YAML terms: `stages[2].ratio`."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error, located under `prefix` (used while walking nested configs)."""
        path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else f"{prefix}{self.path}"
        return ConfigError(path, self.message)


class RegistryError(NNCompressError, KeyError):
    """An unknown or duplicate registered name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TargetError(NNCompressError):
    """A `Targets` selection that matches nothing, or names a type that does not exist."""


class UnsupportedOpError(NNCompressError):
    """A model contains an op or layer a transform has no rule for."""


class DataError(NNCompressError):
    """Data of the wrong shape or kind, or a data factory that fails."""


class ModelLoadError(NNCompressError):
    """A model spec that cannot be resolved, or a saved model that is corrupt or mismatched."""


class TrainingError(NNCompressError):
    """Training diverged (NaN/inf loss) or cannot start."""


class CompositionError(NNCompressError):
    """A transform reached a layer another technique already changed, and the two do not compose."""
