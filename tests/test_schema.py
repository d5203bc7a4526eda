"""The shipped JSON Schemas agree with fc2conv's own validators, on the property corpus.

The layer map's validator is the source of truth: every map it accepts validates against
the schema, and every map it refuses for a type, value or key error fails the schema.
Only checks across keys (kernel ranks, layout rank against the kernel, distinct output
names) are the validator's alone.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft202012Validator
from test_properties import HOSTILE_SCALARS, TEXT, VALID_MAP, VALUES, _random_document

from fc2conv_cli import layer_map, manifest
from fc2conv_cli.errors import ManifestError, MapError
from fc2conv_cli.layer_map import load_yaml, parse_layer_map, sample_configs
from fc2conv_cli.layout import SPATIAL_AXES, ConvFormat, WeightFormat
from fc2conv_cli.schema import (
    SCHEMA_KINDS,
    language_server_line,
    layer_map_schema,
    manifest_schema,
    schema_text,
)

MAP = Draft202012Validator(layer_map_schema())
MANIFEST = Draft202012Validator(manifest_schema())
# Editors' yaml-language-server implements draft 7: the schema uses only keywords that
# mean the same there, so both drafts give the same verdict.
MAP_DRAFT7 = Draft7Validator(layer_map_schema())
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAYOUTS = ["".join(p) for axes in SPATIAL_AXES.values() for p in itertools.permutations("c" + axes)]
# Problems only the validator can find: they relate several keys to each other.
ACROSS_KEYS = re.compile(
    r"sizes like the map's other kernels|spatial axes to match the kernel|is also produced by"
    r"|only the last layer|only the first layer|not with direction"
)


def _validator_problems(text: str) -> list[str]:
    try:
        parse_layer_map(text, "map.yaml")
    except MapError as error:
        return error.problems
    return []


def _has_integral_float(value: Any) -> bool:
    """JSON has one number type: a schema cannot tell YAML's 1.0 from 1."""
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    return False


def _assert_agree(text: str) -> None:
    try:
        doc = load_yaml(text)
    except yaml.YAMLError:
        return  # not a document: the YAML parser's refusal, before either validator
    problems = _validator_problems(text)
    schema_errors = [e.message for e in MAP.iter_errors(doc)]
    assert MAP_DRAFT7.is_valid(doc) == (not schema_errors), text
    if not problems:
        assert schema_errors == [], (text, schema_errors)
    elif not all(ACROSS_KEYS.search(p) for p in problems) and not _has_integral_float(doc):
        assert schema_errors, (text, problems)


# Per key, values in every spelling the validator accepts or nearly accepts.
_NAMES = [
    "head.0",
    "a b",
    "名前",
    " ",
    "",
    "\t",
    "\r\x0b",
    "\u3000",
    "\x1c",
    "\x85",
    "\ufeff",
    "\u2028",
]
_KERNELS = [[1], [7, 7], [2, 3, 4], [], [1, 2, 3, 4], [0], [-1], [True], [2.0], [2.5], [[1]], "7x7"]
_LAYOUTS = [*LAYOUTS, " CHW ", "Hwc\n", "\u3000cl", "chw\x1c", "\ufeffchw", "chhw", "ch w", "c"]
_FORMATS = [*(f.value for f in (*WeightFormat, *ConvFormat)), "OIHW", "out-in", " hwio"]
_COUNTS = [1, 6, 2**70, 0, -1, True, 2.0, "3"]
_FOLDS = [
    {"name": "bn"},
    {"name": "bn", "eps": 0.001},
    {"name": "bn", "eps": 1},
    {"name": "bn", "eps": None},
    {"name": "bn", "eps": 0},
    {"name": "bn", "eps": -1.0},
    {"name": "bn", "eps": True},
    {"name": "bn", "eps": "1e-5"},
    {"name": "bn", "eps": float("inf")},
    {"name": "bn", "extra": 1},
    {"name": " "},
    {"eps": 0.1},
    "bn",
    [],
]
_OUTPUTS = [
    [0, 5, 7],
    [0],
    [],
    [-1],
    [1, 1],
    [True],
    [1.5],
    "1:1001",
    ":",
    "1:",
    "::2",
    "1:2:0",
    "a:b",
    "1",
    "1:2\n",
    " 1:2",
    "-1:",
]
_PER_KEY = {
    "version": [1, 2, 0, True, 1.0, "1"],
    "layout": _LAYOUTS,
    "weight_format": _FORMATS,
    "conv_format": _FORMATS,
    "strip_prefix": [*_NAMES, [], ["m."], ["m.", " "], ["m.", 3], [["m."]]],
    "state_dict_key": _NAMES,
    "layers": [[], "x", [None], [{}], [{"name": "a"}], [{"name": "a", "kernel": [2, 2]}]],
    "name": _NAMES,
    "rename": _NAMES,
    "kernel": _KERNELS,
    "in_channels": _COUNTS,
    "weight": _NAMES,
    "bias": _NAMES,
    "direction": ["fc_to_conv", "conv_to_fc", "FC_TO_CONV", "reverse", True],
    "dtype": ["float32", "float16", "bfloat16", "fp16", "F16", 16],
    "fold_batchnorm": _FOLDS,
    "fold_batchnorm_before": _FOLDS,
    "outputs": _OUTPUTS,
    "fold_spatial": ["sum", "mean", "SUM", True],
}
_PER_KEY = {key: [None, *values] for key, values in _PER_KEY.items()}
_ANY_VALUE = HOSTILE_SCALARS | VALUES


