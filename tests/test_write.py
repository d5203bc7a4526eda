"""The written ``.safetensors`` file: exact bytes, determinism, metadata, atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from fc2conv_cli import __version__

SIZES = {"I64": 8, "F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}

MAP = """\
version: 1
layout: chw
layers:
  - name: head.0
    rename: fc
    kernel: [2, 3]
"""


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "backbone.steps": np.array([3], np.int64),
        "backbone.scale": rng.standard_normal(3).astype(np.float16),
        "backbone.mask": np.array([1, 0, 1], np.uint8),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
    }


def _convert(run_cli, source: Path, layer_map: Path, output: Path, *extra: object) -> None:
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, *extra)
    assert outcome.code == 0, outcome.stderr


def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _save_torch(path: Path, names: list[str]) -> None:
    import torch

    tensors = _tensors()
    torch.save({name: torch.from_numpy(tensors[name]) for name in names}, path)


def test_same_input_twice_gives_identical_bytes(tmp_path, run_cli):
    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    _convert(run_cli, source, layer_map, tmp_path / "a.safetensors")
    _convert(run_cli, source, layer_map, tmp_path / "b.safetensors", "--seed", "7")
    first = (tmp_path / "a.safetensors").read_bytes()
    assert first == (tmp_path / "b.safetensors").read_bytes()
    _convert(run_cli, source, layer_map, tmp_path / "a.safetensors", "--force")
    assert (tmp_path / "a.safetensors").read_bytes() == first


def test_source_tensor_order_does_not_change_the_output(tmp_path, run_cli):
    names = list(_tensors())
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    outputs = []
    for folder, order in (("fwd", names), ("rev", names[::-1])):
        (tmp_path / folder).mkdir()
        source = tmp_path / folder / "model.pth"  # a pickle keeps the dict's order
        _save_torch(source, order)
        output = tmp_path / folder / "out.safetensors"
        _convert(run_cli, source, layer_map, output)
        outputs.append((source, output))
    (src_a, out_a), (src_b, out_b) = outputs
    digest_a = hashlib.sha256(src_a.read_bytes()).hexdigest()
    digest_b = hashlib.sha256(src_b.read_bytes()).hexdigest()
    assert digest_a != digest_b  # the sources really differ
    # The outputs differ only in the recorded digest of their (different) source files.
    bytes_a, bytes_b = out_a.read_bytes(), out_b.read_bytes()
    assert bytes_a.count(digest_a.encode()) == 1
    assert bytes_a.replace(digest_a.encode(), digest_b.encode()) == bytes_b


def test_golden_bytes_of_a_tiny_conversion(tmp_path, run_cli):
    weight = np.arange(8, dtype=np.float32).reshape(2, 4) / 4  # (out 2, in 4), hwc flatten
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

    # in index = (h * W + w) * C + c with H=1, W=2, C=2; conv weight is (out, c, h, w).
    conv = np.empty((2, 2, 1, 2), np.float32)
    for o in range(2):
        for c in range(2):
            for w in range(2):
                conv[o, c, 0, w] = weight[o, w * 2 + c]
    metadata = {
        "format": "pt",
        "fc2conv_version": __version__,
        "source_file": "tiny.safetensors",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "layer_map": map_text,
        "layer_map_sha256": hashlib.sha256(map_text.encode()).hexdigest(),
    }
    header = {
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
    assert len(text) % 8 == 0


def test_output_loads_and_records_its_provenance(tmp_path, run_cli):
    source = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, str(source))
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)

    loaded = load_file(str(output))
    assert set(loaded) == set(tensors) - {"head.0.weight", "head.0.bias"} | {"fc.weight", "fc.bias"}
    np.testing.assert_array_equal(loaded["fc.weight"], tensors["head.0.weight"].reshape(5, 4, 2, 3))
    np.testing.assert_array_equal(loaded["fc.bias"], tensors["head.0.bias"])
    for name in ("backbone.weight", "backbone.steps", "backbone.scale", "backbone.mask"):
        assert loaded[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(loaded[name], tensors[name])

    with safetensors.safe_open(str(output), framework="numpy") as file:
        metadata = file.metadata()
    assert metadata["fc2conv_version"] == __version__
    assert metadata["source_file"] == "model.safetensors"
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["layer_map"] == MAP
    assert metadata["layer_map_sha256"] == hashlib.sha256(MAP.encode()).hexdigest()


def test_every_tensor_is_aligned_to_its_item_size(tmp_path, run_cli):
    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)
    header, data = _split(output)
    length = int.from_bytes(output.read_bytes()[:8], "little")
    assert length % 8 == 0
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {e["dtype"] for e in entries.values()} == {"I64", "F32", "F16", "U8"}
    for name, entry in entries.items():
        start = entry["data_offsets"][0]
        assert start % SIZES[entry["dtype"]] == 0, (name, entry)
    assert max(e["data_offsets"][1] for e in entries.values()) == len(data)
    # Widest dtypes first, then by name.
    order = sorted(entries, key=lambda n: entries[n]["data_offsets"][0])
    assert order == sorted(entries, key=lambda n: (-SIZES[entries[n]["dtype"]], n))


def test_disk_full_mid_write_exits_2_and_leaves_no_temp(tmp_path, run_cli, monkeypatch):
    from fc2conv_cli import write

    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    output = tmp_path / "out.safetensors"
    original = write._write_tensor
    calls = []

    def failing(file, planned, checkpoint):
        calls.append(planned.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(file, planned, checkpoint)

    monkeypatch.setattr(write, "_write_tensor", failing)
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert len(calls) == 2
    assert outcome.code == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert "No space left" in lines[0]
    assert str(output) in lines[0]
    assert not output.exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_publish_without_overwrite_refuses_a_target_that_appeared(tmp_path):
    from fc2conv_cli.checkpoint import open_checkpoint
    from fc2conv_cli.errors import OutputError
    from fc2conv_cli.layer_map import read_layer_map
    from fc2conv_cli.plan import build_plan
    from fc2conv_cli.write import write_safetensors

    source = tmp_path / "model.safetensors"
    save_file(_tensors(), str(source))
    layer_map_path = tmp_path / "map.yaml"
    layer_map_path.write_text(MAP)
    target = tmp_path / "out.safetensors"
    layer_map = read_layer_map(layer_map_path)
    with open_checkpoint(source) as checkpoint:
        plan = build_plan(checkpoint.tensors, layer_map)
        staged = write_safetensors(plan, checkpoint, target, {"source_file": source.name})
    assert staged.temp.exists()
    assert staged.temp.parent == tmp_path and staged.temp.name.startswith(".out.safetensors.")
    staged.seal(hashlib.sha256(source.read_bytes()).hexdigest())
    target.write_bytes(b"someone else's file")
    with pytest.raises(OutputError, match="already exists"):
        staged.publish(overwrite=False)
    assert target.read_bytes() == b"someone else's file"
    assert not staged.temp.exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_tied_and_transposed_torch_tensors_are_written_in_full(tmp_path, run_cli):
    import torch

    weight = torch.arange(120, dtype=torch.float32).reshape(5, 24) / 7
    bias = torch.arange(5, dtype=torch.float32)
    transposed = weight.t()
    assert not transposed.is_contiguous()
    source = tmp_path / "tied.pth"
    torch.save(
        {
            "head.0.weight": weight,
            "head.0.bias": bias,
            "tied.weight": weight,
            "t.weight": transposed,
        },
        source,
    )
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP)
    output = tmp_path / "out.safetensors"
    _convert(run_cli, source, layer_map, output)
    loaded = load_file(str(output))
    assert set(loaded) == {"fc.weight", "fc.bias", "tied.weight", "t.weight"}
    np.testing.assert_array_equal(loaded["fc.weight"], weight.numpy().reshape(5, 4, 2, 3))
    np.testing.assert_array_equal(loaded["fc.bias"], bias.numpy())
    np.testing.assert_array_equal(loaded["tied.weight"], weight.numpy())
    assert loaded["t.weight"].shape == (24, 5)
    np.testing.assert_array_equal(loaded["t.weight"], weight.numpy().T)
    header, data = _split(output)
    assert (
        sum(
            e["data_offsets"][1] - e["data_offsets"][0]
            for k, e in header.items()
            if k != "__metadata__"
        )
        == len(data)
        == (120 * 3 + 5) * 4
    )
