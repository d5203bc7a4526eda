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
    metadata = {
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
