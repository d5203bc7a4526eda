"""The written ``.safetensors`` file: exact bytes, determinism, provenance, atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from fc2conv_cli import __version__
from fc2conv_cli.write import CONVERSION_VERSION

ITEM_SIZES = {"I64": 8, "F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}

MAP = """\
version: 1
layout: chw
layers:
  - name: head.0
    rename: fc
    kernel: [2, 3]
"""


def _tensors() -> dict[str, np.ndarray]:
    """Mixed dtypes, so order and alignment matter; head.0 is Linear(24, 5) on 4 x 2 x 3."""
    rng = np.random.default_rng(1)
    return {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "backbone.steps": np.array([3], np.int64),
        "backbone.scale": rng.standard_normal(3).astype(np.float16),
        "backbone.mask": np.array([1, 0, 1], np.uint8),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }


def _case(folder: Path) -> tuple[Path, Path]:
    source = folder / "model.safetensors"
    save_file(_tensors(), str(source))
    layer_map = folder / "map.yaml"
    layer_map.write_text(MAP)
    return source, layer_map


def _convert(run_cli, source: Path, layer_map: Path, output: Path, *extra: object) -> None:
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, *extra)
    assert outcome.code == 0, outcome.stderr


def _split(path: Path) -> tuple[int, dict, bytes]:
    """Header length, header JSON and data bytes of a safetensors file."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _staged(tmp_path: Path):
    """Plan the standard case and stage it beside ``out.safetensors``; returns (staged, source)."""
    from fc2conv_cli.layer_map import read_layer_map
    from fc2conv_cli.plan import build_plan
    from fc2conv_cli.readers import open_checkpoint
    from fc2conv_cli.write import write_safetensors

    source, layer_map = _case(tmp_path)
    target = tmp_path / "out.safetensors"
    with open_checkpoint(source) as checkpoint:
        plan = build_plan(checkpoint.tensors, read_layer_map(layer_map))
        staged = write_safetensors(plan, checkpoint, target, {"source_file": source.name})
    return staged, source


# ---------------------------------------------------------------------------- determinism


