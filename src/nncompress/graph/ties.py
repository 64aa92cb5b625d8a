"""Couplings the trace cannot see: forwards that reshape a layer's output with another tensor's width.

Export records sizes as constants: `x.reshape(n, c, -1)` becomes `reshape(x, [2, 16, -1])`, whether
`c` was read from `x` itself (safe) or from the layer's *input* or the config (the output must then
keep the input's width). `SAME_WIDTH` names the layers of known families that do the latter; their
output channels are tied to (the first block of) their input channels, so both are pruned together
and the reshape stays valid.

>>> sorted(SAME_WIDTH)[:2]
['DPTReassembleStage', 'GLPNEfficientSelfAttention']
"""
from __future__ import annotations

import fnmatch

from .walk import Walk

__all__ = ["SAME_WIDTH", "tie_widths"]

# module class -> its weights (relative names, fnmatch patterns) whose output width must equal their input width
SAME_WIDTH = {
    # reshape(batch_size, num_channels, -1) of the spatial-reduction conv's output, num_channels being its input's
    "SegformerSequenceReduction": "sequence_reduction.weight",
    "GLPNEfficientSelfAttention": "sr.weight",
    # reshape(feature_shape) of the readout projection's output, feature_shape being the backbone's tokens'
    "DPTReassembleStage": "readout_projects.*.0.weight",
}


def tie_widths(walk: Walk) -> None:
    """Unify dim 0 of every `SAME_WIDTH` weight with the first block of its dim 1 (blocked if they differ)."""
    for fqn, module in walk.tr.modules.items():
        pattern = SAME_WIDTH.get(type(module).__name__)
        if pattern is None:
            continue
        prefix = f"{fqn}." if fqn else ""
        for name, labels in walk.by_param.items():
            if not name.startswith(prefix) or not fnmatch.fnmatchcase(name[len(prefix):], pattern):
                continue
            if len(labels) < 2 or labels[0] is None or labels[1] is None:
                continue  # a single channel: nothing to prune, nothing to tie
            first = walk.sp.resolve(labels[1])[0]
            why = f"{fqn}: {type(module).__name__}.forward reshapes {name}'s output with its input's width"
            if first[1:] != (0, 1) or walk.sp.width(labels[0]) != walk.sp.size[first[0]]:
                walk.block([labels[0], labels[1]], f"{why}, and the two cannot be tied")
                continue
            walk.unify(labels[0], (first,), why, "(same width)")
