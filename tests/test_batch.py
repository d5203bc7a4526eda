"""``fc2conv batch`` end to end (issue 4): a zoo built here, statuses, reruns, signals, crashes.

Small zoos run in-process through ``run_cli``; the interrupt and crash tests run the batch
as a subprocess on a zoo of larger files, so a conversion is in flight when the test acts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent

MAP = "version: 1\nlayout: chw\nlayers:\n  - name: head.0\n    rename: fc\n    kernel: [2, 3]\n"
# 24 inputs cannot be read as C x 5 x 5: the map does not fit the checkpoint.
MISFIT_MAP = "version: 1\nlayout: chw\nlayers:\n  - name: head.0\n    kernel: [5, 5]\n"

GOOD = ("good/a.safetensors", "good/nested/b.safetensors", "good/nested/deep/c.pth")
TRUNCATED = "broken/truncated.safetensors"
MISFIT = "misfit/m.safetensors"

GOOD_JOB = "  - {inputs: 'good/**/*', map: maps/map.yaml}\n"
BAD_JOBS = (
    "  - {inputs: 'broken/*.safetensors', map: maps/map.yaml}\n"
    "  - {inputs: 'misfit/*.safetensors', map: maps/misfit.yaml}\n"
)


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }


def save(path: Path, values: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(values, str(path))
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in values.items()}, path)
    return path


def out_name(relative: str) -> str:
    return str(Path(relative).with_suffix(".safetensors"))


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) if folder.exists() else []


def statuses(json_path: Path) -> dict[str, str]:
    """Input path relative to the zoo -> status, from a ``--json`` summary."""
    report = json.loads(json_path.read_text())
    return {f["input"]: f["status"] for f in report["files"]}


class Zoo:
    """A model zoo in ``root``: good files in nested folders, a truncated file, a misfit."""

    def __init__(self, root: Path, bad: bool = True) -> None:
        self.root = root
        self.out = root / "converted"
        for index, relative in enumerate(GOOD):
            save(root / relative, tensors(index))
        save(root / MISFIT, tensors(10))
        whole = (root / "good/a.safetensors").read_bytes()
        (root / TRUNCATED).parent.mkdir(parents=True, exist_ok=True)
        (root / TRUNCATED).write_bytes(whole[: len(whole) * 2 // 3])
        (root / "maps").mkdir()
        self.map = root / "maps/map.yaml"
        self.map.write_text(MAP)
        (root / "maps/misfit.yaml").write_text(MISFIT_MAP)
        self.manifest = root / "manifest.yaml"
        self.write_manifest(bad)

    def write_manifest(self, bad: bool) -> None:
        jobs = GOOD_JOB + (BAD_JOBS if bad else "")
        self.manifest.write_text(f"version: 1\noutput_dir: converted/\njobs:\n{jobs}")

    def input(self, relative: str) -> Path:
        return self.root / relative

    def output(self, relative: str) -> Path:
        return self.out / out_name(relative)

    def key(self, relative: str) -> str:
        """How the summary names an input (the manifest's folder joined with the match)."""
        return str(self.root / relative)


@pytest.fixture
def zoo(tmp_path: Path) -> Zoo:
    return Zoo(tmp_path / "zoo")


def batch(run_cli, zoo: Zoo, *args: object, json_name: str = "summary.json"):
    """``fc2conv batch MANIFEST --jobs 2 --json PATH ARGS``; returns (outcome, statuses)."""
    json_path = zoo.root.parent / json_name
    json_path.unlink(missing_ok=True)
    outcome = run_cli("batch", zoo.manifest, "--jobs", 2, "--json", json_path, *args)
    assert "Traceback" not in outcome.stderr + outcome.stdout
    found = statuses(json_path) if json_path.exists() else {}
    return outcome, {k[len(str(zoo.root)) + 1 :]: v for k, v in found.items()}


def reference(run_cli, tmp_path: Path, source: Path, map_path: Path) -> bytes:
    """What ``fc2conv convert`` writes for this input and map."""
    target = tmp_path / "reference" / f"{source.stem}_{source.suffix[1:]}.safetensors"
    target.parent.mkdir(exist_ok=True)
    outcome = run_cli("convert", source, "--map", map_path, "-o", target, "--force")
    assert outcome.code == 0, outcome.stderr
    return target.read_bytes()


def stamps(zoo: Zoo) -> dict[str, tuple[int, int]]:
    return {r: (zoo.output(r).stat().st_ino, zoo.output(r).stat().st_mtime_ns) for r in GOOD}


# ----------------------------------------------------------------------- one whole batch


def test_batch_converts_the_zoo_and_reports_each_file(run_cli, zoo, tmp_path):
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 1, outcome.stderr
    assert found == {
        **dict.fromkeys(GOOD, "converted"),
        TRUNCATED: "error",
        MISFIT: "error",
    }
    # Outputs mirror the tree; the failures wrote nothing, and no temp file stays.
    written = sorted(p.relative_to(zoo.out).as_posix() for p in zoo.out.rglob("*") if p.is_file())
    assert written == sorted(out_name(r) for r in GOOD)
    assert temp_files(zoo.root) == []
    # The same bytes as `fc2conv convert` for the same input and map.
    for relative in GOOD:
        expected = reference(run_cli, tmp_path, zoo.input(relative), zoo.map)
        assert zoo.output(relative).read_bytes() == expected, relative
        converted = load_file(str(zoo.output(relative)))
        assert converted["fc.weight"].shape == (5, 4, 2, 3)
    # One plain progress line per file (not a terminal), errors naming their file.
    lines = outcome.stderr.splitlines()
    assert len(lines) == 5, outcome.stderr
    assert all(line.startswith(f"[{i}/5] ") for i, line in enumerate(lines, 1))
    truncated_line = next(line for line in lines if TRUNCATED in line)
    assert "error:" in truncated_line and "truncated" in truncated_line
    assert sum(" error: " in line for line in lines) == 2
    footer = outcome.stdout.splitlines()[-1]
    assert footer.startswith("5 files: ") and "3 converted" in footer and "2 error" in footer


def test_every_progress_line_names_its_input(run_cli, zoo):
    # In a CI log, files finish in any order: each line must say which file it is about,
    # failures included (a map that does not fit names the map, not the checkpoint).
    save(zoo.input("misfit/n.safetensors"), tensors(11))
    outcome, found = batch(run_cli, zoo)
    assert found[MISFIT] == found["misfit/n.safetensors"] == "error"
    lines = outcome.stderr.splitlines()
    assert len(lines) == 6, outcome.stderr
    for relative in (*GOOD, TRUNCATED, MISFIT, "misfit/n.safetensors"):
        assert sum(str(zoo.input(relative)) in line for line in lines) == 1, (relative, lines)


def test_json_summary(run_cli, zoo, tmp_path):
    outcome, _ = batch(run_cli, zoo, json_name="report.json")
    assert outcome.code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False
    assert report["counts"] == {"converted": 3, "error": 2}
    assert isinstance(report["seconds"], float) and report["seconds"] > 0
    assert report["fc2conv_version"]
    files = {f["input"]: f for f in report["files"]}
    assert list(files) == sorted(files)  # the sorted file list
    for relative in GOOD:
        entry = files[zoo.key(relative)]
        assert entry["output"] == str(zoo.output(relative))
        assert entry["map"] == str(zoo.map)
        assert entry["status"] == "converted"
        assert entry["layers"] == 1
        assert entry["max_abs_diff"] is not None and 0 <= entry["max_abs_diff"] <= 1e-6
        assert entry["error"] is None
    truncated = files[zoo.key(TRUNCATED)]
    assert truncated["status"] == "error" and "truncated" in truncated["error"]
    assert str(zoo.input(TRUNCATED)) in truncated["error"]
    misfit = files[zoo.key(MISFIT)]
    assert misfit["status"] == "error" and misfit["layers"] == 0
    assert misfit["map"] == str(zoo.root / "maps/misfit.yaml")
    assert "head.0" in misfit["error"]
    assert "\n" not in truncated["error"] + misfit["error"]


def test_json_to_stdout_moves_the_table_to_stderr(run_cli, zoo):
    zoo.write_manifest(bad=False)
    outcome = run_cli("batch", zoo.manifest, "--jobs", 1, "--json", "-")
    assert outcome.code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["ok"] is True and report["counts"] == {"converted": 3}
    assert "3 files: 3 converted" in outcome.stderr


def test_a_failed_check_publishes_nothing(run_cli, tmp_path):
    # Weights over 16 orders of magnitude, regrouped (hwc): the float64 convolution sums
    # in another order than the FC and differs by ~4e-9, so --atol 1e-12 fails the check;
    # the plain file's figures are ~2e-15.
    root = tmp_path / "zoo"
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((5, 24)) * 10.0 ** rng.integers(-8, 8, (5, 24))
    save(root / "wide.safetensors", {"head.0.weight": wide.astype(np.float32)})
    save(root / "plain/ok.safetensors", tensors(0))
    (root / "hwc.yaml").write_text(
        "version: 1\nlayout: hwc\nlayers:\n  - {name: head.0, kernel: [2, 3], in_channels: 4}\n"
    )
    (root / "chw.yaml").write_text(MAP)
    manifest = root / "manifest.yaml"
    manifest.write_text(
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'wide.safetensors', map: hwc.yaml}\n"
        "  - {inputs: 'plain/*.safetensors', map: chw.yaml}\n"
    )
    report_path = tmp_path / "report.json"
    outcome = run_cli("batch", manifest, "--atol", 1e-12, "--jobs", 1, "--json", report_path)
    assert outcome.code == 1, outcome.stderr
    files = {Path(f["input"]).name: f for f in json.loads(report_path.read_text())["files"]}
    assert files["wide.safetensors"]["status"] == "check failed"
    assert "check failed" in files["wide.safetensors"]["error"]
    assert files["wide.safetensors"]["max_abs_diff"] is None
    assert files["ok.safetensors"]["status"] == "converted"
    assert not (root / "out/wide.safetensors").exists()
    assert (root / "out/plain/ok.safetensors").is_file()
    assert temp_files(root) == []


