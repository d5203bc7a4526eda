"""The shapes a flattened map can have, and what the conv kernels say about them."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ConvInfo", "factorisations", "map_shapes", "orientation"]


@dataclass(frozen=True)
class ConvInfo:
    """A conv weight seen as a layer: its name, channels and kernel (spatial sizes)."""

    name: str
    out_channels: int
    in_channels: int
    kernel: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)


def factorisations(positions: int, rank: int) -> list[tuple[int, ...]]:
    """Every ordered way to write ``positions`` as a product of ``rank`` sizes."""
    if rank == 1:
        return [(positions,)]
    return [
        (d, *rest)
        for d in range(1, positions + 1)
        if positions % d == 0
        for rest in factorisations(positions // d, rank - 1)
    ]


def orientation(convs: list[ConvInfo]) -> tuple[str | None, str]:
    """What 2-D kernels say about the map: ``("column", why)`` when every kernel larger
    than 1x1 is ``(k, 1)`` (likely W = 1), ``("row", why)`` for ``(1, k)`` (H = 1),
    ``("tall"|"wide", why)`` when unequal kernels lean one way, else ``(None, "")``."""
    shaped = [c for c in convs if c.rank == 2 and math.prod(c.kernel) > 1]
    if not shaped:
        return None, ""
    if all(c.kernel[1] == 1 for c in shaped):
        return "column", f"every conv kernel larger than 1x1 is (k, 1) ({shaped[-1].name})"
    if all(c.kernel[0] == 1 for c in shaped):
        return "row", f"every conv kernel larger than 1x1 is (1, k) ({shaped[-1].name})"
    tall = sum(c.kernel[0] > c.kernel[1] for c in shaped)
    wide = sum(c.kernel[0] < c.kernel[1] for c in shaped)
    if tall > wide:
        return "tall", f"{tall} of {len(shaped)} kernels are taller than wide"
    if wide > tall:
        return "wide", f"{wide} of {len(shaped)} kernels are wider than tall"
    return None, ""


def map_shapes(positions: int, rank: int, convs: list[ConvInfo]) -> tuple[list, list[str]]:
    """(candidate shapes in preference order, notes on what the geometry says).

    Every factorisation stays a candidate (a net may pool a 2-D map after (k, 1) convs);
    the geometry orders them: ``(k, 1)`` kernels everywhere put ``positions x 1`` first
    (``(1, k)``: ``1 x positions``), then the most square, taller-first when the kernels
    lean tall, else wider (or square) first.
    """
    shapes = factorisations(positions, rank)
    notes: list[str] = []
    lean, why = orientation(convs) if rank == 2 else (None, "")
    first = None
    if lean == "column":
        first, notes = (positions, 1), [f"W = 1 is likely: {why}"]
    elif lean == "row":
        first, notes = (1, positions), [f"H = 1 is likely: {why}"]

    def key(shape: tuple[int, ...]) -> tuple:
        preferred = shape[0] > shape[-1] if lean in ("tall", "column") else shape[0] <= shape[-1]
        return (shape != first, max(shape) / min(shape), not preferred, shape)

    return sorted(shapes, key=key), notes
