"""The checks: numpy conv against torch, and each check able to fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fc2conv_cli.check import (
    check_copies,
    check_index,
    check_layer,
    conv_nd,
)
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.pipeline import DEFAULT_ATOL
from fc2conv_cli.plan import build_plan
from fc2conv_cli.readers import Checkpoint, TensorInfo

torch = pytest.importorskip("torch")
CODES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16"}


def in_memory(arrays: dict[str, np.ndarray]) -> Checkpoint:
    """A Checkpoint over numpy arrays, no file: what the checks see."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    tensors = {k: TensorInfo(k, CODES[v.dtype], v.shape) for k, v in arrays.items()}
    buffers = {k: memoryview(v.reshape(-1).view(np.uint8)) for k, v in arrays.items()}
    return Checkpoint(Path("<memory>"), "memory", tensors, buffers, ())


@pytest.mark.parametrize(
    ("spatial", "kernel", "conv"),
    [
        ((9,), (3,), "conv1d"),
        ((7, 8), (3, 2), "conv2d"),
        ((5, 6, 4), (2, 3, 2), "conv3d"),
        ((4, 4), (4, 4), "conv2d"),
    ],
)
def test_conv_nd_agrees_with_torch(spatial, kernel, conv):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, *spatial))
    weight = rng.standard_normal((5, 3, *kernel))
    bias = rng.standard_normal(5)
    expected = getattr(torch.nn.functional, conv)(
        torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
    ).numpy()
    got = conv_nd(x, weight, bias)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        conv_nd(x, weight), expected - bias.reshape(1, -1, *(1,) * len(kernel)), atol=1e-12
    )


def layer_setup(layout: str, weight_format: str = "out_in", kernel=(3, 2), channels=4):
    rng = np.random.default_rng(2)
    in_features = channels * int(np.prod(kernel))
    weight = rng.standard_normal((6, in_features)).astype(np.float32)
    stored = weight if weight_format == "out_in" else weight.T
    source = in_memory({"fc.weight": stored, "fc.bias": rng.standard_normal(6).astype(np.float32)})
    text = (
        f"version: 1\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"layers: [{{name: fc, kernel: {list(kernel)}}}]"
    )
    plan = build_plan(source.tensors, parse_layer_map(text))
    [layer] = plan.layers
    conv = layer.weight.conversion.layout.fc_rows_to_conv(weight, channels, kernel)
    return source, plan, layer, conv


@pytest.mark.parametrize("layout", ["chw", "hwc", "whc", "cwh"])
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
def test_a_correct_conversion_passes(layout, weight_format):
    source, plan, layer, conv = layer_setup(layout, weight_format)
    written = in_memory({"fc.weight": conv, "fc.bias": source.array("fc.bias")})
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert result.ok and result.dense_checked
    assert result.max_abs_diff < 1e-12 and result.dense_max_abs_diff < 1e-12
    assert check_copies(plan, source, written) == ()
    assert check_index(plan, written) == {}


def test_a_wrong_layout_fails_the_check():
    source, _, layer, _ = layer_setup("hwc")
    # Filters built as if the source had been flattened chw: right shape, wrong numbers.
    wrong = np.ascontiguousarray(source.array("fc.weight")).reshape(6, 4, 3, 2)
    written = in_memory({"fc.weight": wrong, "fc.bias": source.array("fc.bias")})
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert not result.ok
    assert result.max_abs_diff > 0.1 and result.dense_max_abs_diff > 0.1


def test_one_changed_weight_fails_and_the_dense_check_sees_it_too():
    source, _, layer, conv = layer_setup("chw")
    conv = conv.copy()
    conv[5, 3, 2, 1] += 1e-3
    written = in_memory({"fc.weight": conv, "fc.bias": source.array("fc.bias")})
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert not result.ok and result.max_abs_diff > 1e-5 and result.dense_max_abs_diff > 1e-5


def test_a_changed_bias_fails():
    source, _, layer, conv = layer_setup("chw")
    bias = source.array("fc.bias").copy()
    bias[0] = 7.0
    result = check_layer(layer, source, in_memory({"fc.weight": conv, "fc.bias": bias}), 1e-6, 0)
    assert not result.ok


def test_nan_in_the_output_fails_and_is_reported_as_none():
    source, _, layer, conv = layer_setup("chw")
    conv = conv.copy()
    conv[0, 0, 0, 0] = np.nan
    written = in_memory({"fc.weight": conv, "fc.bias": source.array("fc.bias")})
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert not result.ok and result.max_abs_diff is None


def test_nan_in_both_source_and_output_is_equal():
    source, _, layer, conv = layer_setup("chw")
    weight = np.array(source.array("fc.weight"))
    weight[0, 0] = np.nan
    source = in_memory({"fc.weight": weight, "fc.bias": source.array("fc.bias")})
    conv = weight.reshape(conv.shape)
    written = in_memory({"fc.weight": conv, "fc.bias": source.array("fc.bias")})
    assert check_layer(layer, source, written, DEFAULT_ATOL, seed=0).ok


def test_1x1_layers_skip_the_dense_check():
    source, _, layer, conv = layer_setup("chw", kernel=(1, 1), channels=24)
    written = in_memory({"fc.weight": conv, "fc.bias": source.array("fc.bias")})
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert result.ok and not result.dense_checked and result.dense_max_abs_diff is None


def test_copies_and_index_are_compared():
    source = in_memory(
        {"a": np.arange(10, dtype=np.float32), "fc.weight": np.ones((2, 4), np.float32)}
    )
    plan = build_plan(
        source.tensors, parse_layer_map("version: 1\nlayout: chw\nlayers: [{name: fc}]")
    )
    changed = np.arange(10, dtype=np.float32)
    changed[9] = -1
    written = in_memory({"a": changed, "fc.weight": np.ones((2, 4, 1, 1), np.float32)})
    assert check_copies(plan, source, written) == ("a",)
    assert check_index(plan, written) == {}
    extra = in_memory({"a": changed, "fc.weight": np.ones((2, 4), np.float32), "b": changed})
    assert check_index(plan, extra) == {
        "fc.weight": "written as F32 [2, 4], planned F32 [2, 4, 1, 1]",
        "b": "in the written file but not in the plan",
    }
    assert check_copies(plan, source, extra, skip={"a"}) == ()
