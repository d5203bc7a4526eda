"""Model-level proof with real ``torch.nn`` networks: the converted file runs as a FCN.

Each case builds a small seeded CNN (a conv backbone with a total stride, a flatten in
some layout, an FC head of three ``Linear`` layers with ReLU between), saves its
state dict, converts it with ``fc2conv convert`` and loads the output, by name and
strictly, into the same backbone followed by ``Conv`` layers. Then:

- at the native input size the fully convolutional model gives the original outputs;
- on a larger input, every position ``p`` of the score map equals the original model
  applied to the native-size crop at offset ``p * stride``;
- a map with the wrong layout converts without complaint (its checks follow the map) but
  the model it yields does not match, so the assertions above can fail.

Final feature maps are non-square (3x5, 2x3x4) so an h/w mix-up cannot pass by symmetry.
The flatten functions are written out in torch, independently of ``fc2conv``'s layout math.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# What the original network does between its backbone and its first FC, in plain torch.
FLATTEN = {
    "chw": lambda x: x.flatten(1),  # PyTorch / Caffe on NCHW
    "hwc": lambda x: x.permute(0, 2, 3, 1).flatten(1),  # Keras Flatten on NHWC
    "whc": lambda x: x.permute(0, 3, 2, 1).flatten(1),  # models ported from TF / Caffe
    "wch": lambda x: x.permute(0, 3, 1, 2).flatten(1),
    "cl": lambda x: x.flatten(1),
    "lc": lambda x: x.permute(0, 2, 1).flatten(1),
    "cdhw": lambda x: x.flatten(1),
    "dhwc": lambda x: x.permute(0, 2, 3, 4, 1).flatten(1),
}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
IN_CHANNELS, CHANNELS, HIDDEN, CLASSES = 2, 4, (7, 6), 3
BATCH = 3


@dataclass(frozen=True)
class Case:
    """One network: its flatten layout, final feature map, total stride and file format."""

    layout: str
    feature: tuple[int, ...]  # the backbone's output size at the native input size
    stride: int  # 2: conv 3 + max-pool 2; 4: two stride-2 convs
    suffix: str = ".safetensors"
    dtype: torch.dtype = torch.float64

    @property
    def ndim(self) -> int:
        return len(self.feature)

    @property
    def positions(self) -> tuple[int, ...]:
        """How far the larger input extends the feature map: (2, 3) more rows and columns."""
        return (2, 3, 1)[: self.ndim]

    def input_size(self, feature: tuple[int, ...]) -> tuple[int, ...]:
        """Input spatial size whose backbone output is ``feature``."""
        if self.stride == 2:
            return tuple(2 * f + 2 for f in feature)
        return tuple(4 * f for f in feature)

    @property
    def native(self) -> tuple[int, ...]:
        return self.input_size(self.feature)

    @property
    def large(self) -> tuple[int, ...]:
        return self.input_size(
            tuple(f + e for f, e in zip(self.feature, self.positions, strict=True))
        )

    def crop(self, position: tuple[int, ...]) -> tuple:
        """Index of the native-size crop that score-map ``position`` sees in a larger input."""
        starts = (q * self.stride for q in position)
        return (..., *(slice(s, s + n) for s, n in zip(starts, self.native, strict=True)))

    def __str__(self) -> str:
        size = "x".join(map(str, self.feature))
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.layout}-{size}-s{self.stride}-{dtype}{self.suffix}"


def _backbone(case: Case) -> nn.Sequential:
    """No padding anywhere: a crop of a larger input then sees exactly what it saw alone."""
    conv = CONV[case.ndim]
    if case.stride == 2:
        return nn.Sequential(conv(IN_CHANNELS, CHANNELS, 3), nn.ReLU(), POOL[case.ndim](2))
    return nn.Sequential(
        conv(IN_CHANNELS, CHANNELS, 2, stride=2),
        nn.ReLU(),
        conv(CHANNELS, CHANNELS, 2, stride=2),
    )


class Classifier(nn.Module):
    """The original network: backbone, flatten in ``layout``, three Linear layers."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.flatten = FLATTEN[case.layout]
        self.features = _backbone(case)
        in_features = CHANNELS * math.prod(case.feature)
        self.head = nn.Sequential(
            nn.Linear(in_features, HIDDEN[0]),
            nn.ReLU(),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.ReLU(),
            nn.Linear(HIDDEN[1], CLASSES),
        )

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


