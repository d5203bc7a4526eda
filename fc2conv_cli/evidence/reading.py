"""What the file itself says about the first FC's input: the common result and dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fc2conv_cli.layout import WeightFormat

if TYPE_CHECKING:
    from fc2conv_cli.readers import Checkpoint

__all__ = ["Reading", "read_map"]


@dataclass(frozen=True)
class Reading:
    """How the first FC reads its input, as far as a graph or config tells.

    ``source`` is ``graph`` (ONNX, TF.js graph model, Caffe net) or ``config`` (Keras);
    ``how`` is the phrase for a user ("read from the graph"). ``layout``, ``channels``
    and ``shape`` are None where the walk could not tell them (then ``problem`` says
    why, or the shape is left to the weights). ``pooled`` marks a map pooled to 1x1
    before the FC (global average pooling). ``nodes`` name the ops walked through,
    from the map to the FC; ``bias`` is the FC's bias tensor where the graph names it.
    """

    source: str
    how: str
    layout: str | None = None
    channels: int | None = None
    shape: tuple[int, ...] | None = None
    weight_format: WeightFormat | None = None
    nodes: tuple[str, ...] = ()
    pooled: bool = False
    problem: str | None = None
    bias: str | None = None

    @property
    def complete(self) -> bool:
        """True when layout, channels and shape are all read (confidence 1)."""
        return not self.problem and None not in (self.layout, self.channels, self.shape)


def read_map(
    checkpoint: Checkpoint, fc_weight: str, layer: str, net: dict[str, Any] | None = None
) -> Reading | None:
    """What ``checkpoint``'s graph or config (or ``net``, a Caffe prototxt's graph) says
    about the FC whose weight is ``fc_weight`` (layer name ``layer``); None when the file
    holds neither. Never raises for a graph it does not understand: ``problem`` says."""
    graph = checkpoint.graph
    if checkpoint.kind == "caffe" or net is not None:
        from fc2conv_cli.evidence.caffe_net import read_caffe

        if net is not None:
            return read_caffe(net, layer)
        return read_caffe(graph, layer, "read from the Caffe net") if graph else None
    if graph is None:
        return None
    if checkpoint.kind == "onnx":
        from fc2conv_cli.evidence.onnx_graph import read_onnx

        return read_onnx(graph, fc_weight, checkpoint)
    if checkpoint.kind == "tfjs":
        topology = graph.get("modelTopology") if isinstance(graph, dict) else None
        if graph.get("format") == "graph-model" and isinstance(topology, dict):
            from fc2conv_cli.evidence.tfjs_graph import read_tfjs_graph

            return read_tfjs_graph(topology, fc_weight, checkpoint)
        if isinstance(topology, dict):
            from fc2conv_cli.evidence.keras_config import read_keras

            return read_keras(topology.get("model_config", topology), layer, "TF.js")
        return None
    if checkpoint.kind == "keras":
        from fc2conv_cli.evidence.keras_config import read_keras

        return read_keras(graph, layer, "Keras")
    return None
