"""JSON Schemas (draft 2020-12) of the layer map and the batch manifest, for editors.

The validators in ``layer_map`` and ``manifest`` stay the source of truth; a test checks
that the layer-map schema accepts every map the validator accepts and refuses every map
it refuses for a type, value or key error. Checks that span several keys (every kernel
of one rank, a layout with as many spatial axes as the kernel, distinct output names)
are the validator's alone.

JSON has one number type, so to a schema ``1.0`` is the integer ``1``; YAML's ``1.0`` is
a float, which the validator refuses where it expects an integer. JSON has no NaN
either: YAML's ``.nan`` as a BatchNorm's eps is the validator's to refuse.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from fc2conv_cli.layout import SPATIAL_AXES, ConvFormat, WeightFormat
from fc2conv_cli.manifest import FORMATS

__all__ = [
    "SCHEMA_FILE_NAMES",
    "SCHEMA_KINDS",
    "language_server_line",
    "layer_map_schema",
    "manifest_schema",
    "schema_for",
    "schema_text",
]

SCHEMA_KINDS = ("map", "manifest")
SCHEMA_FILE_NAMES = {
    "map": "fc2conv-map.schema.json",
    "manifest": "fc2conv-manifest.schema.json",
}
_DRAFT = "https://json-schema.org/draft/2020-12/schema"

# Python's str.strip() whitespace, spelled out: JavaScript's \s (editors) and Python's
# differ on a few characters, and the validator strips exactly these.
_WS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NAME_PATTERN = f"[^{_WS}]"  # at least one character that is not whitespace


def _name(description: str, nullable: bool = False) -> dict[str, Any]:
    return {
        "type": ["string", "null"] if nullable else "string",
        "pattern": _NAME_PATTERN,
        "description": description,
    }


def _layout_pattern() -> str:
    """Every flatten order ``Layout.parse`` accepts: any case, surrounding whitespace."""
    orders = (
        "".join(p) for axes in SPATIAL_AXES.values() for p in itertools.permutations("c" + axes)
    )
    alternatives = "|".join("".join(f"[{a}{a.upper()}]" for a in order) for order in orders)
    return f"^[{_WS}]*(?:{alternatives})[{_WS}]*$"


def _format_keys(where: str) -> dict[str, dict[str, Any]]:
    """``layout``, ``weight_format`` and ``conv_format``: the map's, or a layer's own."""
    scope = "for every layer" if where == "map" else "for this layer (overrides the map's)"
    return {
        "layout": {
            "type": "string",
            "pattern": _layout_pattern(),
            "examples": ["chw", "hwc", "whc", "cl", "cdhw"],
            "description": f"Flatten order feeding the first FC {scope}, slowest axis first: "
            "chw is torch's x.flatten(1), hwc is Keras' Flatten on NHWC.",
        },
        "weight_format": {
            "enum": [*(f.value for f in WeightFormat), None],
            "description": f"How FC weights are stored {scope}: out_in (torch Linear) or "
            "in_out (Keras Dense kernel). Absent or null: the checkpoint's stored format.",
        },
        "conv_format": {
            "enum": [f.value for f in ConvFormat],
            "default": ConvFormat.OIHW.value,
            "description": f"How the conv weights are written {scope}: oihw (torch) or "
            "hwio (Keras / TF).",
        },
    }


# Python's re.search lets ``$`` match before a final newline; this matches at the end only.
_END = r"(?![\s\S])"
# The largest eps the validator takes: JSON Schema cannot say "finite" otherwise.
EPS_MAX = 1.0e300


def _fold(position: str) -> dict[str, Any]:
    return {
        "type": ["object", "null"],
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _name("The BatchNorm's tensor prefix, e.g. classifier.1 or head/bn."),
            "eps": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "maximum": EPS_MAX,
                "examples": [0.001],
                "description": "The BatchNorm's eps; default torch 1e-5, Keras 1e-3 (or the "
                "Keras config's). Write 1.0e-5: YAML reads 1e-5 as text.",
            },
        },
        "description": f"A BatchNorm {position} this layer to fold into it; its tensors "
        "leave the output.",
    }


def layer_map_schema() -> dict[str, Any]:
    """The layer map's JSON Schema."""
    layer = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _name(
                "The FC layer's tensor prefix, e.g. classifier.0: NAME.weight or NAME/kernel "
                "(and :0 variants) and the matching bias are found by it."
            ),
            "rename": _name("Output prefix replacing NAME in the output names.", True),
            "kernel": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {"type": "integer", "minimum": 1},
                "examples": [[7, 7]],
                "description": "The conv kernel: the first FC's input window, e.g. [7, 7]. "
                "Default: ones, as many as the map's other kernels (a 1x1 conv).",
            },
            "in_channels": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Channels of the feature map; default in_features / prod(kernel).",
            },
            **_format_keys("layer"),
            "weight": _name(
                "Full source tensor name of the weight, when NAME does not find "
                "it (then it must exist).",
                True,
            ),
            "bias": _name("Full source tensor name of the bias (then it must exist).", True),
            "fold_batchnorm": _fold("after (Linear -> BatchNorm1d(out))"),
            "fold_batchnorm_before": _fold(
                "before (on the layer's input: BatchNorm1d over the flat features, or over "
                "the channels)"
            ),
            "outputs": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "array",
                        "minItems": 1,
                        "uniqueItems": True,
                        "items": {"type": "integer", "minimum": 0},
                    },
                    {"type": "string", "pattern": f"^[0-9]*:[0-9]*(?::[1-9][0-9]*)?{_END}"},
                ],
                "examples": [[0, 5, 7], "1:1001"],
                "description": "The last layer only: keep these outputs, a list of indices or "
                'a Python slice such as "1:1001" (drops a background class).',
            },
            "fold_spatial": {
                "enum": ["sum", None],
                "description": "The first layer only: sum its kernel over space into a 1x1 "
                "conv, exact when every position of the map holds the same value (a pool "
                "that replicates a 1x1 map to 7x7).",
            },
        },
    }
    return {
        "$schema": _DRAFT,
        "title": "fc2conv layer map",
        "description": "Which FC layers of a checkpoint fc2conv converts to convolutions, "
        "and how. See `fc2conv convert --help`.",
        "type": "object",
        "required": ["version", "layout", "layers"],
        "additionalProperties": False,
        "properties": {
            "version": {"type": "integer", "const": 1, "description": "Map format version: 1."},
            **_format_keys("map"),
            "strip_prefix": {
                "anyOf": [
                    {"type": "null"},
                    _name("A prefix removed from every tensor name, e.g. 'module.'."),
                    {"type": "array", "items": _name("A prefix, tried in order.")},
                ],
                "description": "A prefix, or a list of prefixes, removed from every tensor name.",
            },
            "state_dict_key": _name(
                "The key of the nested state dict in a training checkpoint.", True
            ),
            "direction": {
                "enum": ["fc_to_conv", "conv_to_fc"],
                "default": "fc_to_conv",
                "description": "fc_to_conv: the rules name FC layers, written as convs; "
                "conv_to_fc: they name convs (whose kernel is exactly the first rule's "
                "kernel), written as FC weights.",
            },
            "dtype": {
                "enum": ["float32", "float16", "bfloat16", None],
                "description": "Cast every floating tensor to this dtype (round to nearest "
                "even); --dtype overrides it.",
            },
            "layers": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/layer"},
                "description": "The FC layers to convert, first FC first.",
            },
        },
        "$defs": {"layer": layer},
    }