# -------------------------------------------------------------------------------- reruns


def test_rerun_skips_what_is_up_to_date(run_cli, zoo):
    outcome, _ = batch(run_cli, zoo)
    assert outcome.code == 1
    before = stamps(zoo)
    contents = {r: zoo.output(r).read_bytes() for r in GOOD}

    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 1  # the bad files still fail
    assert found == {**dict.fromkeys(GOOD, "up to date"), TRUNCATED: "error", MISFIT: "error"}

    (zoo.root / TRUNCATED).unlink()
    (zoo.root / MISFIT).unlink()
    zoo.write_manifest(bad=False)
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "up to date")
    assert "3 files: 3 up to date" in outcome.stdout
    assert stamps(zoo) == before  # not even rewritten
    assert {r: zoo.output(r).read_bytes() for r in GOOD} == contents


def test_force_converts_again(run_cli, zoo):
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    contents = {r: zoo.output(r).read_bytes() for r in GOOD}
    before = stamps(zoo)
    outcome, found = batch(run_cli, zoo, "--force")
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "converted")
    after = stamps(zoo)
    assert all(after[r] != before[r] for r in GOOD)  # published anew
    assert {r: zoo.output(r).read_bytes() for r in GOOD} == contents
    assert temp_files(zoo.root) == []