@st.composite
def near_valid_maps(draw) -> str:
    """A valid map (one or two layers, maybe every key) with a few keys changed or removed,
    mostly the validator's own keys set to values chosen for them."""
    doc = json.loads(json.dumps(VALID_MAP))
    if draw(st.booleans()):
        doc.update(weight_format="in_out", conv_format="hwio", strip_prefix=["m."])
        doc["layers"].append({"name": "head.1", "layout": "chw", "in_channels": 6})
    for _ in range(draw(st.integers(1, 3))):
        layers = doc.get("layers")
        in_layer = draw(st.booleans()) and isinstance(layers, list) and bool(layers)
        target = layers[draw(st.integers(0, len(layers) - 1))] if in_layer else doc
        if not isinstance(target, dict):
            continue
        own = layer_map._LAYER_KEYS if in_layer else layer_map._TOP_KEYS
        key = draw(st.sampled_from(own) | st.sampled_from(own) | TEXT)
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        elif key in _PER_KEY and draw(st.integers(0, 3)):
            target[key] = draw(st.sampled_from(_PER_KEY[key]))
        else:
            target[key] = draw(_ANY_VALUE)
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _documents() -> st.SearchStrategy[str]:
    """The property tests' random documents (bytes, decoded), and near-valid maps."""
    corpus = _random_document().map(lambda b: b.decode("utf-8", "replace"))
    return near_valid_maps() | near_valid_maps() | corpus


# Known documents, always tried: a layer layout given as null (the validator once dropped
# such a layer silently; this test found it), the spellings Layout.parse accepts, and
# values JSON cannot tell apart.
@SETTINGS
@example(text="version: 1\nlayout: chw\nlayers: [{name: a, layout: null}, {name: b}]\n")
@example(text='version: 1\nlayout: " CHW\\t"\nstrip_prefix: []\nlayers: [{name: a}]\n')
@example(text="version: 1\nlayout: chw\nconv_format: null\nlayers: [{name: a}]\n")
@example(text="version: 1\nlayout: chw\nweight_format: null\nlayers: [{name: a}]\n")
@example(text="version: 1.0\nlayout: chw\nlayers: [{name: a, kernel: [2.0]}]\n")
@example(text="version: true\nlayout: chw\nlayers: [{name: a, in_channels: true}]\n")
@example(text="version: 1\nlayout: cdhw\nlayers: [{name: a, kernel: [2, 2]}]\n")
@example(text="version: 1\nlayout: chw\nlayers: [{name: a, rename: b}, {name: b}]\n")
@given(text=_documents())
def test_schema_agrees_with_the_validator_on_the_property_corpus(text):
    _assert_agree(text)