def test_same_input_twice_gives_identical_bytes(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    _convert(run_cli, source, layer_map, tmp_path / "a.safetensors")
    _convert(run_cli, source, layer_map, tmp_path / "b.safetensors", "--seed", "7")
    first = (tmp_path / "a.safetensors").read_bytes()
    assert first == (tmp_path / "b.safetensors").read_bytes()
    _convert(run_cli, source, layer_map, tmp_path / "a.safetensors", "--force")
    assert (tmp_path / "a.safetensors").read_bytes() == first


def test_source_tensor_order_does_not_change_the_output(tmp_path, run_cli):
    import torch

    tensors = _tensors()
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    results = []
    for folder, names in (("fwd", list(tensors)), ("rev", list(tensors)[::-1])):
        (tmp_path / folder).mkdir()
        source = tmp_path / folder / "model.pth"  # a pickle keeps the dict's order
        torch.save({name: torch.from_numpy(tensors[name]) for name in names}, source)
        output = tmp_path / folder / "out.safetensors"
        _convert(run_cli, source, layer_map, output)
        results.append((hashlib.sha256(source.read_bytes()).hexdigest(), output.read_bytes()))
    (digest_a, bytes_a), (digest_b, bytes_b) = results
    assert digest_a != digest_b  # the sources really differ
    # The outputs differ only in the recorded digest of their source files.
    assert bytes_a.count(digest_a.encode()) == 1
    assert bytes_a.replace(digest_a.encode(), digest_b.encode()) == bytes_b


def test_golden_bytes_of_a_tiny_conversion(tmp_path, run_cli):
    # A Linear(4, 2) that read a 2-channel 1 x 2 map flattened channels-last (hwc), and an
    # int64 counter that is copied. Expected bytes are built here from the format's spec.
    weight = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
    steps = np.array([7], np.int64)
    source = tmp_path / "tiny.safetensors"
    save_file({"head.0.weight": weight, "steps": steps}, str(source))
    map_text = (
        "version: 1\nlayout: hwc\nlayers:\n  - name: head.0\n    rename: conv\n    kernel: [1, 2]\n"
    )
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(map_text)
    output = tmp_path / "tiny_fcn.safetensors"
    _convert(run_cli, source, layer_map, output)

    # hwc: flat index i = (h * W + w) * C + c, with H=1, W=2, C=2; conv weight is [o, c, h, w].
    conv = np.empty((2, 2, 1, 2), np.float32)
    for o in range(2):
        for c in range(2):
            for w in range(2):
                conv[o, c, 0, w] = weight[o, w * 2 + c]
    assert conv[0].ravel().tolist() == [0.0, 0.5, 0.25, 0.75]  # the bytes really moved
    # These bytes are conversion version 1. If this test fails because fc2conv now writes
    # other bytes, bump write.CONVERSION_VERSION (batch then converts old outputs again)
    # and the version here.
    assert CONVERSION_VERSION == 1
    metadata = {
        "conversion_version": "1",
        "format": "pt",
        "fc2conv_version": __version__,
        "source_file": "tiny.safetensors",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "layer_map": map_text,
        "layer_map_sha256": hashlib.sha256(map_text.encode()).hexdigest(),
    }
    header = {  # widest dtype first, so every tensor is aligned
        "__metadata__": metadata,
        "conv.weight": {"dtype": "F32", "shape": [2, 2, 1, 2], "data_offsets": [8, 40]},
        "steps": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
    }
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    data = steps.astype("<i8").tobytes() + conv.astype("<f4").tobytes()
    expected = len(text).to_bytes(8, "little") + text + data

    written = output.read_bytes()
    assert written[:8] == expected[:8]
    assert written[8 : 8 + len(text)] == text
    assert written[8 + len(text) :] == data
    assert written == expected


# ------------------------------------------------------------------- loading, provenance


def test_output_loads_and_records_its_provenance(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    tensors = _tensors()
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)

    loaded = load_file(str(output))
    expected_names = set(tensors) - {"head.0.weight", "head.0.bias"} | {"fc.weight", "fc.bias"}
    assert set(loaded) == expected_names
    np.testing.assert_array_equal(loaded["fc.weight"], tensors["head.0.weight"].reshape(5, 4, 2, 3))
    np.testing.assert_array_equal(loaded["fc.bias"], tensors["head.0.bias"])
    for name in ("backbone.weight", "backbone.steps", "backbone.scale", "backbone.mask"):
        assert loaded[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(loaded[name], tensors[name])

    with safetensors.safe_open(str(output), framework="numpy") as file:
        assert set(file.keys()) == expected_names
        assert file.get_tensor("fc.weight").shape == (5, 4, 2, 3)
        metadata = file.metadata()
    assert metadata["fc2conv_version"] == __version__
    assert metadata["source_file"] == "model.safetensors"
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["layer_map"] == MAP
    assert metadata["layer_map_sha256"] == hashlib.sha256(MAP.encode()).hexdigest()


def test_tensors_are_ordered_and_aligned(tmp_path, run_cli):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)
    length, header, data = _split(output)
    assert length % 8 == 0  # the data starts 8-aligned in the file
    entries = {name: e for name, e in header.items() if name != "__metadata__"}
    assert {e["dtype"] for e in entries.values()} == {"I64", "F32", "F16", "U8"}
    for name, entry in entries.items():
        start, end = entry["data_offsets"]
        assert start % ITEM_SIZES[entry["dtype"]] == 0, (name, entry)
        assert (8 + length + start) % ITEM_SIZES[entry["dtype"]] == 0, (name, entry)
        assert end - start == int(np.prod(entry["shape"])) * ITEM_SIZES[entry["dtype"]]
    # Contiguous, no holes, widest dtype first and then by name.
    order = sorted(entries, key=lambda n: entries[n]["data_offsets"][0])
    assert order == sorted(entries, key=lambda n: (-ITEM_SIZES[entries[n]["dtype"]], n))
    ends = [0] + [entries[n]["data_offsets"][1] for n in order]
    assert [entries[n]["data_offsets"][0] for n in order] == ends[:-1]
    assert ends[-1] == len(data)


# ------------------------------------------------------------------------------ atomicity


def _fail_after_some_bytes(monkeypatch, calls: list[str]) -> None:
    """The second tensor writes part of its bytes, then the disk is full."""
    from fc2conv_cli import write

    original = write._write_tensor

    def failing(file, planned, checkpoint):
        calls.append(planned.name)
        if len(calls) == 2:
            file.write(b"\0" * 5)
            file.flush()
            assert os.fstat(file.fileno()).st_size > 8  # header and a tensor are on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(file, planned, checkpoint)

    monkeypatch.setattr(write, "_write_tensor", failing)


def test_disk_full_mid_write_raises_output_error_and_leaves_no_temp(tmp_path, monkeypatch):
    from fc2conv_cli.errors import OutputError

    calls: list[str] = []
    _fail_after_some_bytes(monkeypatch, calls)
    with pytest.raises(OutputError, match=r"out\.safetensors: cannot write: No space left"):
        _staged(tmp_path)
    assert len(calls) == 2
    assert _temp_files(tmp_path) == []
    assert not (tmp_path / "out.safetensors").exists()


def test_disk_full_mid_write_exits_2_in_one_line(tmp_path, run_cli, monkeypatch):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    calls: list[str] = []
    _fail_after_some_bytes(monkeypatch, calls)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert len(calls) == 2
    assert outcome.code == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert str(output) in lines[0]
    assert "No space left" in lines[0]
    assert not output.exists()
    assert _temp_files(tmp_path) == []


def test_failing_fsync_at_seal_raises_output_error_and_leaves_no_temp(tmp_path, monkeypatch):
    from fc2conv_cli.errors import OutputError

    staged, source = _staged(tmp_path)
    assert staged.temp.exists()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="cannot write: No space left"):
        staged.seal(hashlib.sha256(source.read_bytes()).hexdigest())
    assert not staged.temp.exists()
    assert _temp_files(tmp_path) == []
    assert not staged.target.exists()


