"""Read the first Dense layer's input from a Keras model config (``.keras``, full ``.h5``,
TF.js layers models).

The config lists the layers, each with its ``data_format``, and the model's input shape.
From the input, the map's shape is followed layer by layer (Conv, Pooling, ZeroPadding,
Cropping, Permute, Reshape, BatchNorm and other shape-keeping layers) to the ``Flatten``
before the Dense: a channels_last map flattens ``hwc``, a channels_first one ``chw``, and a
``Permute`` before it (Keras ports of Caffe and Torch nets) reorders the axes first.
"""

from __future__ import annotations

from typing import Any

from fc2conv_cli.evidence.axes import Axes, WalkProblem
from fc2conv_cli.evidence.reading import Reading
from fc2conv_cli.layout import SPATIAL_AXES, WeightFormat

__all__ = ["read_keras"]

_CONV = ("Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D",
         "DepthwiseConv1D", "DepthwiseConv2D", "Convolution1D", "Convolution2D",
         "Convolution3D")  # fmt: skip
_POOL = ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
         "AveragePooling2D", "AveragePooling3D", "MaxPool1D", "MaxPool2D", "MaxPool3D",
         "AvgPool1D", "AvgPool2D", "AvgPool3D")  # fmt: skip
_GLOBAL = ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
           "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
           "GlobalAvgPool2D", "GlobalMaxPool2D")  # fmt: skip
_KEEP = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU",
         "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
         "GaussianNoise", "GaussianDropout", "LayerNormalization", "Rescaling",
         "Normalization", "Lambda", "InputLayer", "ActivityRegularization", "Identity",
         "Add", "Multiply", "Average", "Maximum", "Minimum", "Subtract")  # fmt: skip


def read_keras(model: Any, layer: str, family: str) -> Reading:
    """The Dense ``layer``'s input, from a model config dict (``{"class_name", "config"}``)."""
    how = f"read from the {family} config"
    base: dict[str, Any] = {"weight_format": WeightFormat.IN_OUT}
    layers, problem = _layers(model)
    if problem:
        return Reading("config", how, problem=problem, **base)
    names = [_layer_name(entry) for entry in layers]
    if layer not in names:
        return Reading("config", how, problem=f"no layer {layer!r} in the config", **base)
    path, problem = _path_to(layers, names.index(layer))
    if problem:
        return Reading("config", how, problem=problem, **base)
    shape, fmt = _input_shape(model, layers, path)
    if shape is None:
        return Reading("config", how, problem="the config gives no input shape", **base)
    walked: list[str] = []
    try:
        axes, before, pooled = _walk(layers, path[:-1], shape, fmt, walked)
        layout = axes.layout()
    except WalkProblem as exc:
        return Reading("config", how, problem=str(exc), nodes=tuple(walked), **base)
    nodes = (*walked, f"{layers[path[-1]].get('class_name')} {layer}")
    channels, spatial = _channels_and_shape(before)
    if pooled and spatial is not None:
        spatial = (1,) * len(spatial)
    return Reading(
        "config", how, layout=layout, channels=channels, shape=spatial,
        nodes=nodes, pooled=pooled, **base,
    )  # fmt: skip


def _layers(model: Any) -> tuple[list[dict], str | None]:
    config = model.get("config") if isinstance(model, dict) else None
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return [e for e in config["layers"] if isinstance(e, dict)], None
    if isinstance(config, list):  # Keras 1 / early 2 Sequential: the list itself
        return [e for e in config if isinstance(e, dict)], None
    return [], "the config lists no layers"


def _layer_name(entry: dict) -> str | None:
    config = entry.get("config") or {}
    return entry.get("name") or config.get("name")


