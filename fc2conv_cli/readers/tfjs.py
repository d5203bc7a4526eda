"""TF.js models: ``model.json`` and the binary weight shards its ``weightsManifest`` names.

The manifest is a list of groups; each group's ``paths`` (relative to ``model.json``'s
folder) are concatenated in order, and its ``weights`` lie one after another in that
buffer, so a weight may span two shards. Names are the manifest's, unchanged. Weights
that lie in one shard unquantized are zero-copy views of the memory-mapped shard; the
rest (spanning a boundary, or quantized) are joined or decoded on each use, not kept.
Quantized weights (``uint8`` / ``uint16`` with ``scale`` and ``min``, or ``float16``) are
dequantized to their ``dtype`` as TF.js does: ``q * scale + min`` (rounded for ``int32``).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

from fc2conv_cli.errors import CheckpointError, shown
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers.base import Loaded, TensorInfo

__all__ = ["DTYPES", "MODEL_FORMATS", "read"]

# TF.js dtype names -> safetensors codes, as stored (tfjs-core DTYPE_VALUE_SIZE_MAP plus
# the uint16 the Python converter reads).
DTYPES = {
    "float32": "F32", "float16": "F16", "int32": "I32", "uint16": "U16", "uint8": "U8",
    "bool": "BOOL", "complex64": "C64",
}  # fmt: skip
# Quantized storage dtype -> (bytes per value, little-endian numpy dtype).
_QUANTIZED = {"uint8": (1, "<u1"), "uint16": (2, "<u2"), "float16": (2, "<f2")}
# What each quantized storage dtype may decode to (tfjs-core io_utils decodeWeight).
_DEQUANTIZED_TO = {"uint8": ("float32", "int32"), "uint16": ("float32", "int32"),
                   "float16": ("float32",)}  # fmt: skip
MODEL_FORMATS = ("layers-model", "graph-model")
# Graph ops whose second input is an FC weight, and the attribute that transposes it.
_MATMUL_OPS = ("MatMul", "_FusedMatMul")
_STRING_LENGTH_BYTES = 4
# Values dequantized per step: bounds the float64 intermediate to 8 MiB.
_DECODE_CHUNK = 1 << 20
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class _Spec:
    """One manifest entry: where its stored bytes lie in its group and how to decode them."""

    name: str
    dtype: str  # the TF.js dtype the weight has once decoded
    shape: tuple[int, ...]
    start: int  # byte offset in the group's concatenated shards
    stop: int
    quantization: dict[str, Any] | None = None


class _Group:
    """A group's shards, memory-mapped read-only, as one concatenated byte range."""

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.starts = [0]
        for view in views:
            self.starts.append(self.starts[-1] + len(view))

    @property
    def size(self) -> int:
        return self.starts[-1]

    def span(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop): a zero-copy slice when one shard holds them, else a copy."""
        pieces = []
        for view, lo, hi in zip(self.views, self.starts, self.starts[1:], strict=False):
            if hi <= start or stop <= start:
                continue
            if lo >= stop:
                break
            pieces.append(view[max(start, lo) - lo : min(stop, hi) - lo])
        if len(pieces) == 1:
            return pieces[0]
        return memoryview(b"".join(pieces))


class _Buffers(Mapping[str, memoryview]):
    """Each weight's bytes, made on every lookup and never kept.

    A weight in one shard is a view of the map, so this costs nothing; a joined or
    dequantized one lives only while its caller holds it. The pipeline reads each tensor
    twice (write, then check): decoding twice is cheaper than keeping every decoded
    tensor, which for a quantized VGG16 would be its full float32 size.
    """

    def __init__(self, loaders: dict[str, Callable[[], memoryview]]) -> None:
        self._loaders = loaders

    def __getitem__(self, name: str) -> memoryview:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Read ``model.json`` (or a bare weights manifest) and map its shards.

    ``Loaded.graph`` is ``{"format", "modelTopology", "signature"}``: the model's format
    (``layers-model`` with a Keras config, ``graph-model`` with a GraphDef as JSON, or None
    for a bare manifest), its topology as plain JSON data, and its signature if any.
    ``state_dict_key`` does not apply: a TF.js model has one flat set of weights.
    """
    document = _load_json(path)
    manifest, graph, notes = _split_document(path, document)
    folder = path.parent
    maps: dict[Path, tuple[mmap.mmap | None, memoryview]] = {}
    try:
        specs, shard_notes = _lay_out(path, folder, manifest, maps)
    except BaseException:
        _unmap(maps)
        raise
    tensors, loaders, more_notes = _tensors(specs, _matmul_hints(graph))
    buffers = _Buffers(loaders)

    def close() -> None:
        loaders.clear()
        _unmap(maps)

    if not tensors:
        close()
        raise CheckpointError(f"{path}: no tensors found in the TF.js weights manifest")
    notes += shard_notes + more_notes
    return Loaded("tfjs", tensors, buffers, notes, close, WeightFormat.IN_OUT, graph)


