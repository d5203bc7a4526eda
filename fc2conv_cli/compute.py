"""The values of planned tensors whose steps compute: folds, sums, casts and selections.

``stored_values`` gives an object the writer slices like a numpy array in the output's
stored order; each slice is computed from the source when asked, so memory stays
bounded by the writer's chunk, whatever the tensor's size. Arithmetic is float64, then
one round-to-nearest-even into the output dtype (numpy's and ``ml_dtypes``' casts).
The checks never call this module: they compute their own reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fc2conv_cli.errors import InputError, shown
from fc2conv_cli.plan import Cast, FoldBatchNorm, PlannedTensor, SelectRows, SumSpatial
from fc2conv_cli.readers import Checkpoint, numpy_dtype

__all__ = ["CastError", "batchnorm_vectors", "column_vector", "stored_values"]


class CastError(InputError):
    """A cast overflows to infinity, or flushes a nonzero tensor to zero (exit 2)."""

    code = "cast_error"


def batchnorm_vectors(fold: FoldBatchNorm, checkpoint: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm as ``y = x * scale + shift`` in float64: its scale and shift vectors."""

    def vector(name: str | None, default: float) -> np.ndarray:
        if name is None:
            return np.full(fold.size, default)
        return checkpoint.array(name).astype(np.float64).reshape(-1)

    gamma, beta = vector(fold.gamma, 1.0), vector(fold.beta, 0.0)
    mean, var = vector(fold.mean, 0.0), vector(fold.var, 1.0)
    scale = gamma / np.sqrt(var + fold.eps)
    return scale, beta - mean * scale


def column_vector(fold: FoldBatchNorm, vector: np.ndarray) -> np.ndarray:
    """A vector over a layer's inputs as ``(C, *kernel)``: over the flat features (in the
    map's layout) or over the channels (the same for every position)."""
    conversion = fold.conversion
    channels, kernel = conversion.in_channels, conversion.kernel
    if len(vector) == channels * math.prod(kernel):
        return conversion.layout.fc_rows_to_conv(vector[None, :], channels, kernel)[0]
    return np.broadcast_to(vector.reshape(channels, *(1,) * len(kernel)), (channels, *kernel))


@dataclass
class _CastStats:
    """What a cast did to one tensor, across its chunks."""

    name: str
    overflow: int = 0
    largest: float = 0.0
    nonzero_in: bool = False
    nonzero_out: bool = False

    def add(self, values: np.ndarray, cast: np.ndarray) -> None:
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(values)
            overflow = finite & ~np.isfinite(cast.astype(np.float64))
        if overflow.any():
            self.overflow += int(np.count_nonzero(overflow))
            self.largest = max(self.largest, float(np.abs(values[overflow]).max()))
        self.nonzero_in = self.nonzero_in or bool(np.any(finite & (values != 0)))
        self.nonzero_out = self.nonzero_out or bool(np.any(cast.astype(np.float64) != 0))

    def check(self, cast: Cast) -> None:
        if cast.allow_overflow:
            return
        if self.overflow:
            raise CastError(
                f"tensor {shown(self.name)}: {self.overflow} values overflow {cast.dtype} "
                f"(largest {self.largest:.6g}); nothing written (--allow-overflow writes "
                "them as inf)"
            )
        if self.nonzero_in and not self.nonzero_out:
            raise CastError(
                f"tensor {shown(self.name)}: every nonzero value flushes to zero in "
                f"{cast.dtype}; nothing written (--allow-overflow writes it anyway)"
            )


