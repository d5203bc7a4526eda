"""Benchmark fc2conv against ``cp``, a torch import and the hand-written script (issue 3).

Every case runs in one invocation, interleaved (one round over all cases, then the next),
a warm-up round first and then ``--runs`` measured rounds; the table shows medians. Each
run is a child process: wall time is from spawn to exit, CPU time is the user + system
time of the process and its threads (what a busy machine cannot hide), memory is the
largest ``RssAnon`` of ``/proc/PID/status`` sampled every 10 ms (file-backed pages of a memory
map are page cache, not the process's own), and ``VmHWM`` (peak resident set, file pages
included; the ``ru_maxrss`` that ``wait4`` returns) for information. ``sync`` runs, not
timed, before every run so no case pays for writeback of an earlier one's output.

    python bench/bench_convert.py            # 5 runs; ``make bench``
    python bench/bench_convert.py --quick    # 2 runs
    python bench/bench_convert.py --runs 3 --json bench/_work/result.json

Fixtures (VGG16 fp32 with torchvision names as .safetensors and .pth, a wider head 4x its
size, a bad map) are made once under ``bench/_work/`` and reused. Page cache cannot be
dropped here; the warm-up round makes it hot for every case alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
VGG16_MAP = ROOT / "fc2conv_cli" / "sample_configs" / "vgg16.yaml"
SAMPLE_INTERVAL_S = 0.010
MIB = 1 << 20


# -- measuring one process --------------------------------------------------------------


@dataclass
class Measurement:
    """One run of one command (or of several, one after another: walls add up)."""

    wall_s: float
    rss_anon_mib: float  # largest RssAnon sampled
    vm_hwm_mib: float  # peak resident set, file-backed pages included
    returncode: int
    samples: int
    cpu_s: float = 0.0  # user + system time of the process and its threads


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/PID/status`` (empty once the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                key, _, value = line.partition(b":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == b"kB":
                    fields[key.decode()] = int(parts[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def measure(
    argv: Sequence[str],
    *,
    interval: float = SAMPLE_INTERVAL_S,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
) -> Measurement:
    """Run ``argv`` to completion; its wall time and peak memory.

    The process's ``pidfd`` wakes the sampler the moment it exits, so the wall time does
    not round up to the sampling interval. ``Popen`` returns only after ``exec``, so every
    sample is of the command itself, never of the forked copy of this process.
    """
    # vfork shares this process's memory until exec, and the kernel folds that memory's
    # high-water mark into the child's ru_maxrss: it is the child's own only when larger.
    own_hwm = proc_status(os.getpid()).get("VmHWM", 0)
    started = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr)
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        peak_anon = last_hwm = samples = 0
        while True:
            status = proc_status(proc.pid)
            if "RssAnon" in status:
                peak_anon = max(peak_anon, status["RssAnon"])
                last_hwm = max(last_hwm, status.get("VmHWM", 0))
                samples += 1
            if poller.poll(interval * 1000):
                break
        ended = time.perf_counter()
        _, wait_status, usage = os.wait4(proc.pid, 0)
    finally:
        os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here, not by Popen
    return Measurement(
        wall_s=ended - started,
        rss_anon_mib=peak_anon / 1024,
        vm_hwm_mib=(usage.ru_maxrss if usage.ru_maxrss > own_hwm else last_hwm) / 1024,
        returncode=proc.returncode,
        samples=samples,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


def measure_sequence(commands: Sequence[Sequence[str]], **kwargs) -> Measurement:
    """Run commands one after another: wall times add up, memory is the largest."""
    parts = [measure(argv, **kwargs) for argv in commands]
    return Measurement(
        wall_s=sum(p.wall_s for p in parts),
        rss_anon_mib=max(p.rss_anon_mib for p in parts),
        vm_hwm_mib=max(p.vm_hwm_mib for p in parts),
        returncode=next((p.returncode for p in parts if p.returncode), 0),
        samples=sum(p.samples for p in parts),
        cpu_s=sum(p.cpu_s for p in parts),
    )


# -- cases and targets ------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    commands: list[list[str]]
    output: Path | None = None  # removed before every run; set by build_cases
    expect_rc: int = 0
    runs: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, metric: str) -> float | None:
        values = [getattr(m, metric) for m in self.runs]
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Target:
    """``case``'s ``metric`` <= ``factor`` x ``base``'s ``metric`` + ``offset``."""

    case: str
    metric: str  # "wall_s" or "rss_anon_mib"
    text: str
    base: str | None = None
    factor: float = 0.0
    offset: float = 0.0


TARGETS = (
    Target("fc_st", "wall_s", "wall <= 0.35 x naive --check", "naive_check", 0.35),
    Target("fc_st", "rss_anon_mib", "memory <= 150 MiB", offset=150),
    Target("fc_st", "wall_s", "wall <= 1.8 x (cp then sync)", "cp_sync", 1.8),
    Target("fc_st_nocheck", "wall_s", "wall <= 1.3 x (cp then sync)", "cp_sync", 1.3),
    Target("fc_pth", "wall_s", "wall <= 1.0 x naive .pth", "naive_pth", 1.0),
    Target("fc_pth", "rss_anon_mib", "memory <= torch import + 150 MiB", "torch", 1.0, 150),
    Target("fc_4x", "rss_anon_mib", "memory <= 1.2 x VGG16's", "fc_st", 1.2),
    Target("fc_4x", "rss_anon_mib", "memory <= 150 MiB", offset=150),
    Target("fc_4x", "wall_s", "wall <= 4.5 x VGG16's", "fc_st", 4.5),
    Target("help", "wall_s", "wall <= 0.3 s", offset=0.3),
    Target("bad_map", "wall_s", "wall <= 0.3 s", offset=0.3),
)


def fc2conv_command() -> list[str]:
    script = Path(sys.executable).with_name("fc2conv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fc2conv_cli"]


def build_cases(work: Path, fixtures: dict[str, Path]) -> list[Case]:
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    py, naive, fc2conv = sys.executable, str(ROOT / "bench" / "naive.py"), fc2conv_command()
    st, pth, wide = (str(fixtures[k]) for k in ("safetensors", "pth", "wide"))

    def path(key: str) -> Path:
        return out / f"{key}.safetensors"

    def convert(key: str, source: str, *extra: str, map_path: Path = VGG16_MAP) -> list[str]:
        return [*fc2conv, "convert", source, "--map", str(map_path), "-o", str(path(key)), *extra]

    cases = [
        Case("cp", "`cp`", [["cp", st, str(path("cp"))]]),
        Case(
            "cp_sync",
            "`cp` then `sync` of the copy",
            [["cp", st, str(path("cp_sync"))], ["sync", str(path("cp_sync"))]],
        ),
        Case("torch", '`python -c "import torch"`', [[py, "-c", "import torch"]]),
        Case("naive", "naive.py, .safetensors", [[py, naive, st, str(path("naive"))]]),
        Case("naive_pth", "naive.py, .pth", [[py, naive, pth, str(path("naive_pth"))]]),
        Case(
            "naive_check",
            "naive.py --check, .safetensors",
            [[py, naive, st, str(path("naive_check")), "--check"]],
        ),
        Case("fc_st", "fc2conv, .safetensors (checks on)", [convert("fc_st", st)]),
        Case(
            "fc_st_nocheck",
            "fc2conv --no-check, .safetensors",
            [convert("fc_st_nocheck", st, "--no-check")],
        ),
        Case("fc_pth", "fc2conv, .pth (checks on)", [convert("fc_pth", pth)]),
        Case("fc_4x", "fc2conv, 4x VGG16 .safetensors (checks on)", [convert("fc_4x", wide)]),
        Case("help", "`fc2conv --help`", [[*fc2conv, "--help"]]),
        Case(
            "bad_map",
            "fc2conv, bad map (exit 2)",
            [convert("bad_map", st, map_path=fixtures["bad_map"])],
            expect_rc=2,
        ),
    ]
    for case in cases:  # every case that writes, writes path(key)
        if any(str(path(case.key)) in argv for argv in case.commands):
            case.output = path(case.key)
    return cases


# -- fixtures ---------------------------------------------------------------------------


def wide_vgg16_shapes(scale: float = 4.0) -> dict[str, tuple[int, ...]]:
    """VGG16 with its FC head widened (a multiple of 512) to ``scale`` x its bytes."""
    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import state_dict_shapes

    base = state_dict_shapes("vgg16")

    def size(shapes: dict[str, tuple[int, ...]]) -> int:
        total = 0
        for shape in shapes.values():
            count = 1
            for n in shape:
                count *= n
            total += count
        return total

    def widened(width: int) -> dict[str, tuple[int, ...]]:
        shapes = dict(base)
        shapes["classifier.0.weight"], shapes["classifier.0.bias"] = (width, 25088), (width,)
        shapes["classifier.3.weight"], shapes["classifier.3.bias"] = (width, width), (width,)
        shapes["classifier.6.weight"] = (1000, width)
        return shapes

    width = min(range(4096, 65536, 512), key=lambda w: abs(size(widened(w)) / size(base) - scale))
    return widened(width)


def ensure_fixtures(work: Path) -> dict[str, Path]:
    """Make the checkpoints and the bad map once; reuse them when present."""
    work.mkdir(parents=True, exist_ok=True)
    fixtures = {
        "safetensors": work / "vgg16.safetensors",
        "pth": work / "vgg16.pth",
        "wide": work / "vgg16_wide4x.safetensors",
        "bad_map": work / "bad_map.yaml",
    }
    zoo = str(ROOT / "bench" / "zoo.py")
    for key in ("safetensors", "pth"):
        if not fixtures[key].exists():
            log(f"making {fixtures[key]}")
            subprocess.run([sys.executable, zoo, "vgg16", str(fixtures[key])], check=True)
    if not fixtures["wide"].exists():
        log(f"making {fixtures['wide']} (a minute)")
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "import bench_convert, zoo;"
            "zoo.save_checkpoint(bench_convert.wide_vgg16_shapes(), Path(sys.argv[2]))"
        )
        # Written under a temp name so an interrupted run never leaves a half file behind.
        temp = fixtures["wide"].with_name("tmp_" + fixtures["wide"].name)
        subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(temp)], check=True)
        temp.rename(fixtures["wide"])
    if not fixtures["bad_map"].exists():
        fixtures["bad_map"].write_text(VGG16_MAP.read_text() + "no_such_key: 1\n")
    return fixtures


# -- running and reporting --------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_once(case: Case, work: Path, sync_first: bool) -> Measurement:
    if case.output is not None:
        case.output.unlink(missing_ok=True)
    if sync_first:
        os.sync()
    with open(work / "stderr.txt", "w+b") as err:
        result = measure_sequence(case.commands, stderr=err)
        if result.returncode != case.expect_rc:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            case.failures.append(f"exit {result.returncode}: {' / '.join(tail)}")
            log(f"  {case.key}: exit {result.returncode}, expected {case.expect_rc}: {tail}")
    return result


def run_all(cases: list[Case], runs: int, work: Path, sync_first: bool = True) -> None:
    """One warm-up round, then ``runs`` rounds, each over every case in turn."""
    for round_ in range(runs + 1):
        name = "warm-up" if round_ == 0 else f"run {round_}/{runs}"
        log(f"{name}: " + " ".join(c.key for c in cases))
        for case in cases:
            result = run_once(case, work, sync_first)
            if round_ > 0:
                case.runs.append(result)
    for case in cases:
        if case.output is not None:
            case.output.unlink(missing_ok=True)


def evaluate(target: Target, cases: dict[str, Case]) -> dict:
    """Limit, measured value, ratio to the base case and whether the target is met."""
    row = {"case": target.case, "metric": target.metric, "target": target.text}
    case = cases.get(target.case)
    measured = case.median(target.metric) if case else None
    base_case = cases.get(target.base) if target.base else None
    base = base_case.median(target.metric) if base_case else None
    if measured is None or (target.base and base is None):
        return {**row, "limit": None, "measured": measured, "ratio": None, "met": None}
    limit = target.factor * (base or 0.0) + target.offset
    ratio = measured / base if base else None
    ok = measured <= limit and not case.failures
    return {**row, "limit": limit, "measured": measured, "ratio": ratio, "met": ok}


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if metric == "wall_s" else _mib(value)


def _mib(value: float) -> str:
    return f"{value:.1f} MiB" if value < 10 else f"{value:.0f} MiB"


def render(cases: list[Case], header: list[str]) -> str:
    lines = [*header, ""]
    lines += [
        "| case | wall (median, min-max) | CPU (median) | peak RssAnon | VmHWM | exit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        if not case.runs:
            continue
        walls = [m.wall_s for m in case.runs]
        codes = sorted({m.returncode for m in case.runs})
        lines.append(
            f"| {case.label} | {case.median('wall_s'):.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f" | {case.median('cpu_s'):.2f} s | {_mib(case.median('rss_anon_mib'))}"
            f" | {_mib(case.median('vm_hwm_mib'))}"
            f" | {','.join(map(str, codes))}{'' if not case.failures else ' (unexpected)'} |"
        )
    by_key = {c.key: c for c in cases}
    lines += ["", "| case | target | limit | measured | ratio | met |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for target in TARGETS:
        row = evaluate(target, by_key)
        if target.case not in by_key:
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f} x"
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(
            f"| {by_key[target.case].label} | {target.text} | {_fmt(row['limit'], target.metric)}"
            f" | {_fmt(row['measured'], target.metric)} | {ratio} | {met} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 measured runs per case")
    parser.add_argument("--only", help="comma-separated case keys (default: every case)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the raw numbers")
    parser.add_argument("--work", type=Path, default=WORK, help=f"fixtures (default {WORK})")
    parser.add_argument("--no-sync", action="store_true", help="skip the sync before each run")
    args = parser.parse_args(argv)
    runs = 2 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")

    fixtures = ensure_fixtures(args.work)
    cases = build_cases(args.work, fixtures)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.key for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c.key for c in cases]}")
        cases = [c for c in cases if c.key in wanted]
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    date = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    nproc = len(os.sched_getaffinity(0))
    run_all(cases, runs, args.work, sync_first=not args.no_sync)

    sizes = {k: fixtures[k].stat().st_size for k in ("safetensors", "wide")}
    header = [
        f"`{command}` on {date}, {nproc} cores (`nproc`), Python {sys.version.split()[0]}.",
        f"VGG16 fp32 with torchvision names, random weights: {sizes['safetensors'] / 1e6:.0f} MB; "
        f"the 4x one (wider head) {sizes['wide'] / 1e6:.0f} MB "
        f"({sizes['wide'] / sizes['safetensors']:.2f} x). Hot page cache, "
        f"{'no sync' if args.no_sync else '`sync` before each run'}, 1 warm-up + {runs} "
        f"run{'s' if runs > 1 else ''} per case, interleaved; medians. Memory: peak `RssAnon` "
        "sampled every 10 ms; `VmHWM` includes file-backed pages.",
    ]
    print(render(cases, header), flush=True)

    if args.json:
        by_key = {c.key: c for c in cases}
        data = {
            "date": date,
            "nproc": nproc,
            "command": command,
            "runs": runs,
            "fixture_bytes": sizes,
            "cases": {
                c.key: {
                    "label": c.label,
                    "commands": [shlex.join(cmd) for cmd in c.commands],
                    "runs": [asdict(m) for m in c.runs],
                    "median": {
                        m: c.median(m) for m in ("wall_s", "cpu_s", "rss_anon_mib", "vm_hwm_mib")
                    },
                    "failures": c.failures,
                }
                for c in cases
            },
            "targets": [evaluate(t, by_key) for t in TARGETS],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    failed = any(c.failures for c in cases)
    return 1 if failed else 0


if __name__ == "__main__":
    if shutil.which("cp") is None or shutil.which("sync") is None:
        sys.exit("bench_convert: needs cp and sync on PATH")
    sys.exit(main())
