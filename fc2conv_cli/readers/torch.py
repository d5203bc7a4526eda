"""PyTorch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``), read as data only.

``torch.load(weights_only=True)``, memory-mapped for zip files: code in a pickle is never
run, and a pickle that asks for anything but tensors and containers is refused, naming
what it asked for.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.readers.base import Loaded, TensorInfo, import_extra

__all__ = [
    "WRAPPER_KEYS",
    "loaded_from_tensors",
    "read",
    "state_dict_names",
    "torch_dtype",
    "unwrap_state_dict",
]

# Keys under which training checkpoints nest their state dict, in the order tried.
WRAPPER_KEYS = (
    ("state_dict", "Lightning and most training loops"),
    ("model_state_dict", "common training-script convention"),
    ("model", "timm / DeiT training checkpoints"),
)
# torch dtypes by name -> safetensors code; looked up with getattr, since older torch
# versions lack some (uint16/32/64 came in 2.3, float8_e8m0fnu later), as safetensors'
# own torch.py does.
_DTYPE_CODES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "int64": "I64", "uint64": "U64", "float64": "F64",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}  # fmt: skip


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Load a torch checkpoint safely; unwrap a nested state dict; expose tensors' bytes."""
    import pickle

    torch = import_extra("torch", path, "torch")
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
    state, notes = unwrap_state_dict(path, obj, state_dict_key, torch.Tensor)
    return loaded_from_tensors(path, state_dict_names(path, state), notes)


def loaded_from_tensors(
    path: Path, state: Mapping[str, Any], notes: tuple[str, ...] = ()
) -> Loaded:
    """A ``Loaded`` over torch tensors by name (a file's state dict, or one in memory).

    Entries that are not tensors are left out, with a note; the bytes are the tensors'
    own (CPU, contiguous), not copies where avoidable. Raises ``CheckpointError`` for a
    tensor safetensors cannot store, or when no tensor is left.
    """
    torch = import_extra("torch", path, "torch")
    codes = {getattr(torch, n): c for n, c in _DTYPE_CODES.items() if hasattr(torch, n)}
    tensors: dict[str, TensorInfo] = {}
    buffers: dict[str, Any] = {}
    left_out = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            left_out.append(name)
            continue
        code = codes.get(value.dtype)
        if code is None or value.layout != torch.strided or value.is_quantized:
            raise CheckpointError(
                f"{path}: tensor {name!r}: {value.dtype} ({value.layout}) cannot be stored in "
                "safetensors"
            )
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        tensors[name] = TensorInfo(name, code, tuple(value.shape))
        buffers[name] = data.data
    if left_out:
        notes += (f"left out {len(left_out)} non-tensor entries: {', '.join(left_out)}",)
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the checkpoint")
    return Loaded("torch", tensors, buffers, notes, buffers.clear)


def torch_dtype(code: str) -> Any:
    """The torch dtype of a safetensors dtype code; ``ValueError`` if torch has none."""
    import torch

    for name, known in _DTYPE_CODES.items():
        if known == code and hasattr(torch, name):
            return getattr(torch, name)
    raise ValueError(f"torch {torch.__version__} has no dtype for {code}")


def state_dict_names(path: Path, state: Mapping) -> dict[str, Any]:
    """The state dict with string names; refuses keys that are neither str nor int, and
    keys that collide once written as strings (``1`` and ``"1"``)."""
    named: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for key, value in state.items():
        if type(key) not in (str, int):
            raise CheckpointError(
                f"{path}: key {key!r} is a {type(key).__name__}; tensor names must be strings"
            )
        name = str(key)
        if name in named:
            first, second = sorted((keys[name], key), key=lambda k: isinstance(k, str))
            raise CheckpointError(
                f"{path}: keys {first!r} and {second!r} are both named {name!r} once written; "
                "rename one"
            )
        named[name], keys[name] = value, key
    return named


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


def unwrap_state_dict(
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
