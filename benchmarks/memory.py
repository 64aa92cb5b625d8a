"""Peak memory of one call, for benchmarks run in a fresh process (ours and a peer's, which imports
nothing of nncompress): reset the peak resident set, call, read the peak."""
from __future__ import annotations

from pathlib import Path


def reset_peak() -> float:
    """Reset this process's peak resident set (Linux: /proc/self/clear_refs) and return the current
    resident set (MB): the memory a call then adds is `peak_mb() - reset_peak()`."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")
