"""Channel spaces: the union-find at the heart of the dependency graph ("dimension algebra").

Every dimension of every traced tensor carries a *label*: a tuple of segments `(space, offset,
stride)`. Channel `i` of `space` covers the indices `offset + i*stride ... offset + i*stride +
stride - 1` of that dimension. A plain channel dim is one segment `((s, 0, 1),)`; a dim flattened
from `(C, L)` is `((s, 0, L),)`; a concat of two channel dims is `((a, 0, 1), (b, size_a, 1))`.
`None` labels a broadcast or size-1 dim that couples with nothing.

Ops couple spaces (`unify`), parameters attach to them (`attach`), and anything that cannot be
mapped exactly marks them not prunable (`block`, with the reason). A space unified with a layout of
several segments is *redirected*: its members are split over those segments.

>>> sp = Spaces()
>>> a, b = sp.new(4), sp.new(4)
>>> sp.attach(((a, 0, 1),), "conv", "weight", 0)
>>> sp.unify(((a, 0, 1),), ((b, 0, 1),), "(+)", "block")
>>> sp.find(a) == sp.find(b), [s.module for s in sp.members[sp.find(b)]]
(True, ['conv'])
"""
from __future__ import annotations

import dataclasses
from typing import Union

Seg = tuple[int, int, int]  # (space, offset, stride)
Label = Union[tuple[Seg, ...], None]


@dataclasses.dataclass
class Slot:
    """One parameter dim (or shape attribute) attached to a space, before roles are known."""

    module: str
    param: str
    dim: int
    offset: int = 0
    stride: int = 1


class Spaces:
    """Union-find over channel spaces, with members, reasons (not prunable) and a printable chain."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.reason: dict[int, str] = {}  # root -> why it may not be pruned
        self.members: dict[int, list[Slot]] = {}  # root -> attached parameter dims
        self.events: dict[int, list[Slot | str]] = {}  # root -> members and join markers, in order
        self.redirect: dict[int, tuple[Seg, ...]] = {}  # root -> the layout it was split into

    def new(self, size: int, reason: str | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(size)
        self.members[s], self.events[s] = [], []
        if reason:
            self.reason[s] = reason
        return s

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:  # path compression
            self.parent[s], s = root, self.parent[s]
        return root

    def resolve(self, label: Label) -> Label:
        """The label in terms of current roots, with redirected spaces expanded."""
        if label is None:
            return None
        out: list[Seg] = []
        for s, o, st in label:
            r = self.find(s)
            if r in self.redirect:
                out += [(s2, o + o2 * st, st2 * st) for s2, o2, st2 in self.resolve(self.redirect[r])]
            else:
                out.append((r, o, st))
        return tuple(out)

    def width(self, label: Label) -> int:
        """How many indices of its dim `label` covers."""
        return sum(self.size[self.find(s)] * st for s, _, st in self.resolve(label) or ())

    def attach(self, label: Label, module: str, param: str, dim: int) -> None:
        for s, o, st in self.resolve(label) or ():
            slot = Slot(module, param, dim, o, st)
            self.members[s].append(slot)
            self.events[s].append(slot)

    def block(self, label: Label, reason: str) -> None:
        for s, _, _ in self.resolve(label) or ():
            self.reason.setdefault(s, reason)

    def unify(self, a: Label, b: Label, mark: str, where: str) -> None:
        """Couple two labels of the same dim: same channel i on both sides."""
        a, b = self.resolve(a), self.resolve(b)
        if a is None or b is None or a == b:
            return
        if _simple(a) and _simple(b):
            self._union(a[0][0], b[0][0], mark)
        elif len(a) == len(b) and all(o1 == o2 and t1 == t2 and self.size[s1] == self.size[s2]
                                      for (s1, o1, t1), (s2, o2, t2) in zip(a, b)):
            for (s1, _, _), (s2, _, _) in zip(a, b):
                self._union(s1, s2, mark)
        elif _simple(a) and a[0][0] not in {s for s, _, _ in b}:
            self._split(a[0][0], b, mark)
        elif _simple(b) and b[0][0] not in {s for s, _, _ in a}:
            self._split(b[0][0], a, mark)
        else:
            reason = f"{where}: channel layouts differ ({self._show(a)} vs {self._show(b)})"
            self.block(a, reason)
            self.block(b, reason)

    def _union(self, ra: int, rb: int, mark: str) -> None:
        if ra == rb:
            return
        if rb < ra:  # the older space's members first: the chain then reads in graph order
            ra, rb = rb, ra
        if self.size[ra] != self.size[rb]:  # an internal inconsistency: never prune either
            self.reason.setdefault(ra, "sizes disagree")
            self.reason.setdefault(rb, "sizes disagree")
            return
        self.parent[rb] = ra
        if rb in self.reason:
            self.reason.setdefault(ra, self.reason.pop(rb))
        self.members[ra] += self.members.pop(rb)
        self.events[ra] = self.events[ra] + ([mark] if mark else []) + self.events.pop(rb)

    def _split(self, r: int, layout: tuple[Seg, ...], mark: str) -> None:
        """Redirect root `r` to `layout`: each member of `r` is split over the layout's segments."""
        for s, o, st in layout:
            self.events[s].append(mark or "(cat)")
            for m in self.members[r]:
                slot = Slot(m.module, m.param, m.dim, m.offset + o * m.stride, st * m.stride)
                self.members[s].append(slot)
                self.events[s].append(slot)
            if r in self.reason:
                self.reason.setdefault(s, self.reason[r])
        self.members[r], self.events[r] = [], []
        self.redirect[r] = layout

    def _show(self, label: tuple[Seg, ...]) -> str:
        return " + ".join(f"{self.size[s]}" + (f"x{st}" if st != 1 else "") for s, _, st in label)


def _simple(label: tuple[Seg, ...]) -> bool:
    return len(label) == 1 and label[0][1] == 0 and label[0][2] == 1


def scale(label: Label, inner: int) -> Label:
    """The label of a dim merged with trailing dims of total size `inner` (outer dim first)."""
    if label is None:
        return None
    return tuple((s, o * inner, st * inner) for s, o, st in label)
