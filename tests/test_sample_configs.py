"""Every shipped map (``fc2conv_cli/sample_configs``) converts its architecture as documented.

Each checkpoint has exactly the tensor names and shapes of the real network
(``bench/zoo.py``), with small random float16 weights: the files are real-sized (120 to
290 MB), so each architecture is converted once, in a module-scoped fixture shared by the
tests below, and deleted afterwards. float16 halves the bytes to write and read; the
checks compute in float64 whatever the stored dtype, so their precision is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zoo
from safetensors import safe_open
from safetensors.numpy import load_file

from fc2conv_cli.cli import run

ROOT = Path(__file__).resolve().parent.parent
DTYPE = "float16"


@dataclass(frozen=True)
class Layer:
    """One FC layer as the sample map should convert it."""

    weight: str  # source tensor
    bias: str
    out_weight: str  # output tensors: a converted tensor keeps its name unless renamed
    out_bias: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    to_conv: Callable[[np.ndarray], np.ndarray]  # the reshape / permute, written out by hand


def _torchvision(indices: tuple[int, int, int], channels: int, side: int) -> list[Layer]:
    """torchvision's ``classifier.N``: chw flatten, (out, in) weights, renamed fc6 / fc7 / fc8."""
    in_features = channels * side * side
    first, *later = (f"classifier.{i}" for i in indices)
    return [
        Layer(
            f"{first}.weight",
            f"{first}.bias",
            "fc6.weight",
            "fc6.bias",
            (4096, in_features),
            (4096, channels, side, side),
            lambda w: w.reshape(4096, channels, side, side),
        ),
        Layer(
            f"{later[0]}.weight",
            f"{later[0]}.bias",
            "fc7.weight",
            "fc7.bias",
            (4096, 4096),
            (4096, 4096, 1, 1),
            lambda w: w.reshape(4096, 4096, 1, 1),
        ),
        Layer(
            f"{later[1]}.weight",
            f"{later[1]}.bias",
            "fc8.weight",
            "fc8.bias",
            (1000, 4096),
            (1000, 4096, 1, 1),
            lambda w: w.reshape(1000, 4096, 1, 1),
        ),
    ]


_KERAS = [
    # Dense kernel (in, out) on a 7x7x512 NHWC map flattened hwc: transpose, then h, w, c
    # become the filter's c, h, w.
    Layer(
        "fc1/kernel",
        "fc1/bias",
        "fc1/kernel",
        "fc1/bias",
        (25088, 4096),
        (4096, 512, 7, 7),
        lambda k: k.T.reshape(4096, 7, 7, 512).transpose(0, 3, 1, 2),
    ),
    Layer(
        "fc2/kernel",
        "fc2/bias",
        "fc2/kernel",
        "fc2/bias",
        (4096, 4096),
        (4096, 4096, 1, 1),
        lambda k: k.T.reshape(4096, 4096, 1, 1),
    ),
    Layer(
        "predictions/kernel",
        "predictions/bias",
        "predictions/kernel",
        "predictions/bias",
        (4096, 1000),
        (1000, 4096, 1, 1),
        lambda k: k.T.reshape(1000, 4096, 1, 1),
    ),
]


@dataclass(frozen=True)
class Arch:
    layers: list[Layer]
    layout: str
    weight_format: str
    suffix: str = ".safetensors"


ARCHS = {
    # One torch-format file, read through torch.load(weights_only=True, mmap=True).
    "alexnet": Arch(_torchvision((1, 4, 6), 256, 6), "chw", "out_in", ".pth"),
    "vgg11": Arch(_torchvision((0, 3, 6), 512, 7), "chw", "out_in"),
    "vgg16": Arch(_torchvision((0, 3, 6), 512, 7), "chw", "out_in"),
    "vgg19": Arch(_torchvision((0, 3, 6), 512, 7), "chw", "out_in"),
    "vgg16_keras": Arch(_KERAS, "hwc", "in_out"),
}


@dataclass(frozen=True)
class Converted:
    arch: str
    spec: Arch
    source: Path
    output: Path
    map_path: Path
    exit_code: int
    report: dict

    def source_tensors(self) -> dict[str, np.ndarray]:
        if self.source.suffix == ".safetensors":
            return load_file(str(self.source))
        import torch

        return {k: v.numpy() for k, v in torch.load(self.source, weights_only=True).items()}


