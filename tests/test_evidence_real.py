"""Section 4 of issue 11: the suggestion calibrated on real, trained third-party weights.

Fixtures (tests/fixtures/real/README.md gives sources and licences):

- facenet-pytorch 2.6.0's MTCNN weights (MIT): RNet's ``dense4`` reads a 64 x 3 x 3 map and
  ONet's ``dense5`` a 128 x 3 x 3 map, both after ``x.permute(0, 3, 2, 1)`` (models/mtcnn.py):
  flatten order ``whc``, which on a square map no weight statistic can tell from ``hwc``.
  PNet is fully convolutional (no FC at all).
- rapidocr-onnxruntime 1.4.4's text-direction classifier (PaddleOCR, Apache-2.0): an ONNX
  MobileNetV3 whose ``fc_0.w_0`` reads a globally pooled 200-channel map.

Each real FC weight is also re-flattened into every other order (its columns permuted, so
the truth is known exactly) to calibrate the guess on real filters in all six orders.
``python tests/test_evidence_real.py`` prints the calibration table of docs/suggest.md.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fc2conv_cli.guess import CONFIDENCE_THRESHOLD, candidate_layouts
from fc2conv_cli.layout import Layout
from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.suggest import suggest_map

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"
RNET, ONET, PNET = (FIXTURES / f"facenet_pytorch_{n}.pt" for n in ("rnet", "onet", "pnet"))
CLS = FIXTURES / "rapidocr_ch_ppocr_mobile_v2.0_cls_infer.onnx"
# (file, first FC, channels, map, true order) from each package's own model code.
MTCNN = [(RNET, "dense4", 64, (3, 3), "whc"), (ONET, "dense5", 128, (3, 3), "whc")]
TWIN = {"chw": "cwh", "cwh": "chw", "hwc": "whc", "whc": "hwc", "hcw": "wch", "wch": "hcw"}


def suggest(path, name=None):
    with open_checkpoint(path) as checkpoint:
        return suggest_map(checkpoint, name or path.name)


def right(found, shape, order) -> bool:
    """The map converts exactly as the truth, or as its h/w twin on a square map."""
    if found.kernel != shape:
        return False
    return found.layout == order or (shape[0] == shape[1] and found.layout == TWIN[order])


def reflattened(path: Path, fc: str, channels: int, shape, true: str, order: str, folder: Path):
    """The checkpoint with ``fc``'s columns reordered as if its net flattened ``order``."""
    with open_checkpoint(path) as checkpoint:
        tensors = {n: np.array(checkpoint.array(n)) for n in checkpoint.tensors}
    weight = tensors[f"{fc}.weight"]
    filters = Layout(true).fc_rows_to_conv(weight, channels, shape)  # (O, C, H, W)
    tensors[f"{fc}.weight"] = np.ascontiguousarray(Layout(order).flatten(filters))
    out = folder / f"{path.stem}_{order}.safetensors"
    save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, str(out))
    return out


def calibration(folder: Path) -> list[tuple[str, str, str, float, str, bool]]:
    """(case, truth, suggested, confidence, source, right) for every real case."""
    rows = []
    for path, fc, channels, shape, true in MTCNN:
        for order in [a.axes for a in candidate_layouts(2)]:
            case = path if order == true else reflattened(path, fc, channels, shape, true, order,
                                                          folder)  # fmt: skip
            found = suggest(case)
            label = f"{path.stem}{'' if order == true else ' (re-flattened)'}"
            suggested = f"{'x'.join(map(str, found.kernel))} {found.layout}"
            rows.append((label, f"3x3 {order}", suggested, found.confidence, found.source,
                         right(found, shape, order)))  # fmt: skip
        # The same filters with their inputs shuffled: no spatial structure is left.
        shuffled = reflattened(path, fc, channels, shape, true, "chw", folder)
        with open_checkpoint(shuffled) as checkpoint:
            tensors = {n: np.array(checkpoint.array(n)) for n in checkpoint.tensors}
        weight = tensors[f"{fc}.weight"]
        tensors[f"{fc}.weight"] = weight[:, np.random.default_rng(0).permutation(weight.shape[1])]
        save_file(tensors, str(shuffled))
        found = suggest(shuffled)
        suggested = f"{'x'.join(map(str, found.kernel))} {found.layout}"
        rows.append((f"{path.stem} (inputs shuffled)", "none (no structure)", suggested,
                     found.confidence, found.source, found.source == "default"))  # fmt: skip
    found = suggest(CLS)
    suggested = f"{'x'.join(map(str, found.kernel))} {found.layout}"
    rows.append((CLS.stem, "1x1 chw (pooled)", suggested, found.confidence, found.source,
                 found.kernel == (1, 1)))  # fmt: skip
    return rows


pytestmark = pytest.mark.skipif(not RNET.exists(), reason="real fixtures not checked out")


