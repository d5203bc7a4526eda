"""Head algebra: conv -> FC, BatchNorm folds, casts, output selection, fold_spatial.

Model level: real torch heads against the network built from the converted file, at
native size and densely (a larger map: each position against the original on its crop).
Each bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from fc2conv_cli.check import rne_bits

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _save(folder: Path, module: torch.nn.Module, name: str = "model") -> Path:
    path = folder / f"{name}.safetensors"
    state = {k: v.detach().contiguous().numpy() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return path


def _convert(run_cli, folder: Path, source: Path, map_text: str, *extra, output="out"):
    map_path = folder / f"{output}.yaml"
    map_path.write_text(map_text)
    target = folder / f"{output}.safetensors"
    report = folder / f"{output}.json"
    outcome = run_cli("convert", source, "--map", map_path, "-o", target, "--json", report, *extra)
    return outcome, target, map_path, report


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in load_file(str(path)).items()}


def _randomize_bn(bn: torch.nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)


class _Net(torch.nn.Module):
    """A tiny backbone (3x3 conv) and a head that reads its 3x3 map flattened."""

    def __init__(self, head: torch.nn.Module, channels: int = 4) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, channels, 3)
        self.head = head

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _crops(fcn_out: torch.Tensor, net: torch.nn.Module, image: torch.Tensor, size: int = 5):
    """Each position of the dense output against the original net on that 5x5 crop."""
    rows, cols = fcn_out.shape[-2:]
    worst = 0.0
    for i in range(rows):
        for j in range(cols):
            crop = image[:, :, i : i + size, j : j + size]
            worst = max(worst, float((net(crop) - fcn_out[:, :, i, j]).abs().max()))
    return worst


def test_linear_bn1d_relu_folds_into_the_conv_native_and_dense(run_cli, tmp_path):
    torch.manual_seed(0)
    head = torch.nn.Sequential(
        torch.nn.Linear(36, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 5)
    )
    _randomize_bn(head[1], 1)
    net = _Net(head).eval()
    source = _save(tmp_path, net)
    outcome, target, map_path, report = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n"
        "  - {name: head.0, kernel: [3, 3], fold_batchnorm: {name: head.1}}\n"
        "  - {name: head.3}\n",
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)
    assert not any(k.startswith("head.1.") for k in written)  # the BN left the output
    layer = json.loads(report.read_text())["layers"][0]
    assert layer["proof"] == "float64, folded" and layer["ok"]
    assert layer["batchnorm"][0]["eps"] == 1e-5 and "head.1.running_var" in layer["folded"]
    text = " ".join(outcome.stdout.split())
    assert "head.0: float64, folded: BatchNorm head.1 after the layer" in text

    def fcn(x):
        y = F.conv2d(x, written["features.weight"], written["features.bias"])
        y = F.relu(F.conv2d(y, written["head.0.weight"], written["head.0.bias"]))
        return F.conv2d(y, written["head.3.weight"], written["head.3.bias"])

    with torch.no_grad():
        image = torch.randn(2, 3, 5, 5)
        assert float((fcn(image)[:, :, 0, 0] - net(image)).abs().max()) < 1e-5
        big = torch.randn(2, 3, 9, 8)
        assert _crops(fcn(big), net, big) < 1e-5
    assert run_cli("verify", source, target, "--map", map_path).code == 0


@pytest.mark.parametrize("over", ["features", "channels"])
def test_bn1d_before_linear_folds_into_the_columns(run_cli, tmp_path, over):
    torch.manual_seed(1)
    if over == "features":  # fastai-style: BatchNorm1d over the flattened features
        bn, head = torch.nn.BatchNorm1d(36), None
        head = torch.nn.Sequential(bn, torch.nn.Linear(36, 6))
        net = _Net(head).eval()
    else:  # a BatchNorm2d over the channels, before the flatten
        bn = torch.nn.BatchNorm2d(4)
        net = torch.nn.Module()
        net.features, net.bn, net.head = torch.nn.Conv2d(3, 4, 3), bn, torch.nn.Linear(36, 6)
        net.forward = lambda x: net.head(net.bn(net.features(x)).flatten(1))
        net.eval()
    _randomize_bn(bn, 2)
    source = _save(tmp_path, net)
    fc, bn_name = ("head.1", "head.0") if over == "features" else ("head", "bn")
    outcome, target, map_path, _ = _convert(
        run_cli,
        tmp_path,
        source,
        f"version: 1\nlayout: chw\nlayers:\n"
        f"  - {{name: {fc}, kernel: [3, 3], fold_batchnorm_before: {{name: {bn_name}}}}}\n",
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)

    def fcn(x):
        y = F.conv2d(x, written["features.weight"], written["features.bias"])
        return F.conv2d(y, written[f"{fc}.weight"], written[f"{fc}.bias"])

    with torch.no_grad():
        image = torch.randn(3, 3, 5, 5)
        assert float((fcn(image)[:, :, 0, 0] - net(image)).abs().max()) < 1e-5
        big = torch.randn(1, 3, 8, 8)
        assert _crops(fcn(big), net, big) < 1e-5
    assert run_cli("verify", source, target, "--map", map_path).code == 0


def test_a_biasless_linear_gets_the_folded_bias(run_cli, tmp_path):
    torch.manual_seed(2)
    head = torch.nn.Sequential(torch.nn.Linear(36, 8, bias=False), torch.nn.BatchNorm1d(8))
    _randomize_bn(head[1], 3)
    net = _Net(head).eval()
    source = _save(tmp_path, net)
    outcome, target, _, _ = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n"
        "  - {name: head.0, kernel: [3, 3], fold_batchnorm: {name: head.1, eps: 0.001}}\n",
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)
    head[1].eps = 1e-3  # the map's eps, as the network uses it
    with torch.no_grad():
        image = torch.randn(2, 3, 5, 5)
        y = F.conv2d(image, written["features.weight"], written["features.bias"])
        y = F.conv2d(y, written["head.0.weight"], written["head.0.bias"])
        assert float((y[:, :, 0, 0] - net(image)).abs().max()) < 1e-5


def test_a_1001_class_head_drops_its_background_class(run_cli, tmp_path):
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(36, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1001))
    net = _Net(head).eval()
    source = _save(tmp_path, net)
    outcome, target, map_path, report = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n  - {name: head.0, kernel: [3, 3]}\n"
        '  - {name: head.2, outputs: "1:1001"}\n',
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)
    assert tuple(written["head.2.weight"].shape) == (1000, 32, 1, 1)
    layer = json.loads(report.read_text())["layers"][1]
    assert layer["bits_equal"] and layer["outputs"] == {"text": "1:1001", "kept": 1000, "of": 1001}
    assert (layer["source_out_features"], layer["out_features"]) == (1001, 1000)
    assert "out_features 1001 -> 1000" in outcome.stdout

    def fcn(x):
        y = F.conv2d(x, written["features.weight"], written["features.bias"])
        y = F.relu(F.conv2d(y, written["head.0.weight"], written["head.0.bias"]))
        return F.conv2d(y, written["head.2.weight"], written["head.2.bias"])

    with torch.no_grad():
        image = torch.randn(2, 3, 5, 5)
        assert (
            torch.equal(fcn(image)[:, :, 0, 0], net(image)[:, 1:])
            or float((fcn(image)[:, :, 0, 0] - net(image)[:, 1:]).abs().max()) < 1e-5
        )
        big = torch.randn(1, 3, 7, 6)
        dense = fcn(big)
        for i in range(3):
            crop = big[:, :, i : i + 5, :5]
            assert float((dense[:, :, i, 0] - net(crop)[:, 1:]).abs().max()) < 1e-5
    assert run_cli("verify", source, target, "--map", map_path).code == 0
    # A list keeps those outputs, in its order.
    outcome, target, _, _ = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n  - {name: head.0, kernel: [3, 3]}\n"
        "  - {name: head.2, outputs: [0, 5, 7]}\n",
        output="three",
    )
    assert outcome.code == 0, outcome.stderr
    kept = load_file(str(target))["head.2.bias"]
    np.testing.assert_array_equal(kept, head[2].bias.detach().numpy()[[0, 5, 7]])


class _ConvMlp(torch.nn.Module):
    """timm's ConvMlp: a kxk conv over the map, ReLU, a 1x1 conv."""

    def __init__(self, channels: int = 4, hidden: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, channels, 3)
        self.fc1 = torch.nn.Conv2d(channels, hidden, 3)
        self.fc2 = torch.nn.Conv2d(hidden, classes, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x))))


