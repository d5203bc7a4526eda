"""``fc2conv batch`` end to end (issue 4): a zoo built here, statuses, reruns, signals, crashes.

Small zoos run in-process through ``run_cli``; the interrupt and crash tests run the batch
as a subprocess on a zoo of larger files, so a conversion is in flight when the test acts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fc2conv_cli.batch import BatchOptions, process_item
from fc2conv_cli.manifest import read_manifest
from fc2conv_cli.write import CONVERSION_VERSION

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


def test_a_damaged_output_of_fc2conv_is_converted_again(run_cli, zoo):
    # Its header (and so its metadata) intact, its data cut short: fc2conv's own file.
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    damaged = zoo.output("good/a.safetensors")
    damaged.write_bytes(damaged.read_bytes()[:-4])
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == {**dict.fromkeys(GOOD, "up to date"), "good/a.safetensors": "converted"}
    assert load_file(str(damaged))["fc.weight"].shape == (5, 4, 2, 3)


def _foreign(path: Path, kind: str) -> None:
    """An output fc2conv did not write."""
    if kind == "plain safetensors":
        save_file(tensors(7), str(path))
    elif kind == "other metadata":
        save_file(tensors(7), str(path), metadata={"format": "pt", "source_sha256": "0" * 64})
    elif kind == "header cut short":  # whose file it was, nobody can tell
        path.write_bytes(path.read_bytes()[:40])
    else:
        path.write_text("my notes, not a checkpoint\n")


@pytest.mark.parametrize(
    "kind", ["plain safetensors", "other metadata", "header cut short", "not safetensors"]
)
def test_an_output_fc2conv_did_not_write_is_never_replaced_without_force(run_cli, zoo, kind):
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    theirs = zoo.output("good/a.safetensors")
    _foreign(theirs, kind)
    before = theirs.read_bytes()
    for extra in ((), ("--dry-run",)):
        outcome, found = batch(run_cli, zoo, *extra)
        assert outcome.code == 1, outcome.stderr
        assert found == {**dict.fromkeys(GOOD, "up to date"), "good/a.safetensors": "error"}
        [line] = [line for line in outcome.stderr.splitlines() if " error: " in line]
        assert f"{theirs}: exists and fc2conv did not write it" in line
        assert line.endswith("pass --force to replace it")
        assert theirs.read_bytes() == before
    outcome, found = batch(run_cli, zoo, "--force")
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "converted")
    assert load_file(str(theirs))["fc.weight"].shape == (5, 4, 2, 3)
    assert temp_files(zoo.root) == []


def _rewrite_metadata(path: Path, **changes: str | None) -> None:
    """Save ``path`` again (through safetensors) with its metadata changed."""
    with safe_open(str(path), framework="numpy") as file:
        metadata = dict(file.metadata())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"fc2conv_version": "0.0.1"}, "up to date"),  # another version, the same conversion
        ({"conversion_version": "0"}, "converted"),  # a version whose conversion differed
        ({"conversion_version": str(CONVERSION_VERSION + 1)}, "converted"),
        ({"conversion_version": None}, "converted"),  # written before conversion versions
    ],
    ids=["fc2conv_version", "older conversion", "newer conversion", "no conversion_version"],
)
def test_outputs_of_another_conversion_version_are_converted_again(run_cli, zoo, changes, status):
    zoo.write_manifest(bad=False)
    assert batch(run_cli, zoo)[0].code == 0
    relative = "good/nested/b.safetensors"
    expected = zoo.output(relative).read_bytes()
    _rewrite_metadata(zoo.output(relative), **changes)
    rewritten = zoo.output(relative).read_bytes()
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == {**dict.fromkeys(GOOD, "up to date"), relative: status}
    if status == "converted":
        assert zoo.output(relative).read_bytes() == expected
    else:
        assert zoo.output(relative).read_bytes() == rewritten  # left alone


def test_an_output_that_appears_during_the_batch_is_kept(run_cli, zoo, monkeypatch):
    # Checked missing, then someone else's file arrives before the publish: never clobbered.
    from fc2conv_cli import batch as batch_module
    from fc2conv_cli import pipeline

    zoo.write_manifest(bad=False)
    theirs = zoo.output("good/a.safetensors")
    original = pipeline.convert

    def convert_meanwhile(options):
        if options.output == theirs:
            theirs.parent.mkdir(parents=True, exist_ok=True)
            theirs.write_bytes(b"arrived meanwhile")
        return original(options)

    monkeypatch.setattr(batch_module, "convert", convert_meanwhile)
    # In-process, so the patch applies: one item at a time through process_item.
    items = read_manifest(zoo.manifest)
    outcomes = {o.item.relative: o for o in map(lambda i: process_item(i, BatchOptions()), items)}
    assert outcomes["good/a.safetensors"].status.value == "error"
    assert "already exists" in outcomes["good/a.safetensors"].error
    assert theirs.read_bytes() == b"arrived meanwhile"
    assert all(
        o.status.value == "converted" for r, o in outcomes.items() if r != "good/a.safetensors"
    )
    assert temp_files(zoo.root) == []


def test_a_glob_over_the_whole_tree_never_takes_the_batchs_own_outputs(run_cli, zoo):
    # output_dir (converted/) lies inside the tree the glob walks.
    zoo.manifest.write_text(
        "version: 1\noutput_dir: converted/\njobs:\n"
        "  - {inputs: '**/*.safetensors', map: maps/map.yaml}\n"
        "  - {inputs: '**/*.pth', map: maps/map.yaml}\n"
    )
    for relative in (TRUNCATED, MISFIT):
        zoo.input(relative).unlink()
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "converted")
    (zoo.out / "good" / ".a.safetensors.0123abcd.tmp").write_bytes(b"a killed writer's")
    outcome, found = batch(run_cli, zoo)
    assert outcome.code == 0, outcome.stderr
    assert found == dict.fromkeys(GOOD, "up to date")  # converted/** is not an input
    assert not (zoo.out / "converted").exists()


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_workers_never_import_code_from_the_current_folder(zoo, tmp_path):
    # The user runs the installed `fc2conv` in a folder that holds packages named like
    # fc2conv's and its dependencies'. A worker that imported any of them would leave a mark.
    here = tmp_path / "here"
    marks = tmp_path / "marks.txt"
    for name in ("fc2conv_cli", "numpy", "yaml", "safetensors"):
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text(
            f"open({str(marks)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit(99)\n"
        )
    # A copy of the package under test, in a folder of its own: the workers must import
    # this very copy, as the parent does (not, say, another fc2conv_cli installed).
    copy = tmp_path / "copy"
    shutil.copytree(
        ROOT / "fc2conv_cli", copy / "fc2conv_cli", ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(copy / "fc2conv_cli" / "__init__.py", "a") as init:
        init.write(
            "\nimport os as _os, sys as _sys\n"
            f"with open({str(tmp_path / 'copies.txt')!r}, 'a') as _f:\n"
            "    _f.write(f'{_os.getpid()} {_sys.flags.isolated}\\n')\n"
        )
    # What pip's console script runs: its own folder first on sys.path, not the current one.
    script = tmp_path / "bin" / "fc2conv"
    script.parent.mkdir()
    script.write_text("import sys\nfrom fc2conv_cli.cli import main\nsys.exit(main())\n")
    zoo.write_manifest(bad=False)
    done = subprocess.run(
        [sys.executable, str(script), "batch", str(zoo.manifest), "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(copy)},
    )
    assert done.returncode == 0, done.stderr
    assert "3 files: 3 converted" in done.stdout
    assert not marks.exists(), marks.read_text()
    imports = [line.split() for line in (tmp_path / "copies.txt").read_text().splitlines()]
    assert [isolated for _, isolated in imports].count("0") == 1  # the parent
    assert [isolated for _, isolated in imports].count("1") == 2  # both workers, isolated
    assert len({pid for pid, _ in imports}) == 3


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


@pytest.mark.slow
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


@pytest.mark.slow
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
            if b"fc2conv_cli.batch import worker_main" not in cmdline:
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


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_batch_is_killed(big_zoo, tmp_path):
    # SIGKILL leaves the parent no time to stop anyone: each worker ends by itself once
    # its pipe to the parent is gone, finishing (or failing) at most its current file.
    out = tmp_path / "out"
    process = start_big_batch(big_zoo, out, tmp_path / "report.json")
    try:
        wait_for(lambda: temp_files(out) or big_outputs(out), 60, "a conversion in flight")
        workers = descendants(process.pid)
        assert workers, "no worker to watch"
        process.kill()
        process.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in workers), 60, "the workers to exit")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert temp_files(out) == []  # each finished its file: published whole, or nothing
    for path in big_outputs(out):
        assert_valid_output(path)


def test_the_workers_import_path_starts_with_this_package(monkeypatch):
    import fc2conv_cli
    from fc2conv_cli.batch import _import_path

    monkeypatch.setattr(sys, "path", ["", "/elsewhere", *sys.path])
    path = _import_path()
    assert path[0] == str(Path(fc2conv_cli.__file__).parent.parent)
    assert (Path(path[0]) / "fc2conv_cli" / "batch.py").is_file()
    assert "" not in path and "/elsewhere" in path
    assert path.count(path[0]) == 1


# ---------------------------------------------------------------- --format (issue 10)


@pytest.fixture
def renamed(tmp_path: Path) -> tuple[Path, Path]:
    """A safetensors checkpoint under a name whose suffix says torch, and its map."""
    source = save(tmp_path / "in" / "weights.safetensors", tensors(3))
    source = source.rename(source.with_suffix(".bin"))
    map_path = tmp_path / "map.yaml"
    map_path.write_text(MAP)
    return source, map_path


def test_format_reads_input_files_as_convert_format_does(run_cli, renamed, tmp_path):
    source, map_path = renamed
    out, report = tmp_path / "out", tmp_path / "report.json"
    base = ("batch", "--map", map_path, "-o", out, "--jobs", 1, "--json", report, source)

    # Without --format, the suffix and the content disagree: the file fails, in one line.
    outcome = run_cli(*base)
    assert outcome.code == 1, outcome.stderr
    [entry] = json.loads(report.read_text())["files"]
    assert entry["status"] == "error" and "pass --format safetensors" in entry["error"]

    # --format reaches the dry run's plan and the conversion.
    outcome = run_cli(*base, "--dry-run", "--format", "safetensors")
    assert outcome.code == 0, outcome.stderr
    assert statuses(report) == {str(source): "would convert"}
    outcome = run_cli(*base, "--format", "safetensors")
    assert outcome.code == 0, outcome.stderr
    assert statuses(report) == {str(source): "converted"}
    expected = tmp_path / "expected.safetensors"
    convert = ("convert", source, "--map", map_path, "-o", expected, "--format", "safetensors")
    assert run_cli(*convert).code == 0
    assert (out / "weights.safetensors").read_bytes() == expected.read_bytes()
    outcome = run_cli(*base, "--format", "safetensors")
    assert outcome.code == 0 and statuses(report) == {str(source): "up to date"}

    # A format the content contradicts fails the file, naming both.
    outcome = run_cli(*base, "--format", "torch", "--force")
    assert outcome.code == 1
    [entry] = json.loads(report.read_text())["files"]
    assert entry["status"] == "error"
    assert "--format torch, but the content is a safetensors file" in entry["error"]


def test_a_manifest_group_format_is_used_for_its_files(run_cli, renamed, tmp_path):
    source, _ = renamed
    manifest = tmp_path / "manifest.yaml"
    report = tmp_path / "report.json"
    for fmt, status in (("torch", "error"), ("safetensors", "converted")):
        manifest.write_text(
            "version: 1\noutput_dir: out\njobs:\n"
            f"  - {{inputs: 'in/*.bin', map: map.yaml, format: {fmt}}}\n"
        )
        outcome = run_cli("batch", manifest, "--jobs", 1, "--json", report)
        assert statuses(report) == {str(source): status}, outcome.stderr
    assert (tmp_path / "out/in/weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "manifest_text", "needle"),
    [
        (("--format", "pickle"), None, "Invalid value for '--format': 'pickle' is not one of"),
        (("--format", "torch"), "", "--format applies to INPUT files with --map"),
        ((), "format: pickle", "jobs[0]: format: unknown format 'pickle'; expected one of"),
        ((), "format: [torch]", "jobs[0]: format: unknown format ['torch']"),
    ],
)
def test_an_unknown_format_exits_2_in_one_line(run_cli, zoo, args, manifest_text, needle):
    if manifest_text is None:
        args = ("--map", zoo.map, "-o", zoo.out, zoo.input(GOOD[0]), *args)
    else:
        if manifest_text:
            job = GOOD_JOB.replace("map: maps/map.yaml}", f"map: maps/map.yaml, {manifest_text}}}")
            zoo.manifest.write_text(f"version: 1\noutput_dir: converted/\njobs:\n{job}")
        args = (zoo.manifest, *args)
    outcome = run_cli("batch", *args)
    assert outcome.code == 2, outcome.stderr
    assert outcome.stdout == ""
    [line] = outcome.stderr.splitlines()
    assert needle in line, line
    if manifest_text:
        assert line.startswith(f"error: {zoo.manifest}: jobs[0]: format: ")
    assert not zoo.out.exists()


# ------------------------------------------------------------------ --jobs (issue 13)


def cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "self_cgroup", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # a container without a limit
        ({"cpu.max": "200000 100000\n"}, "0::/\n", 2.0),
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
        ({"cpu.max": "50000 100000\n"}, "0::/\n", 0.5),
        ({"cpu.max": "max\n"}, "0::/\n", None),
        ({"cpu.max": "lots\n"}, "0::/\n", None),
        ({"cpu.max": "0 100000\n"}, "0::/\n", None),
        ({}, "0::/\n", None),  # no cgroup files at all
        # Off a cgroup namespace: this process's cgroup, and those above it (the least).
        (
            {"a.slice/cpu.max": "300000 100000\n", "a.slice/job.scope/cpu.max": "max 100000\n"},
            "0::/a.slice/job.scope\n",
            3.0,
        ),
        (
            {"a.slice/cpu.max": "800000 100000\n", "a.slice/b/cpu.max": "250000 100000\n"},
            "12:cpu:/x\n0::/a.slice/b\n",
            2.5,
        ),
        ({"cpu.max": "400000 100000\n"}, "0::/../outside\n", 4.0),  # outside: the root's
        # cgroup v1: quota over period, -1 for none.
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
         "", None),
        ({"cpu/cpu.cfs_quota_us": "350000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "", 3.5),
        ({"cpu/cpu.cfs_quota_us": "350000\n"}, "", None),  # no period: unknown
    ],
)  # fmt: skip
def test_the_cgroup_cpu_quota_parser(tmp_path, files, self_cgroup, quota):
    from fc2conv_cli.batch import cgroup_cpu_quota

    root = cgroup_tree(tmp_path / "cgroup", files)
    (tmp_path / "self").write_text(self_cgroup)
    assert cgroup_cpu_quota(root, tmp_path / "self") == quota


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (8, "max 100000", 8),
        (8, "150000 100000", 2),  # 1.5 CPUs: rounded up
        (8, "20000 100000", 1),  # a fifth of a CPU: at least one worker
        (2, "400000 100000", 2),  # the affinity mask is the smaller
        (3, None, 3),
    ],
)
def test_available_cpus_is_the_affinity_capped_by_the_quota(
    tmp_path, monkeypatch, affinity, cpu_max, expected
):
    from fc2conv_cli import batch as batch_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count plays no part
    root = cgroup_tree(tmp_path / "cgroup", {"cpu.max": cpu_max} if cpu_max else {})
    (tmp_path / "self").write_text("0::/\n")
    assert batch_module.available_cpus(root, tmp_path / "self") == expected


def test_available_cpus_without_sched_getaffinity_falls_back_to_the_cpu_count(
    tmp_path, monkeypatch
):
    from fc2conv_cli.batch import available_cpus

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    root = cgroup_tree(tmp_path / "cgroup", {"cpu.max": "300000 100000"})
    assert available_cpus(root, tmp_path / "none") == 3
    assert available_cpus(tmp_path / "nothing", tmp_path / "none") == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cpus(tmp_path / "nothing", tmp_path / "none") == 1


def test_jobs_defaults_to_available_cpus(run_cli, zoo, monkeypatch):
    from fc2conv_cli import batch as batch_module

    seen = []
    real_run_batch = batch_module.run_batch

    def run_batch(items, options, on_outcome):
        seen.append(options.jobs)
        return real_run_batch(items, options, on_outcome)

    monkeypatch.setattr(batch_module, "available_cpus", lambda: 1)
    monkeypatch.setattr(batch_module, "run_batch", run_batch)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    zoo.write_manifest(bad=False)
    assert run_cli("batch", zoo.manifest).code == 0
    assert run_cli("batch", zoo.manifest, "--jobs", 2).code == 0
    assert seen == [1, 2]
    help_text = " ".join(run_cli("batch", "--help").stdout.split())
    assert "Default: the CPUs this process may use" in help_text
    assert "cgroup CPU quota" in help_text and "not the machine's core count" in help_text


def test_available_cpus_here():
    from fc2conv_cli.batch import available_cpus

    count = available_cpus()
    assert 1 <= count <= len(os.sched_getaffinity(0))


# ----------------------------------------------------------------- shards (issue 13)


def test_an_empty_shard_says_so_in_one_line_and_exits_0(run_cli, tmp_path):
    root = tmp_path / "zoo"
    for name in ("a", "b"):
        save(root / f"{name}.safetensors", tensors(len(name)))
    (root / "map.yaml").write_text(MAP)
    manifest = root / "manifest.yaml"
    manifest.write_text("version: 1\noutput_dir: out\njobs:\n  - {inputs: '*', map: map.yaml}\n")
    outcome = run_cli("batch", manifest, "--shard", "3/4")
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout == "shard 3/4 is empty (2 files in all); nothing to do\n"
    assert outcome.stderr == ""
    outcome = run_cli("batch", manifest, "--shard", "3/4", "--json", "-")
    assert outcome.code == 0, outcome.stderr
    assert outcome.stderr == "shard 3/4 is empty (2 files in all); nothing to do\n"
    report = json.loads(outcome.stdout)
    assert report["ok"] is True and report["files"] == [] and report["counts"] == {}
    assert not (root / "out").exists()
    assert run_cli("batch", manifest, "--shard", "2/4").code == 0  # b: not empty
    assert [p.name for p in (root / "out").iterdir()] == ["b.safetensors"]


# ---------------------------------------------------------------- --timeout (issue 13)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_exits_2(run_cli, zoo, value):
    outcome = run_cli("batch", zoo.manifest, "--timeout", value)
    assert outcome.code == 2
    [line] = outcome.stderr.splitlines()
    assert "--timeout" in line
    assert not zoo.out.exists()


# What a conversion that hangs does in the copy of the package below: once its temp file is
# written, it says where that file is, then sleeps (far past the timeout).
SLOW_PATCH = """

