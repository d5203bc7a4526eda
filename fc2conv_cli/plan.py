"""The plan: a pure function from (tensor index, layer map) to the output tensors.

Each output tensor either copies a source tensor's bytes or converts an FC weight into a
conv weight. No file, no torch: ``--dry-run``, the writer and the tests share this.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from fc2conv_cli.errors import PlanError, shown
from fc2conv_cli.layer_map import LayerMap, Rule
from fc2conv_cli.layout import ConvFormat, Layout, WeightFormat
from fc2conv_cli.readers import DTYPE_BITS, FLOAT_DTYPES, TensorInfo, tensor_nbytes

__all__ = [
    "BIAS_SUFFIXES",
    "WEIGHT_SUFFIXES",
    "Conversion",
    "LayerPlan",
    "Plan",
    "PlannedTensor",
    "build_plan",
]

# How each format names a layer's weight and bias after the layer's name, each also with
# the ``:0`` that TF and Keras exporters leave in ONNX and TF.js names.
_SUFFIX_PAIRS = ((".weight", ".bias"), ("/kernel", "/bias"))
WEIGHT_SUFFIXES = tuple(w + tail for w, _ in _SUFFIX_PAIRS for tail in ("", ":0"))
BIAS_SUFFIXES = tuple(b + tail for _, b in _SUFFIX_PAIRS for tail in ("", ":0"))


@dataclass(frozen=True)
class Conversion:
    """How an FC weight becomes conv filters ``(out_features, in_channels, *kernel)``."""

    layout: Layout
    weight_format: WeightFormat
    in_channels: int
    kernel: tuple[int, ...]
    conv_format: ConvFormat = ConvFormat.OIHW

    @property
    def moves_bytes(self) -> bool:
        """False when the conv weight keeps the FC weight's bytes (only the header changes)."""
        return not (
            self.weight_format is WeightFormat.OUT_IN
            and self.layout.is_canonical
            and self.conv_format is ConvFormat.OIHW
        )


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: ``name`` built from source tensor ``source``.

    ``conversion`` is None for a byte copy. ``layer`` names the rule it belongs to, if any.
    """

    name: str
    source: str
    dtype: str
    shape: tuple[int, ...]
    conversion: Conversion | None = None
    layer: str | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class LayerPlan:
    """One converted FC layer: its rule, output tensors and the sizes derived for it."""

    rule: Rule
    weight: PlannedTensor
    bias: PlannedTensor | None
    source_shape: tuple[int, ...]
    out_features: int
    in_features: int
    in_channels: int

    @property
    def conversion(self) -> Conversion:
        """How the layer's weight is converted (every layer's weight is)."""
        conversion = self.weight.conversion
        if conversion is None:
            raise ValueError(f"layer {self.rule.name}: its weight has no conversion")
        return conversion


@dataclass(frozen=True)
class Plan:
    """Output tensors in file order, the converted layers in map order, and warnings."""

    tensors: tuple[PlannedTensor, ...]
    layers: tuple[LayerPlan, ...]
    warnings: tuple[str, ...]

    @property
    def copied(self) -> tuple[PlannedTensor, ...]:
        """Tensors no rule names: copied unchanged."""
        return tuple(t for t in self.tensors if t.layer is None)


def build_plan(
    tensors: Mapping[str, TensorInfo],
    layer_map: LayerMap,
    stored_format: WeightFormat = WeightFormat.OUT_IN,
) -> Plan:
    """Plan the conversion; raises ``PlanError`` listing every rule that does not fit.

    ``stored_format`` is how the checkpoint's format stores FC weights (Keras ``in_out``),
    used for a rule whose map and tensor say nothing.
    """
    problems: list[str] = []
    layers = []
    for index, rule in enumerate(layer_map.rules):
        where = f"{layer_map.source}: layers[{index}] ({shown(rule.name)})"
        layer = _plan_layer(rule, tensors, where, problems, stored_format)
        if layer is not None:
            layers.append(layer)
    outputs = [t for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    _check_sources_unique(layers, problems, layer_map.source)
    consumed = {t.source for t in outputs}
    outputs += [
        PlannedTensor(info.name, info.name, info.dtype, info.shape)
        for info in tensors.values()
        if info.name not in consumed
    ]
    _check_outputs_unique(outputs, problems, layer_map.source)
    if problems:
        raise PlanError(problems)
    # Widest dtypes first, then by name, as safetensors does: every tensor stays aligned
    # to its item size, and the order does not depend on the source's order.
    outputs.sort(key=lambda t: (-DTYPE_BITS[t.dtype], t.name))
    return Plan(tuple(outputs), tuple(layers), _chain_warnings(layers, layer_map.source))


def _find_weight(
    rule: Rule, tensors: Mapping[str, TensorInfo], where: str, problems: list[str]
) -> str | None:
    """The rule's weight name: the map's, or the one ``NAME + suffix`` that exists."""
    if rule.weight is not None:
        if rule.weight in tensors:
            return rule.weight
        problems.append(
            f"{where}: weight {rule.weight!r} is not in the checkpoint"
            + _closest(rule.weight, tensors)
        )
        return None
    found = [rule.name + s for s in WEIGHT_SUFFIXES if rule.name + s in tensors]
    if len(found) == 1:
        return found[0]
    if found:
        problems.append(
            f"{where}: several weights match {rule.name!r}: {', '.join(found)}; "
            "name one with weight:"
        )
    else:
        tried = ", ".join(rule.name + s for s in WEIGHT_SUFFIXES)
        problems.append(
            f"{where}: no weight for {rule.name!r} in the checkpoint (tried {tried})"
            + _closest(rule.name + WEIGHT_SUFFIXES[0], tensors)
        )
    return None


def _find_bias(rule: Rule, weight: str, tensors: Mapping[str, TensorInfo]) -> str | None:
    """The rule's bias name: the map's, or the one named like the weight, if present."""
    if rule.bias is not None:
        return rule.bias
    for weight_suffix, bias_suffix in zip(WEIGHT_SUFFIXES, BIAS_SUFFIXES, strict=True):
        if weight == rule.name + weight_suffix and rule.name + bias_suffix in tensors:
            return rule.name + bias_suffix
    return None


def _output_name(rule: Rule, source: str, default_suffix: str) -> str:
    """A converted tensor keeps its name; ``rename`` replaces the layer prefix only."""
    if rule.rename is None:
        return source
    rest = source[len(rule.name) :]
    # The layer prefix is a whole name segment: "head" prefixes "head.w", not "head_w".
    suffix = rest if source.startswith(rule.name) and rest[:1] in (".", "/") else default_suffix
    return rule.rename + suffix


def _plan_layer(
    rule: Rule,
    tensors: Mapping[str, TensorInfo],
    where: str,
    problems: list[str],
    stored_format: WeightFormat,
) -> LayerPlan | None:
    weight_name = _find_weight(rule, tensors, where, problems)
    if weight_name is None:
        return None
    weight = tensors[weight_name]
    if len(weight.shape) != 2:
        problems.append(
            f"{where}: weight {weight_name!r} has shape {list(weight.shape)}, "
            "expected a 2-D FC weight"
        )
        return None
    if 0 in weight.shape:
        problems.append(
            f"{where}: weight {shown(weight_name)} has shape {list(weight.shape)}: an FC "
            "weight with no inputs or no outputs has nothing to convert"
        )
        return None
    if weight.dtype not in FLOAT_DTYPES:
        problems.append(
            f"{where}: weight {weight_name!r} is {weight.dtype}, expected a float dtype"
        )
        return None
    # The map's word, else what the file says of this tensor, else of its format's FC weights.
    fmt = rule.weight_format or weight.weight_format or stored_format
    out_features, in_features = weight.shape if fmt is WeightFormat.OUT_IN else weight.shape[::-1]
    kernel_size = math.prod(rule.kernel)
    kernel_text = "x".join(map(str, rule.kernel))
    if rule.in_channels is not None:
        in_channels = rule.in_channels
        if in_channels * kernel_size != in_features:
            problems.append(
                f"{where}: in_channels: {in_channels} x kernel {kernel_text} = "
                f"{in_channels * kernel_size}, but the weight has in_features {in_features} "
                f"(shape {list(weight.shape)}, weight_format {fmt.value})"
            )
            return None
    elif in_features % kernel_size:
        problems.append(
            f"{where}: kernel: in_features {in_features} is not divisible by kernel "
            f"{kernel_text} = {kernel_size} (shape {list(weight.shape)}, weight_format {fmt.value})"
        )
        return None
    else:
        in_channels = in_features // kernel_size
    conversion = Conversion(rule.layout, fmt, in_channels, rule.kernel, rule.conv_format)
    conv_weight = PlannedTensor(
        _output_name(rule, weight_name, ".weight"),
        weight_name,
        weight.dtype,
        rule.conv_format.shape(out_features, in_channels, rule.kernel),
        conversion,
        rule.name,
    )
    bias_name = _find_bias(rule, weight_name, tensors)
    bias = tensors.get(bias_name) if bias_name is not None else None
    conv_bias = None
    if bias is None and rule.bias is not None:
        problems.append(
            f"{where}: bias {rule.bias!r} is not in the checkpoint{_closest(rule.bias, tensors)}"
        )
        return None
    if bias is not None:
        if bias.shape != (out_features,):
            problems.append(
                f"{where}: bias {bias.name!r} has shape {list(bias.shape)}, "
                f"expected [{out_features}] (the layer's out_features)"
            )
            return None
        conv_bias = PlannedTensor(
            _output_name(rule, bias.name, ".bias"),
            bias.name,
            bias.dtype,
            bias.shape,
            None,
            rule.name,
        )
    return LayerPlan(
        rule, conv_weight, conv_bias, weight.shape, out_features, in_features, in_channels
    )


def _closest(name: str, tensors: Mapping[str, TensorInfo]) -> str:
    close = difflib.get_close_matches(name, list(tensors), n=3, cutoff=0.6)
    if not close:
        close = [n for n, info in tensors.items() if len(info.shape) == 2][:3]
        return f"; 2-D tensors in it: {', '.join(close)}" if close else ""
    return f"; closest names: {', '.join(close)}"


def _check_sources_unique(layers: list[LayerPlan], problems: list[str], source: str) -> None:
    used: dict[str, str] = {}
    for layer in layers:
        for planned in (layer.weight, layer.bias):
            if planned is None:
                continue
            if planned.source in used:
                problems.append(
                    f"{source}: layers ({layer.rule.name}): tensor {planned.source!r} is already "
                    f"converted by layer {used[planned.source]!r}"
                )
            used[planned.source] = layer.rule.name


def _check_outputs_unique(outputs: list[PlannedTensor], problems: list[str], source: str) -> None:
    producers: dict[str, PlannedTensor] = {}
    for planned in outputs:
        other = producers.get(planned.name)
        if other is not None:
            by = [
                f"layer {t.layer!r}" if t.layer else f"copied tensor {t.source!r}"
                for t in (other, planned)
            ]
            problems.append(
                f"{source}: output name {planned.name!r} is produced by both {by[0]} and "
                f"{by[1]}; choose another rename"
            )
        producers[planned.name] = planned


def _chain_warnings(layers: list[LayerPlan], source: str) -> tuple[str, ...]:
    warnings = []
    for previous, layer in itertools.pairwise(layers):
        if layer.in_features != previous.out_features:
            warnings.append(
                f"{source}: layer {layer.rule.name!r} has in_features {layer.in_features} but the "
                f"previous layer {previous.rule.name!r} has out_features {previous.out_features} "
                "(fine if the head branches)"
            )
    return tuple(warnings)
