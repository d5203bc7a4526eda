"""The report of ``export`` (its proof table and JSON) and of ``heatmap``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from fc2conv_cli import __version__
from fc2conv_cli.errors import Fc2convError
from fc2conv_cli.report import new_table, print_table, size_text

if TYPE_CHECKING:
    from fc2conv_cli.export import ExportResult
    from fc2conv_cli.export.heatmap import HeatmapResult

__all__ = ["export_error_json", "export_json", "heatmap_json", "render_export", "render_heatmap"]


def render_export(console: Console, result: ExportResult) -> None:
    """The converted layers, the geometry, and one row per proof."""
    options = result.options
    console.print(
        Text(f"fc2conv export: {options.model} + {options.checkpoint} -> {options.output}")
    )
    layers = new_table(console, title="layers rewritten as convolutions", title_justify="left")
    layers.add_column("module", overflow="fold")
    for column in ("Linear weight", "conv weight", "kernel", "layout"):
        layers.add_column(column, no_wrap=True)
    for layer in result.layers:
        layers.add_row(
            Text(layer.name),
            _shape(layer.old_shape),
            _shape(layer.new_shape),
            _x(layer.kernel),
            layer.layout,
        )
    print_table(console, layers)
    console.print(Text(_geometry_line(result)))
    proofs = new_table(
        console, title=f"proofs (proved form: {result.proved})", title_justify="left"
    )
    proofs.add_column("subject", overflow="fold")
    proofs.add_column("check")
    for column in ("shape", "max |diff|", "tolerance", "result"):
        proofs.add_column(column, no_wrap=True)
    for row in result.proofs:
        proofs.add_row(
            Text(row.subject),
            Text(row.check),
            _shape(row.shape) if row.shape is not None else "-",
            _diff(row.max_abs_diff, row.expected_shape == () and row.shape is None),
            f"{row.tolerance:.1e}" if row.tolerance else "-",
            Text("ok", style="green") if row.ok else Text("FAILED", style="bold red"),
        )
    print_table(console, proofs)
    for note in result.notes:
        console.print(Text(f"note: {note}"))
    console.print(Text(_footer(result)))


def _geometry_line(result: ExportResult) -> str:
    geo = result.geometry
    crops = (
        "no padding: crops claimed and checked"
        if result.proved != "windows"
        else "the backbone pads, so crops are not claimed (a crop sees zeros at its border)"
    )
    return (
        f"flatten layout {result.layout} (from graph nodes {', '.join(result.flatten)}) | "
        f"stride {_x(geo.stride)} | receptive field {_x(geo.receptive_field)} | "
        f"offset {_x(geo.offset)} | dense {_x(result.dense_shape)} -> score map "
        f"{_x(result.score_shape)} | {crops}"
    )


def _footer(result: ExportResult) -> str:
    if result.published:
        return (
            f"wrote {result.options.output} ({result.kind}, "
            f"{size_text(result.output_bytes)}): every check passed | {result.seconds:.2f} s"
        )
    return f"nothing written: a check failed | {result.seconds:.2f} s"


def export_json(result: ExportResult) -> dict[str, Any]:
    """The machine-readable report of one export."""
    options, geo = result.options, result.geometry
    return {
        "fc2conv_version": __version__,
        "ok": result.ok,
        "published": result.published,
        "model": options.model,
        "checkpoint": str(options.checkpoint),
        "map": str(options.map_path),
        "output": str(options.output),
        "format": result.kind,
        "input_shape": list(options.input_shape),
        "dense_shape": list(result.dense_shape),
        "score_shape": list(result.score_shape),
        "layout": result.layout,
        "flatten_nodes": list(result.flatten),
        "layers": [
            {
                "name": layer.name,
                "old_shape": list(layer.old_shape),
                "new_shape": list(layer.new_shape),
                "kernel": list(layer.kernel),
                "layout": layer.layout,
            }
            for layer in result.layers
        ],
        "geometry": {
            "stride": list(geo.stride),
            "receptive_field": list(geo.receptive_field),
            "offset": list(geo.offset),
            "padded": geo.padded,
        },
        "proved": result.proved,
        "proofs": [
            {
                "subject": row.subject,
                "check": row.check,
                "shape": list(row.shape) if row.shape is not None else None,
                "expected_shape": list(row.expected_shape),
                "max_abs_diff": row.max_abs_diff,
                "tolerance": row.tolerance,
                "ok": row.ok,
            }
            for row in result.proofs
        ],
        "atol": options.atol,
        "seed": options.seed,
        "notes": list(result.notes),
        "output_bytes": result.output_bytes,
        "seconds": round(result.seconds, 3),
    }


def export_error_json(error: Fc2convError) -> dict[str, Any]:
    """The report of an export that stopped on an error (with its proofs, if any ran)."""
    result = getattr(error, "result", None)
    report: dict[str, Any] = export_json(result) if result is not None else {"ok": False}
    report["error"] = {"code": error.code, "message": error.message, "exit_code": error.exit_code}
    return report


def render_heatmap(console: Console, result: HeatmapResult) -> None:
    """One line: what was drawn where."""
    classes = ", ".join(map(str, result.classes))
    console.print(
        Text(
            f"wrote {result.output} ({result.size[0]}x{result.size[1]}): class {classes}, "
            f"score map {_x(result.scores.shape)} at stride {_x(result.stride)}, scores "
            f"{result.low:.3g} .. {result.high:.3g}, hottest at pixel {_x(result.peak)}"
        )
    )


def heatmap_json(result: HeatmapResult) -> dict[str, Any]:
    return {
        "fc2conv_version": __version__,
        "ok": True,
        "output": str(result.output),
        "size": list(result.size),
        "classes": list(result.classes),
        "score_shape": list(result.scores.shape),
        "stride": list(result.stride),
        "offset": list(result.offset),
        "receptive_field": list(result.receptive_field),
        "min": result.low,
        "max": result.high,
        "peak_pixel": list(result.peak),
    }


def _x(values: Any) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _shape(shape: Any) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _diff(value: float | None, not_numeric: bool = False) -> Text:
    if not_numeric:
        return Text("-")
    if value is None or not math.isfinite(value):
        return Text("n/a", style="red")
    return Text(f"{value:.1e}")