def test_publish_without_overwrite_refuses_a_target_that_appeared(tmp_path):
    from fc2conv_cli.errors import OutputError

    staged, source = _staged(tmp_path)
    assert staged.temp.exists()
    assert staged.temp.parent == tmp_path
    assert staged.temp.name.startswith(".out.safetensors.")
    assert staged.temp.name.endswith(".tmp")
    staged.seal(hashlib.sha256(source.read_bytes()).hexdigest())
    staged.target.write_bytes(b"someone else's file")  # appeared after staging
    with pytest.raises(OutputError, match="already exists"):
        staged.publish(overwrite=False)
    assert staged.target.read_bytes() == b"someone else's file"
    assert not staged.temp.exists()
    assert _temp_files(tmp_path) == []


def test_publish_with_overwrite_replaces_the_target(tmp_path):
    staged, source = _staged(tmp_path)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    staged.seal(digest)
    staged.target.write_bytes(b"old")
    staged.publish(overwrite=True)
    with safetensors.safe_open(str(staged.target), framework="numpy") as file:
        assert file.metadata()["source_sha256"] == digest
        assert sorted(file.keys()) == [
            "backbone.mask",
            "backbone.scale",
            "backbone.steps",
            "backbone.weight",
            "fc.bias",
            "fc.weight",
        ]
    assert _temp_files(tmp_path) == []


# ------------------------------------------------------------------------ torch specifics


