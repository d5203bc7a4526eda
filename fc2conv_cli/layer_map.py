"""The YAML layer map: parsed and validated into typed rules, every problem reported at once."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from fc2conv_cli.errors import MapError, shown
from fc2conv_cli.layout import ConvFormat, Layout, WeightFormat

__all__ = [
    "DIRECTIONS",
    "DTYPES",
    "SAMPLE_CONFIGS",
    "SUPPORTED_VERSIONS",
    "BatchNormSpec",
    "DuplicateKeyError",
    "LayerMap",
    "Rule",
    "load_yaml",
    "parse_layer_map",
    "read_layer_map",
    "resolve_map_path",
    "sample_configs",
    "yaml_problem",
]

# The sample maps shipped inside the package; ``--map vgg16`` names one of them.
SAMPLE_CONFIGS = Path(__file__).resolve().parent / "sample_configs"
_MAP_SUFFIXES = (".yaml", ".yml")

SUPPORTED_VERSIONS = (1,)
_TOP_KEYS = (
    "version",
    "layout",
    "weight_format",
    "conv_format",
    "strip_prefix",
    "state_dict_key",
    "direction",
    "dtype",
    "layers",
)
_LAYER_KEYS = (
    "name",
    "rename",
    "kernel",
    "in_channels",
    "layout",
    "weight_format",
    "conv_format",
    "weight",
    "bias",
    "fold_batchnorm",
    "fold_batchnorm_before",
    "outputs",
    "fold_spatial",
)
_FOLD_KEYS = ("name", "eps")
# fc_to_conv: rules name FC layers, written as convs; conv_to_fc: rules name convs, written as FCs.
DIRECTIONS = ("fc_to_conv", "conv_to_fc")
# Output dtypes a cast may target (map ``dtype:``, ``--dtype``) and their safetensors codes.
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
EPS_MAX = 1.0e300  # a BatchNorm's largest eps (schema.py says the same)
# ``outputs: "1:1001"``: a Python slice with non-negative bounds and a positive step.
OUTPUT_SLICE = re.compile(r"([0-9]*):([0-9]*)(?::([1-9][0-9]*))?")
_FORMATS = ", ".join(f.value for f in WeightFormat)
_CONV_FORMATS = ", ".join(f.value for f in ConvFormat)


@dataclass(frozen=True)
class BatchNormSpec:
    """A BatchNorm to fold: its tensor prefix, and ``eps`` when the map gives it."""

    name: str
    eps: float | None = None


@dataclass(frozen=True)
class Rule:
    """One FC layer to convert.

    ``weight``/``bias`` are full source tensor names when the map gives them (then they
    must exist); otherwise the plan finds ``NAME.weight`` / ``NAME/kernel`` (and ``:0``
    variants) and the matching bias, if present. ``weight_format`` None means the
    checkpoint's stored one. Outputs keep their source names unless ``rename`` replaces
    the layer prefix. ``fold_after`` / ``fold_before`` name a BatchNorm on the layer's
    output / input to fold in; ``outputs`` keeps a subset of the outputs (a list of
    indices, or a slice text such as ``"1:1001"``; the plan resolves it);
    ``fold_spatial`` (``"sum"``) sums the kernel over space into a 1x1 conv.
    """

    name: str
    rename: str | None
    kernel: tuple[int, ...]
    in_channels: int | None
    layout: Layout
    weight_format: WeightFormat | None
    conv_format: ConvFormat
    weight: str | None = None
    bias: str | None = None
    fold_after: BatchNormSpec | None = None
    fold_before: BatchNormSpec | None = None
    outputs: tuple[int, ...] | str | None = None
    fold_spatial: str | None = None

    @property
    def output_prefix(self) -> str:
        """The prefix of the output tensors' names."""
        return self.rename or self.name


@dataclass(frozen=True)
class LayerMap:
    """A validated layer map. ``text`` is the file as read, for provenance."""

    source: str
    rules: tuple[Rule, ...]
    strip_prefixes: tuple[str, ...]
    state_dict_key: str | None
    text: str
    direction: str = "fc_to_conv"
    dtype: str | None = None  # "float16" etc.: cast every floating tensor (``--dtype``)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> LayerMap:
        """Parse and validate map YAML text; ``source`` names it in messages.

        Raises ``MapError`` listing every problem.
        """
        return parse_layer_map(text, source)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "<dict>") -> LayerMap:
        """Validate a map given as plain data (the YAML document's dict).

        Tuples count as lists. ``text`` (recorded in an output's metadata) is the dict
        dumped as YAML. Raises ``MapError`` listing every problem.
        """
        plain = _plain(doc)  # a kernel given as a tuple is a list, as in YAML
        try:
            text = yaml.safe_dump(plain, sort_keys=False)
        except yaml.YAMLError:
            text = repr(plain)  # the validator names what is not plain data
        return _Validator(source).layer_map(plain, text)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> LayerMap:
        """Read a map file, or a shipped map by its bare name (``vgg16``).

        Raises ``MapError``.
        """
        return read_layer_map(Path(path))


