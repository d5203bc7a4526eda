"""The flatten-order guess on small CNNs trained here, in seconds, on images with spatial structure.

Each net: a conv backbone to an 8-channel map (4x4, 3x5 or length 8), flattened in one order,
then Linear -> ReLU -> Linear. The first Linear's weight must reveal the order (up to the h/w
twin on a square map), and random weights must give "cannot tell".
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import numpy as np
import pytest

from fc2conv_cli.guess import CONFIDENCE_THRESHOLD, LayoutGuess, candidate_layouts, guess_layout
from fc2conv_cli.layout import Layout, WeightFormat

torch = pytest.importorskip("torch")
nn = torch.nn

CHANNELS = 8
HIDDEN = 64
STEPS = 150
TWIN = {"chw": "cwh", "cwh": "chw", "hwc": "whc", "whc": "hwc", "hcw": "wch", "wch": "hcw"}
FLATTEN = {
    "chw": lambda x: x.flatten(1),
    "hwc": lambda x: x.permute(0, 2, 3, 1).flatten(1),
    "whc": lambda x: x.permute(0, 3, 2, 1).flatten(1),
    "cl": lambda x: x.flatten(1),
    "lc": lambda x: x.permute(0, 2, 1).flatten(1),
}


def bars(n: int, size: tuple[int, ...], gen: torch.Generator):
    """Blurred bars (2-D) or bumps (1-D) at random places, noisy.

    Class = which region (quadrant or quarter) x which shape, so the classifier has to read
    *where* things are: its FC weights get spatial structure.
    """
    if len(size) == 1:
        (length,) = size
        at = torch.rand(n, generator=gen) * (length - 4) + 2
        kind = torch.randint(0, 2, (n,), generator=gen)
        width = torch.where(kind == 0, 1.0, 3.0)[:, None]
        img = torch.exp(-((torch.arange(length)[None] - at[:, None]) ** 2) / (2 * width**2))
        label = (at * 4 / length).long().clamp(max=3) * 2 + kind
    else:
        height, width = size
        cy = torch.rand(n, generator=gen) * (height - 4) + 2
        cx = torch.rand(n, generator=gen) * (width - 4) + 2
        kind = torch.randint(0, 2, (n,), generator=gen)
        sy = torch.where(kind == 0, 1.0, 3.0)[:, None, None]
        sx = torch.where(kind == 0, 3.0, 1.0)[:, None, None]
        yy = torch.arange(height)[None, :, None] - cy[:, None, None]
        xx = torch.arange(width)[None, None, :] - cx[:, None, None]
        img = torch.exp(-(yy**2) / (2 * sy**2) - xx**2 / (2 * sx**2))
        region = (cy * 2 / height).long().clamp(max=1) * 2 + (cx * 2 / width).long().clamp(max=1)
        label = region * 2 + kind
    return (img + 0.1 * torch.randn(img.shape, generator=gen))[:, None], label


@functools.cache
def trained_fc(order: str, size: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...], float]:
    """Train a small CNN whose FC reads its map flattened in ``order``; cached per session.

    Returns the first Linear's weight (out, in), the map's spatial size, the train accuracy.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(size) == 1 else (nn.Conv2d, nn.MaxPool2d)
    kernel = tuple(s // 4 for s in size)
    backbone = nn.Sequential(
        conv(1, 8, 3, padding=1),
        nn.ReLU(),
        pool(2),
        conv(8, CHANNELS, 3, padding=1),
        nn.ReLU(),
        pool(2),
    )
    fc = nn.Linear(CHANNELS * int(np.prod(kernel)), HIDDEN)
    head = nn.Sequential(nn.ReLU(), nn.Linear(HIDDEN, 8))

    def net(x):
        return head(fc(FLATTEN[order](backbone(x))))

    params = [*backbone.parameters(), *fc.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    images, labels = bars(4096, size, gen)
    for _ in range(STEPS):
        pick = torch.randint(0, len(images), (128,), generator=gen)
        loss = nn.functional.cross_entropy(net(images[pick]), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net(images[:1024]).argmax(1) == labels[:1024]).float().mean().item()
    return fc.weight.detach().numpy().copy(), kernel, accuracy


def assert_cannot_tell(guess: LayoutGuess, below: float = CONFIDENCE_THRESHOLD) -> None:
    assert guess.best is None, guess.reason
    assert guess.twin is None
    assert guess.confidence < below
    assert guess.reason.startswith("cannot tell"), guess.reason


SQUARE = [("chw", (16, 16)), ("hwc", (16, 16)), ("whc", (16, 16))]
NON_SQUARE = [("chw", (12, 20)), ("hwc", (12, 20)), ("whc", (12, 20))]


def test_the_nets_learned_their_task():
    # A guess on a net that did not learn would test nothing.
    for order, size in [*SQUARE, *NON_SQUARE, ("cl", (32,)), ("lc", (32,))]:
        assert trained_fc(order, size)[2] > 0.8, (order, size)


@pytest.mark.parametrize(("order", "size"), SQUARE)
def test_square_map_gives_the_order_up_to_its_hw_twin(order, size):
    weight, kernel, _ = trained_fc(order, size)
    guess = guess_layout(weight, CHANNELS, kernel)
    assert guess.best is not None, guess.reason
    assert {guess.best.axes, guess.twin} == {order, TWIN[order]}, guess.reason
    assert guess.equivalent == (guess.best.axes, guess.twin)
    assert guess.confidence >= CONFIDENCE_THRESHOLD
    assert guess.twin in guess.reason and "cannot tell them apart" in guess.reason
    # Twins score the same; the pair beats every other order.
    assert guess.scores[order] == guess.scores[TWIN[order]]
    others = [v for k, v in guess.scores.items() if k not in (order, TWIN[order])]
    assert guess.scores[order] > max(others)


@pytest.mark.parametrize(("order", "size"), NON_SQUARE)
def test_non_square_map_gives_the_exact_order(order, size):
    weight, kernel, _ = trained_fc(order, size)
    guess = guess_layout(weight, CHANNELS, kernel)
    assert guess.best == Layout(order), guess.reason
    assert guess.twin is None
    assert guess.equivalent == (order,)
    assert guess.confidence >= CONFIDENCE_THRESHOLD
    assert guess.reason == f"{order}, confidence {guess.confidence:.2f}"
    # Without a twin, the swapped order is just another wrong answer, scored lower.
    assert guess.scores[order] > guess.scores[TWIN[order]]
    assert max(guess.scores, key=guess.scores.get) == order


@pytest.mark.parametrize("order", ["cl", "lc"])
def test_one_dimensional_map(order):
    weight, kernel, _ = trained_fc(order, (32,))
    guess = guess_layout(weight, CHANNELS, kernel)
    assert guess.best == Layout(order), guess.reason
    assert guess.twin is None
    assert guess.confidence >= CONFIDENCE_THRESHOLD
    assert set(guess.scores) == {"cl", "lc"}


@pytest.mark.parametrize(("order", "size"), [SQUARE[1], NON_SQUARE[2], ("lc", (32,))])
def test_in_out_weight_gives_the_same_guess(order, size):
    weight, kernel, _ = trained_fc(order, size)
    out_in = guess_layout(weight, CHANNELS, kernel)
    in_out = guess_layout(np.ascontiguousarray(weight.T), CHANNELS, kernel, WeightFormat.IN_OUT)
    assert in_out == out_in
    assert out_in.best is not None


def test_guess_is_deterministic_and_scores_every_order():
    weight, kernel, _ = trained_fc("hwc", (12, 20))
    first = guess_layout(weight, CHANNELS, kernel)
    assert guess_layout(weight.copy(), CHANNELS, kernel) == first
    assert list(first.scores) == [layout.axes for layout in candidate_layouts(2)]
    assert 0.0 <= first.confidence <= 1.0


@pytest.mark.parametrize(
    ("in_features", "kernel"), [(128, (4, 4)), (120, (3, 5)), (64, (8,)), (8 * 27, (3, 3, 3))]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_default_init_cannot_tell(in_features, kernel, seed):
    torch.manual_seed(seed)
    weight = nn.Linear(in_features, HIDDEN).weight.detach().numpy()
    # Not a near miss: random weights are well below the threshold.
    assert_cannot_tell(guess_layout(weight, CHANNELS, kernel), below=CONFIDENCE_THRESHOLD / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_weights_cannot_tell(seed):
    weight = np.random.default_rng(seed).standard_normal((HIDDEN, 120))
    guess = guess_layout(weight, CHANNELS, (3, 5))
    assert_cannot_tell(guess, below=CONFIDENCE_THRESHOLD / 2)
    assert "no spatial structure" in guess.reason


def test_untrained_net_of_the_same_shape_cannot_tell_but_training_can():
    # The same architecture and seed before training: the signal comes from training.
    torch.manual_seed(0)
    untrained = nn.Linear(CHANNELS * 15, HIDDEN).weight.detach().numpy()
    assert_cannot_tell(guess_layout(untrained, CHANNELS, (3, 5)))
    trained, kernel, _ = trained_fc("whc", (12, 20))
    assert guess_layout(trained, CHANNELS, kernel).best == Layout("whc")


def test_structure_planted_in_a_known_order_is_found():
    # No training: per-(filter, channel) smooth patterns plus noise, stored as hwc on 3x5.
    rng = np.random.default_rng(3)
    coarse = rng.standard_normal((32, 16, 5, 7))
    smooth = sum(coarse[:, :, i : i + 3, j : j + 5] for i in range(3) for j in range(3))
    conv = smooth + 2.0 * rng.standard_normal(smooth.shape)
    weight = conv.transpose(0, 2, 3, 1).reshape(32, -1)  # hwc
    guess = guess_layout(weight, 16, (3, 5))
    assert guess.best == Layout("hwc"), guess.reason
    # And the guessed order turns the weight back into the planted conv filters.
    np.testing.assert_array_equal(guess.best.fc_rows_to_conv(weight, 16, (3, 5)), conv)


def test_3d_cubic_map_reports_every_indistinguishable_order():
    rng = np.random.default_rng(4)
    coarse = rng.standard_normal((32, 4, 5, 5, 5))
    smooth = sum(
        coarse[:, :, i : i + 3, j : j + 3, k : k + 3]
        for i in range(3)
        for j in range(3)
        for k in range(3)
    )
    weight = smooth.transpose(0, 2, 3, 4, 1).reshape(32, -1)  # dhwc
    guess = guess_layout(weight, 4, (3, 3, 3))
    assert guess.best is not None, guess.reason
    assert set(guess.equivalent) == {"dhwc", "dwhc", "hdwc", "hwdc", "wdhc", "whdc"}
    assert guess.twin in guess.equivalent and guess.twin != guess.best.axes
    assert len(guess.scores) == 24


def test_one_by_one_map_needs_no_guess():
    guess = guess_layout(np.ones((4, 6)), 6, (1, 1))
    assert guess.best == Layout("chw")
    assert guess.confidence == 1.0
    assert set(guess.equivalent) == {layout.axes for layout in candidate_layouts(2)}


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="input features"):
        guess_layout(np.zeros((4, 10)), 8, (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        guess_layout(np.zeros((4, 8, 4, 4)), 8, (4, 4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_cannot_tell_instead_of_raising(bad):
    guess = guess_layout(np.full((4, 128), bad, np.float32), 8, (4, 4))
    assert_cannot_tell(guess)
    assert "finite" in guess.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_filters_with_nan_or_inf_are_left_out_and_the_rest_still_tell(bad):
    weight, kernel, _ = trained_fc("chw", (12, 20))
    weight = weight.copy()
    weight[::4, 7] = bad  # one value in every fourth filter
    guess = guess_layout(weight, CHANNELS, kernel)
    assert guess.best == Layout("chw"), guess.reason
    assert all(np.isfinite(v) for v in guess.scores.values())


def test_filters_spanning_most_of_the_float32_range_are_kept():
    # Each filter is mostly near -0.9 x max with a few values near +0.9 x max: finite, but
    # a value minus the filter's mean exceeds float32's range, so it is done in float64.
    top = np.finfo(np.float32).max
    rng = np.random.default_rng(1)
    weight = (-0.9 + 0.05 * rng.random((16, 128))) * top
    weight[:, :3] = 0.9 * top
    weight = weight.astype(np.float32)
    assert np.isfinite(weight).all()
    guess = guess_layout(weight, 8, (4, 4))
    assert "fewer than two" not in guess.reason, guess.reason
    assert guess.z != 0.0  # the filters were scored
    assert all(np.isfinite(v) for v in guess.scores.values())


def test_constant_weight_cannot_tell():
    assert_cannot_tell(guess_layout(np.ones((4, 128)), 8, (4, 4)))


def test_vgg16_wide_weight_is_sampled_and_fast():
    # VGG16's fc6 reads 512 x 7 x 7 = 25088 inputs; only a bounded sample of rows is scored.
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((1024, 25088), dtype=np.float32)
    start = time.perf_counter()
    guess = guess_layout(weight, 512, (7, 7))
    assert time.perf_counter() - start < 30.0  # a hang guard; bench/ measures speed
    assert_cannot_tell(guess)


def test_module_is_pure_numpy():
    code = "import sys, fc2conv_cli.guess; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