@pytest.fixture(scope="module", params=list(ARCHS))
def converted(request, tmp_path_factory) -> Iterator[Converted]:
    """One real-sized checkpoint per architecture, converted once with its sample map."""
    arch, spec = request.param, ARCHS[request.param]
    folder = tmp_path_factory.mktemp(arch)
    source = zoo.save_checkpoint(
        zoo.state_dict_shapes(arch), folder / f"{arch}{spec.suffix}", seed=5, dtype=DTYPE
    )
    map_path = ROOT / "fc2conv_cli" / "sample_configs" / f"{arch}.yaml"
    output = folder / f"{arch}_fcn.safetensors"
    report = folder / "report.json"
    argv = ["convert", source, "--map", map_path, "-o", output, "--json", report]
    code = run([str(a) for a in argv])
    yield Converted(arch, spec, source, output, map_path, code, json.loads(report.read_text()))
    shutil.rmtree(folder)


def test_report_lists_the_three_layers_with_their_shapes(converted):
    assert converted.exit_code == 0
    report, spec = converted.report, converted.spec
    assert report["ok"] and report["published"] and report["checked"]
    assert [
        (la["weight"], la["bias"], la["output_weight"], la["old_shape"], la["new_shape"])
        for la in report["layers"]
    ] == [
        (e.weight, e.bias, e.out_weight, list(e.old_shape), list(e.new_shape)) for e in spec.layers
    ]
    for layer in report["layers"]:
        assert (layer["layout"], layer["weight_format"]) == (spec.layout, spec.weight_format)
        # chw + (out, in) is a pure reshape: only the header changes.
        assert layer["bytes_unchanged"] is (spec.layout == "chw" and spec.weight_format == "out_in")
    fc_names = {name for e in spec.layers for name in (e.weight, e.bias)}
    assert report["copied"] == len(set(zoo.state_dict_shapes(converted.arch)) - fc_names)
    assert report["copy_mismatches"] == [] and report["index_problems"] == []


def test_every_check_passes_in_float64(converted):
    first, *later = converted.report["layers"]
    for layer in converted.report["layers"]:
        assert layer["ok"] is True
        assert layer["max_abs_diff"] is not None and layer["max_abs_diff"] < 1e-9
    # The 7x7 (6x6) first layer also gets the dense check; 1x1 layers do not need it.
    assert first["dense_max_abs_diff"] is not None and first["dense_max_abs_diff"] < 1e-9
    assert all(layer["dense_max_abs_diff"] is None for layer in later)


def test_output_holds_the_converted_weights_and_the_copies(converted):
    written = load_file(str(converted.output))
    source = converted.source_tensors()
    spec = converted.spec
    fc_names = {name for e in spec.layers for name in (e.weight, e.bias)}
    copied = set(source) - fc_names
    converted_names = {name for e in spec.layers for name in (e.out_weight, e.out_bias)}
    assert set(written) == copied | converted_names
    assert all(str(t.dtype) == DTYPE for t in written.values())
    for expected in spec.layers:
        weight = written[expected.out_weight]
        assert weight.shape == expected.new_shape
        assert source[expected.weight].shape == expected.old_shape
        _assert_same_bits(weight, expected.to_conv(source[expected.weight]), expected.out_weight)
        _assert_same_bits(written[expected.out_bias], source[expected.bias], expected.bias)
    for name in copied:
        _assert_same_bits(written[name], source[name], name)


def _assert_same_bits(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    """Bit-for-bit equality: converting only moves values, it never rounds them.

    (Also ~100x faster than ``assert_array_equal`` on 100M float16 values.)
    """
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), name
    bits = np.dtype(f"u{actual.itemsize}")
    same = actual.view(bits) == expected.view(bits)
    assert same.all(), f"{name}: {same.size - int(same.sum())} of {same.size} values differ"


def test_output_records_its_provenance(converted):
    with safe_open(str(converted.output), "np") as file:
        metadata = file.metadata()
    assert metadata["layer_map"] == converted.map_path.read_text()
    assert metadata["source_file"] == converted.source.name
    digest = hashlib.sha256(converted.source.read_bytes()).hexdigest()
    assert metadata["source_sha256"] == digest
