"""Read an InnerProduct layer's input from a Caffe net (``readers.caffe`` graph data).

Caffe stores no input shape in a ``.caffemodel``; a deploy ``.prototxt`` (``--prototxt``)
gives it (``input_dim`` / ``input_shape`` / an ``Input`` layer). Blob shapes are followed
through Convolution, Pooling (Caffe rounds pooled sizes up) and shape-keeping layers to
the InnerProduct's bottom, which Caffe flattens ``chw`` (axis 1 onwards).
"""

from __future__ import annotations

import math
from typing import Any, cast

from fc2conv_cli.evidence.reading import Reading
from fc2conv_cli.layout import SPATIAL_AXES, WeightFormat

__all__ = ["read_caffe"]

_KEEP = ("ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log",
         "BNLL", "Threshold", "Dropout", "BatchNorm", "Scale", "Bias", "LRN", "MVN",
         "Split", "Eltwise", "Silence", "Clip", "Swish")  # fmt: skip
_HOW = "read from the prototxt"


def read_caffe(net: dict[str, Any], layer: str, how: str = _HOW) -> Reading:
    """The InnerProduct ``layer``'s input from ``net`` (``how``: where the net came from)."""
    layers = net.get("layers") or []
    shapes: dict[str, list[int]] = {
        i["name"]: list(i["shape"]) for i in net.get("inputs", []) if i.get("shape")
    }
    target = next((e for e in layers if e["name"] == layer), None)
    if target is None:
        return Reading("graph", how, problem=f"no layer {layer!r} in the net")
    fmt = WeightFormat.IN_OUT if target["params"].get("transpose") else WeightFormat.OUT_IN
    base: dict[str, Any] = {"weight_format": fmt}
    if not shapes:
        return Reading("graph", how, problem="the net gives no input shape", **base)
    walked: list[str] = []
    flattened: dict[str, list[int]] = {}  # a Flatten's top -> the shape it flattened
    for entry in layers:
        if entry is target:
            break
        _forward(entry, shapes, flattened)
        walked.append(f"{entry['type']} {entry['name']}")
    bottom = target["bottom"][0] if target["bottom"] else None
    shape = shapes.get(bottom) if bottom is not None else None
    if shape is not None and len(shape) == 2 and bottom in flattened:
        shape = flattened[bottom]
    if shape is None or len(shape) < 2:
        return Reading("graph", how, problem=f"no shape for {layer}'s input {bottom!r}", **base)
    axis = target["params"].get("axis", 1)
    if axis != 1:
        return Reading("graph", how, problem=f"{layer} flattens from axis {axis}", **base)
    if len(shape) == 2:
        return Reading("graph", how, problem=f"{layer} reads a flat blob {bottom!r}", **base)
    rank = len(shape) - 2
    if rank not in SPATIAL_AXES:
        return Reading("graph", how, problem=f"{bottom!r} has rank {len(shape)}", **base)
    nodes = (*walked[-3:], f"InnerProduct {layer}")
    return Reading(
        "graph",
        how,
        layout="c" + SPATIAL_AXES[rank],
        channels=shape[1],
        shape=tuple(shape[2:]),
        nodes=nodes,
        pooled=all(s == 1 for s in shape[2:]),
        **base,
    )


def _forward(entry: dict[str, Any], shapes: dict[str, list[int]], flattened: dict) -> None:
    """Set the shapes of ``entry``'s tops (unknown where the layer is not followed)."""
    kind, params = entry["type"], entry["params"]
    found = [shapes.get(b) for b in entry["bottom"]]
    if not entry["top"] or any(s is None for s in found) or not found:
        return  # a data layer or a branch we cannot size: leave its tops unknown
    ins = cast("list[list[int]]", found)  # every shape known, checked just above
    first = ins[0]
    if kind in _KEEP:
        out = list(first)
    elif kind in ("Convolution", "Deconvolution"):
        out = _conv(first, params, kind == "Deconvolution")
    elif kind == "Pooling":
        out = _pool(first, params)
    elif kind == "Flatten" and params.get("axis", 1) == 1 and params.get("end_axis", -1) == -1:
        out = [first[0], math.prod(first[1:])]
        for top in entry["top"]:
            flattened[top] = list(first)
    elif kind == "InnerProduct":
        out = [first[0], params.get("num_output", 0)]
    elif kind == "Concat" and all(len(s) == len(first) for s in ins):
        out = list(first)
        out[1] = sum(s[1] for s in ins)
    else:
        out = None
    for top in entry["top"]:
        if out is None:
            shapes.pop(top, None)
        else:
            shapes[top] = out


def _conv(shape: list[int], p: dict, transposed: bool) -> list[int]:
    out = [shape[0], p["num_output"]]
    for j, size in enumerate(shape[2:]):
        k, s = p["kernel"][j], p["stride"][j]
        d, pad = p["dilation"][j], p["pad"][j]
        span = d * (k - 1) + 1
        out.append(
            (size - 1) * s + span - 2 * pad if transposed else (size + 2 * pad - span) // s + 1
        )
    return out


def _pool(shape: list[int], p: dict) -> list[int]:
    if p.get("global_pooling") or p.get("kernel") is None:
        return [shape[0], shape[1], *([1] * (len(shape) - 2))]
    out = [shape[0], shape[1]]
    for j, size in enumerate(shape[2:]):
        k, s, pad = p["kernel"][j], p["stride"][j] or 1, p["pad"][j]
        span = size + 2 * pad - k
        n = (-(-span // s) if p.get("round_mode", "CEIL") == "CEIL" else span // s) + 1
        if pad and (n - 1) * s >= size + pad:
            n -= 1  # Caffe: the last window must start inside the image
        out.append(n)
    return out