@pytest.mark.parametrize("in_layer", [False, True], ids=["top", "layer"])
def test_schema_agrees_with_the_validator_on_every_single_key_change(in_layer):
    """Each of the validator's keys, removed or set to each value chosen for it."""
    keys = layer_map._LAYER_KEYS if in_layer else layer_map._TOP_KEYS
    for key in keys:
        for value in [_REMOVED, *_PER_KEY[key]]:
            doc = json.loads(json.dumps(VALID_MAP))
            target = doc["layers"][0] if in_layer else doc
            if value is _REMOVED:
                target.pop(key, None)
            else:
                target[key] = value
            _assert_agree(yaml.safe_dump(doc, allow_unicode=True))


_REMOVED = object()


def test_the_corpus_reaches_both_verdicts():
    """Half the near-valid maps, at least, and some random ones must each way round."""
    verdicts = {"accepted": 0, "refused": 0}

    @settings(SETTINGS, max_examples=200)
    @given(text=near_valid_maps())
    def count(text):
        verdicts["refused" if _validator_problems(text) else "accepted"] += 1

    count()
    assert min(verdicts.values()) >= 20, verdicts


@pytest.mark.parametrize("kind", SCHEMA_KINDS)
def test_schemas_are_valid_draft_2020_12(kind):
    schema = json.loads(schema_text(kind))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_names_exactly_the_validators_keys_and_values():
    schema = layer_map_schema()
    layer = schema["$defs"]["layer"]
    assert tuple(schema["properties"]) == layer_map._TOP_KEYS
    assert set(layer["properties"]) == set(layer_map._LAYER_KEYS)
    assert tuple(manifest_schema()["properties"]) == manifest._TOP_KEYS
    jobs = manifest_schema()["properties"]["jobs"]["items"]
    assert tuple(jobs["properties"]) == manifest._JOB_KEYS
    for where in (schema, layer):
        formats = where["properties"]
        assert formats["weight_format"]["enum"] == [*(f.value for f in WeightFormat), None]
        assert formats["conv_format"]["enum"] == [f.value for f in ConvFormat]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_in_every_case_matches_the_pattern(layout):
    pattern = re.compile(layer_map_schema()["properties"]["layout"]["pattern"])
    for spelling in (layout, layout.upper(), f" {layout.title()}\t"):
        assert pattern.search(spelling), spelling
    assert not pattern.search(layout + layout[0])


@pytest.mark.parametrize("name", sorted(sample_configs()))
def test_every_shipped_map_validates(name):
    doc = load_yaml(sample_configs()[name].read_text(encoding="utf-8"))
    assert list(MAP.iter_errors(doc)) == []


def test_fc2conv_schema_prints_each_schema(run_cli):
    for kind in SCHEMA_KINDS:
        result = run_cli("schema", kind)
        assert result.code == 0, result.stderr
        assert result.stdout == schema_text(kind)
    result = run_cli("schema", "layers")
    assert result.code == 2 and "'layers' is not one of 'map', 'manifest'" in result.stderr


# ---------------------------------------------------------------------- the manifest

GOOD_MANIFEST = {
    "version": 1,
    "output_dir": "converted/",
    "jobs": [
        {"inputs": "zoo/*.safetensors", "map": "maps/m.yaml"},
        {"inputs": "x.pt", "map": "vgg16"},
    ],
}


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "a.safetensors").write_bytes(b"")
    (tmp_path / "x.pt").write_bytes(b"")
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "m.yaml").write_text("version: 1\n")
    return tmp_path


def _manifest_verdicts(folder: Path, doc: dict) -> tuple[bool, bool]:
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        manifest.read_manifest(path)
        accepted = True
    except ManifestError:
        accepted = False
    return accepted, MANIFEST.is_valid(doc)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"output_dir": None},
        {"extra": 1},
        {"version": 2},
        {"jobs": []},
        {"jobs": [{"inputs": "zoo/*.safetensors"}]},
        {"jobs": [{"inputs": "zoo/*.safetensors", "map": "vgg16", "shard": 1}]},
        {"jobs": [{"inputs": " ", "map": "vgg16"}]},
        {"jobs": [{"inputs": "../*.pt", "map": "vgg16"}]},
        {"jobs": [{"inputs": "/abs/*.pt", "map": "vgg16"}]},
        {"jobs": [{"inputs": "x.pt", "map": 3}]},
        {"jobs": ["x.pt"]},
    ],
)
def test_manifest_schema_agrees_with_read_manifest(manifest_dir, change):
    doc = {**GOOD_MANIFEST, **change}
    doc = {k: v for k, v in doc.items() if v is not None}
    accepted, valid = _manifest_verdicts(manifest_dir, doc)
    # output_dir may come from -o instead, so the schema does not require it.
    assert valid == (accepted or change == {"output_dir": None})


