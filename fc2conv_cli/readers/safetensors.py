"""``.safetensors``: the header parsed and validated by our own code, the data memory-mapped."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from pathlib import Path
from typing import BinaryIO

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.readers.base import DTYPE_BITS, Loaded, TensorInfo, tensor_nbytes

__all__ = ["MAX_HEADER_BYTES", "read", "read_metadata"]

# The safetensors format caps its JSON header at 100 MB; a larger claim is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Parse and validate the header; map the file; hand out slices of the data buffer."""
    with open(path, "rb") as file:
        header, header_len = _read_header(path, file)
        data_len = os.fstat(file.fileno()).st_size - 8 - header_len
        tensors, spans = _validate_header(header, data_len, f"{path}: not a valid safetensors file")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        fd = os.dup(file.fileno())  # the same open file as the map, for in-kernel copies
    view = memoryview(mapped)
    start = 8 + header_len
    buffers = {name: view[start + a : start + b] for name, (a, b) in spans.items()}

    def close() -> None:
        buffers.clear()
        view.release()
        os.close(fd)
        # An array may still view the map; it is then unmapped when that array is freed.
        with contextlib.suppress(BufferError):
            mapped.close()

    offsets = {name: start + a for name, (a, _) in spans.items()}
    return Loaded("safetensors", tensors, buffers, (), close, file_fd=fd, file_offsets=offsets)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading and validating its header only."""
    with open(path, "rb") as file:
        header, _ = _read_header(path, file)
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _read_header(path: Path, file: BinaryIO) -> tuple[dict, int]:
    """Parse and validate the JSON header at the start of ``file``; returns it and its length."""
    size = os.fstat(file.fileno()).st_size
    bad = f"{path}: not a valid safetensors file"
    if size < 8:
        raise CheckpointError(f"{bad}: {size} bytes is too short for the 8-byte header length")
    header_len = int.from_bytes(file.read(8), "little")
    if header_len > min(size - 8, MAX_HEADER_BYTES):
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


def _validate_header(
    header: dict, data_len: int, bad: str
) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Check every entry like safetensors does: known dtype, sizes, contiguous offsets."""
    tensors: dict[str, TensorInfo] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad}: tensor {name!r}: malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BITS:
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
        try:
            nbytes = tensor_nbytes(dtype, tuple(shape))
        except ValueError as exc:
            raise CheckpointError(f"{bad}: tensor {name!r}: {exc}") from None
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{bad}: tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                f"but {dtype} {shape} needs {nbytes}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape))
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
    return tensors, spans
