"""Caffe ``.caffemodel`` files: a binary ``NetParameter``, V2 (``layer``) or V1 (``layers``).

The file is memory-mapped and walked at the protobuf wire level down to each blob, so a
blob's values (``data`` F32, ``double_data`` F64, or NVIDIA Caffe's ``raw_data`` with
``raw_data_type``, F16 as OpenCV reads it) are handed out as zero-copy views of the file;
everything else (layer names, types, params, shapes) is decoded by protobuf with the
shipped schema (``caffe.proto``, see ``caffe_schema``). Conv weights stay as stored:
Caffe convolves by cross-correlation, like torch.

Tensor names, per layer type (blob index order):

- ``InnerProduct``, ``Convolution``, ``Deconvolution``, ``Embed``, ``Scale``:
  ``LAYER.weight``, ``LAYER.bias``
- ``BatchNorm``: ``LAYER.mean``, ``LAYER.variance``, ``LAYER.scale_factor``
- ``Bias``: ``LAYER.bias``; ``PReLU``: ``LAYER.weight``
- any other blob: ``LAYER.blobs.N``

``Loaded.graph`` is plain data: ``{"name", "version": "V2" | "V1", "inputs": [{"name",
"shape"}], "layers": [{"name", "type", "bottom", "top", "blobs", "params"}]}``, where
``blobs`` are the layer's tensor names and ``params`` hold the resolved (defaults
applied) key parameters of Convolution / Deconvolution, Pooling, InnerProduct, Input,
Flatten and Reshape layers. V1 enum types are given by their V2 names (``INNER_PRODUCT``
is ``InnerProduct``). ``read_prototxt`` gives the same structure for a text ``.prototxt``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers.base import LazyBuffers, Loaded, TensorInfo

__all__ = ["BLOB_NAMES", "V1_TYPES", "graph_of", "read", "read_prototxt"]

# Tensor-name suffixes of a layer's blobs, by layer type; further blobs are ``blobs.N``.
BLOB_NAMES = {
    "InnerProduct": ("weight", "bias"),
    "Convolution": ("weight", "bias"),
    "Deconvolution": ("weight", "bias"),
    "Embed": ("weight", "bias"),
    "Scale": ("weight", "bias"),
    "Bias": ("bias",),
    "BatchNorm": ("mean", "variance", "scale_factor"),
    "PReLU": ("weight",),
}
# V1LayerParameter.LayerType -> the V2 type string (Caffe's UpgradeV1LayerType).
V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax",
    "BNLL": "BNLL", "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution", "DATA": "Data",
    "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split",
    "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip
# Weights stored (in, out) whatever the params say: Caffe's Embed keeps (input_dim, num_output).
_IN_OUT_WEIGHTS = ("Embed",)
_BIAS_SUFFIX = "bias"

# Field numbers (caffe.proto).
_NET_LAYER, _NET_LAYERS = 100, 2  # NetParameter.layer (V2), .layers (V1)
_V2_BLOBS, _V1_BLOBS, _V0_LAYER = 7, 6, 1
_BLOB_LEGACY = (1, 2, 3, 4)  # num, channels, height, width
_BLOB_DATA, _BLOB_DIFF, _BLOB_SHAPE, _BLOB_DOUBLE, _BLOB_DOUBLE_DIFF = 5, 6, 7, 8, 9
_BLOB_RAW_TYPE, _BLOB_RAW = 10, 12
_BLOB_VALUES = (_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE, _BLOB_RAW_TYPE, _BLOB_RAW)
# raw_data_type -> (dtype code, bytes per value); INT and UINT are not weights.
_RAW_TYPES = {0: ("F64", 8), 1: ("F32", 4), 2: ("F16", 2)}
_RAW_TYPE_NAMES = {0: "DOUBLE", 1: "FLOAT", 2: "FLOAT16", 3: "INT", 4: "UINT"}
# Wire types: 0 varint, 1 fixed64, 2 length-delimited, 3/4 group start/end, 5 fixed32.
_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5
_NOTE_NAMES = 4  # names listed in a note before "and N more"
_WIRE_TYPES: dict[str, dict[int, tuple[int, ...]]] = {}  # by message name, filled on use


class _Malformed(Exception):
    """The bytes are not a well-formed caffemodel; the message says where and why."""


class _Record(NamedTuple):
    """One wire-format field: number, wire type, varint value, and its byte spans."""

    number: int
    wire: int
    value: int  # the varint (wire type 0), else the value's length in bytes
    start: int  # where the record (its key) starts
    value_start: int
    end: int


@dataclass
class _Blob:
    """One BlobProto: dtype, shape, where its values lie, and what was left aside."""

    dtype: str
    shape: tuple[int, ...]
    spans: list[tuple[int, int]]
    legacy: bool  # the shape came from the deprecated num/channels/height/width
    has_diff: bool = False


@dataclass
class _Layer:
    """One layer: its decoded parameters (blobs aside) and its blobs."""

    message: Any
    type: str
    blobs: list[_Blob] = field(default_factory=list)


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Open a caffemodel: names, dtypes and shapes now, each blob's bytes as a view."""
    schema = _schema(path)
    from google.protobuf.message import DecodeError

    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file: not a caffemodel (no layers)")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)

    def close() -> None:
        buffers.clear()
        view.release()
        # An array may still view the map; it is then unmapped when that array is freed.
        with contextlib.suppress(BufferError):
            mapped.close()

    buffers = LazyBuffers({})
    try:
        version, net, layers = _parse_net(view, schema)
        tensors, loaders, notes = _tensors(path, view, layers)
        graph = graph_of(
            net, version, [layer.message for layer in layers], [len(x.blobs) for x in layers]
        )
    except (_Malformed, DecodeError, UnicodeDecodeError) as exc:
        reason = _reason(exc, view)
        close()
        raise CheckpointError(f"{path}: not a valid caffemodel: {reason}") from None
    except CheckpointError:
        close()
        raise
    buffers = LazyBuffers(loaders)
    return Loaded("caffe", tensors, buffers, notes, close, WeightFormat.OUT_IN, graph)