def test_language_server_line_is_relative_to_the_map(tmp_path):
    schema = tmp_path / "schemas" / "map.schema.json"
    line = language_server_line(schema, tmp_path / "maps")
    assert line == "# yaml-language-server: $schema=../schemas/map.schema.json\n"
    assert language_server_line(tmp_path / "s.json", tmp_path).endswith("$schema=s.json\n")


# ------------------------------------------------------------- where users meet the map


def _small_checkpoint(folder: Path) -> Path:
    """A conv backbone (8 channels) and one FC over its 2x2 map: inspect suggests a map."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path = folder / "small.safetensors"
    tensors = {
        "features.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "classifier.0.weight": rng.standard_normal((10, 32)).astype(np.float32),
        "classifier.0.bias": np.zeros(10, np.float32),
    }
    save_file(tensors, str(path))
    return path


def test_inspect_schema_out_writes_the_schema_and_points_the_map_at_it(run_cli, tmp_path):
    source = _small_checkpoint(tmp_path)
    (tmp_path / "maps").mkdir()
    (tmp_path / "schemas").mkdir()
    map_path, schema_path = tmp_path / "maps" / "m.yaml", tmp_path / "schemas" / "map.json"
    result = run_cli("inspect", source, "-o", map_path, "--schema-out", schema_path)
    assert result.code == 0, result.stderr
    assert schema_path.read_text() == schema_text("map")
    text = map_path.read_text()
    first, rest = text.split("\n", 1)
    assert first == "# yaml-language-server: $schema=../schemas/map.json"
    assert rest.startswith("# Layer map suggested by")
    assert list(MAP.iter_errors(load_yaml(text))) == []
    converted = run_cli("convert", source, "--map", map_path, "-o", tmp_path / "o.safetensors")
    assert converted.code == 0, converted.stderr
    # Both files exist now: replacing either needs --force; nothing is written without it.
    again = run_cli("inspect", source, "-o", tmp_path / "new.yaml", "--schema-out", schema_path)
    assert again.code == 2 and "already exists; pass --force" in again.stderr
    assert not (tmp_path / "new.yaml").exists()
    same = run_cli("inspect", source, "-o", map_path, "--schema-out", map_path, "--force")
    assert same.code == 2 and "--schema-out and -o name the same file" in same.stderr


def test_a_map_on_stdout_points_at_the_schema_from_the_current_folder(
    run_cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    source = _small_checkpoint(tmp_path)
    result = run_cli("inspect", source, "--schema-out", "fc2conv-map.schema.json")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("# yaml-language-server: $schema=fc2conv-map.schema.json\n")
    assert (tmp_path / "fc2conv-map.schema.json").read_text() == schema_text("map")
    plain = run_cli("inspect", source, "--suggest-map")
    assert plain.stdout.startswith("# Layer map suggested by")  # no schema, no pointer


def test_convert_help_ends_with_every_map_key_and_an_example(run_cli):
    help_text = run_cli("convert", "--help").stdout
    reference = help_text[help_text.index("The layer map (YAML)") : help_text.index("Options:")]
    for key in (*layer_map._TOP_KEYS, *layer_map._LAYER_KEYS):
        assert re.search(rf"^\s+(- )?{key}: ", reference, re.MULTILINE), key
    example = reference[reference.index("Example map (shipped as vgg16):") :].split("\n", 1)[1]
    lines = [line for line in example.splitlines() if line.strip()]
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    parsed = parse_layer_map("\n".join(line[indent:] for line in lines), "help")
    assert parsed.rules == layer_map.read_layer_map(Path("vgg16")).rules


def test_a_layer_layout_given_as_null_is_refused_not_dropped():
    problems = _validator_problems(
        "version: 1\nlayout: chw\nlayers: [{name: a, layout: null}, {name: b}]\n"
    )
    assert problems == [
        "map.yaml: layers[0] (a): layout: expected the flatten order feeding the first FC, e.g. chw"
    ]
