"""fc2conv export: real models, defined here, exported to .pt2 and .onnx and proven.

Each model is loaded by the CLI from this very file (``tests/test_export.py:Name``), the
way a user names their own ``models.py:Net``. Besides the command's own proofs, every
test reloads the exported file itself and compares it with the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
HERE = Path(__file__).resolve()


class VGGLike(nn.Module):
    """Padded 3x3 convs, an AdaptiveAvgPool2d that is the identity at 3x32x32, dropout."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Dropout(),
            nn.Linear(24, 24), nn.ReLU(), nn.Dropout(),
            nn.Linear(24, classes),
        )  # fmt: skip

    def forward(self, x):
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNetLike(nn.Module):
    """torchvision's AlexNet, narrow: at 224 its feature map is 6x6, its score map 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(4, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(),
            nn.Dropout(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class LeNetLike(nn.Module):
    """No padding, and the classic ``x.view(x.size(0), -1)``: crops are claimed too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = (
            nn.Linear(16 * 5 * 5, 32),
            nn.Linear(32, 16),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class OneD(nn.Module):
    """A 1-D signal classifier with ``nn.Flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 5), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(8, 8, 3), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        return self.head(self.body(x))


class PermuteNet(nn.Module):
    """Ported from TF: NHWC flatten, ``x.permute(0, 2, 3, 1).reshape(n, -1)``: layout hwc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 6, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.out(torch.relu(self.fc(x)))


class WHCNet(PermuteNet):
    """Ported from Caffe/TF with width before height: ``permute(0, 3, 2, 1)``: layout whc."""

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x.permute(0, 3, 2, 1).contiguous().view(x.size(0), -1)
        return self.out(torch.relu(self.fc(x)))


class BranchNet(nn.Module):
    """A head that branches: two FCs read the flatten, two outputs (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.shared = nn.Linear(5 * 6 * 6, 16)
        self.aux = nn.Linear(5 * 6 * 6, 4)
        self.cls = nn.Linear(16, 4)
        self.box = nn.Linear(16, 2)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        flat = self.drop(torch.relu(self.conv(x)).flatten(1))
        hidden = torch.relu(self.shared(flat))
        return self.cls(hidden) + self.aux(flat), torch.sigmoid(self.box(hidden))


class ControlFlowNet(LeNetLike):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return super().forward(x)


def seeded(factory):
    """The model with seeded weights, and running statistics that are not the identity."""
    torch.manual_seed(0)
    model = factory().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def map_text(layout: str, layers: list[tuple[str, list[int] | None]]) -> str:
    lines = ["version: 1", f"layout: {layout}", "layers:"]
    for name, kernel in layers:
        lines.append(f"  - name: {name}" + (f"\n    kernel: {kernel}" if kernel else ""))
    return "\n".join(lines) + "\n"


# name -> (factory, map layout, map layers, input shape, dense shape, proved, stride)
CASES = {
    "vgg": (
        VGGLike, "chw", [("classifier.0", [4, 4]), ("classifier.3", None), ("classifier.6", None)],
        "3x32x32", "3x72x56", "windows", [8, 8],
    ),
    "alexnet": (
        AlexNetLike, "chw",
        [("classifier.1", [6, 6]), ("classifier.4", None), ("classifier.6", None)],
        "3x224x224", "3x320x288", "windows", [32, 32],
    ),
    "lenet": (
        LeNetLike, "chw", [("fc1", [5, 5]), ("fc2", None), ("fc3", None)],
        "1x32x32", "1x44x40", "windows and crops", [4, 4],
    ),
    "oned": (
        OneD, "cl", [("head.1", [16]), ("head.3", [1])], "2x40", "2x52", "windows and crops", [2],
    ),
    "permute": (
        PermuteNet, "hwc", [("fc", [4, 6]), ("out", None)], "3x8x12", "3x14x20", "windows", [2, 2],
    ),
    "whc": (
        WHCNet, "whc", [("fc", [4, 6]), ("out", None)], "3x8x12", "3x12x16", "windows", [2, 2],
    ),
    "branch": (
        BranchNet, "chw", [("shared", [6, 6]), ("aux", [6, 6]), ("cls", None), ("box", None)],
        "3x8x8", "3x13x11", "windows and crops", [1, 1],
    ),
}  # fmt: skip


def build(tmp_path: Path, case: str, layout: str | None = None) -> tuple[Path, Path, object]:
    """A seeded model of ``case``, its checkpoint and its map, as files."""
    factory, map_layout, layers, *_ = CASES[case]
    model = seeded(factory)
    checkpoint = tmp_path / f"{case}.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, checkpoint)
    map_path = tmp_path / f"{case}.yaml"
    map_path.write_text(map_text(layout or map_layout, layers))
    return checkpoint, map_path, model


def export_args(tmp_path: Path, case: str, suffix: str, *extra: object) -> list[object]:
    checkpoint, map_path, _ = build(tmp_path, case)
    factory, _, _, input_shape, dense_shape, *_ = CASES[case]
    return [
        "export", checkpoint, "--model", f"{HERE}:{factory.__name__}", "--map", map_path,
        "-o", tmp_path / f"{case}{suffix}", "--input-shape", input_shape,
        "--dense-shape", dense_shape, *extra,
    ]  # fmt: skip


def reload(path: Path):
    """Run the exported file without fc2conv: torch.export.load, or onnxruntime."""
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        return lambda x: [t.detach() for t in torch.utils._pytree.tree_leaves(module(x))]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]


def outputs(model, x) -> list:
    with torch.no_grad():
        result = model(x)
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_proves_native_and_dense(tmp_path, run_cli, case, suffix):
    args = export_args(tmp_path, case, suffix, "--json", tmp_path / "report.json")
    outcome = run_cli(*args)
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    factory, layout, layers, input_shape, dense_shape, proved, stride = CASES[case]
    assert report["ok"] and report["published"]
    assert report["layout"] == layout
    assert report["proved"] == proved
    assert report["geometry"]["stride"] == stride
    checks = [(p["subject"].split(",")[0], p["check"].split(":")[0]) for p in report["proofs"]]
    for subject in ("rewritten graph", "exported file"):
        assert (subject, f"native {input_shape}") in checks
        assert (subject, f"dense {dense_shape}") in checks
    assert all(p["ok"] for p in report["proofs"])
    assert [layer["name"] for layer in report["layers"]] == [name for name, _ in layers]
    assert "proofs" in outcome.stdout and "stride" in outcome.stdout

    # The file, reloaded here, equals the original model at the native size ...
    model = seeded(factory)
    run = reload(tmp_path / f"{case}{suffix}")
    shape = tuple(int(s) for s in input_shape.split("x"))
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7))
    for got, want in zip(run(x), outputs(model, x), strict=True):
        assert got.shape == (*want.shape, *([1] * (len(shape) - 1)))
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5)
    # ... and on a large input, the score map has one position per window.
    dense = tuple(int(s) for s in dense_shape.split("x"))
    big = torch.randn((1, *dense), generator=torch.Generator().manual_seed(8))
    assert list(run(big)[0].shape[2:]) == report["score_shape"]
    if proved == "windows and crops":  # no padding: every position is the model on a crop
        scores = run(big)
        for at in np.ndindex(*report["score_shape"]):
            window = tuple(
                slice(i * s, i * s + n) for i, s, n in zip(at, stride, shape[1:], strict=True)
            )
            for got, want in zip(scores, outputs(model, big[(..., *window)]), strict=True):
                np.testing.assert_allclose(got[(..., *at)], want, rtol=1e-4, atol=1e-5)


def test_onnx_has_convolutions_and_no_gemm(tmp_path, run_cli):
    import onnx

    assert run_cli(*export_args(tmp_path, "vgg", ".onnx")).code == 0
    graph = onnx.load(str(tmp_path / "vgg.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and not ops & {"Gemm", "MatMul", "Flatten", "Reshape"}
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # batch, height and width are dynamic
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "vgg.onnx")).metadata_props}
    geometry = json.loads(meta["fc2conv"])
    assert geometry["stride"] == [8, 8] and geometry["receptive_field"][0] > 8


def test_pt2_stores_the_geometry_and_runs_at_other_sizes(tmp_path, run_cli):
    assert run_cli(*export_args(tmp_path, "alexnet", ".pt2")).code == 0
    extra = {"fc2conv.json": ""}
    program = torch.export.load(str(tmp_path / "alexnet.pt2"), extra_files=extra)
    meta = json.loads(extra["fc2conv.json"])
    assert meta["stride"] == [32, 32] and meta["input_shape"] == [3, 224, 224]
    scores = program.module()(torch.randn(2, 3, 224 + 64, 224 + 96))
    assert scores.shape == (2, 4, 3, 4)


def test_the_adaptive_pool_is_reported_removed(tmp_path, run_cli):
    outcome = run_cli(*export_args(tmp_path, "vgg", ".pt2"))
    assert outcome.code == 0
    assert "avgpool (AdaptiveAvgPool2d): the identity at --input-shape (4x4 in and out)" in (
        " ".join(outcome.stdout.split())
    )


def test_an_adaptive_pool_that_is_not_the_identity_is_refused(tmp_path, run_cli):
    args = export_args(tmp_path, "vgg", ".pt2")
    args[args.index("--input-shape") + 1] = "3x48x48"
    outcome = run_cli(*args)
    assert outcome.code == 2
    assert "avgpool (AdaptiveAvgPool2d) maps the feature map 6x6 to 4x4" in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.pt2")) and not list(tmp_path.glob(".*"))


def test_data_dependent_control_flow_fails_with_one_line(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    args[args.index("--model") + 1] = f"{HERE}:ControlFlowNet"
    outcome = run_cli(*args)
    assert outcome.code == 2
    line = outcome.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "cannot be traced by torch.fx at test_export.py:" in line and "in forward" in line
    assert "control flow" in line


def test_a_layout_the_graph_does_not_compute_is_refused(tmp_path, run_cli):
    args = export_args(tmp_path, "permute", ".onnx")
    build(tmp_path, "permute", layout="chw")  # same checkpoint, the map now says chw
    outcome = run_cli(*args)
    assert outcome.code == 2
    line = outcome.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "layout chw, but the graph flattens in hwc order" in line
    assert not (tmp_path / "permute.onnx").exists()


def test_a_checkpoint_that_does_not_load_strictly_is_refused(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    state = torch.load(args[1], weights_only=True)["state_dict"]
    state["extra.weight"] = state.pop("fc2.bias")
    torch.save(state, args[1])
    outcome = run_cli(*args)
    assert outcome.code == 2
    assert "does not load strictly" in outcome.stderr
    assert "missing fc2.bias; unexpected extra.weight" in outcome.stderr


def test_a_map_naming_a_module_that_is_no_linear_is_refused(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    map_path = Path(args[args.index("--map") + 1])
    map_path.write_text(map_text("chw", [("fc1", [5, 5]), ("fc2", None)]))
    outcome = run_cli(*args)
    assert outcome.code == 2
    assert "module 'fc3' (nn.Linear) follows the flatten but the map does not name it" in (
        outcome.stderr
    )


def test_a_failed_check_publishes_nothing(tmp_path, run_cli):
    outcome = run_cli(*export_args(tmp_path, "lenet", ".pt2", "--atol", "0", "--json", "-"))
    report = json.loads(outcome.stdout)
    if all(p["max_abs_diff"] == 0 for p in report["proofs"]):
        pytest.skip("float32 summation happened to agree bit for bit")
    assert outcome.code == 1
    assert report["ok"] is False and report["published"] is False
    assert report["error"]["code"] == "check_failed"
    assert not (tmp_path / "lenet.pt2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_model_specs_are_one_line_input_errors(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    at = args.index("--model") + 1
    for spec, message in (
        ("no_such_module_x:Net", "cannot import no_such_module_x"),
        (f"{HERE}:NoSuchNet", "has no attribute 'NoSuchNet'"),
        ("nocolon", "expected MODULE:FACTORY"),
    ):
        args[at] = spec
        outcome = run_cli(*args)
        assert outcome.code == 2, spec
        assert message in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1


def test_model_args_reach_the_factory(tmp_path, run_cli):
    args = export_args(tmp_path, "vgg", ".pt2", "--model-arg", "classes=7")
    torch.manual_seed(0)
    torch.save(VGGLike(classes=7).state_dict(), args[1])
    outcome = run_cli(*args, "--json", tmp_path / "r.json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads((tmp_path / "r.json").read_text())["proofs"][0]["shape"] == [2, 7, 1, 1]


def test_export_help_says_it_runs_user_code(run_cli):
    outcome = run_cli("export", "--help")
    assert outcome.code == 0
    assert "RUNS YOUR" in outcome.stdout and "CODE" in outcome.stdout


def test_cli_export_atol_default_is_the_library_default():
    from fc2conv_cli import cli
    from fc2conv_cli.export import DEFAULT_EXPORT_ATOL

    assert cli._EXPORT_ATOL_DEFAULT == DEFAULT_EXPORT_ATOL


def test_export_help_and_usage_errors_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom fc2conv_cli.cli import run\n"
        "run(['export', '--help']); run(['heatmap', '--help'])\n"
        "run(['export', 'x.pth', '--model', 'm:f', '--map', 'm.yaml', '-o', 'y.pt2', "
        "'--input-shape', '3xA'])\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr
    assert "--input-shape '3xA': expected CxHxW" in result.stderr


def test_a_model_failing_at_the_input_shape_names_the_node(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    args[args.index("--input-shape") + 1] = "1x36x36"  # fc1 now gets 16 x 6x6 values
    outcome = run_cli(*args)
    assert outcome.code == 2
    line = outcome.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "fails on an input of shape [2, 1, 36, 36] at node fc1 (call_module fc1)" in line


def test_a_kernel_that_is_not_the_flattened_map_is_refused(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2")
    map_path = Path(args[args.index("--map") + 1])
    map_path.write_text(map_text("chw", [("fc1", [25, 1]), ("fc2", None), ("fc3", None)]))
    outcome = run_cli(*args)
    assert outcome.code == 2
    assert (
        "map layer 'fc1': kernel [25, 1] with in_channels 16, but the graph flattens a 16 x 5x5"
        in outcome.stderr
    )


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_the_exported_file_loads_without_fc2conv_or_the_model_code(tmp_path, run_cli, suffix):
    import subprocess
    import sys

    assert run_cli(*export_args(tmp_path, "oned", suffix)).code == 0
    path = tmp_path / f"oned{suffix}"
    load = (
        f"m = torch.export.load({str(path)!r}).module(); y = m(torch.randn(1, 2, 70))"
        if suffix == ".pt2"
        else "import onnxruntime, numpy as np\n"
        f"s = onnxruntime.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        "y = torch.from_numpy(s.run(None, {'input': np.random.rand(1, 2, 70).astype('f')})[0])"
    )
    code = (
        "import sys\nsys.modules['fc2conv_cli'] = None  # importing fc2conv now fails\n"
        f"import torch\n{load}\nprint(tuple(y.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.stdout.strip().splitlines()[-1] == "(1, 3, 16)", result.stderr[-2000:]


def test_the_checkpoint_is_unwrapped_as_convert_unwraps_it(tmp_path, run_cli):
    args = export_args(tmp_path, "lenet", ".pt2", "--json", tmp_path / "r.json")
    state = torch.load(args[1], weights_only=True)["state_dict"]
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 9}, args[1])
    outcome = run_cli(*args)
    assert outcome.code == 0, outcome.stderr
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("unwrapped the nested state dict under 'model'" in n for n in notes)
    assert any("stripped prefix 'module.'" in n for n in notes)
