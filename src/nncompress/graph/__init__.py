"""The read-only dependency graph: trace once with `torch.export`, derive coupled channel groups
(`DependencyGraph`) and module-level data flow (`DataFlow`: who reads each module's output).

>>> import torch, torch.nn as nn
>>> graph = DependencyGraph(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(2, 4))
>>> [(g.size, g.producers, g.prunable) for g in graph.groups()]
[(8, ('0',), True), (2, ('2',), False)]
"""
from .flow import DataFlow, Use, guess_inputs
from .groups import DependencyGraph, Group, Member, build_graph
from .trace import Trace

__all__ = ["DataFlow", "DependencyGraph", "Group", "Member", "Trace", "Use", "build_graph", "guess_inputs"]
