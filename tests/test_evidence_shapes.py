"""Section 1 of issue 11: every map shape the backbone allows, scored with every layout.

Small CNNs trained here (tests/test_guess.py's nets, plus (k, 1)-kernel nets) give FC
weights with spatial structure; the suggestion must find their map's shape and order, or
say it cannot tell. A wrong shape or order stated with confidence fails every test here.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from fc2conv_cli.evidence.geometry import ConvInfo, factorisations, map_shapes, orientation
from fc2conv_cli.guess import CONFIDENCE_THRESHOLD, guess_map
from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.suggest import suggest_map

torch = pytest.importorskip("torch")
from test_guess import CHANNELS, bars, trained_fc  # noqa: E402

nn = torch.nn
TWINS = {"chw": "cwh", "cwh": "chw", "hwc": "whc", "whc": "hwc", "hcw": "wch", "wch": "hcw"}


def suggest(tmp_path, tensors: dict[str, np.ndarray]):
    path = tmp_path / "net.safetensors"
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    with open_checkpoint(path) as checkpoint:
        return suggest_map(checkpoint, path.name)


def same_filters(shape, layout, true_shape, true_layout) -> bool:
    """True when (shape, layout) is the truth or its transposed twin (same filters)."""
    if (shape, layout) == (true_shape, true_layout):
        return True
    transposed = tuple(reversed(true_shape))
    return len(shape) == 2 and shape == transposed and layout == TWINS[true_layout]


def test_factorisations_cover_every_split():
    assert factorisations(4, 2) == [(1, 4), (2, 2), (4, 1)]
    assert len(factorisations(8, 3)) == 10 and all(np.prod(s) == 8 for s in factorisations(8, 3))
    assert factorisations(36, 1) == [(36,)]


def test_kernel_geometry_narrows_the_shapes():
    column = [ConvInfo("a", 8, 1, (3, 1)), ConvInfo("b", 8, 8, (5, 1)), ConvInfo("p", 8, 8, (1, 1))]
    assert orientation(column)[0] == "column"
    shapes, [note] = map_shapes(6, 2, column)
    assert shapes[0] == (6, 1) and set(shapes) == set(factorisations(6, 2))  # first, not only
    assert note.startswith("W = 1 is likely: every conv kernel larger than 1x1 is (k, 1)")
    row = [ConvInfo("a", 8, 1, (1, 3))]
    assert map_shapes(6, 2, row)[0][0] == (1, 6)
    square = [ConvInfo("a", 8, 1, (3, 3))]
    assert map_shapes(36, 2, square)[0][:3] == [(6, 6), (4, 9), (9, 4)]  # squarest, wide first
    tall = [ConvInfo("a", 8, 1, (5, 3)), ConvInfo("b", 8, 8, (3, 3))]
    assert orientation(tall)[0] == "tall" and map_shapes(12, 2, tall)[0][0] == (4, 3)


@pytest.mark.slow  # trains up to seven small nets
@pytest.mark.parametrize(
    ("order", "size"),
    [("hwc", (12, 48)), ("chw", (12, 48)), ("whc", (12, 48)), ("hwc", (28, 28)),
     ("chw", (16, 16)), ("chw", (12, 20)), ("whc", (12, 20))],
)  # fmt: skip
def test_trained_maps_are_found_or_said_to_be_unclear(tmp_path, order, size):
    weight, kernel, accuracy = trained_fc(order, size)
    assert accuracy > 0.8
    found = suggest(
        tmp_path,
        {"conv1.weight": np.zeros((8, 1, 3, 3)), "conv2.weight": np.zeros((CHANNELS, 8, 3, 3)),
         "fc.weight": weight},
    )  # fmt: skip
    assert found.in_channels == CHANNELS
    shapes = {shape for c in found.candidates for shape, _ in c.members}
    positions = int(np.prod(kernel))
    assert shapes == set(factorisations(positions, 2))  # every shape was scored
    if found.source == "weights":
        assert found.confidence >= CONFIDENCE_THRESHOLD
        assert same_filters(found.kernel, found.layout, kernel, order), found.text
    else:
        assert found.source == "default" and "cannot tell" in found.text


@pytest.mark.parametrize(("order", "size"), [("hwc", (12, 48)), ("hwc", (28, 28))])
def test_a_non_square_3x12_map_and_a_7x7_map_are_found(tmp_path, order, size):
    weight, kernel, _ = trained_fc(order, size)
    found = suggest(tmp_path, {"conv.weight": np.zeros((CHANNELS, 8, 3, 3)), "fc.weight": weight})
    assert (found.source, found.kernel, found.layout) == ("weights", kernel, order), found.text
    assert kernel in ((3, 12), (7, 7))
    doc = yaml.safe_load(found.text)
    assert (doc["layout"], doc["layers"][0]["kernel"]) == (order, list(kernel))


def _column_bars(n: int, length: int, gen):
    """1-D bumps laid out as an H x 1 image: (N, 1, length, 1)."""
    images, labels = bars(n, (length,), gen)
    return images[..., None], labels


@functools.cache
def trained_column_net(order: str, length: int = 32) -> tuple[dict[str, np.ndarray], int]:
    """A CNN with (3, 1) kernels and (2, 1) pools on H x 1 images, flattened ``order``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, (3, 1), padding=(1, 0)), nn.ReLU(), nn.MaxPool2d((2, 1)),
        nn.Conv2d(8, CHANNELS, (3, 1), padding=(1, 0)), nn.ReLU(), nn.MaxPool2d((2, 1)),
    )  # fmt: skip
    height = length // 4
    fc = nn.Linear(CHANNELS * height, 64)
    head = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))
    flatten = {
        "chw": lambda x: x.flatten(1),
        "hwc": lambda x: x.permute(0, 2, 3, 1).flatten(1),
    }[order]
    params = [*backbone.parameters(), *fc.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    images, labels = _column_bars(4096, length, gen)
    for _ in range(150):
        pick = torch.randint(0, len(images), (128,), generator=gen)
        loss = nn.functional.cross_entropy(head(fc(flatten(backbone(images[pick])))), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = {
        "features.0.weight": backbone[0].weight, "features.3.weight": backbone[3].weight,
        "fc.weight": fc.weight, "fc.bias": fc.bias, "out.weight": head[1].weight,
    }  # fmt: skip
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}, height


@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_h_by_1_maps_with_k_by_1_kernels(run_cli, tmp_path, order):
    tensors, height = trained_column_net(order)
    found = suggest(tmp_path, tensors)
    assert found.kernel == (height, 1)  # the weights say 1-D, the (3, 1) kernels which way
    assert any("W = 1 is likely" in note for note in found.ambiguities)
    assert {s for c in found.candidates for s, _ in c.members} == set(factorisations(height, 2))
    assert (found.source, found.layout) == ("weights", order), found.text
    assert found.shape_source in ("weights", "geometry")  # geometry: the kernels decided
    assert found.layers == ("fc", "out")


def test_without_the_kernels_an_h_by_1_map_is_never_a_confident_square(tmp_path):
    tensors, height = trained_column_net("chw")
    tensors["features.0.weight"] = np.zeros((8, 1, 3, 3))
    tensors["features.3.weight"] = np.zeros((CHANNELS, 8, 3, 3))
    found = suggest(tmp_path, tensors)
    if found.source == "weights":  # then only as the 1-D map it is, either way round
        assert found.kernel in ((height, 1), (1, height)) and found.layout == "chw"


@pytest.mark.parametrize("order", ["cl", "lc"])
def test_a_3d_conv_weight_means_a_1d_map(tmp_path, order):
    weight, kernel, _ = trained_fc(order, (32,))
    found = suggest(tmp_path, {"conv.weight": np.zeros((CHANNELS, 8, 3)), "fc.weight": weight})
    assert (found.kernel, found.layout, found.source) == (kernel, order, "weights")


def test_a_5d_conv_weight_means_a_3d_map_and_random_weights_cannot_tell(tmp_path):
    rng = np.random.default_rng(0)
    found = suggest(
        tmp_path,
        {"conv.weight": np.zeros((4, 2, 3, 3, 3)), "fc.weight": rng.standard_normal((6, 32))},
    )
    assert (found.kernel, found.layout, found.source) == ((2, 2, 2), "cdhw", "default")
    assert {s for c in found.candidates for s, _ in c.members} == set(factorisations(8, 3))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("positions", [12, 36])
def test_random_weights_are_never_confident(seed, positions):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((32, 8 * positions))
    result = guess_map(weight, 8, factorisations(positions, 2))
    assert result.best is None and result.reason.startswith("cannot tell")
