"""Write the planned tensors as ``.safetensors``: atomically, deterministically, in bounded memory.

The file is staged as a hidden temp file in the target folder and only published (renamed
into place) after the caller's checks pass; on any failure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from fc2conv_cli.errors import OutputError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.plan import Plan, PlannedTensor
from fc2conv_cli.readers import Checkpoint

__all__ = [
    "CHUNK_BYTES",
    "StagedFile",
    "check_output_path",
    "remove_temp_files",
    "write_safetensors",
    "write_text",
]

# Bytes are copied and converted in pieces of this size, so memory stays flat whatever
# the checkpoint's size; 8 MiB is large enough that per-call overhead is negligible.
CHUNK_BYTES = 8 << 20


@dataclass
class StagedFile:
    """The output's data, written under a temporary name beside ``target``.

    Its header holds a placeholder digest until ``seal``; the data is already flushing to
    disk in the background, so checks can read it meanwhile. Then ``publish``.
    """

    temp: Path
    target: Path
    nbytes: int
    _fd: int | None
    _seal_header: Callable[[str], bytes]
    _flushing: Future[None]

    def seal(self, source_sha256: str) -> None:
        """Write the final header with the source's digest and make the file durable."""
        header = self._seal_header(source_sha256)
        try:
            os.pwrite(self._fd, header, 0)
            self._flushing.result()
            os.fsync(self._fd)
        except OSError as exc:
            left = self.discard()
            raise OutputError(f"{self.target}: cannot write: {exc.strerror or exc}{left}") from None
        os.close(self._fd)
        self._fd = None

    def publish(self, overwrite: bool) -> None:
        """Move the sealed file into place atomically; without ``overwrite`` never replace one."""
        if self._fd is not None:
            raise ValueError("seal() the staged file before publishing it")
        try:
            if overwrite:
                os.replace(self.temp, self.target)
            else:
                # link() fails if the target exists, even one created a moment ago.
                os.link(self.temp, self.target)
                os.unlink(self.temp)
            _fsync_dir(self.target.parent)
        except OSError as exc:
            reason = (
                "already exists; pass --force to replace it"
                if isinstance(exc, FileExistsError)
                else f"cannot publish: {exc.strerror or exc}"
            )
            raise OutputError(f"{self.target}: {reason}{self.discard()}") from None

    def discard(self) -> str:
        """Close and remove the temp file if it is still there; never raises.

        Returns "" or, when the file cannot be removed (a folder made read-only), a note
        naming it, for the caller's message.
        """
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._flushing.result()
            os.close(self._fd)
            self._fd = None
        return _remove(self.temp)


def check_output_path(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse an output that would overwrite the input, clobber a file, or cannot be written."""
    if target.suffix.lower() != ".safetensors":
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
    plan: Plan, checkpoint: Checkpoint, target: Path, metadata: Mapping[str, str]
) -> StagedFile:
    """Write ``plan`` to a temp file beside ``target``; returns it staged, not published.

    ``metadata`` goes into ``__metadata__``; ``source_sha256`` is added by ``seal`` (the
    digest of a large input may still be computing while the data is written and checked).
    Raises ``OutputError`` on any OS error; the temp file is removed on every failure.
    """

    def header(source_sha256: str) -> bytes:
        if len(source_sha256) != 64:
            raise ValueError("source_sha256 must be a 64-character hex digest")
        return _header(plan, {**metadata, "source_sha256": source_sha256})

    temp = _temp_path(target)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OutputError(
            f"{target}: cannot create a file in {target.parent}: {exc.strerror}"
        ) from None
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(header("0" * 64))
            for planned in plan.tensors:
                _write_tensor(file, planned, checkpoint)
            size = file.tell()
    except OSError as exc:
        os.close(fd)
        left = _remove(temp)
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}{left}") from None
    except BaseException:
        os.close(fd)
        _remove(temp)
        raise
    return StagedFile(temp, target, size, fd, header, _flush_in_background(fd))


def write_text(target: Path, text: str, overwrite: bool) -> None:
    """Write a small text file (a suggested map) atomically; never clobber without overwrite."""
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --force to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: output folder {target.parent} does not exist")
    temp = _temp_path(target)
    try:
        with open(temp, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except OSError as exc:
        left = _remove(temp)
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}{left}") from None


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
    import numpy as np  # only here: a plain copy never needs numpy

    # A strided view of the output in its stored order, read through the memory map;
    # an in_out kernel is read column-wise.
    weight = checkpoint.array(planned.source)
    rows = weight if conversion.weight_format is WeightFormat.OUT_IN else weight.T
    filters = conversion.layout.fc_rows_to_conv(rows, conversion.in_channels, conversion.kernel)
    stored = filters.transpose(conversion.conv_format.from_oihw(len(conversion.kernel)))
    # Copy it in pieces of at most CHUNK_BYTES: slices along the first axis that is not
    # too large on its own, under every index of the axes before it.
    sizes = [math.prod(stored.shape[a:]) * stored.itemsize for a in range(stored.ndim + 1)]
    axis = next(a for a in range(stored.ndim) if sizes[a + 1] <= CHUNK_BYTES)
    step = max(1, CHUNK_BYTES // sizes[axis + 1])
    buffer = np.empty((min(step, stored.shape[axis]), *stored.shape[axis + 1 :]), stored.dtype)
    for outer in np.ndindex(*stored.shape[:axis]):
        part = stored[outer]
        for start in range(0, part.shape[0], step):
            chunk = buffer[: len(part[start : start + step])]  # one buffer keeps memory flat
            np.copyto(chunk, part[start : start + step])
            file.write(chunk.reshape(-1).view(np.uint8))


def _flush_in_background(fd: int) -> Future[None]:
    """Start writing the data to disk while the caller checks it (fdatasync drops the GIL)."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            os.fdatasync(fd)
            future.set_result(None)
        except BaseException as exc:  # handed to seal(), which reports it
            future.set_exception(exc)

    threading.Thread(target=run, name="fc2conv-flush", daemon=True).start()
    return future


def _temp_path(target: Path) -> Path:
    """A fresh hidden temp name beside ``target``: ``.NAME.TOKEN.tmp``."""
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def remove_temp_files(target: Path) -> None:
    """Remove temp files that a killed writer left for ``target``."""
    for temp in target.parent.glob(f".{target.name}.*.tmp"):
        _remove(temp)


def _remove(path: Path) -> str:
    """Remove ``path`` if present; "" on success, else a note naming what was left."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"; could not remove the temp file {path}: {exc.strerror or exc}"
    return ""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
