"""Benchmark ``fc2conv batch`` against a shell loop of ``fc2conv convert`` calls (issue 4).

A zoo of 40 small checkpoints (a VGG-like head: a 512 x 3 x 3 feature map flattened into
a 256-wide FC, then 256 -> 256 -> 100; about 6 MB each; every 4th file a .pth, the rest
.safetensors, in 4 folders) is made once under ``bench/_work/zoo/`` and reused. Three
cases, in one invocation, interleaved (one round over all cases, then the next), a
warm-up round first and then ``--runs`` measured rounds; the table shows medians:

- ``fc2conv batch --jobs 2`` and ``fc2conv batch --jobs 1`` over the zoo's manifest;
- a shell loop of 40 ``fc2conv convert`` calls, one per file, with the same map.

Every run starts from an empty output folder, so every run converts all 40 files;
``sync`` runs, not timed, before each. Targets: ``--jobs 1`` at most 1/4 of the loop's
time (startup amortized); ``--jobs 2`` at most 0.6 of ``--jobs 1``.

    python bench/bench_batch.py            # 3 runs
    python bench/bench_batch.py --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import Measurement, fc2conv_command, log, measure

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
FILES = 40
FOLDERS = ("alpha", "beta", "gamma/deep", "delta")
SHAPES = {
    "features.0.weight": (512, 64, 3, 3),
    "features.0.bias": (512,),
    "classifier.0.weight": (256, 512 * 3 * 3),
    "classifier.0.bias": (256,),
    "classifier.3.weight": (256, 256),
    "classifier.3.bias": (256,),
    "classifier.6.weight": (100, 256),
    "classifier.6.bias": (100,),
}
MAP = """\
# The bench zoo's head: 512 x 3 x 3 features, flattened channel-major into a 256-wide FC.
version: 1
layout: chw
weight_format: out_in
layers:
  - {name: classifier.0, rename: fc6, kernel: [3, 3], in_channels: 512}
  - {name: classifier.3, rename: fc7}
  - {name: classifier.6, rename: fc8}
"""
MANIFEST = """\
version: 1
output_dir: ../out_batch/
jobs:
  - {inputs: "**/*.safetensors", map: map.yaml}
  - {inputs: "**/*.pth", map: map.yaml}
