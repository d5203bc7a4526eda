"""Read checkpoints: ``.safetensors`` lazily through a memory map, torch files safely.

An opened ``Checkpoint`` knows every tensor's name, dtype and shape up front and hands
out each tensor's bytes on demand, without copying: pages of the input are file-backed
page cache, not process memory. Torch is imported only to read a torch-format file.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv_cli.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DTYPE_SIZES",
    "PREFIXES",
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "WRAPPER_KEYS",
    "Checkpoint",
    "TensorInfo",
    "numpy_dtype",
    "open_checkpoint",
    "open_safetensors",
    "read_safetensors_metadata",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors dtype codes and their item sizes in bytes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = ("F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64")

# Prefixes that wrap every name of a checkpoint saved from a wrapped model; stripped only
# when every tensor name has one, and reported.
PREFIXES = (
    ("module.", "saved from DataParallel / DistributedDataParallel"),
    ("_orig_mod.", "saved from a torch.compile'd model"),
)
# Keys under which training checkpoints nest their state dict, in the order tried.
WRAPPER_KEYS = (
    ("state_dict", "Lightning and most training loops"),
    ("model_state_dict", "common training-script convention"),
    ("model", "timm / DeiT training checkpoints"),
)

# The safetensors format caps its JSON header at 100 MB; a larger claim is corrupt or hostile.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name (after prefix stripping), safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype code (``ml_dtypes`` for bfloat16, float8)."""
    # numpy is imported only where arrays are needed: a plain copy never needs it.
    import numpy as np

    if code in ("BF16", "F8_E4M3", "F8_E5M2"):
        import ml_dtypes

        return np.dtype(
            {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2}[code]
        )  # fmt: skip
    return np.dtype(
        {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
         "F16": np.float16, "I32": np.int32, "U32": np.uint32, "F32": np.float32,
         "I64": np.int64, "U64": np.uint64, "F64": np.float64}[code]
    )  # fmt: skip