def sample_configs() -> dict[str, Path]:
    """The shipped sample maps, name (file stem) -> path, sorted by name."""
    return {p.stem: p for p in sorted(SAMPLE_CONFIGS.glob("*.yaml"))}


def _is_bare_name(path: Path) -> bool:
    text = str(path)
    return "/" not in text and "\\" not in text and path.suffix.lower() not in _MAP_SUFFIXES


def resolve_map_path(path: Path, folder: Path | None = None) -> Path:
    """Where the map ``path`` (relative to ``folder``, if given) is read from.

    A bare name (no folder, no ``.yaml``/``.yml`` suffix) that is not an existing file
    names a shipped sample map, so ``--map vgg16`` works from any folder; anything else
    is the path itself.
    """
    local = path if folder is None else folder / path
    if local.is_file() or not _is_bare_name(path):  # a folder named vgg16 hides nothing
        return local
    return sample_configs().get(str(path), local)


def read_layer_map(path: Path) -> LayerMap:
    """Read and validate a layer map file (or a shipped one by name, see
    ``resolve_map_path``); raises ``MapError`` naming file, layer and key."""
    bare = _is_bare_name(path)
    path = resolve_map_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = ", ".join(sample_configs())
        hint = f", nor a shipped sample map ({shipped})" if bare else ""
        raise MapError([f"{path}: layer map not found{hint}"]) from None
    except IsADirectoryError:
        raise MapError([f"{path}: layer map is a directory, expected a YAML file"]) from None
    except UnicodeDecodeError:
        raise MapError([f"{path}: layer map is not UTF-8 text"]) from None
    except OSError as exc:
        raise MapError([f"{path}: cannot read layer map: {exc.strerror}"]) from None
    return parse_layer_map(text, str(path))


