"""``.onnx``: a model's initializers (and Constant-node tensors), named as in the graph.

The file is memory-mapped and walked at the protocol-buffer wire level, so tensors'
``raw_data`` and external data are never copied: each is a zero-copy view of its bytes in
the mapped ``.onnx`` file or the mapped external data file. Everything except those
payloads (the model and graph fields, each initializer's other fields) is parsed by the
``onnx`` package's own protobuf classes. Tensors stored in typed fields (``float_data``,
``int32_data`` holding float16 / bfloat16 bit patterns, ...) are decoded as
``onnx.numpy_helper.to_array`` does, keeping the source dtype, when first used.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers.base import LazyBuffers, Loaded, TensorInfo, import_extra, tensor_nbytes

__all__ = ["read"]

# onnx TensorProto.DataType -> safetensors code. Types not here (STRING, COMPLEX128, the
# packed 2/4/6-bit types, UNDEFINED) have no safetensors dtype fc2conv can copy.
_DTYPES = {
    1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL",
    10: "F16", 11: "F64", 12: "U32", 13: "U64", 14: "C64", 16: "BF16", 17: "F8_E4M3",
    18: "F8_E4M3FNUZ", 19: "F8_E5M2", 20: "F8_E5M2FNUZ", 24: "F8_E8M0",
}  # fmt: skip
# Where a tensor without raw_data keeps its values (onnx.helper.tensor_dtype_to_field).
_TYPED_FIELDS = {"F32": "float_data", "C64": "float_data", "F64": "double_data",
                 "I64": "int64_data", "U32": "uint64_data", "U64": "uint64_data"}  # fmt: skip
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# Wire-level field numbers (onnx.proto) of the fields the walk looks into.
_MODEL_IR_VERSION, _MODEL_GRAPH = 1, 7
_GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 5, 15
_TENSOR_RAW_DATA = 9
_STANDARD_DOMAINS = ("", "ai.onnx")
# Small int64 initializers (Reshape shapes) are kept in the graph given to shape inference.
_SHAPE_TENSOR_MAX = 64


class _Malformed(Exception):
    """The bytes are not a well-formed protocol buffer; the message says where."""


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Read an ONNX model's initializers and Constant tensors; ``state_dict_key`` is unused.

    Tensor names are the initializer names, unchanged; a Constant node's tensor is named
    by the node's output. ``TensorInfo.weight_format`` is set for each tensor fed (through
    Identity, Cast or a 2-D Transpose) to input B of a ``Gemm`` (``transB=1``: out_in,
    ``transB=0``: in_out) or a ``MatMul`` (in_out). ``Loaded.weight_format`` is in_out for
    every other tensor (the ``MatMul`` convention, ``y = x @ B``). ``Loaded.graph`` is a
    plain-data summary of the main graph, see ``_summary``.

    Raises ``CheckpointError`` for a truncated or non-ONNX file, an initializer whose dims
    and data disagree, an unsupported data type, or external data outside the model's
    folder.
    """
    onnx = import_extra("onnx", path, "onnx")
    from google.protobuf.message import DecodeError

    maps = _Maps(path)
    try:
        parsed = _parse(path, maps.open(path), onnx, DecodeError)
        tensors, loaders, notes = _read_tensors(path, maps, parsed)
        hints, hint_notes = _weight_formats(parsed.graph, tensors)
        summary = _summary(onnx, parsed, tensors, loaders)
    except BaseException:
        maps.close()
        raise
    for name, fmt in hints.items():
        info = tensors[name]
        tensors[name] = TensorInfo(name, info.dtype, info.shape, fmt)
    buffers = LazyBuffers(loaders)

    def close() -> None:
        buffers.clear()
        maps.close()

    return Loaded("onnx", tensors, buffers, notes + hint_notes, close, WeightFormat.IN_OUT, summary)


