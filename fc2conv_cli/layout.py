"""Flatten layouts and weight formats: the one piece of math fc2conv rests on.

A feature map ``x[c, *spatial]`` is flattened into the FC's input vector in some axis
order, the *layout*, written slowest axis first: ``chw`` is PyTorch's ``x.flatten(1)``,
``hwc`` is Keras' ``Flatten`` on NHWC. The conv weight is
``Wc[o, c, *spatial] = W[o, flat_index(c, *spatial)]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SPATIAL_AXES", "ConvFormat", "Layout", "WeightFormat"]

# The spatial axis letters of a 1-D, 2-D and 3-D feature map, slowest first.
SPATIAL_AXES = {1: "l", 2: "hw", 3: "dhw"}


class WeightFormat(enum.Enum):
    """How an FC weight matrix is stored."""

    OUT_IN = "out_in"  # torch nn.Linear: (out_features, in_features)
    IN_OUT = "in_out"  # Keras / TF / JAX Dense kernel: (in_features, out_features)


class ConvFormat(enum.Enum):
    """How a conv weight is stored, for any number of spatial axes."""

    OIHW = "oihw"  # torch: (out, in, *kernel)
    HWIO = "hwio"  # Keras / TF / JAX: (*kernel, in, out)

    def shape(self, out_channels: int, in_channels: int, kernel: tuple[int, ...]) -> tuple:
        """The stored shape of a conv weight with these sizes."""
        if self is ConvFormat.OIHW:
            return (out_channels, in_channels, *kernel)
        return (*kernel, in_channels, out_channels)

    def from_oihw(self, ndim: int) -> tuple[int, ...]:
        """Axis permutation from ``(out, in, *kernel)`` to this format (``ndim`` spatial axes)."""
        if self is ConvFormat.OIHW:
            return tuple(range(ndim + 2))
        return (*range(2, ndim + 2), 1, 0)

    def to_oihw(self, ndim: int) -> tuple[int, ...]:
        """Axis permutation from this format back to ``(out, in, *kernel)``."""
        if self is ConvFormat.OIHW:
            return tuple(range(ndim + 2))
        return (ndim + 1, ndim, *range(ndim))


@dataclass(frozen=True)
class Layout:
    """A flatten order: ``c`` plus the spatial axes of one dimensionality, slowest first."""

    axes: str

    def __post_init__(self) -> None:
        spatial = "".join(sorted(set(self.axes) - {"c"}))
        valid = {"".join(sorted(v)): v for v in SPATIAL_AXES.values()}
        if (
            len(set(self.axes)) != len(self.axes)
            or "c" not in self.axes
            or spatial not in valid
            or len(self.axes) != len(spatial) + 1
        ):
            raise ValueError(
                f"layout {self.axes!r} is not a permutation of 'c' and the spatial axes "
                "'l' (1-D), 'hw' (2-D) or 'dhw' (3-D), e.g. chw, hwc, whc, cdhw"
            )

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse a layout such as ``"chw"``; raises ``ValueError`` with the rule."""
        return cls(text.strip().lower())

    @property
    def spatial_ndim(self) -> int:
        return len(self.axes) - 1

    @property
    def canonical(self) -> str:
        """The conv weight's own axis order: ``c`` then the spatial axes (``chw``)."""
        return "c" + SPATIAL_AXES[self.spatial_ndim]

    @property
    def is_canonical(self) -> bool:
        """True when flattening in this order is a plain reshape of ``(C, *kernel)``."""
        return self.axes == self.canonical

    def sizes(self, in_channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        """The feature map's axis sizes in this layout's order."""
        size = dict(zip(self.canonical, (in_channels, *kernel), strict=True))
        return tuple(size[a] for a in self.axes)

    def to_canonical(self) -> tuple[int, ...]:
        """Axis permutation from this layout's order to the canonical order."""
        return tuple(self.axes.index(a) for a in self.canonical)

    def from_canonical(self) -> tuple[int, ...]:
        """Axis permutation from the canonical order to this layout's order."""
        return tuple(self.canonical.index(a) for a in self.axes)

    def flatten(self, x: np.ndarray) -> np.ndarray:
        """Flatten ``x`` of shape ``(N, C, *spatial)`` to ``(N, C*prod(spatial))`` in this order.

        This is what the original network did before its first FC layer.
        """
        perm = (0, *(1 + a for a in self.from_canonical()))
        return x.transpose(perm).reshape(x.shape[0], -1)

    def fc_rows_to_conv(self, rows: np.ndarray, in_channels: int, kernel: tuple[int, ...]):
        """Turn FC weight rows ``(O, in_features)`` into conv filters ``(O, C, *kernel)``.

        Returns a view where possible (a pure reshape for a canonical layout).
        """
        shaped = rows.reshape(rows.shape[0], *self.sizes(in_channels, kernel))
        return shaped.transpose((0, *(1 + a for a in self.to_canonical())))

    def __str__(self) -> str:
        return self.axes
