"""The plan: a pure function from (tensor index, layer map) to the output tensors.

No file, no torch: ``--dry-run``, the writer, the checks and the tests share this.

Design. Every output tensor is one ``PlannedTensor``: where its values come from
(``source``), its output dtype and shape, and how the values get there, as data:

- ``conversion`` (a ``Conversion``, or None) is the geometry: FC -> conv
  (``direction="fc_to_conv"``) or conv -> FC (``"conv_to_fc"``). Both go through one
  canonical order, the filters ``T[o, c, *kernel]``: ``source_filters`` views the source
  tensor in it, ``store`` views ``T`` in the output's stored order, ``written_filters``
  views a written tensor back in it. With ``fold_spatial`` the output kernel is 1s.
- ``steps`` are value operations applied in ``T`` order, always in this order:
  ``SelectRows`` (keep some outputs), ``FoldBatchNorm`` ("before": scale the input
  features; "after": scale the outputs), ``SumSpatial`` (sum the kernel over space), then
  ``Cast`` (round to nearest even into another float dtype).

So the kinds of planned tensor are: a byte copy (no conversion, no steps), a reshape
(a conversion whose bytes do not move), a move (FC <-> conv in any layout and format,
``SelectRows``), a computation (``FoldBatchNorm``, ``SumSpatial``) and a cast, and their
compositions, e.g. FC -> conv + select + cast. ``write._write_tensor`` dispatches on
them in one place: a byte copy is copied, everything else is a strided view of ``T``
(computed a block at a time when a step computes). ``check`` dispatches in one place
too: tensors that only move values (``PlannedTensor.exact``) are proved bit for bit (a
cast against an independent cast of the source), computed ones by float64 with a
tolerance that scales with the output dtype's epsilon and the outputs' magnitude.

Without any of the new map keys the plan is the one of conversion version 1: the same
tensors, shapes and bytes (tests/test_write.py pins them).
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fc2conv_cli.errors import PlanError, shown
from fc2conv_cli.layer_map import DTYPES, OUTPUT_SLICE, BatchNormSpec, LayerMap, Rule
from fc2conv_cli.layout import ConvFormat, Layout, WeightFormat
from fc2conv_cli.readers import DTYPE_BITS, FLOAT_DTYPES, TensorInfo, tensor_nbytes

__all__ = [
    "BIAS_SUFFIXES",
    "BN_DEFAULT_EPS",
    "WEIGHT_SUFFIXES",
    "Cast",
    "Conversion",
    "FoldBatchNorm",
    "LayerPlan",
    "Plan",
    "PlannedTensor",
    "SelectRows",
    "SumSpatial",
    "build_plan",
]

# How each format names a layer's weight and bias after the layer's name, each also with
# the ``:0`` that TF and Keras exporters leave in ONNX and TF.js names.
_SUFFIX_PAIRS = ((".weight", ".bias"), ("/kernel", "/bias"))
WEIGHT_SUFFIXES = tuple(w + tail for w, _ in _SUFFIX_PAIRS for tail in ("", ":0"))
BIAS_SUFFIXES = tuple(b + tail for _, b in _SUFFIX_PAIRS for tail in ("", ":0"))
# A BatchNorm's tensors by role: torch's names, then Keras' (each also with ``:0``).
_BN_NAMES = {
    "torch": {"gamma": ".weight", "beta": ".bias", "mean": ".running_mean", "var": ".running_var"},
    "keras": {
        "gamma": "/gamma",
        "beta": "/beta",
        "mean": "/moving_mean",
        "var": "/moving_variance",
    },
}
_BN_EXTRA = (".num_batches_tracked",)  # folded away with the rest, never read
# The frameworks' default eps: torch BatchNorm1d/2d, Keras BatchNormalization.
BN_DEFAULT_EPS = {"torch": 1e-5, "keras": 1e-3}
# Float dtypes a cast reads (packed F4/F6 are left alone).
_CASTABLE = tuple(d for d in FLOAT_DTYPES if DTYPE_BITS[d] >= 8)


@dataclass(frozen=True)
class Conversion:
    """The geometry between an FC weight and conv filters, in either direction.

    ``kernel`` is the feature map the FC reads (the conv's kernel); ``layout`` and
    ``weight_format`` describe the FC side, ``conv_format`` the conv side. ``direction``
    says which side is the source. With ``fold_spatial`` the written conv is 1x1.
    """

    layout: Layout
    weight_format: WeightFormat
    in_channels: int
    kernel: tuple[int, ...]
    conv_format: ConvFormat = ConvFormat.OIHW
    direction: str = "fc_to_conv"
    fold_spatial: bool = False

    @property
    def out_kernel(self) -> tuple[int, ...]:
        """The written conv's kernel: ``kernel``, or 1s when summed over space."""
        return (1,) * len(self.kernel) if self.fold_spatial else self.kernel

    @property
    def moves_bytes(self) -> bool:
        """False when the output keeps the source's bytes (only the header changes)."""
        return self.fold_spatial or not (
            self.weight_format is WeightFormat.OUT_IN
            and self.layout.is_canonical
            and self.conv_format is ConvFormat.OIHW
        )

    def source_filters(self, array):
        """The source weight viewed as ``T[o, c, *kernel]`` (any dtype, bit views too)."""
        if self.direction == "conv_to_fc":
            return array.transpose(self.conv_format.to_oihw(len(self.kernel)))
        rows = array if self.weight_format is WeightFormat.OUT_IN else array.T
        return self.layout.fc_rows_to_conv(rows, self.in_channels, self.kernel)

    def written_filters(self, array):
        """A written weight viewed back as ``T[o, c, *out_kernel]``."""
        if self.direction == "fc_to_conv":
            return array.transpose(self.conv_format.to_oihw(len(self.kernel)))
        rows = array if self.weight_format is WeightFormat.OUT_IN else array.T
        return self.layout.fc_rows_to_conv(rows, self.in_channels, self.kernel)

    def stored_perm(self) -> tuple[int, ...]:
        """Axes of ``T`` in the output's stored order, before any merge of axes.

        A conv output is stored as those axes; an FC output merges the feature axes
        (adjacent, in layout order) into one, which leaves the bytes as they are.
        """
        ndim = len(self.kernel)
        if self.direction == "fc_to_conv":
            return self.conv_format.from_oihw(ndim)
        features = tuple(1 + a for a in self.layout.from_canonical())
        return (0, *features) if self.weight_format is WeightFormat.OUT_IN else (*features, 0)


@dataclass(frozen=True)
class SelectRows:
    """Keep output rows ``indices`` (of the source's ``of``), in this order."""

    indices: tuple[int, ...]
    of: int
    text: str  # as the map gave it

    def describe(self) -> str:
        return f"outputs {self.text} ({len(self.indices)} of {self.of})"


@dataclass(frozen=True)
class FoldBatchNorm:
    """A BatchNorm folded in: ``after`` the layer (per output) or ``before`` it (per input).

    Tensor names by role (``gamma``/``beta`` None when the BN has none: 1 and 0). The BN
    normalises ``size`` values: outputs (after); flat input features or channels (before).
    ``weight``/``conversion``: the layer's source weight, which a bias folded ``before``
    is computed from.
    """

    position: str  # "after" or "before"
    name: str
    eps: float
    eps_from: str  # "map", "keras config", "torch default", "keras default"
    mean: str
    var: str
    gamma: str | None
    beta: str | None
    size: int
    weight: str
    conversion: Conversion

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(t for t in (self.gamma, self.beta, self.mean, self.var) if t)

    def describe(self) -> str:
        return f"fold BN {self.name} {self.position} (eps {self.eps:g}, {self.eps_from})"


@dataclass(frozen=True)
class SumSpatial:
    """Sum the filters over the kernel's positions: a 1x1 conv on a replicated map."""

    kernel: tuple[int, ...]

    def describe(self) -> str:
        return f"sum over {'x'.join(map(str, self.kernel))}"


@dataclass(frozen=True)
class Cast:
    """Round to nearest even from ``source_dtype`` into ``dtype`` (safetensors codes)."""

    source_dtype: str
    dtype: str
    allow_overflow: bool = False

    def describe(self) -> str:
        return f"cast {self.source_dtype} -> {self.dtype}"


Step = SelectRows | FoldBatchNorm | SumSpatial | Cast


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: ``name`` built from source tensor ``source``.

    ``conversion`` is None for a tensor that keeps its shape; ``steps`` change values (see
    the module's docstring). ``source`` is None for a bias that a BatchNorm fold creates.
    ``layer`` names the rule it belongs to, if any.
    """

    name: str
    source: str | None
    dtype: str
    shape: tuple[int, ...]
    conversion: Conversion | None = None
    layer: str | None = None
    steps: tuple[Step, ...] = ()

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def is_byte_copy(self) -> bool:
        """True when the output's bytes are the source's, as they are."""
        return not self.steps and (self.conversion is None or not self.conversion.moves_bytes)

    @property
    def exact(self) -> bool:
        """True when the values only move (and maybe are cast): proved bit for bit."""
        return self.source is not None and not any(
            isinstance(s, FoldBatchNorm | SumSpatial) for s in self.steps
        )

    def step(self, kind: type) -> Any:
        """This tensor's step of ``kind``, or None."""
        return next((s for s in self.steps if isinstance(s, kind)), None)

    @property
    def cast(self) -> Cast | None:
        return self.step(Cast)

    @property
    def source_name(self) -> str:
        """``source``, for a tensor that has one (every tensor but a created bias)."""
        if self.source is None:
            raise ValueError(f"{self.name}: is computed, it has no source tensor")
        return self.source

    @property
    def geometry(self) -> Conversion:
        """``conversion``, for a converted layer's weight (which always has one)."""
        if self.conversion is None:
            raise ValueError(f"{self.name}: has no conversion")
        return self.conversion


@dataclass(frozen=True)
class LayerPlan:
    """One converted layer: its rule, output tensors and the sizes derived for it.

    ``out_features`` is the output's (after ``outputs``), ``source_out_features`` the
    source's; ``folded`` lists the BatchNorm tensors folded in (left out of the output).
    """

    rule: Rule
    weight: PlannedTensor
    bias: PlannedTensor | None
    source_shape: tuple[int, ...]
    out_features: int
    in_features: int
    in_channels: int
    source_out_features: int = 0
    folded: tuple[str, ...] = ()
    folds: tuple[FoldBatchNorm, ...] = field(default=())

    @property
    def conversion(self) -> Conversion:
        """How the layer's weight is converted (every layer's weight is)."""
        return self.weight.geometry

    @property
    def operations(self) -> tuple[str, ...]:
        """What the layer does beyond moving values, one phrase each, for the report."""
        steps = [s for s in self.weight.steps if not isinstance(s, Cast)]
        return tuple(s.describe() for s in steps) + tuple(
            c.describe() for c in [self.weight.cast] if c
        )

    @property
    def proof(self) -> str:
        """How the weight is proved: "exact", or "float64, folded" / "float64, summed"."""
        if self.weight.step(FoldBatchNorm):
            return "float64, folded"
        if self.weight.step(SumSpatial):
            return "float64, summed"
        return "exact"


@dataclass(frozen=True)
class Plan:
    """Output tensors in file order, the converted layers in map order, and warnings.

    ``dtype``/``dtype_scope``: the cast asked for (None: none).
    """

    tensors: tuple[PlannedTensor, ...]
    layers: tuple[LayerPlan, ...]
    warnings: tuple[str, ...]
    dtype: str | None = None
    dtype_scope: str = "all"

    @property
    def copied(self) -> tuple[PlannedTensor, ...]:
        """Tensors no rule names: copied unchanged (or cast)."""
        return tuple(t for t in self.tensors if t.layer is None)

    @property
    def folded(self) -> tuple[str, ...]:
        """Source tensors folded into a layer: not in the output."""
        return tuple(n for layer in self.layers for n in layer.folded)


def build_plan(
    tensors: Mapping[str, TensorInfo],
    layer_map: LayerMap,
    stored_format: WeightFormat = WeightFormat.OUT_IN,
    *,
    kind: str | None = None,
    graph: Any = None,
    dtype: str | None = None,
    dtype_scope: str = "all",
    allow_overflow: bool = False,
) -> Plan:
    """Plan the conversion; raises ``PlanError`` listing every rule that does not fit.

    ``stored_format`` is how the checkpoint's format stores FC weights (Keras ``in_out``),
    used for a rule whose map and tensor say nothing. ``kind`` (the checkpoint's format)
    and ``graph`` (its config) give a BatchNorm's default eps. ``dtype`` (``float16``...,
    else the map's ``dtype:``) casts every floating tensor, or only the converted layers'
    with ``dtype_scope="converted"``.
    """
    problems: list[str] = []
    layers = []
    context = _Context(tensors, kind, graph)
    for index, rule in enumerate(layer_map.rules):
        where = f"{layer_map.source}: layers[{index}] ({shown(rule.name)})"
        plan_layer = _plan_reverse if layer_map.direction == "conv_to_fc" else _plan_layer
        layer = plan_layer(rule, tensors, where, problems, stored_format)
        if layer is not None:
            layer = _with_steps(layer, context, where, problems)
        if layer is not None:
            layers.append(layer)
    outputs = [t for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    _check_sources_unique(layers, problems, layer_map.source)
    consumed = {t.source for t in outputs} | {n for layer in layers for n in layer.folded}
    outputs += [
        PlannedTensor(info.name, info.name, info.dtype, info.shape)
        for info in tensors.values()
        if info.name not in consumed
    ]
    _check_outputs_unique(outputs, problems, layer_map.source)
    if problems:
        raise PlanError(problems)
    target = dtype or layer_map.dtype
    if target is not None:
        outputs = [_cast(t, DTYPES[target], dtype_scope, allow_overflow) for t in outputs]
        layers = [_cast_layer(layer, DTYPES[target], allow_overflow) for layer in layers]
    # Widest dtypes first, then by name, as safetensors does: every tensor stays aligned
    # to its item size, and the order does not depend on the source's order.
    outputs.sort(key=lambda t: (-DTYPE_BITS[t.dtype], t.name))
    warnings = _chain_warnings(layers, layer_map.source)
    return Plan(tuple(outputs), tuple(layers), warnings, target, dtype_scope)


def _cast(planned: PlannedTensor, dtype: str, scope: str, allow_overflow: bool) -> PlannedTensor:
    """``planned`` cast to ``dtype`` if it is floating (and converted, for that scope)."""
    source_dtype = planned.dtype
    if (
        source_dtype == dtype
        or source_dtype not in _CASTABLE
        or (scope == "converted" and planned.layer is None)
    ):
        return planned
    steps = (*planned.steps, Cast(source_dtype, dtype, allow_overflow))
    return _replace(planned, dtype=dtype, steps=steps)


def _cast_layer(layer: LayerPlan, dtype: str, allow_overflow: bool) -> LayerPlan:
    bias = layer.bias and _cast(layer.bias, dtype, "converted", allow_overflow)
    return _replace(
        layer, weight=_cast(layer.weight, dtype, "converted", allow_overflow), bias=bias
    )


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


@dataclass(frozen=True)
class _Context:
    """What a fold needs beyond the rule: the tensors, the format, its config."""

    tensors: Mapping[str, TensorInfo]
    kind: str | None
    graph: Any


def _with_steps(
    layer: LayerPlan, context: _Context, where: str, problems: list[str]
) -> LayerPlan | None:
    """The layer with its rule's value steps: outputs, BatchNorm folds, fold_spatial."""
    rule, weight, bias = layer.rule, layer.weight, layer.bias
    conversion = layer.conversion
    before = len(problems)
    select = _select(rule, layer.source_out_features, where, problems)
    fold_before = rule.fold_before and _fold(
        rule.fold_before, "before", (layer.in_features, layer.in_channels), layer, context,
        where, problems,
    )  # fmt: skip
    fold_after = rule.fold_after and _fold(
        rule.fold_after, "after", (layer.source_out_features,), layer, context, where, problems
    )
    if len(problems) > before:
        return None
    weight_steps: list[Step] = [s for s in (select, fold_before, fold_after) if s]
    bias_steps: list[Step] = [s for s in (select, fold_before, fold_after) if s]
    if conversion.fold_spatial:
        weight_steps.append(SumSpatial(conversion.kernel))
    out = len(select.indices) if select else layer.source_out_features
    if weight_steps:
        shape = _out_shape(weight.shape, conversion, out)
        weight = _replace(weight, shape=shape, steps=tuple(weight_steps))
    if bias is not None and bias_steps:
        bias = _replace(bias, shape=(out,), steps=tuple(bias_steps))
    elif bias is None and (fold_before or fold_after):
        # A layer without a bias gets one: the folded BatchNorm's shift lands there.
        name = _output_name(rule, _bias_name(rule, weight.source_name), ".bias")
        bias = PlannedTensor(name, None, weight.dtype, (out,), None, rule.name, tuple(bias_steps))
    folds = tuple(f for f in (fold_before, fold_after) if f)
    folded = tuple(
        n
        for f in folds
        for n in (*f.tensors, *(f.name + e for e in _BN_EXTRA if f.name + e in context.tensors))
    )
    return _replace(layer, weight=weight, bias=bias, out_features=out, folded=folded, folds=folds)


def _bias_name(rule: Rule, weight: str) -> str:
    """The name a new bias gets: named like the weight (``NAME.bias``, ``NAME/bias``)."""
    for weight_suffix, bias_suffix in zip(WEIGHT_SUFFIXES, BIAS_SUFFIXES, strict=True):
        if weight == rule.name + weight_suffix:
            return rule.name + bias_suffix
    return rule.name + ".bias"


def _out_shape(shape: tuple[int, ...], conversion: Conversion, out: int) -> tuple[int, ...]:
    """The stored shape with ``out`` outputs (the output axis is first, or last)."""
    if conversion.direction == "fc_to_conv":
        kernel = conversion.out_kernel
        return conversion.conv_format.shape(out, conversion.in_channels, kernel)
    features = conversion.in_channels * math.prod(conversion.kernel)
    return (out, features) if conversion.weight_format is WeightFormat.OUT_IN else (features, out)


def _select(rule: Rule, out_features: int, where: str, problems: list[str]) -> SelectRows | None:
    """The rule's ``outputs`` as indices into ``out_features`` rows; None when absent."""
    if rule.outputs is None:
        return None
    if isinstance(rule.outputs, str):
        match = OUTPUT_SLICE.fullmatch(rule.outputs)
        if match is None:  # the map's validator let only slices through
            raise ValueError(f"outputs {rule.outputs!r} is not a slice")
        start, stop, step = (int(g) if g else None for g in match.groups())
        bounds = [b for b in (start, stop) if b is not None]
        if any(b > out_features for b in bounds):
            problems.append(
                f"{where}: outputs: slice {rule.outputs!r} reaches past the layer's "
                f"{out_features} outputs"
            )
            return None
        indices = tuple(range(out_features)[slice(start, stop, step)])
        text = rule.outputs
    else:
        indices = rule.outputs
        text = "[" + ", ".join(map(str, indices)) + "]"
        wrong = [i for i in indices if i >= out_features]
        if wrong:
            problems.append(
                f"{where}: outputs: index {wrong[0]} is out of range for the layer's "
                f"{out_features} outputs (0 to {out_features - 1})"
            )
            return None
    if not indices:
        problems.append(f"{where}: outputs: {text} keeps none of the {out_features} outputs")
        return None
    return SelectRows(indices, out_features, text)


def _fold(
    spec: BatchNormSpec,
    position: str,
    sizes: tuple[int, ...],
    layer: LayerPlan,
    context: _Context,
    where: str,
    problems: list[str],
) -> FoldBatchNorm | None:
    """Find a BatchNorm's tensors and eps; its size must be one of ``sizes``."""
    key = "fold_batchnorm" if position == "after" else "fold_batchnorm_before"
    found = _bn_tensors(spec.name, context.tensors)
    if found is None:
        tried = ", ".join(spec.name + n["mean"] for n in _BN_NAMES.values())
        problems.append(
            f"{where}: {key}: no BatchNorm {spec.name!r} in the checkpoint (tried {tried})"
            + _closest(spec.name + ".running_mean", context.tensors)
        )
        return None
    style, names = found
    shapes = {role: context.tensors[n].shape for role, n in names.items() if n}
    bad = [f"{names[r]} {list(s)}" for r, s in shapes.items() if len(s) != 1 or s[0] not in sizes]
    if bad or len(set(shapes.values())) != 1:
        what = (
            "the layer's out_features"
            if position == "after"
            else "the layer's in_features or in_channels"
        )
        expected = " or ".join(f"[{n}]" for n in dict.fromkeys(sizes))
        problems.append(
            f"{where}: {key}: BatchNorm {spec.name!r} has {', '.join(bad) or 'mixed shapes'}, "
            f"expected {expected} ({what})"
        )
        return None
    nonfloat = [n for n in names.values() if n and context.tensors[n].dtype not in _CASTABLE]
    if nonfloat:
        problems.append(f"{where}: {key}: {nonfloat[0]!r} is not a float tensor")
        return None
    eps, eps_from = _eps(spec, style, context)
    return FoldBatchNorm(
        position,
        spec.name,
        eps,
        eps_from,
        names["mean"] or "",
        names["var"] or "",
        names["gamma"],
        names["beta"],
        next(iter(shapes.values()))[0],
        layer.weight.source_name,
        layer.conversion,
    )


def _bn_tensors(
    name: str, tensors: Mapping[str, TensorInfo]
) -> tuple[str, dict[str, str | None]] | None:
    """A BatchNorm's tensor names by role, in torch's or Keras' naming; None if absent."""
    for style, suffixes in _BN_NAMES.items():
        for tail in ("", ":0"):
            names = {role: name + s + tail for role, s in suffixes.items()}
            if names["mean"] in tensors and names["var"] in tensors:
                return style, {r: n if n in tensors else None for r, n in names.items()}
    return None


def _eps(spec: BatchNormSpec, style: str, context: _Context) -> tuple[float, str]:
    """The map's eps, else the Keras config's, else the framework's default."""
    if spec.eps is not None:
        return spec.eps, "map"
    configured = _config_eps(context.graph, spec.name.split("/")[-1])
    if configured is not None:
        return configured, "keras config"
    framework = "keras" if context.kind == "keras" or style == "keras" else "torch"
    return BN_DEFAULT_EPS[framework], f"{framework} default"


def _config_eps(graph: Any, name: str) -> float | None:
    """``epsilon`` of the BatchNormalization layer ``name`` anywhere in a Keras config."""
    stack = [graph]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            config = node.get("config")
            if (
                node.get("class_name") == "BatchNormalization"
                and isinstance(config, Mapping)
                and config.get("name") == name
                and type(config.get("epsilon")) in (int, float)
                and config["epsilon"] > 0
            ):
                return float(config["epsilon"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


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
    conversion = Conversion(
        rule.layout,
        fmt,
        in_channels,
        rule.kernel,
        rule.conv_format,
        fold_spatial=rule.fold_spatial is not None,
    )
    conv_weight = PlannedTensor(
        _output_name(rule, weight_name, ".weight"),
        weight_name,
        weight.dtype,
        rule.conv_format.shape(out_features, in_channels, conversion.out_kernel),
        conversion,
        rule.name,
    )
    return _with_bias(
        rule, tensors, where, problems, conv_weight, weight.shape, out_features, in_features
    )


def _with_bias(
    rule: Rule,
    tensors: Mapping[str, TensorInfo],
    where: str,
    problems: list[str],
    planned_weight: PlannedTensor,
    source_shape: tuple[int, ...],
    out_features: int,
    in_features: int,
) -> LayerPlan | None:
    """The layer's plan with its bias (the map's, or the one named like the weight)."""
    weight_name, in_channels = planned_weight.source_name, planned_weight.geometry.in_channels
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
        rule,
        planned_weight,
        conv_bias,
        source_shape,
        out_features,
        in_features,
        in_channels,
        out_features,
    )


def _plan_reverse(
    rule: Rule,
    tensors: Mapping[str, TensorInfo],
    where: str,
    problems: list[str],
    stored_format: WeightFormat,
) -> LayerPlan | None:
    """A conv -> FC rule: the conv's kernel must be the map's ``kernel`` exactly."""
    weight_name = _find_weight(rule, tensors, where, problems)
    if weight_name is None:
        return None
    weight = tensors[weight_name]
    ndim = len(rule.kernel)
    kernel_text = "x".join(map(str, rule.kernel))
    if len(weight.shape) != ndim + 2 or 0 in weight.shape:
        problems.append(
            f"{where}: weight {shown(weight_name)} has shape {list(weight.shape)}, expected a "
            f"{ndim + 2}-D conv weight ({rule.conv_format.value}) with kernel {kernel_text}"
        )
        return None
    if weight.dtype not in FLOAT_DTYPES:
        problems.append(
            f"{where}: weight {weight_name!r} is {weight.dtype}, expected a float dtype"
        )
        return None
    oihw = tuple(weight.shape[a] for a in rule.conv_format.to_oihw(ndim))
    out_features, in_channels, kernel = oihw[0], oihw[1], oihw[2:]
    if kernel != rule.kernel:
        problems.append(
            f"{where}: kernel: the conv's kernel {'x'.join(map(str, kernel))} (shape "
            f"{list(weight.shape)}, conv_format {rule.conv_format.value}) does not cover the "
            f"map's feature map {kernel_text} exactly"
        )
        return None
    if rule.in_channels is not None and rule.in_channels != in_channels:
        problems.append(
            f"{where}: in_channels: {rule.in_channels}, but the conv has {in_channels} "
            f"(shape {list(weight.shape)}, conv_format {rule.conv_format.value})"
        )
        return None
    fmt = rule.weight_format or stored_format
    conversion = Conversion(
        rule.layout, fmt, in_channels, rule.kernel, rule.conv_format, direction="conv_to_fc"
    )
    in_features = in_channels * math.prod(kernel)
    shape = (
        (out_features, in_features) if fmt is WeightFormat.OUT_IN else (in_features, out_features)
    )
    fc_weight = PlannedTensor(
        _output_name(rule, weight_name, ".weight"),
        weight_name,
        weight.dtype,
        shape,
        conversion,
        rule.name,
    )
    return _with_bias(
        rule, tensors, where, problems, fc_weight, weight.shape, out_features, in_features
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
            if planned is None or planned.source is None:
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