class Checkpoint:
    """An opened checkpoint: ``tensors`` (name -> TensorInfo, in source order) and bytes.

    ``notes`` say what was unwrapped, stripped or left out on the way. Use as a context
    manager, or call ``close``.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        tensors: dict[str, TensorInfo],
        buffers: Mapping[str, memoryview],
        notes: tuple[str, ...],
        closer: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.tensors = tensors
        self.notes = notes
        self._buffers = buffers
        self._closer = closer

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, row-major, as a zero-copy unsigned-byte memoryview."""
        return self._buffers[name]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array of its own dtype and shape (no copy)."""
        import numpy as np

        info = self.tensors[name]
        return np.frombuffer(self.raw(name), dtype=numpy_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        self._buffers = {}
        self._closer()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: Path, strip_prefixes: tuple[str, ...] = (), state_dict_key: str | None = None
) -> Checkpoint:
    """Open a checkpoint by its suffix; raises ``CheckpointError`` with a one-line reason.

    ``strip_prefixes`` are removed from every name that starts with them (in order);
    ``state_dict_key`` picks the nested state dict of a torch checkpoint.
    """
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        known = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r}; expected {known}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable (permission denied)")
    if suffix in SAFETENSORS_SUFFIXES:
        names, buffers, notes, closer = _read_safetensors(path)
    else:
        names, buffers, notes, closer = _read_torch(path, state_dict_key)
    try:
        renamed, strip_notes = _strip_prefixes(path, list(names), strip_prefixes)
    except CheckpointError:
        closer()
        raise
    tensors = {renamed[n]: TensorInfo(renamed[n], *names[n]) for n in names}
    return Checkpoint(
        path,
        "safetensors" if suffix in SAFETENSORS_SUFFIXES else "torch",
        tensors,
        {renamed[n]: buffers[n] for n in names},
        notes + strip_notes,
        closer,
    )


def open_safetensors(path: Path) -> Checkpoint:
    """Open a file known to be safetensors whatever its name (e.g. a staged temp file)."""
    names, buffers, notes, closer = _read_safetensors(path)
    tensors = {n: TensorInfo(n, *names[n]) for n in names}
    return Checkpoint(path, "safetensors", tensors, buffers, notes, closer)


_Index = dict[str, tuple[str, tuple[int, ...]]]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading and validating its header only."""
    with open(path, "rb") as file:
        header, _ = _read_header(path, file)
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _read_header(path: Path, file) -> tuple[dict, int]:
    """Parse and validate the JSON header at the start of ``file``; returns it and its length."""
    size = os.fstat(file.fileno()).st_size
    bad = f"{path}: not a valid safetensors file"
    if size < 8:
        raise CheckpointError(f"{bad}: {size} bytes is too short for the 8-byte header length")
    header_len = int.from_bytes(file.read(8), "little")
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{bad}: header length {header_len} runs past the end of the "
            f"{size}-byte file (truncated or corrupt)"
        )
    try:
        header = json.loads(file.read(header_len).decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{bad}: header is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{bad}: header is not JSON ({exc.msg})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: header is not a JSON object")
    return header, header_len


def _read_safetensors(path: Path) -> tuple[_Index, dict[str, memoryview], tuple, Callable]:
    """Parse and validate the header; map the file; hand out slices of the data buffer."""
    with open(path, "rb") as file:
        header, header_len = _read_header(path, file)
        data_len = os.fstat(file.fileno()).st_size - 8 - header_len
        index, spans = _validate_header(header, data_len, f"{path}: not a valid safetensors file")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    start = 8 + header_len
    buffers = {name: view[start + a : start + b] for name, (a, b) in spans.items()}

    def close() -> None:
        buffers.clear()
        view.release()
        # An array may still view the map; it is then unmapped when that array is freed.
        with contextlib.suppress(BufferError):
            mapped.close()

    return index, buffers, (), close


def _validate_header(header: dict, data_len: int, bad: str) -> tuple[_Index, dict]:
    """Check every entry like safetensors does: known dtype, sizes, contiguous offsets."""
    index: _Index = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad}: tensor {name!r}: malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{bad}: tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{bad}: tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{bad}: tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{bad}: tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                f"but {dtype} {shape} needs {nbytes}"
            )
        index[name] = (dtype, tuple(shape))
        spans[name] = (offsets[0], offsets[1])
    end = 0
    for name, (start, stop) in sorted(spans.items(), key=lambda item: item[1]):
        if start != end:
            what = "overlap" if start < end else "leave a hole"
            raise CheckpointError(f"{bad}: tensor {name!r}: data offsets {what} at byte {end}")
        end = stop
    if end != data_len:
        state = "truncated" if end > data_len else "trailing bytes"
        raise CheckpointError(
            f"{bad}: tensors need {end} data bytes, the file has {data_len} ({state})"
        )
    return index, spans


def _read_torch(path: Path, state_dict_key: str | None):
    """``torch.load(weights_only=True)``, memory-mapped for zip files; never unpickles code."""
    import pickle

    import torch

    mmap_ok = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except pickle.UnpicklingError as exc:
        blocked = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if blocked:
            raise CheckpointError(
                f"{path}: refused: the pickle is not plain weights (weights_only=True blocked "
                f"{', '.join(dict.fromkeys(blocked))}); re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from None
        found = re.search(
            r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(exc), re.S
        )
        reason = " ".join((found.group(1) if found else str(exc)).split())[:200]
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {reason}"
        ) from None
    # torch.load raises no documented set of exceptions on corrupt input (RuntimeError from
    # the zip reader, EOFError, ValueError, ...): every one means "this file is unreadable".
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {reason[:200]}"
        ) from None
    if mmap_ok:
        _check_zip_entries(path, obj, torch.Tensor)
    state, notes = _unwrap(path, obj, state_dict_key, torch.Tensor)
    index: _Index = {}
    buffers: dict[str, memoryview] = {}
    left_out = []
    dtype_codes = _torch_dtype_codes(torch)
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            left_out.append(str(name))
            continue
        code = dtype_codes.get(value.dtype)
        if code is None or value.layout != torch.strided or value.is_quantized:
            raise CheckpointError(
                f"{path}: tensor {name!r}: {value.dtype} ({value.layout}) cannot be stored in "
                "safetensors"
            )
        data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        index[str(name)] = (code, tuple(value.shape))
        buffers[str(name)] = data.data
    if left_out:
        notes += (f"left out {len(left_out)} non-tensor entries: {', '.join(left_out)}",)
    if not index:
        raise CheckpointError(f"{path}: no tensors found in the checkpoint")
    return index, buffers, notes, buffers.clear


