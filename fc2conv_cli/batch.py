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

With a timeout, a file whose worker is still at it that long after it took the file is
stopped: the worker is killed (a conversion stuck in C code hears no polite signal), its
temp file removed, and a fresh worker takes the next file.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
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
from fc2conv_cli.pipeline import DEFAULT_ATOL, ConvertOptions, convert, plan_conversion
from fc2conv_cli.plan import Plan
from fc2conv_cli.readers import open_checkpoint, read_safetensors_metadata
from fc2conv_cli.write import CONVERSION_KEY, CONVERSION_VERSION, remove_temp_files

__all__ = [
    "BatchOptions",
    "BatchResult",
    "FileOutcome",
    "Status",
    "available_cpus",
    "cgroup_cpu_quota",
    "run_batch",
    "worker_main",
]

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
    TIMED_OUT = "timed out"  # ran past --timeout: stopped
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
    timeout: float | None = None  # seconds per file; None: no limit
    dtype: str | None = None  # --dtype: overrides a group's dtype:
    dtype_scope: str = "all"
    allow_overflow: bool = False

    def dtype_for(self, item: BatchItem) -> str | None:
        """The cast of ``item``: --dtype, else its group's ``dtype:`` (the map's is the
        map's own, applied by the plan)."""
        return self.dtype or item.dtype


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
    size = _input_bytes(item)

    def outcome(status: Status, **fields) -> FileOutcome:
        return FileOutcome(item, status, size, seconds=time.perf_counter() - started, **fields)

    try:
        state, why = (_Output.STALE, "") if options.force else _output_state(item, options)
        if state is _Output.UP_TO_DATE:
            return outcome(Status.UP_TO_DATE)
        if state is _Output.FOREIGN:
            return outcome(Status.ERROR, error=f"{item.output}: {why}; pass --force to replace it")
        if options.dry_run:  # read the map and the index, as convert --dry-run does
            return outcome(Status.WOULD_CONVERT, layers=len(_plan(item, options).layers))
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
                format=item.format,
                dtype=options.dtype_for(item),
                dtype_scope=options.dtype_scope,
                allow_overflow=options.allow_overflow,
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


def _plan(item: BatchItem, options: BatchOptions) -> Plan:
    """The plan ``convert`` would follow for ``item`` (a dry run's check of it)."""
    layer_map = read_layer_map(item.map_path)
    with open_checkpoint(
        item.input, layer_map.strip_prefixes, layer_map.state_dict_key, item.format
    ) as source:
        convert_options = ConvertOptions(
            item.input,
            item.map_path,
            item.output,
            dtype=options.dtype_for(item),
            dtype_scope=options.dtype_scope,
            allow_overflow=options.allow_overflow,
        )
        return plan_conversion(source, layer_map, convert_options)


def _input_bytes(item: BatchItem) -> int:
    """The input's size (for the progress bar), 0 if it cannot be read."""
    try:
        return item.input.stat().st_size if item.input.is_file() else 0
    except OSError:
        return 0


class _Output(enum.Enum):
    """What is at an item's output path, and so what the batch may do with it."""

    MISSING = "missing"  # convert, publish without replacing
    FOREIGN = "foreign"  # not written by fc2conv: never replaced without --force
    STALE = "stale"  # fc2conv's, from another source, map or conversion version: replace
    UP_TO_DATE = "up to date"  # fc2conv's, from this source, map and conversion: skip


