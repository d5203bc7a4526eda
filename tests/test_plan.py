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
            r"layers\[0\] \(classifer.0\): no weight for 'classifer.0' in the checkpoint "
            r"\(tried classifer.0.weight, classifer.0.weight:0, classifer.0/kernel, "
            r"classifer.0/kernel:0\); closest names: classifier.0.weight",
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


def _keras_index(weight_format=None, tail="") -> dict[str, TensorInfo]:
    """A Keras-named head: ``fc1/kernel`` (in, out) over a 2x3x4 map, then ``fc2``."""
    from fc2conv_cli.layout import WeightFormat

    hint = WeightFormat(weight_format) if weight_format else None
    names = {
        f"fc1/kernel{tail}": (24, 5),
        f"fc1/bias{tail}": (5,),
        f"fc2/kernel{tail}": (5, 3),
        f"fc2/bias{tail}": (3,),
    }
    return {n: TensorInfo(n, "F32", s, hint if len(s) == 2 else None) for n, s in names.items()}


KERAS_MAP = """
version: 1
layout: hwc
layers:
  - {name: fc1, kernel: [2, 3], in_channels: 4}
  - {name: fc2}
"""


@pytest.mark.parametrize("tail", ["", ":0"])
def test_a_name_finds_the_formats_own_suffixes_and_outputs_keep_their_names(tail):
    plan = plan_for(_keras_index("in_out", tail), KERAS_MAP)
    fc1, fc2 = plan.layers
    assert (fc1.weight.source, fc1.bias.source) == (f"fc1/kernel{tail}", f"fc1/bias{tail}")
    assert (fc1.weight.name, fc1.bias.name) == (f"fc1/kernel{tail}", f"fc1/bias{tail}")
    # The tensor's stored format (a reader's hint) applies where the map says none.
    assert fc1.weight.conversion.weight_format.value == "in_out"
    assert fc1.weight.shape == (5, 4, 2, 3) and fc2.weight.shape == (3, 5, 1, 1)


def test_rename_replaces_the_layer_prefix_and_keeps_the_suffix():
    text = KERAS_MAP.replace("{name: fc2}", "{name: fc2, rename: fc7}")
    fc1, fc2 = plan_for(_keras_index("in_out"), text).layers
    assert (fc2.weight.name, fc2.bias.name) == ("fc7/kernel", "fc7/bias")
    assert fc1.weight.name == "fc1/kernel"
    # An explicit weight outside the layer's prefix gets torch's suffixes under the rename.
    tensors = index(unknown_5=(3, 8), unknown_6=(3,))
    text = "version: 1\nlayout: chw\nlayers: [{name: x, weight: unknown_5, bias: unknown_6}]"
    (layer,) = plan_for(tensors, text).layers
    assert (layer.weight.name, layer.bias.name) == ("unknown_5", "unknown_6")
    (layer,) = plan_for(tensors, text.replace("name: x,", "name: x, rename: fc6,")).layers
    assert (layer.weight.name, layer.bias.name) == ("fc6.weight", "fc6.bias")


def test_the_map_weight_format_wins_over_the_stored_one_and_out_in_is_the_last_default():
    text = KERAS_MAP.replace("layout: hwc", "layout: hwc\nweight_format: out_in")
    assert problems(_keras_index("in_out"), text)  # (24, 5) read as out_in does not fit
    (fc,) = plan_for(
        index(fc__weight=(5, 24)), "version: 1\nlayout: chw\nlayers: [{name: fc}]"
    ).layers
    assert fc.weight.conversion.weight_format.value == "out_in"  # no word anywhere: torch's


def test_hwio_conv_format_stores_kernel_in_out_order():
    text = KERAS_MAP.replace("layout: hwc", "layout: hwc\nconv_format: hwio")
    fc1, fc2 = plan_for(_keras_index("in_out"), text).layers
    assert fc1.weight.shape == (2, 3, 4, 5) and fc2.weight.shape == (1, 1, 5, 3)
    assert fc1.weight.conversion.conv_format.value == "hwio"
    per_layer = KERAS_MAP.replace("{name: fc2}", "{name: fc2, conv_format: hwio}")
    fc1, fc2 = plan_for(_keras_index("in_out"), per_layer).layers
    assert fc1.weight.shape == (5, 4, 2, 3) and fc2.weight.shape == (1, 1, 5, 3)


def test_several_matching_suffixes_are_refused_as_ambiguous():
    tensors = {**_keras_index("in_out"), **index(fc1__weight=(5, 24))}
    (problem,) = problems(tensors, KERAS_MAP)
    assert "several weights match 'fc1': fc1.weight, fc1/kernel; name one with weight:" in problem


def test_rename_replaces_only_a_whole_name_segment():
    tensors = index(head_w=(3, 8), head__b=(3,))
    text = (
        "version: 1\nlayout: chw\nlayers: [{name: head, rename: fc8, weight: head_w, bias: head.b}]"
    )
    (layer,) = plan_for(tensors, text).layers
    assert (layer.weight.name, layer.bias.name) == ("fc8.weight", "fc8.b")