def _inbound(entry: dict) -> list[str] | None:
    """Names of the layers feeding ``entry`` (Keras 2 and 3 formats); None: a Sequential."""
    nodes = entry.get("inbound_nodes")
    if nodes is None:
        return None
    found: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            history = (value.get("config") or {}).get("keras_history")
            if value.get("class_name") == "__keras_tensor__" and history:
                found.append(history[0])
                return
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                found.append(value[0])  # Keras 2: [name, node_index, tensor_index, kwargs]
                return
            for item in value:
                visit(item)

    visit(nodes)
    return found


def _path_to(layers: list[dict], target: int) -> tuple[list[int], str | None]:
    """Indices of the layers from the input to ``target``, in order."""
    feeders = [_inbound(e) for e in layers]
    if all(f is None or f == [] for f in feeders):
        return list(range(target + 1)), None  # a Sequential: layers in order
    index = {_layer_name(e): i for i, e in enumerate(layers)}
    path, at = [target], target
    for _ in range(len(layers)):
        inbound = feeders[at] or []
        if not inbound:
            break
        kind = layers[at].get("class_name")
        if len(set(inbound)) > 1 and kind not in _KEEP:
            return [], f"{kind} {_layer_name(layers[at])!r} joins several inputs"
        if inbound[0] not in index:
            return [], f"layer {inbound[0]!r} is not in the config"
        at = index[inbound[0]]
        path.append(at)
    return list(reversed(path)), None


def _input_shape(model: dict, layers: list[dict], path: list[int]) -> tuple[list | None, str]:
    for i in path[:2]:
        config = layers[i].get("config") or {}
        for key in ("batch_shape", "batch_input_shape"):
            if isinstance(config.get(key), list):
                return list(config[key][1:]), config.get("data_format", "")
    return None, ""


def _letters(rank: int, fmt: str) -> str:
    spatial = SPATIAL_AXES[rank]
    return "n" + ("c" + spatial if fmt == "channels_first" else spatial + "c")


def _walk(
    layers: list[dict], path: list[int], shape: list, fmt: str, walked: list[str]
) -> tuple[Axes, Axes, bool]:
    """(axes reaching the Dense, the map's axes before it was flattened, pooled);
    ``shape`` excludes the batch."""
    fmt = fmt or _first_format(layers, path)
    rank = len(shape) - 1
    if rank not in SPATIAL_AXES or any(not isinstance(s, int) for s in shape):
        raise WalkProblem(f"the input shape {shape} is not a fixed 1-3-D image")
    axes, pooled = Axes.of_map(_letters(rank, fmt), (None, *shape)), False
    before = axes
    for i in path:
        entry = layers[i]
        kind, config = entry.get("class_name"), entry.get("config") or {}
        walked.append(f"{kind} {_layer_name(entry)}")
        if kind in _KEEP:
            continue
        if len(axes.labels) > 2:
            before = axes
        if kind == "Flatten":
            axes = _flatten(axes, config.get("data_format"))
        elif kind == "Permute":
            axes = axes.transpose([0, *config["dims"]])
        elif kind == "Reshape":
            axes = axes.reshape([-1, *config["target_shape"]])
        elif kind in _GLOBAL:
            axes, pooled = _global(axes, config), True
        elif kind in _CONV or kind in _POOL:
            axes = _sliding(axes, kind, config)
        elif kind in ("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D"):
            axes = _pad(axes, config.get("padding"), +1)
        elif kind in ("Cropping1D", "Cropping2D", "Cropping3D"):
            axes = _pad(axes, config.get("cropping"), -1)
        else:
            raise WalkProblem(f"the walk does not follow a {kind} layer ({_layer_name(entry)!r})")
    return axes, before, pooled


def _first_format(layers: list[dict], path: list[int]) -> str:
    for i in path:
        fmt = (layers[i].get("config") or {}).get("data_format")
        if fmt:
            return fmt
    return "channels_last"


def _spatial_index(axes: Axes) -> list[int]:
    return [i for i, label in enumerate(axes.labels) if label in "dhwl" and label]


