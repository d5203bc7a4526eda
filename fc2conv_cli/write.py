"""Write the planned tensors as ``.safetensors``: atomically, deterministically, in bounded memory.

The file is staged as a hidden temp file in the target folder and only published (renamed
into place) after the caller's checks pass and the ``safetensors`` library itself has read
its index back; on any failure (any exception, on any filesystem) nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fc2conv_cli.errors import InternalError, OutputError, shown
from fc2conv_cli.plan import Plan, PlannedTensor
from fc2conv_cli.readers import Checkpoint

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "CHUNK_BYTES",
    "CONVERSION_KEY",
    "CONVERSION_VERSION",
    "StagedFile",
    "check_output_path",
    "check_writable",
    "is_temp_file",
    "remove_temp_files",
    "write_safetensors",
    "write_text",
    "write_to_memory",
]

# Bytes are copied and converted in pieces of this size, so memory stays flat whatever
# the checkpoint's size; 8 MiB is large enough that per-call overhead is negligible.
CHUNK_BYTES = 8 << 20

# Bumped whenever fc2conv writes different bytes for the same input and map (tensor data,
# header layout, metadata keys): `batch` converts outputs of another conversion version
# again, and skips those of the same one whatever fc2conv version wrote them.
# tests/test_write.py pins this version's output bytes.
CONVERSION_VERSION = 1
CONVERSION_KEY = "conversion_version"

# errno values with which link() says "no hard links here" (vfat, exFAT, SMB, FUSE, ...).
_NO_HARD_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "EACCES", "ENOTSUP", "EOPNOTSUPP", "EXDEV", "ENOSYS", "EMLINK", "EINVAL")
    if hasattr(errno, name)
)
# errno values with which fsync() of a folder says "not supported here".
_NO_DIR_SYNC = frozenset(
    getattr(errno, name)
    for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "EBADF", "EACCES", "EPERM", "EISDIR")
    if hasattr(errno, name)
)
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # manifest.TEMP_NAME is the same


@dataclass
class StagedFile:
    """The output's data, written under a temporary name beside ``target``.

    Its header holds a placeholder digest until ``seal``; the data is already flushing to
    disk in the background, so checks can read it meanwhile. Then ``publish``. Every
    method removes the temp file when it fails, whatever the exception.
    """

    temp: Path
    target: Path
    nbytes: int
    _fd: int | None
    _seal_header: Callable[[str], bytes]
    _flushing: Future[None]
    _index: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), as planned
    _metadata: dict[str, str]  # as written by seal

    def seal(self, source_sha256: str) -> None:
        """Write the final header with the source's digest and make the file durable."""
        fd = self._fd
        if fd is None:
            raise ValueError("the staged file is sealed already")
        try:
            header = self._seal_header(source_sha256)
            os.pwrite(fd, header, 0)
            self._flushing.result()
            os.fsync(fd)
            self._fd = None  # before close: a failed close must not be retried on a reused fd
            os.close(fd)
        except OSError as exc:
            left = self.discard()
            raise OutputError(f"{self.target}: cannot write: {exc.strerror or exc}{left}") from None
        except BaseException:
            self.discard()
            raise
        self._metadata["source_sha256"] = source_sha256

    def publish(self, overwrite: bool) -> None:
        """Move the sealed file into place atomically; without ``overwrite`` never replace one.

        First the ``safetensors`` library opens the staged file (a header parse, no tensor
        copies) and its index must equal the plan: a file it refuses is never published.
        """
        try:
            if self._fd is not None:
                raise ValueError("seal() the staged file before publishing it")
            _check_with_safetensors(self.temp, self.target, self._index, self._metadata)
            if overwrite:
                os.replace(self.temp, self.target)
            else:
                _publish_exclusive(self.temp, self.target)
        except OSError as exc:
            reason = (
                "already exists; pass --force to replace it"
                if isinstance(exc, FileExistsError)
                else f"cannot publish: {exc.strerror or exc}"
            )
            raise OutputError(f"{self.target}: {reason}{self.discard()}") from None
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.target)

    def discard(self) -> str:
        """Close and remove the temp file if it is still there; never raises.

        Returns "" or, when the file cannot be removed (a folder made read-only), a note
        naming it, for the caller's message.
        """
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                with contextlib.suppress(Exception):  # its failure is reported elsewhere
                    self._flushing.result()  # never close the fd under a running fdatasync
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            left = _remove(self.temp)
        return left