def test_tied_and_strided_torch_tensors_are_written_in_full(tmp_path, run_cli):
    import torch

    weight = torch.arange(120, dtype=torch.float32).reshape(5, 24) / 7
    bias = torch.arange(5, dtype=torch.float32)
    transposed = weight.t()
    rows = weight[1:3]  # same storage, at an offset
    assert not transposed.is_contiguous()
    assert transposed.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    source = tmp_path / "tied.pth"
    torch.save(
        {
            "head.0.weight": weight,
            "head.0.bias": bias,
            "tied.weight": weight,  # the same tensor under a second name
            "t.weight": transposed,
            "rows.weight": rows,
        },
        source,
    )
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)

    loaded = load_file(str(output))
    assert set(loaded) == {"fc.weight", "fc.bias", "tied.weight", "t.weight", "rows.weight"}
    np.testing.assert_array_equal(loaded["fc.weight"], weight.numpy().reshape(5, 4, 2, 3))
    np.testing.assert_array_equal(loaded["fc.bias"], bias.numpy())
    np.testing.assert_array_equal(loaded["tied.weight"], weight.numpy())
    assert loaded["t.weight"].shape == (24, 5)
    np.testing.assert_array_equal(loaded["t.weight"], weight.numpy().T)
    np.testing.assert_array_equal(loaded["rows.weight"], weight.numpy()[1:3])
    _, header, data = _split(output)
    spans = [e["data_offsets"] for name, e in header.items() if name != "__metadata__"]
    assert sum(end - start for start, end in spans) == len(data) == (120 * 3 + 5 + 48) * 4
    assert len({start for start, _ in spans}) == len(spans)  # no two names share bytes


# ------------------------------------------------- the safetensors library checks the file


def _with_header_edit(monkeypatch, edit) -> None:
    """Every header the writer makes goes through ``edit(entries)`` first (a writer bug)."""
    from fc2conv_cli import write

    original = write._header

    def edited(plan, metadata):
        length_and_text = original(plan, metadata)
        entries = json.loads(length_and_text[8:])
        edit(entries)
        text = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    monkeypatch.setattr(write, "_header", edited)


def _overlap(entries: dict) -> None:
    entries["fc.bias"]["data_offsets"][0] -= 4  # overlaps its neighbour: not a valid file


def _reshape(entries: dict) -> None:
    entries["fc.weight"]["shape"] = [5, 24]  # the same bytes, but not the planned shape


def _previous_output(run_cli, source: Path, layer_map: Path, output: Path, force: bool):
    """With --force, a good earlier output is there to be replaced; returns its bytes."""
    if not force:
        return None
    _convert(run_cli, source, layer_map, output)
    return output.read_bytes()


def _assert_not_published(output: Path, before: bytes | None) -> None:
    if before is None:
        assert not output.exists()
    else:
        assert output.read_bytes() == before  # the earlier output is untouched
    assert _temp_files(output.parent) == []


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_overlap, "the safetensors library refuses the file fc2conv wrote"),
        (_reshape, "fc.weight: F32 [5, 24], planned F32 [5, 4, 2, 3]"),
    ],
    ids=["refused", "index differs"],
)
def test_a_file_safetensors_refuses_or_reads_differently_is_never_published(
    tmp_path, run_cli, monkeypatch, force, edit, needle
):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = _previous_output(run_cli, source, layer_map, output, force)
    _with_header_edit(monkeypatch, edit)
    # --no-check: nothing of fc2conv's own reads the file back; safetensors alone stands guard.
    extra = ["--no-check"] + (["--force"] if force else [])
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, *extra)
    assert outcome.code == 3, outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert needle in lines[0] and "nothing was published" in lines[0]
    assert "bug" in lines[0] and str(output) in lines[0]
    _assert_not_published(output, before)


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
def test_checks_pass_but_safetensors_refuses_exit_3(tmp_path, run_cli, monkeypatch, force):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = _previous_output(run_cli, source, layer_map, output, force)
    opened: list[str] = []

    def refusing(path, framework, **kwargs):
        opened.append(path)
        raise safetensors.SafetensorError("Error while deserializing header: simulated refusal")

    monkeypatch.setattr(safetensors, "safe_open", refusing)
    report = tmp_path / "report.json"
    extra = ["--force"] if force else []
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report, *extra)
    assert outcome.code == 3, outcome.stderr
    assert "simulated refusal" in outcome.stderr and "Traceback" not in outcome.stderr
    error = json.loads(report.read_text())["error"]
    assert error["code"] == "internal_error" and error["exit_code"] == 3
    assert len(opened) == 1 and Path(opened[0]).name.endswith(".tmp")  # the staged file
    _assert_not_published(output, before)