class FullyConvolutional(nn.Module):
    """The same backbone, then ``fc6`` (kernel = feature map), ``fc7`` and ``fc8`` (1x1)."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        conv = CONV[case.ndim]
        self.features = _backbone(case)
        self.fc6 = conv(CHANNELS, HIDDEN[0], case.feature)
        self.fc7 = conv(HIDDEN[0], HIDDEN[1], 1)
        self.fc8 = conv(HIDDEN[1], CLASSES, 1)

    def forward(self, x):
        x = torch.relu(self.fc6(self.features(x)))
        return self.fc8(torch.relu(self.fc7(x)))


def _map_text(layout: str, kernel: tuple[int, ...]) -> str:
    return (
        "version: 1\n"
        f"layout: {layout}\n"
        "weight_format: out_in\n"
        "layers:\n"
        f"  - {{name: head.0, rename: fc6, kernel: {list(kernel)}, in_channels: {CHANNELS}}}\n"
        "  - {name: head.2, rename: fc7}\n"
        "  - {name: head.4, rename: fc8}\n"
    )


def _classifier(case: Case, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(case).to(case.dtype).eval()


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _fcn(case: Case, converted: Path) -> FullyConvolutional:
    """The fully convolutional model, every tensor loaded (strictly) from the output file."""
    model = FullyConvolutional(case).to(case.dtype).eval()
    model.load_state_dict(load_file(str(converted)), strict=True)
    return model


def _tolerances(dtype: torch.dtype) -> dict[str, float]:
    # float64 differs only in summation order (~1e-15); float32 by rounding (~1e-6).
    return (
        {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    )


def assert_fcn_matches(case: Case, original: Classifier, fcn: FullyConvolutional) -> None:
    """(a) the same outputs at the native size; (b) every score-map position is one crop."""
    generator = torch.Generator().manual_seed(1)
    tol = _tolerances(case.dtype)
    with torch.no_grad():
        x = torch.randn(BATCH, IN_CHANNELS, *case.native, generator=generator, dtype=case.dtype)
        expected = original(x)
        scores = fcn(x)
        assert scores.shape == (BATCH, CLASSES, *(1,) * case.ndim)
        torch.testing.assert_close(scores.flatten(1), expected, **tol)

        big = torch.randn(BATCH, IN_CHANNELS, *case.large, generator=generator, dtype=case.dtype)
        score_map = fcn(big)
        assert score_map.shape == (BATCH, CLASSES, *(p + 1 for p in case.positions))
        grid = list(itertools.product(*(range(p + 1) for p in case.positions)))
        crops = torch.stack([big[case.crop(p)] for p in grid])  # (positions, N, C, *native)
        per_crop = original(crops.flatten(0, 1)).unflatten(0, (len(grid), BATCH))
        dense = torch.stack([score_map[(..., *p)] for p in grid])  # (positions, N, classes)
        torch.testing.assert_close(dense, per_crop, **tol)


def _convert(run_cli, tmp_path: Path, case: Case, state: dict, layout: str) -> tuple[Path, dict]:
    source = _save(state, tmp_path / f"model{case.suffix}")
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(_map_text(layout, case.feature))
    output = tmp_path / "fcn.safetensors"
    report = tmp_path / "report.json"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report)
    assert outcome.code == 0, outcome.stderr
    return output, json.loads(report.read_text())


CASES = [
    Case("chw", (3, 5), 2),
    Case("chw", (3, 5), 4, ".pth"),
    Case("hwc", (3, 5), 4),
    Case("hwc", (3, 5), 2, ".pth"),
    Case("whc", (3, 5), 2),
    Case("whc", (5, 3), 4, ".pth"),
    Case("wch", (3, 5), 2, ".pth"),
    Case("hwc", (3, 5), 2, dtype=torch.float32),
    Case("cl", (5,), 2),
    Case("lc", (5,), 4, ".pth"),
    Case("lc", (5,), 2, dtype=torch.float32),
    Case("cdhw", (2, 3, 4), 2, ".pth"),
    Case("dhwc", (2, 3, 4), 2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_converted_network_matches_the_original_densely(run_cli, tmp_path, case):
    original = _classifier(case)
    output, report = _convert(run_cli, tmp_path, case, original.state_dict(), case.layout)

    assert report["ok"] and report["published"]
    assert [layer["output_weight"] for layer in report["layers"]] == [
        "fc6.weight",
        "fc7.weight",
        "fc8.weight",
    ]
    assert report["layers"][0]["new_shape"] == [HIDDEN[0], CHANNELS, *case.feature]
    assert report["layers"][0]["bytes_unchanged"] is (case.layout in ("chw", "cl", "cdhw"))
    for layer in report["layers"]:
        assert layer["ok"] and layer["max_abs_diff"] < 1e-9

    written = load_file(str(output))
    assert set(written) == {
        *(f"features.{k}" for k in original.features.state_dict()),
        *(f"fc{i}.{p}" for i in (6, 7, 8) for p in ("weight", "bias")),
    }
    assert all(t.dtype == case.dtype for t in written.values())
    assert_fcn_matches(case, original, _fcn(case, output))


# The model flattens in the first layout; the map claims the second.
WRONG = [
    (Case("hwc", (3, 5), 2), "chw"),
    (Case("chw", (3, 5), 4, ".pth"), "hwc"),
    (Case("whc", (3, 5), 2), "hwc"),  # only h and w swapped: caught by the 3x5 map
    (Case("hwc", (3, 5), 2), "wch"),
    (Case("lc", (5,), 2), "cl"),
    (Case("dhwc", (2, 3, 4), 2, ".pth"), "cdhw"),
]


@pytest.mark.parametrize(("case", "wrong_layout"), WRONG, ids=lambda v: str(v))
def test_a_wrong_layout_gives_a_network_that_does_not_match(run_cli, tmp_path, case, wrong_layout):
    original = _classifier(case)
    output, report = _convert(run_cli, tmp_path, case, original.state_dict(), wrong_layout)
    # The tool checks the map as written, so it cannot see this mistake: the model can.
    assert report["ok"] and report["layers"][0]["layout"] == wrong_layout
    fcn = _fcn(case, output)
    with pytest.raises(AssertionError, match="not close"):
        assert_fcn_matches(case, original, fcn)
    # Not a near miss: the first layer's filters are scrambled.
    x = torch.randn(BATCH, IN_CHANNELS, *case.native, dtype=case.dtype)
    with torch.no_grad():
        gap = (fcn(x).flatten(1) - original(x)).abs().max().item()
    assert gap > 1e-3


class KerasStyleHead(nn.Module):
    """A torch model whose Dense kernels are stored ``(in, out)`` as ``fcN/kernel``."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.classifier = Classifier(case)

    def keras_state_dict(self) -> dict:
        state = {f"features.{k}": v for k, v in self.classifier.features.state_dict().items()}
        for index, name in zip((0, 2, 4), ("fc1", "fc2", "predictions"), strict=True):
            linear = self.classifier.head[index]
            state[f"{name}/kernel"] = linear.weight.detach().t().contiguous()
            state[f"{name}/bias"] = linear.bias.detach().clone()
        return state


