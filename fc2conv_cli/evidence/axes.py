"""Follow a feature map's axes through transposes and reshapes to the FC's flat input.

Each axis carries the layout letters it holds (``c``, ``h``, ``w``; ``n`` the batch; ""
a unit axis added by an unsqueeze) and its size where known. A reshape may only merge
neighbouring axes (that is what a flatten is); one that splits an axis, or a transpose
that moves the batch, is a problem the walk reports instead of guessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

__all__ = ["Axes", "WalkProblem"]


class WalkProblem(Exception):
    """The ops between the map and the FC do something other than a flatten."""


@dataclass(frozen=True)
class Axes:
    labels: tuple[str, ...]
    sizes: tuple[int | None, ...]

    @classmethod
    def of_map(cls, letters: str, sizes: tuple[int | None, ...]) -> Axes:
        """A map's axes: ``letters`` such as ``nchw`` or ``nhwc``, sizes in that order."""
        return cls(tuple(letters), tuple(sizes))

    def transpose(self, perm: list[int] | None) -> Axes:
        perm = list(perm) if perm else list(reversed(range(len(self.labels))))
        if sorted(perm) != list(range(len(self.labels))):
            raise WalkProblem(f"a transpose perm {perm} does not fit rank {len(self.labels)}")
        moved = Axes(tuple(self.labels[p] for p in perm), tuple(self.sizes[p] for p in perm))
        if moved.labels[0] != "n":
            raise WalkProblem("a transpose moves the batch axis")
        return moved

    def squeeze(self, dims: list[int] | None) -> Axes:
        rank = len(self.labels)
        drop = {d % rank for d in dims} if dims else {i for i, s in enumerate(self.sizes) if s == 1}
        if 0 in drop and self.labels[0] == "n" and not dims:
            drop.discard(0)
        if any(self.sizes[d] not in (1, None) for d in drop):
            raise WalkProblem("a squeeze drops an axis of size > 1")
        keep = [i for i in range(rank) if i not in drop]
        return Axes(tuple(self.labels[i] for i in keep), tuple(self.sizes[i] for i in keep))

    def unsqueeze(self, dims: list[int]) -> Axes:
        labels, sizes = list(self.labels), list(self.sizes)
        for d in sorted(d % (len(labels) + len(dims)) for d in dims):
            labels.insert(d, "")
            sizes.insert(d, 1)
        return Axes(tuple(labels), tuple(sizes))

    def flatten(self, axis: int = 1) -> Axes:
        axis %= len(self.labels)
        if axis != 1 or self.labels[0] != "n":
            raise WalkProblem(f"a flatten at axis {axis} does not keep the batch alone")
        return Axes(("n", "".join(self.labels[1:])), (self.sizes[0], _product(self.sizes[1:])))

    def reshape(self, target: list[int]) -> Axes:
        """Reshape with ONNX / TF rules (0 copies a dim, -1 is inferred)."""
        dims = [
            self.sizes[i] if d == 0 and i < len(self.sizes) else d for i, d in enumerate(target)
        ]
        if len(dims) == 2 and (dims[0] in (-1, None) or dims[0] == self.sizes[0]):
            rest = _product(self.sizes[1:])
            if dims[1] == -1 or rest is None or dims[1] == rest:
                return self.flatten(1)
        if None in self.sizes[1:] or -1 in dims[1:]:
            raise WalkProblem(f"a reshape to {target} with unknown sizes")
        known = cast("tuple[int, ...]", self.sizes)  # every size but the batch's, checked
        groups, start = [], 1
        for d in cast("list[int]", dims[1:]):
            stop, product = start, 1
            while stop < len(known) and product < d:
                product *= known[stop]
                stop += 1
            while stop < len(known) and known[stop] == 1 and product == d and d != 1:
                stop += 1  # unit axes join the group before them
            if product != d:
                raise WalkProblem(f"a reshape to {target} splits an axis")
            groups.append((start, stop))
            start = stop
        if start != len(self.sizes):
            raise WalkProblem(f"a reshape to {target} does not cover every axis")
        labels = ("n", *("".join(self.labels[a:b]) for a, b in groups))
        return Axes(labels, (self.sizes[0], *(_product(self.sizes[a:b]) for a, b in groups)))

    def layout(self) -> str:
        """The flatten order of an FC input ``(batch, features)``."""
        if len(self.labels) != 2 or self.labels[0] != "n":
            raise WalkProblem(
                f"the FC reads a rank-{len(self.labels)} tensor, not (batch, features)"
            )
        return self.labels[1]


def _product(sizes: tuple[int | None, ...]) -> int | None:
    return None if None in sizes else math.prod(cast("tuple[int, ...]", sizes))
