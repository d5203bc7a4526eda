"""``fc2conv heatmap``: run an exported dense model on an image and draw its score map.

Each score-map cell is drawn over the pixels nearest to the centre of its receptive
field: cell ``i`` is centred on pixel ``offset + i * stride``, as ``export`` found from
the graph and stored in the file. Below the image, a legend: the colour scale with its
scores, and the class drawn.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv_cli.errors import InputError, OutputError
from fc2conv_cli.export.save import load_exported

if TYPE_CHECKING:
    import numpy as np

__all__ = ["LEGEND_HEIGHT", "HeatmapResult", "colormap", "make_heatmap"]

LEGEND_HEIGHT = 32  # pixels added below the image
_ALPHA = 0.55
# A perceptually ordered scale, dark blue -> teal -> yellow -> red (low -> high score).
_STOPS = ((0.0, (48, 18, 130)), (0.35, (30, 150, 160)), (0.7, (250, 220, 40)), (1.0, (220, 20, 20)))


@dataclass(frozen=True)
class HeatmapResult:
    """What was drawn: the classes, their score map and where it sits on the image."""

    output: Path
    size: tuple[int, int]  # width, height of the PNG
    classes: tuple[int, ...]
    scores: np.ndarray  # the drawn map (h, w): the class's score, or the max over classes
    stride: tuple[int, ...]
    offset: tuple[float, ...]
    receptive_field: tuple[int, ...]
    low: float
    high: float
    peak: tuple[float, float]  # (x, y) pixel at the centre of the hottest cell


def make_heatmap(
    model_path: Path,
    image_path: Path,
    output: Path,
    class_index: int | None = None,
    top: int = 1,
    force: bool = False,
) -> HeatmapResult:
    """Draw the score map of ``class_index`` (or the max over the ``top`` classes)."""
    import numpy as np
    import torch

    _check_output(output, force)
    run, meta = load_exported(model_path)
    if not {"stride", "offset", "input_shape"} <= set(meta) or len(meta["stride"]) != 2:
        raise InputError(f"{model_path}: not a 2-D dense model written by fc2conv export")
    image = _read_image(image_path, meta["input_shape"][0])
    native = meta["input_shape"][1:]
    if image.height < native[0] or image.width < native[1]:
        raise InputError(
            f"{image_path}: {image.width}x{image.height} is smaller than the model's input "
            f"{native[1]}x{native[0]}"
        )
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy())
    scores = run(tensor[None])[0][0].double().numpy()  # (K, h, w)
    classes = _classes(scores, class_index, top, model_path)
    drawn = scores[list(classes)].max(axis=0)
    stride, offset = tuple(meta["stride"]), tuple(meta["offset"])
    picture = _draw(image.convert("RGB"), drawn, stride, offset, classes)
    _save_png(picture, output)
    row, col = np.unravel_index(int(np.argmax(drawn)), drawn.shape)
    return HeatmapResult(
        output,
        picture.size,
        classes,
        drawn,
        stride,
        offset,
        tuple(meta.get("receptive_field", ())),
        float(drawn.min()),
        float(drawn.max()),
        (offset[1] + col * stride[1], offset[0] + row * stride[0]),
    )


def _check_output(output: Path, force: bool) -> None:
    if output.suffix.lower() != ".png":
        raise OutputError(f"{output}: the picture is written as PNG; give a name ending in .png")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise OutputError(f"{output}: output folder {output.parent} does not exist")


def _read_image(path: Path, channels: int):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError("heatmap needs Pillow: pip install 'fc2conv[export]'") from None
    if channels not in (1, 3):
        raise InputError(f"the model takes {channels} channels; heatmap reads gray or RGB images")
    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image: {exc}") from None


def _classes(scores: np.ndarray, class_index: int | None, top: int, path: Path) -> tuple[int, ...]:
    import numpy as np

    count = scores.shape[0]
    if class_index is not None:
        if not 0 <= class_index < count:
            raise InputError(f"--class {class_index}: {path} scores classes 0 to {count - 1}")
        return (class_index,)
    peaks = scores.reshape(count, -1).max(axis=1)
    return tuple(int(i) for i in np.argsort(-peaks, kind="stable")[: max(1, min(top, count))])


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8, along the legend's scale."""
    import numpy as np

    positions = [s[0] for s in _STOPS]
    channels = [np.interp(values, positions, [s[1][c] for s in _STOPS]) for c in range(3)]
    return np.stack(channels, -1).round().astype(np.uint8)


def _draw(image, scores: np.ndarray, stride: tuple, offset: tuple, classes: tuple[int, ...]):
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = image.size
    low, high = float(scores.min()), float(scores.max())
    span = high - low if high > low else 1.0
    cells = []
    for axis, size in enumerate((height, width)):
        index = np.rint((np.arange(size) - offset[axis]) / stride[axis]).astype(int)
        cells.append(np.clip(index, 0, scores.shape[axis] - 1))
    values = (scores[cells[0][:, None], cells[1][None, :]] - low) / span
    base = np.asarray(image, dtype=np.float64)
    blended = (1 - _ALPHA) * base + _ALPHA * colormap(values).astype(np.float64)
    canvas = Image.new("RGB", (width, height + LEGEND_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(blended.round().astype(np.uint8)), (0, 0))
    bar = colormap(np.linspace(0, 1, max(width - 8, 2)))[None].repeat(10, 0)
    canvas.paste(Image.fromarray(bar), (4, height + 4))
    label = f"{low:.3g} .. {high:.3g}   class {','.join(map(str, classes))}"
    ImageDraw.Draw(canvas).text((4, height + 17), label, fill=(0, 0, 0))
    return canvas


def _save_png(picture, output: Path) -> None:
    temp = output.parent / f".{output.stem}.{secrets.token_hex(4)}.tmp.png"
    try:
        picture.save(temp, format="PNG")
        os.replace(temp, output)
    except OSError as exc:
        if temp.exists():
            temp.unlink()
        raise OutputError(f"{output}: cannot write: {exc.strerror or exc}") from None
