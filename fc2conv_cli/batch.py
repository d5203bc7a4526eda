"""Convert many checkpoints: worker processes, up-to-date skipping, crash isolation.

Every file is converted exactly as ``convert`` would (``pipeline.convert``), in worker
processes that are reused across files (torch is imported once per worker, not once per
file). A worker that dies (segfault, out of memory) fails its file, not the batch; its
temp file is removed and a new worker takes over. An output whose metadata records the
same source SHA-256 and the same map is up to date and skipped, so a stopped batch,
rerun, finishes the rest.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from fc2conv_cli.checkpoint import TORCH_SUFFIXES, open_checkpoint, read_safetensors_metadata
from fc2conv_cli.digest import sha256_in_background
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
from fc2conv_cli.write import remove_temp_files

__all__ = ["BatchOptions", "BatchResult", "FileOutcome", "Status", "run_batch"]

# How long stopped workers get to remove their temp files before they are killed.
_STOP_GRACE_S = 10.0


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
    needs_torch = any(item.input.suffix.lower() in TORCH_SUFFIXES for item in items)
    pool = _Pool(min(options.jobs, len(items)), options, needs_torch)
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
        if not options.force and _up_to_date(item):
            return outcome(Status.UP_TO_DATE)
        if options.dry_run:  # read the map and the index, as convert --dry-run does
            return outcome(Status.WOULD_CONVERT, layers=len(_plan(item).layers))
        item.output.parent.mkdir(parents=True, exist_ok=True)
        result = convert(
            ConvertOptions(
                item.input, item.map_path, item.output, options.atol, seed=options.seed, force=True
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
        return build_plan(source.tensors, layer_map)


def _up_to_date(item: BatchItem) -> bool:
    """True when the output records this source's SHA-256 and this map's."""
    if not item.output.is_file():
        return False
    try:
        metadata = read_safetensors_metadata(item.output)
    except CheckpointError:
        return False  # a broken output is simply converted again
    if metadata.get("layer_map_sha256") != read_layer_map(item.map_path).sha256:
        return False
    return metadata.get("source_sha256") == sha256_in_background(item.input).result()


class _Pool:
    """Worker processes, each fed one item at a time over its own pipe."""

    def __init__(self, size: int, options: BatchOptions, needs_torch: bool) -> None:
        self.size = size
        self.options = options
        self.context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported fc2conv (and torch, ~2 s, when a
        # torch file is in the batch) once, instead of once per worker.
        preload = ["fc2conv_cli.batch"] + (["torch"] if needs_torch else [])
        self.context.set_forkserver_preload(preload)
        self.idle: list[_Worker] = []
        self.busy: list[_Worker] = []

    def has_room(self) -> bool:
        return bool(self.idle) or len(self.busy) < self.size

    def submit(self, index: int, item: BatchItem) -> None:
        worker = self.idle.pop() if self.idle else _Worker.start(self.context, self.options)
        try:
            worker.send(index, item)
        except OSError:  # it died since its last file: a fresh one takes the item
            worker = _Worker.start(self.context, self.options)
            worker.send(index, item)
        self.busy.append(worker)

    def collect(self) -> list[tuple[int, FileOutcome]]:
        """Wait until at least one busy worker finishes or dies; return those outcomes."""
        ready = set(wait([w.conn for w in self.busy] + [w.process.sentinel for w in self.busy]))
        done = []
        for worker in [w for w in self.busy if w.conn in ready or w.process.sentinel in ready]:
            self.busy.remove(worker)
            index, outcome = worker.receive()
            done.append((index, outcome))
            if worker.process.is_alive():
                self.idle.append(worker)
        return done

    def stop(self) -> None:
        """Ask idle workers to exit; stop busy ones (they remove their temp files)."""
        for worker in self.idle:
            worker.close()
        for worker in self.busy:
            worker.process.terminate()  # SIGTERM: the worker unwinds and cleans up
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker in self.idle + self.busy:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        for worker in self.busy:
            remove_temp_files(worker.item.output)
        self.idle, self.busy = [], []


@dataclass
class _Worker:
    process: multiprocessing.Process
    conn: Connection
    index: int = -1
    item: BatchItem | None = None

    @classmethod
    def start(cls, context, options: BatchOptions) -> _Worker:
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, options), daemon=True)
        process.start()
        child.close()
        return cls(process, parent)

    def send(self, index: int, item: BatchItem) -> None:
        self.index, self.item = index, item
        self.conn.send((index, item))

    def receive(self) -> tuple[int, FileOutcome]:
        """The worker's outcome, or an error outcome if it died instead."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
            remove_temp_files(self.item.output)
            return self.index, FileOutcome(
                self.item, Status.ERROR, error=f"worker crashed ({how}); nothing was written"
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone: nothing to stop
            self.conn.send(None)


def _worker_main(conn: Connection, options: BatchOptions) -> None:
    """A worker: convert items until told to stop. Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while (message := conn.recv()) is not None:
            index, item = message
            conn.send((index, process_item(item, options)))
    except (KeyboardInterrupt, EOFError):
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
