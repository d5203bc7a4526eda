"""The ``fc2conv convert`` command-line contract: stdout, stderr and exit code, end to end.

Every bad input of issue 2 exits 2 with exactly one line on stderr naming the file, layer
or key, prints no traceback, and leaves neither the output nor a staged temp file behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

GOOD_MAP = """\
version: 1
layout: chw
layers:
  - name: head.0
    rename: fc
    kernel: [2, 3]
"""


def _tensors(**overrides: np.ndarray | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }
    tensors.update(overrides)
    return {name: value for name, value in tensors.items() if value is not None}


def _write_case(
    folder: Path, map_text: str = GOOD_MAP, **overrides: np.ndarray | None
) -> tuple[Path, Path]:
    """A tiny safetensors checkpoint and a layer map in ``folder``."""
    source = folder / "model.safetensors"
    save_file(_tensors(**overrides), str(source))
    layer_map = folder / "map.yaml"
    layer_map.write_text(map_text)
    return source, layer_map


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def _assert_refused(outcome, output: Path, *needles: str, output_existed: bool = False) -> str:
    """Exit 2, one non-empty stderr line containing every needle, nothing left behind."""
    assert outcome.code == 2, (outcome.code, outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.stdout == ""
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    line = lines[0]
    assert line.strip()
    for needle in needles:
        assert needle in line, (needle, line)
    if not output_existed:
        assert not output.exists()
    assert _temp_files(output.parent) == []
    return line


# ---------------------------------------------------------------------------- good runs


def test_good_conversion_prints_the_table_and_writes_the_file(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 0, outcome.stderr
    assert outcome.stderr == ""
    assert "head.0 -> fc" in outcome.stdout
    assert "chw out_in" in outcome.stdout
    assert "(5, 24)" in outcome.stdout
    assert "(5, 4, 2, 3)" in outcome.stdout
    assert "2x3" in outcome.stdout
    assert "FAILED" not in outcome.stdout
    assert "1 tensors copied (byte-identical)" in outcome.stdout
    written = load_file(str(output))
    assert set(written) == {"fc.weight", "fc.bias", "backbone.weight"}
    original = _tensors()
    np.testing.assert_array_equal(
        written["fc.weight"], original["head.0.weight"].reshape(5, 4, 2, 3)
    )
    np.testing.assert_array_equal(written["backbone.weight"], original["backbone.weight"])
    assert _temp_files(tmp_path) == []


def _check_report(report: dict, source: Path, output: Path) -> None:
    assert report["ok"] is True
    assert report["input"] == str(source)
    assert report["output"] == str(output)
    assert report["copied"] == 1
    (layer,) = report["layers"]
    assert layer["name"] == "head.0"
    assert layer["rename"] == "fc"
    assert layer["old_shape"] == [5, 24]
    assert layer["new_shape"] == [5, 4, 2, 3]
    assert layer["kernel"] == [2, 3]
    assert layer["layout"] == "chw"
    assert isinstance(layer["max_abs_diff"], float) and 0 <= layer["max_abs_diff"] < 1e-6
    assert isinstance(layer["dense_max_abs_diff"], float)
    assert 0 <= layer["dense_max_abs_diff"] < 1e-6
    assert layer["ok"] is True


def test_json_to_a_file_keeps_the_table_on_stdout(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    report_path = tmp_path / "report.json"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report_path)
    assert outcome.code == 0, outcome.stderr
    assert "head.0 -> fc" in outcome.stdout
    assert outcome.stderr == ""
    _check_report(json.loads(report_path.read_text()), source, output)
    assert output.exists()


def test_json_to_stdout_is_pure_json_and_the_table_goes_to_stderr(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", "-")
    assert outcome.code == 0, outcome.stderr
    _check_report(json.loads(outcome.stdout), source, output)
    assert "head.0 -> fc" in outcome.stderr
    assert "(5, 4, 2, 3)" in outcome.stderr
    assert output.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--dry-run")
    assert outcome.code == 0, outcome.stderr
    assert "plan" in outcome.stdout
    for name in ("fc.weight", "fc.bias", "backbone.weight"):
        assert name in outcome.stdout
    assert "head.0 -> fc" in outcome.stdout
    assert "(5, 4, 2, 3)" in outcome.stdout
    assert "nothing written (dry run)" in outcome.stdout
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_no_check_writes_and_says_the_checks_were_skipped(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--no-check")
    assert outcome.code == 0, outcome.stderr
    assert "checks skipped (--no-check)" in outcome.stdout
    assert "not checked" in outcome.stdout
    assert set(load_file(str(output))) == {"fc.weight", "fc.bias", "backbone.weight"}
    assert _temp_files(tmp_path) == []


def test_version(run_cli):
    from fc2conv_cli import __version__

    outcome = run_cli("--version")
    assert outcome.code == 0
    assert outcome.stdout.strip() == f"fc2conv, version {__version__}"
    assert outcome.stderr == ""


def test_group_help_lists_convert(run_cli):
    outcome = run_cli("--help")
    assert outcome.code == 0
    assert "Usage: fc2conv" in outcome.stdout
    assert "convert" in outcome.stdout
    assert outcome.stderr == ""


def test_convert_help_lists_every_option(run_cli):
    outcome = run_cli("convert", "--help")
    assert outcome.code == 0
    assert "Usage: fc2conv convert [OPTIONS] INPUT" in outcome.stdout
    for option in ("--map", "-o, --output", "--json", "--atol", "--no-check", "--dry-run"):
        assert option in outcome.stdout
    for option in ("--force", "--seed", "Exit codes"):
        assert option in outcome.stdout
    assert outcome.stderr == ""


def test_python_dash_m_version():
    from fc2conv_cli import __version__

    done = subprocess.run(
        [sys.executable, "-m", "fc2conv_cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fc2conv, version {__version__}"


def test_force_replaces_an_existing_output(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old contents")
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--force")
    assert outcome.code == 0, outcome.stderr
    assert set(load_file(str(output))) == {"fc.weight", "fc.bias", "backbone.weight"}
    assert _temp_files(tmp_path) == []


# ------------------------------------------------------------------------- failing check


def _corrupt_one_tensor(monkeypatch, target: str) -> None:
    from fc2conv_cli import write

    original = write._write_tensor

    def corrupting(file, planned, checkpoint):
        if planned.name != target:
            return original(file, planned, checkpoint)
        buffer = io.BytesIO()
        original(buffer, planned, checkpoint)
        data = bytearray(buffer.getvalue())
        data[3] ^= 0x40  # the exponent byte of the first float32: a large change
        file.write(bytes(data))
        return None

    monkeypatch.setattr(write, "_write_tensor", corrupting)


def test_a_failing_layer_check_exits_1_and_publishes_nothing(tmp_path, run_cli, monkeypatch):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    _corrupt_one_tensor(monkeypatch, "fc.weight")
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 1, outcome.stderr
    assert "head.0 -> fc" in outcome.stdout
    assert "FAILED" in outcome.stdout
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert "check failed" in lines[0]
    assert "head.0" in lines[0]
    assert not output.exists()
    assert _temp_files(tmp_path) == []


def test_a_corrupted_copy_exits_1_and_publishes_nothing(tmp_path, run_cli, monkeypatch):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    report_path = tmp_path / "report.json"
    _corrupt_one_tensor(monkeypatch, "backbone.weight")
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report_path)
    assert outcome.code == 1, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert "check failed" in lines[0]
    assert "backbone.weight" in lines[0]
    report = json.loads(report_path.read_text())
    assert report["ok"] is False
    assert report["copy_mismatches"] == ["backbone.weight"]
    assert report["error"]["exit_code"] == 1
    assert not output.exists()
    assert _temp_files(tmp_path) == []


# ------------------------------------------------------------------------------ bad input


def test_missing_input(tmp_path, run_cli):
    _, layer_map = _write_case(tmp_path)
    missing = tmp_path / "absent.safetensors"
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", missing, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(missing), "no such file")


def test_unknown_format(tmp_path, run_cli):
    _, layer_map = _write_case(tmp_path)
    source = tmp_path / "model.npz"
    np.savez(source, w=np.ones(3))
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "'.npz'", ".safetensors")


def test_truncated_safetensors(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    source.write_bytes(source.read_bytes()[:-10])
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "truncated")


def test_corrupt_torch_zip(tmp_path, run_cli):
    import torch

    _, layer_map = _write_case(tmp_path)
    source = tmp_path / "model.pth"
    torch.save({k: torch.from_numpy(v) for k, v in _tensors().items()}, source)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "corrupt")


def _make_marker(path: str) -> int:
    """What the hostile pickle below would run if it were unpickled without weights_only."""
    Path(path).write_text("pwned")
    return 0


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


def test_pickle_that_is_not_plain_weights_is_refused_without_running_it(tmp_path, run_cli):
    import torch

    _, layer_map = _write_case(tmp_path)
    marker = tmp_path / "marker"
    source = tmp_path / "model.pth"
    state = {k: torch.from_numpy(v) for k, v in _tensors().items()}
    torch.save({**state, "payload": _Hostile(marker)}, source)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "state_dict", "_make_marker")
    assert not marker.exists()
    # The payload is real: a plain torch.load would have run it.
    torch.load(source, weights_only=False)
    assert marker.read_text() == "pwned"


def test_yaml_syntax_error_names_the_line(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path, "version: 1\nlayout: chw\n  layers: oops\n")
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(layer_map), "line 3", "YAML syntax error")


BAD_MAPS = {
    "unknown_key": (
        GOOD_MAP.replace("kernel:", "kernal:"),
        ("layers[0] (head.0)", "'kernal'", "did you mean 'kernel'"),
    ),
    "wrong_type": (
        GOOD_MAP.replace("[2, 3]", '"7x7"'),
        ("layers[0] (head.0)", "kernel", "'7x7'"),
    ),
    "unsupported_version": (
        GOOD_MAP.replace("version: 1", "version: 2"),
        ("version", "got 2"),
    ),
    "layer_not_in_checkpoint": (
        GOOD_MAP.replace("name: head.0", "name: head.1"),
        ("layers[0] (head.1)", "'head.1.weight'", "not in the checkpoint", "head.0.weight"),
    ),
    "weight_not_2d": (
        GOOD_MAP.replace("name: head.0", "name: backbone"),
        ("layers[0] (backbone)", "'backbone.weight'", "[4, 3, 3, 3]", "2-D"),
    ),
    "in_features_not_divisible": (
        GOOD_MAP.replace("[2, 3]", "[5, 5]"),
        ("layers[0] (head.0)", "kernel", "24", "not divisible", "25"),
    ),
    "in_channels_does_not_fit": (
        GOOD_MAP + "    in_channels: 3\n",
        ("layers[0] (head.0)", "in_channels", "18", "24"),
    ),
    "rename_collides_with_copied_tensor": (
        GOOD_MAP.replace("rename: fc", "rename: backbone"),
        ("'backbone.weight'", "head.0", "copied tensor"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPS))
def test_bad_map(tmp_path, run_cli, case):
    map_text, needles = BAD_MAPS[case]
    source, layer_map = _write_case(tmp_path, map_text)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(layer_map), *needles)


def test_bias_of_the_wrong_length(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path, **{"head.0.bias": np.zeros(6, np.float32)})
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(layer_map), "head.0", "'head.0.bias'", "[6]", "[5]")


def test_two_rules_with_the_same_rename(tmp_path, run_cli):
    map_text = GOOD_MAP + "  - name: head.2\n    rename: fc\n"
    extra = {
        "head.2.weight": np.ones((3, 5), np.float32),
        "head.2.bias": np.ones(3, np.float32),
    }
    source, layer_map = _write_case(tmp_path, map_text, **extra)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(layer_map), "head.2", "'fc'", "'head.0'")


def test_output_equal_to_the_input(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    before = source.read_bytes()
    outcome = run_cli("convert", source, "--map", layer_map, "-o", source)
    _assert_refused(outcome, source, str(source), "input", output_existed=True)
    assert source.read_bytes() == before


def test_output_equal_to_the_input_by_another_spelling(tmp_path, run_cli, monkeypatch):
    source, layer_map = _write_case(tmp_path)
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", "./model.safetensors")
    _assert_refused(outcome, source, "model.safetensors", "input", output_existed=True)
    assert source.read_bytes() == before


def test_output_exists_without_force(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old contents")
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(output), "already exists", "--force", output_existed=True)
    assert output.read_bytes() == b"old contents"


def test_output_folder_missing(tmp_path, run_cli):
    source, layer_map = _write_case(tmp_path)
    output = tmp_path / "missing" / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(output), "does not exist")
    assert not output.parent.exists()
    assert _temp_files(tmp_path) == []


# Permission cases: the suite runs as root, who can read and write anything, so these run
# the CLI in a subprocess as user nobody, in a folder outside pytest's root-only tmp dir.


@pytest.fixture
def shared_dir():
    folder = Path(tempfile.mkdtemp(prefix="fc2conv-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


def _as_nobody(argv: list[str], **kwargs):
    """Run ``argv`` as user nobody: with setpriv where present, else subprocess's ``user=``."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    else:
        kwargs.update(user=NOBODY, group=NOBODY, extra_groups=[])
    return subprocess.run(
        argv, capture_output=True, text=True, cwd="/", timeout=120, check=False, **kwargs
    )


