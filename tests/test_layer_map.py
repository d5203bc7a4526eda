"""Layer-map parsing: typed rules from good maps, every problem named in bad ones."""

from __future__ import annotations

import re
import textwrap

import pytest

from fc2conv_cli.errors import MapError
from fc2conv_cli.layer_map import parse_layer_map, read_layer_map
from fc2conv_cli.layout import WeightFormat

GOOD = """
version: 1
layout: chw
weight_format: out_in
strip_prefix: "module."
state_dict_key: state_dict
layers:
  - name: classifier.0
    rename: fc6
    kernel: [7, 7]
    in_channels: 512
  - name: classifier.3
    rename: fc7
    layout: hwc
  - name: head
    weight: fc1/kernel
    bias: fc1/bias
    weight_format: in_out
"""


def parse(text: str):
    return parse_layer_map(textwrap.dedent(text), "map.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(MapError) as info:
        parse(text)
    return info.value.problems


def test_good_map_gives_typed_rules():
    layer_map = parse(GOOD)
    first, second, third = layer_map.rules
    assert layer_map.strip_prefixes == ("module.",)
    assert layer_map.state_dict_key == "state_dict"
    assert (first.name, first.rename, first.kernel, first.in_channels) == (
        "classifier.0",
        "fc6",
        (7, 7),
        512,
    )
    # No weight:/bias: keys: the plan finds them by the format's suffixes.
    assert (first.weight, first.bias) == (None, None)
    assert first.output_prefix == "fc6"
    assert second.kernel == (1, 1)  # same number of ones as the other kernels
    assert str(second.layout) == "hwc" and str(first.layout) == "chw"
    assert third.weight_format is WeightFormat.IN_OUT
    assert (third.weight, third.bias) == ("fc1/kernel", "fc1/bias")
    assert third.output_prefix == "head"


def test_kernel_dimension_comes_from_the_layout_when_no_kernel_is_given():
    layer_map = parse("version: 1\nlayout: cdhw\nlayers: [{name: fc}]\n")
    assert layer_map.rules[0].kernel == (1, 1, 1)
    layer_map = parse("version: 1\nlayout: lc\nlayers: [{name: fc, kernel: [9]}]\n")
    assert layer_map.rules[0].kernel == (9,)


def test_strip_prefix_accepts_a_list():
    text = 'version: 1\nlayout: chw\nstrip_prefix: ["module.", "_orig_mod."]\nlayers: [{name: a}]'
    assert parse(text).strip_prefixes == ("module.", "_orig_mod.")


def test_sha256_identifies_the_map_text():
    assert parse(GOOD).sha256 == parse(GOOD).sha256 != parse(GOOD + "\n# x\n").sha256


def test_yaml_syntax_error_names_the_line():
    [message] = problems("version: 1\nlayout: chw\nlayers:\n  - name: [a\n")
    assert message.startswith("map.yaml: line ")
    assert "YAML syntax error" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", r"map.yaml: top level: document: expected a mapping"),
        ("layout: chw\nlayers: [{name: a}]", r"top level: version: expected version: 1"),
        ("version: 2\nlayout: chw\nlayers: [{name: a}]", r"version: expected a supported .*got 2"),
        ("version: 1\nlayers: [{name: a}]", r"top level: layout: expected the flatten order"),
        ("version: 1\nlayout: cxy\nlayers: [{name: a}]", r"top level: layout: layout 'cxy'"),
        ("version: 1\nlayout: chw\nlayers: []", r"top level: layers: expected a non-empty list"),
        (
            "version: 1\nlayout: chw\nweight_format: io\nlayers: [{name: a}]",
            r"weight_format: expected one of out_in, in_out, got 'io'",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, kernel: '7x7'}]",
            r"layers\[0\] \(a\): kernel: expected a list of 1 to 3 positive integers, "
            r"e.g. \[7, 7\], got '7x7'",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, kernel: [7, 0]}]",
            r"layers\[0\] \(a\): kernel: expected",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, kernel: [7]}]",
            r"layers\[0\] \(a\): layout: expected 1 spatial axes to match the kernel",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, in_channels: -3}]",
            r"layers\[0\] \(a\): in_channels: expected a positive integer, got -3",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, kernelsize: [7, 7]}]",
            r"layers\[0\] \(a\): unknown key 'kernelsize' \(did you mean 'kernel'\?\)",
        ),
        (
            "version: 1\nlayout: chw\nlayer: [{name: a}]",
            r"top level: unknown key 'layer' \(did you mean 'layers'\?\)",
        ),
        ("version: 1\nlayout: chw\nlayers: [{rename: b}]", r"layers\[0\]: name: expected"),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, rename: x}, {name: b, rename: x}]",
            r"layers\[1\] \(b\): output name 'x' is also produced by layer 'a'",
        ),
        (
            "version: 1\nlayout: chw\nlayers: [{name: a, kernel: [2, 2]}, {name: b, kernel: [3]}]",
            r"layers\[1\] \(b\): kernel: expected 2 sizes like the map's other kernels",
        ),
        ("version: 1\nlayout: chw\nstrip_prefix: 3\nlayers: [{name: a}]", r"strip_prefix"),
    ],
)
def test_bad_maps_name_file_layer_and_key(text, expected):
    found = problems(text)
    assert any(re.search(expected, p) for p in found), found
    assert all(p.startswith("map.yaml:") for p in found)