def test_a_changed_source_or_map_is_converted_again(run_cli, zoo, tmp_path):
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    before = stamps(zoo)
    changed = "good/nested/b.safetensors"
    old = zoo.output(changed).read_bytes()
    save(zoo.input(changed), tensors(99))  # same names and shapes, other weights

    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == {**dict.fromkeys(GOOD, "up to date"), changed: "converted"}
    after = stamps(zoo)
    assert all(after[r] == before[r] for r in GOOD if r != changed)
    new = zoo.output(changed).read_bytes()
    assert new != old
    assert new == reference(run_cli, tmp_path, zoo.input(changed), zoo.map)

    # The map is part of what an output was made from: a changed map converts all again.
    zoo.map.write_text("# the same rules, another file\n" + MAP)
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "converted")


def test_a_damaged_output_is_converted_again(run_cli, zoo):
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    damaged = zoo.output("good/a.safetensors")
    damaged.write_bytes(damaged.read_bytes()[:40])
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found["good/a.safetensors"] == "converted"
    assert load_file(str(damaged))["fc.weight"].shape == (5, 4, 2, 3)


# ------------------------------------------------------------------------------- options


def test_dry_run_writes_nothing(run_cli, zoo):
    zoo.write_manifest(bad=False)
    outcome, found = batch(run_cli, zoo, "--dry-run")
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "would convert")
    assert not zoo.out.exists()

    # After a partial batch, a dry run tells up to date from still to do.
    assert run_cli("batch", zoo.manifest, "--shard", "1/3", "--jobs", 1).code == 0
    written = sorted(zoo.out.rglob("*"))
    outcome, found = batch(run_cli, zoo, "--dry-run")
    assert outcome.code == 0
    assert sorted(found.values()) == ["up to date", "would convert", "would convert"]
    assert sorted(zoo.out.rglob("*")) == written