class _Computed:
    """A planned tensor in its stored order, computed a block at a time when sliced.

    Only what the writer asks is supported: integers and slices on leading axes.
    """

    def __init__(self, planned: PlannedTensor, checkpoint: Checkpoint) -> None:
        self.planned = planned
        self.dtype = numpy_dtype(planned.dtype)
        self.itemsize = self.dtype.itemsize
        source = checkpoint.array(planned.source_name)
        conversion = planned.conversion
        if conversion is None:  # a cast of a tensor that keeps its shape
            self._source, self._perm = source, tuple(range(source.ndim))
            t_shape = source.shape
        else:
            self._source = conversion.source_filters(source)
            self._perm = conversion.stored_perm()
            rows = planned.step(SelectRows)
            out = len(rows.indices) if rows else self._source.shape[0]
            t_shape = (out, conversion.in_channels, *conversion.out_kernel)
        self.shape = tuple(t_shape[a] for a in self._perm)
        self.ndim = len(self.shape)
        self._rows = planned.step(SelectRows)
        self._sum = planned.step(SumSpatial)
        self._cast = planned.cast
        self._row_scale = self._column_scale = None
        for fold in (s for s in planned.steps if isinstance(s, FoldBatchNorm)):
            scale, _ = batchnorm_vectors(fold, checkpoint)
            if fold.position == "after":
                self._row_scale = scale
            else:
                self._column_scale = column_vector(fold, scale)
        self.stats = _CastStats(planned.name)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = (*key, *(slice(None),) * (self.ndim - len(key)))
        squeeze = tuple(j for j, k in enumerate(key) if isinstance(k, int))
        as_slices = [slice(k, k + 1) if isinstance(k, int) else k for k in key]
        t_key = [slice(None)] * self.ndim
        for j, axis in enumerate(self._perm):
            t_key[axis] = as_slices[j]
        block = self._t_block(t_key).transpose(self._perm)
        return block.reshape([n for j, n in enumerate(block.shape) if j not in squeeze])

    def _t_block(self, t_key: list[slice]) -> np.ndarray:
        """The block ``t_key`` of the output in ``T`` order, in the output dtype."""
        source_key: list = list(t_key)
        rows = None
        if self.planned.conversion is not None:
            rows = np.arange(self._source.shape[0])[t_key[0]]
            if self._rows is not None:  # a gather of the kept rows; else a plain slice
                rows = np.asarray(self._rows.indices)[t_key[0]]
                source_key[0] = rows
        if self._sum is not None:
            source_key[2:] = [slice(None)] * (len(source_key) - 2)
        values = self._source[tuple(source_key)].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            if self._column_scale is not None:
                values = values * self._column_scale[tuple(source_key[1:])]
            if self._row_scale is not None:
                values = values * self._row_scale[rows].reshape(-1, *(1,) * (values.ndim - 1))
            if self._sum is not None:
                values = values.sum(axis=tuple(range(2, values.ndim)), keepdims=True)
            out = values.astype(self.dtype)
        if self._cast is not None:
            self.stats.add(values, out)
        return out

    def finish(self) -> None:
        """Raise ``CastError`` if the cast overflowed (or flushed the tensor to zero)."""
        if self._cast is not None:
            self.stats.check(self._cast)


def stored_values(planned: PlannedTensor, checkpoint: Checkpoint):
    """The planned tensor's values in its stored order: a numpy view where values only
    move, else an object computing each slice; call ``finish`` on it (if it has one)
    after the last slice."""
    conversion = planned.conversion
    if not planned.steps and conversion is None:
        return checkpoint.array(planned.source_name)
    if not planned.steps:
        return planned.geometry.source_filters(checkpoint.array(planned.source_name)).transpose(
            planned.geometry.stored_perm()
        )
    if conversion is None and (planned.step(SelectRows) or planned.step(FoldBatchNorm)):
        return _Vector(_bias_values(planned, checkpoint), planned)
    return _Computed(planned, checkpoint)


class _Vector:
    """A computed bias, held whole (it has one value per output)."""

    def __init__(self, values: np.ndarray, planned: PlannedTensor) -> None:
        self._values = values
        with np.errstate(over="ignore", invalid="ignore"):
            self._out = values.astype(numpy_dtype(planned.dtype))
        self._cast = planned.cast
        self.stats = _CastStats(planned.name)
        if self._cast is not None:
            self.stats.add(values, self._out)
        self.shape, self.dtype, self.ndim = self._out.shape, self._out.dtype, 1
        self.itemsize = self.dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        return self._out[key]

    def finish(self) -> None:
        if self._cast is not None:
            self.stats.check(self._cast)


def _bias_values(planned: PlannedTensor, checkpoint: Checkpoint) -> np.ndarray:
    """A bias through its steps, in float64: folds before (from the weight), the
    selection, folds after."""
    folds = [s for s in planned.steps if isinstance(s, FoldBatchNorm)]
    before = next((s for s in folds if s.position == "before"), None)
    after = next((s for s in folds if s.position == "after"), None)
    rows = planned.step(SelectRows)
    size = rows.of if rows else planned.shape[0]
    bias = (
        np.zeros(size)
        if planned.source is None
        else checkpoint.array(planned.source).astype(np.float64)
    )
    if before is not None:
        _, shift = batchnorm_vectors(before, checkpoint)
        column = column_vector(before, shift)
        filters = before.conversion.source_filters(checkpoint.array(before.weight))
        step = max(1, (4 << 20) // max(1, column.size * 8))
        bias = bias.copy()
        for start in range(0, len(filters), step):
            block = filters[start : start + step].astype(np.float64) * column
            bias[start : start + step] += block.reshape(len(block), -1).sum(axis=1)
    picked = np.asarray(rows.indices) if rows else np.arange(size)
    bias = bias[picked]
    if after is not None:
        scale, shift = batchnorm_vectors(after, checkpoint)
        bias = bias * scale[picked] + shift[picked]
    return bias
