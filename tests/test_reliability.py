"""Reliability and security (issue 6): corrupt and hostile inputs, interrupted and failing
writes, concurrent writers, determinism.

Every refused input exits 2 with one ``error:`` line, prints no traceback, and leaves
neither the output nor a staged ``.NAME.TOKEN.tmp`` file behind. Interrupted or failing
writes are real subprocesses on a ~300 MB input, signalled or limited while their temp
file exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

MAP = """\
version: 1
layout: chw
layers:
  - name: head.0
    rename: fc
    kernel: [2, 3]
"""


# ----------------------------------------------------------------------------- helpers


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    return {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "backbone.steps": np.array([3], np.int64),
        "backbone.scale": rng.standard_normal(3).astype(np.float16),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }


def _raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (any JSON value, or raw bytes) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _write_safetensors(path: Path, arrays: list[tuple[str, np.ndarray]]) -> Path:
    """Write tensors with header keys and data in exactly the given order (no sorting)."""
    codes = {"float32": "F32", "float16": "F16", "int64": "I64", "float64": "F64"}
    header, offset = {}, 0
    for name, array in arrays:
        header[name] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for _, array in arrays:
            file.write(np.ascontiguousarray(array).tobytes())
    return path


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assert_refused(outcome, output: Path, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, nothing left behind."""
    assert outcome.code == 2, (outcome.code, outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not output.exists()
    assert _temp_files(output.parent) == []
    return lines[0]


@pytest.fixture
def case(tmp_path):
    """A map and an output path in tmp_path; the test supplies the (broken) input."""
    (tmp_path / "map.yaml").write_text(MAP)
    return tmp_path / "map.yaml", tmp_path / "out.safetensors"


def _convert(run_cli, source: Path, layer_map: Path, output: Path, *extra: object):
    return run_cli("convert", source, "--map", layer_map, "-o", output, *extra)


# ------------------------------------------------------------------------ corrupt files


@pytest.mark.parametrize(
    ("name", "needle"),
    [("empty.safetensors", "0 bytes is too short"), ("empty.pth", "not a readable torch")],
)
def test_zero_byte_file(tmp_path, run_cli, case, name, needle):
    layer_map, output = case
    source = tmp_path / name
    source.write_bytes(b"")
    _assert_refused(_convert(run_cli, source, layer_map, output), output, str(source), needle)
    assert source.read_bytes() == b""


def test_directory_named_like_a_checkpoint(tmp_path, run_cli, case):
    layer_map, output = case
    source = tmp_path / "x.safetensors"
    source.mkdir()
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "is a directory")
    assert source.is_dir() and list(source.iterdir()) == []


def test_safetensors_truncated_at_many_points(tmp_path, run_cli, case):
    layer_map, output = case
    whole = tmp_path / "whole.safetensors"
    save_file(_tensors(), str(whole))
    data = whole.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    # The edges (inside the length, at the header's end, one byte short) and random cuts.
    cuts = {1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(data) - 1}
    cuts |= set(rng.integers(1, len(data), 14).tolist())
    assert len(cuts) >= 20
    source = tmp_path / "cut.safetensors"
    for cut in sorted(cuts):
        source.write_bytes(data[:cut])
        outcome = _convert(run_cli, source, layer_map, output)
        line = _assert_refused(outcome, output, str(source), "not a valid safetensors file")
        assert any(w in line for w in ("truncated", "too short", "not JSON", "UTF-8")), (cut, line)


def test_broken_file_whose_name_holds_a_line_break_gives_one_line(tmp_path, run_cli, case):
    layer_map, output = case
    whole = tmp_path / "whole.safetensors"
    save_file(_tensors(), str(whole))
    source = tmp_path / "bad\nname.safetensors"
    source.write_bytes(whole.read_bytes()[:-7])
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, "name.safetensors", "truncated")


