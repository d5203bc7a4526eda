"""The SHA-256 of an input file, computed in a thread while the conversion runs.

The digest recorded in an output is provenance, so it must be that of the bytes that were
converted. The file is opened once, here, and hashed from that open file with
``os.pread`` (it never reopens the path, and shares no file offset with anyone); the
caller asks ``same_file`` whether the path its reader opened names that same file, and
``result`` fails if the file changed size or modification time between the start and the
moment it is asked for (a download still being written, say). ``cancel`` stops the
thread at the next block: a failed conversion must not keep reading a large input.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

from fc2conv_cli.errors import CheckpointError

__all__ = ["FileDigest", "sha256_in_background"]

# Small enough that a block read into the buffer is still in cache when it is hashed
# (measured: 256 KiB-1 MiB beat 4 MiB and a memory map); large enough that per-call
# overhead is nothing. read(), not a memory map: a mapped file truncated meanwhile
# would kill the process with SIGBUS, and this thread may outlive a failed conversion.
_BLOCK = 1 << 20


class FileDigest:
    """The SHA-256 of one open file, being computed in a daemon thread."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = path
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        try:
            # A caller's open file is hashed through a duplicate, so either may close first.
            self._fd = os.dup(fd) if fd is not None else os.open(path, os.O_RDONLY)
        except OSError as exc:  # the reader reports a missing file better; result() says why
            self._fail(exc)
            return
        try:
            self._stat = os.fstat(self._fd)
        except OSError as exc:
            self._close()
            self._fail(exc)
            return
        self._thread = threading.Thread(target=self._run, name="fc2conv-sha256", daemon=True)
        self._thread.start()

    def result(self) -> str:
        """The hex digest, once computed; raises ``CheckpointError`` if the file could not
        be read or has changed since hashing started, ``CancelledError`` after ``cancel``."""
        self._done.wait()
        if self._error is None and self._digest is not None and self._fd is not None:
            self._check_unchanged()  # up to now: the caller's use of the file is over
            self._close()
        if self._error is not None:
            raise self._error
        if self._digest is None:
            raise CancelledError(f"hashing {self.path} was cancelled")
        return self._digest

    def cancel(self) -> None:
        """Stop hashing at the next block, wait for the thread and close the file; a no-op
        once done."""
        self._cancelled.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    @property
    def started(self) -> bool:
        """False when the file could not even be opened (``result`` says why)."""
        return self._thread is not None

    def same_file(self, path: Path) -> bool:
        """True when ``path`` names the file being hashed (the same inode, not a new file)."""
        if self._thread is None:
            return False
        try:
            now = os.stat(path)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (self._stat.st_dev, self._stat.st_ino)

    def _run(self) -> None:
        try:
            fd = self._fd
            if fd is None:
                raise ValueError("the file is not open")  # _run starts only once it is
            digest = hashlib.sha256()
            buffer = bytearray(_BLOCK)
            view = memoryview(buffer)
            offset = 0
            while not self._cancelled.is_set():
                count = _pread_into(fd, buffer, offset)
                if not count:
                    break
                digest.update(view[:count])  # hashlib releases the GIL for large updates
                offset += count
            else:
                return
            self._digest = digest.hexdigest()
            self._check_unchanged()
        except OSError as exc:
            self._fail(exc)
        except BaseException as exc:  # handed to whoever waits on result()
            self._error = exc
        finally:
            self._done.set()

    def _check_unchanged(self) -> None:
        """Fail the digest if the file's size or modification time moved since the start."""
        if self._fd is None:
            return
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            self._error = CheckpointError(
                f"{self.path}: changed while it was being read (still being written?); "
                "nothing written, convert it again once it is complete"
            )

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fail(self, exc: OSError) -> None:
        self._error = CheckpointError(f"{self.path}: cannot read: {exc.strerror or exc}")
        self._done.set()


def sha256_in_background(path: Path, fd: int | None = None) -> FileDigest:
    """Start hashing ``path`` (or the caller's open file ``fd``, named ``path``) in a thread."""
    return FileDigest(path, fd)


def _pread_into(fd: int, buffer: bytearray, offset: int) -> int:
    """Read into ``buffer`` at ``offset`` of ``fd`` without moving any file offset."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)
