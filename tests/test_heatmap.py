"""fc2conv heatmap: a net trained here to find a pattern lights up where the pattern is.

The net is trained in the test (seeded SGD on synthetic 22x22 crops: a bright cross on
noise, or noise alone), exported densely, and run on a 192x192 image with three crosses.
Set FC2CONV_DOCS_HEATMAP=path to keep the picture (docs/heatmap_example.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")
nn = torch.nn
HERE = Path(__file__).resolve()
CROP = 22
CROSSES = ((40, 140), (120, 50), (150, 160))  # (row, col) centres in the test image


class CrossNet(nn.Module):
    """No padding: at 22x22 the feature map is 16 x 4x4; stride 4, receptive field 22."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def draw_cross(image: np.ndarray, row: int, col: int) -> None:
    image[row - 2 : row + 3, col] = 1.0
    image[row, col - 2 : col + 3] = 1.0


def batch(generator: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the crops hold a cross near their centre; the others a cross far from it, a
    bar, or nothing: the net learns "a cross here", so its score map localizes."""
    images = generator.uniform(0.0, 0.35, (size, 1, CROP, CROP)).astype(np.float32)
    labels = np.arange(size) % 2
    centre = CROP // 2
    for image, label in zip(images, labels, strict=True):
        if label:
            row, col = centre + generator.integers(-2, 3, 2)
            draw_cross(image[0], row, col)
            continue
        row, col = generator.integers(2, CROP - 2, 2)
        kind = generator.integers(3)
        if kind == 0 and max(abs(row - centre), abs(col - centre)) >= 6:
            draw_cross(image[0], row, col)
        elif kind == 1:
            image[0, row, col - 2 : col + 3] = 1.0  # a bar alone is not a cross
    return torch.from_numpy(images), torch.from_numpy(labels)


def train() -> CrossNet:
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    model = CrossNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(400):
        images, labels = batch(generator, 64)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels = batch(generator, 400)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95, f"the net did not learn the pattern (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The trained net exported to .pt2 and .onnx, and the test image."""
    folder = tmp_path_factory.mktemp("heatmap")
    model = train()
    torch.save(model.state_dict(), folder / "cross.pth")
    (folder / "map.yaml").write_text(
        "version: 1\nlayout: chw\nlayers:\n"
        "  - {name: classifier.0, kernel: [4, 4]}\n  - {name: classifier.2}\n"
    )
    generator = np.random.default_rng(1)
    image = generator.uniform(0.0, 0.35, (192, 192)).astype(np.float32)
    for row, col in CROSSES:
        draw_cross(image, row, col)
    image[80, 90:95] = 1.0  # decoy bars
    image[160, 30:35] = 1.0
    Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "image.png")
    from fc2conv_cli.cli import run

    for suffix in (".pt2", ".onnx"):
        code = run(
            [
                "export", str(folder / "cross.pth"), "--model", f"{HERE}:CrossNet",
                "--map", str(folder / "map.yaml"), "-o", str(folder / f"cross{suffix}"),
                "--input-shape", f"1x{CROP}x{CROP}", "--dense-shape", "1x96x96",
            ]
        )  # fmt: skip
        assert code == 0
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_the_hottest_region_is_where_the_pattern_is(exported, run_cli, suffix):
    from fc2conv_cli.export.heatmap import LEGEND_HEIGHT

    out = exported / f"heat{suffix}.png"
    outcome = run_cli(
        "heatmap", exported / f"cross{suffix}", exported / "image.png", "-o", out,
        "--class", "1", "--json", exported / f"heat{suffix}.json",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    report = json.loads((exported / f"heat{suffix}.json").read_text())
    assert report["stride"] == [4, 4] and report["receptive_field"] == [22, 22]
    assert report["score_shape"] == [43, 43]  # (192 - 22) // 4 + 1
    with Image.open(out) as picture:
        assert picture.size == (192, 192 + LEGEND_HEIGHT)
        pixels = np.asarray(picture.convert("RGB"), dtype=np.int64)[:192]
    # The score map's peak, placed by stride and offset, is on one of the crosses.
    x, y = report["peak_pixel"]
    assert any(abs(y - r) <= 4 and abs(x - c) <= 4 for r, c in CROSSES), (x, y)
    # ... and so is the hottest colour in the picture (red minus blue), at both crosses.
    heat = pixels[..., 0] - pixels[..., 2]
    hot = heat >= heat.max() - 10
    rows, cols = np.nonzero(hot)
    for row, col in zip(rows, cols, strict=True):
        assert any(abs(row - r) <= 6 and abs(col - c) <= 6 for r, c in CROSSES), (row, col)
    for r, c in CROSSES:
        assert heat[r, c] > np.median(heat) + 60
    if os.environ.get("FC2CONV_DOCS_HEATMAP") and suffix == ".pt2":
        shutil.copyfile(out, os.environ["FC2CONV_DOCS_HEATMAP"])


def test_heatmap_writes_a_png_of_the_image_size_plus_the_legend(tmp_path, run_cli):
    from fc2conv_cli.export.heatmap import LEGEND_HEIGHT

    model_path = _small_export(tmp_path, run_cli)
    Image.fromarray(np.full((40, 52), 128, np.uint8)).save(tmp_path / "gray.png")
    outcome = run_cli("heatmap", model_path, tmp_path / "gray.png", "-o", tmp_path / "h.png")
    assert outcome.code == 0, outcome.stderr
    with Image.open(tmp_path / "h.png") as picture:
        assert picture.format == "PNG" and picture.size == (52, 40 + LEGEND_HEIGHT)
    assert "score map 5x8 at stride 4x4" in outcome.stdout  # (40 - 22) / 4 + 1, (52 - 22) / 4 + 1


def test_heatmap_refuses_bad_input_in_one_line(tmp_path, run_cli):
    model_path = _small_export(tmp_path, run_cli)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((10, 30), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "taken.png").write_bytes(b"x")
    cases = [
        (["--class", "5"], "img.png", "out.png", "--class 5: "),
        ([], "small.png", "out.png", "smaller than the model's input 22x22"),
        ([], "missing.png", "out.png", "no such file"),
        ([], "img.png", "taken.png", "already exists"),
        ([], "img.png", "out.jpg", "PNG"),
    ]
    for extra, image, out, message in cases:
        outcome = run_cli("heatmap", model_path, tmp_path / image, "-o", tmp_path / out, *extra)
        assert outcome.code == 2, message
        assert message in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1
    assert (tmp_path / "taken.png").read_bytes() == b"x"


def _small_export(tmp_path: Path, run_cli) -> Path:
    """An untrained CrossNet as .onnx (quick): the geometry is what these tests need."""
    torch.manual_seed(0)
    torch.save(CrossNet().state_dict(), tmp_path / "net.pth")
    (tmp_path / "map.yaml").write_text(
        "version: 1\nlayout: chw\nlayers: [{name: classifier.0, kernel: [4, 4]}, "
        "{name: classifier.2}]\n"
    )
    outcome = run_cli(
        "export", tmp_path / "net.pth", "--model", f"{HERE}:CrossNet", "--map",
        tmp_path / "map.yaml", "-o", tmp_path / "net.onnx", "--input-shape", "1x22x22",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    return tmp_path / "net.onnx"