def test_header_length_larger_than_the_file(tmp_path, run_cli, case):
    layer_map, output = case
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    source = tmp_path / "long.safetensors"
    source.write_bytes(struct.pack("<Q", len(header) + 5) + header + b"\0" * 4)
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), f"header length {len(header) + 5}", "runs past")


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "not_json": (b'{"a": {"dtype": "F32",', b"", "header is not JSON"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", "header is not UTF-8"),
    "json_list": (b"[1, 2, 3]", b"", "not a JSON object"),
    "overlap": (
        {"a": ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        "overlap",
    ),
    "hole": (
        {"a": ENTRY, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
        b"\0" * 16,
        "leave a hole",
    ),
    "past_the_end": ({"a": {**ENTRY, "data_offsets": [0, 8]}}, b"\0" * 6, "truncated"),
    "offsets_reversed": ({"a": {**ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
    "negative_offset": ({"a": {**ENTRY, "data_offsets": [-8, 0]}}, b"\0" * 8, "data_offsets"),
    "float_shape": ({"a": {**ENTRY, "shape": [2.0]}}, b"\0" * 8, "shape"),
    "unknown_dtype_c32": ({"a": {**ENTRY, "dtype": "C32"}}, b"\0" * 8, "unsupported dtype 'C32'"),
    "c64_wrong_size": ({"a": {**ENTRY, "dtype": "C64"}}, b"\0" * 8, "C64 [2] needs 16"),
    "unknown_dtype_lower": ({"a": {**ENTRY, "dtype": "f32"}}, b"\0" * 8, "unsupported dtype"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_safetensors_header(tmp_path, run_cli, case, name):
    layer_map, output = case
    header, data, needle = BAD_HEADERS[name]
    source = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "not a valid safetensors file", needle)


def _torch_zip(path: Path) -> Path:
    torch.save({k: torch.from_numpy(v) for k, v in _tensors().items()}, path)
    return path


def _rewrite_zip(source: Path, target: Path, member: str, action: str) -> None:
    """Copy a torch zip, leaving ``member`` out or cutting it to half its length."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename == member:
                if action == "missing":
                    continue
                data = data[: len(data) // 2]
            new.writestr(info.filename, data)


@pytest.mark.parametrize("action", ["missing", "truncated"])
def test_torch_zip_with_a_missing_or_truncated_entry(tmp_path, run_cli, case, action):
    layer_map, output = case
    whole = _torch_zip(tmp_path / "whole.pth")
    with zipfile.ZipFile(whole) as archive:
        members = [n for n in archive.namelist() if n.split("/")[-2:-1] == ["data"]]
        # The storage of head.0.weight: the largest entry after the backbone's.
        sizes = {n: archive.getinfo(n).file_size for n in members}
    member = next(n for n in members if sizes[n] == 5 * 24 * 4)
    source = tmp_path / "broken.pth"
    _rewrite_zip(whole, source, member, action)
    with zipfile.ZipFile(source) as archive:  # the damage is real and the zip itself is valid
        assert archive.testzip() is None
        names = archive.namelist()
        assert (member in names) == (action == "truncated")
        if action == "truncated":
            assert archive.getinfo(member).file_size == sizes[member] // 2
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(outcome, output, str(source), "not a readable torch checkpoint")


def test_truncated_legacy_torch_file(tmp_path, run_cli, case):
    layer_map, output = case
    whole = tmp_path / "legacy.pth"
    torch.save(
        {k: torch.from_numpy(v) for k, v in _tensors().items()},
        whole,
        _use_new_zipfile_serialization=False,
    )
    data = whole.read_bytes()
    assert not zipfile.is_zipfile(whole)
    source = tmp_path / "cut.pth"
    for cut in (1, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 1):
        source.write_bytes(data[:cut])
        outcome = _convert(run_cli, source, layer_map, output)
        _assert_refused(outcome, output, str(source), "not a readable torch checkpoint")


# ------------------------------------------------------------------------ hostile files


class _RunsCode:
    """Unpickling this runs ``exec(code)``: here, writing a marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("container", ["raw_pickle", "torch_zip"])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, run_cli, case, container):
    layer_map, output = case
    marker = tmp_path / "marker"
    source = tmp_path / "hostile.pth"
    if container == "raw_pickle":
        # A bare pickle (torch's legacy reader unpickles it) of plain data and the payload.
        payload = {"head.0.weight": [[1.0] * 24] * 5, "x": _RunsCode(marker)}
        source.write_bytes(pickle.dumps(payload, protocol=2))
        # The payload is real: plain pickle runs it.
        pickle.loads(source.read_bytes())
    else:
        torch.save({"head.0.weight": torch.ones(5, 24), "x": _RunsCode(marker)}, source)
        torch.load(source, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    outcome = _convert(run_cli, source, layer_map, output)
    line = _assert_refused(outcome, output, str(source), "refused", "state_dict")
    assert "blocked" in line and "exec" in line.split("blocked", 1)[1]
    assert not marker.exists()
    outcome = run_cli("inspect", source)
    assert outcome.code == 2 and "exec" in outcome.stderr
    assert not marker.exists()


def test_pickled_whole_module_is_refused_with_a_state_dict_hint(tmp_path, run_cli, case):
    layer_map, output = case
    source = tmp_path / "model.pth"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 5)), source)
    outcome = _convert(run_cli, source, layer_map, output)
    _assert_refused(
        outcome,
        output,
        str(source),
        "torch.nn.modules.container.Sequential",
        "torch.save(model.state_dict(), path)",
    )


def _terabyte_header(path: Path) -> Path:
    shape = [2**40, 2**20]  # F32: 4 TiB, with offsets that match the shape exactly
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * 2**60]}
    return _raw_safetensors(path, {"head.0.weight": entry}, b"\0" * 64)


def test_header_claiming_terabytes_is_refused_quickly(tmp_path, run_cli, case):
    layer_map, output = case
    source = _terabyte_header(tmp_path / "huge.safetensors")
    assert source.stat().st_size < 1024
    started = time.perf_counter()
    outcome = _convert(run_cli, source, layer_map, output)
    # A hang guard, not a benchmark: allocating 4 TiB would fail or take far longer.
    assert time.perf_counter() - started < 30
    _assert_refused(outcome, output, str(source), "truncated")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _cli(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fc2conv_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        **kwargs,
    )


def test_terabyte_claims_are_refused_within_one_gib_of_address_space(tmp_path, case):
    layer_map, output = case
    sources = [_terabyte_header(tmp_path / "huge.safetensors")]
    # A header length near 2**63 and a shape whose byte count overflows 64 bits.
    sources.append(tmp_path / "long.safetensors")
    sources[-1].write_bytes(struct.pack("<Q", 2**63 - 8) + b"{}")
    entry = {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8 * 2**80]}
    sources.append(_raw_safetensors(tmp_path / "overflow.safetensors", {"a": entry}, b"\0" * 8))
    for source in sources:
        done = _cli("convert", source, "--map", layer_map, "-o", output, preexec_fn=_limit_memory)
        assert done.returncode == 2, (source, done.stderr)
        assert done.stderr.startswith(f"error: {source}"), done.stderr
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
        assert not output.exists() and _temp_files(tmp_path) == []


