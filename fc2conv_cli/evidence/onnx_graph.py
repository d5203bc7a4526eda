"""Read the first FC's input from an ONNX graph summary (``readers.onnx`` ``Loaded.graph``).

From the ``Gemm`` / ``MatMul`` that reads the FC weight, walk back through ``Flatten``,
``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze`` (and ``Identity``, ``Dropout``,
``Cast``) to the value they start from: the feature map, in ONNX's NC(D)HW. Its shape comes
from the summary's ``shapes`` (value_info and shape inference); the walk forward gives
the flatten order. Ops that pick or join values (``Gather``, ``Concat``, ...) end the walk
with a problem: the suggestion then falls back to the weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

from fc2conv_cli.evidence.axes import Axes, WalkProblem
from fc2conv_cli.evidence.reading import Reading
from fc2conv_cli.layout import SPATIAL_AXES

if TYPE_CHECKING:
    from fc2conv_cli.readers import Checkpoint

__all__ = ["fc_bias", "per_token_weights", "read_onnx"]

_FC_OPS = ("Gemm", "MatMul")
_SHAPING = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
_PASS = ("Identity", "Dropout", "Cast")
_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
# Ops that pick, join or reorder values: a walk through them would be a guess.
_OPAQUE = (
    "Gather", "GatherElements", "GatherND", "Concat", "Slice", "Split", "Tile", "Expand",
    "Pad", "Einsum", "ScatterND", "ScatterElements", "Where", "DepthToSpace",
    "SpaceToDepth", "TopK", "Gemm", "MatMul", "ReduceMean", "ReduceMax", "ReduceSum",
    "LSTM", "GRU", "RNN", "Attention", "If", "Loop", "Scan",
)  # fmt: skip
_HOW = "read from the graph"


def read_onnx(graph: dict[str, Any], fc_weight: str, checkpoint: Checkpoint) -> Reading:
    nodes = graph.get("nodes") or []
    producers = {out: node for node in nodes for out in node.get("outputs", [])}
    fc = _fc_node(nodes, producers, fc_weight)
    if fc is None:
        return Reading("graph", _HOW, problem=f"no Gemm / MatMul node reads {fc_weight!r}")
    info = checkpoint.tensors.get(fc_weight)
    weight_format = info.weight_format if info is not None else None
    bias = _bias(fc, nodes, checkpoint)
    if fc["op_type"] == "Gemm" and fc["attributes"].get("transA", 0):
        return Reading("graph", _HOW, weight_format=weight_format, bias=bias,
                       problem=f"Gemm {_name(fc)} transposes its input (transA=1)")  # fmt: skip
    value, walked = fc["inputs"][0], []
    for _ in range(len(nodes) + 1):  # a hostile graph may loop
        node = producers.get(value)
        if node is None or node["op_type"] not in (*_SHAPING, *_PASS):
            break
        walked.append(node)
        value = node["inputs"][0]
    names = (*(_name(n) for n in reversed(walked)), _name(fc))
    base: dict[str, Any] = {"weight_format": weight_format, "nodes": names, "bias": bias}
    if node is None:
        return Reading("graph", _HOW, **base, problem=f"{_name(fc)} reads graph input {value!r}")
    op = node["op_type"]
    if op in _OPAQUE:
        return Reading(
            "graph", _HOW, **base,
            problem=f"the graph goes through {op} {_name(node)!r} before {_name(fc)}; "
            "the walk does not follow it",
        )  # fmt: skip
    shape = _int_shape(graph.get("shapes", {}).get(value))
    rank = len(shape) - 2 if shape else _conv_rank(node, checkpoint)
    if rank not in SPATIAL_AXES:
        return Reading("graph", _HOW, **base, problem=f"{value!r} is not a 1-3-D feature map")
    letters = "nc" + SPATIAL_AXES[rank]
    axes = Axes.of_map(letters, tuple(shape) if shape else (None,) * (rank + 2))
    in_features = _in_features(info)
    try:
        for step in reversed(walked):
            last = step is walked[0]
            axes = _apply(step, axes, graph, checkpoint, in_features if last else None)
        layout = axes.layout()
    except WalkProblem as exc:
        return Reading("graph", _HOW, **base, problem=f"{_name(step)}: {exc}")
    base["nodes"] = (f"{op} {_name(node)}", *names)
    pooled = op in _POOLS or (shape is not None and all(s == 1 for s in shape[2:]))
    return Reading(
        "graph",
        _HOW,
        layout=layout.replace("n", ""),
        channels=shape[1] if shape else None,
        shape=tuple(shape[2:]) if shape else None,
        pooled=pooled,
        **base,
    )


def fc_bias(graph: dict[str, Any], weight: str, checkpoint: Checkpoint) -> str | None:
    """The bias tensor of the Gemm (input C) or MatMul (a following Add) reading ``weight``."""
    nodes = graph.get("nodes") or []
    producers = {out: node for node in nodes for out in node.get("outputs", [])}
    fc = _fc_node(nodes, producers, weight)
    return _bias(fc, nodes, checkpoint) if fc is not None else None


def _name(node: dict[str, Any]) -> str:
    return node.get("name") or f"{node['op_type']}->{node['outputs'][0]}"


def _fc_node(nodes: list, producers: dict, weight: str) -> dict[str, Any] | None:
    for node in nodes:
        if node["op_type"] in _FC_OPS and len(node["inputs"]) > 1:
            source = node["inputs"][1]
            for _ in range(8):
                if source == weight:
                    return node
                feeder = producers.get(source)
                if feeder is None or feeder["op_type"] not in ("Identity", "Cast", "Transpose"):
                    break
                source = feeder["inputs"][0]
    return None


def _bias(fc: dict[str, Any], nodes: list, checkpoint: Checkpoint) -> str | None:
    if fc["op_type"] == "Gemm":
        name = fc["inputs"][2] if len(fc["inputs"]) > 2 else None
        return name if name in checkpoint.tensors else None
    out = fc["outputs"][0]
    for node in nodes:
        if node["op_type"] == "Add" and out in node["inputs"]:
            other = [i for i in node["inputs"] if i != out]
            if other and other[0] in checkpoint.tensors:
                return other[0]
    return None


def _int_shape(shape: Any) -> list[int] | None:
    """A map shape whose channel and spatial sizes are known ints (the batch may be symbolic)."""
    if not isinstance(shape, list) or len(shape) < 3:
        return None
    if not all(isinstance(s, int) and s > 0 for s in shape[1:]):
        return None
    sizes: list[Any] = [s if isinstance(s, int) else None for s in shape]  # batch: maybe None
    return sizes


def _conv_rank(node: dict[str, Any], checkpoint: Checkpoint) -> int:
    if len(node["inputs"]) > 1 and node["inputs"][1] in checkpoint.tensors:
        return len(checkpoint.tensors[node["inputs"][1]].shape) - 2
    return 2


def _ints(name: str, checkpoint: Checkpoint) -> list[int] | None:
    info = checkpoint.tensors.get(name)
    if info is None or info.dtype not in ("I64", "I32") or len(info.shape) > 1:
        return None
    return [int(v) for v in checkpoint.array(name).reshape(-1)]


def _in_features(info: Any) -> int | None:
    from fc2conv_cli.layout import WeightFormat

    if info is None or len(info.shape) != 2:
        return None
    return info.shape[1] if info.weight_format is WeightFormat.OUT_IN else info.shape[0]


def per_token_weights(graph: dict[str, Any]) -> list[str]:
    """FC weights whose MatMul / Gemm reads a rank >= 3 tensor: per-position (per-token)
    layers, as in attention blocks, not a flattened map."""
    shapes = graph.get("shapes") or {}
    found = []
    for node in graph.get("nodes") or []:
        if node.get("op_type") in _FC_OPS and len(node.get("inputs", [])) > 1:
            shape = shapes.get(node["inputs"][0])
            if isinstance(shape, list) and len(shape) >= 3:
                found.append(node["inputs"][1])
    return found


def _apply(
    node: dict[str, Any],
    axes: Axes,
    graph: dict,
    checkpoint: Checkpoint,
    in_features: int | None = None,
) -> Axes:
    """``axes`` after ``node``; ``in_features`` is the FC's when ``node`` feeds it."""
    op, attributes = node["op_type"], node["attributes"]
    if op in _PASS:
        return axes
    if op == "Transpose":
        return axes.transpose(attributes.get("perm"))
    if op == "Flatten":
        return axes.flatten(attributes.get("axis", 1))
    if op in ("Squeeze", "Unsqueeze"):
        dims = attributes.get("axes")
        if dims is None and len(node["inputs"]) > 1:
            dims = _ints(node["inputs"][1], checkpoint)
        if op == "Squeeze":
            return axes.squeeze(dims)
        if dims is None:
            raise WalkProblem("an unsqueeze without readable axes")
        return axes.unsqueeze(dims)
    target = _ints(node["inputs"][1], checkpoint) if len(node["inputs"]) > 1 else None
    inferred = graph.get("shapes", {}).get(node["outputs"][0])
    rest = axes.sizes[1:]
    if (
        target is None
        and not isinstance(inferred, list)
        and rest
        and None not in rest
        and math.prod(cast("tuple[int, ...]", rest)) == in_features
    ):
        return axes.flatten(1)  # x.view(x.size(0), -1) right before the FC
    if target is None:  # a computed shape (Shape -> Gather -> Concat): use the inferred one
        if not isinstance(inferred, list):
            raise WalkProblem("a reshape to a computed shape the graph does not give")
        target = [d if isinstance(d, int) else -1 for d in inferred]
        if target.count(-1) > 1:
            raise WalkProblem(f"a reshape to {inferred}")
    return axes.reshape(target)