def test_fail_fast_starts_no_file_after_a_failure(run_cli, zoo):
    # One worker takes the sorted list in order: broken/ comes first.
    outcome, found = batch(run_cli, zoo, "--fail-fast", "--jobs", 1)
    assert outcome.code == 1
    assert found == {TRUNCATED: "error", **dict.fromkeys((*GOOD, MISFIT), "not started")}
    assert not zoo.out.exists() or not any(zoo.out.rglob("*.safetensors"))
    assert temp_files(zoo.root) == []


def test_without_fail_fast_a_failure_stops_nothing(run_cli, zoo):
    outcome, found = batch(run_cli, zoo, "--jobs", 1)
    assert outcome.code == 1
    assert [found[r] for r in GOOD] == ["converted"] * 3
    assert "not started" not in found.values()


def test_shards_together_convert_every_file_once(run_cli, zoo):
    for relative in ("good/d.safetensors", "good/nested/e.safetensors", "good/f.safetensors"):
        save(zoo.input(relative), tensors(len(relative)))
    zoo.write_manifest(bad=False)
    seen: dict[str, list[str]] = {}
    for index in (1, 2, 3):
        outcome, found = batch(run_cli, zoo, "--shard", f"{index}/3", json_name=f"s{index}.json")
        assert outcome.code == 0, outcome.stderr
        assert set(found.values()) == {"converted"}
        assert len(found) == 2  # 6 files, 3 shards
        for relative in found:
            seen.setdefault(relative, []).append(str(index))
    all_good = {*GOOD, "good/d.safetensors", "good/nested/e.safetensors", "good/f.safetensors"}
    assert set(seen) == all_good
    assert all(len(shards) == 1 for shards in seen.values()), seen
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0
    assert found == dict.fromkeys(all_good, "up to date")
    # More shards than files (a CI matrix larger than the zoo): an empty shard is fine.
    outcome, found = batch(run_cli, zoo, "--shard", "8/8", json_name="empty.json")
    assert outcome.code == 0, outcome.stderr
    assert found == {}


def test_inputs_on_the_command_line_with_map(run_cli, zoo, tmp_path):
    out = tmp_path / "flat"
    inputs = [zoo.input(r) for r in GOOD[:2]]
    outcome = run_cli("batch", "--map", zoo.map, "-o", out, "--jobs", 1, *inputs)
    assert outcome.code == 0, outcome.stderr
    # Mirrored from the inputs' common folder, good/.
    assert (out / "a.safetensors").read_bytes() == zoo_reference(run_cli, tmp_path, zoo, GOOD[0])
    assert (out / "nested/b.safetensors").is_file()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "a.safetensors",
        "b.safetensors",
    ]


def zoo_reference(run_cli, tmp_path: Path, zoo: Zoo, relative: str) -> bytes:
    return reference(run_cli, tmp_path, zoo.input(relative), zoo.map)


