"""Evidence for a suggested map: what a file's graph or config says, and its geometry.

``read_map`` asks the checkpoint's own graph (ONNX, TF.js graph models), config (Keras,
TF.js layers models) or net definition (Caffe, with a prototxt) how the first FC reads
its input; ``geometry`` enumerates the map shapes the conv backbone allows. Pure Python
plus numpy for small shape tensors; never torch.
"""

from __future__ import annotations

from fc2conv_cli.evidence.geometry import ConvInfo, map_shapes, orientation
from fc2conv_cli.evidence.reading import Reading, read_map

__all__ = ["ConvInfo", "Reading", "map_shapes", "orientation", "read_map"]