_original_write_safetensors = write_safetensors


def write_safetensors(plan, source, output, metadata, *rest):  # noqa: F811 - a slow writer
    import os as _os
    import time as _time
    from pathlib import Path as _Path

    staged = _original_write_safetensors(plan, source, output, metadata, *rest)
    if source.path.name.startswith("slow"):
        _Path(_os.environ["FC2CONV_TEST_STAGED"]).write_text(f"{_os.getpid()} {staged.temp}")
        _time.sleep(600)
    return staged
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_file_past_the_timeout_is_stopped_and_the_next_runs_on_a_new_worker(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(
        ROOT / "fc2conv_cli", copy / "fc2conv_cli", ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(copy / "fc2conv_cli" / "pipeline.py", "a") as pipeline:
        pipeline.write(SLOW_PATCH)
    root = tmp_path / "zoo"
    for index, name in enumerate(("a.safetensors", "slow.safetensors", "z.safetensors")):
        save(root / name, tensors(index))
    (root / "map.yaml").write_text(MAP)
    staged, report, out = tmp_path / "staged.txt", tmp_path / "report.json", tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(
        fc2conv("batch", "--map", root / "map.yaml", "-o", out, "--jobs", 1, "--timeout", 3,
                "--json", report, *sorted(root.glob("*.safetensors"))),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(copy), "FC2CONV_TEST_STAGED": str(staged)},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 60  # not the 600 s the conversion would have slept
    files = {Path(f["input"]).name: f for f in json.loads(report.read_text())["files"]}
    assert {n: f["status"] for n, f in files.items()} == {
        "a.safetensors": "converted",
        "slow.safetensors": "timed out",
        "z.safetensors": "converted",  # by a fresh worker: the one that timed out was killed
    }
    slow = files["slow.safetensors"]
    assert slow["error"] == "ran past --timeout 3 s and was stopped"
    assert 3 <= slow["seconds"] < 30
    # It was stopped with its temp file in place; the file is gone, and so is the worker.
    pid, temp = staged.read_text().split(" ", 1)
    assert Path(temp).parent == out and Path(temp).name.startswith(".slow.safetensors.")
    assert not Path(temp).exists() and temp_files(out) == []
    assert not alive(int(pid))
    assert not (out / "slow.safetensors").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "z.safetensors"]
    # The table, the progress line and the footer say so.
    assert "timed out" in done.stdout and "1 timed out" in done.stdout.splitlines()[-1]
    [line] = [line for line in done.stderr.splitlines() if "slow.safetensors" in line]
    assert line.endswith("] timed out: " + str(root / "slow.safetensors") + ": ran past "
                         "--timeout 3 s and was stopped")  # fmt: skip