def test_every_problem_is_reported_at_once():
    found = problems(
        "version: 3\nlayout: chw\nlayers:\n"
        "  - {name: a, kernel: bad}\n  - {name: b, in_channels: 0}\n  - {name: c, colour: red}\n"
    )
    assert len(found) == 4
    assert [p.split(": ")[1] for p in found] == [
        "top level",
        "layers[0] (a)",
        "layers[1] (b)",
        "layers[2] (c)",
    ]


def test_read_layer_map_reports_missing_file(tmp_path):
    with pytest.raises(MapError, match=r"nope.yaml: layer map not found"):
        read_layer_map(tmp_path / "nope.yaml")
    with pytest.raises(MapError, match=r"is a directory"):
        read_layer_map(tmp_path)


# ------------------------------------------------------------------------ duplicate keys
# The loader refuses a key given twice while it builds each mapping: plain YAML would keep
# the last value silently and convert with a kernel or layout the user did not mean.

DUPLICATES = {
    "top level": ("version: 1\nlayout: chw\nlayout: hwc\nlayers: [{name: a}]\n", "layout", 2, 3),
    "in a layer": (
        "version: 1\nlayout: chw\nlayers:\n  - name: a\n    kernel: [7, 7]\n"
        "    in_channels: 2\n    kernel: [1, 1]\n",
        "kernel",
        5,
        7,
    ),
    "in a flow mapping": (
        "version: 1\nlayout: chw\nlayers: [{name: a, name: b}]\n",
        "name",
        3,
        3,
    ),
    "a quoted and a plain spelling": (
        'version: 1\n"version": 1\nlayout: chw\nlayers: [{name: a}]\n',
        "version",
        1,
        2,
    ),
    "an integer key": ("1: a\nversion: 1\n1: b\nlayout: chw\nlayers: [{name: a}]\n", "1", 1, 3),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_a_duplicate_key_anywhere_names_the_key_and_both_lines(case):
    text, key, first, second = DUPLICATES[case]
    [message] = problems(text)
    assert message.startswith(f"map.yaml: line {second}, column "), message
    assert f"duplicate key {key!r}" in message or f"duplicate key {key}" in message, message
    assert f"first given on line {first}, again on line {second}" in message, message
    assert "syntax error" not in message


def test_a_merge_key_may_still_be_overridden():
    # `<<` merges defaults that the mapping's own keys override: not a duplicate.
    layer_map = parse(
        "version: 1\nlayout: chw\nlayers:\n"
        "  - &base {name: a, kernel: [7, 7]}\n  - <<: *base\n    name: b\n    kernel: [1, 1]\n"
    )
    assert [(r.name, r.kernel) for r in layer_map.rules] == [("a", (7, 7)), ("b", (1, 1))]


def test_the_same_key_in_two_mappings_is_no_duplicate():
    layer_map = parse("version: 1\nlayout: chw\nlayers:\n  - {name: a}\n  - {name: b}\n")
    assert [r.name for r in layer_map.rules] == ["a", "b"]


def test_a_folder_named_like_a_shipped_map_does_not_hide_it(tmp_path, monkeypatch):
    from pathlib import Path

    from fc2conv_cli.layer_map import read_layer_map

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vgg16").mkdir()  # e.g. the zoo's folder of VGG16 checkpoints
    assert read_layer_map(Path("vgg16")).rules[0].name == "classifier.0"