def _load_json(path: Path) -> Any:
    """The parsed JSON document; one-line errors for unreadable, non-UTF-8 or broken JSON."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a TF.js model.json: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: not a valid TF.js model.json (truncated or corrupt JSON: {exc.msg} at "
            f"line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a valid TF.js model.json: nested too deep") from None


def _split_document(path: Path, document: Any) -> tuple[list, dict[str, Any] | None, tuple]:
    """(weights manifest, graph for ``suggest``, notes) from a model.json or bare manifest."""
    if isinstance(document, list) and all(_is_group(g) for g in document):
        note = "a bare weights manifest: no model topology"
        return document, None, (note,)
    if not isinstance(document, dict) or "weightsManifest" not in document:
        what = "a JSON object" if isinstance(document, dict) else f"JSON {type(document).__name__}"
        raise CheckpointError(
            f"{path}: {what} but not a TF.js model (no 'weightsManifest'); expected the "
            "model.json that tensorflowjs_converter or tf.LayersModel.save writes"
        )
    manifest = document["weightsManifest"]
    if not isinstance(manifest, list) or not all(_is_group(g) for g in manifest):
        raise CheckpointError(
            f"{path}: not a valid TF.js model: 'weightsManifest' must be a list of "
            "{paths, weights} groups"
        )
    topology = document.get("modelTopology")
    fmt = document.get("format")
    notes: tuple[str, ...] = ()
    if fmt is None and isinstance(topology, dict):
        fmt = "graph-model" if "node" in topology else "layers-model"
        notes = (f"no 'format' in model.json: taken as a {fmt} from its modelTopology",)
    elif fmt is not None and fmt not in MODEL_FORMATS:
        notes = (
            f"format {_brief(fmt)} is neither of {', '.join(MODEL_FORMATS)}: only its "
            "weightsManifest is read",
        )
    graph = {"format": fmt, "modelTopology": topology, "signature": document.get("signature")}
    return manifest, graph, notes


def _is_group(group: Any) -> bool:
    return (
        isinstance(group, dict)
        and isinstance(group.get("paths"), list)
        and isinstance(group.get("weights"), list)
    )


def _lay_out(
    path: Path, folder: Path, manifest: list, maps: dict[Path, tuple[mmap.mmap | None, memoryview]]
) -> tuple[list[tuple[_Spec, _Group]], tuple[str, ...]]:
    """Every weight with its byte span in its group; checks that the shards hold them."""
    seen: set[str] = set()
    laid: list[tuple[_Spec, _Group]] = []
    notes: tuple[str, ...] = ()
    for number, entry in enumerate(manifest, 1):
        files = [_shard_path(path, folder, p) for p in entry["paths"]]
        group = _Group([_map_shard(path, f, maps) for f in files])
        offset = 0
        for weight in entry["weights"]:
            spec = _spec(path, weight, offset, group)
            if spec.name in seen:
                raise CheckpointError(f"{path}: weight {shown(spec.name)!r} appears twice")
            seen.add(spec.name)
            offset = spec.stop
            laid.append((spec, group))
        if offset > group.size:
            names = ", ".join(str(p) for p in entry["paths"]) or "no shards"
            raise CheckpointError(
                f"{path}: weight group {number} ({names}) holds {group.size} bytes, but its "
                f"weights need {offset}: a shard is short (truncated?) or missing from 'paths'"
            )
        if offset < group.size:
            notes += (
                f"weight group {number}: {group.size - offset} bytes after its weights "
                "in the shards were ignored",
            )
    return laid, notes


def _shard_path(path: Path, folder: Path, name: Any) -> Path:
    """A shard's file, confined to model.json's folder: no absolute paths, no '..', no URLs."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: a shard path in 'paths' is not a file name: {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or _SCHEME.match(name) or "\\" in name:
        raise CheckpointError(
            f"{path}: refused shard path {shown(name)!r}: shards must lie in the model.json's "
            "folder (no absolute paths, '..' or URLs)"
        )
    return folder.joinpath(*pure.parts)


