"""Prove the written file computes what the source did.

For each converted layer, with a seeded random feature map ``x`` of shape
``(N, C, *kernel)``: ``fc = layout.flatten(x) @ W.T + b`` with the *source* tensors, and
``conv = conv_nd(x, Wc, b)`` with the tensors read back from the *written* file. Both in
float64, so the difference measures the conversion, not float rounding: a correct
conversion gives ~1e-12 whatever the stored dtype. A layer whose kernel is larger than 1
also gets the dense check: a map ``kernel + DENSE_MARGIN`` wide, every output position
against the FC applied to that window. The weight is read in chunks of output rows, so
memory stays flat. Copied tensors are compared byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.plan import LayerPlan, Plan
from fc2conv_cli.readers import Checkpoint

__all__ = [
    "DENSE_MARGIN",
    "WINDOW_SAMPLES",
    "LayerCheck",
    "check_copies",
    "check_index",
    "check_layer",
    "conv_nd",
    "windows",
]

WINDOW_SAMPLES = 2  # random feature maps of exactly the kernel's size
DENSE_MARGIN = 1  # the dense map is kernel + 1 per axis: 2, 4 or 8 positions
_CHECK_CHUNK_BYTES = 16 << 20  # float64 bytes of weight rows per chunk
_COMPARE_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class LayerCheck:
    """The result of checking one converted layer. Diffs are None when not finite."""

    layer: str
    max_abs_diff: float | None
    dense_max_abs_diff: float | None
    dense_checked: bool
    ok: bool


def conv_nd(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """N-d cross-correlation, stride 1, no padding: ``torch.nn.functional.conv1d/2d/3d``.

    ``x``: ``(N, C, *spatial)``, ``weight``: ``(O, C, *kernel)``, ``bias``: ``(O,)``;
    returns ``(N, O, *(spatial - kernel + 1))``.
    """
    kernel = weight.shape[2:]
    positions = tuple(s - k + 1 for s, k in zip(x.shape[2:], kernel, strict=True))
    out = _apply_filters(windows(x, kernel), weight, bias)  # (N * positions, O)
    return np.moveaxis(out.reshape(x.shape[0], *positions, -1), -1, 1)


def windows(x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Every kernel-sized window of ``x`` ``(N, C, *spatial)``: ``(N * positions, C, *kernel)``.

    Windows are ordered by sample, then position in row-major order.
    """
    ndim = len(kernel)
    view = sliding_window_view(x, kernel, axis=tuple(range(2, 2 + ndim)))  # (N, C, *P, *K)
    return np.moveaxis(view, 1, 1 + ndim).reshape(-1, x.shape[1], *kernel)


def _apply_filters(windows: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Each window against each filter: ``(M, C, *kernel)``, ``(O, C, *kernel)`` -> ``(M, O)``.

    A linear layer is the same with ``(M, in_features)`` and ``(O, in_features)``.
    """
    out = windows.reshape(len(windows), -1) @ weight.reshape(len(weight), -1).T
    return out if bias is None else out + bias


def check_layer(
    layer: LayerPlan, source: Checkpoint, written: Checkpoint, atol: float, seed: int
) -> LayerCheck:
    """Compare the source FC layer with the written conv layer on seeded random inputs."""
    conversion = layer.weight.conversion
    kernel, channels = conversion.kernel, layer.in_channels
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((WINDOW_SAMPLES, channels, *kernel))
    x_dense = rng.standard_normal((1, channels, *(k + DENSE_MARGIN for k in kernel)))
    dense_checked = math.prod(kernel) > 1
    if dense_checked:  # the dense map's windows follow the kernel-sized samples
        inputs = np.concatenate([inputs, windows(x_dense, kernel)])
    # What the original network fed its FC: each window flattened in the source layout.
    fc_inputs = conversion.layout.flatten(inputs)

    fc_weight = source.array(layer.weight.source)
    if conversion.weight_format is WeightFormat.IN_OUT:
        fc_weight = fc_weight.T
    # Back to (out, in, *kernel), whatever conv_format the file stores.
    conv_weight = written.array(layer.weight.name).transpose(
        conversion.conv_format.to_oihw(len(kernel))
    )
    fc_bias = _bias(source, layer.bias.source if layer.bias else None, layer.out_features)
    conv_bias = _bias(written, layer.bias.name if layer.bias else None, layer.out_features)

    # Both sides over every output row, in float64. The conv side is conv_nd's own
    # arithmetic on the windows. The products are skinny and memory-bound: more BLAS
    # threads gain nothing alone, and on a busy machine their spin-waits made the check
    # 3-8x slower (measured), so one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        fc = _outputs(fc_inputs, fc_weight, fc_bias)
        conv = _outputs(inputs, conv_weight, conv_bias)
    window_diff = _max_abs_diff(fc[:WINDOW_SAMPLES], conv[:WINDOW_SAMPLES])
    dense_diff = _max_abs_diff(fc[WINDOW_SAMPLES:], conv[WINDOW_SAMPLES:])
    finite = [d for d in (window_diff, dense_diff) if math.isfinite(d)]
    ok = len(finite) == 2 and max(finite) <= atol
    return LayerCheck(
        layer.rule.name,
        window_diff if math.isfinite(window_diff) else None,
        (dense_diff if math.isfinite(dense_diff) else None) if dense_checked else None,
        dense_checked,
        ok,
    )


def check_copies(
    plan: Plan, source: Checkpoint, written: Checkpoint, skip: Collection[str] = ()
) -> tuple[str, ...]:
    """Names of byte-copied output tensors whose bytes differ from the source's.

    Tensors named in ``skip`` (missing or misshapen, see ``check_index``) are not read.
    """
    differ = []
    for planned in plan.tensors:
        if planned.conversion is not None or planned.name in skip:
            continue
        a, b = source.raw(planned.source), written.raw(planned.name)
        if len(a) != len(b) or not all(
            np.array_equal(
                np.frombuffer(a[i : i + _COMPARE_CHUNK_BYTES], np.uint8),
                np.frombuffer(b[i : i + _COMPARE_CHUNK_BYTES], np.uint8),
            )
            for i in range(0, len(a), _COMPARE_CHUNK_BYTES)
        ):
            differ.append(planned.name)
    return tuple(differ)


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


def _outputs(inputs: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Every input ``(M, *shape)`` against every row of ``weight`` ``(O, *shape)``: ``(M, O)``.

    The weight is cast to float64 a chunk of rows at a time into one reused buffer: fresh
    buffers per chunk would be kept by glibc after freeing, and memory would grow with
    the layer's width.
    """
    out_features = len(weight)
    row_size = math.prod(weight.shape[1:])
    step = min(out_features, max(1, _CHECK_CHUNK_BYTES // (8 * row_size)))
    buffer = np.empty((step, *weight.shape[1:]))
    out = np.empty((len(inputs), out_features))
    for start in range(0, out_features, step):
        rows = weight[start : start + step]
        chunk = buffer[: len(rows)]
        np.copyto(chunk, rows)
        out[:, start : start + len(rows)] = _apply_filters(inputs, chunk, None)
    return out + bias


def _bias(checkpoint: Checkpoint, name: str | None, size: int) -> np.ndarray:
    return np.zeros(size) if name is None else checkpoint.array(name).astype(np.float64)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|, where equal values (infinities, NaN against NaN) count as 0."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
    return float(diff.max()) if diff.size else 0.0
