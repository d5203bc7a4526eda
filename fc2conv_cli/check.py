"""Prove the written file computes what the source did.

Three proofs per converted layer, strongest first:

1. **Exact.** The conversion only moves values, so the written conv weight, read back in
   the FC's order (``conv_to_fc_rows``), must hold the source FC weight's bits, value for
   value: both are compared as unsigned integers of the item size, so NaN payloads and
   signed zeros count. The same for the bias. Every value, in chunks of rows.
2. **Window, float64.** On ``WINDOW_SAMPLES`` seeded random feature maps of the kernel's
   size: the source FC (``layout.flatten(x) @ W.T + b``) against a convolution of the
   written filters, both in float64, so the figure measures the conversion, not float
   rounding (~1e-15 whatever the stored dtype). Outputs that are not finite in the source
   (rows holding NaN or Inf) are not compared, and counted.
3. **Dense, float64.** A real sliding-window convolution of the written filters over a map
   ``kernel + DENSE_MARGIN`` wide, each output position against the source FC applied to
   that window (for kernels larger than 1). The convolution is
   ``torch.nn.functional.conv1d/2d/3d`` when torch is already loaded, otherwise
   ``conv_nd``: numpy, shift-and-add over kernel offsets, arithmetic of its own.

The float64 checks cover up to ``FLOAT64_FILTERS`` seeded output filters per layer (all
of them in smaller layers) plus every filter the exact check found different: the exact
check already proves every value, and the float64 figures are the readable part. Copied
tensors are compared byte for byte. Everything works in bounded chunks of rows, so memory
stays flat whatever the layer's size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.plan import (
    Cast,
    Conversion,
    FoldBatchNorm,
    LayerPlan,
    Plan,
    PlannedTensor,
    SelectRows,
    SumSpatial,
)
from fc2conv_cli.readers import DTYPE_BITS, Checkpoint, numpy_dtype

__all__ = [
    "CHECK_WORKERS",
    "DENSE_MARGIN",
    "FLOAT64_FILTERS",
    "WINDOW_SAMPLES",
    "LayerCheck",
    "Mismatch",
    "WrittenCheck",
    "check_copies",
    "check_index",
    "check_layer",
    "check_written",
    "conv_nd",
    "conv_to_fc_rows",
    "fc_rows",
    "rne_bits",
    "windows",
]

WINDOW_SAMPLES = 2  # random feature maps of exactly the kernel's size
DENSE_MARGIN = 1  # the dense map is kernel + 1 per axis: 2, 4 or 8 positions
FLOAT64_FILTERS = 256  # output filters per layer that the float64 checks compute
# Threads for the checks (numpy and BLAS release the GIL): by the time they run, the
# input's hash is done, and a 2-core machine has a core for each.
CHECK_WORKERS = 2
# Bytes of weight rows per chunk: small enough to stay in cache while a chunk is compared,
# cast and multiplied, large enough that per-chunk overhead is nothing.
_CHECK_CHUNK_BYTES = 4 << 20
_COMPARE_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Mismatch:
    """The first value of a converted tensor whose bits differ from the source's.

    ``channel`` and ``position`` (the kernel offset) are None for a bias. ``source`` and
    ``written`` show the value and its bits; ``count`` values of the tensor differ.
    """

    tensor: str
    output: int
    channel: int | None
    position: tuple[int, ...] | None
    source: str
    written: str
    count: int

    @property
    def index(self) -> str:
        if self.channel is None:
            return f"(output {self.output})"
        position = ", ".join(map(str, self.position or ()))
        return f"(output {self.output}, channel {self.channel}, position ({position}))"

    def describe(self) -> str:
        more = f"; {self.count} values differ" if self.count > 1 else ""
        return (
            f"{self.tensor} differs from the source at {self.index}: "
            f"source {self.source}, written {self.written}{more}"
        )


@dataclass(frozen=True)
class LayerCheck:
    """The result of checking one converted layer.

    ``bits_equal``: the exact check (None: not run). ``mismatches``: the first differing
    value of the weight and of the bias. Diffs are float64 ``max |fc - conv|`` over the
    outputs that are finite in the source, None when not finite. ``nonfinite_rows``:
    output rows whose source weights or bias hold NaN or Inf. ``float64_rows``: output
    filters the float64 checks computed, of ``out_features``.
    """

    layer: str
    max_abs_diff: float | None
    dense_max_abs_diff: float | None
    dense_checked: bool
    ok: bool
    bits_equal: bool | None = None
    mismatches: tuple[Mismatch, ...] = ()
    nonfinite_rows: int = 0
    float64_rows: int = 0
    out_features: int = 0
    proof: str = "exact"
    tolerance: float | None = None  # the float64 bound, where it scales with the dtype


def written_filters(weight: np.ndarray, conversion: Conversion, rows: slice | np.ndarray):
    """Output filters ``rows`` of a written conv weight as ``(n, C, *kernel)``.

    The one place that knows how the written conv weight orders its axes: ``oihw`` is
    ``(O, C, *kernel)``, a plain slice; ``hwio`` ``(*kernel, C, O)`` is viewed back first.
    """
    return conversion.written_filters(weight)[rows]


def conv_to_fc_rows(weight: np.ndarray, conversion: Conversion, rows: slice | np.ndarray):
    """Output filters ``rows`` of a written conv weight, back in the FC's order.

    Returns ``W[o, i]`` for those rows, ``(n, in_features)``, ``i`` the source's flat
    index (``layout.flatten``). Works on any dtype, bit views included.
    """
    return conversion.layout.flatten(written_filters(weight, conversion, rows))


def fc_rows(weight: np.ndarray, weight_format: WeightFormat, rows: slice | np.ndarray):
    """Rows ``rows`` of a stored FC weight as ``W[o, i]``, ``(n, in_features)``.

    An ``in_out`` kernel ``(in_features, out_features)`` is transposed back.
    """
    return weight[rows] if weight_format is WeightFormat.OUT_IN else weight[:, rows].T


def conv_nd(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """N-d cross-correlation, stride 1, no padding: ``torch.nn.functional.conv1d/2d/3d``.

    ``x``: ``(N, C, *spatial)``, ``weight``: ``(O, C, *kernel)``, ``bias``: ``(O,)``;
    returns ``(N, O, *(spatial - kernel + 1))``. Computed as a sum over kernel offsets of
    that offset's filter taps times the input shifted by it: not window by window.
    """
    kernel = weight.shape[2:]
    positions = tuple(s - k + 1 for s, k in zip(x.shape[2:], kernel, strict=True))
    count, channels = x.shape[:2]
    # Channels last, so each offset's taps are an (O, C) matrix BLAS reads in place.
    taps = np.moveaxis(weight, 1, -1).copy()
    out = np.zeros((len(weight), count * math.prod(positions)), np.result_type(x, weight))
    for offset in np.ndindex(*kernel):
        window = tuple(slice(o, o + p) for o, p in zip(offset, positions, strict=True))
        shifted = x[(slice(None), slice(None), *window)]
        out += taps[(slice(None), *offset)] @ np.moveaxis(shifted, 1, 0).reshape(channels, -1)
    out = np.moveaxis(out.reshape(len(weight), count, *positions), 0, 1)
    return out if bias is None else out + bias.reshape(1, -1, *(1,) * len(kernel))


def windows(x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Every kernel-sized window of ``x`` ``(N, C, *spatial)``: ``(N * positions, C, *kernel)``.

    Windows are ordered by sample, then position in row-major order.
    """
    ndim = len(kernel)
    view = sliding_window_view(x, kernel, axis=tuple(range(2, 2 + ndim)))  # (N, C, *P, *K)
    return np.moveaxis(view, 1, 1 + ndim).reshape(-1, x.shape[1], *kernel)


