"""Read the first FC's input from a TF.js graph model (a GraphDef as JSON).

From the ``MatMul`` / ``_FusedMatMul`` that reads the FC weight, walk back through
``Reshape``, ``Transpose``, ``Squeeze``, ``ExpandDims`` and ``Identity`` to the map, whose
axes follow the ``data_format`` of the op that made it (TF's default NHWC). A GraphDef
carries no value shapes, so the layout and weight format are read here and the map's
shape is left to the geometry and the weights.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from fc2conv_cli.evidence.axes import Axes, WalkProblem
from fc2conv_cli.evidence.reading import Reading
from fc2conv_cli.layout import SPATIAL_AXES, WeightFormat

if TYPE_CHECKING:
    from fc2conv_cli.readers import Checkpoint

__all__ = ["read_tfjs_graph"]

_FC_OPS = ("MatMul", "_FusedMatMul")
_SHAPING = ("Reshape", "Transpose", "Squeeze", "ExpandDims")
_PASS = ("Identity", "StopGradient", "Cast")
_OPAQUE = ("GatherV2", "Gather", "ConcatV2", "Concat", "Slice", "StridedSlice", "Split",
           "SplitV", "Tile", "Pad", "PadV2", "MirrorPad", "Einsum", "BatchMatMulV2",
           "MatMul", "_FusedMatMul", "Mean", "Max", "Sum")  # fmt: skip
_HOW = "read from the graph"


def read_tfjs_graph(topology: dict[str, Any], fc_weight: str, checkpoint: Checkpoint) -> Reading:
    nodes = [n for n in topology.get("node", []) if isinstance(n, dict)]
    by_name = {n.get("name"): n for n in nodes}
    fc = next((n for n in nodes if n.get("op") in _FC_OPS and _inputs(n)[1:2] == [fc_weight]), None)
    if fc is None:
        return Reading("graph", _HOW, problem=f"no MatMul node reads {fc_weight!r}")
    transposed = _attr(fc, "transpose_b", False) is True
    fmt = WeightFormat.OUT_IN if transposed else WeightFormat.IN_OUT
    if _attr(fc, "transpose_a", False) is True:
        return Reading(
            "graph", _HOW, weight_format=fmt, problem=f"{fc['name']} transposes its input"
        )
    walked, value = [], _inputs(fc)[0]
    for _ in range(len(nodes) + 1):
        node = by_name.get(value)
        if node is None or node.get("op") not in (*_SHAPING, *_PASS):
            break
        walked.append(node)
        value = _inputs(node)[0]
    names = (*(f"{n['op']} {n['name']}" for n in reversed(walked)), f"{fc['op']} {fc['name']}")
    base: dict[str, Any] = {"weight_format": fmt, "nodes": names}
    if node is None or node.get("op") == "Placeholder":
        return Reading("graph", _HOW, **base, problem=f"{fc['name']} reads the model input")
    if node.get("op") in _OPAQUE:
        return Reading(
            "graph", _HOW, **base,
            problem=f"the graph goes through {node['op']} {node['name']!r}; "
            "the walk does not follow it",
        )  # fmt: skip
    rank = _rank(node, by_name, checkpoint)
    spatial = SPATIAL_AXES[rank]
    letters = "nc" + spatial if _data_format(node, by_name) == "NCHW" else "n" + spatial + "c"
    axes = Axes.of_map(letters, (None,) * (rank + 2))
    try:
        for step in reversed(walked):
            axes = _apply(step, axes, checkpoint)
        layout = axes.layout()
    except WalkProblem as exc:
        return Reading("graph", _HOW, **base, problem=f"{step['name']}: {exc}")
    return Reading("graph", _HOW, layout=layout, **base)


def _inputs(node: dict[str, Any]) -> list[str]:
    return [i.split(":")[0] for i in node.get("input", []) if not i.startswith("^")]


def _attr(node: dict[str, Any], key: str, default: Any) -> Any:
    value = (node.get("attr") or {}).get(key)
    if not isinstance(value, dict):
        return default
    if "b" in value:
        return bool(value["b"])
    if "i" in value:
        return int(value["i"])
    if "s" in value:
        try:
            return base64.b64decode(value["s"]).decode("utf-8", "replace")
        except ValueError:
            return default
    if "list" in value:
        return [int(v) for v in (value["list"] or {}).get("i", [])]
    return default


def _data_format(node: Any, by_name: dict, steps: int = 8) -> str:
    for _ in range(steps):
        fmt = _attr(node, "data_format", None)
        if isinstance(fmt, str) and fmt:
            return "NCHW" if fmt.startswith("NC") else "NHWC"
        feeders = _inputs(node)
        node = by_name.get(feeders[0]) if feeders else None
        if node is None:
            break
    return "NHWC"


def _rank(node: Any, by_name: dict, checkpoint: Checkpoint, steps: int = 8) -> int:
    for _ in range(steps):
        for name in _inputs(node)[1:]:
            info = checkpoint.tensors.get(name)
            if info is not None and 3 <= len(info.shape) <= 5 and "Conv" in node.get("op", ""):
                return len(info.shape) - 2
        feeders = _inputs(node)
        node = by_name.get(feeders[0]) if feeders else None
        if node is None:
            break
    return 2


def _ints(name: str, checkpoint: Checkpoint) -> list[int]:
    info = checkpoint.tensors.get(name)
    if info is None or info.dtype not in ("I32", "I64") or len(info.shape) > 1:
        raise WalkProblem(f"its shape input {name!r} is not a constant")
    return [int(v) for v in checkpoint.array(name).reshape(-1)]


def _apply(node: dict[str, Any], axes: Axes, checkpoint: Checkpoint) -> Axes:
    op = node["op"]
    if op in _PASS:
        return axes
    if op == "Transpose":
        return axes.transpose(_ints(_inputs(node)[1], checkpoint))
    if op == "Squeeze":
        return axes.squeeze(_attr(node, "squeeze_dims", []) or None)
    if op == "ExpandDims":
        return axes.unsqueeze(_ints(_inputs(node)[1], checkpoint))
    return axes.reshape(_ints(_inputs(node)[1], checkpoint))
