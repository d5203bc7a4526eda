"""fc2conv inspect and --suggest-map: maps that convert as written, for real name schemes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.suggest import suggest_map, summarize

RNG = np.random.default_rng(0)


def save(path, shapes: dict[str, tuple[int, ...]], **arrays):
    tensors = {n: (RNG.standard_normal(s) * 0.01).astype(np.float32) for n, s in shapes.items()}
    tensors.update(arrays)
    save_file(tensors, str(path))
    return path


def suggestion_for(path):
    with open_checkpoint(path) as checkpoint:
        return suggest_map(checkpoint, path.name)


def converts(run_cli, tmp_path, source, text):
    (tmp_path / "suggested.yaml").write_text(text)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", tmp_path / "suggested.yaml", "-o", output)
    assert outcome.code == 0, outcome.stderr
    output.unlink()
    return outcome


@pytest.mark.parametrize(
    ("arch", "layers", "channels", "kernel"),
    [
        ("alexnet", ("classifier.1", "classifier.4", "classifier.6"), 256, (6, 6)),
        ("vgg11", ("classifier.0", "classifier.3", "classifier.6"), 512, (7, 7)),
        ("vgg16", ("classifier.0", "classifier.3", "classifier.6"), 512, (7, 7)),
        ("vgg19", ("classifier.0", "classifier.3", "classifier.6"), 512, (7, 7)),
    ],
)
def test_torchvision_architectures(run_cli, tmp_path, arch, layers, channels, kernel):
    source = zoo.save_checkpoint(
        zoo.state_dict_shapes(arch), tmp_path / f"{arch}.safetensors", dtype="float16"
    )
    suggestion = suggestion_for(source)
    assert (suggestion.layers, suggestion.in_channels, suggestion.kernel) == (
        layers,
        channels,
        kernel,
    )
    doc = yaml.safe_load(suggestion.text)
    assert doc["layout"] == "chw"  # random weights: cannot tell, so PyTorch's order
    assert "cannot tell" in suggestion.text and suggestion.guess.best is None
    assert (suggestion.source, suggestion.confidence) == ("default", 0.0)
    assert doc["layers"][0] == {"name": layers[0], "kernel": list(kernel), "in_channels": channels}
    converts(run_cli, tmp_path, source, suggestion.text)


def test_lenet5(run_cli, tmp_path):
    source = save(
        tmp_path / "lenet.safetensors",
        {
            "conv1.weight": (6, 1, 5, 5),
            "conv1.bias": (6,),
            "conv2.weight": (16, 6, 5, 5),
            "conv2.bias": (16,),
            "fc1.weight": (120, 400),
            "fc1.bias": (120,),
            "fc2.weight": (84, 120),
            "fc2.bias": (84,),
            "fc3.weight": (10, 84),
            "fc3.bias": (10,),
        },
    )
    suggestion = suggestion_for(source)
    assert (suggestion.layers, suggestion.in_channels, suggestion.kernel) == (
        ("fc1", "fc2", "fc3"),
        16,
        (5, 5),
    )
    assert "(out_channels of conv2.weight) x 5x5 = 400 inputs" in suggestion.text
    converts(run_cli, tmp_path, source, suggestion.text)


def test_timm_style_names_with_norm_layers(run_cli, tmp_path):
    source = save(
        tmp_path / "timm.safetensors",
        {
            "conv_stem.weight": (32, 3, 3, 3),
            "bn1.weight": (32,),
            "bn1.running_mean": (32,),
            "blocks.0.conv.weight": (64, 32, 3, 3),
            "blocks.1.conv.weight": (128, 64, 3, 3),
            "blocks.1.bn.weight": (128,),
            "head.fc1.weight": (256, 128 * 4 * 4),
            "head.fc1.bias": (256,),
            "head.fc2.weight": (10, 256),
        },
    )
    suggestion = suggestion_for(source)
    assert suggestion.layers == ("head.fc1", "head.fc2")
    assert (suggestion.in_channels, suggestion.kernel) == (128, (4, 4))
    converts(run_cli, tmp_path, source, suggestion.text)


def test_branching_heads_are_kept(run_cli, tmp_path):
    source = save(
        tmp_path / "heads.safetensors",
        {
            "backbone.weight": (32, 3, 3, 3),
            "trunk.weight": (64, 32 * 2 * 2),
            "head_a.weight": (10, 64),
            "head_b.weight": (5, 64),
        },
    )
    suggestion = suggestion_for(source)
    assert suggestion.layers == ("trunk", "head_a", "head_b")
    converts(run_cli, tmp_path, source, suggestion.text)


def test_a_non_square_map_on_random_weights_lists_its_candidates(run_cli, tmp_path):
    source = save(
        tmp_path / "wide.safetensors",
        {"conv.weight": (8, 3, 3, 3), "fc.weight": (6, 8 * 15)},
    )
    suggestion = suggestion_for(source)
    assert (suggestion.kernel, suggestion.source) == ((3, 5), "default")
    [note] = suggestion.ambiguities
    assert note.startswith("candidates left: ") and "check how your model flattens" in note
    shapes = {shape for c in suggestion.candidates for shape, _ in c.members}
    assert shapes == {(1, 15), (3, 5), (5, 3), (15, 1)}  # every factorisation was scored
    assert f"# Check: {note}" in suggestion.text
    converts(run_cli, tmp_path, source, suggestion.text)


def test_a_guessed_layout_is_written_into_the_map(run_cli, tmp_path):
    # Filters that vary smoothly over a 3x5 map, flattened hwc: the guess must find hwc.
    channels, height, width, out = 8, 3, 5, 64
    h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    phase = RNG.uniform(0, 2 * np.pi, (out, channels, 1, 1))
    amplitude = RNG.standard_normal((out, channels, 1, 1))
    filters = amplitude * np.cos(0.5 * h + 0.4 * w + phase)  # (O, C, H, W)
    weight = filters.transpose(0, 2, 3, 1).reshape(out, -1).astype(np.float32)
    source = save(
        tmp_path / "smooth.safetensors", {"conv.weight": (8, 3, 3, 3)}, **{"fc.weight": weight}
    )
    suggestion = suggestion_for(source)
    assert yaml.safe_load(suggestion.text)["layout"] == "hwc"
    assert (suggestion.kernel, suggestion.source) == ((3, 5), "weights")
    assert "Map shape and layout from the weights: 3x5 hwc" in suggestion.text
    converts(run_cli, tmp_path, source, suggestion.text)


def test_no_fc_head_is_an_input_error(run_cli, tmp_path):
    source = save(tmp_path / "convs.safetensors", {"conv.weight": (8, 3, 3, 3)})
    outcome = run_cli("inspect", source, "--suggest-map")
    assert outcome.code == 2
    assert (
        outcome.stderr.strip()
        == "error: convs.safetensors: no FC weights (2-D '.weight' tensors) to convert"
    )


def test_summary_groups_in_checkpoint_order(tmp_path):
    source = save(
        tmp_path / "m.safetensors",
        {"a.weight": (4, 3, 3, 3), "a.bias": (4,), "fc.weight": (2, 36), "steps": (1,)},
    )
    with open_checkpoint(source) as checkpoint:
        summary = summarize(checkpoint)
    assert [(g.prefix, g.kind, len(g.tensors)) for g in summary.groups] == [
        ("a", "conv", 2),
        ("fc", "fc", 1),
        ("steps", "other", 1),
    ]
    assert summary.nbytes == 4 * (4 * 27 + 4 + 72 + 1) and summary.tensor_count == 4


def test_cli_table_json_and_map_destinations(run_cli, tmp_path):
    source = save(tmp_path / "m.safetensors", {"conv.weight": (4, 3, 3, 3), "fc.weight": (2, 36)})
    table = run_cli("inspect", source)
    assert table.code == 0 and "conv backbone: 1 layers | FC head: 1 layers" in table.stdout
    to_stdout = run_cli("inspect", source, "--suggest-map")
    assert to_stdout.code == 0
    assert yaml.safe_load(to_stdout.stdout)["layers"][0]["kernel"] == [3, 3]
    assert "fc2conv inspect" in to_stdout.stderr  # the table moved out of the way
    as_json = run_cli("inspect", source, "-o", tmp_path / "map.yaml", "--json", "-")
    report = json.loads(as_json.stdout)
    assert report["suggested_map"]["kernel"] == [3, 3] and report["tensors"] == 2
    assert (tmp_path / "map.yaml").read_text() == report["suggested_map"]["text"]
    again = run_cli("inspect", source, "-o", tmp_path / "map.yaml")
    assert again.code == 2 and "already exists; pass --force" in again.stderr
    assert run_cli("inspect", source, "-o", tmp_path / "map.yaml", "--force").code == 0


# ---------------------------------------------------- names round-trip through the map
# The suggested map is YAML written by PyYAML's emitter, value by value (the comments
# stay), so any tensor name loads back as itself: a hand-rolled quoting rule let `null`,
# `yes` or `1.5` load as None, True or 1.5, and `a: b` or `x # y` change the document.

AWKWARD_NAMES = [
    "null",
    "~",
    "yes",
    "on",
    "1.5",
    "0x10",
    ".inf",
    "-1",
    "2026-01-01",
    "back\\slash",
    "C:\\models\\fc",
    "key: value",
    "colon:",
    "it's",
    'say "hi"',
    "'\"",
    "x # not a comment",
    "#hash",
    "- dash",
    "? question",
    "&anchor",
    "*alias",
    "!tag",
    "%percent",
    "@at",
    "`tick",
    "[list]",
    "{map}",
    "a, b",
    "<<",
    " leading space",
    "trailing space ",
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "bom\ufeff",
    "line\u2028separator",
    "café.classifier",
    "分类器",
    "emoji 😀",
    "__metadata__x",
]

CONV = "backbone.weight"


def _fc_checkpoint(path, prefix: str, weight: np.ndarray | None = None):
    """A conv feeding an FC ``prefix`` (weight and bias) that reads a 4 x 2 x 2 map."""
    rng = np.random.default_rng(3)
    tensors = {
        CONV: rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        f"{prefix}.weight": rng.standard_normal((5, 16)).astype(np.float32)
        if weight is None
        else weight,
        f"{prefix}.bias": rng.standard_normal(5).astype(np.float32),
    }
    save_file(tensors, str(path))
    return tensors


def _round_trip(folder, prefix: str) -> None:
    """suggest -> parse_layer_map -> convert, in the library; the output names the layer."""
    from fc2conv_cli.layer_map import parse_layer_map
    from fc2conv_cli.pipeline import ConvertOptions, convert

    source = folder / "model.safetensors"
    tensors = _fc_checkpoint(source, prefix)
    suggestion = suggestion_for(source)
    assert suggestion.layers == (prefix,)
    [rule] = parse_layer_map(suggestion.text, "suggested").rules
    assert (rule.name, rule.weight, rule.kernel) == (prefix, None, (2, 2))  # found by suffix
    (folder / "map.yaml").write_text(suggestion.text, encoding="utf-8")
    output = folder / "out.safetensors"
    result = convert(ConvertOptions(source, folder / "map.yaml", output))
    assert result.ok and result.published
    written = load_file(str(output))
    assert set(written) == {CONV, f"{prefix}.weight", f"{prefix}.bias"}
    np.testing.assert_array_equal(
        written[f"{prefix}.weight"], tensors[f"{prefix}.weight"].reshape(5, 4, 2, 2)
    )


@pytest.mark.parametrize("prefix", AWKWARD_NAMES)
def test_any_name_round_trips_through_the_cli(run_cli, tmp_path, prefix):
    source = tmp_path / "model.safetensors"
    tensors = _fc_checkpoint(source, prefix)
    map_path = tmp_path / "suggested.yaml"
    outcome = run_cli("inspect", source, "--suggest-map", "-o", map_path)
    assert outcome.code == 0, outcome.stderr
    text = map_path.read_text(encoding="utf-8")
    assert text.startswith("# Layer map suggested by")  # the comments are kept
    assert "# [5, 16] -> conv 2x2" in text
    assert all(line.isprintable() for line in text.splitlines())  # one line per value
    assert yaml.safe_load(text)["layers"][0]["name"] == prefix
    output = tmp_path / "out.safetensors"
    converted = run_cli("convert", source, "--map", map_path, "-o", output)
    assert converted.code == 0, converted.stderr
    written = load_file(str(output))
    np.testing.assert_array_equal(
        written[f"{prefix}.weight"], tensors[f"{prefix}.weight"].reshape(5, 4, 2, 2)
    )
    np.testing.assert_array_equal(written[f"{prefix}.bias"], tensors[f"{prefix}.bias"])


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.one_of(st.sampled_from(AWKWARD_NAMES), st.text(min_size=1, max_size=24)).filter(
        lambda p: p.strip() and p != "backbone"
    )
)
def test_arbitrary_text_names_survive_suggest_parse_and_convert(prefix):
    with tempfile.TemporaryDirectory() as folder:
        _round_trip(Path(folder), prefix)


def test_a_blank_layer_prefix_is_refused_with_one_line(run_cli, tmp_path):
    source = tmp_path / "model.safetensors"
    _fc_checkpoint(source, " ")
    outcome = run_cli("inspect", source, "--suggest-map")
    assert outcome.code == 2
    assert outcome.stderr.strip().splitlines() == [
        "error: model.safetensors: FC weight ' .weight' has a blank layer prefix, which a "
        "layer map cannot name; rename the tensor"
    ]


def test_a_line_break_in_a_name_stays_inside_the_comments(tmp_path):
    source = tmp_path / "line\nbreak.safetensors"
    _fc_checkpoint(source, "fc\n# injected: yes")
    text = suggestion_for(source).text
    doc = yaml.safe_load(text)
    assert doc["layers"] == [{"name": "fc\n# injected: yes", "kernel": [2, 2], "in_channels": 4}]
    assert set(doc) == {"version", "layout", "layers"}  # the stored weight format applies
    assert all(line.isprintable() for line in text.splitlines())


# --------------------------------------------------- NaN, Inf and empty weights (exit 0/2)


@pytest.mark.parametrize(
    "damage",
    ["one nan", "one inf", "all nan", "-inf row"],
)
def test_nan_or_inf_in_the_fc_weight_never_makes_inspect_crash(run_cli, tmp_path, damage):
    weight = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
    if damage == "one nan":
        weight[2, 3] = np.nan
    elif damage == "one inf":
        weight[0, 0] = np.inf
    elif damage == "all nan":
        weight[:] = np.nan
    else:
        weight[4] = -np.inf
    source = tmp_path / "model.safetensors"
    _fc_checkpoint(source, "head", weight)
    table = run_cli("inspect", source)
    assert table.code == 0, table.stderr
    assert "FC head: 1 layers" in table.stdout
    suggested = run_cli("inspect", source, "--suggest-map", "--json", tmp_path / "r.json")
    assert suggested.code == 0, suggested.stderr
    assert "Traceback" not in suggested.stderr
    doc = yaml.safe_load(suggested.stdout)
    assert doc["layers"][0] == {"name": "head", "kernel": [2, 2], "in_channels": 4}
    assert doc["layout"] == "chw"  # cannot tell: PyTorch's order, and said so
    report = json.loads((tmp_path / "r.json").read_text())["suggested_map"]
    assert report["source"] == "default" and report["reason"].startswith("cannot tell")


@pytest.mark.parametrize("shape", [(0, 16), (5, 0)])
def test_empty_fc_weights_are_left_out_of_the_suggestion(run_cli, tmp_path, shape):
    source = tmp_path / "model.safetensors"
    save_file(
        {
            CONV: np.ones((4, 3, 3, 3), np.float32),
            "empty.weight": np.zeros(shape, np.float32),
            "empty_conv.weight": np.zeros((0, 3, 3, 3), np.float32),
        },
        str(source),
    )
    outcome = run_cli("inspect", source, "--suggest-map")
    assert outcome.code == 2, outcome.stderr
    assert outcome.stderr.strip().splitlines() == [
        f"error: model.safetensors: no FC weights (2-D '.weight' tensors) to convert; "
        f"empty.weight {list(shape)} is empty"
    ]
    # Beside a real FC head, the empty weight and the empty conv are simply ignored.
    tensors = dict(load_file(str(source)))
    tensors["head.weight"] = np.ones((5, 16), np.float32)
    save_file(tensors, str(source))
    outcome = run_cli("inspect", source, "--suggest-map")
    assert outcome.code == 0, outcome.stderr
    assert yaml.safe_load(outcome.stdout)["layers"] == [
        {"name": "head", "kernel": [2, 2], "in_channels": 4}
    ]


def test_inspect_json_gives_every_candidate_and_the_source(run_cli, tmp_path):
    # Smooth filters over a 2 x 6 map flattened chw: shape and order from the weights.
    channels, height, width, out = 6, 2, 6, 48
    h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    phase = RNG.uniform(0, 2 * np.pi, (out, channels, 1, 1))
    filters = RNG.standard_normal((out, channels, 1, 1)) * np.cos(0.6 * h + 0.5 * w + phase)
    source = save(
        tmp_path / "m.safetensors",
        {"conv.weight": (channels, 3, 3, 3)},
        **{"fc.weight": filters.reshape(out, -1).astype(np.float32)},
    )
    outcome = run_cli("inspect", source, "--suggest-map", "--json", tmp_path / "r.json")
    assert outcome.code == 0, outcome.stderr
    report = json.loads((tmp_path / "r.json").read_text())["suggested_map"]
    assert (report["source"], report["layout"], report["kernel"]) == ("weights", "chw", [2, 6])
    assert report["layout_source"] == report["shape_source"] == "weights"
    assert report["reading"] is None and report["confidence"] >= 0.6
    candidates = report["candidates"]
    assert set(candidates[0]) == {"shape", "layout", "score", "z", "support", "confidence",
                                  "equivalent"}  # fmt: skip
    scored = {(tuple(m["shape"]), m["layout"]) for c in candidates for m in c["equivalent"]}
    assert len(scored) == 6 * 6  # 1x12, 2x6, 3x4, 4x3, 6x2, 12x1, each in six orders
    assert [c["score"] for c in candidates] == sorted(
        (c["score"] for c in candidates), reverse=True
    )
    assert "map candidates" in outcome.stderr  # the table shows them too
