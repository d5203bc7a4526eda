"""Keras checkpoints: Keras 2 and legacy Keras 3 ``.h5``, Keras 3 ``.weights.h5`` and ``.keras``.

Tensor names are ``LAYER/VAR``: the layer's own name and the variable's name without
``:0`` (``fc1/kernel``, ``bn/moving_mean``); a layer inside a nested model (or a sublayer
of a layer) gets its parent's name and ``/`` in front (``head/fc1/kernel``). The model's
own name never appears. Dense kernels are stored ``(in, out)``: ``WeightFormat.IN_OUT``.

What each file holds (after Keras' ``saving_lib.py`` and ``legacy_h5_format.py``):

- Full-model ``.h5`` (``model.save("x.h5")``, Keras 2 or 3): a ``model_weights`` group with
  a ``layer_names`` attribute; one group per layer with a ``weight_names`` attribute
  (``fc1/kernel:0`` in Keras 2, the variable path ``fc1/kernel`` in Keras 3), each name the
  path of its dataset in that group. The model's config is the ``model_config`` attribute.
- Weights-only Keras 2 ``.h5`` (``save_weights``): the same layer groups at the root.
- Keras 3 ``.weights.h5``: one ``vars`` group per layer, at the path Keras walks to it
  (``layers/dense_1/vars``), its datasets numbered in the layer's variable order. The
  layer's name is the ``vars`` group's ``name`` attribute (Keras >= 3.6), else the config's,
  else the group's own name; the variable names come from the layer's class (from
  ``config.json``, or from the group name, ``dense_1`` -> Dense) and its config.
- ``.keras``: a zip with ``config.json`` and ``model.weights.h5``.

Contiguous, uncompressed datasets are memory-mapped at their offset in the file (inside a
stored ``.keras`` zip member at the member's data offset): no copy. Chunked or compressed
datasets, and a deflated ``model.weights.h5``, are read into memory, and a note says so.
Optimizer state is left out, with a note. Soft and external links, external and virtual
datasets are refused: a checkpoint never makes us read another file.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import mmap
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fc2conv_cli.errors import CheckpointError, shown
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers.base import (
    LazyBuffers,
    Loaded,
    TensorInfo,
    array_dtype_code,
    import_extra,
)

__all__ = ["read"]

_WEIGHTS_MEMBER = "model.weights.h5"
_CONFIG_MEMBER = "config.json"
# Keras 3 walks a Sequential's / Functional's layers under ``layers``; Keras 2.13's
# ``.keras`` format used ``_layer_checkpoint_dependencies`` (saving_lib's H5IOStore.get).
_LAYER_CONTAINERS = ("layers", "_layer_checkpoint_dependencies")
_CONTAINER_KEY = re.compile(r"(layers|_layer_checkpoint_dependencies|container(_\d+)?)")
# Top-level state that is not a layer's: the optimizer's slots and counters.
_NOT_LAYERS = ("optimizer",)
# Keras' own guard against "shape bombs" (saving_lib.safe_get_h5_dataset): a dataset that
# declares far more bytes than it stores would make us allocate them all.
_BOMB_FLOOR_BYTES = 1 << 32
_MAX_EXPANSION = 1000

# Each layer class's variables in the order ``save_own_variables`` writes them, by the
# class's snake-case name (the group names Keras 3 gives). An entry's option names the
# config key that decides whether the variable exists (None: always).
_Spec = tuple[tuple[str, str | None], ...]
_KERNEL_BIAS: _Spec = (("kernel", None), ("bias", "use_bias"))
_KERNEL_BIAS_CLASSES = (
    "dense", "conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose",
    "conv3d_transpose", "depthwise_conv1d", "depthwise_conv2d",
)  # fmt: skip
_VARIABLES: dict[str, _Spec] = {
    **dict.fromkeys(_KERNEL_BIAS_CLASSES, _KERNEL_BIAS),
    "einsum_dense": (("kernel", None), ("bias", "bias_axes")),
    **{
        cls: (("depthwise_kernel", None), ("pointwise_kernel", None), ("bias", "use_bias"))
        for cls in ("separable_conv1d", "separable_conv2d")
    },
    "batch_normalization": (
        ("gamma", "scale"),
        ("beta", "center"),
        ("moving_mean", None),
        ("moving_variance", None),
        ("moving_stddev", "renorm"),
        ("renorm_mean", "renorm"),
        ("renorm_stddev", "renorm"),
    ),
    "layer_normalization": (("gamma", "scale"), ("beta", "center")),
    "group_normalization": (("gamma", "scale"), ("beta", "center")),
    "rms_normalization": (("scale", None),),
    "embedding": (("embeddings", None),),
    "p_re_lu": (("alpha", None),),
}
# Whether an optional variable exists, given the layer's config (Keras' defaults).
_OPTIONS: dict[str, Callable[[dict], bool]] = {
    "use_bias": lambda c: bool(c.get("use_bias", True)),
    "bias_axes": lambda c: c.get("bias_axes") is not None,
    "scale": lambda c: bool(c.get("scale", True) or c.get("rms_scaling", False)),
    "center": lambda c: bool(c.get("center", True) and not c.get("rms_scaling", False)),
    "renorm": lambda c: bool(c.get("renorm", False)),
}


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Read a Keras checkpoint's variables as ``LAYER/VAR`` tensors.

    ``Loaded.graph`` is the model's config as plain data: ``config.json`` of a ``.keras``
    file, the ``model_config`` attribute of a full-model ``.h5``; None for weights only.
    ``state_dict_key`` does not apply to Keras files and is ignored. Raises
    ``CheckpointError`` for a file that is not a readable Keras checkpoint.
    """
    h5py = import_extra("h5py", path, "keras")
    source = _open_source(path, h5py)
    try:
        return _read_source(path, source, h5py)
    except CheckpointError:
        source.close()
        raise
    # h5py raises OSError, KeyError, ValueError or RuntimeError for a corrupt object
    # inside a file it could open: all of them mean "this file is unreadable".
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        source.close()
        raise CheckpointError(f"{path}: not a readable Keras checkpoint: {_reason(exc)}") from None


