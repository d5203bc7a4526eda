"""Checkpoints with real architectures' tensor names and shapes and random weights.

Used by ``make demo``, the benchmarks and the tests; no download needed. Shapes follow
torchvision's ``alexnet`` and ``vgg11/16/19`` exactly (``features.*``, ``classifier.*``).

    python bench/zoo.py vgg16 demo/vgg16.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["ARCHITECTURES", "save_checkpoint", "state_dict_shapes"]

_VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip
ARCHITECTURES = ("alexnet", "vgg11", "vgg16", "vgg19", "vgg16_keras")


def state_dict_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the order torchvision's ``state_dict()`` lists them."""
    shapes: dict[str, tuple[int, ...]] = {}
    if arch == "alexnet":
        convs = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3),
                 (10, 256, 256, 3)]  # fmt: skip
        for index, out_c, in_c, k in convs:
            shapes[f"features.{index}.weight"] = (out_c, in_c, k, k)
            shapes[f"features.{index}.bias"] = (out_c,)
        fcs = [(1, 4096, 256 * 6 * 6), (4, 4096, 4096), (6, num_classes, 4096)]
        for index, out_f, in_f in fcs:
            shapes[f"classifier.{index}.weight"] = (out_f, in_f)
            shapes[f"classifier.{index}.bias"] = (out_f,)
        return shapes
    if arch == "vgg16_keras":  # Keras VGG16 head: NHWC flatten, Dense kernels (in, out)
        return {
            "fc1/kernel": (7 * 7 * 512, 4096), "fc1/bias": (4096,),
            "fc2/kernel": (4096, 4096), "fc2/bias": (4096,),
            "predictions/kernel": (4096, num_classes), "predictions/bias": (num_classes,),
        }  # fmt: skip
    in_c, index = 3, 0
    for item in _VGG_CFGS[arch]:
        if item == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (item, in_c, 3, 3)
        shapes[f"features.{index}.bias"] = (item,)
        in_c, index = item, index + 2
    fcs = [(0, 4096, 512 * 7 * 7), (3, 4096, 4096), (6, num_classes, 4096)]
    for index, out_f, in_f in fcs:
        shapes[f"classifier.{index}.weight"] = (out_f, in_f)
        shapes[f"classifier.{index}.bias"] = (out_f,)
    return shapes


def save_checkpoint(
    shapes: dict[str, tuple[int, ...]], path: Path, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write random weights with these shapes as .safetensors, or .pth/.pt via torch."""
    rng = np.random.default_rng(seed)
    tensors = {
        name: (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(dtype)
        for name, shape in shapes.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(path))
    else:
        import torch

        torch.save({name: torch.from_numpy(array) for name, array in tensors.items()}, path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("output", type=Path, help=".safetensors, .pth or .pt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.output.exists():
        print(f"{args.output}: exists, kept", file=sys.stderr)
        return 0
    save_checkpoint(state_dict_shapes(args.arch), args.output, args.seed)
    print(f"wrote {args.output} ({args.arch}, random weights)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