def manifest_schema() -> dict[str, Any]:
    """The batch manifest's JSON Schema."""
    job = {
        "type": "object",
        "required": ["inputs", "map"],
        "additionalProperties": False,
        "properties": {
            "inputs": {
                **_name("A glob of checkpoints relative to the manifest's folder."),
                "not": {"pattern": r"^/|(^|/)\.\.(/|$)"},
                "examples": ["vgg16/**/*.pth"],
            },
            "map": _name(
                "The layer map: a path relative to the manifest's folder, or a shipped "
                "map's name (see `fc2conv sample-configs`)."
            ),
            "format": {
                "enum": list(FORMATS),
                "description": "Read this group's files as this format (as --format does); "
                "by default each file's format is found from its content, then its suffix.",
            },
            "dtype": {
                "enum": ["float32", "float16", "bfloat16", None],
                "description": "Cast this group's outputs to this dtype (as --dtype does).",
            },
        },
    }
    return {
        "$schema": _DRAFT,
        "title": "fc2conv batch manifest",
        "description": "Which checkpoints `fc2conv batch` converts with which layer map.",
        "type": "object",
        "required": ["version", "jobs"],
        "additionalProperties": False,
        "properties": {
            "version": {"type": "integer", "const": 1, "description": "Manifest version: 1."},
            "output_dir": {
                "type": "string",
                "description": "Output folder relative to the manifest (-o overrides it); "
                "outputs mirror the inputs' paths.",
            },
            "jobs": {"type": "array", "minItems": 1, "items": job},
        },
    }


def schema_for(kind: str) -> dict[str, Any]:
    """The schema of ``kind``: ``map`` or ``manifest``."""
    if kind == "map":
        return layer_map_schema()
    if kind == "manifest":
        return manifest_schema()
    raise ValueError(f"unknown schema {kind!r}; expected one of {', '.join(SCHEMA_KINDS)}")


def schema_text(kind: str) -> str:
    """The schema of ``kind`` as the JSON text a file holds."""
    return json.dumps(schema_for(kind), indent=2) + "\n"


def language_server_line(schema_path: Path, document_folder: Path) -> str:
    """The first line that points yaml-language-server (VS Code, Neovim, ...) at a schema.

    The path is relative to the document's folder, as the language server resolves it.
    """
    try:
        target = os.path.relpath(schema_path.absolute(), document_folder.absolute())
        target = Path(target).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        target = schema_path.absolute().as_uri()
    return f"# yaml-language-server: $schema={target}\n"
