"""Open a checkpoint of any supported format as one ``Checkpoint``.

One module per format (safetensors, torch, keras, onnx, caffe, tfjs, numpy), each with one
function ``read(path, state_dict_key) -> Loaded``, its library imported only when that
format is read. ``detect`` picks the module from the content, then the suffix.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.readers.base import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    Checkpoint,
    Loaded,
    TensorInfo,
    loaded_from_arrays,
    numpy_dtype,
    tensor_nbytes,
)
from fc2conv_cli.readers.detect import FORMATS, detect_format

__all__ = [
    "DTYPE_BITS",
    "FLOAT_DTYPES",
    "FORMATS",
    "PREFIXES",
    "Checkpoint",
    "Loaded",
    "TensorInfo",
    "detect_format",
    "loaded_from_arrays",
    "numpy_dtype",
    "open_checkpoint",
    "open_loaded",
    "open_safetensors",
    "read_safetensors_metadata",
    "tensor_nbytes",
]

# Prefixes that wrap every name of a checkpoint saved from a wrapped model; stripped only
# when every tensor name has one, and reported.
PREFIXES = (
    ("module.", "saved from DataParallel / DistributedDataParallel"),
    ("_orig_mod.", "saved from a torch.compile'd model"),
)
# The one name the safetensors format reserves (for its metadata).
_RESERVED_NAMES = ("__metadata__",)


def open_checkpoint(
    path: Path,
    strip_prefixes: tuple[str, ...] = (),
    state_dict_key: str | None = None,
    format: str | None = None,
) -> Checkpoint:
    """Open a checkpoint; raises ``CheckpointError`` with a one-line reason.

    ``format`` overrides detection (``--format``). ``strip_prefixes`` are removed from
    every name that starts with them (in order); ``state_dict_key`` picks the nested state
    dict of a training checkpoint.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable (permission denied)")
    kind = detect_format(path, format)
    reader = importlib.import_module(f"fc2conv_cli.readers.{kind}")
    loaded: Loaded = reader.read(path, state_dict_key)
    return open_loaded(path, loaded, strip_prefixes)


def open_loaded(path: Path, loaded: Loaded, strip_prefixes: tuple[str, ...] = ()) -> Checkpoint:
    """The ``Checkpoint`` over what a reader found (or ``loaded_from_arrays`` built from
    tensors in memory): prefixes stripped as ``open_checkpoint`` does, names checked.

    ``path`` names the source in messages. Raises ``CheckpointError`` (and closes
    ``loaded``).
    """
    try:
        renamed, strip_notes = _strip_prefixes(path, list(loaded.tensors), strip_prefixes)
        _refuse_unstorable_names(path, list(renamed.values()))
    except CheckpointError:
        loaded.close()
        raise
    tensors = {
        renamed[n]: TensorInfo(renamed[n], info.dtype, info.shape, info.weight_format)
        for n, info in loaded.tensors.items()
    }
    buffers = _RenamedBuffers(loaded.buffers, {new: old for old, new in renamed.items()})
    return Checkpoint(
        path,
        loaded.format,
        tensors,
        buffers,
        loaded.notes + strip_notes,
        loaded.close,
        loaded.weight_format,
        loaded.graph,
        loaded.file_fd,
        {renamed[n]: offset for n, offset in loaded.file_offsets.items()},
    )


class _RenamedBuffers(Mapping[str, memoryview]):
    """The reader's buffers under the stripped names, looked up (lazily) by the old ones."""

    def __init__(self, buffers: Mapping[str, memoryview], old_names: dict[str, str]) -> None:
        self._buffers = buffers
        self._old = old_names

    def __getitem__(self, name: str) -> memoryview:
        return self._buffers[self._old[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._old)

    def __len__(self) -> int:
        return len(self._old)


def open_safetensors(path: Path) -> Checkpoint:
    """Open a file known to be safetensors whatever its name (e.g. a staged temp file)."""
    from fc2conv_cli.readers import safetensors

    loaded = safetensors.read(path)
    return Checkpoint(
        path,
        "safetensors",
        loaded.tensors,
        loaded.buffers,
        (),
        loaded.close,
        file_fd=loaded.file_fd,
        file_offsets=loaded.file_offsets,
    )


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading and validating its header only."""
    from fc2conv_cli.readers import safetensors

    return safetensors.read_metadata(path)


def _refuse_unstorable_names(path: Path, names: list[str]) -> None:
    """Refuse names a safetensors file cannot hold: the reserved one, empty, or not UTF-8."""
    for name in names:
        if name in _RESERVED_NAMES:
            raise CheckpointError(
                f"{path}: a tensor is named {name!r}, which safetensors reserves for its "
                "metadata; rename it in the source"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{path}: tensor name {name!r} is not valid UTF-8 text") from None
        if not name:
            raise CheckpointError(f"{path}: a tensor has an empty name")


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