def _output_state(item: BatchItem, options: BatchOptions | None = None) -> tuple[_Output, str]:
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
    layer_map = read_layer_map(item.map_path)
    dtype = (options.dtype_for(item) if options else item.dtype) or layer_map.dtype
    scope = (options.dtype_scope if options else "all") if dtype else None
    if (
        metadata.get(CONVERSION_KEY) != str(CONVERSION_VERSION)
        or metadata.get("dtype") != dtype  # another cast (or none) asked for
        or metadata.get("dtype_scope") != scope
        or metadata.get("layer_map_sha256") != layer_map.sha256
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
        """Wait until a busy worker starts its file, finishes it, dies or runs out of
        time; return the outcomes of those that are done (maybe none).

        A worker's death closes its end of the pipe, so its connection turns ready too.
        """
        ready = set(wait([w.conn for w in self.busy], self._time_left()))
        done = []
        for worker in [w for w in self.busy if w.conn in ready]:
            finished = worker.receive(self.options.timeout)
            if finished is None:  # it has only started the file: its clock runs
                continue
            self.busy.remove(worker)
            done.append(finished)
            if worker.process.poll() is None:
                self.idle.append(worker)
        now = time.monotonic()
        for worker in [w for w in self.busy if w.deadline is not None and w.deadline <= now]:
            self.busy.remove(worker)
            done.append(worker.time_out(self.options.timeout))
        return done

    def _time_left(self) -> float | None:
        """Seconds until the first busy worker's deadline; None when none has one."""
        deadlines = [w.deadline for w in self.busy if w.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

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
            remove_temp_files(worker.busy_item.output)
        self.idle, self.busy = [], []


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    index: int = -1
    item: BatchItem | None = None
    started: float = 0.0  # time.monotonic() when it started the item
    deadline: float | None = None  # when its item times out, once it has started it

    @property
    def busy_item(self) -> BatchItem:
        """The item a busy worker holds (an idle one holds none: a bug to ask)."""
        if self.item is None:
            raise RuntimeError("an idle worker holds no item")
        return self.item

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
        self.index, self.item, self.deadline = index, item, None
        self.conn.send((index, item))

    def receive(self, timeout: float | None) -> tuple[int, FileOutcome] | None:
        """The worker's outcome, an error outcome if it died instead, or None when it
        said it started the item (which starts the item's ``timeout``)."""
        try:
            index, outcome = self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            how = f"signal {_signal_name(-code)}" if code < 0 else f"exit {code}"
            remove_temp_files(self.busy_item.output)
            return self.index, FileOutcome(
                self.busy_item,
                Status.ERROR,
                _input_bytes(self.busy_item),
                error=f"worker crashed ({how}); nothing was written",
            )
        if outcome is None:
            self.started = time.monotonic()
            self.deadline = None if timeout is None else self.started + timeout
            return None
        return index, outcome

    def time_out(self, timeout: float | None) -> tuple[int, FileOutcome]:
        """Kill the worker, which ran past ``timeout`` on its item, and remove its temp file."""
        with contextlib.suppress(OSError):  # it ended meanwhile
            self.process.kill()
        self.process.wait()
        self.conn.close()
        remove_temp_files(self.busy_item.output)
        seconds = time.monotonic() - self.started
        return self.index, FileOutcome(
            self.busy_item,
            Status.TIMED_OUT,
            _input_bytes(self.busy_item),
            seconds=seconds,
            error=f"ran past --timeout {timeout:g} s and was stopped",
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
    """A worker: take the options, then convert items until told to stop; for each item
    it sends ``(index, None)`` when it starts and ``(index, outcome)`` when it is done.

    SIGTERM (the parent stopping the batch) unwinds the conversion, which removes its
    temp file; a parent that goes away ends the worker at its next item.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    conn = Connection(fd)
    try:
        options = conn.recv()
        while (message := conn.recv()) is not None:
            index, item = message
            conn.send((index, None))  # started: the parent's clock for --timeout runs
            conn.send((index, process_item(item, options)))
    except (KeyboardInterrupt, EOFError, OSError):  # stopped, or the parent went away
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ------------------------------------------------------------------------ default --jobs

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under one of these names.
_V1_CPU_FOLDERS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> int:
    """The CPUs this process may use (``--jobs``' default), at least 1.

    Its affinity mask (``os.sched_getaffinity``, where the platform has it), capped by its
    cgroup's CPU quota rounded up: a container given 1.5 CPUs of a 64-core host gets 2
    workers, not 64.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root, self_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> float | None:
    """The cgroup CPU quota in CPUs (2.5 for a quota of 250000 per 100000 us), or None
    where none is set or none can be read.

    cgroup v2: ``cpu.max`` ("max 100000" is no quota) of this process's cgroup (from
    ``/proc/self/cgroup``; ``/`` inside a container's cgroup namespace) and of each cgroup
    above it, the smallest counting. cgroup v1: ``cpu.cfs_quota_us`` (-1 is no quota) over
    ``cpu.cfs_period_us``.
    """
    quotas = [parse_cpu_max(text) for text in _v2_cpu_max_files(root, self_cgroup)]
    for folder in _V1_CPU_FOLDERS:
        quota, period = (_read(root / folder / f"cpu.cfs_{n}_us") for n in ("quota", "period"))
        if quota is not None and period is not None:
            quotas.append(parse_cfs_quota(quota, period))
            break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max``, "QUOTA PERIOD" in microseconds: QUOTA / PERIOD CPUs, or
    None for "max" (no quota) or text that is not that."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(*fields)


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; None for -1 (no quota)."""
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        numerator, denominator = int(quota), int(period)
    except ValueError:
        return None
    return numerator / denominator if numerator > 0 and denominator > 0 else None


def _v2_cpu_max_files(root: Path, self_cgroup: Path) -> list[str]:
    """The text of ``cpu.max`` of this process's v2 cgroup and of those above it."""
    own = "/"
    for line in (_read(self_cgroup) or "").splitlines():
        if line.startswith("0::"):  # the v2 hierarchy's line
            own = line[3:].strip()
    if ".." in Path(own).parts:  # a cgroup outside this namespace's view: only its root
        own = "/"
    folder = root / own.strip("/")
    texts = []
    while True:
        text = _read(folder / "cpu.max")
        if text is not None:
            texts.append(text)
        if folder == root or root not in folder.parents:
            return texts
        folder = folder.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
