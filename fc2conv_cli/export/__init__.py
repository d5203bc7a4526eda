"""``fc2conv export``: from checkpoint to a runnable dense model, proven end to end.

The user's model factory is called (this runs their code, on purpose), the checkpoint is
read safely and loaded strictly, the model is traced with ``torch.fx``, and its flatten +
Linear head is rewritten into convolutions with fc2conv's own converted weights. The
result is saved as ``.pt2`` or ``.onnx`` and published only after the rewritten graph and
the reloaded file both pass the native and dense proofs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fc2conv_cli import __version__
from fc2conv_cli.errors import EXIT_CHECK_FAILED, EXIT_OK, CheckFailed, InputError
from fc2conv_cli.export.graph import Geometry, Head
from fc2conv_cli.export.model import ModelError, parse_model_args, parse_shape
from fc2conv_cli.export.prove import ProofRow
from fc2conv_cli.layer_map import read_layer_map
from fc2conv_cli.layout import Layout
from fc2conv_cli.plan import LayerPlan, build_plan
from fc2conv_cli.readers import open_checkpoint

__all__ = [
    "DEFAULT_EXPORT_ATOL",
    "ExportOptions",
    "ExportResult",
    "ModelError",
    "export_model",
    "parse_model_args",
    "parse_shape",
]

# Checks run in the model's own float32: a tolerance of 1e-4 x max(1, max |reference|)
# leaves room for a different summation order (a k x k conv against a GEMM), while a
# wrong layout or weight differs by the size of the outputs themselves.
DEFAULT_EXPORT_ATOL = 1e-4
DENSE_STEPS = 3  # the default --dense-shape: the native size plus 3 strides per axis


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for; see ``fc2conv export --help``."""

    model: str
    checkpoint: Path
    map_path: Path
    output: Path
    input_shape: tuple[int, ...] = (3, 224, 224)
    dense_shape: tuple[int, ...] | None = None
    atol: float = DEFAULT_EXPORT_ATOL
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    force: bool = False


@dataclass(frozen=True)
class ConvertedLayer:
    """One Linear the export replaced by a conv."""

    name: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    layout: str


@dataclass(frozen=True)
class ExportResult:
    """Everything the report shows about one export."""

    options: ExportOptions
    kind: str  # pt2 or onnx
    layout: str  # the flatten order the graph computes (and the map agrees with)
    flatten: tuple[str, ...]  # the graph nodes that flattened, now removed
    layers: tuple[ConvertedLayer, ...]
    geometry: Geometry
    dense_shape: tuple[int, ...]
    score_shape: tuple[int, ...]
    proved: str  # "windows" or "windows and crops"
    proofs: tuple[ProofRow, ...]
    notes: tuple[str, ...]
    output_bytes: int = 0
    seconds: float = 0.0
    published: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.proofs) and all(p.ok for p in self.proofs)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_CHECK_FAILED