# -- The wire-level walk ---------------------------------------------------------------


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    """A base-128 varint at ``pos``; returns (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"a varint at byte {pos} runs past its end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in ``data[start:end]``: (number, wire type, start, end).

    A field's span covers its tag and value, so spans can be re-joined into a message
    that protobuf parses; length-delimited values are checked to end inside the message.
    """
    pos = start
    while pos < end:
        tag, value_at = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 0:
            _, stop = _varint(data, value_at, end)
        elif wire == 1:
            stop = value_at + 8
        elif wire == 2:
            length, value_at = _varint(data, value_at, end)
            stop = value_at + length
        elif wire == 5:
            stop = value_at + 4
        else:
            raise _Malformed(f"byte {pos} starts no protobuf field (wire type {wire})")
        if stop > end:
            raise _Malformed(f"field {number} at byte {pos} runs past the end (truncated?)")
        yield number, wire, pos, stop
        pos = stop


def _length_delimited(data: Any, span: tuple[int, int]) -> tuple[int, int]:
    """The value's (start, end) inside a length-delimited field's span."""
    _, value_at = _varint(data, span[0], span[1])
    _, value_at = _varint(data, value_at, span[1])
    return value_at, span[1]


def _split(
    data: Any, spans: list[tuple[int, int]], wanted: dict[int, str], label: str
) -> tuple[bytes, dict[str, list[tuple[int, int]]]]:
    """Split messages (given as value spans) into their other fields' bytes (joined, for
    protobuf) and the value spans of the ``wanted`` length-delimited fields, by name."""
    rest = bytearray()
    found: dict[str, list[tuple[int, int]]] = {name: [] for name in wanted.values()}
    for start, end in spans:
        for number, wire, a, b in _fields(data, start, end):
            if number in wanted:
                if wire != 2:
                    raise _Malformed(f"{label} field {number} has wire type {wire}")
                found[wanted[number]].append(_length_delimited(data, (a, b)))
            else:
                rest += data[a:b]
    return bytes(rest), found


@dataclass
class _Parsed:
    """A model as the walk found it: protobuf messages without the tensor payloads."""

    model: Any  # ModelProto without its graph
    graph: Any  # GraphProto without initializers and sparse initializers
    initializers: list[tuple[Any, tuple[int, int] | None]]  # (TensorProto sans raw_data, span)
    sparse_count: int


def _parse(path: Path, data: Any, onnx: Any, decode_error: type[Exception]) -> _Parsed:
    """Walk the model's fields; parse all but the tensor payloads with protobuf."""
    bad = f"{path}: not a valid ONNX model"
    try:
        size = len(data)
        if size == 0:
            raise _Malformed("the file is empty")
        top, graphs = _split(data, [(0, size)], {_MODEL_GRAPH: "graph"}, "ModelProto")
        has_ir = any(n == _MODEL_IR_VERSION and w == 0 for n, w, _, _ in _fields(data, 0, size))
        if not has_ir or not graphs["graph"]:
            raise _Malformed("it has no ir_version and graph (is it another format?)")
        # Several graph fields merge, as protobuf merges them: join their fields in order.
        graph_bytes, parts = _split(
            data,
            graphs["graph"],
            {_GRAPH_INITIALIZER: "initializer", _GRAPH_SPARSE_INITIALIZER: "sparse"},
            "GraphProto",
        )
        model = onnx.ModelProto.FromString(top)
        graph = onnx.GraphProto.FromString(graph_bytes)
        initializers: list[tuple[Any, tuple[int, int] | None]] = []
        for span in parts["initializer"]:
            rest, raw = _split(data, [span], {_TENSOR_RAW_DATA: "raw"}, "TensorProto")
            # protobuf semantics: the last occurrence of a scalar field wins.
            raw_span = raw["raw"][-1] if raw["raw"] else None
            initializers.append((onnx.TensorProto.FromString(rest), raw_span))
    except _Malformed as exc:
        raise CheckpointError(f"{bad}: {exc}") from None
    except decode_error as exc:
        raise CheckpointError(f"{bad}: protobuf cannot parse it ({exc})") from None
    return _Parsed(model, graph, initializers, len(parts["sparse"]))


# -- Tensors ---------------------------------------------------------------------------