def _run_as_nobody(*args: object):
    try:
        probe = _as_nobody([sys.executable, "-c", "import fc2conv_cli"])
    except OSError as exc:
        pytest.skip(f"cannot start this Python as user nobody: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this Python: {probe.stderr.strip()[-200:]}")
    done = _as_nobody([sys.executable, "-m", "fc2conv_cli", *map(str, args)])
    return SimpleNamespace(code=done.returncode, stdout=done.stdout, stderr=done.stderr)


def _permission_case(folder: Path) -> tuple[Path, Path]:
    source, layer_map = _write_case(folder)
    source.chmod(0o644)
    layer_map.chmod(0o644)
    return source, layer_map


def test_unreadable_input(shared_dir, run_cli):
    source, layer_map = _permission_case(shared_dir)
    out_dir = shared_dir / "out"
    out_dir.mkdir(mode=0o777)
    out_dir.chmod(0o777)
    output = out_dir / "out.safetensors"
    source.chmod(0o000)
    if os.geteuid() == 0:
        outcome = _run_as_nobody("convert", source, "--map", layer_map, "-o", output)
    else:
        outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "not readable")


def test_output_folder_not_writable(shared_dir, run_cli):
    source, layer_map = _permission_case(shared_dir)
    out_dir = shared_dir / "out"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    output = out_dir / "out.safetensors"
    if os.geteuid() == 0:
        outcome = _run_as_nobody("convert", source, "--map", layer_map, "-o", output)
    else:
        outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(output), "not writable")