def parse_layer_map(text: str, source: str = "<map>") -> LayerMap:
    """Parse layer-map YAML text. ``source`` names the file in messages."""
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        raise MapError([yaml_problem(source, exc)]) from None
    return _Validator(source).layer_map(doc, text)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice; ``problem_mark`` is the second, ``context_mark`` the first."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping, while it is built.

    Plain YAML keeps the last value silently, so ``kernel: [7, 7]`` followed later by
    ``kernel: [1, 1]`` would convert with a kernel the user did not mean. Keys merged in
    with ``<<`` may still be overridden, as the merge key's specification says.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # unhashable: the base class says so, with its mark
                    continue
                if earlier is not key_node:
                    raise DuplicateKeyError(
                        None,
                        earlier.start_mark,
                        f"duplicate key {_show(key)} (first given on line "
                        f"{earlier.start_mark.line + 1}, again on line "
                        f"{key_node.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse one YAML document with safe types only; a key given twice in any mapping
    raises ``DuplicateKeyError`` (a ``yaml.YAMLError``) naming the key and both lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


def yaml_problem(source: str, exc: yaml.YAMLError) -> str:
    """One line for a YAML error: file, line and column when known, and the problem."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc).strip().split("\n")[0]
    if isinstance(exc, DuplicateKeyError):
        return f"{where}: {problem}"
    return f"{where}: YAML syntax error: {problem}"


class _Validator:
    """Collects every problem in a map document, then raises one ``MapError``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, where: str, key: str, expected: str, got: Any = None) -> None:
        got_text = "" if got is None else f", got {_show(got)}"
        self.problems.append(f"{self.source}: {where}: {key}: expected {expected}{got_text}")

    def unknown_keys(self, where: str, doc: Mapping, allowed: tuple[str, ...]) -> None:
        for key in doc:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problems.append(
                    f"{self.source}: {where}: unknown key {key!r}{hint}; "
                    f"allowed: {', '.join(allowed)}"
                )

    def layer_map(self, doc: Any, text: str) -> LayerMap:
        if not isinstance(doc, Mapping):
            self.problem("top level", "document", "a mapping with version, layout and layers", doc)
            raise MapError(self.problems)
        self.unknown_keys("top level", doc, _TOP_KEYS)
        version = doc.get("version")
        if version is None:
            self.problem("top level", "version", "version: 1")
        elif type(version) is not int or version not in SUPPORTED_VERSIONS:
            self.problem("top level", "version", "a supported map version (1)", version)
        layout = self.layout("top level", doc.get("layout"), required=True)
        weight_format = self.weight_format("top level", doc.get("weight_format"))
        conv_format = self.conv_format("top level", doc.get("conv_format", "oihw"))
        prefixes = self.strip_prefixes(doc.get("strip_prefix"))
        state_dict_key = doc.get("state_dict_key")
        if state_dict_key is not None and not _is_name(state_dict_key):
            self.problem("top level", "state_dict_key", "a non-empty string", state_dict_key)
            state_dict_key = None
        direction = doc.get("direction", "fc_to_conv")
        if direction not in DIRECTIONS:
            self.problem("top level", "direction", f"one of {', '.join(DIRECTIONS)}", direction)
        dtype = doc.get("dtype")
        if dtype is not None and not (isinstance(dtype, str) and dtype in DTYPES):
            self.problem("top level", "dtype", f"one of {', '.join(DTYPES)}", dtype)
        rules = self.rules(doc.get("layers"), layout, weight_format, conv_format)
        self.across_rules(rules, direction)
        if self.problems:
            raise MapError(self.problems)
        return LayerMap(self.source, rules, prefixes, state_dict_key, text, direction, dtype)

    def across_rules(self, rules: tuple[Rule, ...], direction: Any) -> None:
        """Keys that depend on a rule's place in the map or on the map's direction."""
        for index, rule in enumerate(rules):
            where = f"layers[{index}] ({shown(rule.name)})"
            if rule.outputs is not None and index != len(rules) - 1:
                self.problems.append(
                    f"{self.source}: {where}: outputs: only the last layer may drop outputs; "
                    f"layer {shown(rules[index + 1].name)} follows it and may read them"
                )
            if rule.fold_spatial is not None and index != 0:
                self.problems.append(
                    f"{self.source}: {where}: fold_spatial: only the first layer reads the "
                    "feature map it could sum over"
                )
            if rule.fold_spatial is not None and direction == "conv_to_fc":
                self.problems.append(
                    f"{self.source}: {where}: fold_spatial: not with direction conv_to_fc"
                )

    def fold(self, where: str, key: str, value: Any) -> BatchNormSpec | None:
        """``{name: classifier.1, eps: 0.001}``; ``eps`` is optional, a number > 0."""
        if not isinstance(value, Mapping) or not _is_name(value.get("name")):
            self.problem(where, key, "a mapping {name: BN_PREFIX, eps: NUMBER}", value)
            return None
        for extra in value:
            if extra not in _FOLD_KEYS:
                self.problems.append(
                    f"{self.source}: {where}: {key}: unknown key {extra!r}; allowed: name, eps"
                )
        eps = value.get("eps")
        if eps is not None and not (type(eps) in (int, float) and 0 < eps <= EPS_MAX):
            self.problem(where, f"{key}.eps", "a number > 0 (write 1.0e-5, not 1e-5)", eps)
            eps = None
        return BatchNormSpec(value["name"], None if eps is None else float(eps))

    def outputs(self, where: str, value: Any) -> tuple[int, ...] | str | None:
        if value is None:
            return None
        if isinstance(value, str) and OUTPUT_SLICE.fullmatch(value):
            return value
        if (
            isinstance(value, list)
            and value
            and all(type(v) is int and v >= 0 for v in value)
            and len(set(value)) == len(value)
        ):
            return tuple(value)
        self.problem(
            where,
            "outputs",
            'a list of distinct output indices >= 0, e.g. [0, 5, 7], or a slice "1:1001"',
            value,
        )
        return None

    def layout(self, where: str, value: Any, required: bool = False) -> Layout | None:
        if value is None:
            if required:
                self.problem(where, "layout", "the flatten order feeding the first FC, e.g. chw")
            return None
        if not isinstance(value, str):
            self.problem(where, "layout", "a string such as chw, hwc or whc", value)
            return None
        try:
            return Layout.parse(value)
        except ValueError as exc:
            self.problems.append(f"{self.source}: {where}: layout: {exc}")
            return None

    def weight_format(self, where: str, value: Any) -> WeightFormat | None:
        """None when absent: the checkpoint's stored format applies."""
        if value is None:
            return None
        try:
            return WeightFormat(value)
        except ValueError:
            self.problem(where, "weight_format", f"one of {_FORMATS}", value)
            return None

    def conv_format(self, where: str, value: Any) -> ConvFormat | None:
        try:
            return ConvFormat(value)
        except ValueError:
            self.problem(where, "conv_format", f"one of {_CONV_FORMATS}", value)
            return None

    def strip_prefixes(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(_is_name(p) for p in items):
            self.problem("top level", "strip_prefix", "a string or a list of strings", value)
            return ()
        return tuple(items)

    def rules(
        self,
        layers: Any,
        layout: Layout | None,
        weight_format: WeightFormat | None,
        conv_format: ConvFormat | None,
    ) -> tuple[Rule, ...]:
        if not isinstance(layers, list) or not layers:
            self.problem("top level", "layers", "a non-empty list of layers", layers)
            return ()
        # The map's spatial rank: from its first well-formed kernel (a malformed one, such
        # as [], is reported as itself, not as a rank that every layout then misses).
        kernels: list[list[int]] = [
            layer["kernel"]
            for layer in layers
            if isinstance(layer, Mapping) and _is_kernel(layer.get("kernel"))
        ]
        ndim = len(kernels[0]) if kernels else (layout.spatial_ndim if layout else 2)
        rules = []
        seen: dict[str, str] = {}
        for index, layer in enumerate(layers):
            rule = self.rule(index, layer, ndim, layout, weight_format, conv_format)
            if rule is None:
                continue
            out = rule.output_prefix
            if out in seen:
                self.problems.append(
                    f"{self.source}: layers[{index}] ({shown(rule.name)}): output name {out!r} "
                    f"is also produced by layer {seen[out]!r}; give one a different rename"
                )
            seen[out] = rule.name
            rules.append(rule)
        return tuple(rules)

    def rule(
        self,
        index: int,
        layer: Any,
        ndim: int,
        default_layout: Layout | None,
        default_format: WeightFormat | None,
        default_conv_format: ConvFormat | None,
    ) -> Rule | None:
        where = f"layers[{index}]"
        if not isinstance(layer, Mapping):
            self.problem(where, "layer", "a mapping with at least a name", layer)
            return None
        name = layer.get("name")
        if not _is_name(name):
            self.problem(where, "name", "the layer's tensor prefix, e.g. classifier.0", name)
            return None
        where = f"layers[{index}] ({shown(name)})"
        before = len(self.problems)
        self.unknown_keys(where, layer, _LAYER_KEYS)
        rename = layer.get("rename")
        if rename is not None and not _is_name(rename):
            self.problem(where, "rename", "a non-empty string", rename)
        kernel = self.kernel(where, layer.get("kernel", [1] * ndim), ndim)
        in_channels = layer.get("in_channels")
        if in_channels is not None and not _is_positive_int(in_channels):
            self.problem(where, "in_channels", "a positive integer", in_channels)
        # Given as null, a layer's layout is refused rather than the layer silently dropped.
        layout = (
            self.layout(where, layer["layout"], required=True)
            if "layout" in layer
            else default_layout
        )
        if layout is not None and layout.spatial_ndim != ndim:
            self.problem(
                where,
                "layout",
                f"{ndim} spatial axes to match the kernel ({ndim}-D)",
                str(layout),
            )
        weight_format = (
            self.weight_format(where, layer["weight_format"])
            if "weight_format" in layer
            else default_format
        )
        conv_format = (
            self.conv_format(where, layer["conv_format"])
            if "conv_format" in layer
            else default_conv_format
        )
        tensors = {}
        for key in ("weight", "bias"):
            value = layer.get(key)
            if value is not None and not _is_name(value):
                self.problem(where, key, "a full tensor name", value)
            tensors[key] = value
        folds = {
            key: self.fold(where, key, layer[key]) if layer.get(key) is not None else None
            for key in ("fold_batchnorm", "fold_batchnorm_before")
        }
        outputs = self.outputs(where, layer.get("outputs"))
        fold_spatial = layer.get("fold_spatial")
        if fold_spatial is not None and fold_spatial != "sum":
            self.problem(where, "fold_spatial", "sum", fold_spatial)
        if len(self.problems) > before or layout is None or conv_format is None:
            return None
        return Rule(
            name=name,
            rename=rename,
            kernel=kernel,
            in_channels=in_channels,
            layout=layout,
            weight_format=weight_format,
            conv_format=conv_format,
            weight=tensors["weight"],
            bias=tensors["bias"],
            fold_after=folds["fold_batchnorm"],
            fold_before=folds["fold_batchnorm_before"],
            outputs=outputs,
            fold_spatial=fold_spatial,
        )

    def kernel(self, where: str, value: Any, ndim: int) -> tuple[int, ...]:
        if not _is_kernel(value):
            self.problem(where, "kernel", "a list of 1 to 3 positive integers, e.g. [7, 7]", value)
            return (1,) * ndim
        if len(value) != ndim:
            self.problem(where, "kernel", f"{ndim} sizes like the map's other kernels", value)
        return tuple(value)


def _plain(value: Any) -> Any:
    """Mappings and tuples as dicts and lists, so ``yaml.safe_dump`` writes them."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value.strip())


def _is_positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _is_kernel(value: Any) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list) and 1 <= len(value) <= 3 and all(_is_positive_int(v) for v in value)
    )


# Bounded: a YAML alias bomb is a small document whose full repr() would not fit in memory.
_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 2, 4, 4, 50


def _show(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