def test_yaml_alias_bomb_map_is_refused_quickly(tmp_path):
    """A 'billion laughs' map: nine levels of aliases expand to 10**9 items if walked."""
    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    lines = ["version: 1", "layout: chw", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]")
    lines.append("layers: [*a8]")
    layer_map = tmp_path / "bomb.yaml"
    layer_map.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.safetensors"
    started = time.perf_counter()
    try:
        done = _cli(
            "convert", source, "--map", layer_map, "-o", output, preexec_fn=_limit_memory,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("fc2conv did not finish within 60 s on an alias-bomb map")
    assert time.perf_counter() - started < 30  # a hang guard; the memory limit is the real test
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith(f"error: {layer_map}") for line in lines)
    assert any("layers[0]" in line for line in lines)
    assert max(map(len, lines)) < 2000
    assert not output.exists()


def _broken_inputs(folder: Path) -> dict[str, Path]:
    """One of each kind of broken or hostile input, with the marker a payload would write."""
    folder.mkdir()
    files = {"zero_bytes": folder / "zero.safetensors"}
    files["zero_bytes"].write_bytes(b"")
    files["directory"] = folder / "dir.safetensors"
    files["directory"].mkdir()
    whole = folder / "whole.safetensors"
    save_file(_tensors(), str(whole))
    files["truncated"] = folder / "cut.safetensors"
    files["truncated"].write_bytes(whole.read_bytes()[:-7])
    whole.unlink()
    files["terabytes"] = _terabyte_header(folder / "huge.safetensors")
    files["code_pickle"] = folder / "hostile.pth"
    torch.save({"w": torch.ones(2), "x": _RunsCode(folder / "marker")}, files["code_pickle"])
    files["module_pickle"] = folder / "module.pth"
    torch.save(torch.nn.Linear(24, 5), files["module_pickle"])
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(64)}, legacy, _use_new_zipfile_serialization=False)
    files["legacy_truncated"] = folder / "legacy.pth"
    files["legacy_truncated"].write_bytes(legacy.getvalue()[:-40])
    return files