class _Maps:
    """Read-only memory maps of the model file and its external data files."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._maps: list[mmap.mmap] = []
        self._views: dict[Path, memoryview] = {}

    def open(self, file: Path) -> memoryview:
        """The whole file as a zero-copy view (mapped once per file)."""
        if file not in self._views:
            try:
                handle = open(file, "rb")  # noqa: SIM115 -- closed below, the map outlives it
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot read: {exc.strerror or exc}") from None
            with handle:
                if os.fstat(handle.fileno()).st_size == 0:
                    self._views[file] = memoryview(b"")
                else:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps.append(mapped)
                    self._views[file] = memoryview(mapped)
        return self._views[file]

    def external(self, where: str, entries: dict[str, str], nbytes: int) -> memoryview:
        """The bytes of a tensor in an external data file, checked against its size.

        As onnx's own checker does, the location must be a relative path inside the
        model's folder, with no ``..``, not a symbolic link (nor under one that leads out
        of the folder), and a regular file with one hard link.
        """
        where += ": external data"
        location = entries.get("location", "")
        file = self._confined(where, location)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise CheckpointError(f"{where}: offset and length must be integers") from None
        view = self.open(file)
        if offset < 0 or offset > len(view) or (length is not None and length < 0):
            raise CheckpointError(
                f"{where}: offset {offset} is outside {location!r} ({len(view)} bytes)"
            )
        # Without a length, onnx reads to the end of the file.
        held = len(view) - offset if length is None else length
        if held != nbytes or offset + held > len(view):
            raise CheckpointError(
                f"{where}: the tensor needs {nbytes} bytes, {location!r} holds {held} at offset "
                f"{offset} (the file has {len(view)} bytes)"
            )
        return view[offset : offset + nbytes]

    def _confined(self, where: str, location: str) -> Path:
        """The external file for ``location``, refused if it could lead out of the folder."""
        parts = location.replace("\\", "/").split("/")
        if not location or "\0" in location:
            raise CheckpointError(f"{where}: its location is empty or not a file name")
        if Path(location).is_absolute() or location.startswith(("/", "\\")) or ".." in parts:
            raise CheckpointError(
                f"{where}: location {location!r} must be a relative path inside the model's "
                "folder, without '..'"
            )
        folder = self._path.parent
        file = folder.joinpath(*parts)
        if file.is_symlink():
            raise CheckpointError(f"{where}: {location!r} is a symbolic link; refused")
        try:
            inside = file.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
            stat = file.stat()
        except OSError:
            raise CheckpointError(f"{where}: {location!r} is missing or unreadable") from None
        if not inside:
            raise CheckpointError(f"{where}: {location!r} leads out of the model's folder")
        if not file.is_file():
            raise CheckpointError(f"{where}: {location!r} is not a regular file")
        if stat.st_nlink > 1:
            raise CheckpointError(f"{where}: {location!r} has several hard links; refused")
        return file

    def close(self) -> None:
        for view in self._views.values():
            with contextlib.suppress(BufferError):
                view.release()
        self._views.clear()
        for mapped in self._maps:
            # An array may still view the map; it is then unmapped when that array is freed.
            with contextlib.suppress(BufferError):
                mapped.close()
        self._maps.clear()


def _read_tensors(
    path: Path, maps: _Maps, parsed: _Parsed
) -> tuple[dict[str, TensorInfo], dict[str, Callable[[], memoryview]], tuple[str, ...]]:
    """Index the initializers, then the Constant nodes' tensors; notes say what was read."""
    model_view = maps.open(path)
    found: list[tuple[str, Any, memoryview | None]] = [
        ("initializer", proto, None if span is None else model_view[span[0] : span[1]])
        for proto, span in parsed.initializers
    ]
    constants, left_out = _constant_tensors(parsed.graph)
    found += [("Constant output", proto, None) for proto in constants]
    tensors: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], memoryview]] = {}
    external = set()
    for what, proto, raw in found:
        if proto.name in tensors:
            raise CheckpointError(
                f"{path}: two tensors are named {proto.name!r} (initializers "
                "and Constant outputs must be unique)"
            )
        info, loader = _tensor(path, maps, what, proto, raw)
        tensors[info.name], loaders[info.name] = info, loader
        if proto.data_location == _EXTERNAL:
            external.add(dict((e.key, e.value) for e in proto.external_data)["location"])
    if not tensors:
        raise CheckpointError(f"{path}: no initializers or Constant tensors in the ONNX graph")
    notes = []
    if external:
        notes.append(f"read external data from {', '.join(sorted(external))} (memory-mapped)")
    if constants:
        names = ", ".join(proto.name for proto in constants[:3]) + (", ..." * (len(constants) > 3))
        notes.append(
            f"read {len(constants)} Constant node tensors as tensors named by the node's "
            f"output ({names})"
        )
    if left_out:
        notes.append(f"left out {left_out} Constant nodes whose value is not a tensor")
    if parsed.sparse_count:
        notes.append(f"left out {parsed.sparse_count} sparse initializers (not read)")
    if nested := _subgraph_tensor_count(parsed.graph):
        notes.append(f"left out {nested} tensors inside subgraphs (If / Loop / Scan bodies)")
    return tensors, loaders, tuple(notes)