@dataclass
class _Source:
    """An open HDF5 file, the bytes it lives in (for memory-mapped reads), and context."""

    h5: Any
    data: memoryview
    config: Any = None
    notes: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Close the HDF5 file, then release the bytes (last registered, first closed)."""
        for closer in reversed(self.closers):
            # A caller may still hold a view of the bytes: they are freed with it.
            with contextlib.suppress(BufferError):
                closer()
        self.closers.clear()


@dataclass(frozen=True)
class _Entry:
    """One variable: its tensor name, its dataset, and where it sits in the file."""

    name: str
    dataset: Any
    where: str


def _open_source(path: Path, h5py: Any) -> _Source:
    """Open the HDF5 data of ``path``: the file itself, or a ``.keras`` zip's weights."""
    with open(path, "rb") as file:
        head = file.read(4)
    if head == b"PK\x03\x04" or path.name.lower().endswith(".keras"):
        return _open_keras_zip(path, h5py)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(
            f"{path}: not a readable HDF5 file (truncated or not HDF5?): {_reason(exc)}"
        ) from None
    source = _Source(h5, memoryview(b""))
    source.data = _map_file(path, source)
    source.closers.append(h5.close)
    return source


def _map_file(path: Path, source: _Source) -> memoryview:
    """Memory-map ``path`` read-only; register its release on ``source``."""
    if os.path.getsize(path) == 0:
        return memoryview(b"")
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)

    def release() -> None:
        view.release()
        mapped.close()

    source.closers.append(release)
    return view


