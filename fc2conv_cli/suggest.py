"""Describe a checkpoint and suggest its layer map: groups, conv backbone, FC head.

The FC head is found by sizes, not by names: FC weights (2-D) whose in_features is no
other FC's out_features start a chain, followed through matching out/in sizes (a layer
read by several heads keeps them all). The first FC's kernel and in_channels come from
the conv that feeds it: in_features / C must be k x k (k, or k x k x k, for 1-D and 3-D
convs), otherwise the candidates are listed. The flatten order is guessed from the
weights (``guess``); the suggested map is checked against the checkpoint before it is
returned, so it converts as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from fc2conv_cli.errors import InputError, shown
from fc2conv_cli.layer_map import parse_layer_map
from fc2conv_cli.layout import SPATIAL_AXES, Layout, WeightFormat
from fc2conv_cli.plan import build_plan
from fc2conv_cli.readers import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from fc2conv_cli.guess import LayoutGuess

__all__ = ["CheckpointSummary", "SuggestedMap", "TensorGroup", "suggest_map", "summarize"]


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
    """A layer map as commented YAML, with the evidence behind it."""

    text: str
    layers: tuple[str, ...]
    in_channels: int
    kernel: tuple[int, ...]
    layout_guess: LayoutGuess | None
    ambiguities: tuple[str, ...]


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


def suggest_map(checkpoint: Checkpoint, source_name: str) -> SuggestedMap:
    """Suggest a layer map; raises ``InputError`` when the checkpoint has no FC head.

    Weights with a zero-sized axis hold nothing to convert and are left out.
    """
    tensors = checkpoint.tensors
    weights = [t for t in tensors.values() if t.name.endswith(".weight") and 0 not in t.shape]
    fcs = [t for t in weights if len(t.shape) == 2]
    convs = [t for t in weights if 3 <= len(t.shape) <= 5]
    if not fcs:
        empty = [t for t in tensors.values() if len(t.shape) == 2 and t.name.endswith(".weight")]
        raise InputError(
            f"{source_name}: no FC weights (2-D '.weight' tensors) to convert"
            + "".join(f"; {shown(t.name)} {list(t.shape)} is empty" for t in empty[:3])
        )
    outs = {t.shape[0] for t in fcs}
    roots = [t for t in fcs if t.shape[1] not in outs]
    if not roots:
        raise InputError(f"{source_name}: the FC weights form a cycle of sizes; write the map")
    root = max(roots, key=lambda t: t.shape[1])  # the widest input: the flattened map
    chain = _chain(root, fcs)
    blank = [t.name for t in chain if not _prefix(t.name).strip()]
    if blank:
        raise InputError(
            f"{source_name}: FC weight {blank[0]!r} has a blank layer prefix, which a "
            "layer map cannot name; rename the tensor"
        )
    in_channels, kernel, ambiguities = _first_kernel(root, convs)
    guess = _guess(checkpoint, root, in_channels, kernel)
    layout = (
        guess.best.axes
        if guess and guess.best
        else Layout.parse("c" + SPATIAL_AXES[len(kernel)]).axes
    )
    text = _render(source_name, root, chain, in_channels, kernel, layout, guess, ambiguities, convs)
    layer_map = parse_layer_map(text, "suggested map")
    build_plan(tensors, layer_map)  # the suggestion must fit the checkpoint it came from
    return SuggestedMap(
        text, tuple(_prefix(t.name) for t in chain), in_channels, kernel, guess, ambiguities
    )


def _prefix(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _kind(tensors: list[TensorInfo]) -> str:
    weights = [t for t in tensors if t.name.endswith(".weight")]
    if any(3 <= len(t.shape) <= 5 for t in weights):
        return "conv"
    if any(len(t.shape) == 2 for t in weights):
        return "fc"
    return "other"


def _natural_key(name: str) -> list:
    """Sort ``classifier.10`` after ``classifier.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _chain(root: TensorInfo, fcs: list[TensorInfo]) -> list[TensorInfo]:
    """The root and every FC reachable through matching sizes, breadth first."""
    chain, frontier = [root], [root]
    while frontier:
        following = sorted(
            (t for t in fcs if t not in chain and any(t.shape[1] == f.shape[0] for f in frontier)),
            key=lambda t: _natural_key(t.name),
        )
        chain += following
        frontier = following
    return chain