def check_output_path(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse an output that would overwrite the input, clobber a file, or cannot be written."""
    if target.suffix.lower() != ".safetensors":
        raise OutputError(f"{target}: the output must be a .safetensors file")
    if target.resolve() == source.resolve() or (
        target.exists() and source.exists() and os.path.samefile(target, source)
    ):
        raise OutputError(f"{target}: is the input file; choose another output path")
    check_writable(target, overwrite, ".safetensors")


def check_writable(target: Path, overwrite: bool, suffix: str) -> None:
    """Refuse a target that is a folder, exists (unless ``overwrite``), or whose folder is
    missing or not writable; ``suffix`` is the file name ending the message suggests."""
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file name ending in {suffix}")
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
    progress: Callable[[int], None] | None = None,
) -> StagedFile:
    """Write ``plan`` to a temp file beside ``target``; returns it staged, not published.

    ``metadata`` goes into ``__metadata__`` with ``conversion_version``; ``source_sha256``
    is added by ``seal`` (the digest of a large input may still be computing while the data
    is written and checked). ``progress`` is called with the bytes of each piece of data
    written. Raises ``OutputError`` on any OS error; the temp file is removed on every
    failure, whatever the exception.
    """
    written = {**metadata, CONVERSION_KEY: str(CONVERSION_VERSION)}

    def header(source_sha256: str) -> bytes:
        if len(source_sha256) != 64:
            raise ValueError("source_sha256 must be a 64-character hex digest")
        return _header(plan, {**written, "source_sha256": source_sha256})

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
            out = file if progress is None else _Counted(file, progress)
            for planned in plan.tensors:
                _write_tensor(out, planned, checkpoint)
            size = file.tell()
        flushing = _flush_in_background(fd)
    except OSError as exc:
        os.close(fd)
        left = _remove(temp)
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}{left}") from None
    except BaseException:
        os.close(fd)
        _remove(temp)
        raise
    index = {t.name: (t.dtype, tuple(t.shape)) for t in plan.tensors}
    return StagedFile(temp, target, size, fd, header, flushing, index, dict(written))


def write_to_memory(plan: Plan, checkpoint: Checkpoint) -> Checkpoint:
    """The planned tensors, written as ``write_safetensors`` writes their data, into one
    writable in-memory buffer: a ``Checkpoint`` over it (kind ``safetensors``) that the
    checks read as they read a staged file. No file is written."""
    from fc2conv_cli.readers import TensorInfo

    memory = _MemoryFile(sum(t.nbytes for t in plan.tensors))
    offsets = {}
    for planned in plan.tensors:
        start = memory.offset
        _write_tensor(memory, planned, checkpoint)
        if memory.offset - start != planned.nbytes:
            raise InternalError(
                f"{shown(planned.name)}: wrote {memory.offset - start} bytes, "
                f"planned {planned.nbytes}; this is a bug, please report it"
            )
        offsets[planned.name] = (start, memory.offset)
    tensors = {t.name: TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in plan.tensors}
    buffers = {name: memory.view[a:b] for name, (a, b) in offsets.items()}
    return Checkpoint(Path("<memory>"), "safetensors", tensors, buffers, ())


class _Counted:
    """A file whose writes are reported, by their size, to a progress callback."""

    def __init__(self, file: BinaryIO, progress: Callable[[int], None]) -> None:
        self._file = file
        self._progress = progress

    def write(self, data: Buffer) -> int:
        count = self._file.write(data)
        self._progress(count)
        return count

    @property
    def raw_file(self) -> BinaryIO:
        return self._file

    def report(self, count: int) -> None:
        """``count`` bytes were written past ``write`` (by the kernel)."""
        self._progress(count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)  # flush, fileno, tell: the file's own


class _MemoryFile:
    """A preallocated bytearray that ``_write_tensor`` writes into as into a file."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.offset = 0

    def write(self, data: Buffer) -> int:
        chunk = memoryview(data).cast("B")
        end = self.offset + chunk.nbytes
        self.view[self.offset : end] = chunk
        self.offset = end
        return chunk.nbytes


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
        if overwrite:
            os.replace(temp, target)
        else:
            _publish_exclusive(temp, target)
    except OSError as exc:
        left = _remove(temp)
        reason = (
            "already exists; pass --force to replace it"
            if isinstance(exc, FileExistsError)
            else f"cannot write: {exc.strerror or exc}"
        )
        raise OutputError(f"{target}: {reason}{left}") from None
    except BaseException:
        _remove(temp)
        raise


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


def _copy_in_kernel(file: object, source_fd: int, offset: int, count: int) -> bool:
    """Copy ``count`` bytes at ``offset`` of ``source_fd`` to the end of ``file`` with
    ``copy_file_range``: no page faults on the input's map and no pass through user space
    (VGG16 here: 0.15-0.19 s against 0.17-0.48 s for writes from the map). False, having
    written nothing, where the kernel or the filesystems cannot; the caller then writes
    the bytes itself."""
    if isinstance(file, _Counted):  # a progress bar counts what the kernel copies too
        in_kernel = _copy_in_kernel(file.raw_file, source_fd, offset, count)
        if in_kernel:
            file.report(count)
        return in_kernel
    if not hasattr(os, "copy_file_range") or not isinstance(file, io.BufferedWriter):
        return False  # in memory
    file.flush()
    target, position, done = file.fileno(), file.tell(), 0
    while done < count:
        try:
            copied = os.copy_file_range(
                source_fd, target, count - done, offset + done, position + done
            )
        except OSError as exc:
            if done == 0 and exc.errno in _NO_KERNEL_COPY:
                return False
            raise
        if copied == 0:
            raise OSError(errno.EIO, "the input ended early (truncated while being read?)")
        done += copied
    file.seek(position + count)
    return True


# copy_file_range cannot do it here: across filesystems (old kernels), unsupported.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def _write_tensor(
    file: BinaryIO | _MemoryFile | _Counted, planned: PlannedTensor, checkpoint: Checkpoint
) -> None:
    """One tensor's bytes: the one place that dispatches on the kind of planned tensor."""
    if planned.is_byte_copy:
        raw = checkpoint.raw(planned.source_name)
        span = checkpoint.file_span(planned.source_name)
        if span is not None and _copy_in_kernel(file, *span, len(raw)):
            return
        for start in range(0, len(raw), CHUNK_BYTES):
            file.write(raw[start : start + CHUNK_BYTES])
        return
    import numpy as np  # only here: a plain copy never needs numpy

    from fc2conv_cli.compute import stored_values

    # The output in its stored order: a strided view read through the memory map where
    # values only move (an in_out kernel is read column-wise), else computed per slice.
    stored = stored_values(planned, checkpoint)
    if stored.ndim == 0 or 0 in stored.shape:  # a scalar, or nothing: one piece
        file.write(np.ascontiguousarray(stored[()]).reshape(-1).view(np.uint8))
        finish = getattr(stored, "finish", None)
        if finish is not None:
            finish()
        return
    # Copy it in pieces of at most CHUNK_BYTES: slices along the first axis that is not
    # too large on its own, under every index of the axes before it.
    sizes = [math.prod(stored.shape[a:]) * stored.itemsize for a in range(stored.ndim + 1)]
    axis = next(a for a in range(stored.ndim) if sizes[a + 1] <= CHUNK_BYTES)
    step = max(1, CHUNK_BYTES // sizes[axis + 1])
    buffer = np.empty((min(step, stored.shape[axis]), *stored.shape[axis + 1 :]), stored.dtype)
    for outer in np.ndindex(*stored.shape[:axis]):
        for start in range(0, stored.shape[axis], step):
            part = stored[(*outer, slice(start, start + step))]
            chunk = buffer[: len(part)]  # one buffer keeps memory flat
            np.copyto(chunk, part)
            file.write(chunk.reshape(-1).view(np.uint8))
    finish = getattr(stored, "finish", None)
    if finish is not None:
        finish()  # a cast that overflowed raises here: the temp file is removed


def _flush_in_background(fd: int) -> Future[None]:
    """Start writing the data to disk while the caller checks it (the sync drops the GIL)."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            _sync_data(fd)
            future.set_result(None)
        except BaseException as exc:  # handed to seal(), which reports it
            future.set_exception(exc)

    threading.Thread(target=run, name="fc2conv-flush", daemon=True).start()
    return future


def _sync_data(fd: int) -> None:
    """``fdatasync`` where the platform has it (not macOS, not Windows), else ``fsync``."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


def _check_with_safetensors(
    temp: Path, target: Path, index: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping
) -> None:
    """Open the staged file with the ``safetensors`` library; its index must be the plan's.

    Raises ``InternalError`` (a bug: exit 3) when it refuses the file or reads another
    index or metadata, ``OutputError`` when the installed version is too old for a dtype.
    """
    import safetensors  # its Rust header parser: an independent reader of what we wrote

    try:
        with safetensors.safe_open(str(temp), framework="numpy") as file:
            slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118
            found = {n: (s.get_dtype(), tuple(s.get_shape())) for n, s in slices.items()}
            found_metadata = file.metadata() or {}
    # safetensors raises SafetensorError on a bad file, other types in older versions:
    # whatever it raises here means it refused the file.
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        unknown = re.search(r"unknown variant `([^`]+)`", reason)
        if unknown and unknown.group(1) in {dtype for dtype, _ in index.values()}:
            raise OutputError(
                f"{target}: the installed safetensors {safetensors.__version__} cannot read "
                f"dtype {unknown.group(1)}; upgrade it (pip install -U safetensors); "
                "nothing was published"
            ) from None
        raise InternalError(
            f"{target}: internal error: the safetensors library refuses the file fc2conv "
            f"wrote ({reason[:300]}); nothing was published; this is a bug, please report it"
        ) from None
    differences = _index_differences(dict(index), found)
    if dict(found_metadata) != dict(metadata):
        differences.append("the metadata differs")
    if differences:
        raise InternalError(
            f"{target}: internal error: the safetensors library reads the file fc2conv wrote "
            f"differently from the plan ({'; '.join(differences)[:300]}); nothing was "
            "published; this is a bug, please report it"
        )


def _index_differences(planned: dict, found: dict) -> list[str]:
    """How the index read back differs from the planned one, one phrase per tensor."""
    differences = [f"{shown(n)} is missing" for n in planned if n not in found]
    differences += [f"{shown(n)} is not planned" for n in found if n not in planned]
    for name in planned.keys() & found.keys():
        if planned[name] != found[name]:
            (dtype, shape), (got_dtype, got_shape) = planned[name], found[name]
            differences.append(
                f"{shown(name)}: {got_dtype} {list(got_shape)}, planned {dtype} {list(shape)}"
            )
    return sorted(differences)


def _publish_exclusive(temp: Path, target: Path) -> None:
    """Move ``temp`` to ``target`` only if no ``target`` exists (else ``FileExistsError``).

    ``link`` fails if the target exists, even one created a moment ago. Where the
    filesystem has no hard links, the target name is claimed by creating it exclusively,
    then the temp file is renamed over the (empty) claim; a failed rename removes it.
    """
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _claim_and_replace(temp, target)
        return
    os.unlink(temp)


def _claim_and_replace(temp: Path, target: Path) -> None:
    claim = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        claimed = os.fstat(claim)
    finally:
        os.close(claim)
    try:
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # remove the claim, and only the claim
            now = os.stat(target)
            if (now.st_dev, now.st_ino, now.st_size) == (claimed.st_dev, claimed.st_ino, 0):
                os.unlink(target)
        raise


def _temp_path(target: Path) -> Path:
    """A fresh hidden temp name beside ``target``: ``.NAME.TOKEN.tmp``."""
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def is_temp_file(path: Path) -> bool:
    """True for a name ``_temp_path`` makes: a file being written, or left by a killed one."""
    return _TEMP_NAME.fullmatch(path.name) is not None


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


def _fsync_dir(target: Path) -> None:
    """Make the rename of ``target`` durable, where the filesystem can sync a folder."""
    try:
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in _NO_DIR_SYNC:
            return  # e.g. SMB, some FUSE filesystems, Windows: the rename is all there is
        raise OutputError(
            f"{target}: published, but its folder could not be synced to disk: "
            f"{exc.strerror or exc}"
        ) from None