def _map_shard(
    path: Path, shard: Path, maps: dict[Path, tuple[mmap.mmap | None, memoryview]]
) -> memoryview:
    """The shard's bytes as a read-only memory map (each file mapped once)."""
    if shard in maps:
        return maps[shard][1]
    if not shard.exists():
        raise CheckpointError(f"{path}: missing weight shard {shard.name!r} (looked for {shard})")
    if not shard.is_file():
        raise CheckpointError(f"{path}: weight shard {shard} is not a regular file")
    try:
        with open(shard, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read weight shard {shard}: {exc.strerror or exc}"
        ) from None
    view = memoryview(mapped) if mapped is not None else memoryview(b"")
    maps[shard] = (mapped, view)
    return view


def _unmap(maps: dict[Path, tuple[mmap.mmap | None, memoryview]]) -> None:
    """Release every shard map; one still viewed by an array is unmapped when it is freed."""
    for mapped, view in maps.values():
        with contextlib.suppress(BufferError):
            view.release()
        if mapped is not None:
            with contextlib.suppress(BufferError):
                mapped.close()
    maps.clear()


def _spec(path: Path, weight: Any, offset: int, group: _Group) -> _Spec:
    """Validate one manifest entry and place it at ``offset`` in its group."""
    if not isinstance(weight, dict) or not isinstance(weight.get("name"), str):
        raise CheckpointError(f"{path}: a weightsManifest entry has no name: {_brief(weight)}")
    name = weight["name"]
    where = f"{path}: weight {shown(name)!r}"
    shape, dtype = weight.get("shape"), weight.get("dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {_brief(shape)} is not a list of sizes")
    count = math.prod(shape)
    quantization = weight.get("quantization")
    if dtype == "string" and quantization is None:
        stop = _string_stop(where, group, offset, count)
    elif quantization is not None:
        stop = offset + count * _check_quantization(where, dtype, quantization)
    elif dtype in DTYPES:
        stop = offset + count * _itemsize(dtype)
    else:
        raise CheckpointError(
            f"{where}: unknown dtype {_brief(dtype)}; expected one of "
            f"{', '.join((*DTYPES, 'string'))}"
        )
    return _Spec(name, cast(str, dtype), tuple(shape), offset, stop, quantization)


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "I32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}[DTYPES[dtype]]


def _check_quantization(where: str, dtype: Any, quantization: Any) -> int:
    """Bytes per stored value of a quantized weight; refuses what TF.js cannot decode."""
    stored = quantization.get("dtype") if isinstance(quantization, dict) else None
    if stored not in _QUANTIZED:
        raise CheckpointError(
            f"{where}: unknown quantization dtype {_brief(stored)}; expected uint8, uint16 "
            "or float16"
        )
    if dtype not in _DEQUANTIZED_TO[stored]:
        raise CheckpointError(
            f"{where}: {stored} quantization of a {_brief(dtype)} weight; TF.js decodes it "
            f"only to {' or '.join(_DEQUANTIZED_TO[stored])}"
        )
    original = quantization.get("original_dtype", dtype)
    if original != dtype:
        raise CheckpointError(
            f"{where}: dtype {dtype!r} disagrees with quantization original_dtype "
            f"{_brief(original)}"
        )
    if stored != "float16":
        for key in ("scale", "min"):
            value = quantization.get(key)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise CheckpointError(
                    f"{where}: {stored} quantization needs a finite number '{key}', got "
                    f"{_brief(value)}"
                )
    return _QUANTIZED[stored][0]