@pytest.mark.parametrize(("layout", "weight_format"), [("chw", "out_in"), ("hwc", "in_out")])
def test_a_convmlp_head_back_to_linear_layers(run_cli, tmp_path, layout, weight_format):
    torch.manual_seed(4)
    net = _ConvMlp().eval()
    source = _save(tmp_path, net)
    outcome, target, map_path, report = _convert(
        run_cli,
        tmp_path,
        source,
        f"version: 1\ndirection: conv_to_fc\nlayout: {layout}\nweight_format: {weight_format}\n"
        "layers:\n  - {name: fc1, kernel: [3, 3]}\n  - {name: fc2}\n",
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)
    fc1, fc2 = written["fc1.weight"], written["fc2.weight"]
    if weight_format == "in_out":
        fc1, fc2 = fc1.T, fc2.T
    assert tuple(fc1.shape) == (12, 36) and tuple(fc2.shape) == (5, 12)
    assert json.loads(report.read_text())["layers"][0]["direction"] == "conv_to_fc"

    def flatten(y):
        return y.permute(0, 2, 3, 1).flatten(1) if layout == "hwc" else y.flatten(1)

    def mlp(x):
        y = flatten(F.conv2d(x, written["features.weight"], written["features.bias"]))
        return F.linear(F.relu(F.linear(y, fc1, written["fc1.bias"])), fc2, written["fc2.bias"])

    with torch.no_grad():
        image = torch.randn(2, 3, 5, 5)
        assert float((mlp(image) - net(image)[:, :, 0, 0]).abs().max()) < 1e-5
        big = torch.randn(1, 3, 8, 7)  # the conv net densely, against the MLP on each crop
        dense = net(big)
        for i in range(dense.shape[2]):
            for j in range(dense.shape[3]):
                crop = big[:, :, i : i + 5, j : j + 5]
                assert float((mlp(crop) - dense[:, :, i, j]).abs().max()) < 1e-5
    assert run_cli("verify", source, target, "--map", map_path).code == 0


