"""build_plan: a pure function from a tensor index and a map to the output tensors."""

from __future__ import annotations

import re

import pytest

from fc2conv_cli.errors import PlanError
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.plan import build_plan
from fc2conv_cli.readers import TensorInfo


def index(**shapes) -> dict[str, TensorInfo]:
    """Names use '__' for '.', e.g. classifier__0__weight=(4096, 25088)."""
    infos = {}
    for key, spec in shapes.items():
        dtype, shape = spec if isinstance(spec[0], str) else ("F32", spec)
        name = key.replace("__", ".")
        infos[name] = TensorInfo(name, dtype, tuple(shape))
    return infos


VGG_HEAD = index(
    features__28__weight=(512, 512, 3, 3),
    features__28__bias=(512,),
    classifier__0__weight=(4096, 25088),
    classifier__0__bias=(4096,),
    classifier__3__weight=(4096, 4096),
    classifier__3__bias=(4096,),
    classifier__6__weight=(1000, 4096),
    classifier__6__bias=(1000,),
)
VGG_MAP = """
version: 1
layout: chw
layers:
  - {name: classifier.0, rename: fc6, kernel: [7, 7], in_channels: 512}
  - {name: classifier.3, rename: fc7}
  - {name: classifier.6, rename: fc8}
"""


def plan_for(tensors, text):
    return build_plan(tensors, parse_layer_map(text, "map.yaml"))


def problems(tensors, text) -> list[str]:
    with pytest.raises(PlanError) as info:
        plan_for(tensors, text)
    return info.value.problems


def test_vgg_head_plan():
    plan = plan_for(VGG_HEAD, VGG_MAP)
    fc6, fc7, fc8 = plan.layers
    assert (fc6.source_shape, fc6.weight.shape) == ((4096, 25088), (4096, 512, 7, 7))
    assert (fc6.in_channels, fc6.in_features, fc6.out_features) == (512, 25088, 4096)
    assert fc7.weight.shape == (4096, 4096, 1, 1) and fc8.weight.shape == (1000, 4096, 1, 1)
    assert not fc6.weight.conversion.moves_bytes  # chw out_in: only the header changes
    assert fc6.bias.name == "fc6.bias" and fc6.bias.source == "classifier.0.bias"
    assert [t.name for t in plan.copied] == ["features.28.bias", "features.28.weight"]
    assert [t.name for t in plan.tensors] == sorted(t.name for t in plan.tensors)
    assert plan.warnings == ()


def test_output_order_is_by_dtype_width_then_name_whatever_the_source_order():
    tensors = index(b=("F16", (3,)), a=("F16", (3,)), c=("F64", (2,)), fc__weight=(2, 4))
    plan = plan_for(tensors, "version: 1\nlayout: chw\nlayers: [{name: fc}]")
    assert [t.name for t in plan.tensors] == ["c", "fc.weight", "a", "b"]
    reordered = dict(reversed(list(tensors.items())))
    assert plan_for(reordered, "version: 1\nlayout: chw\nlayers: [{name: fc}]") == plan


def test_in_channels_is_derived_and_layout_moves_bytes():
    tensors = index(fc1__kernel=(60, 8))
    plan = plan_for(
        tensors,
        "version: 1\nlayout: hwc\nweight_format: in_out\n"
        "layers: [{name: fc1, weight: fc1/kernel, kernel: [3, 4]}]".replace("fc1/", "fc1."),
    )
    [layer] = plan.layers
    assert (layer.in_channels, layer.out_features, layer.weight.shape) == (5, 8, (8, 5, 3, 4))
    assert layer.weight.conversion.moves_bytes and layer.bias is None


def test_branching_heads_warn_but_plan():
    tensors = index(a__weight=(10, 8), b__weight=(3, 6))
    plan = plan_for(tensors, "version: 1\nlayout: chw\nlayers: [{name: a}, {name: b}]")
    [warning] = plan.warnings
    assert "layer 'b' has in_features 6 but the previous layer 'a' has out_features 10" in warning


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (
            "[{name: classifer.0}]",
            r"layers\[0\] \(classifer.0\): weight 'classifer.0.weight' is not in the checkpoint; "
            r"closest names: classifier.0.weight",
        ),
        (
            "[{name: features.28}]",
            r"weight 'features.28.weight' has shape \[512, 512, 3, 3\], expected a 2-D FC weight",
        ),
        (
            "[{name: classifier.0, kernel: [5, 5]}]",
            r"kernel: in_features 25088 is not divisible by kernel 5x5 = 25",
        ),
        (
            "[{name: classifier.0, kernel: [7, 7], in_channels: 256}]",
            r"in_channels: 256 x kernel 7x7 = 12544, but the weight has in_features 25088",
        ),
        (
            "[{name: classifier.0, bias: classifier.6.bias}]",
            r"bias 'classifier.6.bias' has shape \[1000\], expected \[4096\]",
        ),
        (
            "[{name: classifier.0, bias: nothere.bias}]",
            r"bias 'nothere.bias' is not in the checkpoint",
        ),
        (
            "[{name: classifier.0, rename: features.28}]",
            r"output name 'features.28.bias' is produced by both layer 'classifier.0' and "
            r"copied tensor 'features.28.bias'",
        ),
        (
            "[{name: classifier.3}, {name: x, weight: classifier.3.weight}]",
            r"tensor 'classifier.3.weight' is already converted by layer 'classifier.3'",
        ),
    ],
)
def test_rules_that_do_not_fit_are_refused(layers, expected):
    found = problems(VGG_HEAD, f"version: 1\nlayout: chw\nlayers: {layers}\n")
    assert any(re.search(expected, p) for p in found), found


def test_integer_weights_are_refused():
    found = problems(
        index(fc__weight=("I64", (4, 4))), "version: 1\nlayout: chw\nlayers: [{name: fc}]"
    )
    assert found == ["map.yaml: layers[0] (fc): weight 'fc.weight' is I64, expected a float dtype"]


def test_all_problems_are_listed_together():
    found = problems(VGG_HEAD, "version: 1\nlayout: chw\nlayers: [{name: x}, {name: features.28}]")
    assert len(found) == 2