def _string_stop(where: str, group: _Group, offset: int, count: int) -> int:
    """End of a string weight: each value is a little-endian uint32 length, then its bytes."""
    stop = offset
    for _ in range(count):
        head = group.span(stop, stop + _STRING_LENGTH_BYTES)
        if len(head) < _STRING_LENGTH_BYTES:
            raise CheckpointError(f"{where}: string data runs past the end of its shards")
        stop += _STRING_LENGTH_BYTES + int.from_bytes(head, "little")
    return stop


def _tensors(
    laid: list[tuple[_Spec, _Group]], hints: dict[str, WeightFormat]
) -> tuple[dict[str, TensorInfo], dict[str, Callable[[], memoryview]], tuple[str, ...]]:
    """TensorInfos (2-D ones with their stored FC format) and byte loaders; notes for
    dequantized and left-out weights."""
    tensors: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], memoryview]] = {}
    dequantized: Counter[tuple[str, str]] = Counter()
    strings = []
    for spec, group in laid:
        if spec.dtype == "string":
            strings.append(spec.name)
            continue
        # Every 2-D weight carries its stored format: a MatMul's transpose_b, else in_out.
        stored = hints.get(spec.name, WeightFormat.IN_OUT) if len(spec.shape) == 2 else None
        tensors[spec.name] = TensorInfo(spec.name, DTYPES[spec.dtype], spec.shape, stored)
        loaders[spec.name] = _loader(spec, group)
        if spec.quantization is not None:
            dequantized[(spec.quantization["dtype"], spec.dtype)] += 1
    notes = tuple(
        f"dequantized {n} tensor{'s' * (n != 1)} from {q} to {d}"
        for (q, d), n in dequantized.items()
    )
    if strings:
        listed = ", ".join(shown(s) for s in strings[:5]) + (", ..." if len(strings) > 5 else "")
        notes += (f"left out {len(strings)} string tensors (not numeric): {listed}",)
    return tensors, loaders, notes


def _loader(spec: _Spec, group: _Group) -> Callable[[], memoryview]:
    """A zero-copy slice (or a joined copy) for stored weights; a decoder for quantized ones."""
    if spec.quantization is None:
        return lambda: group.span(spec.start, spec.stop)
    return lambda: _dequantize(spec, group.span(spec.start, spec.stop))


def _dequantize(spec: _Spec, raw: memoryview) -> memoryview:
    """Decode like tfjs-core ``decodeWeight``: ``q * scale + min`` in float64, then stored
    as the weight's dtype (int32 rounds halves up, as ``Math.round``); float16 widened."""
    import numpy as np

    quantization = spec.quantization or {}
    stored = np.frombuffer(raw, dtype=_QUANTIZED[quantization["dtype"]][1])
    values = np.empty(stored.size, np.int32 if spec.dtype == "int32" else np.float32)
    for start in range(0, stored.size, _DECODE_CHUNK):
        part = stored[start : start + _DECODE_CHUNK]
        if quantization["dtype"] == "float16":
            values[start : start + _DECODE_CHUNK] = part
            continue
        real = part.astype(np.float64) * quantization["scale"] + quantization["min"]
        values[start : start + _DECODE_CHUNK] = (
            np.floor(real + 0.5) if spec.dtype == "int32" else real
        )
    return memoryview(values.view(np.uint8))


def _matmul_hints(graph: dict[str, Any] | None) -> dict[str, WeightFormat]:
    """Per-weight FC formats from a graph model's MatMul nodes (``transpose_b``)."""
    topology = (graph or {}).get("modelTopology")
    nodes = topology.get("node") if isinstance(topology, dict) else None
    hints: dict[str, WeightFormat] = {}
    for node in nodes if isinstance(nodes, list) else ():
        if not isinstance(node, dict) or node.get("op") not in _MATMUL_OPS:
            continue
        inputs = node.get("input")
        if not isinstance(inputs, list) or len(inputs) < 2 or not isinstance(inputs[1], str):
            continue
        attr: dict[str, Any] = node["attr"] if isinstance(node.get("attr"), dict) else {}
        flag = attr.get("transpose_b")
        transposed = isinstance(flag, dict) and flag.get("b") is True
        weight = re.sub(r":0$", "", inputs[1])
        hints[weight] = WeightFormat.OUT_IN if transposed else WeightFormat.IN_OUT
    return hints


def _brief(value: Any) -> str:
    """A bounded one-line repr of a value from the file, for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