def test_inspect_and_verify_refuse_every_broken_input(tmp_path, run_cli, case):
    layer_map, _ = case
    good = tmp_path / "good.safetensors"
    save_file(_tensors(), str(good))
    converted = tmp_path / "good_fcn.safetensors"
    assert _convert(run_cli, good, layer_map, converted).code == 0
    for kind, path in _broken_inputs(tmp_path / "broken").items():
        for args in (
            ("inspect", path),
            ("inspect", path, "--suggest-map"),
            ("verify", path, converted, "--map", layer_map),
            ("verify", good, path, "--map", layer_map),
        ):
            outcome = run_cli(*args)
            assert outcome.code == 2, (kind, args, outcome.stderr)
            assert "Traceback" not in outcome.stdout + outcome.stderr
            lines = outcome.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), (kind, args, lines)
    assert not (tmp_path / "broken" / "marker").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "good.safetensors",
        "good_fcn.safetensors",
    ]


def test_batch_fails_each_broken_input_and_converts_the_rest(tmp_path, run_cli, case):
    layer_map, _ = case
    files = _broken_inputs(tmp_path / "in")
    del files["directory"]  # a batch's inputs are files it found or was given
    good = tmp_path / "in" / "good.safetensors"
    save_file(_tensors(), str(good))
    out = tmp_path / "out"
    outcome = run_cli("batch", "--map", layer_map, "-o", out, "--jobs", 1, good, *files.values())
    assert outcome.code == 1, outcome.stderr
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["good.safetensors"]
    assert load_file(str(out / "good.safetensors"))["fc.weight"].shape == (5, 4, 2, 3)
    for path in files.values():
        assert any(str(path) in line and "error" in line for line in outcome.stderr.splitlines())
    assert not (tmp_path / "in" / "marker").exists()


# -------------------------------------------------------------------- interrupted writes

BIG_MAP = """\
version: 1
layout: hwc
layers:
  - name: head.0
    rename: fc6
    kernel: [7, 7]
  - name: head.3
    rename: fc7
"""


@pytest.fixture(scope="module")
def big_case():
    """A ~300 MB checkpoint (bytes move: layout hwc) in a folder every user can read."""
    folder = Path(tempfile.mkdtemp(prefix="fc2conv-reliability-"))
    folder.chmod(0o755)
    rng = np.random.default_rng(0)
    head = rng.standard_normal((3000, 512 * 49), dtype=np.float32)  # 301 MB
    arrays = [
        ("head.0.weight", head),
        ("head.0.bias", rng.standard_normal(3000, dtype=np.float32)),
        ("head.3.weight", rng.standard_normal((10, 3000), dtype=np.float32)),
    ]
    source = _write_safetensors(folder / "big.safetensors", arrays)
    del head, arrays
    layer_map = folder / "map.yaml"
    layer_map.write_text(BIG_MAP)
    for path in (source, layer_map):
        path.chmod(0o644)
    yield source, layer_map, _sha256(source)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


