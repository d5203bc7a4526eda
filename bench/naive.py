"""The script users write today: load everything, reshape the FC weights, save.

The baseline that ``bench_convert.py`` measures fc2conv against. Plain torch, as a user
would write it: no memory maps, no chunking, no float64.

    python bench/naive.py vgg16.safetensors vgg16_fcn.safetensors
    python bench/naive.py vgg16.pth vgg16_fcn.safetensors --check

The first layer named becomes an (O, C, k, k) conv over the C x k x k feature map it used
to flatten (channel-major, ``torch.flatten(x, 1)``), the others 1x1 convs. The defaults
are torchvision VGG16's head. With ``--check`` both files are loaded again and each
converted layer's output is compared in float32 on a random input.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

VGG16_LAYERS = ("classifier.0", "classifier.3", "classifier.6")


def load(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def conv_shape(weight: torch.Tensor, first: bool, channels: int, kernel: int) -> tuple:
    out_features = weight.shape[0]
    if first:
        return (out_features, channels, kernel, kernel)
    return (out_features, weight.shape[1], 1, 1)


def convert(state: dict, layers: list[str], channels: int, kernel: int) -> dict:
    out = dict(state)
    for i, layer in enumerate(layers):
        weight = state[f"{layer}.weight"]
        out[f"{layer}.weight"] = weight.reshape(conv_shape(weight, i == 0, channels, kernel))
    return {name: tensor.contiguous() for name, tensor in out.items()}


def check(source: str, output: str, layers: list[str], channels: int, kernel: int) -> bool:
    before, after = load(source), load_file(output)
    torch.manual_seed(0)
    ok = True
    for layer in layers:
        conv_weight = after[f"{layer}.weight"].float()
        x = torch.randn(4, conv_weight.shape[1], *conv_weight.shape[2:])
        fc = F.linear(x.flatten(1), before[f"{layer}.weight"].float(), before[f"{layer}.bias"])
        conv = F.conv2d(x, conv_weight, after[f"{layer}.bias"].float()).flatten(1)
        diff = (fc - conv).abs().max().item()
        good = diff <= 1e-3 * max(1.0, fc.abs().max().item())
        ok &= good
        print(f"{layer}: max |fc - conv| = {diff:.3g} {'ok' if good else 'FAILED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help=".safetensors or .pth")
    parser.add_argument("output", help=".safetensors")
    parser.add_argument("--layers", nargs="+", default=list(VGG16_LAYERS))
    parser.add_argument("--in-channels", type=int, default=512)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    state = load(args.input)
    save_file(convert(state, args.layers, args.in_channels, args.kernel), args.output)
    del state
    if args.check and not check(
        args.input, args.output, args.layers, args.in_channels, args.kernel
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