def read_prototxt(path: Path) -> dict[str, Any]:
    """The ``graph`` (as in ``read``) of a text ``.prototxt`` net definition, no blobs.

    Fields the shipped schema leaves out (``lrn_param``, ``data_param``, ...) are skipped.
    """
    schema = _schema(path)
    from google.protobuf import text_format

    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a Caffe prototxt: not UTF-8 text") from None
    net = schema.NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: not a readable Caffe prototxt: {reason}") from None
    if net.layer and net.layers:
        raise CheckpointError(f"{path}: has both V2 'layer' and V1 'layers' entries")
    version = "V1" if net.layers else "V2"
    return graph_of(net, version, list(net.layers or net.layer))


def _schema(path: Path) -> Any:
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"reading {path.suffix or path.name} needs protobuf: pip install 'fc2conv[caffe]'"
        ) from None
    from fc2conv_cli.readers import caffe_schema

    return caffe_schema.messages()


def _reason(exc: Exception, view: memoryview) -> str:
    if isinstance(exc, _Malformed):
        reason = str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        reason = "a name is not UTF-8 text"
    else:
        reason = f"protobuf cannot decode it ({' '.join(str(exc).split()) or 'DecodeError'})"
    head = bytes(view[:64])
    if head.isascii() and all(c >= 0x20 or c in b"\t\r\n" for c in head):
        reason += "; it looks like text (a .prototxt?), a caffemodel is binary"
    return reason


# -- wire format -------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"a number runs past byte {end} (truncated file?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"a varint at byte {pos - 10} is longer than 10 bytes")