_ROUND_TRIP = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_ROUND_TRIP
@given(
    layout_kernel=st.sampled_from(
        [(a, k) for a in ("chw", "hwc", "whc", "wch", "cwh", "hcw") for k in ((2, 3), (1, 1))]
        + [
            ("cl", (4,)),
            ("lc", (3,)),
            ("cdhw", (1, 2, 3)),
            ("dhwc", (2, 2, 2)),
            ("hdcw", (2, 1, 2)),
        ]
    ),
    weight_format=st.sampled_from(["out_in", "in_out"]),
    conv_format=st.sampled_from(["oihw", "hwio"]),
    dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16, np.float64]),
)
def test_convert_then_convert_back_is_byte_identical(
    run_cli, tmp_path_factory, layout_kernel, weight_format, conv_format, dtype
):
    layout, kernel = layout_kernel
    folder = tmp_path_factory.mktemp("round")
    rng = np.random.default_rng(5)
    in_features = 3 * int(np.prod(kernel))
    shape = (7, in_features) if weight_format == "out_in" else (in_features, 7)
    tensors = {
        "fc.weight": rng.standard_normal(shape).astype(dtype),
        "fc.bias": rng.standard_normal(7).astype(dtype),
        "other": np.arange(6, dtype=np.int64),
    }
    save_file(tensors, str(folder / "fc.safetensors"))
    common = (
        f"version: 1\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"conv_format: {conv_format}\nlayers:\n  - {{name: fc, kernel: {list(kernel)}}}\n"
    )
    there, conv, _, _ = _convert(run_cli, folder, folder / "fc.safetensors", common, output="c")
    assert there.code == 0, there.stderr
    back, fc, _, _ = _convert(run_cli, folder, conv, "direction: conv_to_fc\n" + common, output="f")
    assert back.code == 0, back.stderr
    again = load_file(str(fc))
    assert set(again) == set(tensors)
    for name, array in tensors.items():
        assert again[name].dtype == array.dtype and again[name].shape == array.shape
        assert again[name].tobytes() == array.tobytes(), name