def _constant_tensors(graph: Any) -> tuple[list[Any], int]:
    """Constant nodes' ``value`` tensors (renamed to the node's output), and how many
    Constant nodes hold something else (``value_float``, ``sparse_value``, ...)."""
    tensors, other = [], 0
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in _STANDARD_DOMAINS:
            continue
        value = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if value is None or not node.output:
            other += 1
            continue
        value.t.name = node.output[0]
        tensors.append(value.t)
    return tensors, other


def _subgraph_tensor_count(graph: Any) -> int:
    """Initializers and Constant nodes in the graph's subgraphs, at any depth."""
    count, pending = 0, [graph]
    while pending:
        for node in pending.pop().node:
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                for sub in subgraphs:
                    count += len(sub.initializer) + sum(n.op_type == "Constant" for n in sub.node)
                    pending.append(sub)
    return count


def _tensor(
    path: Path, maps: _Maps, what: str, proto: Any, raw: memoryview | None
) -> tuple[TensorInfo, Callable[[], memoryview]]:
    """A tensor's index entry and its bytes' loader, after checking dims against data."""
    name = proto.name
    where = f"{path}: {what} {name!r}"
    code = _DTYPES.get(proto.data_type)
    if code is None:
        kind = _type_name(proto.data_type)
        why = (
            "string tensors are not supported"
            if kind == "STRING"
            else ("safetensors has no such dtype")
        )
        raise CheckpointError(f"{where}: data type {kind}: {why}")
    if proto.HasField("segment"):
        raise CheckpointError(f"{where}: segmented tensors are not supported")
    dims = tuple(proto.dims)
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{where}: dims {list(dims)} are not sizes")
    info = TensorInfo(name, code, dims)
    nbytes = tensor_nbytes(code, dims)
    what_needs = f"dims {list(dims)} ({_type_name(proto.data_type)}) need"
    if proto.data_location == _EXTERNAL:
        entries = {entry.key: entry.value for entry in proto.external_data}
        view = maps.external(where, entries, nbytes)
        return info, lambda: view
    if raw is None and proto.HasField("raw_data"):  # a Constant's tensor, parsed in full
        raw = memoryview(proto.raw_data)
    if raw is not None:
        if len(raw) != nbytes:
            raise CheckpointError(
                f"{where}: {what_needs} {nbytes} bytes, raw_data holds {len(raw)}"
            )
        return info, lambda: raw
    field = _TYPED_FIELDS.get(code, "int32_data")
    count, needed = len(getattr(proto, field)), math.prod(dims) * (2 if code == "C64" else 1)
    if count != needed:
        raise CheckpointError(f"{where}: {what_needs} {needed} values, {field} holds {count}")
    return info, lambda: _decode(proto, code, field)