def _out_dir(source: Path, name: str) -> Path:
    folder = source.parent / name
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def _default_sigint() -> None:
    # A shell may start background jobs with SIGINT ignored; Python then keeps ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str], preexec=None) -> subprocess.Popen:
    def prepare() -> None:
        _default_sigint()
        if preexec is not None:
            preexec()

    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        preexec_fn=prepare,
    )


def _fc2conv(*args: object) -> list[str]:
    return [sys.executable, "-m", "fc2conv_cli", *map(str, args)]


def _wait_for_temp(process: subprocess.Popen, folder: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = _temp_files(folder)
        if temps:
            return temps[0]
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(
                f"fc2conv ended ({process.returncode}) before its temp file appeared: {err}"
            )
        time.sleep(0.002)
    process.kill()
    pytest.fail("no temp file appeared within 60 s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_large_write(big_case, signum):
    source, layer_map, digest = big_case
    folder = _out_dir(source, f"signal-{signum}")
    output = folder / "out.safetensors"
    process = _start(_fc2conv("convert", source, "--map", layer_map, "-o", output))
    temp = _wait_for_temp(process, folder)
    assert temp.name.startswith(".out.safetensors.")
    time.sleep(0.2)  # well into the write
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not output.exists()
    assert _temp_files(folder) == []
    assert _sha256(source) == digest


def _setpriv() -> list[str]:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        pytest.skip("running as root without setpriv: chmod cannot stop root's writes")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import fc2conv_cli"],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this Python: {probe.stderr.strip()[-200:]}")
    return prefix


def test_output_folder_becomes_read_only_during_the_write(big_case):
    source, layer_map, digest = big_case
    prefix = _setpriv()
    folder = _out_dir(source, "read-only")
    output = folder / "out.safetensors"
    process = _start(prefix + _fc2conv("convert", source, "--map", layer_map, "-o", output))
    try:
        temp = _wait_for_temp(process, folder)
        folder.chmod(0o555)
        _, stderr = process.communicate(timeout=120)
        leftovers = _temp_files(folder)
    finally:
        folder.chmod(0o777)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {output}"), stderr
    assert "Permission denied" in lines[0]
    assert not output.exists()
    # A folder one cannot write to keeps the temp file: the message must then name it.
    assert leftovers == [] or all(str(t.name) in lines[0] for t in leftovers), (leftovers, stderr)
    assert leftovers == [] or temp in leftovers
    assert _sha256(source) == digest


def test_write_fails_for_lack_of_space(big_case):
    source, layer_map, digest = big_case
    folder = _out_dir(source, "no-space")
    output = folder / "out.safetensors"
    limit = 32 << 20  # RLIMIT_FSIZE: no file of this process may grow past 32 MiB

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = _start(_fc2conv("convert", source, "--map", layer_map, "-o", output), limit_file_size)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {output}: cannot write")
    assert "File too large" in lines[0]
    assert not output.exists()
    assert _temp_files(folder) == []
    assert _sha256(source) == digest


# ------------------------------------------------------------------------- concurrency


@pytest.fixture(scope="module")
def reference(big_case):
    """The bytes one conversion of the big input writes, made in-process."""
    from fc2conv_cli.cli import run

    source, layer_map, _ = big_case
    folder = _out_dir(source, "reference")
    output = folder / "out.safetensors"
    assert run(["convert", str(source), "--map", str(layer_map), "-o", str(output)]) == 0
    return output


def test_two_forced_conversions_to_one_output_leave_one_complete_file(big_case, reference):
    source, layer_map, digest = big_case
    folder = _out_dir(source, "forced")
    output = folder / "out.safetensors"
    argv = _fc2conv("convert", source, "--map", layer_map, "-o", output, "--force")
    processes = [_start(argv), _start(argv)]
    results = [(p, *p.communicate(timeout=180)) for p in processes]
    for process, _, stderr in results:
        assert process.returncode == 0, stderr
    assert _temp_files(folder) == []
    assert [p.name for p in folder.iterdir()] == ["out.safetensors"]
    assert output.stat().st_size == reference.stat().st_size
    assert _sha256(output) == _sha256(reference)
    assert _sha256(source) == digest


def test_two_conversions_without_force_one_wins(big_case, reference):
    source, layer_map, _ = big_case
    folder = _out_dir(source, "unforced")
    output = folder / "out.safetensors"
    argv = _fc2conv("convert", source, "--map", layer_map, "-o", output)
    processes = [_start(argv), _start(argv)]
    results = sorted((p.wait(timeout=180), p.communicate()[1]) for p in processes)
    (first, _), (second, loser) = results
    assert (first, second) == (0, 2), results
    assert "Traceback" not in loser
    assert loser.splitlines() == [f"error: {output}: already exists; pass --force to replace it"]
    assert _temp_files(folder) == []
    assert _sha256(output) == _sha256(reference)


# ------------------------------------------------------------------------- determinism


def test_same_torch_conversion_twice_is_byte_identical(tmp_path, run_cli, case):
    layer_map, _ = case
    source = _torch_zip(tmp_path / "model.pth")
    outputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for output in outputs:
        assert _convert(run_cli, source, layer_map, output).code == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def _without_digest(path: Path, digest: str) -> bytes:
    data = path.read_bytes()
    assert data.count(digest.encode()) == 1
    return data.replace(digest.encode(), b"0" * 64)


@pytest.mark.parametrize(
    "map_text",
    [MAP, MAP.replace("layout: chw", "layout: whc\nweight_format: in_out")],
    ids=["chw-out_in", "whc-in_out"],
)
def test_safetensors_key_and_data_order_do_not_change_the_output(tmp_path, run_cli, map_text):
    tensors = _tensors()
    if "in_out" in map_text:
        tensors["head.0.weight"] = np.ascontiguousarray(tensors["head.0.weight"].T)
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(map_text)
    names = sorted(tensors)
    orders = [names, names[::-1], names[2:] + names[:2]]
    results = []
    for index, order in enumerate(orders):
        folder = tmp_path / f"order{index}"
        folder.mkdir()
        source = _write_safetensors(folder / "model.safetensors", [(n, tensors[n]) for n in order])
        header = json.loads(
            source.read_bytes()[8 : 8 + int.from_bytes(source.read_bytes()[:8], "little")]
        )
        assert [k for k in header] == order  # the header really is in this order
        output = folder / "out.safetensors"
        assert _convert(run_cli, source, layer_map, output).code == 0
        results.append(_without_digest(output, _sha256(source)))
        loaded = load_file(str(output))
        assert loaded["fc.weight"].shape == (5, 4, 2, 3)
    assert len({_sha256(folder / "model.safetensors") for folder in tmp_path.glob("order*")}) == 3
    assert results[0] == results[1] == results[2]


def test_torch_source_dict_order_changes_only_the_source_digest(tmp_path, run_cli, case):
    layer_map, _ = case
    tensors = {k: torch.from_numpy(v) for k, v in _tensors().items()}
    results = []
    for index, order in enumerate([sorted(tensors), sorted(tensors, reverse=True)]):
        folder = tmp_path / f"order{index}"
        folder.mkdir()
        source = folder / "model.pth"
        buffer = io.BytesIO()
        torch.save({name: tensors[name] for name in order}, buffer)
        source.write_bytes(buffer.getvalue())
        output = folder / "out.safetensors"
        assert _convert(run_cli, source, layer_map, output).code == 0
        results.append((_sha256(source), _without_digest(output, _sha256(source))))
    assert results[0][0] != results[1][0]
    assert results[0][1] == results[1][1]


# ------------------------------------------------------------------------ broken pipes
# Convention: a reader that closes the pipe early (`| head -c 1`, `| true`) changes
# nothing about the run. The conversion completes and publishes, a --json file is still
# written, and the exit code is the one the run earned (0, or 1 / 2 for a failure): never
# 1 for a passing conversion, never a traceback. What was still due on the pipe is dropped.


def _closed_pipe_run(*args: object) -> subprocess.CompletedProcess:
    """Run fc2conv with stdout a pipe whose reader has already gone: every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            _fc2conv(*args),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
            cwd=ROOT,
        )
    finally:
        os.close(write_end)


def _shell_pipeline(reader: str, *args: object) -> subprocess.CompletedProcess:
    """``fc2conv ARGS | READER`` in bash; the return code is fc2conv's (PIPESTATUS)."""
    return subprocess.run(
        ["bash", "-c", f'"$@" | {reader}; exit "${{PIPESTATUS[0]}}"', "pipeline", *_fc2conv(*args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def _quiet(done: subprocess.CompletedProcess) -> None:
    for noise in ("Traceback", "Exception ignored", "BrokenPipeError", "Broken pipe"):
        assert noise not in done.stderr, done.stderr


@pytest.fixture
def pipe_case(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    (tmp_path / "map.yaml").write_text(MAP)
    return source, tmp_path / "map.yaml", tmp_path / "out.safetensors"


def _assert_published(source: Path, output: Path) -> None:
    written = load_file(str(output))
    np.testing.assert_array_equal(
        written["fc.weight"], load_file(str(source))["head.0.weight"].reshape(5, 4, 2, 3)
    )
    assert _temp_files(output.parent) == []


@pytest.mark.parametrize("json_to", [None, "-", "file"])
def test_a_closed_stdout_never_turns_a_passing_conversion_into_a_failure(pipe_case, json_to):
    source, layer_map, output = pipe_case
    extra = (
        [] if json_to is None else ["--json", "-" if json_to == "-" else output.parent / "r.json"]
    )
    done = _closed_pipe_run("convert", source, "--map", layer_map, "-o", output, *extra)
    assert done.returncode == 0, done.stderr
    _quiet(done)
    _assert_published(source, output)
    if json_to == "-":
        assert "head.0.weight -> fc.weight" in done.stderr  # the table went to stderr, as always
    else:
        assert done.stderr == ""  # nothing more written anywhere
    if json_to == "file":
        assert json.loads((output.parent / "r.json").read_text())["published"] is True


def test_a_closed_stdout_keeps_the_exit_code_of_a_refused_run(pipe_case):
    source, layer_map, output = pipe_case
    output.write_bytes(b"someone else's file")
    done = _closed_pipe_run("convert", source, "--map", layer_map, "-o", output, "--json", "-")
    assert done.returncode == 2, done.stderr
    _quiet(done)
    assert done.stderr.splitlines() == [
        f"error: {output}: already exists; pass --force to replace it"
    ]
    assert output.read_bytes() == b"someone else's file"


@pytest.mark.parametrize(
    "command",
    [("inspect", "--suggest-map"), ("inspect",), ("verify",), ("convert", "--dry-run"), ("batch",)],
    ids=["inspect --suggest-map", "inspect", "verify", "convert --dry-run", "batch"],
)
def test_a_closed_stdout_is_quiet_for_every_command(pipe_case, command):
    source, layer_map, output = pipe_case
    if command[0] == "verify":
        assert _cli("convert", source, "--map", layer_map, "-o", output).returncode == 0
        argv = ["verify", source, output, "--map", layer_map]
    elif command[0] == "batch":
        argv = ["batch", "--map", layer_map, "-o", output.parent / "batch", "--jobs", "1", source]
    elif command[0] == "inspect":
        argv = [*command[:1], source, *command[1:]]
    else:
        argv = ["convert", source, "--map", layer_map, "-o", output, *command[1:]]
    done = _closed_pipe_run(*argv)
    assert done.returncode == 0, done.stderr
    _quiet(done)
    if command[0] == "batch":
        _assert_published(source, output.parent / "batch" / "model.safetensors")


@pytest.mark.parametrize("reader", ["head -c 1", "true"])
@pytest.mark.parametrize("json_flag", [(), ("--json", "-")], ids=["table", "json"])
def test_a_shell_pipeline_that_stops_reading_exits_0_and_publishes(pipe_case, reader, json_flag):
    source, layer_map, output = pipe_case
    done = _shell_pipeline(reader, "convert", source, "--map", layer_map, "-o", output, *json_flag)
    assert done.returncode == 0, done.stderr
    _quiet(done)
    _assert_published(source, output)