def _check_format(axes: Axes, config: dict, kind: str) -> None:
    fmt = config.get("data_format")
    if not fmt:
        return
    channel_at = axes.labels.index("c") if "c" in axes.labels else None
    want = 1 if fmt == "channels_first" else len(axes.labels) - 1
    if channel_at != want:
        raise WalkProblem(
            f"{kind} {config.get('name')!r} says {fmt}, but the map's channels are at axis "
            f"{channel_at}: its data_format disagrees with the layers before it"
        )


def _sliding(axes: Axes, kind: str, config: dict) -> Axes:
    _check_format(axes, config, kind)
    spatial = _spatial_index(axes)
    rank = len(spatial)
    kernel = _per_axis(config.get("kernel_size") or config.get("pool_size") or 1, rank)
    strides = _per_axis(config.get("strides") or (kernel if kind in _POOL else 1), rank)
    dilation = _per_axis(config.get("dilation_rate") or 1, rank)
    padding = config.get("padding", "valid")
    sizes: list[Any] = list(axes.sizes)  # known where they are used: the walk checked
    for j, i in enumerate(spatial):
        size, span = sizes[i], (kernel[j] - 1) * dilation[j] + 1
        if padding == "same":
            sizes[i] = -(-size // strides[j])
        elif padding == "valid":
            sizes[i] = (size - span) // strides[j] + 1
        else:
            raise WalkProblem(f"{kind} {config.get('name')!r} has padding {padding!r}")
        if sizes[i] < 1:
            raise WalkProblem(f"{kind} {config.get('name')!r} leaves an empty map")
    if kind in _CONV and "filters" in config:
        sizes[axes.labels.index("c")] = int(config["filters"])
    elif kind in _CONV and "depth_multiplier" in config:
        c = axes.labels.index("c")
        sizes[c] = sizes[c] * int(config["depth_multiplier"])
    return Axes(axes.labels, tuple(sizes))


def _per_axis(value: Any, rank: int) -> list[int]:
    values = list(value) if isinstance(value, list | tuple) else [value] * rank
    if len(values) != rank:
        raise WalkProblem(f"a size {value} does not fit a {rank}-D map")
    return [int(v) for v in values]


def _pad(axes: Axes, amount: Any, sign: int) -> Axes:
    spatial = _spatial_index(axes)
    if isinstance(amount, int):
        amount = [amount] * len(spatial)
    sizes: list[Any] = list(axes.sizes)  # known where they are used: the walk checked
    for j, i in enumerate(spatial):
        part = amount[j] if j < len(amount) else 0
        total = sum(part) if isinstance(part, list | tuple) else 2 * int(part)
        sizes[i] = sizes[i] + sign * total
    return Axes(axes.labels, tuple(sizes))


def _global(axes: Axes, config: dict) -> Axes:
    c = axes.labels.index("c")
    keep = config.get("keepdims", False)
    if keep:
        sizes = [1 if i in _spatial_index(axes) else s for i, s in enumerate(axes.sizes)]
        return Axes(axes.labels, tuple(sizes))
    return Axes(("n", "c"), (None, axes.sizes[c]))


def _flatten(axes: Axes, fmt: str | None) -> Axes:
    """Keras' Flatten; with ``channels_first`` it first moves axis 1 to the end (to keep a
    channels_last model's weight order), as Keras does."""
    if fmt == "channels_first" and len(axes.labels) > 2:
        rest = list(range(2, len(axes.labels)))
        axes = axes.transpose([0, *rest, 1])
    return axes.flatten(1)


def _channels_and_shape(axes: Axes) -> tuple[int | None, tuple[int, ...] | None]:
    """Channels and spatial sizes (canonical order) of the map before it was flattened."""
    size: dict[str, Any] = dict(zip(axes.labels, axes.sizes, strict=True))
    letters = [label for label in axes.labels if label and label in "dhwl"]
    if "c" not in size or not letters:
        return None, None
    rank = len(letters)
    return int(size["c"]), tuple(int(size[a]) for a in SPATIAL_AXES[rank])
