"""The layout math against a brute-force flat-index formula, for every permutation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fc2conv_cli.layout import Layout

ALL_LAYOUTS = ["".join(p) for axes in ("cl", "chw", "cdhw") for p in itertools.permutations(axes)]


def flat_index(layout: str, sizes: dict[str, int], coords: dict[str, int]) -> int:
    """i = sum over axes (slowest first) of coord * product of the faster axes' sizes."""
    index = 0
    for axis in layout:
        index = index * sizes[axis] + coords[axis]
    return index


def kernel_for(layout: Layout) -> tuple[int, ...]:
    return (2, 3, 4)[: layout.spatial_ndim] if layout.spatial_ndim < 3 else (2, 3, 2)


@pytest.mark.parametrize("text", ALL_LAYOUTS)
def test_fc_rows_to_conv_matches_brute_force(text):
    layout = Layout.parse(text)
    channels, kernel = 3, kernel_for(layout)
    sizes = dict(zip(layout.canonical, (channels, *kernel), strict=True))
    in_features = channels * int(np.prod(kernel))
    weight = np.arange(5 * in_features, dtype=np.float64).reshape(5, in_features)
    conv = layout.fc_rows_to_conv(weight, channels, kernel)
    assert conv.shape == (5, channels, *kernel)
    for o in range(5):
        for position in np.ndindex(channels, *kernel):
            coords = dict(zip(layout.canonical, position, strict=True))
            assert conv[(o, *position)] == weight[o, flat_index(text, sizes, coords)]


@pytest.mark.parametrize("text", ALL_LAYOUTS)
def test_flatten_matches_brute_force(text):
    layout = Layout.parse(text)
    channels, kernel = 2, kernel_for(layout)
    sizes = dict(zip(layout.canonical, (channels, *kernel), strict=True))
    x = np.random.default_rng(0).standard_normal((3, channels, *kernel))
    flat = layout.flatten(x)
    assert flat.shape == (3, x[0].size)
    for n in range(3):
        for position in np.ndindex(channels, *kernel):
            coords = dict(zip(layout.canonical, position, strict=True))
            assert flat[n, flat_index(text, sizes, coords)] == x[(n, *position)]


def test_torch_flatten_orders_are_the_named_layouts():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for text, flattened in {
        "chw": x.flatten(1),
        "hwc": x.permute(0, 2, 3, 1).flatten(1),
        "whc": x.permute(0, 3, 2, 1).flatten(1),
    }.items():
        np.testing.assert_array_equal(Layout.parse(text).flatten(x.numpy()), flattened.numpy())


def test_chw_conversion_is_a_pure_reshape():
    weight = np.arange(2 * 12).reshape(2, 12)
    conv = Layout.parse("chw").fc_rows_to_conv(weight, 3, (2, 2))
    assert np.shares_memory(conv, weight)
    assert Layout.parse("chw").is_canonical and not Layout.parse("hwc").is_canonical


@pytest.mark.parametrize("text", ["", "hw", "chww", "cxy", "chwl", "cdh", "c", "ll"])
def test_invalid_layouts_are_refused(text):
    with pytest.raises(ValueError, match="not a permutation of 'c' and the spatial axes"):
        Layout.parse(text)


def test_parse_normalises_case_and_space():
    assert Layout.parse(" HWC ").axes == "hwc"
    assert Layout.parse("whc").sizes(512, (7, 5)) == (5, 7, 512)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_conv_formats_round_trip_for_any_number_of_spatial_axes(ndim):
    from fc2conv_cli.layout import ConvFormat

    kernel = (2, 3, 4)[:ndim]
    oihw = np.arange(5 * 6 * math.prod(kernel)).reshape(5, 6, *kernel)
    hwio = oihw.transpose(ConvFormat.HWIO.from_oihw(ndim))
    assert hwio.shape == ConvFormat.HWIO.shape(5, 6, kernel) == (*kernel, 6, 5)
    assert hwio[(*(k - 1 for k in kernel), 2, 4)] == oihw[(4, 2, *(k - 1 for k in kernel))]
    assert np.array_equal(hwio.transpose(ConvFormat.HWIO.to_oihw(ndim)), oihw)
    assert ConvFormat.OIHW.shape(5, 6, kernel) == (5, 6, *kernel)