def _records(buf: memoryview, start: int, end: int) -> Iterator[_Record]:
    """Each field record between ``start`` and ``end``; groups are skipped whole."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {first}")
        value = 0
        if wire == _VARINT:
            value, stop = _varint(buf, pos, end)
        elif wire in (_FIXED64, _FIXED32):
            value = 8 if wire == _FIXED64 else 4
            stop = pos + value
        elif wire == _LENGTH:
            value, pos = _varint(buf, pos, end)
            stop = pos + value
        elif wire == _GROUP_START:
            stop = _skip_group(buf, pos, end, number)
        else:
            raise _Malformed(f"invalid wire type {wire} at byte {first}")
        if stop > end:
            raise _Malformed(
                f"field {number} at byte {first} runs past the end of its message at byte "
                f"{end} (truncated file?)"
            )
        yield _Record(number, wire, value, first, pos, stop)
        pos = stop


def _skip_group(buf: memoryview, pos: int, end: int, number: int) -> int:
    """Where the group opened by field ``number`` ends; nested groups without recursion."""
    open_groups = [number]
    while open_groups:
        key, pos = _varint(buf, pos, end)
        inner, wire = key >> 3, key & 7
        if wire == _GROUP_START:
            open_groups.append(inner)
        elif wire == _GROUP_END:
            if open_groups.pop() != inner:
                raise _Malformed(f"unmatched end of group {inner} at byte {pos}")
        elif wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos, end)
            pos += length
        else:
            raise _Malformed(f"invalid wire type {wire} at byte {pos}")
        if pos > end:
            break
    if open_groups or pos > end:
        raise _Malformed(f"group {number} runs past byte {end} (truncated file?)")
    return pos


def _wire_types(descriptor: Any) -> dict[int, tuple[int, ...]]:
    """The wire types each known field of a message may arrive in (packed or not)."""
    if descriptor.full_name in _WIRE_TYPES:
        return _WIRE_TYPES[descriptor.full_name]
    from google.protobuf.descriptor import FieldDescriptor as F

    kinds = {
        F.TYPE_DOUBLE: _FIXED64, F.TYPE_FIXED64: _FIXED64, F.TYPE_SFIXED64: _FIXED64,
        F.TYPE_FLOAT: _FIXED32, F.TYPE_FIXED32: _FIXED32, F.TYPE_SFIXED32: _FIXED32,
        F.TYPE_STRING: _LENGTH, F.TYPE_BYTES: _LENGTH, F.TYPE_MESSAGE: _LENGTH,
        F.TYPE_GROUP: _GROUP_START,
    }  # fmt: skip
    allowed: dict[int, tuple[int, ...]] = {}
    for fd in descriptor.fields:
        wire = kinds.get(fd.type, _VARINT)
        # FieldDescriptor.label is gone from newer runtimes; is_repeated is new in 5.x.
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == F.LABEL_REPEATED
        packable = repeated and wire in (_VARINT, _FIXED64, _FIXED32)
        allowed[fd.number] = (wire, _LENGTH) if packable else (wire,)
    _WIRE_TYPES[descriptor.full_name] = allowed
    return allowed


def _split(
    buf: memoryview, start: int, end: int, descriptor: Any, keep: tuple[int, ...], where: str
) -> tuple[dict[int, list[_Record]], bytes]:
    """The records numbered ``keep``, and every other record's bytes for protobuf to decode.

    Known fields in the wrong wire type mean the bytes are not this message at all.
    """
    allowed = _wire_types(descriptor)
    kept: dict[int, list[_Record]] = {number: [] for number in keep}
    rest = bytearray()
    for record in _records(buf, start, end):
        if record.number in allowed and record.wire not in allowed[record.number]:
            name = descriptor.fields_by_number[record.number].name
            raise _Malformed(
                f"{where}: field {record.number} ({name}) at byte {record.start} has wire "
                f"type {record.wire}, not a {descriptor.name} field"
            )
        if record.number in kept:
            kept[record.number].append(record)
        else:
            rest += buf[record.start : record.end]
    return kept, bytes(rest)


# -- NetParameter, layers, blobs ---------------------------------------------------------


def _parse_net(view: memoryview, schema: Any) -> tuple[str, Any, list[_Layer]]:
    kept, rest = _split(
        view, 0, len(view), schema.NetParameter.DESCRIPTOR, (_NET_LAYER, _NET_LAYERS), "the net"
    )
    net = schema.NetParameter.FromString(rest)
    v2, v1 = kept[_NET_LAYER], kept[_NET_LAYERS]
    if v2 and v1:
        raise _Malformed("it has both V2 'layer' and V1 'layers' entries")
    if not v2 and not v1:
        raise _Malformed("a NetParameter with no layers")
    version = "V2" if v2 else "V1"
    layers = [
        _parse_layer(view, record, version, schema, index) for index, record in enumerate(v2 or v1)
    ]
    return version, net, layers


def _parse_layer(
    view: memoryview, record: _Record, version: str, schema: Any, index: int
) -> _Layer:
    message_type = schema.LayerParameter if version == "V2" else schema.V1LayerParameter
    blobs_field = _V2_BLOBS if version == "V2" else _V1_BLOBS
    keep = (blobs_field,) if version == "V2" else (blobs_field, _V0_LAYER)
    where = f"layer {index}"
    kept, rest = _split(view, record.value_start, record.end, message_type.DESCRIPTOR, keep, where)
    message = message_type.FromString(rest)
    if not isinstance(message.name, str):  # upb hands out invalid UTF-8 as bytes
        raise _Malformed(f"{where}: its name {message.name!r} is not UTF-8 text")
    where = f"layer {message.name!r}" if message.name else where
    if version == "V1" and kept[_V0_LAYER]:
        raise _Malformed(
            f"{where} uses the V0 layer format (Caffe before 2014); upgrade the file with "
            "Caffe's upgrade_net_proto_binary"
        )
    layer = _Layer(message, _layer_type(message, version))
    for number, blob in enumerate(kept[blobs_field]):
        layer.blobs.append(_parse_blob(view, blob, schema, f"{where} blob {number}"))
    return layer


def _parse_blob(view: memoryview, record: _Record, schema: Any, where: str) -> _Blob:
    descriptor = schema.BlobProto.DESCRIPTOR
    keep = (*_BLOB_LEGACY, *_BLOB_VALUES, _BLOB_DIFF, _BLOB_DOUBLE_DIFF)
    kept, _ = _split(view, record.value_start, record.end, descriptor, keep, where)
    has_diff = bool(kept[_BLOB_DIFF] or kept[_BLOB_DOUBLE_DIFF])
    dtype, spans = _blob_values(kept, where)
    itemsize = {"F16": 2, "F32": 4, "F64": 8}[dtype]
    count = sum(b - a for a, b in spans) // itemsize
    shape, legacy = _blob_shape(view, kept, schema, where)
    if math.prod(shape) != count:
        raise _Malformed(
            f"{where}: its shape {list(shape)} holds {math.prod(shape)} values, but its data "
            f"has {count}"
        )
    return _Blob(dtype, shape, spans, legacy, has_diff)


def _blob_values(kept: dict[int, list[_Record]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The dtype and byte spans of the blob's values, from whichever field holds them.

    Packed or not, a repeated float field's values are the records' payloads in order.
    """
    found: list[tuple[str, list[tuple[int, int]]]] = []
    for number, dtype, size in ((_BLOB_DATA, "F32", 4), (_BLOB_DOUBLE, "F64", 8)):
        records = [r for r in kept[number] if r.end > r.value_start]
        if records:
            if any(r.wire == _LENGTH and r.value % size for r in records):
                raise _Malformed(f"{where}: packed {dtype} data is not a whole number of values")
            found.append((dtype, [(r.value_start, r.end) for r in records]))
    if kept[_BLOB_RAW]:
        raw = kept[_BLOB_RAW][-1]  # optional bytes: the last one wins
        if not kept[_BLOB_RAW_TYPE]:
            raise _Malformed(f"{where}: raw_data without raw_data_type")
        kind = kept[_BLOB_RAW_TYPE][-1].value
        if kind not in _RAW_TYPES:
            name = _RAW_TYPE_NAMES.get(kind, str(kind))
            raise _Malformed(f"{where}: raw_data_type {name} is not a float type")
        dtype, size = _RAW_TYPES[kind]
        if raw.value % size:
            raise _Malformed(f"{where}: {raw.value} bytes of raw_data are not whole {dtype} values")
        found.append((dtype, [(raw.value_start, raw.end)]))
    if len(found) > 1:
        raise _Malformed(f"{where}: holds values in more than one of data, double_data, raw_data")
    return found[0] if found else ("F32", [])