def _decode(proto: Any, code: str, field: str) -> memoryview:
    """A tensor's typed field as little-endian bytes of its own dtype, as
    ``onnx.numpy_helper.to_array`` decodes it (int32_data holds the bit patterns of
    8- and 16-bit types; uint64_data holds uint32 values)."""
    import numpy as np

    values = getattr(proto, field)
    if field == "int32_data" and code != "I32":
        bits = np.asarray(values, dtype=np.int32).view(np.uint32)
        array = bits.astype("<u2" if code in ("F16", "BF16", "I16", "U16") else np.uint8)
    else:
        stored = {"float_data": "<f4", "double_data": "<f8", "int64_data": "<i8",
                  "uint64_data": "<u8", "int32_data": "<i4"}[field]  # fmt: skip
        array = np.asarray(values, dtype=stored)
        if code == "U32":
            array = array.astype("<u4")
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _type_name(data_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"unknown ({data_type})"


# -- What the graph says ---------------------------------------------------------------


def _weight_formats(
    graph: Any, tensors: dict[str, TensorInfo]
) -> tuple[dict[str, WeightFormat], tuple[str, ...]]:
    """Each 2-D tensor's stored FC weight format, from the Gemm / MatMul nodes it feeds.

    A tensor fed to nodes that disagree gets no hint (the default applies), with a note;
    so does a Gemm whose ``alpha`` / ``beta`` scale its product, which a conv cannot hold.
    """
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, dict[WeightFormat, str]] = {}
    notes = []
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS or len(node.input) < 2:
            continue
        label = f"{node.op_type} {node.name or (node.output[0] if node.output else '')}".strip()
        if node.op_type == "Gemm":
            fmt = WeightFormat.OUT_IN if _attr(node, "transB", "i", 0) else WeightFormat.IN_OUT
            alpha, beta = _attr(node, "alpha", "f", 1.0), _attr(node, "beta", "f", 1.0)
            if (alpha, beta) != (1.0, 1.0):
                notes.append(
                    f"{label} scales by alpha={alpha:g}, beta={beta:g}: a converted conv "
                    "computes its product and bias unscaled"
                )
        elif node.op_type == "MatMul":
            fmt = WeightFormat.IN_OUT
        else:
            continue
        name, fmt = _weight_source(node.input[1], fmt, producers, tensors)
        if name is not None and len(tensors[name].shape) == 2:
            uses.setdefault(name, {}).setdefault(fmt, label)
    hints = {name: next(iter(formats)) for name, formats in uses.items() if len(formats) == 1}
    for name, formats in uses.items():
        if len(formats) > 1:
            how = ", ".join(f"{label} reads it {fmt.value}" for fmt, label in formats.items())
            notes.append(f"no weight format for {name!r} from the graph: {how}")
    if hints:
        counts = {fmt: sum(f is fmt for f in hints.values()) for fmt in WeightFormat}
        said = ", ".join(f"{n} {fmt.value}" for fmt, n in counts.items() if n)
        notes.append(f"weight formats from the graph's Gemm / MatMul nodes: {said}")
    return hints, tuple(notes)


def _weight_source(
    name: str, fmt: WeightFormat, producers: dict[str, Any], tensors: dict[str, TensorInfo]
) -> tuple[str | None, WeightFormat]:
    """The tensor behind a Gemm / MatMul input B, back through Identity, Cast and 2-D
    Transpose (which swaps the format); (None, fmt) if it is computed otherwise."""
    for _ in range(len(producers) + 1):  # a hostile graph may loop
        if name in tensors:
            return name, fmt
        node = producers.get(name)
        if node is None or node.domain not in _STANDARD_DOMAINS or not node.input:
            break
        if node.op_type == "Transpose":
            perm = _attr(node, "perm", "ints", [])
            if perm not in ([], [1, 0], [0, 1]):
                break
            if perm != [0, 1]:
                fmt = WeightFormat.IN_OUT if fmt is WeightFormat.OUT_IN else WeightFormat.OUT_IN
        elif node.op_type not in ("Identity", "Cast"):
            break
        name = node.input[0]
    return None, fmt


def _attr(node: Any, name: str, field: str, default: Any) -> Any:
    """A node attribute's value from its field (``i``, ``f``, ``ints``), or the default."""
    for attr in node.attribute:
        if attr.name == name:
            value = getattr(attr, field)
            return list(value) if field == "ints" else value
    return default