@pytest.mark.parametrize(
    ("args", "needle", "one_line"),
    [
        (("manifest",), "version: expected 1, got 3", True),
        (("--map", "maps/map.yaml", "-o", "converted", "good/missing.pth"), "no such file", True),
        (("--map", "maps/map.yaml", "good/a.safetensors"), "-o OUTDIR", False),
        (("manifest", "manifest"), "give one MANIFEST.yaml", False),
        (("manifest", "--shard", "4/3"), "expected I/N", False),
        (("manifest", "--shard", "0/3"), "expected I/N", False),
        (("manifest", "--jobs", "0"), "--jobs", False),
    ],
)
def test_a_bad_manifest_or_usage_exits_2(run_cli, zoo, monkeypatch, args, needle, one_line):
    monkeypatch.chdir(zoo.root)
    zoo.manifest.write_text(zoo.manifest.read_text().replace("version: 1", "version: 3"))
    args = tuple(zoo.manifest if a == "manifest" else a for a in args)
    outcome = run_cli("batch", *args)
    assert outcome.code == 2, (outcome.stdout, outcome.stderr)
    assert outcome.stdout == ""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if one_line:  # a manifest's problem: one line, no usage text
        assert len(lines) == 1, outcome.stderr
        assert lines[0].startswith("error: ")
    assert needle in outcome.stderr, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert not zoo.out.exists()


def test_a_bad_manifest_reports_every_problem_one_line_each(run_cli, zoo):
    zoo.manifest.write_text(
        "version: 2\noutput_dir: converted\njobs:\n  - {inputs: 'none/*.pth', map: maps/x.yaml}\n"
    )
    outcome = run_cli("batch", zoo.manifest)
    assert outcome.code == 2
    lines = outcome.stderr.splitlines()
    assert len(lines) == 3, outcome.stderr
    assert all(line.startswith("error: ") for line in lines)
    assert not zoo.out.exists()


# ------------------------------------------------------------------- subprocess batches


def fc2conv(*args: object) -> list[str]:
    return [sys.executable, "-m", "fc2conv_cli", *map(str, args)]


def test_subprocess_batch_exit_code_and_outputs(zoo):
    done = subprocess.run(
        fc2conv("batch", zoo.manifest, "--jobs", 2),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=zoo.root,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.relative_to(zoo.out).as_posix() for p in zoo.out.rglob("*.safetensors")) == (
        sorted(out_name(r) for r in GOOD)
    )
    zoo.write_manifest(bad=False)
    done = subprocess.run(
        fc2conv("batch", zoo.manifest, "--jobs", 2), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "3 files: 3 up to date" in done.stdout


BIG_FILES = 8
BIG_ROWS, BIG_CHANNELS, BIG_KERNEL = 1280, 512, (4, 4)  # 1280 x 8192 float32: 40 MiB
BIG_MAP = (
    f"version: 1\nlayout: chw\nlayers:\n  - name: head.0\n    rename: fc\n"
    f"    kernel: {list(BIG_KERNEL)}\n    in_channels: {BIG_CHANNELS}\n"
)


@pytest.fixture(scope="module")
def big_zoo(tmp_path_factory) -> Path:
    """8 checkpoints of ~40 MiB each (read-only: each test writes its own output folder)."""
    root = tmp_path_factory.mktemp("big_zoo")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((BIG_ROWS, BIG_CHANNELS * int(np.prod(BIG_KERNEL))))
    weight = weight.astype(np.float32)
    for index in range(BIG_FILES):
        weight[0, 0] = index  # each file its own bytes
        folder = root / ("a" if index % 2 else "b")
        save(
            folder / f"m{index}.safetensors",
            {"head.0.weight": weight, "head.0.bias": np.full(BIG_ROWS, index, np.float32)},
        )
    (root / "map.yaml").write_text(BIG_MAP)
    (root / "manifest.yaml").write_text(
        "version: 1\noutput_dir: unused\njobs:\n  - {inputs: '**/*.safetensors', map: map.yaml}\n"
    )
    return root


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def open_files(pid: int) -> list[str]:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    names = []
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            names.append(os.readlink(fd))
    return names


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # gone: nothing left to stop
    return state in ("T", "t", "Z", "X")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_big_batch(
    big_zoo: Path, out: Path, report: Path, session: bool = False
) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        fc2conv("batch", big_zoo / "manifest.yaml", "-o", out, "--jobs", 2, "--json", report),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=session,  # its own process group, as a shell's job
    )
    log.close()
    return process


def big_outputs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.safetensors")) if out.exists() else []