def _check_zip_entries(path: Path, obj: Any, tensor_type: type) -> None:
    """Refuse a torch zip whose data entries do not hold every storage in full.

    A memory-mapped ``torch.load`` trusts the sizes in the pickle: a truncated entry would
    silently read the bytes that follow it. So the storages' sizes must add up to the
    stored (uncompressed) data entries' sizes.
    """
    with zipfile.ZipFile(path) as archive:
        entries = [e for e in archive.infolist() if re.search(r"(^|/)data/\d+$", e.filename)]
    storages: dict[int, int] = {}
    for tensor in _tensors_in(obj, tensor_type):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    needed, held = sum(storages.values()), sum(e.file_size for e in entries)
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if needed != held or compressed:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): its tensors "
            f"need {needed} bytes of data, its data entries hold {held}"
            + (f" (compressed: {', '.join(compressed)})" if compressed else "")
        )


def _tensors_in(obj: Any, tensor_type: type) -> list:
    """Every tensor in a loaded checkpoint's nested dicts, lists and tuples."""
    found, pending, seen = [], [obj], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, tensor_type):
            found.append(item)
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return found


def _torch_dtype_codes(torch: Any) -> dict:
    return {
        torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
        torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.int64: "I64",
        torch.uint64: "U64", torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip


def _unwrap(
    path: Path, obj: Any, state_dict_key: str | None, tensor_type: type
) -> tuple[Mapping, tuple[str, ...]]:
    """Find the state dict inside a training checkpoint; say what was unwrapped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)"
        )
    if state_dict_key is not None:
        if not isinstance(obj.get(state_dict_key), Mapping):
            keys = ", ".join(map(str, obj)) or "none"
            raise CheckpointError(
                f"{path}: state_dict_key {state_dict_key!r} is not a dict in this checkpoint; "
                f"top-level keys: {keys}"
            )
        key = state_dict_key
    elif any(isinstance(v, tensor_type) for v in obj.values()):
        return obj, ()
    else:
        found = [k for k, _ in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(found) != 1:
            keys = ", ".join(map(str, obj)) or "none"
            why = "several nested state dicts" if found else "no tensors and no nested state dict"
            raise CheckpointError(
                f"{path}: {why} (top-level keys: {keys}); set state_dict_key in the map"
            )
        key = found[0]
    others = [str(k) for k in obj if k != key]
    note = f"unwrapped the nested state dict under {key!r}"
    if others:
        note += f"; left out {', '.join(others)}"
    return obj[key], (note,)


def _strip_prefixes(
    path: Path, names: list[str], explicit: tuple[str, ...]
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Strip the map's prefixes where present; wrapper prefixes only if every name has one."""
    renamed = {name: name for name in names}
    notes = []
    candidates = [(p, "asked for by the map", False) for p in explicit]
    candidates += [(p, why, True) for p, why in PREFIXES if p not in explicit]
    for prefix, why, needs_all in candidates:
        current = list(renamed.values())
        hits = [n for n in current if n.startswith(prefix)]
        if not hits or (needs_all and len(hits) != len(current)):
            continue
        renamed = {k: v.removeprefix(prefix) for k, v in renamed.items()}
        notes.append(f"stripped prefix {prefix!r} from {len(hits)} names ({why})")
    if len(set(renamed.values())) != len(renamed):
        seen: dict[str, str] = {}
        for old, new in renamed.items():
            if new in seen:
                raise CheckpointError(
                    f"{path}: stripping prefixes makes {old!r} and {seen[new]!r} both {new!r}"
                )
            seen[new] = old
    return renamed, tuple(notes)