def test_an_old_safetensors_that_lacks_a_dtype_exits_2_and_says_upgrade(
    tmp_path, run_cli, monkeypatch
):
    # What safetensors < 0.6 says of F8_E8M0; simulated here with a dtype the file holds.
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"

    def old(path, framework, **kwargs):
        raise safetensors.SafetensorError(
            "Error while deserializing header: invalid JSON in header: unknown variant `F16`, "
            "expected one of `BOOL`, `U8`, `I8`, `F32` at line 1 column 91"
        )

    monkeypatch.setattr(safetensors, "safe_open", old)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 2, outcome.stderr
    assert "cannot read dtype F16" in outcome.stderr and "upgrade" in outcome.stderr
    _assert_not_published(output, None)


def test_the_check_reads_every_dtype_of_the_index(tmp_path, run_cli, monkeypatch):
    # The real library, the real file: names, dtypes, shapes and metadata all compared.
    from fc2conv_cli import write

    seen = []
    original = write._check_with_safetensors

    def spy(temp, target, index, metadata):
        seen.append((dict(index), dict(metadata)))
        original(temp, target, index, metadata)

    monkeypatch.setattr(write, "_check_with_safetensors", spy)
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)
    [(index, metadata)] = seen
    with safetensors.safe_open(str(output), framework="numpy") as file:
        assert metadata == file.metadata()
        assert index == {
            name: (file.get_slice(name).get_dtype(), tuple(file.get_slice(name).get_shape()))
            for name in file.keys()  # noqa: SIM118
        }
    assert {dtype for dtype, _ in index.values()} == {"F32", "I64", "F16", "U8"}
    assert metadata["conversion_version"] == str(CONVERSION_VERSION)


# -------------------------------------------------------------------------- portability


def _no_hard_links(monkeypatch, code: int, calls: list | None = None) -> None:
    def link(src, dst, *args, **kwargs):
        if calls is not None:
            calls.append(dst)
        raise OSError(code, os.strerror(code), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", link)


# ENOTSUP and EOPNOTSUPP are one value on Linux, two on macOS.
NO_LINK_ERRNOS = sorted({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EACCES})


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
def test_without_fdatasync_fsync_is_used(tmp_path, run_cli, monkeypatch, force):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = _previous_output(run_cli, source, layer_map, output, force)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.delattr(os, "fdatasync")  # macOS
    monkeypatch.setattr(os, "fsync", fsync)
    extra = ["--force"] if force else []
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, *extra)
    assert outcome.code == 0, outcome.stderr
    assert len(synced) >= 3  # the data in the background, the sealed file, the folder
    assert load_file(str(output))["fc.weight"].shape == (5, 4, 2, 3)
    if before is not None:
        assert output.read_bytes() == before  # the same conversion, published anew
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("code", NO_LINK_ERRNOS, ids=[errno.errorcode[c] for c in NO_LINK_ERRNOS])
def test_without_hard_links_a_new_output_is_published(tmp_path, run_cli, monkeypatch, code):
    source, layer_map = _case(tmp_path)
    reference = tmp_path / "reference.safetensors"
    _convert(run_cli, source, layer_map, reference)
    output = tmp_path / "out.safetensors"
    calls: list = []
    _no_hard_links(monkeypatch, code, calls)
    _convert(run_cli, source, layer_map, output)
    assert [str(c) for c in calls] == [str(output)]
    assert output.read_bytes() == reference.read_bytes()
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP], ids=["EPERM", "EOPNOTSUPP"])
def test_without_hard_links_an_existing_output_is_never_clobbered(
    tmp_path, run_cli, monkeypatch, code
):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"someone else's file")
    _no_hard_links(monkeypatch, code)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 2 and "already exists" in outcome.stderr
    assert output.read_bytes() == b"someone else's file"
    # --force replaces it, with a rename: no link needed.
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--force")
    assert outcome.code == 0, outcome.stderr
    assert load_file(str(output))["fc.bias"].shape == (5,)
    assert _temp_files(tmp_path) == []