def _blob_shape(
    view: memoryview, kept: dict[int, list[_Record]], schema: Any, where: str
) -> tuple[tuple[int, ...], bool]:
    """The blob's shape: ``shape.dim`` if given, else the legacy 4-D dims, else a scalar."""
    legacy = None
    if any(kept[number] for number in _BLOB_LEGACY):
        legacy = tuple(
            _int32(kept[number][-1].value) if kept[number] else 0 for number in _BLOB_LEGACY
        )
    dims = None
    if kept[_BLOB_SHAPE]:
        shape_bytes = b"".join(bytes(view[r.value_start : r.end]) for r in kept[_BLOB_SHAPE])
        dims = tuple(schema.BlobShape.FromString(shape_bytes).dim)
    if dims is not None and legacy is not None and _squeezed(dims) != _squeezed(legacy):
        raise _Malformed(
            f"{where}: its shape {list(dims)} and its legacy num/channels/height/width "
            f"{list(legacy)} disagree"
        )
    shape = dims if dims is not None else legacy if legacy is not None else ()
    if any(d < 0 for d in shape):
        raise _Malformed(f"{where}: negative dimension in shape {list(shape)}")
    return shape, dims is None and legacy is not None


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


# -- tensors -----------------------------------------------------------------------------


def _tensors(
    path: Path, view: memoryview, layers: list[_Layer]
) -> tuple[dict[str, TensorInfo], dict[str, Callable[[], memoryview]], tuple[str, ...]]:
    tensors: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], memoryview]] = {}
    owners: dict[str, str] = {}
    squeezed, with_diff, copied = [], [], []
    for layer in layers:
        for index, blob in enumerate(layer.blobs):
            name = f"{layer.message.name}.{_suffix(layer.type, index)}"
            if name in owners:
                raise CheckpointError(
                    f"{path}: two layers named {layer.message.name!r} hold blobs; "
                    f"their tensor names collide ({name!r})"
                )
            owners[name] = layer.message.name
            shape = blob.shape
            if blob.legacy:
                shape = _squeeze_legacy(layer.type, index, shape)
                if shape != blob.shape:
                    squeezed.append(f"{name} {_dims(blob.shape)} -> {_dims(shape)}")
            hint = _weight_format(layer, index)
            tensors[name] = TensorInfo(name, blob.dtype, shape, hint)
            loaders[name] = _loader(view, blob.spans)
            if blob.has_diff:
                with_diff.append(name)
            if len(blob.spans) > 1:
                copied.append(name)
    if not tensors:
        raise CheckpointError(f"{path}: no blobs in any of its {len(layers)} layers (no weights)")
    notes = []
    if squeezed:
        notes.append(
            "squeezed legacy 4-D blob shapes (num, channels, height, width) to the layer's "
            f"own: {_listed(squeezed)}"
        )
    if with_diff:
        notes.append(f"left out the gradients (diff) stored with {_listed(with_diff)}")
    if copied:
        notes.append(f"joined values stored in several records (copied): {_listed(copied)}")
    return tensors, loaders, tuple(notes)