def _summary(
    onnx: Any,
    parsed: _Parsed,
    tensors: dict[str, TensorInfo],
    loaders: dict[str, Callable[[], memoryview]],
) -> dict[str, Any]:
    """The main graph as plain data, for ``suggest``.

    Keys: ``name``; ``opset`` (domain -> version, ``""`` for ai.onnx); ``inputs`` and
    ``outputs`` (lists of ``{"name", "dtype", "shape"}``, a dim an int, a symbolic name or
    None); ``shapes`` (value name -> shape, from the file's value_info and onnx shape
    inference, for the values inference could type); ``initializers`` and ``constants``
    (tensor names); ``nodes`` in graph order, each ``{"name", "op_type", "domain",
    "inputs", "outputs", "attributes"}``. Attribute values are ints, floats, strings or
    lists of them; a tensor attribute is ``{"tensor": NAME}`` for a Constant (its tensor
    is in the checkpoint), else ``{"dtype", "shape"}``; a subgraph is ``{"graph": NAME}``.
    """
    graph = parsed.graph
    initializers = [proto.name for proto, _ in parsed.initializers]
    constants = [name for name in tensors if name not in set(initializers)]
    value_infos = [*graph.input, *graph.output, *graph.value_info]
    shapes = {
        v.name: _value_info(v)["shape"] for v in value_infos if v.type.HasField("tensor_type")
    }
    shapes.update(_inferred_shapes(onnx, parsed, tensors, loaders))
    return {
        "name": graph.name,
        "opset": {
            o.domain if o.domain != "ai.onnx" else "": o.version for o in parsed.model.opset_import
        },
        "inputs": [_value_info(v) for v in graph.input if v.name not in tensors],
        "outputs": [_value_info(v) for v in graph.output],
        "shapes": shapes,
        "initializers": initializers,
        "constants": constants,
        "nodes": [_node(node) for node in graph.node],
    }


def _value_info(value: Any) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in tensor_type.shape.dim
    ]
    return {
        "name": value.name,
        "dtype": _DTYPES.get(tensor_type.elem_type, _type_name(tensor_type.elem_type)),
        "shape": dims if tensor_type.HasField("shape") else None,
    }


def _node(node: Any) -> dict[str, Any]:
    return {
        "name": node.name,
        "op_type": node.op_type,
        "domain": node.domain,
        "inputs": list(node.input),
        "outputs": list(node.output),
        "attributes": {attr.name: _attribute(node, attr) for attr in node.attribute},
    }


def _attribute(node: Any, attr: Any) -> Any:
    """An attribute's value as plain data (see ``_summary``); None for a kind not shown."""
    kind = attr.type  # AttributeProto.AttributeType
    if kind == 1:
        return attr.f
    if kind == 2:
        return attr.i
    if kind == 3:
        return attr.s.decode("utf-8", "replace")
    if kind == 4:
        if node.op_type == "Constant" and node.output:
            return {"tensor": node.output[0]}
        return {"dtype": _type_name(attr.t.data_type), "shape": list(attr.t.dims)}
    if kind == 5:
        return {"graph": attr.g.name}
    if kind == 6:
        return list(attr.floats)
    if kind == 7:
        return list(attr.ints)
    if kind == 8:
        return [s.decode("utf-8", "replace") for s in attr.strings]
    if kind == 10:
        return [{"graph": g.name} for g in attr.graphs]
    return None


def _inferred_shapes(
    onnx: Any,
    parsed: _Parsed,
    tensors: dict[str, TensorInfo],
    loaders: dict[str, Callable[[], memoryview]],
) -> dict[str, list[int | str | None] | None]:
    """Value shapes from onnx shape inference, run on the graph without tensor payloads:
    initializers enter as typed graph inputs, except small int64 ones (Reshape shapes),
    which keep their values. Empty if inference fails (it is only a hint for suggest)."""
    model = onnx.ModelProto()
    model.CopyFrom(parsed.model)
    model.graph.CopyFrom(parsed.graph)
    declared = {v.name for v in model.graph.input}
    for proto, _ in parsed.initializers:
        info = tensors[proto.name]
        if info.dtype == "I64" and math.prod(info.shape) <= _SHAPE_TENSOR_MAX:
            kept = model.graph.initializer.add(name=info.name, data_type=proto.data_type)
            kept.dims.extend(info.shape)
            kept.raw_data = bytes(loaders[info.name]())
        elif info.name not in declared:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(info.name, proto.data_type, info.shape)
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        return {}
    return {
        v.name: _value_info(v)["shape"]
        for v in inferred.graph.value_info
        if v.type.HasField("tensor_type")
    }
