"""Describe a checkpoint and suggest its layer map: groups, conv backbone, FC head.

The FC head is found by sizes, not by names: FC weights (2-D) whose in_features is no
other FC's out_features start a chain, followed through matching out/in sizes (a layer
read by several heads keeps them all). How the first FC reads the backbone's map -- its
channels, the map's shape and the flatten order -- comes from the best evidence at hand:

1. the file's own graph or config (ONNX, TF.js, Keras, Caffe with a prototxt): read, not
   guessed, confidence 1 (``source`` ``graph`` / ``config``);
2. otherwise the conv backbone's geometry (the feeding conv's channels; every way to
   split in_features / C over its spatial rank; ``(k, 1)`` kernels mean W = 1) and the
   FC weight's smoothness, scored over every (shape, order) candidate together
   (``source`` ``weights``);
3. when the weights cannot separate the candidates, the format's default order and the
   squarest shape, said to be a default with the candidates listed (``source``
   ``default``).

The suggested map is checked against the checkpoint before it is returned, so it
converts as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from fc2conv_cli.errors import InputError, shown
from fc2conv_cli.evidence import ConvInfo, Reading, map_shapes, read_map
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.layout import SPATIAL_AXES, Layout, WeightFormat
from fc2conv_cli.plan import WEIGHT_SUFFIXES, build_plan
from fc2conv_cli.readers import FLOAT_DTYPES, Checkpoint, TensorInfo

if TYPE_CHECKING:
    from fc2conv_cli.guess import MapCandidate, MapGuess

__all__ = ["CheckpointSummary", "SuggestedMap", "TensorGroup", "suggest_map", "summarize"]

# Formats whose conv weights are stored (*kernel, in, out).
_HWIO_FORMATS = ("keras", "tfjs", "numpy")
# Formats whose tensor names need not follow the ``.weight`` / ``/kernel`` convention:
# an FC weight is any 2-D float tensor a Gemm / MatMul reads (the reader's hint).
_GRAPH_FORMATS = ("onnx", "tfjs")
# Tensors of recurrent and attention layers: their sizes are not a conv map's.
_RECURRENT = re.compile(
    r"weight_ih|weight_hh|recurrent_kernel|in_proj_weight|attn|attention|"
    r"(^|[./_])(lstm|gru|rnn)",
    re.IGNORECASE,
)
# A conv counts as an already-convolutional FC head when its kernel covers at least this
# many positions and this many times the backbone's median kernel.
_HEAD_KERNEL = 25
_HEAD_RATIO = 4
# At most this many map shapes are scored (most square first).
_MAX_SHAPES = 48


@dataclass(frozen=True)
class TensorGroup:
    """Tensors sharing a prefix (``features.0`` for ``features.0.weight`` and ``.bias``)."""

    prefix: str
    kind: str  # "conv" (3-, 4- or 5-D weight), "fc" (2-D weight) or "other"
    tensors: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CheckpointSummary:
    """What ``inspect`` shows: groups in checkpoint order, totals and reader notes."""

    path: str
    kind: str
    groups: tuple[TensorGroup, ...]
    notes: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def tensor_count(self) -> int:
        return sum(len(g.tensors) for g in self.groups)


@dataclass(frozen=True)
class SuggestedMap:
    """A layer map as commented YAML, with the evidence behind it.

    ``source`` says where the first FC's shape and order came from: ``graph``,
    ``config``, ``weights`` or ``default`` (``layout_source`` / ``shape_source`` per
    part). ``confidence`` is 1 for a read answer, the weights' confidence otherwise (0
    for a default). ``candidates`` are every (shape, order) class the weights scored.
    """

    text: str
    layers: tuple[str, ...]
    in_channels: int
    kernel: tuple[int, ...]
    layout: str
    source: str
    layout_source: str
    shape_source: str
    confidence: float
    guess: MapGuess | None
    reading: Reading | None
    ambiguities: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def candidates(self) -> tuple[MapCandidate, ...]:
        return self.guess.candidates if self.guess else ()


def summarize(checkpoint: Checkpoint) -> CheckpointSummary:
    """Group the checkpoint's tensors by prefix, in checkpoint order."""
    groups: dict[str, list[TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        groups.setdefault(_prefix(info.name), []).append(info)
    return CheckpointSummary(
        str(checkpoint.path),
        checkpoint.kind,
        tuple(TensorGroup(p, _kind(ts), tuple(ts)) for p, ts in groups.items()),
        checkpoint.notes,
    )


def suggest_map(
    checkpoint: Checkpoint, source_name: str, net: dict[str, Any] | None = None
) -> SuggestedMap:
    """Suggest a layer map; raises ``InputError`` when the checkpoint has no FC head.

    ``net`` is a Caffe prototxt's graph (``readers.caffe.read_prototxt``), which gives
    the input shape a ``.caffemodel`` lacks. Weights with a zero-sized axis hold nothing
    to convert and are left out.
    """
    tensors = checkpoint.tensors
    notes: list[str] = []
    recurrent, sizes = _recurrent(checkpoint)
    fcs = _fc_weights(checkpoint, recurrent)
    convs = _convs(checkpoint)
    head = _conv_head(convs)
    if head is not None:
        dims = [head.out_channels, head.in_channels, *head.kernel]
        notes.append(
            f"already fully convolutional: {head.name} {dims} is a conv with a "
            f"{'x'.join(map(str, head.kernel))} kernel after the backbone"
        )
    if not fcs:
        raise InputError(_no_fc_message(source_name, tensors, head))
    kept: list[TensorInfo] = []
    left_out: list[TensorInfo] = []
    for fc in fcs:
        (left_out if _io(fc, checkpoint)[0] in sizes else kept).append(fc)
    for fc in left_out:
        size = _io(fc, checkpoint)[0]
        notes.append(
            f"{fc.name} reads {size} features, a size a recurrent, attention or "
            f"per-position layer reads or makes ({sizes[size]}): it may follow that layer, "
            "not a conv map; left out"
        )
    if not kept:
        raise InputError(
            f"{source_name}: no FC head to convert: every FC weight is a recurrent, attention "
            f"or per-position layer, or reads one's size "
            f"({', '.join(shown(n) for n in [t.name for t in left_out[:3]] or recurrent[:3])})"
        )
    roots = [  # an FC no other FC feeds (a square FC does not feed itself)
        t
        for t in kept
        if all(_io(o, checkpoint)[1] != _io(t, checkpoint)[0] for o in kept if o is not t)
    ]
    if not roots:
        raise InputError(
            f"{source_name}: the FC weights form a cycle of sizes (as per-token layers of "
            "attention blocks do): no FC reads a flattened conv map; write the map"
        )
    root = max(roots, key=lambda t: _io(t, checkpoint)[0])  # the widest input: the map
    chain = _chain(root, kept, checkpoint)
    blank = [t.name for t in chain if not _layer(t.name)[0].strip()]
    if blank:
        raise InputError(
            f"{source_name}: FC weight {blank[0]!r} has a blank layer prefix, which a "
            "layer map cannot name; rename the tensor"
        )
    first = _first_fc(checkpoint, root, convs, net, head)
    text = _render(source_name, checkpoint, chain, first, notes)
    layer_map = parse_layer_map(text, "suggested map")
    build_plan(tensors, layer_map, checkpoint.weight_format)  # it must fit its checkpoint
    return SuggestedMap(
        text,
        tuple(_layer(t.name)[0] for t in chain),
        first.channels,
        first.kernel,
        first.layout,
        first.source,
        first.layout_source,
        first.shape_source,
        first.confidence,
        first.guess,
        first.reading,
        tuple(first.ambiguities),
        tuple(notes),
    )


# -- names and kinds -------------------------------------------------------------------


def _layer(name: str) -> tuple[str, str | None]:
    """(layer name, weight suffix) for ``fc1.weight`` / ``fc1/kernel:0``; (name, None) else."""
    for suffix in sorted(WEIGHT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def _prefix(name: str) -> str:
    layer, suffix = _layer(name)
    if suffix is not None:
        return layer
    for tail in ("/bias:0", "/bias", ".bias"):
        if name.endswith(tail) and len(name) > len(tail):
            return name[: -len(tail)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _kind(tensors: list[TensorInfo]) -> str:
    weights = [t for t in tensors if _layer(t.name)[1] is not None] or tensors
    if any(3 <= len(t.shape) <= 5 for t in weights):
        return "conv"
    if any(len(t.shape) == 2 for t in weights):
        return "fc"
    return "other"


def _natural_key(name: str) -> list:
    """Sort ``classifier.10`` after ``classifier.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _stored_format(info: TensorInfo, checkpoint: Checkpoint) -> WeightFormat:
    return info.weight_format or checkpoint.weight_format


def _io(info: TensorInfo, checkpoint: Checkpoint) -> tuple[int, int]:
    """(in_features, out_features) of an FC weight in its stored format."""
    a, b = info.shape
    return (b, a) if _stored_format(info, checkpoint) is WeightFormat.OUT_IN else (a, b)


def _is_weight(info: TensorInfo, checkpoint: Checkpoint) -> bool:
    if info.dtype not in FLOAT_DTYPES or 0 in info.shape:
        return False
    if _layer(info.name)[1] is not None:
        return True
    return checkpoint.kind in _GRAPH_FORMATS or checkpoint.kind == "caffe"


def _fc_weights(checkpoint: Checkpoint, recurrent: list[str]) -> list[TensorInfo]:
    found = []
    for info in checkpoint.tensors.values():
        if len(info.shape) != 2 or info.name in recurrent or not _is_weight(info, checkpoint):
            continue
        if _layer(info.name)[1] is None and info.weight_format is None:
            continue  # a graph format's 2-D tensor no Gemm / MatMul reads
        found.append(info)
    return found


def _convs(checkpoint: Checkpoint) -> list[ConvInfo]:
    hwio = checkpoint.kind in _HWIO_FORMATS
    convs = []
    for info in checkpoint.tensors.values():
        if not 3 <= len(info.shape) <= 5 or not _is_weight(info, checkpoint):
            continue
        if _RECURRENT.search(info.name):
            continue
        shape = info.shape
        if hwio:
            convs.append(ConvInfo(info.name, shape[-1], shape[-2], tuple(shape[:-2])))
        else:
            convs.append(ConvInfo(info.name, shape[0], shape[1], tuple(shape[2:])))
    return convs


def _recurrent(checkpoint: Checkpoint) -> tuple[list[str], dict[int, str]]:
    """(recurrent / attention tensor names, feature size they read or make -> a tensor)."""
    names: list[str] = []
    sizes: dict[int, str] = {}
    graph = checkpoint.graph if checkpoint.kind == "onnx" else None
    graph_inputs = {
        i
        for node in (graph or {}).get("nodes", [])
        if node.get("op_type") in ("LSTM", "GRU", "RNN", "Attention")
        for i in node.get("inputs", [])[1:3]
    }
    if graph:
        from fc2conv_cli.evidence.onnx_graph import per_token_weights

        graph_inputs |= set(per_token_weights(graph))
    for info in checkpoint.tensors.values():
        if len(info.shape) not in (2, 3) or 0 in info.shape:
            continue
        if not (_RECURRENT.search(info.name) or info.name in graph_inputs):
            continue
        names.append(info.name)
        a, b = info.shape[-2:]
        small = min(a, b)
        found = {a, b}  # (gates x hidden, input), an attention projection: reads, makes
        if max(a, b) in (3 * small, 4 * small):  # (gates x hidden, hidden): makes hidden
            found = {small}
            if "reverse" in info.name or (len(info.shape) == 3 and info.shape[0] == 2):
                found.add(2 * small)  # a bidirectional layer: both directions side by side
        for size in found:
            sizes.setdefault(size, info.name)
    return names, sizes


def _no_fc_message(source: str, tensors: dict[str, TensorInfo], head: ConvInfo | None) -> str:
    if head is not None:
        return (
            f"{source}: no FC weights to convert: the head is already fully convolutional "
            f"({shown(head.name)} {[head.out_channels, head.in_channels, *head.kernel]})"
        )
    empty = [t for t in tensors.values() if len(t.shape) == 2 and 0 in t.shape]
    return f"{source}: no FC weights (2-D '.weight' tensors) to convert" + "".join(
        f"; {shown(t.name)} {list(t.shape)} is empty" for t in empty[:3]
    )


def _conv_head(convs: list[ConvInfo]) -> ConvInfo | None:
    """A conv with a large kernel reading another conv's map: an FC turned conv (timm's
    ``pre_logits.fc1`` (4096, 512, 7, 7)), or None. A first conv (AlexNet's 11x11) reads
    the image, no conv's output."""
    if len(convs) < 2:
        return None
    sizes = sorted(math.prod(c.kernel) for c in convs)
    median = sizes[len(sizes) // 2]
    for conv in convs:
        feeds = {c.out_channels for c in convs if c is not conv}
        big = math.prod(conv.kernel)
        if big >= _HEAD_KERNEL and big >= _HEAD_RATIO * median and conv.in_channels in feeds:
            return conv
    return None


def _chain(root: TensorInfo, fcs: list[TensorInfo], checkpoint: Checkpoint) -> list[TensorInfo]:
    """The root and every FC reachable through matching sizes, breadth first."""
    chain, frontier = [root], [root]
    while frontier:
        outs = {_io(f, checkpoint)[1] for f in frontier}
        following = sorted(
            (t for t in fcs if t not in chain and _io(t, checkpoint)[0] in outs),
            key=lambda t: _natural_key(t.name),
        )
        chain += following
        frontier = following
    return chain


# -- the first FC: read, inferred or defaulted -------------------------------------------


@dataclass
class _First:
    """How the first FC reads the map, and why (for the map's comments and the report)."""

    channels: int
    kernel: tuple[int, ...]
    layout: str
    source: str
    layout_source: str
    shape_source: str
    confidence: float
    said: str  # the comment line that says where the answer came from
    feeder: str | None = None
    guess: MapGuess | None = None
    reading: Reading | None = None
    weight_format: WeightFormat | None = None  # written into the map when not the stored one
    ambiguities: list[str] = field(default_factory=list)


def _first_fc(
    checkpoint: Checkpoint,
    root: TensorInfo,
    convs: list[ConvInfo],
    net: dict[str, Any] | None,
    head: ConvInfo | None,
) -> _First:
    in_features = _io(root, checkpoint)[0]
    stored = _stored_format(root, checkpoint)
    reading = _read(checkpoint, root, net)
    ambiguities: list[str] = []
    read_format = reading.weight_format if reading else None
    if reading is not None and reading.problem:
        ambiguities.append(f"{reading.how}: {reading.problem}; the weights decide instead")
    if reading is not None and reading.complete:
        first = _from_reading(reading, in_features, convs)
        if first is not None:
            first.weight_format = read_format if read_format not in (None, stored) else None
            first.ambiguities = ambiguities + first.ambiguities
            return first
        ambiguities.append(
            f"{reading.how}: {reading.channels} channels x {list(reading.shape or ())} is not "
            f"the {in_features} inputs of {root.name}; the weights decide instead"
        )
    channels, rank, feeder, notes = _feeder(in_features, convs, reading)
    ambiguities += notes
    layout_read = _read_layout(reading, rank)
    first = _from_weights(
        checkpoint, root, read_format or stored, channels, rank, convs, layout_read, reading
    )
    first.feeder = feeder
    first.reading = reading
    first.weight_format = read_format if read_format not in (None, stored) else None
    first.ambiguities = ambiguities + first.ambiguities
    if math.prod(first.kernel) == 1 and feeder is not None:
        pooled_by = (
            f" ({head.name} is that head)" if head is not None and head.name == feeder else ""
        )
        first.ambiguities.append(
            f"{root.name} reads {in_features} = out_channels of {feeder}: the network pools "
            f"the map to 1x1 first (global average pooling){pooled_by}; as a 1x1 conv it "
            "applies at every position, before the pooling"
        )
    return first


def _read(checkpoint: Checkpoint, root: TensorInfo, net: dict[str, Any] | None) -> Reading | None:
    try:
        return read_map(checkpoint, root.name, _layer(root.name)[0], net)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # A graph or config this walk has never seen: its word is not needed.
        return Reading("graph", "read from the file", problem=f"cannot walk it ({exc!r})")


def _read_layout(reading: Reading | None, rank: int) -> str | None:
    if reading is None or not reading.layout or reading.problem:
        return None
    try:
        layout = Layout.parse(reading.layout)
    except ValueError:
        return None
    return layout.axes if layout.spatial_ndim == rank else None


def _from_reading(reading: Reading, in_features: int, convs: list[ConvInfo]) -> _First | None:
    shape, channels = tuple(reading.shape or ()), reading.channels
    if not shape or channels is None or channels * math.prod(shape) != in_features:
        return None
    layout = _read_layout(reading, len(shape))
    if reading.pooled or math.prod(shape) == 1:
        layout = layout or "c" + SPATIAL_AXES[len(shape)]
    if layout is None:
        return None
    feeder = next((c.name for c in reversed(convs) if c.out_channels == channels), None)
    nodes = ", ".join(reading.nodes[-6:])
    said = f"Map shape and layout {reading.how} ({nodes}): confidence 1."
    first = _First(
        channels, shape, layout, reading.source, reading.source, reading.source, 1.0, said, feeder
    )
    first.reading = reading
    if reading.pooled:
        first.ambiguities.append(
            "the graph pools the map to 1x1 before the FC (global pooling): as a 1x1 conv "
            "the FC applies at every position, before the pooling"
        )
    return first


def _feeder(
    in_features: int, convs: list[ConvInfo], reading: Reading | None
) -> tuple[int, int, str | None, list[str]]:
    """(in_channels, spatial rank, feeding conv's name, notes) for the first FC."""
    if reading is not None and reading.channels and in_features % reading.channels == 0:
        rank = len(reading.shape) if reading.shape else (convs[-1].rank if convs else 2)
        feeder = next((c.name for c in reversed(convs) if c.out_channels == reading.channels), None)
        return reading.channels, rank, feeder, []
    if not convs:
        return in_features, 2, None, ["no conv weights: the first FC is treated as 1x1"]
    # Checkpoint order is not network order (safetensors sorts names), so prefer a conv
    # whose channels leave a k x k map, then the widest (the last conv of a classic CNN
    # has the most channels), then the latest name.
    fitting = [c for c in convs if in_features % c.out_channels == 0]
    if not fitting:
        return (
            in_features,
            convs[-1].rank,
            None,
            [f"no conv's out_channels divides in_features {in_features}: treated as 1x1"],
        )
    conv = max(
        fitting,
        key=lambda c: (
            _is_power(in_features // c.out_channels, c.rank),
            c.out_channels,
            _natural_key(c.name),
        ),
    )
    return conv.out_channels, conv.rank, conv.name, []


def _is_power(positions: int, ndim: int) -> bool:
    return round(positions ** (1 / ndim)) ** ndim == positions


def _layout_order(rank: int, stored: WeightFormat) -> list[str]:
    """Every flatten order, the format's usual ones first (chw for torch, hwc for Keras)."""
    spatial = SPATIAL_AXES[rank]
    usual = ["c" + spatial, spatial + "c"]
    if stored is WeightFormat.IN_OUT:
        usual.reverse()
    from fc2conv_cli.guess import candidate_layouts

    return usual + [a.axes for a in candidate_layouts(rank) if a.axes not in usual]


def _from_weights(
    checkpoint: Checkpoint,
    root: TensorInfo,
    weight_format: WeightFormat,
    channels: int,
    rank: int,
    convs: list[ConvInfo],
    layout_read: str | None,
    reading: Reading | None,
) -> _First:
    from fc2conv_cli.guess import guess_map

    positions = _io(root, checkpoint)[0] // channels
    orders = [layout_read] if layout_read else _layout_order(rank, weight_format)
    layout_source = reading.source if layout_read and reading else None
    if positions == 1:
        kernel = (1,) * rank
        said = "A 1x1 map has only one flatten order."
        return _First(channels, kernel, "c" + SPATIAL_AXES[rank], "geometry",
                      layout_source or "geometry", "geometry", 1.0, said)  # fmt: skip
    shapes, notes = map_shapes(positions, rank, convs)
    if len(shapes) > _MAX_SHAPES:
        notes.append(f"{len(shapes)} map shapes: only the {_MAX_SHAPES} squarest are scored")
        shapes = shapes[:_MAX_SHAPES]
    weight = checkpoint.array(root.name)
    guess = guess_map(weight, channels, shapes, weight_format, orders)
    best, shape_source = guess.best, "weights"
    lean = notes and notes[0].startswith(("W = 1", "H = 1"))
    if best is None and lean:
        # The weights cannot place the map among every shape; the (k, 1) kernels say
        # W = 1 (or H = 1): the order is scored on that shape alone.
        within = guess_map(weight, channels, shapes[:1], weight_format, orders)
        if within.best is not None:
            size = "x".join(map(str, shapes[0]))
            notes.append(
                f"over every shape the weights cannot tell ({guess.reason}); {size} is the "
                "kernels' answer, its order the weights'"
            )
            best, shape_source = within.best, "geometry"  # every candidate stays listed
    if best is not None:
        shape, layout = _pick(best.members, shapes, orders)
        twins = _twins(best.members, (shape, layout), channels)
        ambiguities = list(notes)
        if twins:
            ambiguities.append(
                f"the weights cannot tell {_label(shape, layout)} from {' or '.join(twins)} "
                "(a transpose of the same filters): check which way your map runs"
            )
        said = (
            f"Map shape and layout from the weights: {_label(shape, layout)}, confidence "
            f"{best.confidence:.2f} (best of {len(guess.candidates)} candidates, "
            f"{best.z:.1f} sigma above chance)."
        )
        if shape_source == "geometry":
            said = (
                f"Map shape from the conv kernels ({'x'.join(map(str, shape))}), layout from "
                f"the weights: {layout}, confidence {best.confidence:.2f}."
            )
        if layout_source and reading is not None:
            said = (
                f"Layout {reading.how} ({layout}); map shape from the weights: "
                f"{_label(shape, layout)}, confidence {best.confidence:.2f}."
            )
        first = _First(channels, shape, layout, "weights", layout_source or "weights",
                       shape_source, best.confidence, said, guess=guess)  # fmt: skip
        first.ambiguities = ambiguities
        return first
    shape, layout = shapes[0], orders[0]
    listed = "; ".join(
        f"{_label(c.shape, c.layout)} (score {c.score:.3f}, z {c.z:.1f})"
        for c in guess.candidates[:4]
    )
    why = "its order read from the graph" if layout_source else _default_why(layout, weight_format)
    said = (
        f"The weights cannot tell the map ({guess.reason.split(': ', 1)[-1]}): {layout} is "
        f"{why} and {'x'.join(map(str, shape))} the squarest shape the backbone allows."
    )
    first = _First(channels, shape, layout, layout_source or "default",
                   layout_source or "default", "default", 0.0, said, guess=guess)  # fmt: skip
    first.ambiguities = [*notes, f"candidates left: {listed}: check how your model flattens"]
    return first


def _default_why(layout: str, weight_format: WeightFormat) -> str:
    if weight_format is WeightFormat.IN_OUT:
        return "Keras' / TF's Flatten order on channels_last maps"
    return "PyTorch's x.flatten(1) order"


def _label(shape: tuple[int, ...], layout: str) -> str:
    return f"{'x'.join(map(str, shape))} {layout}"


def _pick(
    members: tuple, shapes: list[tuple[int, ...]], orders: list[str]
) -> tuple[tuple[int, ...], str]:
    """The member in the usual order first, then the preferred shape."""
    return min(members, key=lambda m: (orders.index(m[1]), shapes.index(m[0])))


def _twins(members: tuple, chosen: tuple, channels: int) -> list[str]:
    """Members whose conv weight differs from the chosen one's (a transpose of it), one
    per distinct weight."""
    import numpy as np

    def conv(member: tuple) -> Any:
        shape, axes = member
        flat = np.arange(channels * math.prod(shape)).reshape(1, -1)
        return Layout(axes).fc_rows_to_conv(flat, channels, shape)

    seen, found = [conv(chosen)], []
    for member in members:
        weight = conv(member)
        if any(weight.shape == s.shape and np.array_equal(weight, s) for s in seen):
            continue
        seen.append(weight)
        found.append(_label(*member))
    return found


# -- the map's text ----------------------------------------------------------------------


def _render(
    source: str,
    checkpoint: Checkpoint,
    chain: list[TensorInfo],
    first: _First,
    notes: list[str],
) -> str:
    root = chain[0]
    size = "x".join(map(str, first.kernel))
    in_features = _io(root, checkpoint)[0]
    stored = _stored_format(root, checkpoint)
    # Names go into comments through shown(): a line break in one must not end the comment.
    lines = [
        f"# Layer map suggested by `fc2conv inspect --suggest-map` for {shown(source)}.",
        f"# The first FC, {shown(root.name)} {list(root.shape)}, reads {first.channels} channels"
        + (f" (out_channels of {shown(first.feeder)})" if first.feeder else "")
        + f" x {size} = {in_features} inputs.",
        f"# {shown(first.said)}",
    ]
    lines += [f"# Check: {shown(note)}" for note in first.ambiguities]
    lines += [f"# Note: {shown(note)}" for note in notes]
    written = first.weight_format
    if written is None:
        lines.append(
            f"# Weights are read in the checkpoint's stored FC format, {stored.value} "
            f"({_FORMAT_WORDS[stored]}): no weight_format needed."
        )
    else:
        lines.append(
            f"# The graph says the FC weight is stored {written.value}, not {stored.value}."
        )
    lines += ["version: 1", f"layout: {_scalar(first.layout)}"]
    if written is not None:
        lines.append(f"weight_format: {written.value}")
    lines.append("layers:")
    for index, fc in enumerate(chain):
        layer, suffix = _layer(fc.name)
        shape = f"{list(fc.shape)} -> conv {size if index == 0 else '1x1'}"
        lines.append(f"  - name: {_scalar(layer)}  # {shown(shape)}")
        if index == 0:
            lines.append(f"    kernel: {_scalar(list(first.kernel))}")
            lines.append(f"    in_channels: {_scalar(first.channels)}")
        if suffix is None:
            lines.append(f"    weight: {_scalar(fc.name)}")
            bias = _graph_bias(checkpoint, fc.name)
            if bias is not None:
                lines.append(f"    bias: {_scalar(bias)}")
    return "\n".join(lines) + "\n"


_FORMAT_WORDS = {
    WeightFormat.OUT_IN: "(out_features, in_features), as torch nn.Linear",
    WeightFormat.IN_OUT: "(in_features, out_features), as a Keras / TF Dense kernel",
}


def _graph_bias(checkpoint: Checkpoint, weight: str) -> str | None:
    """The bias the graph adds to the FC reading ``weight``, if it names one."""
    if checkpoint.kind != "onnx" or not isinstance(checkpoint.graph, dict):
        return None
    from fc2conv_cli.evidence.onnx_graph import fc_bias

    return fc_bias(checkpoint.graph, weight, checkpoint)


# PyYAML folds long scalars at ``width`` columns; a map line is never folded.
_NO_WRAP = 1 << 30


def _scalar(value: str | int | list[int]) -> str:
    """``value`` as a one-line YAML flow value that loads back as exactly ``value``.

    PyYAML's own emitter decides: plain when that is unambiguous (``classifier.0``),
    quoted when plain would change the type or the meaning (``null``, ``yes``, ``1.5``,
    ``a: b``, ``x # y``), double-quoted with escapes for what is not printable (line
    breaks, tabs, NUL, BOM). Non-ASCII text is kept as it is.
    """
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    text = yaml.safe_dump(
        [value], default_flow_style=True, default_style=style, allow_unicode=True, width=_NO_WRAP
    )
    return text.strip()[1:-1]  # the value, without the "[" "]" of its one-item list
