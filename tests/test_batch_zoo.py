"""A zoo of every reader's format in one ``fc2conv batch`` (issue 10): each file comes out
byte for byte as ``fc2conv convert`` writes it, with the map (and ``--format``) of its group.

Each file is built by its framework's own library, with the builders of the readers' tests:
Keras (``.keras``, ``.weights.h5``), onnx, protobuf from the shipped ``caffe.proto``, TF.js
JSON plus shards, numpy (``.npz``, a pickled dict ``.npy``), torch and safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

import numpy as np
import pytest

# The readers' tests' builders (tests/ is on sys.path: conftest.py lives there). Each
# skips, and so this module, where its framework is not installed.
import test_batch
import test_reader_caffe as caffe_tests
import test_reader_keras as keras_tests
import test_reader_onnx as onnx_tests
import test_reader_tfjs as tfjs_tests

pytestmark = [
    pytest.mark.slow,  # about 30 s: nine conversions twice, Keras and torch imported
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

NUMPY_MAP = (
    "version: 1\nlayout: hwc\n"
    "layers:\n  - {name: fc6, kernel: [3, 3], in_channels: 4, weight: fc6_W, bias: fc6_b}\n"
)
NUMPY_DICT_MAP = (
    "version: 1\nlayout: hwc\n"
    "layers:\n  - {name: fc6, kernel: [3, 3], in_channels: 4, weight: fc6.0, bias: fc6.1}\n"
)


@dataclass(frozen=True)
class Group:
    """One job group: the files its glob matches, its map, and its ``format:`` if any."""

    name: str
    inputs: str  # the glob, relative to the zoo
    map_text: str
    files: tuple[str, ...]  # what the glob must match, relative to the zoo
    format: str | None = None


def _numpy_head(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fc6 of a TF-era dump: (in, out) weights over a 3 x 3 x 4 map, and a bias."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((36, 5)).astype(np.float32), rng.standard_normal(5).astype(
        np.float32
    )


def build_zoo(root: Path) -> tuple[Group, ...]:
    """One file per reader format under ``root``, each in a folder of its own."""
    for folder in ("safetensors", "torch", "keras", "onnx", "caffe", "tfjs", "numpy"):
        (root / folder).mkdir(parents=True)
    test_batch.save(root / "safetensors/a.safetensors", test_batch.tensors(0))
    test_batch.save(root / "torch/b.pth", test_batch.tensors(1))

    model = keras_tests._vgg_like(seed=3)
    model.save(root / "keras/vgg.keras")
    model.save_weights(root / "keras/vgg.weights.h5")

    onnx_tests.save(onnx_tests.gemm_model(seed=4), root / "onnx/head.onnx")

    # A caffemodel under a name whose suffix says torch: only format: caffe reads it.
    built = caffe_tests._build(root / "caffe", "V2", "F32", seed=5)
    built.model.rename(root / "caffe/weights.bin")
    built.prototxt.unlink()

    tfjs_model = tfjs_tests._keras_model()
    tfjs_tests._export_layers_model(root / "tfjs/web", tfjs_model)  # model.json + 2 shards

    weight, bias = _numpy_head(6)
    np.savez(root / "numpy/dump.npz", fc6_W=weight, fc6_b=bias, conv1=np.ones((3, 3, 2, 4)))
    weight, bias = _numpy_head(7)
    np.save(root / "numpy/dict.npy", {"fc6": [weight, bias], "lr": 0.1}, allow_pickle=True)

    keras_map = keras_tests._map_text()
    return (
        Group("safetensors", "safetensors/*", test_batch.MAP, ("safetensors/a.safetensors",)),
        Group("torch", "torch/*.pth", test_batch.MAP, ("torch/b.pth",), "torch"),
        Group("keras", "keras/*.keras", keras_map, ("keras/vgg.keras",)),
        Group("keras_h5", "keras/*.weights.h5", keras_map, ("keras/vgg.weights.h5",), "keras"),
        Group("onnx", "onnx/**/*.onnx", onnx_tests.GEMM_MAP, ("onnx/head.onnx",)),
        Group(
            "caffe",
            "caffe/*.bin",
            caffe_tests.MAP.format(weight_format=""),
            ("caffe/weights.bin",),
            "caffe",
        ),
        Group("tfjs", "tfjs/**/model.json", tfjs_tests._MAP, ("tfjs/web/model.json",)),
        Group("npz", "numpy/*.npz", NUMPY_MAP, ("numpy/dump.npz",)),
        Group("npy", "numpy/*.npy", NUMPY_DICT_MAP, ("numpy/dict.npy",), "numpy"),
    )


def write_manifest(root: Path, groups: tuple[Group, ...]) -> Path:
    """A manifest with one job group per format, each with its own map file."""
    (root / "maps").mkdir()
    lines = ["version: 1", "output_dir: converted", "jobs:"]
    for group in groups:
        (root / "maps" / f"{group.name}.yaml").write_text(group.map_text)
        lines += [f"  - inputs: '{group.inputs}'", f"    map: maps/{group.name}.yaml"]
        if group.format is not None:
            lines.append(f"    format: {group.format}")
    manifest = root / "manifest.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, tuple[Group, ...]]:
    root = tmp_path_factory.mktemp("zoo")
    groups = build_zoo(root)
    write_manifest(root, groups)
    return root, groups


def _statuses(report: Path, root: Path) -> dict[str, str]:
    files = json.loads(report.read_text())["files"]
    return {str(Path(f["input"]).relative_to(root)): f["status"] for f in files}


def _output(root: Path, relative: str) -> Path:
    return root / "converted" / Path(relative).with_suffix(".safetensors")


def test_a_zoo_of_every_format_converts_each_file_as_convert_does(run_cli, zoo, tmp_path):
    root, groups = zoo
    expected = {f: g for g in groups for f in g.files}
    manifest, report = root / "manifest.yaml", tmp_path / "batch.json"

    # The dry run opens each file as the conversion will: with its group's format.
    outcome = run_cli("batch", manifest, "--dry-run", "--jobs", 2, "--json", report)
    assert outcome.code == 0, outcome.stderr
    assert _statuses(report, root) == dict.fromkeys(expected, "would convert")
    assert not (root / "converted").exists()

    outcome = run_cli("batch", manifest, "--jobs", 2, "--json", report)
    assert outcome.code == 0, outcome.stderr + outcome.stdout
    assert _statuses(report, root) == dict.fromkeys(expected, "converted")
    written = sorted(p.relative_to(root / "converted") for p in (root / "converted").rglob("*"))
    assert [p for p in written if p.suffix == ".safetensors"] == sorted(
        Path(f).with_suffix(".safetensors") for f in expected
    )
    assert not any(p.name.endswith(".tmp") for p in written)

    # Byte for byte what `fc2conv convert` writes for the same input, map and format.
    for relative, group in expected.items():
        reference = tmp_path / "reference" / f"{group.name}.safetensors"
        reference.parent.mkdir(exist_ok=True)
        args = ["--format", group.format] if group.format else []
        map_path = root / "maps" / f"{group.name}.yaml"
        outcome = run_cli("convert", root / relative, "--map", map_path, "-o", reference, *args)
        assert outcome.code == 0, (relative, outcome.stderr)
        assert _output(root, relative).read_bytes() == reference.read_bytes(), relative

    # The up-to-date check reads each output's record of its source: all skipped.
    outcome = run_cli("batch", manifest, "--jobs", 2, "--json", report)
    assert outcome.code == 0, outcome.stderr
    assert _statuses(report, root) == dict.fromkeys(expected, "up to date")


def test_without_its_format_key_the_renamed_caffemodel_is_refused(run_cli, zoo, tmp_path):
    # weights.bin says torch, and a bare protobuf's content says nothing: read as torch, it
    # fails in one line that names it, and only it; the other formats are still found.
    root, _ = zoo
    text = (root / "manifest.yaml").read_text()
    assert "    format: caffe\n" in text
    edited = root / "no_caffe_format.yaml"
    edited.write_text(text.replace("    format: caffe\n", ""))
    report, out = tmp_path / "report.json", tmp_path / "out"
    outcome = run_cli("batch", edited, "-o", out, "--jobs", 2, "--json", report)
    assert outcome.code == 1, outcome.stderr
    found = _statuses(report, root)
    assert found.pop("caffe/weights.bin") == "error"
    assert set(found.values()) == {"converted"} and len(found) == 8
    [line] = [line for line in outcome.stderr.splitlines() if "caffe/weights.bin" in line]
    assert " error: " in line
    assert not (out / "caffe/weights.safetensors").exists()