def export_model(options: ExportOptions) -> ExportResult:
    """Export one model; raises ``InputError`` (2) or ``CheckFailed`` (1)."""
    from fc2conv_cli.export import save

    started = time.perf_counter()
    layer_map = read_layer_map(options.map_path)
    kind = save.check_target(options.output, options.force)
    torch = _import_torch(kind)
    from fc2conv_cli.export import graph, model, prove

    ndim = len(options.input_shape) - 1
    if options.dense_shape is not None and len(options.dense_shape) != len(options.input_shape):
        raise InputError(
            f"--dense-shape {_text(options.dense_shape)} and --input-shape "
            f"{_text(options.input_shape)} have different numbers of axes"
        )
    net = model.load_factory(options.model, options.model_args)
    label = f"--model {options.model}"
    with open_checkpoint(
        options.checkpoint, layer_map.strip_prefixes, layer_map.state_dict_key
    ) as source:
        plan = build_plan(source.tensors, layer_map, source.weight_format)
        model.load_state(net, source, options.model)
        _check_rank(plan.layers, ndim, options)
        dtype = next((t.dtype for t in net.state_dict().values() if t.is_floating_point()), None)
        dtype = dtype or torch.float32
        example = torch.randn(
            (2, *options.input_shape), generator=torch.Generator().manual_seed(0)
        ).to(dtype)
        original = graph.trace(net, label)
        dense = graph.trace(net, label)
        for traced in (original, dense):
            graph.propagate(traced, example, label)
        head = graph.find_head(dense, plan.layers, ndim, label)
        for layer in plan.layers:
            if layer.rule.name in head.first:
                _check_layout(head, layer)
        read_notes = source.notes
        dense_shape = options.dense_shape
        geometry, _ = graph.geometry(
            original, head, head.feature_shape[2:], (options.input_shape[1:],)
        )
        if dense_shape is None:
            dense_shape = (
                options.input_shape[0],
                *(
                    n + DENSE_STEPS * s
                    for n, s in zip(options.input_shape[1:], geometry.stride, strict=True)
                ),
            )
        _, (native_scores, dense_scores) = graph.geometry(
            original, head, head.feature_shape[2:], (options.input_shape[1:], dense_shape[1:])
        )
        if any(s < 1 for s in dense_scores):
            raise InputError(
                f"--dense-shape {_text(dense_shape)}: smaller than one window of the model "
                f"(--input-shape {_text(options.input_shape)})"
            )
        dense = graph.rewrite(dense, head, plan.layers, source)
    layers = tuple(_converted(layer) for layer in plan.layers)
    ref = prove.reference(
        net,
        original,
        head,
        geometry,
        options.input_shape,
        dense_shape,
        dense_scores,
        options.seed,
        dtype,
    )
    proved = "windows" if ref.crops is None else "windows and crops"
    graph.propagate(dense, ref.dense_input, "the dense model")  # names a node that fails
    rows = prove.prove("rewritten graph", _runner(dense), ref, options.atol)
    notes = [*read_notes, *([head.pool] if head.pool else []), *head.notes]
    if native_scores != (1,) * ndim:
        notes.append(f"the geometry predicts a {native_scores} score map at --input-shape")
    metadata = {
        "fc2conv_version": __version__,
        "stride": list(geometry.stride),
        "receptive_field": list(geometry.receptive_field),
        "offset": list(geometry.offset),
        "padded": geometry.padded,
        "input_shape": list(options.input_shape),
        "layout": head.layout,
        "source_file": options.checkpoint.name,
        "layer_map_sha256": layer_map.sha256,
    }
    result = ExportResult(
        options,
        kind,
        head.layout,
        head.flatten_nodes,
        layers,
        geometry,
        tuple(dense_shape),
        ref.grid,
        proved,
        tuple(rows),
        tuple(notes),
    )
    staged = save.stage(dense, example, options.input_shape[1:], options.output, kind, metadata)
    try:
        runner, _ = save.load_staged(staged)
        subject = "exported file, " + ("torch.export.load" if kind == "pt2" else "onnxruntime")
        rows += prove.prove(subject, runner, ref, options.atol)
        result = replace(
            result,
            proofs=tuple(rows),
            notes=(*notes, *staged.notes),
            output_bytes=staged.nbytes,
        )
        if kind == "onnx":
            rows.append(_onnx_ops_row(subject, save.onnx_ops(staged.temp)))
            result = replace(result, proofs=tuple(rows))
        if not result.ok:
            failed = sorted({f"{r.subject}: {r.check}" for r in rows if not r.ok})
            raise CheckFailed(
                f"check failed, nothing written: {'; '.join(failed)}",
                _finish(result, started),
            )
        staged.publish(overwrite=options.force)
    finally:
        staged.discard()
    return _finish(result, started, published=True)


def _import_torch(kind: str) -> Any:
    """torch, and for .onnx onnx and onnxruntime, or the one-line install hint."""
    import importlib

    for name in ("torch", *(("onnx", "onnxruntime") if kind == "onnx" else ())):
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(
                f"export to .{kind} needs {name}: pip install 'fc2conv[export]'"
            ) from None
    import torch

    return torch


def _check_rank(layers: tuple[LayerPlan, ...], ndim: int, options: ExportOptions) -> None:
    kernel = layers[0].rule.kernel
    if len(kernel) != ndim:
        raise InputError(
            f"--input-shape {_text(options.input_shape)} has {ndim} spatial axes, but the map's "
            f"kernel {list(kernel)} has {len(kernel)}"
        )


def _check_layout(head: Head, first: LayerPlan) -> None:
    """The map's layout must be the one the graph computes (size-1 axes may sit anywhere)."""
    sizes = dict(zip(Layout(head.layout).canonical, head.feature_shape[1:], strict=True))
    declared = first.rule.layout

    def significant(axes: str) -> str:
        return "".join(a for a in axes if sizes[a] != 1)

    if significant(str(declared)) != significant(head.layout):
        raise ModelError(
            f"map layer {first.rule.name!r}: layout {declared}, but the graph flattens in "
            f"{head.layout} order (nodes {', '.join(head.flatten_nodes)}); set layout: "
            f"{head.layout} in the map"
        )


def _onnx_ops_row(subject: str, ops: list[str]) -> ProofRow:
    """The ONNX graph computes with convolutions: no Gemm or MatMul is left."""
    left = [op for op in ops if op in ("Gemm", "MatMul")]
    check = "operators: Conv, no Gemm or MatMul" + (f" (found {', '.join(left)})" if left else "")
    return ProofRow(subject, check, None, (), None, 0.0, "Conv" in ops and not left)


def _converted(layer: LayerPlan) -> ConvertedLayer:
    conversion = layer.conversion
    return ConvertedLayer(
        layer.rule.name,
        layer.source_shape,
        (layer.out_features, conversion.in_channels, *conversion.kernel),
        conversion.kernel,
        str(conversion.layout),
    )


def _runner(module: Any):
    import torch

    from fc2conv_cli.export.prove import leaves

    def run(x: Any) -> list:
        with torch.no_grad():
            return leaves(module(x))

    return run


def _finish(result: ExportResult, started: float, published: bool = False) -> ExportResult:
    return replace(result, seconds=time.perf_counter() - started, published=published)


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