def test_without_hard_links_a_target_that_appears_before_publishing_is_kept(tmp_path, monkeypatch):
    from fc2conv_cli.errors import OutputError

    staged, source = _staged(tmp_path)
    staged.seal(hashlib.sha256(source.read_bytes()).hexdigest())

    def link(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"appeared meanwhile")  # another writer wins the race
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(OutputError, match="already exists"):
        staged.publish(overwrite=False)
    assert staged.target.read_bytes() == b"appeared meanwhile"
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("failure", "code"),
    [(OSError(errno.EIO, os.strerror(errno.EIO)), 2), (KeyboardInterrupt(), 130)],
    ids=["EIO", "KeyboardInterrupt"],
)
def test_without_hard_links_a_failed_rename_removes_the_claim(
    tmp_path, run_cli, monkeypatch, failure, code
):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    _no_hard_links(monkeypatch, errno.EPERM)
    real_replace = os.replace
    claimed = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == output:
            claimed.append(output.exists() and output.stat().st_size == 0)
            raise failure
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == code, outcome.stderr
    assert claimed == [True]  # the name was claimed (empty) before the rename
    assert not output.exists()  # and the claim removed after it failed
    assert _temp_files(tmp_path) == []


def test_a_folder_that_cannot_be_synced_still_publishes(tmp_path, run_cli, monkeypatch):
    import stat

    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # SMB, some FUSE
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _convert(run_cli, source, layer_map, output)
    assert load_file(str(output))["fc.weight"].shape == (5, 4, 2, 3)


# ------------------------------------------------------- any exception leaves no temp file


def _fail_at(monkeypatch, stage: str, failure: BaseException) -> list[str]:
    """Raise ``failure`` at ``stage`` of the write; returns the stages that were reached."""
    from fc2conv_cli import write

    reached: list[str] = []
    if stage == "mid-write":
        original = write._write_tensor

        def failing(file, planned, checkpoint):
            if reached:
                file.write(b"\0" * 5)
                raise failure
            reached.append(stage)
            return original(file, planned, checkpoint)

        monkeypatch.setattr(write, "_write_tensor", failing)
    elif stage == "seal":
        real_fsync = os.fsync

        def fsync(fd):
            if Path(os.readlink(f"/proc/self/fd/{fd}")).name.endswith(".tmp"):
                reached.append(stage)
                raise failure
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif stage == "safetensors check":

        def check(*args):
            reached.append(stage)
            raise failure

        monkeypatch.setattr(write, "_check_with_safetensors", check)
    else:  # publish

        def fail(*args, **kwargs):
            reached.append(stage)
            raise failure

        monkeypatch.setattr(os, "link", fail)
        monkeypatch.setattr(os, "replace", fail)
    return reached


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
@pytest.mark.parametrize(
    ("failure", "code"),
    [(KeyboardInterrupt(), 130), (ValueError("a bug"), 3), (MemoryError(), 3)],
    ids=["KeyboardInterrupt", "ValueError", "MemoryError"],
)
@pytest.mark.parametrize("stage", ["mid-write", "seal", "safetensors check", "publish"])
def test_any_exception_at_any_stage_leaves_no_temp_file(
    tmp_path, run_cli, monkeypatch, stage, failure, code, force
):
    source, layer_map = _case(tmp_path)
    output = tmp_path / "out.safetensors"
    before = _previous_output(run_cli, source, layer_map, output, force)
    reached = _fail_at(monkeypatch, stage, failure)
    extra = ["--force"] if force else []
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, *extra)
    assert reached, f"{stage} was never reached"
    assert outcome.code == code, outcome.stderr
    _assert_not_published(output, before)