def test_fold_spatial_sums_a_replicated_map_into_a_1x1_conv(run_cli, tmp_path):
    """VGG on CIFAR: a 1x1 map pooled to 3x3 replicates one value 9 times."""
    torch.manual_seed(6)

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Conv2d(3, 4, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d((3, 3))
            self.classifier = torch.nn.Sequential(torch.nn.Linear(36, 10))

        def forward(self, x):
            return self.classifier(self.pool(self.features(x)).flatten(1))

    net = Small().eval()
    source = _save(tmp_path, net)
    outcome, target, map_path, report = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n"
        "  - {name: classifier.0, kernel: [3, 3], fold_spatial: sum}\n",
    )
    assert outcome.code == 0, outcome.stderr
    written = _tensors(target)
    assert tuple(written["classifier.0.weight"].shape) == (10, 4, 1, 1)
    layer = json.loads(report.read_text())["layers"][0]
    assert layer["proof"] == "float64, summed" and layer["fold_spatial"] == "sum"
    with torch.no_grad():
        image = torch.randn(4, 3, 3, 3)  # a 1x1 feature map
        y = F.conv2d(image, written["features.weight"], written["features.bias"])
        y = F.conv2d(y, written["classifier.0.weight"], written["classifier.0.bias"])
        assert float((y[:, :, 0, 0] - net(image)).abs().max()) < 1e-5
    assert run_cli("verify", source, target, "--map", map_path).code == 0