def _open_keras_zip(path: Path, h5py: Any) -> _Source:
    """A ``.keras`` zip: parse ``config.json``, open ``model.weights.h5`` in place."""
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable .keras zip (truncated or corrupt?): {_reason(exc)}"
        ) from None
    with archive:
        if _WEIGHTS_MEMBER not in names:
            found = ", ".join(shown(n) for n in names[:8]) or "nothing"
            raise CheckpointError(
                f"{path}: a zip without {_WEIGHTS_MEMBER}, so not a Keras v3 model "
                f"(it holds {found})"
            )
        config, notes = _zip_config(path, archive, names)
        info = archive.getinfo(_WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            start = _member_data_offset(path, archive, info)
            source = _Source(None, memoryview(b""), config, notes)
            whole = _map_file(path, source)
            if start + info.file_size > len(whole):
                source.close()
                raise CheckpointError(
                    f"{path}: {_WEIGHTS_MEMBER} runs past the end of the zip (truncated)"
                )
            source.data = whole[start : start + info.file_size]
            source.closers.append(source.data.release)
        else:
            source = _Source(None, memoryview(_extract(path, archive, info)), config, notes)
            source.notes.append(
                f"{_WEIGHTS_MEMBER} is compressed in the zip: extracted to memory "
                f"({info.file_size} bytes)"
            )
    try:
        source.h5 = h5py.File(_MemoryFile(source.data), "r")
    except OSError as exc:
        source.close()
        raise CheckpointError(
            f"{path}: {_WEIGHTS_MEMBER} in the zip is not a readable HDF5 file: {_reason(exc)}"
        ) from None
    source.closers.append(source.h5.close)
    return source


def _zip_config(path: Path, archive: zipfile.ZipFile, names: list[str]) -> tuple[Any, list[str]]:
    """The parsed ``config.json`` of a ``.keras`` zip (None, with a note, if it has none)."""
    if _CONFIG_MEMBER not in names:
        return None, [f"no {_CONFIG_MEMBER} in the zip: variable names from the group names"]
    try:
        return json.loads(_extract(path, archive, archive.getinfo(_CONFIG_MEMBER))), []
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: {_CONFIG_MEMBER} is not JSON: {_reason(exc)}") from None


def _extract(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, CRC-checked; a short or corrupt member is a ``CheckpointError``."""
    import zlib

    if info.file_size > _BOMB_FLOOR_BYTES and info.file_size > _MAX_EXPANSION * info.compress_size:
        raise CheckpointError(
            f"{path}: refused: {info.filename} in the zip declares {info.file_size} bytes "
            f"from {info.compress_size} (a zip bomb?)"
        )
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: {info.filename} in the zip is unreadable (truncated or corrupt?): "
            f"{_reason(exc)}"
        ) from None


def _member_data_offset(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header (whose extra field may
    differ from the central directory's, so it is read from the file)."""
    assert archive.fp is not None
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: {info.filename}: bad local zip header (corrupt?)")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


class _MemoryFile(io.RawIOBase):
    """A read-only file over a memoryview, for h5py's file-object driver (no copy)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._pos : self._pos + len(buffer)]
        count = len(chunk)
        memoryview(buffer).cast("B")[:count] = chunk
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _read_source(path: Path, source: _Source, h5py: Any) -> Loaded:
    """Find the variables of the open file and build the ``Loaded`` over them."""
    h5 = source.h5
    graph = source.config
    notes = list(source.notes)
    if "model_weights" in h5:
        group = _group(path, h5py, h5, "model_weights")
        if not _has_list(group, "layer_names"):
            raise CheckpointError(
                f"{path}: an HDF5 file with a model_weights group but no layer_names "
                "attribute: not a Keras checkpoint"
            )
        graph = _model_config(path, h5)
        notes.append(f"Keras full-model .h5 ({_version(group)})")
        entries = _legacy_entries(path, h5py, group)
        if "optimizer_weights" in h5:
            notes.append("left out the optimizer's weights (optimizer_weights)")
    elif _has_list(h5, "layer_names"):
        notes.append(f"Keras weights-only .h5 ({_version(h5)})")
        entries = _legacy_entries(path, h5py, h5)
    elif any(key in h5 for key in (*_LAYER_CONTAINERS, "vars")):
        entries = _v3_entries(path, h5py, h5, _root_config(graph), notes)
    else:
        keys = ", ".join(shown(k) for k in list(h5.keys())[:8]) or "nothing"
        raise CheckpointError(
            f"{path}: an HDF5 file, but not a Keras checkpoint (no model_weights group, "
            f"layer_names attribute or layers group; it holds {keys})"
        )
    return _loaded(path, source, entries, graph, notes)


def _loaded(
    path: Path, source: _Source, entries: list[_Entry], graph: Any, notes: list[str]
) -> Loaded:
    """TensorInfos and lazily bound buffers for ``entries``; notes for what was special."""
    tensors: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], memoryview]] = {}
    places: dict[str, str] = {}
    skipped, in_memory = [], []
    for entry in entries:
        if entry.name in places:
            raise CheckpointError(
                f"{path}: two variables are both named {entry.name!r} "
                f"({shown(places[entry.name])} and {shown(entry.where)})"
            )
        planned = _plan_dataset(path, source, entry)
        if planned is None:
            skipped.append(entry.name)
            continue
        info, loader, mapped = planned
        places[entry.name] = entry.where
        tensors[entry.name] = info
        loaders[entry.name] = loader
        if not mapped:
            in_memory.append(entry.name)
    if skipped:
        notes.append(f"left out {len(skipped)} non-numeric variables: {', '.join(skipped)}")
    if in_memory:
        notes.append(
            f"{len(in_memory)} variables are chunked, compressed or byte-swapped in the HDF5 "
            f"file, read into memory when used: {', '.join(in_memory)}"
        )
    if not tensors:
        source.close()
        raise CheckpointError(f"{path}: a Keras checkpoint without any variables")
    buffers = LazyBuffers(loaders)

    def close() -> None:
        buffers.clear()
        source.close()

    return Loaded("keras", tensors, buffers, tuple(notes), close, WeightFormat.IN_OUT, graph)


def _plan_dataset(
    path: Path, source: _Source, entry: _Entry
) -> tuple[TensorInfo, Callable[[], memoryview], bool] | None:
    """(info, loader, memory-mapped?) for one variable; None for a non-numeric one."""
    import numpy as np

    dataset, name = entry.dataset, entry.name
    where = f"{path}: variable {name!r} ({shown(entry.where)})"
    if dataset.external:
        raise CheckpointError(f"{where}: refused: its data is in another file (external)")
    if dataset.is_virtual:
        raise CheckpointError(f"{where}: refused: a virtual dataset maps other files")
    if dataset.shape is None:
        return None
    shape = tuple(int(d) for d in dataset.shape)
    stored = dataset.dtype
    bfloat16 = stored.kind == "V" and stored.itemsize == 2 and _attr(dataset, "dtype") == "bfloat16"
    swapped = stored.byteorder == (">" if sys.byteorder == "little" else "<")
    native = stored.newbyteorder("=") if swapped else stored
    code = "BF16" if bfloat16 else array_dtype_code(native) if stored.kind in "biufc" else None
    if code is None:
        return None
    nbytes = math.prod(shape) * stored.itemsize
    storage = dataset.id.get_storage_size()
    if nbytes > _BOMB_FLOOR_BYTES and nbytes > _MAX_EXPANSION * storage:
        raise CheckpointError(
            f"{where}: refused: declares {nbytes} bytes but stores {storage} (a shape bomb?)"
        )
    # Every Keras FC weight (a Dense kernel) is stored (in, out), as each tensor says too.
    info = TensorInfo(name, code, shape, WeightFormat.IN_OUT)
    offset = dataset.id.get_offset() if dataset.chunks is None else None
    if nbytes == 0:
        return info, lambda: memoryview(b""), True
    if offset is not None and not swapped and storage == nbytes:
        if offset + nbytes > len(source.data):
            raise CheckpointError(
                f"{where}: its data runs past the end of the file (truncated): needs bytes "
                f"{offset}..{offset + nbytes}, the file has {len(source.data)}"
            )
        return info, lambda: source.data[offset : offset + nbytes], True

    def load() -> memoryview:
        try:
            array = np.empty(shape, dtype=stored)
            if array.size:
                dataset.read_direct(array)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{where}: unreadable (corrupt?): {_reason(exc)}") from None
        if swapped:
            array = array.byteswap().view(native)
        return memoryview(array.reshape(-1).view(np.uint8))

    return info, load, False


# Keras 2 and legacy Keras 3 .h5: layer groups with weight_names attributes.


def _legacy_entries(path: Path, h5py: Any, group: Any) -> list[_Entry]:
    """The variables of a ``layer_names`` / ``weight_names`` group, in the file's order."""
    entries = []
    layers = _string_list(path, group, "layer_names")
    if "top_level_model_weights" in group and "top_level_model_weights" not in layers:
        layers.append("top_level_model_weights")
    for layer in layers:
        layer_group = _group(path, h5py, group, layer)
        for weight in _string_list(path, layer_group, "weight_names"):
            where = f"{layer}/{weight}"
            if weight not in layer_group:
                raise CheckpointError(
                    f"{path}: layer {layer!r} lists weight {weight!r}, which is "
                    "not in the file (truncated or corrupt?)"
                )
            dataset = _dataset(path, h5py, layer_group, weight)
            top = layer == "top_level_model_weights"
            name = _strip_tf_suffix(weight) if top else _legacy_name(layer, weight)
            entries.append(_Entry(name, dataset, where))
    return entries


def _legacy_name(layer: str, weight: str) -> str:
    """``LAYER/VAR`` from a layer group's name and one of its weight names.

    Keras 2 names weights ``fc1/kernel:0`` (a nested model's: ``inner/kernel:0`` in the
    nested model's group), Keras 3 by variable path, which may start with the enclosing
    models' names (``sequential/fc1/kernel``). So: what follows the layer's own name in
    the weight name, or the whole weight name if the layer's name is not in it.
    """
    parts = _strip_tf_suffix(weight).split("/")
    rest = parts[parts.index(layer) + 1 :] if layer in parts[:-1] else parts
    return "/".join([layer, *rest])


def _strip_tf_suffix(name: str) -> str:
    """``fc1/kernel:0`` -> ``fc1/kernel`` (TF's output index, not part of the name)."""
    return re.sub(r":\d+$", "", name)


def _string_list(path: Path, group: Any, name: str) -> list[str]:
    """A list-of-strings attribute as Keras writes it: whole, or split into ``name0``,
    ``name1``, ... when it outgrows HDF5's 64 KB object header."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values = []
        for index in itertools.count():
            if f"{name}{index}" not in group.attrs:
                break
            values.extend(group.attrs[f"{name}{index}"])
    texts = []
    for value in values:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(
                    f"{path}: {group.name}: attribute {name} is not UTF-8 text"
                ) from None
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: {group.name}: attribute {name} is not a list of names")
        texts.append(value)
    return texts


def _has_list(group: Any, name: str) -> bool:
    """Whether ``group`` has the list attribute ``name``, whole or split (``name0``)."""
    return name in group.attrs or f"{name}0" in group.attrs


def _model_config(path: Path, h5: Any) -> Any:
    """The ``model_config`` attribute of a full-model ``.h5``, parsed (None if absent)."""
    raw = h5.attrs.get("model_config")
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: the model_config attribute is not JSON: {_reason(exc)}"
        ) from None


def _version(group: Any) -> str:
    """``keras_version 2.15.0, backend tensorflow`` from a group's attributes, if present."""
    said = []
    for key in ("keras_version", "backend"):
        value = _attr(group, key)
        if value:
            said.append(f"{key} {value}")
    return ", ".join(said) or "no keras_version attribute"


# Keras 3 .weights.h5: numbered variables in vars groups at the saving walk's paths.


def _root_config(graph: Any) -> dict | None:
    """The model's ``{"class_name", "config"}`` from ``config.json``, if it has one."""
    return graph if isinstance(graph, dict) and isinstance(graph.get("config"), dict) else None


def _v3_entries(
    path: Path, h5py: Any, h5: Any, config: dict | None, notes: list[str]
) -> list[_Entry]:
    """The variables of a Keras 3 weights file, named by layer and variable."""
    left_out = [key for key in _NOT_LAYERS if key in h5]
    notes.extend(f"left out the {key}'s variables ({key}/)" for key in left_out)
    positional: list[str] = []
    entries: list[_Entry] = []
    if "vars" in h5:
        # The model's own variables (a subclassed model's add_weight), under its name.
        name = _attr(_group(path, h5py, h5, "vars"), "name") or "model"
        entries += _vars_entries(path, h5py, h5, [name], None, None, positional)
    keys = [key for key in h5 if key != "vars" and key not in left_out]
    entries += _walk(path, h5py, h5, keys, [], config, positional)
    if positional:
        notes.append(
            "variables named by position (the file does not say which is which): "
            + ", ".join(positional)
        )
    return entries


def _walk(
    path: Path,
    h5py: Any,
    group: Any,
    keys: list[str],
    prefix: list[str],
    parent: dict | None,
    positional: list[str],
) -> Iterator[_Entry]:
    """The variables under ``group[key]`` for each key: layers, and lists of layers.

    ``prefix`` holds the names of the enclosing layers; ``parent`` is the enclosing
    model's config (``{"class_name", "config"}``), where each layer's config is found.
    Layers come in the model's order where the config gives it, else in the natural order
    of their group names (``dense``, ``dense_1``, ..., ``dense_10``).
    """
    layers = []
    for key in keys:
        child = _group(path, h5py, group, key)
        if "vars" not in child and _CONTAINER_KEY.fullmatch(key):
            # A list of layers (``layers``, ``container_1``): its items share our parent.
            yield from _walk(path, h5py, child, list(child), prefix, parent, positional)
            continue
        saved_name = _attr(_group(path, h5py, child, "vars"), "name") if "vars" in child else None
        layer_config, order = _layer_config(parent, key, saved_name)
        layers.append((order, key, child, saved_name, layer_config))
    for _, key, child, saved_name, layer_config in sorted(layers, key=lambda layer: layer[0]):
        names = [*prefix, saved_name or _config_name(layer_config) or key]
        if "vars" in child:
            yield from _vars_entries(path, h5py, child, names, layer_config, key, positional)
        inner = [k for k in child if k != "vars"]
        yield from _walk(path, h5py, child, inner, names, layer_config, positional)


def _vars_entries(
    path: Path,
    h5py: Any,
    group: Any,
    names: list[str],
    layer_config: dict | None,
    key: str | None,
    positional: list[str],
) -> list[_Entry]:
    """One layer's numbered variables (``group/vars/0``, ...) named ``LAYER/VAR``."""
    vars_group = _group(path, h5py, group, "vars")
    count = len(vars_group)
    if sorted(vars_group, key=_index) != [str(i) for i in range(count)]:
        raise CheckpointError(
            f"{path}: {shown(vars_group.name)}: variables are not numbered 0..{count - 1}"
        )
    datasets = [_dataset(path, h5py, vars_group, str(i)) for i in range(count)]
    layer = "/".join(names)
    var_names = _variable_names(layer_config, key, names[-1], count)
    if var_names is None:
        var_names = tuple(str(i) for i in range(count))
        positional.extend(f"{layer}/{v}" for v in var_names)
    return [
        _Entry(f"{layer}/{var}", dataset, f"{vars_group.name}/{i}")
        for i, (var, dataset) in enumerate(zip(var_names, datasets, strict=True))
    ]


def _index(key: str) -> int:
    return int(key) if key.isdigit() else -1


def _config_name(layer_config: dict | None) -> str | None:
    name = (layer_config or {}).get("config", {}).get("name")
    return name if isinstance(name, str) else None


def _layer_config(
    parent: dict | None, key: str, saved_name: str | None
) -> tuple[dict | None, tuple]:
    """This layer's ``{"class_name", "config"}`` in the enclosing model's config, and a
    sort key: its place among the model's layers.

    Found by the saved name where the file has one; else by the group name, which Keras 3
    makes from the class (``dense``, ``dense_1``, ... in the model's layer order).
    """
    inner = parent.get("config") if isinstance(parent, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    used: dict[str, int] = {}
    for position, layer in enumerate(layers if isinstance(layers, list) else []):
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            continue
        group_name = _unique_name(_snake_case(str(layer.get("class_name", ""))), used)
        if group_name == key if saved_name is None else saved_name == _config_name(layer):
            return layer, (0, position)
    return None, _natural(key)


def _natural(key: str) -> tuple:
    """Sort key after every layer the config places: the name, numbers as numbers."""
    return (1, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)])


def _unique_name(name: str, used: dict[str, int]) -> str:
    """saving_lib._get_unique_name: ``dense``, then ``dense_1``, ``dense_2``, ..."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: ``BatchNormalization`` -> ``batch_normalization``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _variable_names(
    layer_config: dict | None, key: str | None, name: str, count: int
) -> tuple[str, ...] | None:
    """The layer's variable names in saving order, or None if they cannot be known.

    The class comes from the config, else from the group name or the layer's name
    (``dense_3``); optional variables from the config's flags, or, without a config, from
    the count when exactly one choice of them fits.
    """
    if layer_config is not None:
        spec = _VARIABLES.get(_snake_case(str(layer_config.get("class_name", ""))))
        if spec is None:
            return None
        options = layer_config["config"]
        chosen = tuple(v for v, opt in spec if opt is None or _OPTIONS[opt](options))
        return chosen if len(chosen) == count else None
    for candidate in (key, name):
        spec = _VARIABLES.get(re.sub(r"_\d+$", "", candidate or ""))
        if spec is not None:
            break
    else:
        return None
    optional = sorted({opt for _, opt in spec if opt is not None})
    fits = []
    for present in itertools.product((True, False), repeat=len(optional)):
        on = {opt for opt, flag in zip(optional, present, strict=True) if flag}
        chosen = tuple(v for v, opt in spec if opt is None or opt in on)
        if len(chosen) == count:
            fits.append(chosen)
    return fits[0] if len(fits) == 1 else None


# HDF5 access that refuses links (a checkpoint must not make us open other files).


def _group(path: Path, h5py: Any, parent: Any, key: str) -> Any:
    """``parent[key]`` as a group; links and non-groups are refused."""
    _refuse_link(path, h5py, parent, key)
    item = parent[key]
    if not isinstance(item, h5py.Group):
        raise CheckpointError(
            f"{path}: {shown(item.name)} is a {type(item).__name__}, expected a group (corrupt?)"
        )
    return item


def _dataset(path: Path, h5py: Any, parent: Any, key: str) -> Any:
    """``parent[key]`` (a path, possibly through subgroups) as a dataset; links refused."""
    parts = key.split("/")
    for part in parts[:-1]:
        parent = _group(path, h5py, parent, part)
    _refuse_link(path, h5py, parent, parts[-1])
    item = parent[parts[-1]]
    if not isinstance(item, h5py.Dataset):
        raise CheckpointError(
            f"{path}: {shown(item.name)} is a {type(item).__name__}, expected a dataset (corrupt?)"
        )
    return item


def _refuse_link(path: Path, h5py: Any, parent: Any, key: str) -> None:
    link = parent.get(key, getlink=True)
    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
        kind = "a soft link" if isinstance(link, h5py.SoftLink) else "an external link"
        raise CheckpointError(
            f"{path}: refused: {shown(parent.name.rstrip('/'))}/{shown(key)} is {kind}; "
            "a Keras checkpoint holds no links"
        )


def _attr(obj: Any, key: str) -> str | None:
    """A string attribute (h5py gives str or bytes), or None."""
    if obj is None or key not in obj.attrs:
        return None
    value = obj.attrs[key]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _reason(exc: BaseException) -> str:
    """An exception's message as one short line."""
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:200]
