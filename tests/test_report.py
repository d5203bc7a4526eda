"""Rendering: a plain table in a fixed-width console, names never parsed as markup, JSON strict."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from fc2conv_cli.check import LayerCheck
from fc2conv_cli.errors import CheckFailed
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.pipeline import ConvertOptions, ConvertResult
from fc2conv_cli.plan import build_plan
from fc2conv_cli.readers import TensorInfo
from fc2conv_cli.report import (
    conversion_json,
    error_json,
    render_conversion,
    render_error,
    render_plan,
)


def result(checks=(), dry_run=False) -> ConvertResult:
    tensors = {
        "[bold]fc[/bold].weight": TensorInfo("[bold]fc[/bold].weight", "F32", (8, 12)),
        "other": TensorInfo("other", "F16", (3,)),
    }
    layer_map = parse_layer_map(
        "version: 1\nlayout: hwc\nlayers: [{name: '[bold]fc[/bold]', rename: fc6, kernel: [2, 2]}]"
    )
    options = ConvertOptions(
        Path("in.pth"), Path("map.yaml"), Path("out.safetensors"), dry_run=dry_run
    )
    return ConvertResult(
        options,
        "torch",
        build_plan(tensors, layer_map),
        ("a note",),
        checks,
        output_bytes=2048,
        seconds=0.5,
    )


def render(function, *args) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    function(console, *args)
    return console.file.getvalue()


def test_table_shows_shapes_layout_and_checks():
    text = render(
        render_conversion, result([LayerCheck("[bold]fc[/bold]", 1e-13, 2e-13, True, True)])
    )
    assert "[bold]fc[/bold].weight -> fc6.weight" in text  # user text is shown as is, not as markup
    assert "(8, 12)" in text and "(8, 3, 2, 2)" in text and "2x2" in text and "hwc out_in" in text
    assert "1.0e-13" in text and "2.0e-13" in text and " ok " in text
    assert "1 tensors copied (byte-identical) | output 2.0 KiB" in text
    assert "\x1b[" not in text


def test_failed_and_nan_checks_are_visible():
    text = render(
        render_conversion, result([LayerCheck("[bold]fc[/bold]", None, 0.5, True, False)])
    )
    assert "FAILED" in text and "nan/inf" in text and "5.0e-01" in text


def test_dry_run_plan_lists_every_output_tensor():
    text = render(render_plan, result(dry_run=True))
    assert "fc6.weight" in text and "other" in text
    assert "convert [bold]fc[/bold].weight (out_in, hwc -> oihw: bytes move)" in text
    assert "nothing written (dry run)" in render(render_conversion, result(dry_run=True))


def test_error_lines_are_prefixed_and_escaped():
    assert render(render_error, ["a [red]b", "c"]) == "error: a [red]b\nerror: c\n"
    assert render(render_error, ["x\ny.pth: bad"]) == "error: x\\ny.pth: bad\n"


def test_json_is_strict_and_complete():
    report = conversion_json(result([LayerCheck("[bold]fc[/bold]", None, None, True, False)]))
    text = json.dumps(report, allow_nan=False)
    layer = json.loads(text)["layers"][0]
    assert layer["old_shape"] == [8, 12] and layer["new_shape"] == [8, 3, 2, 2]
    assert layer["max_abs_diff"] is None and layer["ok"] is False and report["ok"] is False
    assert report["copied"] == 1 and report["notes"] == ["a note"]
    failed = error_json(CheckFailed("check failed", result()))
    assert failed["error"] == {"code": "check_failed", "message": "check failed", "exit_code": 1}