@pytest.mark.parametrize(
    ("dtype", "code", "numpy_type"),
    [("float16", "F16", np.float16), ("bfloat16", "BF16", ml_dtypes.bfloat16)],
)
@pytest.mark.parametrize("scope", ["all", "converted"])
def test_a_cast_matches_the_source_cast_and_is_recorded(
    run_cli, tmp_path, dtype, code, numpy_type, scope
):
    torch.manual_seed(7)
    net = _Net(torch.nn.Sequential(torch.nn.Linear(36, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    source = _save(tmp_path, net.eval())
    outcome, target, map_path, report = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: chw\nlayers:\n  - {name: head.0, kernel: [3, 3]}\n"
        "  - {name: head.2}\n",
        "--dtype",
        dtype,
        "--dtype-scope",
        scope,
    )
    assert outcome.code == 0, outcome.stderr
    written = load_file(str(target))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    expected = state["head.0.weight"].reshape(8, 4, 3, 3).astype(numpy_type)
    assert written["head.0.weight"].tobytes() == expected.tobytes()
    copied_dtype = numpy_type if scope == "all" else np.float32
    assert written["features.weight"].dtype == np.dtype(copied_dtype)
    from safetensors import safe_open

    with safe_open(str(target), "numpy") as file:
        metadata = file.metadata()
    assert metadata["dtype"] == dtype and metadata["dtype_scope"] == scope
    data = json.loads(report.read_text())
    assert data["dtype"] == dtype and data["layers"][0]["dtype"] == code
    assert data["layers"][0]["bits_equal"] and data["layers"][0]["tolerance"] > 0
    # verify reads the cast back from the file's metadata
    assert run_cli("verify", source, target, "--map", map_path).code == 0


def test_an_independent_cast_agrees_with_numpy_and_ml_dtypes():
    rng = np.random.default_rng(8)
    values = np.concatenate(
        [
            rng.standard_normal(20000) * np.exp2(rng.integers(-30, 30, 20000)),
            rng.standard_normal(20000) * np.exp2(rng.integers(-160, 140, 20000)),
            [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 65519.99, 6e-8, 3e-8, 2.9802322e-08],
            [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, 3.5e38, 1e-45, 1e-40],
        ]
    )
    for code, numpy_type in (
        ("F16", np.float16),
        ("BF16", ml_dtypes.bfloat16),
        ("F32", np.float32),
    ):
        with np.errstate(over="ignore"):
            reference = values.astype(numpy_type)
        unsigned = {2: np.uint16, 4: np.uint32}[reference.itemsize]
        np.testing.assert_array_equal(rne_bits(values, code), reference.view(unsigned), code)
    assert np.isnan(np.array(rne_bits(np.array([np.nan]), "F16")).view(np.float16)).all()


def _one_line(outcome) -> str:
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, outcome.stderr
    return lines[0]


def test_an_overflowing_cast_exits_2_naming_the_tensor(run_cli, tmp_path):
    tensors = {
        "fc.weight": np.full((4, 18), 1.0, np.float32),
        "big": np.array([1.0, 7e4, -9e4], np.float32),
        "tiny": np.array([1e-9, -1e-9], np.float32),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    text = "version: 1\nlayout: chw\nlayers:\n  - {name: fc, kernel: [3, 3]}\n"
    source = tmp_path / "m.safetensors"
    outcome, target, _, _ = _convert(run_cli, tmp_path, source, text, "--dtype", "float16")
    assert outcome.code == 2 and not target.exists()
    line = _one_line(outcome)
    assert "'big'" in line or "big:" in line or "big" in line
    assert "2 values overflow F16" in line and "largest 90000" in line
    assert not list(tmp_path.glob(".*.tmp"))
    # tiny alone flushes to zero: also refused; --allow-overflow writes both
    del tensors["big"]
    save_file(tensors, str(source))
    outcome, target, _, _ = _convert(run_cli, tmp_path, source, text, "--dtype", "float16")
    assert outcome.code == 2 and "flushes to zero" in _one_line(outcome) and not target.exists()
    outcome, target, _, _ = _convert(
        run_cli, tmp_path, source, text, "--dtype", "float16", "--allow-overflow"
    )
    assert outcome.code == 0, outcome.stderr
    assert not load_file(str(target))["tiny"].any()


BAD = {
    "wrong BN size": (
        "  - {name: head.0, kernel: [3, 3], fold_batchnorm: {name: bn}}\n",
        "BatchNorm 'bn' has",
    ),
    "unknown BN": (
        "  - {name: head.0, kernel: [3, 3], fold_batchnorm: {name: nobn}}\n",
        "no BatchNorm 'nobn'",
    ),
    "outputs out of range": (
        "  - {name: head.0, kernel: [3, 3], outputs: [0, 8]}\n",
        "index 8 is out of range",
    ),
    "slice past the end": (
        '  - {name: head.0, kernel: [3, 3], outputs: "1:9"}\n',
        "reaches past",
    ),
    "outputs before the last": (
        "  - {name: head.0, kernel: [3, 3], outputs: [0]}\n  - {name: head.1}\n",
        "only the last layer",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folds_and_selections_exit_2_with_one_line(run_cli, tmp_path, case):
    rng = np.random.default_rng(9)
    tensors = {
        "head.0.weight": rng.standard_normal((8, 36)).astype(np.float32),
        "head.1.weight": rng.standard_normal((2, 8)).astype(np.float32),
        **{f"bn.{n}": np.ones(5, np.float32) for n in ("running_mean", "running_var")},
    }
    source = tmp_path / "m.safetensors"
    save_file(tensors, str(source))
    layers, message = BAD[case]
    outcome, target, _, _ = _convert(
        run_cli, tmp_path, source, "version: 1\nlayout: chw\nlayers:\n" + layers
    )
    assert outcome.code == 2 and not target.exists()
    assert message in _one_line(outcome)


def test_a_reverse_rule_whose_kernel_does_not_cover_the_conv_exits_2(run_cli, tmp_path):
    net = _ConvMlp()
    source = _save(tmp_path, net)
    outcome, target, _, _ = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\ndirection: conv_to_fc\nlayout: chw\n"
        "layers:\n  - {name: fc1, kernel: [7, 7]}\n",
    )
    assert outcome.code == 2 and not target.exists()
    assert "does not cover the map's feature map 7x7" in _one_line(outcome)


def test_the_dry_run_plan_shows_every_operation(run_cli, tmp_path):
    torch.manual_seed(10)
    head = torch.nn.Sequential(
        torch.nn.Linear(36, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 11)
    )
    source = _save(tmp_path, _Net(head))
    outcome, target, _, report = _convert(
        run_cli,
        tmp_path,
        source,
        "version: 1\nlayout: hwc\nlayers:\n"
        "  - {name: head.0, kernel: [3, 3], fold_batchnorm: {name: head.1}}\n"
        '  - {name: head.2, outputs: "1:"}\n',
        "--dry-run",
        "--dtype",
        "bfloat16",
    )
    assert outcome.code == 0, outcome.stderr
    assert not target.exists()
    text = " ".join(outcome.stdout.split())
    assert "fold BN head.1 after (eps 1e-05, torch default)" in text
    assert "outputs 1: (10 of 11)" in text and "cast F32 -> BF16" in text
    assert "folded (not in the output): head.1.weight, head.1.bias, head.1.running_mean" in text
    data = json.loads(report.read_text())
    assert data["folded"] == [
        "head.1.weight", "head.1.bias", "head.1.running_mean", "head.1.running_var",
        "head.1.num_batches_tracked",
    ]  # fmt: skip


def test_batch_casts_per_group_and_converts_again_when_the_cast_changes(run_cli, tmp_path):
    rng = np.random.default_rng(11)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file(
            {"fc.weight": rng.standard_normal((4, 18)).astype(np.float32)},
            str(tmp_path / name / "m.safetensors"),
        )
    (tmp_path / "map.yaml").write_text(
        "version: 1\nlayout: chw\nlayers:\n  - {name: fc, kernel: [3, 3]}\n"
    )
    (tmp_path / "manifest.yaml").write_text(
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'a/*.safetensors', map: map.yaml, dtype: float16}\n"
        "  - {inputs: 'b/*.safetensors', map: map.yaml}\n"
    )
    manifest = tmp_path / "manifest.yaml"

    def statuses(*extra):
        outcome = run_cli("batch", manifest, "--jobs", 1, "--json", "-", *extra)
        assert outcome.code == 0, outcome.stderr
        return [f["status"] for f in json.loads(outcome.stdout)["files"]]

    assert statuses() == ["converted", "converted"]
    written = {n: load_file(str(tmp_path / "out" / n / "m.safetensors")) for n in ("a", "b")}
    assert written["a"]["fc.weight"].dtype == np.float16
    assert written["b"]["fc.weight"].dtype == np.float32
    assert statuses() == ["up to date", "up to date"]
    # --dtype overrides the groups': both outputs now hold another cast than asked
    assert statuses("--dtype", "bfloat16") == ["converted", "converted"]
    assert statuses("--dtype", "bfloat16") == ["up to date", "up to date"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\noutput_dir: out\njobs:\n  - {inputs: 'a/*', map: map.yaml, dtype: fp8}\n"
    )
    outcome = run_cli("batch", bad)
    assert (
        outcome.code == 2 and "dtype: expected one of float32, float16, bfloat16" in outcome.stderr
    )


def test_the_cli_dtypes_are_the_maps():
    from fc2conv_cli import cli, layer_map

    assert tuple(layer_map.DTYPES) == cli._DTYPES


def test_dtype_scope_converted_leaves_copies_alone(run_cli, tmp_path):
    tensors = {
        "fc.weight": np.full((4, 18), 0.5, np.float32),
        "big": np.array([1.0, 7e4], np.float32),
    }
    source = tmp_path / "m.safetensors"
    save_file(tensors, str(source))
    text = "version: 1\nlayout: chw\ndtype: float16\nlayers:\n  - {name: fc, kernel: [3, 3]}\n"
    outcome, target, _, _ = _convert(run_cli, tmp_path, source, text, "--dtype-scope", "converted")
    assert outcome.code == 0, outcome.stderr
    written = load_file(str(target))
    assert written["big"].dtype == np.float32 and written["fc.weight"].dtype == np.float16


@pytest.mark.parametrize("layout", ["chw", "hwc", "whc"])
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
@pytest.mark.parametrize("conv_format", ["oihw", "hwio"])
def test_every_step_at_once_in_every_order_and_small_chunks(
    run_cli, tmp_path, monkeypatch, layout, weight_format, conv_format
):
    """BN before and after, a selection and a cast, written in many small chunks, equal
    a plain numpy fold of the same numbers (and pass fc2conv's own checks)."""
    from fc2conv_cli import write
    from fc2conv_cli.layout import Layout

    monkeypatch.setattr(write, "CHUNK_BYTES", 40)
    rng = np.random.default_rng(12)
    c, k, out = 3, (2, 3), 7
    w = rng.standard_normal((out, c * 6))
    bn = {
        f"{p}.{n}": v
        for p, size in (("pre", c * 6), ("post", out))
        for n, v in (
            ("weight", rng.random(size) + 0.5),
            ("bias", rng.standard_normal(size)),
            ("running_mean", rng.standard_normal(size)),
            ("running_var", rng.random(size) + 0.1),
        )
    }
    tensors = {"fc.weight": w if weight_format == "out_in" else w.T, **bn}
    tensors = {n: np.ascontiguousarray(v, np.float32) for n, v in tensors.items()}
    source = tmp_path / "m.safetensors"
    save_file(tensors, str(source))
    outcome, target, map_path, _ = _convert(
        run_cli,
        tmp_path,
        source,
        f"version: 1\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"conv_format: {conv_format}\nlayers:\n  - name: fc\n    kernel: [2, 3]\n"
        "    fold_batchnorm_before: {name: pre}\n    fold_batchnorm: {name: post}\n"
        "    outputs: [6, 0, 3]\n",
        "--dtype",
        "float16",
    )
    assert outcome.code == 0, outcome.stderr

    def scale_shift(prefix):
        t = {n: tensors[f"{prefix}.{n}"].astype(np.float64) for n in ("weight", "bias")}
        m = {
            n: tensors[f"{prefix}.{n}"].astype(np.float64) for n in ("running_mean", "running_var")
        }
        s = t["weight"] / np.sqrt(m["running_var"] + 1e-5)
        return s, t["bias"] - m["running_mean"] * s

    s_in, t_in = scale_shift("pre")
    s_out, t_out = scale_shift("post")
    fc = tensors["fc.weight"].astype(np.float64)
    fc = fc if weight_format == "out_in" else fc.T
    folded = fc * s_in[None, :] * s_out[:, None]
    bias = (fc @ t_in) * s_out + t_out
    keep = [6, 0, 3]
    filters = Layout(layout).fc_rows_to_conv(folded[keep], c, k)
    if conv_format == "hwio":
        filters = filters.transpose(2, 3, 1, 0)
    written = load_file(str(target))
    np.testing.assert_array_equal(written["fc.weight"], filters.astype(np.float16))
    np.testing.assert_array_equal(written["fc.bias"], bias[keep].astype(np.float16))
    assert run_cli("verify", source, target, "--map", map_path).code == 0


@pytest.mark.parametrize("conv_format", ["oihw", "hwio"])
@pytest.mark.parametrize(("layout", "weight_format"), [("chw", "out_in"), ("hwc", "in_out")])
def test_conv_to_fc_with_a_fold_a_selection_and_a_cast(
    run_cli, tmp_path, monkeypatch, conv_format, layout, weight_format
):
    from fc2conv_cli import write
    from fc2conv_cli.layout import Layout

    monkeypatch.setattr(write, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(13)
    filters = rng.standard_normal((5, 3, 2, 2))  # (O, C, kh, kw)
    post = {n: rng.random(5) + 0.5 for n in ("gamma", "moving_variance")}
    post |= {n: rng.standard_normal(5) for n in ("beta", "moving_mean")}
    stored = filters if conv_format == "oihw" else filters.transpose(2, 3, 1, 0)
    tensors = {"conv/kernel": stored, "conv/bias": rng.standard_normal(5)}
    tensors |= {f"bn/{n}": v for n, v in post.items()}
    tensors = {n: np.ascontiguousarray(v, np.float32) for n, v in tensors.items()}
    source = tmp_path / "m.safetensors"
    save_file(tensors, str(source))
    outcome, target, map_path, _ = _convert(
        run_cli,
        tmp_path,
        source,
        f"version: 1\ndirection: conv_to_fc\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"conv_format: {conv_format}\nlayers:\n  - name: conv\n    kernel: [2, 2]\n"
        "    fold_batchnorm: {name: bn}\n    outputs: '1:4'\n",
        "--dtype",
        "bfloat16",
    )
    assert outcome.code == 0, outcome.stderr
    # Keras-named tensors: Keras' default eps
    scale = tensors["bn/gamma"].astype(np.float64) / np.sqrt(
        tensors["bn/moving_variance"].astype(np.float64) + 1e-3
    )
    shift = tensors["bn/beta"] - tensors["bn/moving_mean"] * scale
    conv = tensors["conv/kernel"].astype(np.float64)
    conv = conv if conv_format == "oihw" else conv.transpose(3, 2, 0, 1)
    fc = Layout(layout).flatten(conv) * scale[:, None]
    bias = tensors["conv/bias"] * scale + shift
    fc, bias = fc[1:4], bias[1:4]
    fc = fc if weight_format == "out_in" else fc.T
    written = load_file(str(target))
    np.testing.assert_array_equal(written["conv/kernel"], fc.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(written["conv/bias"], bias.astype(ml_dtypes.bfloat16))
    assert run_cli("verify", source, target, "--map", map_path).code == 0


def test_a_new_bias_is_named_like_the_weight():
    from fc2conv_cli.layer_map import parse_layer_map
    from fc2conv_cli.layout import WeightFormat
    from fc2conv_cli.plan import build_plan
    from fc2conv_cli.readers import TensorInfo

    tensors = {
        "fc1/kernel": TensorInfo("fc1/kernel", "F32", (18, 4)),
        **{
            f"bn/{n}": TensorInfo(f"bn/{n}", "F32", (4,))
            for n in ("moving_mean", "moving_variance")
        },
    }
    text = (
        "version: 1\nlayout: hwc\nlayers:\n"
        "  - {name: fc1, kernel: [3, 3], fold_batchnorm: {name: bn}}\n"
    )
    plan = build_plan(tensors, parse_layer_map(text), WeightFormat.IN_OUT, kind="keras")
    layer = plan.layers[0]
    assert layer.bias.name == "fc1/bias" and layer.bias.source is None
    assert layer.folds[0].eps == 1e-3 and layer.folds[0].eps_from == "keras default"
    assert [t.name for t in plan.tensors] == ["fc1/bias", "fc1/kernel"]
