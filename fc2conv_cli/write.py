"""Write the planned tensors as ``.safetensors``: atomically, deterministically, in bounded memory.

The file is staged as a hidden temp file in the target folder and only published (renamed
into place) after the caller's checks pass; on any failure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fc2conv_cli.checkpoint import SAFETENSORS_SUFFIXES, Checkpoint
from fc2conv_cli.errors import OutputError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.plan import Plan, PlannedTensor

__all__ = ["CHUNK_BYTES", "StagedFile", "check_output_path", "write_safetensors"]

# Bytes are copied and converted in pieces of this size, so memory stays flat whatever
# the checkpoint's size; 8 MiB is large enough that per-call overhead is negligible.
CHUNK_BYTES = 8 << 20


@dataclass
class StagedFile:
    """A complete, fsynced output under a temporary name beside ``target``."""

    temp: Path
    target: Path
    nbytes: int

    def publish(self, overwrite: bool) -> None:
        """Move the file into place atomically; without ``overwrite`` never replace a file."""
        try:
            if overwrite:
                os.replace(self.temp, self.target)
            else:
                try:
                    # link() fails if the target exists, even one created a moment ago.
                    os.link(self.temp, self.target)
                except FileExistsError:
                    raise OutputError(
                        f"{self.target}: already exists; pass --force to replace it"
                    ) from None
                os.unlink(self.temp)
            _fsync_dir(self.target.parent)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temp file if it is still there."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


def check_output_path(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse an output that would overwrite the input, clobber a file, or cannot be written."""
    if target.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise OutputError(f"{target}: the output must be a .safetensors file")
    if target.resolve() == source.resolve() or (
        target.exists() and source.exists() and os.path.samefile(target, source)
    ):
        raise OutputError(f"{target}: is the input file; choose another output path")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file name ending in .safetensors")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --force to replace it")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: output folder {folder} is not writable")


def write_safetensors(
    plan: Plan,
    checkpoint: Checkpoint,
    target: Path,
    metadata: Mapping[str, str],
    source_sha256: Future[str],
) -> StagedFile:
    """Write ``plan`` to a temp file beside ``target``; returns it staged, not published.

    ``metadata`` goes into ``__metadata__`` together with ``source_sha256`` (a 64-character
    hex digest, awaited only after the data is written so hashing overlaps the copy).
    Raises ``OutputError`` on any OS error; the temp file is removed on every failure.
    """
    placeholder = "0" * 64
    header = _header(plan, {**metadata, "source_sha256": placeholder})
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OutputError(
            f"{target}: cannot create a file in {target.parent}: {exc.strerror}"
        ) from None
    try:
        with open(fd, "wb") as file:
            file.write(bytes(len(header)))
            for planned in plan.tensors:
                _write_tensor(file, planned, checkpoint)
            file.flush()
            final = _header(plan, {**metadata, "source_sha256": source_sha256.result()})
            if len(final) != len(header):
                raise ValueError("source_sha256 must be a 64-character hex digest")
            os.pwrite(file.fileno(), final, 0)
            os.fsync(file.fileno())
            size = file.tell()
    except OSError as exc:
        _remove(temp)
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        _remove(temp)
        raise
    return StagedFile(temp, target, size)


def _header(plan: Plan, metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header, padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for planned in plan.tensors:
        end = offset + planned.nbytes
        entries[planned.name] = {
            "dtype": planned.dtype,
            "shape": list(planned.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_tensor(file, planned: PlannedTensor, checkpoint: Checkpoint) -> None:
    conversion = planned.conversion
    if conversion is None or not conversion.moves_bytes:
        raw = checkpoint.raw(planned.source)
        for start in range(0, len(raw), CHUNK_BYTES):
            file.write(raw[start : start + CHUNK_BYTES])
        return
    # Rows are output filters. An in_out kernel is read column-wise through the memory map.
    weight = checkpoint.array(planned.source)
    rows = weight if conversion.weight_format is WeightFormat.OUT_IN else weight.T
    in_features = rows.shape[1]
    step = max(1, CHUNK_BYTES // (in_features * rows.itemsize))
    for start in range(0, rows.shape[0], step):
        filters = conversion.layout.fc_rows_to_conv(
            rows[start : start + step], conversion.in_channels, conversion.kernel
        )
        file.write(np.ascontiguousarray(filters).reshape(-1).view(np.uint8))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