def _first_kernel(
    root: TensorInfo, convs: list[TensorInfo]
) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
    """(in_channels, kernel, ambiguity notes) for the FC that reads the flattened map."""
    in_features = root.shape[1]
    if not convs:
        return in_features, (1, 1), (f"no conv weights: {root.name} is treated as 1x1",)
    # The conv that feeds the head. Checkpoint order is not network order (safetensors
    # sorts names), so prefer a conv whose channels leave a k x k map, then the widest
    # (the last conv of a classic CNN has the most channels), then the latest name.
    fitting = [c for c in convs if in_features % c.shape[0] == 0]
    if not fitting:
        return (
            in_features,
            (1,) * (len(convs[-1].shape) - 2),
            (
                f"no conv's out_channels divides in_features {in_features}; "
                f"{root.name} is treated as 1x1",
            ),
        )
    conv = max(
        fitting,
        key=lambda c: (
            _is_power(in_features // c.shape[0], len(c.shape) - 2),
            c.shape[0],
            _natural_key(c.name),
        ),
    )
    channels, ndim = conv.shape[0], len(conv.shape) - 2
    positions = in_features // channels
    if _is_power(positions, ndim):
        return channels, (round(positions ** (1 / ndim)),) * ndim, ()
    if ndim != 2:
        return (
            channels,
            (positions,) + (1,) * (ndim - 1),
            (f"{positions} positions per channel is not a {ndim}-D cube; check the kernel",),
        )
    pairs = [(h, positions // h) for h in range(1, positions + 1) if positions % h == 0]
    best = min(pairs, key=lambda hw: abs(hw[0] - hw[1]))
    listed = ", ".join(f"{h}x{w}" for h, w in pairs)
    return (
        channels,
        best,
        (
            f"{in_features} / {channels} channels = {positions} positions is not k x k; "
            f"candidates (h x w): {listed}; {best[0]}x{best[1]} chosen: check it",
        ),
    )


def _is_power(positions: int, ndim: int) -> bool:
    return round(positions ** (1 / ndim)) ** ndim == positions


def _guess(
    checkpoint: Checkpoint, root: TensorInfo, in_channels: int, kernel: tuple[int, ...]
) -> LayoutGuess | None:
    if math.prod(kernel) == 1:
        return None  # a 1x1 map has a single order
    from fc2conv_cli.guess import guess_layout

    return guess_layout(checkpoint.array(root.name), in_channels, kernel, WeightFormat.OUT_IN)


def _render(
    source: str,
    root: TensorInfo,
    chain: list[TensorInfo],
    in_channels: int,
    kernel: tuple[int, ...],
    layout: str,
    guess: LayoutGuess | None,
    ambiguities: tuple[str, ...],
    convs: list[TensorInfo],
) -> str:
    size = "x".join(map(str, kernel))
    feeder = next((c.name for c in reversed(convs) if c.shape[0] == in_channels), None)
    # Names go into comments through shown(): a line break in one must not end the comment.
    lines = [
        f"# Layer map suggested by `fc2conv inspect --suggest-map` for {shown(source)}.",
        f"# The first FC, {shown(root.name)} {list(root.shape)}, reads {in_channels} channels"
        + (f" (out_channels of {shown(feeder)})" if feeder else "")
        + f" x {size} = {root.shape[1]} inputs.",
    ]
    if guess is None:
        lines.append(f"# Layout: {layout}; a 1x1 map has only one flatten order.")
    elif guess.best is None:
        lines.append(
            f"# Layout: the weights cannot tell ({guess.reason}); {layout} is PyTorch's "
            "x.flatten(1) order: check how your model flattens."
        )
    else:
        lines.append(f"# Layout guessed from the weights: {guess.reason}.")
        if guess.twin:
            lines.append(
                f"# The map uses {layout}; if your model flattens as {guess.twin}, write that."
            )
    lines += [f"# Check: {shown(note)}" for note in ambiguities]
    lines += [
        "# Weights are read as torch nn.Linear (out_features, in_features): weight_format out_in.",
        "version: 1",
        f"layout: {_scalar(layout)}",
        "weight_format: out_in",
        "layers:",
    ]
    for index, fc in enumerate(chain):
        shape = f"{list(fc.shape)} -> conv {size if index == 0 else '1x1'}"
        lines.append(f"  - name: {_scalar(_prefix(fc.name))}  # {shape}")
        if index == 0:
            lines.append(f"    kernel: {_scalar(list(kernel))}")
            lines.append(f"    in_channels: {_scalar(in_channels)}")
    return "\n".join(lines) + "\n"


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