KERAS_MAP = """\
version: 1
layout: hwc
weight_format: in_out
layers:
  - name: fc1
    rename: fc6
    weight: fc1/kernel
    bias: fc1/bias
    kernel: {kernel}
  - {{name: fc2, rename: fc7, weight: fc2/kernel, bias: fc2/bias}}
  - {{name: predictions, rename: fc8, weight: predictions/kernel, bias: predictions/bias}}
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_in_out_kernels_under_custom_names(run_cli, tmp_path, suffix):
    case = Case("hwc", (3, 5), 2, suffix)
    torch.manual_seed(0)
    model = KerasStyleHead(case).to(torch.float64).eval()
    state = model.keras_state_dict()
    assert state["fc1/kernel"].shape == (CHANNELS * 15, HIDDEN[0])  # (in, out)
    source = _save(state, tmp_path / f"keras{suffix}")
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(KERAS_MAP.format(kernel=list(case.feature)))
    output = tmp_path / "fcn.safetensors"
    report_path = tmp_path / "report.json"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report_path)
    assert outcome.code == 0, outcome.stderr

    report = json.loads(report_path.read_text())
    assert [(la["old_shape"], la["new_shape"]) for la in report["layers"]] == [
        ([CHANNELS * 15, HIDDEN[0]], [HIDDEN[0], CHANNELS, 3, 5]),
        ([HIDDEN[0], HIDDEN[1]], [HIDDEN[1], HIDDEN[0], 1, 1]),
        ([HIDDEN[1], CLASSES], [CLASSES, HIDDEN[1], 1, 1]),
    ]
    assert all(
        la["weight_format"] == "in_out" and not la["bytes_unchanged"] for la in report["layers"]
    )
    assert all(la["ok"] and la["max_abs_diff"] < 1e-9 for la in report["layers"])
    # rename replaces the layer prefix and keeps the format's suffix.
    written = load_file(str(output))
    converted = {f"fc{i}/{v}" for i in (6, 7, 8) for v in ("kernel", "bias")}
    assert converted <= set(written) and not any("/" in n for n in set(written) - converted)
    torch_names = tmp_path / "torch_names.safetensors"
    save_file(
        {k.replace("/kernel", ".weight").replace("/", "."): v for k, v in written.items()},
        str(torch_names),
    )
    assert_fcn_matches(case, model.classifier, _fcn(case, torch_names))


def test_nested_data_parallel_checkpoint(run_cli, tmp_path):
    """A training checkpoint: ``{'state_dict': {'module.' + name: tensor}, 'epoch': 3}``."""
    case = Case("whc", (3, 5), 2, ".pth")
    original = _classifier(case, seed=3)
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in original.state_dict().items()},
        "epoch": 3,
    }
    output, report = _convert(run_cli, tmp_path, case, wrapped, case.layout)
    assert any("state_dict" in note for note in report["notes"])
    assert any("module." in note for note in report["notes"])
    assert_fcn_matches(case, original, _fcn(case, output))


def test_subprocess_entry_point(tmp_path):
    """``python -m fc2conv_cli convert`` on a .pth file, the JSON report on stdout."""
    case = Case("hwc", (3, 5), 4, ".pth")
    original = _classifier(case, seed=7)
    source = _save(original.state_dict(), tmp_path / "model.pth")
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(_map_text(case.layout, case.feature))
    output = tmp_path / "fcn.safetensors"
    argv = ["convert", source, "--map", layer_map, "-o", output, "--json", "-"]
    done = subprocess.run(
        [sys.executable, "-m", "fc2conv_cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout holds the JSON alone; the table went to stderr
    assert report["ok"] and report["input_format"] == "torch"
    assert [la["new_shape"] for la in report["layers"]] == [
        [HIDDEN[0], CHANNELS, 3, 5],
        [HIDDEN[1], HIDDEN[0], 1, 1],
        [CLASSES, HIDDEN[1], 1, 1],
    ]
    assert "fc6" in done.stderr
    assert_fcn_matches(case, original, _fcn(case, output))


def test_hwio_output_runs_as_a_keras_style_conv(run_cli, tmp_path):
    """conv_format hwio: (*kernel, in, out), the kernel a Keras Conv2D loads, same numbers."""
    case = Case("hwc", (3, 5), 2, ".safetensors")
    torch.manual_seed(0)
    model = KerasStyleHead(case).to(torch.float64).eval()
    source = _save(model.keras_state_dict(), tmp_path / "keras.safetensors")
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(
        KERAS_MAP.format(kernel=list(case.feature)).replace("layers:", "conv_format: hwio\nlayers:")
    )
    output = tmp_path / "fcn.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 0, outcome.stderr
    assert "hwc in_out>hwio" in outcome.stdout
    written = load_file(str(output))
    assert written["fc6/kernel"].shape == (3, 5, CHANNELS, HIDDEN[0])
    # hwc-flattened (in, out) kernels are already in hwio order: a pure reshape.
    state = model.keras_state_dict()
    assert torch.equal(written["fc6/kernel"].reshape(-1, HIDDEN[0]), state["fc1/kernel"])
    hwio_to_oihw = (3, 2, 0, 1)
    as_torch = {
        k.replace("/kernel", ".weight").replace("/", "."): (
            v.permute(hwio_to_oihw) if k.endswith("/kernel") else v
        )
        for k, v in written.items()
    }
    torch_names = tmp_path / "torch_names.safetensors"
    save_file({k: v.contiguous() for k, v in as_torch.items()}, str(torch_names))
    assert_fcn_matches(case, model.classifier, _fcn(case, torch_names))
