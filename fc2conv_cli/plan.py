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

from fc2conv_cli.checkpoint import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo
from fc2conv_cli.errors import PlanError, shown
from fc2conv_cli.layer_map import LayerMap, Rule
from fc2conv_cli.layout import Layout, WeightFormat

__all__ = ["Conversion", "LayerPlan", "Plan", "PlannedTensor", "build_plan"]


@dataclass(frozen=True)
class Conversion:
    """How an FC weight becomes conv filters ``(out_features, in_channels, *kernel)``."""

    layout: Layout
    weight_format: WeightFormat
    in_channels: int
    kernel: tuple[int, ...]

    @property
    def moves_bytes(self) -> bool:
        """False when the conv weight keeps the FC weight's bytes (only the header changes)."""
        return not (self.weight_format is WeightFormat.OUT_IN and self.layout.is_canonical)


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
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


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


def build_plan(tensors: Mapping[str, TensorInfo], layer_map: LayerMap) -> Plan:
    """Plan the conversion; raises ``PlanError`` listing every rule that does not fit."""
    problems: list[str] = []
    layers = []
    for index, rule in enumerate(layer_map.rules):
        where = f"{layer_map.source}: layers[{index}] ({shown(rule.name)})"
        layer = _plan_layer(rule, tensors, where, problems)
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
    outputs.sort(key=lambda t: (-DTYPE_SIZES[t.dtype], t.name))
    return Plan(tuple(outputs), tuple(layers), _chain_warnings(layers, layer_map.source))


def _plan_layer(
    rule: Rule, tensors: Mapping[str, TensorInfo], where: str, problems: list[str]
) -> LayerPlan | None:
    weight = tensors.get(rule.weight)
    if weight is None:
        problems.append(
            f"{where}: weight {rule.weight!r} is not in the checkpoint"
            + _closest(rule.weight, tensors)
        )
        return None
    if len(weight.shape) != 2:
        problems.append(
            f"{where}: weight {rule.weight!r} has shape {list(weight.shape)}, "
            "expected a 2-D FC weight"
        )
        return None
    if 0 in weight.shape:
        problems.append(
            f"{where}: weight {shown(rule.weight)} has shape {list(weight.shape)}: an FC "
            "weight with no inputs or no outputs has nothing to convert"
        )
        return None
    if weight.dtype not in FLOAT_DTYPES:
        problems.append(
            f"{where}: weight {rule.weight!r} is {weight.dtype}, expected a float dtype"
        )
        return None
    fmt = rule.weight_format
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
    prefix = rule.output_prefix
    conversion = Conversion(rule.layout, fmt, in_channels, rule.kernel)
    conv_weight = PlannedTensor(
        f"{prefix}.weight",
        rule.weight,
        weight.dtype,
        (out_features, in_channels, *rule.kernel),
        conversion,
        rule.name,
    )
    bias = tensors.get(rule.bias)
    conv_bias = None
    if bias is None and rule.bias_required:
        problems.append(
            f"{where}: bias {rule.bias!r} is not in the checkpoint{_closest(rule.bias, tensors)}"
        )
        return None
    if bias is not None:
        if bias.shape != (out_features,):
            problems.append(
                f"{where}: bias {rule.bias!r} has shape {list(bias.shape)}, "
                f"expected [{out_features}] (the layer's out_features)"
            )
            return None
        conv_bias = PlannedTensor(
            f"{prefix}.bias", rule.bias, bias.dtype, bias.shape, None, rule.name
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