"""


@dataclass
class Case:
    key: str
    label: str
    argv: list[str]
    output: Path  # removed before every run
    runs: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(m.wall_s for m in self.runs) if self.runs else None


def relative_inputs() -> list[str]:
    names = []
    for index in range(FILES):
        suffix = ".pth" if index % 4 == 3 else ".safetensors"
        names.append(f"{FOLDERS[index % len(FOLDERS)]}/model_{index:02d}{suffix}")
    return names


def ensure_zoo(zoo: Path) -> None:
    """Write the 40 checkpoints, the map and the manifest once; keep them when present."""
    zoo.mkdir(parents=True, exist_ok=True)
    missing = [(i, r) for i, r in enumerate(relative_inputs()) if not (zoo / r).exists()]
    if missing:
        log(f"making {len(missing)} checkpoints under {zoo}")
    for index, relative in missing:
        rng = np.random.default_rng(index)
        tensors = {
            name: rng.standard_normal(shape, dtype=np.float32) * 0.01
            for name, shape in SHAPES.items()
        }
        path = zoo / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"tmp_{path.name}.part")  # never a half file under its name
        if path.suffix == ".pth":
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, temp)
        else:
            from safetensors.numpy import save_file

            save_file(tensors, str(temp))
        temp.rename(path)
    for name, text in (("map.yaml", MAP), ("manifest.yaml", MANIFEST)):
        if not (zoo / name).exists() or (zoo / name).read_text() != text:
            (zoo / name).write_text(text)


def write_loop(work: Path, zoo: Path, out: Path) -> Path:
    """A shell script converting every file with its own ``fc2conv convert`` call."""
    fc2conv = shlex.join(fc2conv_command())
    lines = ["#!/bin/sh", "set -e"]
    for relative in relative_inputs():
        target = out / Path(relative).with_suffix(".safetensors")
        lines.append(f"mkdir -p {shlex.quote(str(target.parent))}")
        lines.append(
            f"{fc2conv} convert {shlex.quote(str(zoo / relative))} "
            f"--map {shlex.quote(str(zoo / 'map.yaml'))} -o {shlex.quote(str(target))} "
            ">/dev/null"
        )
    script = work / "convert_loop.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def build_cases(work: Path, zoo: Path) -> list[Case]:
    fc2conv, manifest = fc2conv_command(), str(zoo / "manifest.yaml")

    def batch(jobs: int) -> Case:
        out = work / f"out_batch_j{jobs}"
        argv = [*fc2conv, "batch", manifest, "-o", str(out), "--jobs", str(jobs)]
        return Case(f"batch_j{jobs}", f"`fc2conv batch --jobs {jobs}`", argv, out)

    loop_out = work / "out_loop"
    loop = Case(
        "loop",
        f"shell loop of {FILES} `fc2conv convert`",
        ["sh", str(write_loop(work, zoo, loop_out))],
        loop_out,
    )
    return [batch(2), batch(1), loop]


def outputs(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def run_all(cases: list[Case], runs: int, work: Path) -> None:
    for round_ in range(runs + 1):
        log(("warm-up" if round_ == 0 else f"run {round_}/{runs}") + ": " + ", ".join(
            c.key for c in cases
        ))  # fmt: skip
        for case in cases:
            shutil.rmtree(case.output, ignore_errors=True)
            os.sync()
            with open(work / "stderr.txt", "w+b") as err:
                result = measure(case.argv, stderr=err)
                written = len(list(case.output.rglob("*.safetensors")))
                if result.returncode != 0 or written != FILES:
                    err.seek(0)
                    tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
                    problem = f"exit {result.returncode}, {written} outputs: {' / '.join(tail)}"
                    case.failures.append(problem)
                    log(f"  {case.key}: {problem}")
            log(f"  {case.key}: {result.wall_s:.2f} s")
            if round_ > 0:
                case.runs.append(result)


def render(cases: list[Case], header: list[str]) -> str:
    by_key = {c.key: c for c in cases}
    lines = [*header, "", "| case | wall (median, min-max) | exit |", "| --- | --- | --- |"]
    for case in cases:
        walls = [m.wall_s for m in case.runs]
        codes = ",".join(map(str, sorted({m.returncode for m in case.runs})))
        lines.append(
            f"| {case.label} | {case.median():.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f" | {codes}{' (failed)' if case.failures else ''} |"
        )
    lines += ["", "| target | ratio | limit | met |", "| --- | --- | --- | --- |"]
    for case, base, limit, text in (
        ("batch_j1", "loop", 0.25, "`--jobs 1` <= 1/4 of the loop"),
        ("batch_j2", "batch_j1", 0.6, "`--jobs 2` <= 0.6 x `--jobs 1`"),
    ):
        ratio = by_key[case].median() / by_key[base].median()
        met = ratio <= limit and not by_key[case].failures
        lines.append(f"| {text} | {ratio:.2f} | {limit:.2f} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per case (default 3)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"work folder (default {WORK})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    work = args.work.resolve()
    zoo = work / "zoo"
    ensure_zoo(zoo)
    cases = build_cases(work, zoo)
    run_all(cases, args.runs, work)

    # The batch writes what the loop of converts writes, byte for byte.
    same = outputs(cases[0].output) == outputs(cases[2].output) == outputs(cases[1].output)
    size = sum((zoo / r).stat().st_size for r in relative_inputs())
    header = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"nproc: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"zoo: {FILES} files ({FILES // 4} .pth), {size / 1e6:.0f} MB in all; "
        f"{args.runs} measured runs after 1 warm-up, interleaved",
        f"outputs of batch and loop byte-identical: {'yes' if same else '**NO**'}",
    ]
    print(render(cases, header))
    for case in cases:
        shutil.rmtree(case.output, ignore_errors=True)
    failed = any(c.failures for c in cases) or not same
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
