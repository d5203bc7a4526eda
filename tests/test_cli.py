"""The ``fc2conv convert`` command-line contract: stdout, stderr and exit code, apart.

Runs go through ``run_cli`` (the console script's ``run``, in-process). Every bad input
of issue 2 exits 2 with exactly one line on stderr that names the file, layer or key,
prints no traceback, and leaves neither the output nor a staged ``.NAME.*.tmp`` file.
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

from fc2conv_cli import __version__

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
CONVERTED = {"fc.weight", "fc.bias", "backbone.weight"}
JSON_LAYER_KEYS = {
    "name",
    "rename",
    "old_shape",
    "new_shape",
    "kernel",
    "layout",
    "max_abs_diff",
    "dense_max_abs_diff",
    "ok",
}


def _tensors(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    """A conv weight, and a Linear(24, 5) that read a 4 x 2 x 3 feature map."""
    rng = np.random.default_rng(0)
    tensors = {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }
    tensors.update(overrides)
    return tensors


def _case(folder: Path, map_text: str = GOOD_MAP, **overrides: np.ndarray) -> tuple[Path, Path]:
    """A tiny safetensors checkpoint and a layer map in ``folder``."""
    source = folder / "model.safetensors"
    save_file(_tensors(**overrides), str(source))
    layer_map = folder / "map.yaml"
    layer_map.write_text(map_text)
    return source, layer_map


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def _assert_refused(outcome, output: Path, *needles: str, output_existed: bool = False) -> str:
    """Exit 2, one non-empty stderr line holding every needle, no traceback, nothing left."""
    assert outcome.code == 2, (outcome.code, outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert outcome.stdout == ""  # stdout is for data: no table, no message
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    line = lines[0].strip()
    assert line
    for needle in needles:
        assert needle in line, (needle, line)
    if not output_existed:
        assert not output.exists()
    assert _temp_files(output.parent) == []
    return line


def _convert(run_cli, source: Path, layer_map: Path, output: Path, *extra: object):
    return run_cli("convert", source, "--map", layer_map, "-o", output, *extra)


# ------------------------------------------------------------------------------ good runs


def test_good_conversion_prints_the_table_and_writes_the_file(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    assert outcome.code == 0, outcome.stderr
    assert outcome.stderr == ""
    table = outcome.stdout
    assert "head.0.weight -> fc.weight" in table
    assert "chw out_in" in table
    assert "(5, 24)" in table  # old shape
    assert "(5, 4, 2, 3)" in table  # new shape
    assert "2x3" in table  # kernel
    assert " ok " in table
    assert "FAILED" not in table
    assert "1 tensors copied (byte-identical)" in table
    written = load_file(str(output))
    assert set(written) == CONVERTED
    original = _tensors()
    np.testing.assert_array_equal(
        written["fc.weight"], original["head.0.weight"].reshape(5, 4, 2, 3)
    )
    np.testing.assert_array_equal(written["fc.bias"], original["head.0.bias"])
    np.testing.assert_array_equal(written["backbone.weight"], original["backbone.weight"])
    assert _temp_files(tmp_path) == []


def _check_report(report: dict, source: Path, output: Path) -> None:
    assert report["ok"] is True
    assert report["input"] == str(source)
    assert report["output"] == str(output)
    assert report["copied"] == 1
    (layer,) = report["layers"]
    assert set(layer) >= JSON_LAYER_KEYS
    assert layer["name"] == "head.0"
    assert layer["rename"] == "fc"
    assert layer["old_shape"] == [5, 24]
    assert layer["new_shape"] == [5, 4, 2, 3]
    assert layer["kernel"] == [2, 3]
    assert layer["layout"] == "chw"
    assert isinstance(layer["max_abs_diff"], float)
    assert 0 <= layer["max_abs_diff"] < 1e-9  # float64 check of an exact reshape
    assert isinstance(layer["dense_max_abs_diff"], float)
    assert 0 <= layer["dense_max_abs_diff"] < 1e-9
    assert layer["ok"] is True


def test_json_to_a_file_keeps_the_table_on_stdout(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    report_path = tmp_path / "report.json"
    outcome = _convert(run_cli, source, layer_map, output, "--json", report_path)
    assert outcome.code == 0, outcome.stderr
    assert outcome.stderr == ""
    assert "head.0.weight -> fc.weight" in outcome.stdout
    assert "{" not in outcome.stdout  # the JSON went to the file only
    _check_report(json.loads(report_path.read_text()), source, output)
    assert set(load_file(str(output))) == CONVERTED


def test_json_to_stdout_is_pure_json_and_the_table_goes_to_stderr(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output, "--json", "-")
    assert outcome.code == 0, outcome.stderr
    _check_report(json.loads(outcome.stdout), source, output)  # all of stdout parses
    assert outcome.stdout.lstrip().startswith("{")
    assert "head.0.weight -> fc.weight" in outcome.stderr
    assert "(5, 4, 2, 3)" in outcome.stderr
    assert set(load_file(str(output))) == CONVERTED


def test_bad_input_with_json_to_stdout_still_gives_pure_json(tmp_path, run_cli):
    source, layer_map = _case(tmp_path, GOOD_MAP.replace("version: 1", "version: 2"))
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output, "--json", "-")
    assert outcome.code == 2
    report = json.loads(outcome.stdout)
    assert report["ok"] is False
    assert report["error"]["exit_code"] == 2
    assert report["error"]["code"] == "map_error"
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert "version" in lines[0]
    assert not output.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    outcome = _convert(run_cli, source, layer_map, output, "--dry-run")
    assert outcome.code == 0, outcome.stderr
    assert "plan" in outcome.stdout
    for name in CONVERTED:
        assert name in outcome.stdout
    assert "reshape head.0.weight (bytes unchanged)" in outcome.stdout
    assert "head.0.weight -> fc.weight" in outcome.stdout
    assert "(5, 4, 2, 3)" in outcome.stdout
    assert "nothing written (dry run)" in outcome.stdout
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_no_check_writes_and_says_the_checks_were_skipped(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    report_path = tmp_path / "report.json"
    outcome = _convert(run_cli, source, layer_map, output, "--no-check", "--json", report_path)
    assert outcome.code == 0, outcome.stderr
    assert "checks skipped (--no-check)" in outcome.stdout
    assert "not checked" in outcome.stdout
    report = json.loads(report_path.read_text())
    assert report["checked"] is False
    assert report["layers"][0]["ok"] is None
    assert set(load_file(str(output))) == CONVERTED
    assert _temp_files(tmp_path) == []


def test_force_replaces_an_existing_output(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old contents")
    outcome = _convert(run_cli, source, layer_map, output, "--force")
    assert outcome.code == 0, outcome.stderr
    assert set(load_file(str(output))) == CONVERTED
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(run_cli, flag):
    outcome = run_cli(flag)
    assert outcome.code == 0
    assert outcome.stdout.strip() == f"fc2conv, version {__version__}"
    assert outcome.stderr == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help_lists_convert(run_cli, flag):
    outcome = run_cli(flag)
    assert outcome.code == 0
    assert outcome.stdout.startswith("Usage: fc2conv")
    assert "convert" in outcome.stdout
    assert "--version" in outcome.stdout
    assert outcome.stderr == ""


def test_convert_help_lists_every_option_and_the_exit_codes(run_cli):
    outcome = run_cli("convert", "--help")
    assert outcome.code == 0
    assert "Usage: fc2conv convert [OPTIONS] INPUT" in outcome.stdout
    for option in ("--map", "-o, --output", "--json", "--atol", "--no-check", "--dry-run"):
        assert option in outcome.stdout
    for option in ("--force", "--seed", "Exit codes"):
        assert option in outcome.stdout
    assert outcome.stderr == ""


def test_missing_required_option_is_a_usage_error(tmp_path, run_cli):
    source, _ = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "-o", output)
    assert outcome.code == 2
    assert "--map" in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert outcome.stdout == ""
    assert not output.exists()


def test_python_dash_m_version():
    done = subprocess.run(
        [sys.executable, "-m", "fc2conv_cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fc2conv, version {__version__}"
    assert done.stderr == ""


# ---------------------------------------------------------------------------- failed check


def _corrupt_one_byte(monkeypatch, target: str) -> None:
    """Let the real writer run, then flip one byte of output tensor ``target``."""
    from fc2conv_cli import write

    original = write._write_tensor

    def corrupting(file, planned, checkpoint):
        if planned.name != target:
            return original(file, planned, checkpoint)
        buffer = io.BytesIO()
        original(buffer, planned, checkpoint)
        data = bytearray(buffer.getvalue())
        data[3] ^= 0x40  # sign/exponent byte of the first float32: a large change
        file.write(bytes(data))
        return None

    monkeypatch.setattr(write, "_write_tensor", corrupting)


def test_a_failing_layer_check_exits_1_and_publishes_nothing(tmp_path, run_cli, monkeypatch):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    report_path = tmp_path / "report.json"
    _corrupt_one_byte(monkeypatch, "fc.weight")
    outcome = _convert(run_cli, source, layer_map, output, "--json", report_path)
    assert outcome.code == 1, outcome.stderr
    assert "head.0.weight -> fc.weight" in outcome.stdout
    assert "FAILED" in outcome.stdout
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert "check failed" in lines[0]
    assert "head.0" in lines[0]
    report = json.loads(report_path.read_text())
    assert report["ok"] is False
    assert report["layers"][0]["ok"] is False
    assert report["layers"][0]["max_abs_diff"] > 1e-3
    assert report["error"]["exit_code"] == 1
    assert not output.exists()
    assert _temp_files(tmp_path) == []


def test_a_corrupted_copy_exits_1_and_publishes_nothing(tmp_path, run_cli, monkeypatch):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"previous output")
    _corrupt_one_byte(monkeypatch, "backbone.weight")
    outcome = _convert(run_cli, source, layer_map, output, "--force", "--json", "-")
    assert outcome.code == 1, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["ok"] is False
    assert report["copy_mismatches"] == ["backbone.weight"]
    assert "FAILED" not in outcome.stderr  # the layer itself is fine
    assert "backbone.weight" in outcome.stderr.strip().splitlines()[-1]
    assert output.read_bytes() == b"previous output"  # --force replaces only on success
    assert _temp_files(tmp_path) == []


# ------------------------------------------------------------------------------- bad input


def test_missing_input(tmp_path, run_cli):
    _, layer_map = _case(tmp_path)
    missing = tmp_path / "absent.safetensors"
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, missing, layer_map, output)
    _assert_refused(outcome, output, str(missing), "no such file")


def test_missing_layer_map(tmp_path, run_cli):
    source, _ = _case(tmp_path)
    missing = tmp_path / "absent.yaml"
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, missing, output)
    _assert_refused(outcome, output, str(missing), "layer map not found")


def test_unknown_format(tmp_path, run_cli):
    _, layer_map = _case(tmp_path)
    source = tmp_path / "model.xyz"
    source.write_bytes(b"\x01\x02 neither magic nor a known suffix")
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "'.xyz'", ".safetensors", ".pth", "--format")


def _truncate_data(data: bytes) -> bytes:
    return data[:-10]


def _truncate_header(data: bytes) -> bytes:
    return data[:20]


def _too_short(data: bytes) -> bytes:
    return data[:5]


def _garbage_header(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    return data[:8] + b"\xff" * length + data[8 + length :]


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncate_data, "truncated"),
        (_truncate_header, "truncated"),
        (_too_short, "too short"),
        (_garbage_header, "not UTF-8"),
    ],
    ids=["data", "header", "length", "garbage-header"],
)
def test_truncated_or_corrupt_safetensors(tmp_path, run_cli, damage, needle):
    source, layer_map = _case(tmp_path)
    source.write_bytes(damage(source.read_bytes()))
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "not a valid safetensors file", needle)


def _torch_checkpoint(path: Path, **extra: object) -> None:
    import torch

    state = {name: torch.from_numpy(value) for name, value in _tensors().items()}
    torch.save({**state, **extra}, path)


def _halve(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _scramble_middle(data: bytes) -> bytes:
    middle = len(data) // 3
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : 2 * middle]) + data[2 * middle :]


def _not_a_zip(data: bytes) -> bytes:
    return b"\x80\x02 this is not a checkpoint at all" * 4


@pytest.mark.parametrize("damage", [_halve, _scramble_middle, _not_a_zip])
def test_corrupt_torch_file(tmp_path, run_cli, damage):
    _, layer_map = _case(tmp_path)
    source = tmp_path / "model.pth"
    _torch_checkpoint(source)
    source.write_bytes(damage(source.read_bytes()))
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "not a readable torch checkpoint")


def _make_marker(path: str) -> int:
    """What the hostile pickle below runs when it is unpickled without weights_only."""
    Path(path).write_text("pwned")
    return 0


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


def test_pickle_that_is_not_plain_weights_is_refused_without_running_it(tmp_path, run_cli):
    import torch

    _, layer_map = _case(tmp_path)
    marker = tmp_path / "marker"
    source = tmp_path / "model.pth"
    _torch_checkpoint(source, payload=_Hostile(marker))
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "not plain weights", "_make_marker", "state_dict")
    assert not marker.exists()
    # The payload is real: a plain unpickle runs it.
    torch.load(source, weights_only=False)
    assert marker.read_text() == "pwned"


def test_yaml_syntax_error_names_the_line(tmp_path, run_cli):
    source, layer_map = _case(tmp_path, "version: 1\nlayout: chw\n  layers: oops\n")
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(layer_map), "line 3", "YAML syntax error")


# Map text -> what the one line must name besides the map file. Each breaks one rule.
BAD_MAPS = {
    "unknown_layer_key": (
        GOOD_MAP.replace("kernel:", "kernal:"),
        ("layers[0] (head.0)", "'kernal'", "did you mean 'kernel'"),
    ),
    "unknown_top_level_key": (
        GOOD_MAP + "strip_prefixes: module.\n",
        ("top level", "'strip_prefixes'", "did you mean 'strip_prefix'"),
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
        (
            "layers[0] (head.1)",
            "no weight for 'head.1'",
            "tried head.1.weight",
            "closest",
            "head.0",
        ),
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
    "bias_of_the_wrong_length": (
        GOOD_MAP + "    bias: other.bias\n",
        ("layers[0] (head.0)", "bias", "'other.bias'", "[6]", "[5]"),
    ),
    "two_rules_with_the_same_rename": (
        GOOD_MAP + "  - name: head.2\n    rename: fc\n",
        ("layers[1] (head.2)", "'fc'", "'head.0'"),
    ),
    "rename_collides_with_a_copied_tensor": (
        GOOD_MAP.replace("rename: fc", "rename: backbone"),
        ("'backbone.weight'", "head.0", "copied tensor", "rename"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_bad_map(tmp_path, run_cli, case):
    map_text, needles = BAD_MAPS[case]
    extra = {
        "other.bias": np.zeros(6, np.float32),  # named by the explicit-bias case
        "head.2.weight": np.ones((3, 5), np.float32),  # the second rule renamed "fc"
        "head.2.bias": np.ones(3, np.float32),
    }
    source, layer_map = _case(tmp_path, map_text, **extra)
    output = tmp_path / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(layer_map), *needles)


def test_output_equal_to_the_input(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    before = source.read_bytes()
    outcome = _convert(run_cli, source, layer_map, source)
    _assert_refused(outcome, source, str(source), "is the input", output_existed=True)
    assert source.read_bytes() == before


def test_output_equal_to_the_input_even_with_force_and_another_spelling(
    tmp_path, run_cli, monkeypatch
):
    source, layer_map = _case(tmp_path)
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    outcome = _convert(run_cli, source, layer_map, "./model.safetensors", "--force")
    _assert_refused(outcome, source, "model.safetensors", "is the input", output_existed=True)
    assert source.read_bytes() == before


def test_output_exists_without_force(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old contents")
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(output), "already exists", "--force", output_existed=True)
    assert output.read_bytes() == b"old contents"


def test_output_folder_missing(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "missing" / "out.safetensors"
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(output), "does not exist")
    assert not output.parent.exists()
    assert _temp_files(tmp_path) == []


# Permission cases. The suite runs as root, who reads and writes anything, so as root these
# run the CLI in a subprocess as user nobody, in a world-readable folder (pytest's tmp dir
# is root-only). The venv's own Python may be out of nobody's reach (e.g. a pyenv build
# under /root), so a system Python of the same version with the venv's packages on
# PYTHONPATH is tried next. With neither, the test skips and says why.


@pytest.fixture
def shared_dir():
    folder = Path(tempfile.mkdtemp(prefix="fc2conv-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


def _as_nobody(argv: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],  # drop root's groups, which could grant access
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
        check=False,
    )


def _python_for_nobody() -> tuple[str, dict[str, str] | None]:
    """A Python that user nobody can run and that imports fc2conv_cli and its dependencies."""
    import site

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    candidates = [(sys.executable, None)]
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system:
        candidates.append((system, {"PATH": "/usr/bin:/bin", "PYTHONPATH": packages}))
    reasons = []
    for python, env in candidates:
        try:
            probe = _as_nobody([python, "-c", "import fc2conv_cli.cli, numpy, safetensors"], env)
        except OSError as exc:
            reasons.append(f"{python}: {exc.strerror}")
            continue
        if probe.returncode == 0:
            return python, env
        reasons.append(f"{python}: {probe.stderr.strip()[-160:]}")
    pytest.skip(
        "running as root, and user nobody can run no suitable Python: " + "; ".join(reasons)
    )


def _run_unprivileged(run_cli, *args: object):
    if os.geteuid() != 0:
        return run_cli(*args)
    python, env = _python_for_nobody()
    done = _as_nobody([python, "-m", "fc2conv_cli", *map(str, args)], env)
    return SimpleNamespace(code=done.returncode, stdout=done.stdout, stderr=done.stderr)


def _readable_case(folder: Path) -> tuple[Path, Path]:
    source, layer_map = _case(folder)
    source.chmod(0o644)
    layer_map.chmod(0o644)
    return source, layer_map


def test_unreadable_input(shared_dir, run_cli):
    source, layer_map = _readable_case(shared_dir)
    out_dir = shared_dir / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)
    output = out_dir / "out.safetensors"
    source.chmod(0o000)
    outcome = _run_unprivileged(run_cli, "convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(source), "not readable")


def test_output_folder_not_writable(shared_dir, run_cli):
    source, layer_map = _readable_case(shared_dir)
    out_dir = shared_dir / "out"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    output = out_dir / "out.safetensors"
    outcome = _run_unprivileged(run_cli, "convert", source, "--map", layer_map, "-o", output)
    _assert_refused(outcome, output, str(output), "not writable")


def test_the_unprivileged_runner_really_lacks_permissions(shared_dir, run_cli):
    """Guards the two tests above: the same run succeeds once the permissions allow it."""
    source, layer_map = _readable_case(shared_dir)
    out_dir = shared_dir / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)
    output = out_dir / "out.safetensors"
    outcome = _run_unprivileged(run_cli, "convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 0, outcome.stderr
    assert set(load_file(str(output))) == CONVERTED