def assert_valid_output(path: Path) -> None:
    loaded = load_file(str(path))
    assert set(loaded) == {"fc.weight", "fc.bias"}
    assert loaded["fc.weight"].shape == (BIG_ROWS, BIG_CHANNELS, *BIG_KERNEL)
    index = int(path.stem[1:])
    assert loaded["fc.bias"][0] == index and loaded["fc.weight"][0, 0, 0, 0] == index


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "Ctrl-C to the process group"],
)
def test_an_interrupted_batch_leaves_no_temp_file_and_a_rerun_finishes(
    run_cli, big_zoo, tmp_path, signum, group
):
    out = tmp_path / "out"
    process = start_big_batch(big_zoo, out, tmp_path / "first.json", session=group)
    try:
        # A conversion is in flight once its temp file is there.
        wait_for(lambda: temp_files(out) or big_outputs(out), 60, "a temp file or an output")
        below = descendants(process.pid)
        if group:  # what a terminal's Ctrl-C does: every process of the job hears it
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "out.log").read_text()
    assert code == 130, log
    assert "interrupted" in log and "Traceback" not in log
    assert temp_files(out) == []
    finished = big_outputs(out)
    assert len(finished) < BIG_FILES, "the batch ended before the signal: nothing was tested"
    for path in finished:
        assert_valid_output(path)
    # The workers and the fork server end with the batch.
    wait_for(lambda: not any(alive(pid) for pid in below), 15, "the workers to exit")

    report = tmp_path / "rerun.json"
    outcome = run_cli("batch", big_zoo / "manifest.yaml", "-o", out, "--jobs", 2, "--json", report)
    assert outcome.code == 0, outcome.stderr
    found = {Path(k).name: v for k, v in statuses(report).items()}
    assert len(found) == BIG_FILES
    kept = {p.stem + ".safetensors" for p in finished}
    assert {n for n, s in found.items() if s == "up to date"} == kept
    assert {n for n, s in found.items() if s == "converted"} == set(found) - kept
    assert len(big_outputs(out)) == BIG_FILES
    for path in big_outputs(out):
        assert_valid_output(path)
    assert temp_files(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_crashed_worker_fails_its_file_not_the_batch(run_cli, big_zoo, tmp_path):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    process = start_big_batch(big_zoo, out, report)

    def staging(pid: int) -> str | None:
        """The output (stem) whose temp file ``pid`` holds open, if any."""
        for name in open_files(pid):
            path = Path(name)
            if path.name.endswith(".tmp") and path.is_relative_to(out):
                return path.name.split(".safetensors.")[0].lstrip(".")
        return None

    def busy_worker() -> tuple[int, str] | None:
        """A worker of this batch, stopped while it writes a temp file: (pid, stem)."""
        for pid in descendants(process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing" not in cmdline and b"forkserver" not in cmdline:
                continue
            if staging(pid) is None:
                continue
            # Frozen, it cannot publish between our look and the kill.
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: stopped(pid), 5, "the worker to stop")  # noqa: B023
            victim = staging(pid)
            if victim is not None:
                return pid, victim
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return None

    try:
        pid, victim = wait_for(busy_worker, 60, "a worker writing a temp file")
        os.kill(pid, signal.SIGKILL)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "out.log").read_text()
    assert code == 1, log
    assert "Traceback" not in log
    files = {Path(f["input"]).stem: f for f in json.loads(report.read_text())["files"]}
    assert len(files) == BIG_FILES
    crashed = files[victim]
    assert crashed["status"] == "error", crashed
    assert "worker crashed" in crashed["error"] and "SIGKILL" in crashed["error"]
    assert all(f["status"] == "converted" for name, f in files.items() if name != victim)
    assert temp_files(out) == []
    crashed_output = Path(crashed["output"])
    assert not crashed_output.exists()
    others = [p for p in big_outputs(out) if p != crashed_output]
    assert len(others) == BIG_FILES - 1
    for path in others:
        assert_valid_output(path)

    # A rerun converts the one that crashed; the rest are up to date.
    outcome = run_cli("batch", big_zoo / "manifest.yaml", "-o", out, "--jobs", 2, "--json", report)
    assert outcome.code == 0, outcome.stderr
    found = {Path(k).stem: v for k, v in statuses(report).items()}
    assert found == {**dict.fromkeys(files, "up to date"), victim: "converted"}
    assert_valid_output(crashed_output)
