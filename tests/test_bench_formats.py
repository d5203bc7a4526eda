"""bench_formats: its layouts are Keras' own math, its maps name its tensors, and a
failing case fails the bench."""

from __future__ import annotations

import sys
from pathlib import Path

import bench_formats as bench  # bench/ is on sys.path (conftest.py)
import numpy as np
import pytest
from bench_convert import Case, Measurement

from fc2conv_cli.layer_map import parse_layer_map


def _tiny_torch_vgg16() -> dict[str, np.ndarray]:
    """torchvision VGG16's names with tiny arrays; fc6 keeps its 25088 inputs."""
    t = {}
    for index, *_ in bench._convs():
        t[f"features.{index}.weight"] = np.zeros((2, 1, 3, 3), np.float32)
        t[f"features.{index}.bias"] = np.zeros(2, np.float32)
    for position, (name, _, _) in enumerate(bench._FCS):
        t[f"{name}.weight"] = np.zeros((2, 25088 if position == 0 else 2), np.float32)
        t[f"{name}.bias"] = np.zeros(2, np.float32)
    return t


def test_keras_fc1_kernel_gives_the_torch_linear_on_an_nhwc_flatten():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 512 * 7 * 7))  # torch Linear: (out, in), chw inputs
    features = rng.standard_normal((512, 7, 7))  # one (c, h, w) feature map
    kernel = bench._keras_fc(weight, first=True)
    assert kernel.shape == (25088, 3)
    keras_out = features.transpose(1, 2, 0).reshape(-1) @ kernel  # Flatten on NHWC
    np.testing.assert_allclose(keras_out, weight @ features.reshape(-1), rtol=1e-12)
    np.testing.assert_array_equal(bench._keras_fc(weight[:, :3], first=False), weight[:, :3].T)


def test_conv_kernels_are_hwio_and_names_follow_each_format():
    t = _tiny_torch_vgg16()
    t["features.0.weight"] = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    keras = bench.keras_arrays(t)
    assert len(keras) == 32 and list(keras)[:2] == ["block1_conv1/kernel", "block1_conv1/bias"]
    assert keras["block1_conv1/kernel"].shape == (3, 3, 1, 2)
    assert keras["block1_conv1/kernel"][1, 2, 0, 1] == t["features.0.weight"][1, 0, 1, 2]
    assert list(keras)[-2:] == ["predictions/kernel", "predictions/bias"]
    caffe = bench.caffe_arrays(t)
    assert {"conv5_3.weight", "fc6.weight", "fc8.bias"} <= set(caffe)
    assert caffe["conv1_1.weight"] is t["features.0.weight"]  # Caffe is NCHW, (out, in)
    assert list(bench.npz_arrays(t))[-2:] == ["fc8_W", "fc8_b"]
    assert list(bench.npy_arrays(t))[:2] == ["conv1_1.0", "conv1_1.1"]


@pytest.mark.parametrize(("map_name", "arrays"), [("npz.yaml", "npz_arrays"),
                                                  ("npy.yaml", "npy_arrays")])  # fmt: skip
def test_written_maps_parse_and_name_existing_tensors(map_name, arrays):
    layer_map = parse_layer_map(bench.MAPS[map_name], map_name)
    names = set(getattr(bench, arrays)(_tiny_torch_vgg16()))
    assert [rule.name for rule in layer_map.rules] == ["fc6", "fc7", "fc8"]
    for rule in layer_map.rules:
        assert {rule.weight, rule.bias} <= names


def test_every_format_has_a_twin_that_is_its_own_baseline():
    for fixture in bench.FIXTURES:
        if fixture.twin is not None:
            twin = bench.BY_KEY[fixture.twin]
            assert twin.twin is None and twin.file.endswith(".safetensors")
            assert twin.map == fixture.map  # converted with the same map


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_missing_output_or_a_failing_exit_fails_the_case(tmp_path):
    def case(key: str, code: str) -> Case:
        output = tmp_path / f"{key}.safetensors"
        return Case(key, key, [[*_python(code), str(output)]], output=output)

    writes = case("writes", "import sys; open(sys.argv[1], 'w').write('x')")
    silent = case("silent", "pass")
    failing = case("failing", "import sys; sys.exit(3)")
    bench.run_rounds([writes, silent, failing], 1, tmp_path)
    assert not writes.failures and writes.output.is_file() and len(writes.runs) == 1
    assert silent.failures == ["exit 0 but no output file"] * 2  # warm-up and run 1
    assert failing.failures[0].startswith("exit 3")


def test_table_gives_paired_ratios_to_the_twin_and_marks_failures(tmp_path):
    (tmp_path / "vgg16.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / "vgg16.pth").write_bytes(b"\0" * 3_000_000)
    cases = [Case("safetensors", ".st", [["true"]]), Case("pth", ".pth", [["true"]])]
    walls = ((0.9, 1.0, 1.2), (2.7, 2.0, 3.6))  # per round: 3x, 2x, 3x the twin's
    cpus = ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5))
    for case, wall, cpu in zip(cases, walls, cpus, strict=True):
        case.runs = [Measurement(w, 40.0, 1000.0, 0, 5, c) for w, c in zip(wall, cpu, strict=True)]
    cases[1].failures.append("exit 2")
    table = bench.render(cases, Path(tmp_path), ["header"]).splitlines()
    assert table[-2] == (
        "| .st | 2 MB | 1.00 s (0.90-1.20) | baseline | 1.00 s | baseline | 40 MiB | 1000 MiB |"
    )
    assert table[-1] == (
        "| .pth **FAILED** | 3 MB | 2.70 s (2.00-3.60) | 3.00 x | 1.50 s | 1.50 x | 40 MiB"
        " | 1000 MiB |"
    )  # 3.00 x: the median of the rounds' ratios, not 2.70 / 1.00
