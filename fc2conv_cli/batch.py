"""Convert many checkpoints: worker processes, up-to-date skipping, crash isolation.

Every file is converted exactly as ``convert`` would (``pipeline.convert``), in worker
processes that are reused across files (torch is imported once per worker, not once per
file). Workers are started in isolated mode (``python -I``) with the parent's own import
path, so they run the very package the parent runs, never code from the current folder.
A worker that dies (segfault, out of memory) fails its file, not the batch; its temp file
is removed and a new worker takes over.

Outputs are never replaced unless fc2conv wrote them (or ``--force``). One that fc2conv
wrote is up to date, and skipped, when its metadata records this source's SHA-256, this
map's and this ``CONVERSION_VERSION``: so a stopped batch, rerun, finishes the rest.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path

import fc2conv_cli
from fc2conv_cli.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CheckFailed,
    CheckpointError,
    Fc2convError,
)
from fc2conv_cli.layer_map import read_layer_map
from fc2conv_cli.manifest import BatchItem
from fc2conv_cli.pipeline import DEFAULT_ATOL, ConvertOptions, convert
from fc2conv_cli.plan import Plan, build_plan
from fc2conv_cli.readers import open_checkpoint, read_safetensors_metadata, sha256_in_background
from fc2conv_cli.write import CONVERSION_KEY, CONVERSION_VERSION, remove_temp_files

__all__ = ["BatchOptions", "BatchResult", "FileOutcome", "Status", "run_batch", "worker_main"]

# How long stopped workers get to remove their temp files before they are killed.
_STOP_GRACE_S = 10.0

# A worker: `python -I -c _WORKER_CODE FD PATH...`. Isolated mode puts neither the current
# folder nor PYTHON* variables on its import path; it gets the parent's instead (argv).
# SIGINT arrives blocked (see _Worker.start) and is ignored before it is unblocked: Ctrl-C
# is the parent's to handle, which stops the workers with SIGTERM. The worker ends with
# os._exit, as multiprocessing's do: every file is closed, and tearing down an interpreter
# that imported torch takes a second.
_WORKER_CODE = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
sys.path[:] = sys.argv[2:]
from fc2conv_cli.batch import worker_main
worker_main(int(sys.argv[1]))
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


class Status(enum.Enum):
    """What happened to one file."""

    CONVERTED = "converted"
    UP_TO_DATE = "up to date"
    WOULD_CONVERT = "would convert"  # --dry-run
    CHECK_FAILED = "check failed"
    ERROR = "error"
    NOT_STARTED = "not started"  # --fail-fast stopped the batch first

    @property
    def ok(self) -> bool:
        return self in (Status.CONVERTED, Status.UP_TO_DATE, Status.WOULD_CONVERT)


@dataclass(frozen=True)
class BatchOptions:
    """See ``fc2conv batch --help``."""

    jobs: int = 1
    force: bool = False
    dry_run: bool = False
    fail_fast: bool = False
    atol: float = DEFAULT_ATOL
    seed: int = 0


@dataclass(frozen=True)
class FileOutcome:
    """One file's result; ``error`` is a one-line reason for failures."""

    item: BatchItem
    status: Status
    input_bytes: int = 0
    layers: int = 0
    max_abs_diff: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """Every file's outcome, in the items' order."""

    outcomes: tuple[FileOutcome, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.status.ok for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when every file is converted or up to date, 1 when any failed."""
        return EXIT_OK if self.ok else EXIT_CHECK_FAILED


def run_batch(
    items: Sequence[BatchItem],
    options: BatchOptions,
    on_outcome: Callable[[FileOutcome], None] = lambda outcome: None,
) -> BatchResult:
    """Process ``items`` on ``options.jobs`` workers; ``on_outcome`` hears of each file.

    Ctrl-C or SIGTERM in this process (raised here as ``KeyboardInterrupt``) stops the
    workers, which remove their temp files; finished outputs are kept; it is re-raised.
    """
    started = time.perf_counter()
    outcomes: dict[int, FileOutcome] = {}
    pending = deque(enumerate(items))
    pool = _Pool(min(options.jobs, len(items)), options)
    try:
        while pending or pool.busy:
            while pending and pool.has_room():
                pool.submit(*pending.popleft())
            for index, outcome in pool.collect():
                outcomes[index] = outcome
                on_outcome(outcome)
                if options.fail_fast and not outcome.status.ok:
                    for skipped_index, item in pending:
                        outcomes[skipped_index] = FileOutcome(item, Status.NOT_STARTED)
                    pending.clear()
    finally:
        pool.stop()
    ordered = tuple(outcomes[i] for i in range(len(items)))
    return BatchResult(ordered, time.perf_counter() - started)


def process_item(item: BatchItem, options: BatchOptions) -> FileOutcome:
    """Convert one file (or find it up to date); every expected failure becomes an outcome."""
    started = time.perf_counter()
    size = item.input.stat().st_size if item.input.is_file() else 0

    def outcome(status: Status, **fields) -> FileOutcome:
        return FileOutcome(item, status, size, seconds=time.perf_counter() - started, **fields)

    try:
        state, why = (_Output.STALE, "") if options.force else _output_state(item)
        if state is _Output.UP_TO_DATE:
            return outcome(Status.UP_TO_DATE)
        if state is _Output.FOREIGN:
            return outcome(Status.ERROR, error=f"{item.output}: {why}; pass --force to replace it")
        if options.dry_run:  # read the map and the index, as convert --dry-run does
            return outcome(Status.WOULD_CONVERT, layers=len(_plan(item).layers))
        item.output.parent.mkdir(parents=True, exist_ok=True)
        # A missing output is published only if none appears meanwhile; a stale one of
        # fc2conv's (or, with --force, anything) is replaced.
        overwrite = state is _Output.STALE
        result = convert(
            ConvertOptions(
                item.input,
                item.map_path,
                item.output,
                options.atol,
                seed=options.seed,
                force=overwrite,
            )
        )
    except CheckFailed as error:
        return outcome(Status.CHECK_FAILED, error=error.message.splitlines()[0])
    except Fc2convError as error:
        return outcome(Status.ERROR, error="; ".join(error.message.splitlines()))
    except OSError as error:
        return outcome(Status.ERROR, error=f"{item.output.parent}: {error.strerror or error}")
    diffs = [
        d for c in result.checks for d in (c.max_abs_diff, c.dense_max_abs_diff) if d is not None
    ]
    return outcome(
        Status.CONVERTED, layers=len(result.plan.layers), max_abs_diff=max(diffs, default=None)
    )


def _plan(item: BatchItem) -> Plan:
    layer_map = read_layer_map(item.map_path)
    with open_checkpoint(item.input, layer_map.strip_prefixes, layer_map.state_dict_key) as source:
        return build_plan(source.tensors, layer_map, source.weight_format)


class _Output(enum.Enum):
    """What is at an item's output path, and so what the batch may do with it."""

    MISSING = "missing"  # convert, publish without replacing
    FOREIGN = "foreign"  # not written by fc2conv: never replaced without --force
    STALE = "stale"  # fc2conv's, from another source, map or conversion version: replace
    UP_TO_DATE = "up to date"  # fc2conv's, from this source, map and conversion: skip


def _output_state(item: BatchItem) -> tuple[_Output, str]:
    """Classify the existing output; for ``FOREIGN``, also say why in a phrase."""
    if not item.output.is_file():
        return _Output.MISSING, ""  # nothing, or a folder: convert reports what is in the way
    try:
        metadata = read_safetensors_metadata(item.output)
    except CheckpointError as error:
        reason = error.message.removeprefix(f"{item.output}: ")
        return _Output.FOREIGN, f"exists and fc2conv did not write it ({reason})"
    if "fc2conv_version" not in metadata:
        return _Output.FOREIGN, "exists and fc2conv did not write it (no fc2conv metadata)"
    if (
        metadata.get(CONVERSION_KEY) != str(CONVERSION_VERSION)
        or metadata.get("layer_map_sha256") != read_layer_map(item.map_path).sha256
        or not _intact(item.output)
        or metadata.get("source_sha256") != _sha256(item.input)
    ):
        return _Output.STALE, ""
    return _Output.UP_TO_DATE, ""


def _intact(path: Path) -> bool:
    """True when the ``safetensors`` library opens the whole file (e.g. not truncated)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy"):
            return True
    except Exception:  # whatever it raises, it cannot read the file
        return False


def _sha256(path: Path) -> str:
    """The input's SHA-256, as ``convert`` records it."""
    return sha256_in_background(path).result()


class _Pool:
    """Worker processes, each fed one item at a time over its own pipe."""

    def __init__(self, size: int, options: BatchOptions) -> None:
        self.size = size
        self.options = options
        self.idle: list[_Worker] = []
        self.busy: list[_Worker] = []

    def has_room(self) -> bool:
        return bool(self.idle) or len(self.busy) < self.size

    def submit(self, index: int, item: BatchItem) -> None:
        worker = self.idle.pop() if self.idle else _Worker.start(self.options)
        try:
            worker.send(index, item)
        except OSError:  # it died since its last file: a fresh one takes the item
            worker = _Worker.start(self.options)
            worker.send(index, item)
        self.busy.append(worker)

    def collect(self) -> list[tuple[int, FileOutcome]]:
        """Wait until at least one busy worker finishes or dies; return those outcomes.

        A worker's death closes its end of the pipe, so its connection turns ready too.
        """
        ready = set(wait([w.conn for w in self.busy]))
        done = []
        for worker in [w for w in self.busy if w.conn in ready]:
            self.busy.remove(worker)
            index, outcome = worker.receive()
            done.append((index, outcome))
            if worker.process.poll() is None:
                self.idle.append(worker)
        return done

    def stop(self) -> None:
        """Ask idle workers to exit; stop busy ones (they remove their temp files)."""
        for worker in self.idle:
            worker.close()
        for worker in self.busy:
            with contextlib.suppress(OSError):  # already gone
                worker.process.terminate()  # SIGTERM: the worker unwinds and cleans up
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker in self.idle + self.busy:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.conn.close()
        for worker in self.busy:
            remove_temp_files(worker.item.output)
        self.idle, self.busy = [], []


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    index: int = -1
    item: BatchItem | None = None

    @classmethod
    def start(cls, options: BatchOptions) -> _Worker:
        """Start a worker on the package this process imported, and hand it ``options``."""
        parent, child = Pipe()
        command = [sys.executable, "-I", "-c", _WORKER_CODE, str(child.fileno()), *_import_path()]
        try:
            with _sigint_blocked():  # the worker starts with it blocked, then ignores it
                process = subprocess.Popen(
                    command, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
                )
        finally:
            child.close()
        worker = cls(process, parent)
        parent.send(options)
        return worker

    def send(self, index: int, item: BatchItem) -> None:
        self.index, self.item = index, item
        self.conn.send((index, item))

    def receive(self) -> tuple[int, FileOutcome]:
        """The worker's outcome, or an error outcome if it died instead."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            how = f"signal {_signal_name(-code)}" if code < 0 else f"exit {code}"
            remove_temp_files(self.item.output)
            return self.index, FileOutcome(
                self.item, Status.ERROR, error=f"worker crashed ({how}); nothing was written"
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone: nothing to stop
            self.conn.send(None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # e.g. a real-time signal
        return str(number)


def _import_path() -> list[str]:
    """The worker's ``sys.path``: first the folder holding the fc2conv_cli this process
    runs, then this process's own path, less ``''`` (the current folder)."""
    package_root = str(Path(fc2conv_cli.__file__).absolute().parent.parent)  # links kept
    return [package_root, *(p for p in sys.path if p and p != package_root)]


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold SIGINT for this thread meanwhile: a Ctrl-C is delivered after, not lost; a
    process started meanwhile inherits the block (until it ignores SIGINT)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_main(fd: int) -> None:
    """A worker: take the options, then convert items until told to stop.

    SIGTERM (the parent stopping the batch) unwinds the conversion, which removes its
    temp file; a parent that goes away ends the worker at its next item.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    conn = Connection(fd)
    try:
        options = conn.recv()
        while (message := conn.recv()) is not None:
            index, item = message
            conn.send((index, process_item(item, options)))
    except (KeyboardInterrupt, EOFError, OSError):  # stopped, or the parent went away
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