@dataclass(frozen=True)
class WrittenCheck:
    """Every check of a written file: its converted layers, copied tensors and index.

    ``index_problems``: tensor name -> problem (missing, extra, misshapen); the layers and
    copies involved are reported there, not checked.
    """

    layers: tuple[LayerCheck, ...]
    copy_mismatches: tuple[str, ...]
    index_problems: dict[str, str]


def check_written(
    plan: Plan,
    source: Checkpoint,
    written: Checkpoint,
    atol: float,
    seed: int,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> WrittenCheck:
    """Check a written file against its plan and source, in ``workers`` threads
    (default ``CHECK_WORKERS``). ``progress`` is told the bytes of each layer's outputs
    as its checks finish, then those of the copied tensors (in the caller's thread)."""
    index_problems = check_index(plan, written)
    layers = [
        layer
        for layer in plan.layers
        if not {layer.weight.name, layer.bias.name if layer.bias else ""} & set(index_problems)
    ]
    with (
        _one_blas_thread(),
        ThreadPoolExecutor(workers or CHECK_WORKERS, thread_name_prefix="fc2conv-check") as pool,
    ):
        checks = _check_layers(layers, source, written, atol, seed, pool, progress)
        copies = pool.submit(check_copies, plan, source, written, index_problems)
        copied = copies.result()
        if progress is not None:
            progress(sum(t.nbytes for t in plan.copied))
        return WrittenCheck(checks, copied, index_problems)


def check_layer(
    layer: LayerPlan, source: Checkpoint, written: Checkpoint, atol: float, seed: int
) -> LayerCheck:
    """Check one converted layer: its bits exactly, then the float64 window and dense checks."""
    with _one_blas_thread(), ThreadPoolExecutor(1) as pool:
        return _check_layers([layer], source, written, atol, seed, pool)[0]


def _check_layers(
    layers: list[LayerPlan],
    source: Checkpoint,
    written: Checkpoint,
    atol: float,
    seed: int,
    pool: Executor,
    progress: Callable[[int], None] | None = None,
) -> tuple[LayerCheck, ...]:
    """The exact and the float64 checks of every layer, as concurrent tasks of ``pool``.

    The float64 checks start on the seeded sample of filters; a filter the exact check
    finds different is added afterwards (only a failing layer pays for it).
    """
    exact = [pool.submit(_compare_layer, layer, source, written) for layer in layers]
    samples = [_float64_rows(layer.out_features, seed, []) for layer in layers]
    sampled = [
        pool.submit(_float64_diffs, layer, source, written, rows, seed, atol)
        for layer, rows in zip(layers, samples, strict=True)
    ]
    checks = []
    for layer, compared, sample, diffs in zip(layers, exact, samples, sampled, strict=True):
        mismatches, nonfinite = compared.result()
        rows = _float64_rows(layer.out_features, seed, [m.output for m in mismatches])
        result = (
            diffs.result()
            if np.array_equal(rows, sample)
            else _float64_diffs(layer, source, written, rows, seed, atol)
        )
        window, dense, dense_checked, tolerance, within_bound = result
        if tolerance is None:
            bound_ok = [
                d is not None and d <= atol for d in (window, dense if dense_checked else 0.0)
            ]
        else:
            bound_ok = [within_bound]
        checks.append(
            LayerCheck(
                layer.rule.name,
                window,
                dense,
                dense_checked,
                ok=not mismatches and all(bound_ok),
                bits_equal=not mismatches if layer.weight.exact else None,
                mismatches=tuple(mismatches),
                nonfinite_rows=int(np.count_nonzero(nonfinite)),
                float64_rows=len(rows),
                out_features=layer.out_features,
                proof=layer.proof,
                tolerance=None if tolerance is None else tolerance + atol,
            )
        )
        if progress is not None:
            progress(sum(t.nbytes for t in (layer.weight, layer.bias) if t is not None))
    return tuple(checks)


def _one_blas_thread():
    # The products are skinny and memory-bound: more BLAS threads gain nothing alone, and
    # on a busy machine their spin-waits made the check 3-8x slower (measured), so one.
    # Set once around all the check threads: threadpoolctl's limits are process-wide.
    return threadpool_limits(limits=1, user_api="blas")


def check_copies(
    plan: Plan, source: Checkpoint, written: Checkpoint, skip: Collection[str] = ()
) -> tuple[str, ...]:
    """Names of byte-copied output tensors whose bytes differ from the source's.

    A converted layer's bias is compared by ``check_layer``. Tensors named in ``skip``
    (missing or misshapen, see ``check_index``) are not read.
    """
    differ = []
    for planned in plan.tensors:
        if planned.conversion is not None or planned.layer is not None or planned.name in skip:
            continue
        if planned.cast is not None:
            if _cast_differs(planned, source, written):
                differ.append(planned.name)
            continue
        a, b = source.raw(planned.source_name), written.raw(planned.name)
        if len(a) != len(b) or not all(
            np.array_equal(
                np.frombuffer(a[i : i + _COMPARE_CHUNK_BYTES], np.uint8),
                np.frombuffer(b[i : i + _COMPARE_CHUNK_BYTES], np.uint8),
            )
            for i in range(0, len(a), _COMPARE_CHUNK_BYTES)
        ):
            differ.append(planned.name)
    return tuple(differ)


def _cast_differs(planned: PlannedTensor, source: Checkpoint, written: Checkpoint) -> bool:
    """A cast copy against the source cast independently (``rne_bits``), in chunks."""
    values = source.array(planned.source_name).reshape(-1)
    got = _bits(written, planned.name).reshape(-1)
    step = max(1, _COMPARE_CHUNK_BYTES // 8)
    for start in range(0, len(values), step):
        expected = rne_bits(values[start : start + step], planned.dtype)
        if np.any(_differ(expected, got[start : start + step], planned.dtype, True)):
            return True
    return False


def check_index(plan: Plan, written: Checkpoint) -> dict[str, str]:
    """Tensor name -> problem, for the written file against the plan: missing, extra, wrong."""
    problems = {}
    for planned in plan.tensors:
        info = written.tensors.get(planned.name)
        if info is None:
            problems[planned.name] = "missing from the written file"
        elif (info.dtype, info.shape) != (planned.dtype, planned.shape):
            problems[planned.name] = (
                f"written as {info.dtype} {list(info.shape)}, "
                f"planned {planned.dtype} {list(planned.shape)}"
            )
    for name in sorted(set(written.tensors) - {t.name for t in plan.tensors}):
        problems[name] = "in the written file but not in the plan"
    return problems


# -- exact ------------------------------------------------------------------------------


def _bits(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """A tensor's values as unsigned integers of its item size: NaN payloads, signed
    zeros and dtypes numpy cannot compute in all compare by their bits."""
    info = checkpoint.tensors[name]
    unsigned = np.dtype(f"u{DTYPE_BITS[info.dtype] // 8}")
    return np.frombuffer(checkpoint.raw(name), unsigned).reshape(info.shape)


def _compare_layer(
    layer: LayerPlan, source: Checkpoint, written: Checkpoint
) -> tuple[list[Mismatch], np.ndarray]:
    """The exact check of a layer's weight and bias, where their values only move (or are
    cast): the first mismatch of each, and which output rows hold NaN or Inf in the source."""
    mismatches: list[Mismatch] = []
    nonfinite = np.zeros(layer.out_features, bool)
    if layer.weight.exact:
        mismatches, nonfinite = _compare_weight(layer, source, written)
    if layer.bias is not None and layer.bias.exact:
        bias_mismatch, bias_nonfinite = _compare_bias(layer.bias, source, written)
        mismatches += bias_mismatch
        nonfinite |= bias_nonfinite
    return mismatches, nonfinite


def _source_rows(planned: PlannedTensor, rows: slice) -> slice | np.ndarray:
    """The source rows behind output rows ``rows`` (after ``outputs``)."""
    select = planned.step(SelectRows)
    return rows if select is None else np.asarray(select.indices[rows], np.int64)


def _read_back(weight: np.ndarray, conversion: Conversion, rows) -> np.ndarray:
    """Rows of a written weight in the source's order, ``(n, -1)``: FC order for an FC
    source (``conv_to_fc_rows``), the conv's ``(C, *kernel)`` order for a conv source."""
    if conversion.direction == "fc_to_conv":
        return conv_to_fc_rows(weight, conversion, rows)
    filters = conversion.written_filters(weight)[rows]
    return filters.reshape(len(filters), -1)


def _in_source_order(weight: np.ndarray, conversion: Conversion, rows) -> np.ndarray:
    """Rows of a source weight, ``(n, -1)``, in the order ``_read_back`` gives."""
    if conversion.direction == "fc_to_conv":
        return fc_rows(weight, conversion.weight_format, rows)
    filters = conversion.source_filters(weight)[rows]
    return filters.reshape(len(filters), -1)


def _differ(expected: np.ndarray, got: np.ndarray, dtype: str, cast: bool) -> np.ndarray:
    """Bits that differ; after a cast, a NaN matches any NaN (its payload is the cast's)."""
    differ = expected != got
    if cast and differ.any() and dtype in _IEEE:
        differ &= ~(_is_nan_bits(expected, dtype) & _is_nan_bits(got, dtype))
    return differ


def _compare_weight(
    layer: LayerPlan, source: Checkpoint, written: Checkpoint
) -> tuple[list[Mismatch], np.ndarray]:
    """The written weight against the source's (cast independently, if cast), every
    value, a chunk of rows at a time.

    Returns the first mismatch (if any) and which output rows hold NaN or Inf.
    """
    planned = layer.weight
    conversion, name = layer.conversion, planned.source_name
    dtype, cast = source.tensors[name].dtype, planned.cast
    expected_bits, written_bits = _bits(source, name), _bits(written, planned.name)
    values = source.array(name)
    nonfinite = np.zeros(layer.out_features, bool)
    step = _rows_per_chunk(layer.in_features * DTYPE_BITS[dtype] // 8)
    first, count = None, 0
    for start in range(0, layer.out_features, step):
        rows = slice(start, start + step)
        source_rows = _source_rows(planned, rows)
        got = _read_back(written_bits, conversion, rows)
        if cast is None:
            expected = _in_source_order(expected_bits, conversion, source_rows)
        else:
            expected = rne_bits(_in_source_order(values, conversion, source_rows), cast.dtype)
        differ = _differ(expected, got, planned.dtype, cast is not None)
        if differ.any():
            count += int(np.count_nonzero(differ))
            if first is None:
                row, flat = np.unravel_index(int(np.argmax(differ)), differ.shape)
                first = (start + int(row), int(flat), int(expected[row, flat]), int(got[row, flat]))
        in_order = _in_source_order(values, conversion, source_rows)
        nonfinite[rows] = ~np.isfinite(in_order).all(axis=1)
    if first is None:
        return [], nonfinite
    output, flat_index, want, have = first
    kernel = conversion.kernel
    if conversion.direction == "fc_to_conv":
        layout = conversion.layout
        in_layout_order = np.unravel_index(flat_index, layout.sizes(layer.in_channels, kernel))
        channel, *position = (int(in_layout_order[a]) for a in layout.to_canonical())
    else:
        canonical = np.unravel_index(flat_index, (layer.in_channels, *kernel))
        channel, *position = (int(i) for i in canonical)
    mismatch = Mismatch(
        planned.name,
        output,
        channel,
        tuple(position),
        _value_text(want, planned.dtype),
        _value_text(have, planned.dtype),
        count,
    )
    return [mismatch], nonfinite


def _compare_bias(
    planned: PlannedTensor, source: Checkpoint, written: Checkpoint
) -> tuple[list[Mismatch], np.ndarray]:
    """The written bias against the source's; the first mismatch, and which are NaN or Inf."""
    rows = _source_rows(planned, slice(None))
    values = source.array(planned.source_name)[rows]
    got = _bits(written, planned.name)
    cast = planned.cast
    expected = (
        _bits(source, planned.source_name)[rows] if cast is None else rne_bits(values, cast.dtype)
    )
    nonfinite = ~np.isfinite(values)
    differ = np.flatnonzero(_differ(expected, got, planned.dtype, cast is not None))
    if not len(differ):
        return [], nonfinite
    output = int(differ[0])
    mismatch = Mismatch(
        planned.name,
        output,
        None,
        None,
        _value_text(int(expected[output]), planned.dtype),
        _value_text(int(got[output]), planned.dtype),
        len(differ),
    )
    return [mismatch], nonfinite


# -- an independent cast ----------------------------------------------------------------

# IEEE-style binary formats a cast writes: (significand bits with the implicit one,
# exponent bits). Infinity and NaN as IEEE 754 has them.
_IEEE = {"F64": (53, 11), "F32": (24, 8), "F16": (11, 5), "BF16": (8, 8)}


def rne_bits(values: np.ndarray, code: str) -> np.ndarray:
    """``values`` rounded to nearest, ties to even, into ``code``'s format: its bits.

    Integer arithmetic on the float64 value's fields, not the writer's numpy /
    ``ml_dtypes`` cast: the significand is shifted to the target's precision (further
    for a subnormal result) and rounded by the bits shifted out; a carry into the
    exponent is the next binade, past the largest exponent infinity. A NaN becomes the
    quiet NaN with the sign kept.
    """
    precision, exponent_bits = _IEEE[code]
    bias = (1 << (exponent_bits - 1)) - 1
    total = 1 + exponent_bits + precision - 1
    one = np.uint64(1)
    bits = np.ascontiguousarray(values, np.float64).view(np.uint64)
    sign = bits >> np.uint64(63)
    exponent = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    significand = (bits & np.uint64((1 << 52) - 1)) | np.where(
        exponent > 0, one << np.uint64(52), 0
    )
    # Below the target's smallest normal exponent the result is subnormal: shift further.
    unbiased = np.maximum(exponent, 1) - 1023
    shift = (52 - (precision - 1)) + np.maximum(1 - bias - unbiased, 0)
    shift = np.minimum(shift, 63).astype(np.uint64)  # larger shifts round to zero anyway
    kept = significand >> shift
    rest = significand & ((one << shift) - one)
    half = one << (shift - one)
    up = (rest > half) | ((rest == half) & ((kept & one) == one))
    normal = unbiased >= 1 - bias
    field = np.where(normal, unbiased + bias, 0).astype(np.uint64)
    # kept holds the implicit bit for a normal result: drop it; a carry moves the exponent.
    mantissa = np.where(normal, kept - (one << np.uint64(precision - 1)), kept)
    encoded = (field << np.uint64(precision - 1)) + mantissa + up.astype(np.uint64)
    top = np.uint64((1 << exponent_bits) - 1)
    infinite = (exponent == 0x7FF) & ((bits & np.uint64((1 << 52) - 1)) == 0)
    nan = (exponent == 0x7FF) & ~infinite
    overflow = (encoded >> np.uint64(precision - 1)) >= top
    encoded = np.where(infinite | overflow, top << np.uint64(precision - 1), encoded)
    quiet = (top << np.uint64(precision - 1)) | (one << np.uint64(precision - 2))
    encoded = np.where(nan, quiet, encoded)
    return ((sign << np.uint64(total - 1)) | encoded).astype(f"u{total // 8}")


def _is_nan_bits(bits: np.ndarray, code: str) -> np.ndarray:
    precision, exponent_bits = _IEEE[code]
    bits = bits.astype(np.uint64)
    exponent = (bits >> np.uint64(precision - 1)) & np.uint64((1 << exponent_bits) - 1)
    mantissa = bits & np.uint64((1 << (precision - 1)) - 1)
    return (exponent == (1 << exponent_bits) - 1) & (mantissa != 0)


def _value_text(bits: int, dtype: str) -> str:
    """A value as its number and its bits, e.g. ``0.5 (0x3f000000)``."""
    size = DTYPE_BITS[dtype] // 8
    text = f"0x{bits:0{2 * size}x}"
    try:
        numpy_type = numpy_dtype(dtype)
    except KeyError:  # a dtype numpy cannot compute in: its bits say it all
        return text
    value = np.array([bits], f"u{size}").view(numpy_type)[0]
    return f"{float(value)!r} ({text})"


# -- float64 ----------------------------------------------------------------------------


def _float64_rows(out_features: int, seed: int, differing: list[int]) -> np.ndarray:
    """The output filters the float64 checks compute: all, or a seeded sample of
    ``FLOAT64_FILTERS`` plus those the exact check found different, sorted."""
    if out_features <= FLOAT64_FILTERS:
        return np.arange(out_features)
    picked = np.random.default_rng([seed, 1]).choice(out_features, FLOAT64_FILTERS, replace=False)
    return np.unique(np.concatenate([picked, np.asarray(differing, np.int64)]))


# Machine epsilon of each output dtype: the float64 bound of a layer that casts or
# computes is atol + EPS * (|W'| |x| + |b'|), twice what rounding each stored value can
# change an output by.
_EPS = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}


def _float64_diffs(
    layer: LayerPlan,
    source: Checkpoint,
    written: Checkpoint,
    rows: np.ndarray,
    seed: int,
    atol: float = 0.0,
) -> tuple[float | None, float | None, bool, float | None, bool]:
    """Window and dense ``max |source net - written net|`` in float64 over output ``rows``.

    The source net is what the original did: its FC (or conv) on the feature map, with
    any BatchNorm applied as the framework applies it; the written net is the written
    tensors as a convolution (or an FC). Returns (window diff, dense diff or None,
    whether the dense check ran, the dtype-scaled bound or None, whether every output is
    within it).
    """
    conversion = layer.conversion
    kernel = conversion.kernel
    one_position: tuple[Any, ...] = (..., *(slice(0, 1),) * len(kernel))
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((WINDOW_SAMPLES, layer.in_channels, *kernel))
    dense_map = rng.standard_normal((1, layer.in_channels, *(k + DENSE_MARGIN for k in kernel)))
    if conversion.fold_spatial:  # the small-map case: one value per channel, replicated
        samples = np.broadcast_to(samples[one_position], samples.shape)
    folds = {f.position: f for f in layer.folds}
    dense_checked = math.prod(kernel) > 1 and not conversion.fold_spatial
    if conversion.direction == "conv_to_fc" and "before" in folds:
        dense_checked = False  # a BatchNorm over flat features is no convolution
    maps = np.concatenate([samples, windows(dense_map, kernel)]) if dense_checked else samples
    scaled = _scaled(layer)
    source_weight = source.array(layer.weight.source_name)
    written_weight = written.array(layer.weight.name)
    fc = np.empty((len(maps), len(rows)))
    conv = np.empty_like(fc)
    magnitude = np.zeros_like(fc)  # |written net| on |inputs|, where the bound scales
    step = _rows_per_chunk(layer.in_features * 8)
    source_bias = _bias(
        source, layer.bias.source if layer.bias else None, layer.source_out_features
    )
    # NaN and Inf weights are expected here (their outputs are left out below).
    with np.errstate(invalid="ignore", over="ignore"):
        inputs = _batchnorm_inputs(maps, folds.get("before"), conversion, source)
        for start in range(0, len(rows), step):
            picked, columns = rows[start : start + step], slice(start, start + step)
            select = layer.weight.step(SelectRows)
            source_rows = picked if select is None else np.asarray(select.indices)[picked]
            reference = _in_source_order(source_weight, conversion, source_rows)
            fc[:, columns] = inputs @ reference.astype(np.float64).T + source_bias[source_rows]
            if dense_checked and conversion.direction == "conv_to_fc":
                filters = conversion.source_filters(source_weight)[source_rows]
                real = _convolve(dense_map, filters.astype(np.float64))
                fc[WINDOW_SAMPLES:, columns] = (
                    real.reshape(len(picked), -1).T + source_bias[source_rows]
                )
            if "after" in folds:
                fc[:, columns] = _batchnorm(fc[:, columns], folds["after"], source, source_rows)
            conv[:, columns] = _written_net(
                conversion, written_weight, picked, samples, dense_map, maps, dense_checked
            )
            if scaled:
                magnitude[:, columns] = _written_net(
                    conversion, written_weight, picked, np.abs(samples), np.abs(dense_map),
                    np.abs(maps), dense_checked, absolute=True,
                )  # fmt: skip
        written_bias = _bias(written, layer.bias.name if layer.bias else None, layer.out_features)
        conv += written_bias[rows]
        window = _max_abs_diff(fc[:WINDOW_SAMPLES], conv[:WINDOW_SAMPLES])
        dense = _max_abs_diff(fc[WINDOW_SAMPLES:], conv[WINDOW_SAMPLES:]) if dense_checked else None
        if not scaled:
            return window, dense, dense_checked, None, True
        dtype = written.tensors[layer.weight.name].dtype
        bound = _EPS.get(dtype, 2.0**-3) * (magnitude + np.abs(written_bias[rows]))
        finite = np.isfinite(fc)
        within = bool(np.all(np.abs(fc - conv)[finite] <= atol + bound[finite]))
        within = within and window is not None and (dense is not None or not dense_checked)
        tolerance = float(bound.max()) if bound.size else 0.0
    return window, dense, dense_checked, tolerance, within


def _scaled(layer: LayerPlan) -> bool:
    """True when the layer casts or computes: its float64 bound scales with the dtype."""
    tensors = [t for t in (layer.weight, layer.bias) if t is not None]
    return any(isinstance(s, Cast | FoldBatchNorm | SumSpatial) for t in tensors for s in t.steps)


def _written_net(
    conversion: Conversion,
    weight: np.ndarray,
    rows: np.ndarray,
    samples: np.ndarray,
    dense_map: np.ndarray,
    maps: np.ndarray,
    dense_checked: bool,
    absolute: bool = False,
) -> np.ndarray:
    """The written weight's rows as the network it now is, on every input: (inputs, n)."""
    if conversion.direction == "conv_to_fc":
        written_rows = fc_rows(weight, conversion.weight_format, rows).astype(np.float64)
        written_rows = np.abs(written_rows) if absolute else written_rows
        return conversion.layout.flatten(maps) @ written_rows.T
    filters = written_filters(weight, conversion, rows).astype(np.float64)
    filters = np.abs(filters) if absolute else filters
    if conversion.fold_spatial:  # the 1x1 conv on the map's one position
        one_position: tuple[Any, ...] = (..., *(slice(0, 1),) * len(conversion.kernel))
        samples = samples[one_position]
    out = [_convolve(np.ascontiguousarray(samples), filters).reshape(len(samples), -1)]
    if dense_checked:  # (1, n, *positions) -> (positions, n), as the windows
        out.append(_convolve(dense_map, filters).reshape(len(rows), -1).T)
    return np.concatenate(out)


def _batchnorm_vectors(fold: FoldBatchNorm, checkpoint: Checkpoint):
    def vector(name: str | None, default: float) -> np.ndarray:
        if name is None:
            return np.full(fold.size, default)
        return checkpoint.array(name).astype(np.float64).reshape(-1)

    return (
        vector(fold.mean, 0.0),
        vector(fold.var, 1.0),
        vector(fold.gamma, 1.0),
        vector(fold.beta, 0.0),
    )


def _batchnorm(x: np.ndarray, fold: FoldBatchNorm, checkpoint: Checkpoint, index) -> np.ndarray:
    """A BatchNorm in inference mode, as torch and Keras apply it, on the last axis."""
    mean, var, gamma, beta = (v[index] for v in _batchnorm_vectors(fold, checkpoint))
    return (x - mean) / np.sqrt(var + fold.eps) * gamma + beta


def _batchnorm_inputs(
    maps: np.ndarray, fold: FoldBatchNorm | None, conversion: Conversion, source: Checkpoint
) -> np.ndarray:
    """The maps flattened as the source layer reads them (an FC: in the layout; a conv:
    in its own ``(C, *kernel)`` order), after a BatchNorm on its input: BatchNorm1d over
    the flat features, or BatchNorm2d over the channels."""
    layout = conversion.layout
    if fold is not None and fold.size == maps[0].size:
        flat = _batchnorm(layout.flatten(maps), fold, source, slice(None))
        sizes = layout.sizes(conversion.in_channels, conversion.kernel)
        shaped = flat.reshape(len(maps), *sizes)
        maps = shaped.transpose((0, *(1 + a for a in layout.to_canonical())))
    elif fold is not None:
        maps = np.moveaxis(_batchnorm(np.moveaxis(maps, 1, -1), fold, source, slice(None)), -1, 1)
    if conversion.direction == "conv_to_fc":
        return maps.reshape(len(maps), -1)
    return layout.flatten(maps)


def _convolve(x: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """A convolution library's sliding-window convolution: torch's when torch is already
    loaded (never imported just for this), else ``conv_nd``."""
    torch = sys.modules.get("torch")
    if torch is None:
        return conv_nd(x, filters)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)
    return conv[x.ndim - 3](torch.from_numpy(x), torch.from_numpy(filters)).numpy()


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, _CHECK_CHUNK_BYTES // max(1, row_bytes))


def _bias(checkpoint: Checkpoint, name: str | None, size: int) -> np.ndarray:
    return np.zeros(size) if name is None else checkpoint.array(name).astype(np.float64)


def _max_abs_diff(fc: np.ndarray, conv: np.ndarray) -> float | None:
    """Largest ``|fc - conv|`` over the outputs finite in the source (``fc``); None when
    that is not finite (the conv gave NaN or Inf where the source did not)."""
    finite = np.isfinite(fc)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(fc[finite] - conv[finite])
    largest = float(diff.max()) if diff.size else 0.0
    return largest if math.isfinite(largest) else None