@pytest.mark.parametrize(("path", "fc", "channels", "shape", "true"), MTCNN, ids=["rnet", "onet"])
def test_mtcnn_heads_are_found_up_to_their_twin(path, fc, channels, shape, true):
    found = suggest(path)
    assert found.layers[0] == fc and found.in_channels == channels
    assert (found.source, found.kernel) == ("weights", shape)
    assert found.layout in (true, TWIN[true]) and found.confidence >= CONFIDENCE_THRESHOLD
    assert any("cannot tell 3x3" in note and "3x3 whc" in note for note in found.ambiguities)


@pytest.mark.slow
def test_every_real_case_is_right_or_cannot_tell(tmp_path):
    rows = calibration(tmp_path)
    confident_wrong = [r for r in rows if r[4] != "default" and not r[5]]
    assert not confident_wrong, confident_wrong
    assert sum(r[5] for r in rows) >= 12  # real filters do carry the order, mostly
    shuffled = [r for r in rows if "shuffled" in r[0]]
    assert shuffled and all(r[4] == "default" and r[3] < CONFIDENCE_THRESHOLD for r in shuffled)


def test_pnet_is_fully_convolutional(run_cli):
    outcome = run_cli("inspect", PNET, "--suggest-map")
    assert outcome.code == 2 and "no FC weights" in outcome.stderr


def test_the_paddle_classifier_head_is_read_from_its_graph(run_cli, tmp_path):
    found = suggest(CLS)
    assert (found.source, found.kernel, found.in_channels) == ("graph", (1, 1), 200)
    assert found.reading.pooled and "GlobalAveragePool" in found.reading.nodes[0]
    (tmp_path / "map.yaml").write_text(found.text)
    out = tmp_path / "cls.safetensors"
    assert run_cli("convert", CLS, "--map", tmp_path / "map.yaml", "-o", out).code == 0


def test_rnet_exported_to_onnx_reads_its_exact_order(run_cli, tmp_path):
    """facenet-pytorch's RNet (models/mtcnn.py, rebuilt here) exported to ONNX: the graph
    holds the permute, so the twin is resolved: whc, read, confidence 1; the converted
    head fed onnxruntime's own map gives onnxruntime's own dense4 output."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    nn = torch.nn

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            fmap = x
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.dense4(x.view(x.shape[0], -1))
            return fmap, x

    net = RNet().eval()
    state = torch.load(RNET, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=False)
    path = tmp_path / "rnet.onnx"
    x = torch.randn(1, 3, 24, 24)
    torch.onnx.export(net, (x,), str(path), dynamo=False, output_names=["map", "dense4"])
    found = suggest(path)
    assert (found.source, found.layout, found.kernel, found.confidence) == (
        "graph", "whc", (3, 3), 1.0
    )  # fmt: skip
    (tmp_path / "map.yaml").write_text(found.text)
    out = tmp_path / "rnet.safetensors"
    assert run_cli("convert", path, "--map", tmp_path / "map.yaml", "-o", out).code == 0
    from safetensors.numpy import load_file

    converted = load_file(out)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fmap, dense = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    weight, bias = converted["dense4.weight"], converted["dense4.bias"]
    np.testing.assert_allclose(
        np.einsum("ochw,nchw->no", weight, fmap) + bias, dense, rtol=1e-4, atol=1e-4
    )


# -- checkpoints too large or not licensed for the repository: paths from the environment


ENV_CASES = {
    # variable: (first FC, channels, map, true order), torchvision's own model code
    "FC2CONV_REAL_VGG16": ("classifier.0", 512, (7, 7), "chw"),
    "FC2CONV_REAL_ALEXNET": ("classifier.1", 256, (6, 6), "chw"),
}


@pytest.mark.parametrize("variable", sorted(ENV_CASES))
def test_checkpoint_from_the_environment_is_right_or_cannot_tell(variable):
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"set {variable} to a torchvision state dict to run this case")
    fc, channels, shape, order = ENV_CASES[variable]
    found = suggest(Path(path))
    assert found.layers[0] == fc and found.in_channels == channels
    assert found.source == "default" or right(found, shape, order), found.text
    assert math.prod(found.kernel) * channels == math.prod(shape) * channels


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print("| case | true map | suggested | confidence | source | right |")
        print("| --- | --- | --- | --- | --- | --- |")
        for case, truth, suggested, confidence, source, ok in calibration(Path(folder)):
            exact = ok and suggested.split()[1] == truth.split()[1]
            verdict = "yes" if exact else "h/w twin (flagged)" if ok else "no"
            if source == "default":
                verdict = "cannot tell" + (" (right)" if ok else "")
            print(f"| {case} | {truth} | {suggested} | {confidence:.2f} | {source} | "
                  f"{verdict} |")  # fmt: skip
    sys.exit(0)
