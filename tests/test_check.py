"""The checks: the exact bit check, the float64 window and dense checks, each able to fail;
numpy's convolution against torch's."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fc2conv_cli import check
from fc2conv_cli.check import (
    check_copies,
    check_index,
    check_layer,
    conv_nd,
    conv_to_fc_rows,
    fc_rows,
)
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.pipeline import DEFAULT_ATOL
from fc2conv_cli.plan import build_plan
from fc2conv_cli.readers import Checkpoint, TensorInfo

torch = pytest.importorskip("torch")
CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}
UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


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
        ((3, 5), (1, 1), "conv2d"),
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


def layer_setup(
    layout: str,
    weight_format: str = "out_in",
    kernel=(3, 2),
    channels=4,
    out_features=6,
    dtype=np.float32,
):
    """A source FC layer, its plan, and the correct conv weight (built independently)."""
    rng = np.random.default_rng(2)
    in_features = channels * int(np.prod(kernel))
    weight = rng.standard_normal((out_features, in_features)).astype(dtype)
    stored = weight if weight_format == "out_in" else weight.T
    bias = rng.standard_normal(out_features).astype(dtype)
    source = in_memory({"fc.weight": stored, "fc.bias": bias})
    text = (
        f"version: 1\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"layers: [{{name: fc, kernel: {list(kernel)}}}]"
    )
    plan = build_plan(source.tensors, parse_layer_map(text))
    [layer] = plan.layers
    # Wc[o, c, *k] = W[o, i(c, *k)], with i from the layout's strides.
    sizes = dict(zip("c" + "hw"[: len(kernel)], (channels, *kernel), strict=True))
    shaped = weight.reshape(out_features, *(sizes[a] for a in layout))
    conv = shaped.transpose(0, *(1 + layout.index(a) for a in "c" + "hw"[: len(kernel)]))
    return source, plan, layer, np.ascontiguousarray(conv)


def written_with(source, conv, bias=None) -> Checkpoint:
    return in_memory(
        {"fc.weight": conv, "fc.bias": source.array("fc.bias") if bias is None else bias}
    )


def with_bits(array: np.ndarray, index: tuple, bits: int) -> np.ndarray:
    """A copy of ``array`` with the value at ``index`` replaced by these raw bits."""
    changed = array.copy()
    changed.view(UNSIGNED[array.itemsize])[index] = bits
    return changed


def bits_of(array: np.ndarray, index: tuple) -> int:
    return int(array.view(UNSIGNED[array.itemsize])[index])


@pytest.mark.parametrize("layout", ["chw", "hwc", "whc", "cwh"])
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
def test_a_correct_conversion_passes(layout, weight_format):
    source, plan, layer, conv = layer_setup(layout, weight_format)
    result = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, seed=0)
    assert result.ok and result.bits_equal and result.mismatches == ()
    assert result.dense_checked and result.float64_rows == 6 and result.nonfinite_rows == 0
    assert result.max_abs_diff < 1e-12 and result.dense_max_abs_diff < 1e-12
    assert check_copies(plan, source, written_with(source, conv)) == ()
    assert check_index(plan, written_with(source, conv)) == {}


@pytest.mark.parametrize("layout", ["chw", "hwc", "whc"])
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
def test_conv_to_fc_rows_inverts_the_conversion(layout, weight_format):
    source, _, layer, conv = layer_setup(layout, weight_format)
    conversion = layer.weight.conversion
    expected = fc_rows(source.array("fc.weight"), conversion.weight_format, slice(1, 4))
    np.testing.assert_array_equal(conv_to_fc_rows(conv, conversion, slice(1, 4)), expected)


@pytest.mark.parametrize("layout", ["chw", "hwc", "whc"])
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
def test_a_one_ulp_change_fails_and_names_the_index_and_values(layout, weight_format):
    source, _, layer, conv = layer_setup(layout, weight_format)
    old = bits_of(conv, (5, 3, 2, 1))
    written = written_with(source, with_bits(conv, (5, 3, 2, 1), old + 1))
    result = check_layer(layer, source, written, DEFAULT_ATOL, seed=0)
    assert not result.ok and result.bits_equal is False
    # One ulp of a float32 ~1 is ~1e-7: the float64 figures alone would pass it.
    assert result.max_abs_diff < DEFAULT_ATOL
    [mismatch] = result.mismatches
    assert (mismatch.tensor, mismatch.output, mismatch.channel, mismatch.position) == (
        "fc.weight",
        5,
        3,
        (2, 1),
    )
    assert mismatch.count == 1
    assert mismatch.source.endswith(f"(0x{old:08x})") and mismatch.written.endswith(
        f"(0x{old + 1:08x})"
    )
    assert "at (output 5, channel 3, position (2, 1))" in mismatch.describe()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (0x7FC00000, 0x7FC00001),  # NaN payloads
        (0x7FC00000, 0xFFC00000),  # NaN signs
        (0x00000000, 0x80000000),  # 0.0 and -0.0
        (0x7F800000, 0x7F800001),  # Inf and a signalling NaN
    ],
    ids=["nan-payload", "nan-sign", "signed-zero", "inf-to-nan"],
)
def test_values_that_compare_equal_or_nan_are_told_apart_by_their_bits(before, after):
    source, _, layer, conv = layer_setup("chw")
    weight = with_bits(np.array(source.array("fc.weight")), (2, 7), before)
    source = in_memory({"fc.weight": weight, "fc.bias": source.array("fc.bias")})
    conv = weight.reshape(conv.shape)
    assert check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, 0).ok
    # Flat index 7 of row 2 is channel 1, position (0, 1) in chw (C=4, kernel 3x2).
    changed = with_bits(conv, (2, 1, 0, 1), after)
    result = check_layer(layer, source, written_with(source, changed), DEFAULT_ATOL, 0)
    assert not result.ok
    [mismatch] = result.mismatches
    assert (mismatch.output, mismatch.channel, mismatch.position) == (2, 1, (0, 1))


def test_nan_and_inf_in_a_row_do_not_hide_the_rest_of_it_or_other_rows():
    source, _, layer, conv = layer_setup("chw", out_features=6)
    weight = np.array(source.array("fc.weight"))
    weight[1, 0], weight[3, 5] = np.nan, np.inf
    source = in_memory({"fc.weight": weight, "fc.bias": source.array("fc.bias")})
    conv = weight.reshape(conv.shape)
    good = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, 0)
    assert good.ok and good.nonfinite_rows == 2
    assert good.max_abs_diff < 1e-12  # the other four rows are compared and agree

    # The NaN row's other values scrambled: the float64 outputs of that row are NaN either
    # way; the bits are not.
    scrambled = conv.copy()
    scrambled[1].reshape(-1)[1:] = scrambled[1].reshape(-1)[1:][::-1]
    result = check_layer(layer, source, written_with(source, scrambled), DEFAULT_ATOL, 0)
    assert not result.ok and result.mismatches[0].output == 1
    assert result.max_abs_diff < 1e-12  # honest: the finite rows do agree

    # A scrambled finite row beside the NaN row shows in the float64 figures too.
    scrambled = conv.copy()
    scrambled[4] = scrambled[4][::-1]
    result = check_layer(layer, source, written_with(source, scrambled), DEFAULT_ATOL, 0)
    assert not result.ok and result.mismatches[0].output == 4
    assert result.max_abs_diff > 1e-3 and result.dense_max_abs_diff > 1e-3


def test_a_changed_bias_fails_with_its_index():
    source, _, layer, conv = layer_setup("chw")
    bias = source.array("fc.bias").copy()
    bias[4] = 7.0
    result = check_layer(layer, source, written_with(source, conv, bias), DEFAULT_ATOL, 0)
    assert not result.ok and result.max_abs_diff > 1
    [mismatch] = result.mismatches
    assert (mismatch.tensor, mismatch.output, mismatch.channel) == ("fc.bias", 4, None)
    assert "fc.bias differs from the source at (output 4): " in mismatch.describe()
    assert mismatch.written == "7.0 (0x40e00000)"


def test_a_nan_where_the_source_is_finite_fails_and_is_reported_as_none():
    source, _, layer, conv = layer_setup("chw")
    conv = conv.copy()
    conv[0, 0, 0, 0] = np.nan
    result = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, seed=0)
    assert not result.ok and result.max_abs_diff is None and result.dense_max_abs_diff is None
    assert result.mismatches[0].written == "nan (0x7fc00000)"


def test_a_wrong_layout_fails_every_check():
    source, _, layer, _ = layer_setup("hwc")
    # Filters built as if the source had been flattened chw: right shape, wrong numbers.
    wrong = np.ascontiguousarray(source.array("fc.weight")).reshape(6, 4, 3, 2)
    result = check_layer(layer, source, written_with(source, wrong), DEFAULT_ATOL, seed=0)
    assert not result.ok and not result.bits_equal
    assert result.max_abs_diff > 0.1 and result.dense_max_abs_diff > 0.1


def test_the_float64_checks_do_not_rely_on_the_exact_checks_reading(monkeypatch):
    # Were the read-back function wrong in the same way as the writer, the exact check
    # would pass a wrong layout; the convolutions of the written filters still fail it.
    source, _, layer, _ = layer_setup("hwc")
    wrong = np.ascontiguousarray(source.array("fc.weight")).reshape(6, 4, 3, 2)
    monkeypatch.setattr(
        check,
        "conv_to_fc_rows",
        lambda weight, conversion, rows: weight[rows].reshape(len(weight[rows]), -1),
    )
    result = check_layer(layer, source, written_with(source, wrong), DEFAULT_ATOL, seed=0)
    assert result.bits_equal and not result.ok
    assert result.max_abs_diff > 0.1 and result.dense_max_abs_diff > 0.1


@pytest.mark.parametrize("torch_loaded", [True, False], ids=["torch", "numpy"])
def test_the_dense_check_is_a_real_convolution_with_either_library(monkeypatch, torch_loaded):
    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch")
    used = []
    real_conv_nd = check.conv_nd
    monkeypatch.setattr(check, "conv_nd", lambda *a: used.append(a[0].shape) or real_conv_nd(*a))
    source, _, layer, conv = layer_setup("whc", kernel=(3, 2))
    result = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, seed=0)
    assert result.ok and result.dense_max_abs_diff < 1e-12
    # Kernel-sized maps for the window check, one map a margin wider for the dense one.
    assert used == ([] if torch_loaded else [(2, 4, 3, 2), (1, 4, 4, 3)])


def test_1x1_layers_skip_the_dense_check():
    source, _, layer, conv = layer_setup("chw", kernel=(1, 1), channels=24)
    result = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, seed=0)
    assert result.ok and not result.dense_checked and result.dense_max_abs_diff is None


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64], ids=str)
def test_other_dtypes_are_checked_exactly(dtype):
    source, _, layer, conv = layer_setup("hwc", dtype=dtype)
    assert check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, 0).ok
    index = (0, 1, 2, 0)
    changed = with_bits(conv, index, bits_of(conv, index) ^ 1)
    result = check_layer(layer, source, written_with(source, changed), DEFAULT_ATOL, 0)
    assert not result.ok and result.mismatches[0].position == (2, 0)


def test_chunks_find_the_first_difference_and_count_them_all(monkeypatch):
    monkeypatch.setattr(check, "_CHECK_CHUNK_BYTES", 100)  # one row (24 float32) per chunk
    source, _, layer, conv = layer_setup("hwc", weight_format="in_out", out_features=9)
    changed = conv.copy()
    changed[7, 0, 0, 0] += 1
    changed[3, 2, 1, 1] += 1
    changed[3, 3, 2, 0] += 1
    result = check_layer(layer, source, written_with(source, changed), DEFAULT_ATOL, 0)
    [mismatch] = result.mismatches
    assert (mismatch.output, mismatch.channel, mismatch.position, mismatch.count) == (
        3,
        2,
        (1, 1),
        3,
    )


def test_large_layers_compute_float64_on_a_sample_plus_every_differing_row(monkeypatch):
    monkeypatch.setattr(check, "FLOAT64_FILTERS", 5)
    source, _, layer, conv = layer_setup("chw", out_features=40)
    good = check_layer(layer, source, written_with(source, conv), DEFAULT_ATOL, 0)
    assert good.ok and good.float64_rows == 5 and good.out_features == 40
    picked = set(check._float64_rows(40, 0, []).tolist())
    row = next(r for r in range(40) if r not in picked)
    changed = conv.copy()
    changed[row] *= 2
    result = check_layer(layer, source, written_with(source, changed), DEFAULT_ATOL, 0)
    assert result.float64_rows == 6 and result.max_abs_diff > 1e-3  # the row is shown
    assert result.mismatches[0].output == row


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


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_memory_stays_flat_on_a_vgg16_sized_layer(layout):
    # (4096, 25088) float32: 392 MiB on each side; the checks allocate a few chunks.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4096, 25088), dtype=np.float32)
    source = in_memory({"fc.weight": weight, "fc.bias": np.zeros(4096, np.float32)})
    plan = build_plan(
        source.tensors,
        parse_layer_map(f"version: 1\nlayout: {layout}\nlayers: [{{name: fc, kernel: [7, 7]}}]"),
    )
    [layer] = plan.layers
    conv = layer.weight.conversion.layout.fc_rows_to_conv(weight, 512, (7, 7))
    written = written_with(source, np.ascontiguousarray(conv))
    tracemalloc.start()
    try:
        result = check_layer(layer, source, written, DEFAULT_ATOL, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and result.float64_rows == check.FLOAT64_FILTERS
    assert peak < 48 << 20, f"{peak / 2**20:.0f} MiB"