def _suffix(kind: str, index: int) -> str:
    names = BLOB_NAMES.get(kind, ())
    return names[index] if index < len(names) else f"blobs.{index}"


def _squeeze_legacy(kind: str, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """InnerProduct weights (1, 1, out, in) -> (out, in); biases (1, 1, 1, n) -> (n,)."""
    names = BLOB_NAMES.get(kind, ())
    if index < len(names) and names[index] == _BIAS_SUFFIX:
        keep = 1
    elif kind in ("InnerProduct", "Embed") and index == 0:
        keep = 2
    else:
        return shape
    while len(shape) > keep and shape[0] == 1:
        shape = shape[1:]
    return shape


def _weight_format(layer: _Layer, index: int) -> WeightFormat | None:
    if index != 0:
        return None
    if layer.type in _IN_OUT_WEIGHTS:
        return WeightFormat.IN_OUT
    if layer.type == "InnerProduct":
        transpose = layer.message.inner_product_param.transpose
        return WeightFormat.IN_OUT if transpose else WeightFormat.OUT_IN
    return None


def _loader(view: memoryview, spans: list[tuple[int, int]]) -> Callable[[], memoryview]:
    if len(spans) == 1:
        start, stop = spans[0]
        return lambda: view[start:stop]
    if not spans:
        return lambda: memoryview(b"")
    # Unpacked values or a packed field split over records: one copy, made on first use.
    return lambda: memoryview(b"".join(bytes(view[a:b]) for a, b in spans))


def _dims(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"


def _listed(items: list[str]) -> str:
    shown_items = ", ".join(items[:_NOTE_NAMES])
    more = len(items) - _NOTE_NAMES
    return f"{shown_items} and {more} more" if more > 0 else shown_items


# -- graph -------------------------------------------------------------------------------


def graph_of(
    net: Any, version: str, layers: list[Any], blob_counts: list[int] | None = None
) -> dict[str, Any]:
    """The net as plain data (see the module docstring); ``layers`` are its layer messages,
    ``blob_counts`` how many blobs each holds (default: the messages' own ``blobs``)."""
    inputs = _net_inputs(net)
    entries: list[dict[str, Any]] = []
    counts = blob_counts if blob_counts is not None else [len(m.blobs) for m in layers]
    for message, count in zip(layers, counts, strict=True):
        kind = _layer_type(message, version)
        entries.append(
            {
                "name": _text(message.name),
                "type": _text(kind),
                "bottom": [_text(b) for b in message.bottom],
                "top": [_text(t) for t in message.top],
                "blobs": [f"{message.name}.{_suffix(kind, i)}" for i in range(count)],
                "params": _params(message, kind),
            }
        )
    for entry in entries:  # V2 Input layers: one shape per top, or one for all
        if entry["type"] == "Input":
            shapes = entry["params"].get("shape", [])
            for i, top in enumerate(entry["top"]):
                shape = shapes[i] if len(shapes) > 1 else shapes[0] if shapes else None
                inputs.append({"name": top, "shape": shape})
    return {"name": _text(net.name), "version": version, "inputs": inputs, "layers": entries}


def _text(value: str | bytes) -> str:
    """A string field as text (upb gives invalid UTF-8 as bytes)."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _layer_type(message: Any, version: str) -> str:
    if version == "V2":
        return message.type
    value = message.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number.get(message.type)
    return V1_TYPES.get(value.name, value.name) if value else f"V1 type {message.type}"


def _net_inputs(net: Any) -> list[dict[str, Any]]:
    """The deprecated net-level inputs, with shapes from input_shape or input_dim."""
    names = list(net.input)
    shapes: list[list[int] | None] = [None] * len(names)
    if net.input_shape:
        given: list[list[int] | None] = [list(s.dim) for s in net.input_shape]
        shapes = given + shapes[len(net.input_shape) :]
    elif net.input_dim:
        dims = list(net.input_dim)
        shapes = [dims[4 * i : 4 * i + 4] or None for i in range(len(names))]
    return [
        {"name": _text(n), "shape": s} for n, s in zip(names, shapes[: len(names)], strict=True)
    ]


def _has(message: Any, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def _params(message: Any, kind: str) -> dict[str, Any]:
    if kind in ("Convolution", "Deconvolution"):
        return _conv_params(message.convolution_param)
    if kind == "Pooling":
        return _pool_params(message.pooling_param)
    if kind == "InnerProduct":
        p = message.inner_product_param
        return {
            "num_output": p.num_output,
            "axis": p.axis,
            "transpose": p.transpose,
            "bias_term": p.bias_term,
        }
    if kind == "Input" and _has(message, "input_param"):
        return {"shape": [list(s.dim) for s in message.input_param.shape]}
    if kind == "Flatten" and _has(message, "flatten_param"):
        p = message.flatten_param
        return {"axis": p.axis, "end_axis": p.end_axis}
    if kind == "Flatten":
        return {"axis": 1, "end_axis": -1}
    if kind == "Reshape" and _has(message, "reshape_param"):
        p = message.reshape_param
        return {"shape": list(p.shape.dim), "axis": p.axis, "num_axes": p.num_axes}
    return {}


def _conv_params(p: Any) -> dict[str, Any]:
    """Caffe's own resolution: ``*_h``/``*_w`` win, one value serves every spatial axis."""
    hw = p.HasField("kernel_h") or p.HasField("kernel_w")
    kernel = [p.kernel_h, p.kernel_w] if hw else list(p.kernel_size)
    axes = len(kernel) if len(kernel) > 1 else 2

    def per_axis(name: str, default: int) -> list[int]:
        if name != "dilation" and (p.HasField(f"{name}_h") or p.HasField(f"{name}_w")):
            return [getattr(p, f"{name}_h"), getattr(p, f"{name}_w")]
        values = list(getattr(p, name)) or [default]
        return values * axes if len(values) == 1 else values

    return {
        "num_output": p.num_output,
        "kernel": kernel * axes if len(kernel) == 1 else kernel,
        "stride": per_axis("stride", 1),
        "pad": per_axis("pad", 0),
        "dilation": per_axis("dilation", 1),
        "group": p.group,
        "bias_term": p.bias_term,
        "axis": p.axis,
    }


def _pool_params(p: Any) -> dict[str, Any]:
    def pair(name: str) -> list[int] | None:
        if p.HasField(f"{name}_h") or p.HasField(f"{name}_w"):
            return [getattr(p, f"{name}_h"), getattr(p, f"{name}_w")]
        if name == "kernel" and not p.HasField("kernel_size"):
            return None  # global pooling
        value = p.kernel_size if name == "kernel" else getattr(p, name)
        return [value, value]

    def enum_name(field_name: str) -> str:
        enum = p.DESCRIPTOR.fields_by_name[field_name].enum_type
        return enum.values_by_number[getattr(p, field_name)].name

    return {
        "pool": enum_name("pool"),
        "kernel": pair("kernel"),
        "stride": pair("stride"),
        "pad": pair("pad"),
        "global_pooling": p.global_pooling,
        "round_mode": enum_name("round_mode"),
    }