def test_staged_file_methods_clean_up_on_a_non_os_error(tmp_path, monkeypatch):
    staged, _ = _staged(tmp_path)
    with pytest.raises(ValueError, match="64-character"):
        staged.seal("not a digest")
    assert _temp_files(tmp_path) == [] and not staged.target.exists()
    staged, _ = _staged(tmp_path)
    with pytest.raises(ValueError, match="seal"):
        staged.publish(overwrite=False)  # not sealed: a caller's bug, still cleaned up
    assert _temp_files(tmp_path) == [] and not staged.target.exists()


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV], ids=["EPERM", "EXDEV"])
def test_a_suggested_map_is_written_without_hard_links_and_never_clobbers(
    tmp_path, run_cli, monkeypatch, code
):
    source, _ = _case(tmp_path)
    target = tmp_path / "suggested.yaml"
    _no_hard_links(monkeypatch, code)
    outcome = run_cli("inspect", source, "--suggest-map", "-o", target)
    assert outcome.code == 0, outcome.stderr
    assert "layers:" in target.read_text()

    from fc2conv_cli.errors import OutputError
    from fc2conv_cli.write import write_text

    target.write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        write_text(target, "theirs", overwrite=False)
    assert target.read_text() == "mine"
    write_text(target, "theirs", overwrite=True)
    assert target.read_text() == "theirs"
    assert _temp_files(tmp_path) == []


def test_write_text_cleans_up_after_any_exception(tmp_path, monkeypatch):
    from fc2conv_cli.write import write_text

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text(tmp_path / "map.yaml", "text", overwrite=True)
    assert _temp_files(tmp_path) == [] and not (tmp_path / "map.yaml").exists()


def test_temp_names_are_recognised(tmp_path):
    from fc2conv_cli.write import _temp_path, is_temp_file

    target = tmp_path / "model.safetensors"
    assert all(is_temp_file(_temp_path(target)) for _ in range(20))
    assert not is_temp_file(target)
    assert not is_temp_file(tmp_path / ".model.safetensors")
    assert not is_temp_file(tmp_path / "model.tmp.safetensors")


@pytest.mark.parametrize(
    "kernel",
    ["copies", "cannot (EXDEV)", "cannot (ENOSYS)", "fails (EIO)", "input ends early"],
)
def test_byte_copies_stay_in_the_kernel_where_it_can(tmp_path, run_cli, monkeypatch, kernel):
    """copy_file_range for bytes that do not change; where it cannot, the same bytes by
    writes; where it fails, exit 2 and nothing left."""
    source, layer_map = _case(tmp_path)
    _convert(run_cli, source, layer_map, tmp_path / "written.safetensors", "--no-check")
    expected = (tmp_path / "written.safetensors").read_bytes()
    original, calls = os.copy_file_range, []

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if kernel.startswith("cannot"):
            code = errno.EXDEV if "EXDEV" in kernel else errno.ENOSYS
            raise OSError(code, os.strerror(code))
        if kernel == "fails (EIO)":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if kernel == "input ends early":
            return 0
        return original(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert calls  # the byte copies were offered to the kernel
    if kernel in ("copies",) or kernel.startswith("cannot"):
        assert outcome.code == 0, outcome.stderr
        assert output.read_bytes()[:8] == expected[:8]
        assert _split(output)[2] == _split(tmp_path / "written.safetensors")[2]
    else:
        assert outcome.code == 2 and len(outcome.stderr.strip().splitlines()) == 1
        assert "cannot write" in outcome.stderr
        assert not output.exists() and _temp_files(tmp_path) == []
