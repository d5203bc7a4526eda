"""Model-level proofs: the dense model equals the original, natively and on every window.

Reference values come from the ORIGINAL model only: its output at ``--input-shape``, and,
at ``--dense-shape``, its own head (every node after the backbone's feature map, run as
traced from the original module) applied to each window of its backbone's feature map.
Comparing with the original model run on image crops holds only for a backbone without
padding (with padding a crop sees zeros where the large image has pixels), so that form
is claimed, and checked, only then.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fc2conv_cli.export.graph import Geometry, Head, descendants

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["ProofRow", "Reference", "leaves", "prove", "reference"]

Runner = Callable[["torch.Tensor"], list["torch.Tensor"]]


@dataclass(frozen=True)
class ProofRow:
    """One check of one subject (the rewritten graph, or the exported file reloaded)."""

    subject: str
    check: str
    shape: tuple[int, ...] | None  # the subject's first output's shape
    expected_shape: tuple[int, ...]
    max_abs_diff: float | None  # None when the shapes differ or a value is not finite
    tolerance: float
    ok: bool


@dataclass
class Reference:
    """The original model's own answers, computed once for every subject."""

    native_input: torch.Tensor
    native: list[torch.Tensor]  # (N, K) per output
    dense_input: torch.Tensor
    windows: list[torch.Tensor]  # (1, K, *score) per output: the head on each window
    crops: list[torch.Tensor] | None  # the same from crops, when the backbone has no padding
    grid: tuple[int, ...]  # the score map's size from the backbone's own feature map
    predicted: tuple[int, ...]  # ... and the size the geometry predicts


def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples, lists and dicts)."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def reference(
    model: torch.nn.Module,
    original: fx.GraphModule,
    head: Head,
    geometry: Geometry,
    input_shape: tuple[int, ...],
    dense_shape: tuple[int, ...],
    predicted: tuple[int, ...],
    seed: int,
    dtype: torch.dtype,
) -> Reference:
    """Run the original model natively, and its head on every window of the dense input."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    native_input = torch.randn((2, *input_shape), generator=generator).to(dtype)
    dense_input = torch.randn((1, *dense_shape), generator=generator).to(dtype)
    with torch.no_grad():
        native = leaves(model(native_input))
        feature, run_head = _split(original, head, dense_input)
        kernel = head.feature_shape[2:]
        grid = tuple(f - k + 1 for f, k in zip(feature.shape[2:], kernel, strict=True))
        windows = _assemble(
            [run_head(_window(feature, at, kernel)) for at in itertools.product(*map(range, grid))],
            grid,
        )
        crops = None
        if not geometry.padded:
            size = input_shape[1:]
            crops = _assemble(
                [
                    leaves(model(dense_input[_crop(at, geometry.stride, size)].contiguous()))
                    for at in itertools.product(*map(range, grid))
                ],
                grid,
            )
    return Reference(native_input, native, dense_input, windows, crops, grid, predicted)


def _window(feature: torch.Tensor, at: tuple[int, ...], kernel: tuple[int, ...]) -> torch.Tensor:
    """The window of the feature map at ``at``, contiguous as a backbone's output is."""
    index: tuple[Any, ...] = (..., *(slice(i, i + k) for i, k in zip(at, kernel, strict=True)))
    return feature[index].contiguous()


def _crop(at: tuple[int, ...], stride: tuple[int, ...], size: tuple[int, ...]) -> tuple[Any, ...]:
    """The index of the crop at grid position ``at``: every leading axis, then the window."""
    return (..., *(slice(i * s, i * s + n) for i, s, n in zip(at, stride, size, strict=True)))


def _split(gm: fx.GraphModule, head: Head, x: torch.Tensor):
    """The backbone's feature map on ``x``, and a function running the head on a window."""
    from torch import fx

    interpreter = fx.Interpreter(gm)
    nodes = list(gm.graph.nodes)
    feature = next(n for n in nodes if n.name == head.feature)
    downstream = descendants(feature)
    env: dict = {}
    interpreter.env = env
    for node in nodes:
        if node in downstream:
            continue
        env[node] = x if node.op == "placeholder" else interpreter.run_node(node)
        if node is feature:
            break
    backbone = dict(env)

    def run_head(window: torch.Tensor) -> list[torch.Tensor]:
        interpreter.env = {**backbone, feature: window}
        result = None
        for node in nodes:
            if node in interpreter.env:
                continue
            if node.op == "placeholder":
                interpreter.env[node] = x
                continue
            result = interpreter.run_node(node)
            interpreter.env[node] = result
        return leaves(result)

    return backbone[feature], run_head


def _assemble(per_position: list[list[torch.Tensor]], grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-position outputs ``(1, K)`` -> per-output score maps ``(1, K, *grid)``."""
    import torch

    outputs = []
    for index in range(len(per_position[0])):
        stacked = torch.stack([p[index].reshape(p[index].shape[0], -1) for p in per_position], -1)
        outputs.append(stacked.reshape(*stacked.shape[:2], *grid))
    return outputs


def prove(subject: str, run: Runner, ref: Reference, atol: float) -> list[ProofRow]:
    """The native, dense and (where claimed) crop checks of one subject."""
    rows = []
    native = run(ref.native_input)
    ones = (1,) * len(ref.grid)
    rows.append(
        _compare(
            subject,
            f"native {_shape_text(ref.native_input.shape[1:])}: equals the original model",
            [n.reshape(*n.shape[:2], *ones) for n in ref.native],
            native,
            atol,
        )
    )
    dense = run(ref.dense_input)
    check = (
        f"dense {_shape_text(ref.dense_input.shape[1:])}: score map {_shape_text(ref.grid)} "
        f"(geometry: {_shape_text(ref.predicted)}), every position equals the head"
    )
    row = _compare(subject, check + " on its window", ref.windows, dense, atol)
    rows.append(row if ref.grid == ref.predicted else replace(row, ok=False))
    if ref.crops is not None:
        rows.append(
            _compare(
                subject, check.replace("the head", "the model") + "'s crop", ref.crops, dense, atol
            )
        )
    return rows


def _compare(
    subject: str,
    check: str,
    expected: list[torch.Tensor],
    got: list[torch.Tensor],
    atol: float,
) -> ProofRow:
    import torch

    want_shape = tuple(expected[0].shape)
    shape = tuple(got[0].shape) if got else None
    scale = max([1.0, *(float(e.abs().max()) for e in expected if e.numel())])
    tolerance = atol * scale
    if len(got) != len(expected) or any(
        tuple(g.shape) != tuple(e.shape) for g, e in zip(got, expected, strict=False)
    ):
        return ProofRow(subject, check, shape, want_shape, None, tolerance, False)
    diffs = [
        float((g.detach().double() - e.double()).abs().max()) if e.numel() else 0.0
        for g, e in zip(got, expected, strict=True)
    ]
    diff = max(diffs)
    finite = bool(torch.isfinite(torch.tensor(diff)))
    return ProofRow(
        subject,
        check,
        shape,
        want_shape,
        diff if finite else None,
        tolerance,
        finite and diff <= tolerance,
    )


def _shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)
