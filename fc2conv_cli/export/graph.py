"""Rewrite a traced model into a fully convolutional one, and read its geometry.

``torch.fx`` traces the model; the flatten feeding the map's first FC is found whatever
its form (``torch.flatten``, ``x.view(x.size(0), -1)``, ``nn.Flatten``, ``permute`` then
``reshape``), the layout it computes is derived from the shapes it moves, and the map's
layout must agree. Flatten + Linear becomes a k x k conv with fc2conv's own converted
weights (the plan's ``Conversion``, applied by ``Layout.fc_rows_to_conv``), later Linears
become 1x1 convs; everything else stays as traced.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fc2conv_cli.export.model import ModelError
from fc2conv_cli.layout import SPATIAL_AXES, WeightFormat
from fc2conv_cli.plan import LayerPlan
from fc2conv_cli.readers import Checkpoint

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["Geometry", "Head", "descendants", "find_head", "geometry", "rewrite", "trace"]

_SHAPE = "fc2conv_shape"  # node.meta key: the node's output shape at --input-shape
_LAYOUT_METHODS = {"permute", "transpose", "contiguous", "flatten", "view", "reshape"}
_PASSTHROUGH_MODULES = (
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "Identity",
)
# Module classes and functions, lower-cased: AdaptiveAvgPool2d, adaptive_avg_pool2d, ...
_ADAPTIVE_POOLS = ("adaptiveavgpool", "adaptivemaxpool", "adaptive_avg_pool", "adaptive_max_pool")
_MATMULS = {"linear", "matmul", "mm", "addmm", "bmm", "einsum", "__matmul__"}


@dataclass(frozen=True)
class Geometry:
    """Where each score-map position looks, per spatial axis, in input pixels.

    ``stride``: pixels between neighbouring positions; ``receptive_field``: pixels one
    position sees; ``offset``: the centre of position 0's field (pixel centres are the
    integers 0, 1, ...). ``padded``: some conv or pool of the backbone pads its input.
    """

    stride: tuple[int, ...]
    receptive_field: tuple[int, ...]
    offset: tuple[float, ...]
    padded: bool
    feature_stride: tuple[int, ...]
    feature_receptive_field: tuple[int, ...]


@dataclass
class Head:
    """What the graph says about the map's head."""

    feature: str  # the node giving the backbone's feature map (after a removed pool)
    feature_shape: tuple[int, ...]  # at --input-shape, (N, C, *spatial)
    layout: str  # the flatten order the graph computes
    flatten_nodes: tuple[str, ...]
    first: tuple[str, ...]  # Linear modules fed by the flatten
    later: tuple[str, ...]
    pool: str | None = None  # a removed adaptive pool, described
    notes: list[str] = field(default_factory=list)


def trace(model: torch.nn.Module, label: str) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``; one line naming the code that cannot be traced."""
    from torch import fx

    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        where = _user_frame(exc)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{label}: cannot be traced by torch.fx{where}: {message}") from None


def _user_frame(exc: BaseException) -> str:
    """`` at FILE:LINE in FUNC`` for the innermost frame outside torch, if any."""
    import torch

    torch_dir = str(Path(torch.__file__).parent)
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
    ]
    frames = [f for f in frames if not f.filename.startswith(str(Path(__file__).parent))]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def propagate(gm: fx.GraphModule, example: torch.Tensor, label: str) -> None:
    """Record every node's output shape at ``example``; a failure names its node."""
    import torch
    from torch import fx

    class Recording(fx.Interpreter):
        current: Any = None

        def run_node(self, n: fx.Node) -> Any:
            self.current = n
            result = super().run_node(n)
            n.meta[_SHAPE] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
            return result

    interpreter = Recording(gm)
    try:
        with torch.no_grad():
            interpreter.run(example)
    except Exception as exc:
        node = interpreter.current
        where = f" at node {node.name} ({node.op} {node.target})" if node is not None else ""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{label}: fails on an input of shape {list(example.shape)}{where}: {text}"
        ) from None


def _shape(node: Any) -> tuple[int, ...] | None:
    return getattr(node, "meta", {}).get(_SHAPE)


def _kind(node: fx.Node, modules: dict[str, Any]) -> str:
    """A short name for what a node does: module class, function or method name."""
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _is_layout_op(node: fx.Node, modules: dict[str, Any]) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in {
            "flatten",
            "permute",
            "reshape",
            "transpose",
        }
    return node.op == "call_module" and type(modules[str(node.target)]).__name__ == "Flatten"


def _is_passthrough(node: fx.Node, modules: dict[str, Any]) -> bool:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__ in _PASSTHROUGH_MODULES
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "dropout"


def find_head(gm: fx.GraphModule, layers: tuple[LayerPlan, ...], ndim: int, label: str) -> Head:
    """Find the flatten before the map's first FC, derive its layout, check the map fits."""
    import torch

    modules = dict(gm.named_modules())
    calls = {}
    for layer in layers:
        name = layer.rule.name
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
            found = "not in the model" if module is None else f"a {type(module).__name__}"
            raise ModelError(
                f"map layer {name!r}: {found}, expected an nn.Linear (the model's Linear "
                f"modules: {', '.join(linears) or 'none'})"
            )
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1:
            raise ModelError(
                f"map layer {name!r}: called {len(nodes)} times in forward, expected once"
            )
        calls[name] = nodes[0]
    first_call = calls[layers[0].rule.name]
    chain, node = [], first_call.args[0]
    while isinstance(node, torch.fx.Node) and (
        _is_layout_op(node, modules) or _is_passthrough(node, modules)
    ):
        chain.append(node)
        node = node.args[0]
    feature = node
    layout_nodes = [n for n in reversed(chain) if _is_layout_op(n, modules)]
    shape = _shape(feature)
    if not layout_nodes or shape is None or len(shape) != ndim + 2:
        got = "no tensor" if shape is None else f"shape {list(shape)}"
        raise ModelError(
            f"map layer {layers[0].rule.name!r}: its input does not come from flattening a "
            f"{ndim}-D feature map (node {feature.name} gives {got})"
        )
    layout = _derive_layout(feature, layout_nodes, ndim, modules)
    flat = layout_nodes[-1]
    head = Head(
        feature.name,
        shape,
        layout,
        tuple(n.name for n in layout_nodes),
        (),
        (),
    )
    _remove_pool(gm, head, feature, modules)
    first, later = _classify_linears(gm, flat, calls, modules, chain)
    head.first, head.later = first, later
    return head


def _derive_layout(
    feature: fx.Node, nodes: list[fx.Node], ndim: int, modules: dict[str, Any]
) -> str:
    """Follow the axes of ``feature`` (N, C, *spatial) through permutes and reshapes."""
    letters = "c" + SPATIAL_AXES[ndim]
    dims: list[tuple[str, ...]] = [("n",), *((a,) for a in letters)]
    sizes = list(_shape(feature) or ())
    for node in nodes:
        out = list(_shape(node) or ())
        kind = _kind(node, modules)
        if kind in {"permute"}:
            perm = _perm_args(node)
            dims = [dims[p] for p in perm]
        elif kind == "transpose":
            a, b = (int(v) % len(dims) for v in cast(Any, node.args)[1:3])
            dims[a], dims[b] = dims[b], dims[a]
        elif kind == "contiguous":
            pass
        else:  # flatten, view, reshape, nn.Flatten: merge neighbouring axes
            dims = _regroup(dims, sizes, out, node)
        sizes = out
    if len(dims) != 2 or dims[0] != ("n",):
        raise ModelError(
            f"node {nodes[-1].name}: the flatten before the first FC gives shape {sizes}, "
            "expected (batch, features)"
        )
    return "".join(dims[1])


def _perm_args(node: fx.Node) -> list[int]:
    args: Any = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    if not args:
        args = node.kwargs.get("dims", ())
    return [int(a) for a in args]


def _regroup(
    dims: list[tuple[str, ...]], sizes: list[int], out: list[int], node: fx.Node
) -> list[tuple[str, ...]]:
    """Axes after a reshape that only merges neighbouring axes (size-1 axes go anywhere)."""
    groups: list[tuple[str, ...]] = []
    index = 0
    for size in out:
        group: tuple[str, ...] = ()
        product = 1
        while index < len(dims) and (
            product < size or (product == size and sizes[index] == 1 and size != 1)
        ):
            group += dims[index]
            product *= sizes[index]
            index += 1
        if product != size:
            raise ModelError(
                f"node {node.name}: reshapes {sizes} to {out}, which splits an axis; "
                "fc2conv follows only flattens, permutes and merging reshapes"
            )
        groups.append(group)
    while index < len(dims) and sizes[index] == 1:
        groups[-1] += dims[index]
        index += 1
    return groups


def _remove_pool(gm: fx.GraphModule, head: Head, feature: fx.Node, modules: dict[str, Any]) -> None:
    """An adaptive pool before the flatten: the identity at --input-shape, or refused."""
    if feature.op == "call_module":
        kind = type(modules[str(feature.target)]).__name__
    elif feature.op == "call_function":
        kind = getattr(feature.target, "__name__", "")
    else:
        return
    if not kind.lower().startswith(_ADAPTIVE_POOLS):
        return
    source: Any = feature.args[0]
    before, after = _shape(source), _shape(feature)
    where = f"{feature.target if feature.op == 'call_module' else feature.name} ({kind})"
    if before != after:
        raise ModelError(
            f"{where} maps the feature map {_size(before)} to {_size(after)} at --input-shape: "
            "it would force that size on every input, so the model cannot run densely; export "
            f"at an --input-shape whose feature map is already {_size(after)}"
        )
    head.pool = f"{where}: the identity at --input-shape ({_size(before)} in and out), removed"
    head.feature = source.name
    head.feature_shape = cast("tuple[int, ...]", before)  # equal to after, a known shape


def _size(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape[2:])) if shape else "?"


def _classify_linears(
    gm: fx.GraphModule,
    flat: fx.Node,
    calls: dict[str, fx.Node],
    modules: dict[str, Any],
    chain: list[fx.Node],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Linears fed by the flatten (through dropout) and those later in the head."""
    import torch

    first, pending = [], list(flat.users)
    seen = set()
    while pending:
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "call_module" and user.target in calls:
            first.append(user.target)
        elif _is_passthrough(user, modules):
            pending.extend(user.users)
        else:
            raise ModelError(
                f"node {user.name} ({_kind(user, modules)}) uses the flattened features but is "
                "not a Linear of the map"
            )
    downstream = descendants(flat)
    later = []
    for node in gm.graph.nodes:
        if node not in downstream or node.target in first:
            continue
        if node.op == "call_module" and isinstance(modules[str(node.target)], torch.nn.Linear):
            if node.target not in calls:
                raise ModelError(
                    f"module {node.target!r} (nn.Linear) follows the flatten but the map does "
                    "not name it"
                )
            later.append(node.target)
        elif node.op in ("call_function", "call_method") and _kind(node, modules) in _MATMULS:
            raise ModelError(
                f"node {node.name} ({_kind(node, modules)}) multiplies the flattened features "
                "by a matrix outside any nn.Linear; fc2conv converts nn.Linear modules only"
            )
    missing = [n for n in calls if n not in first and n not in later]
    if missing:
        raise ModelError(f"map layer {missing[0]!r}: not part of the head after the flatten")
    return tuple(first), tuple(later)


def descendants(node: fx.Node) -> set:
    """Every node that uses ``node``'s value, directly or through others."""
    found, pending = set(), list(node.users)
    while pending:
        item = pending.pop()
        if item not in found:
            found.add(item)
            pending.extend(item.users)
    return found


def rewrite(
    gm: fx.GraphModule,
    head: Head,
    layers: tuple[LayerPlan, ...],
    checkpoint: Checkpoint,
) -> fx.GraphModule:
    """The dense model: flatten (and a removed pool) gone, the map's Linears as convs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    feature = nodes[head.feature]
    spatial = head.feature_shape[2:]
    by_name = {layer.rule.name: layer for layer in layers}
    for name in head.first:
        layer = by_name[name]
        _check_kernel(layer, head.feature_shape[1], spatial)
    for name in head.later:
        layer = by_name[name]
        if any(k != 1 for k in layer.rule.kernel):
            raise ModelError(
                f"map layer {name!r}: kernel {list(layer.rule.kernel)}, but it follows another "
                "FC of the head, so it becomes a 1x1 conv: give it kernel [1, 1]"
            )
    flat = nodes[head.flatten_nodes[-1]]
    flat.replace_all_uses_with(feature)
    for name in (*head.first, *head.later):
        _swap_linear(gm, name, by_name[name], checkpoint, len(spatial))
    _swap_batchnorm1d(gm, feature)
    _swap_max_pool1d(gm, head)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _check_kernel(layer: LayerPlan, channels: int, spatial: tuple[int, ...]) -> None:
    conversion = layer.conversion
    if tuple(conversion.kernel) != tuple(spatial) or conversion.in_channels != channels:
        raise ModelError(
            f"map layer {layer.rule.name!r}: kernel {list(conversion.kernel)} with in_channels "
            f"{conversion.in_channels}, but the graph flattens a {channels} x "
            f"{'x'.join(map(str, spatial))} feature map at --input-shape"
        )


def _swap_linear(
    gm: fx.GraphModule, name: str, layer: LayerPlan, checkpoint: Checkpoint, ndim: int
) -> None:
    """Replace module ``name`` by the conv the plan converts it into."""
    import torch

    linear = gm.get_submodule(name)
    conversion = layer.conversion
    if conversion.weight_format is not WeightFormat.OUT_IN:
        raise ModelError(
            f"map layer {name!r}: weight_format {conversion.weight_format.value}, but it is a "
            "torch nn.Linear, whose weight is out_in"
        )
    if layer.operations or conversion.direction != "fc_to_conv" or conversion.fold_spatial:
        raise ModelError(
            f"map layer {name!r}: export rewrites plain FC -> conv layers; this map also asks "
            f"for {', '.join(layer.operations) or 'another direction'}: convert the "
            "checkpoint first, then export without those keys"
        )
    rows = checkpoint.array(layer.weight.source_name)
    filters = conversion.layout.fc_rows_to_conv(rows, conversion.in_channels, conversion.kernel)
    conv_type = getattr(torch.nn, f"Conv{ndim}d")
    conv = conv_type(
        conversion.in_channels,
        filters.shape[0],
        tuple(conversion.kernel),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(_as_torch(filters))
        if linear.bias is not None:
            if layer.bias is None:
                raise ModelError(
                    f"map layer {name!r}: the model's Linear has a bias the plan lacks"
                )
            conv.bias.copy_(_as_torch(checkpoint.array(layer.bias.source_name)))
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, conv)


def _as_torch(array: Any) -> torch.Tensor:
    """A numpy array as a torch tensor, in one contiguous copy; bfloat16 and float8 (from
    ml_dtypes) widened to float32 exactly, and cast back by ``copy_``."""
    import numpy as np
    import torch

    if array.dtype not in (np.float16, np.float32, np.float64):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def _swap_batchnorm1d(gm: fx.GraphModule, feature: fx.Node) -> None:
    """A BatchNorm1d in the head normalizes channels: as a BatchNorm2d it does so densely."""
    import torch

    for node in descendants(feature):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) is torch.nn.BatchNorm1d:
            rank = len(_shape(feature) or ()) - 2
            dense = getattr(torch.nn, f"BatchNorm{max(rank, 1)}d")(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            ).eval()
            dense.load_state_dict(module.state_dict())
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, dense)


def _swap_max_pool1d(gm: fx.GraphModule, head: Head) -> None:
    """``nn.MaxPool1d`` as the same max over a one-row 2-D map.

    ``torch.export`` specializes ``max_pool1d`` to the example's length (torch 2.13), so
    a dense 1-D model would accept one length only; ``max_pool2d`` stays dynamic.
    """
    import torch

    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is torch.nn.MaxPool1d:
            pool = gm.get_submodule(node.target)
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, _MaxPool1dAs2d(pool))
            head.notes.append(
                f"{node.target} (MaxPool1d) runs as max_pool2d over a one-row map: torch.export "
                "fixes max_pool1d's length"
            )


def _max_pool1d_as_2d():
    import torch

    class MaxPool1dAs2d(torch.nn.Module):
        """``max_pool1d`` computed by ``max_pool2d`` on ``(N, C, 1, L)``: the same maxima."""

        def __init__(self, pool: torch.nn.MaxPool1d) -> None:
            super().__init__()
            one = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
            self.kernel = (1, one(pool.kernel_size))
            self.stride = (1, one(pool.stride if pool.stride is not None else pool.kernel_size))
            self.padding = (0, one(pool.padding))
            self.dilation = (1, one(pool.dilation))
            self.ceil_mode = pool.ceil_mode

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.max_pool2d(
                x.unsqueeze(-2),
                self.kernel,
                self.stride,
                self.padding,
                self.dilation,
                self.ceil_mode,
            )
            return y.squeeze(-2)

    return MaxPool1dAs2d


def _MaxPool1dAs2d(pool):  # builds the module class lazily: torch is optional
    return _max_pool1d_as_2d()(pool)


def geometry(
    gm: fx.GraphModule, head: Head, kernel: tuple[int, ...], sizes: tuple[tuple[int, ...], ...]
) -> tuple[Geometry, list[tuple[int, ...]]]:
    """Stride, receptive field and offset of the score map, from the backbone's nodes.

    Also the score map's size the geometry predicts for each input size of ``sizes``.
    """
    ndim = len(kernel)
    modules = dict(gm.named_modules())
    # node -> (jump, receptive field, start, map size for each of ``sizes``)
    geo: dict[Any, tuple] = {}
    padded = False
    nodes = {n.name: n for n in gm.graph.nodes}
    target = nodes[head.feature]
    needed = _ancestors(target) | {target}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            geo[node] = ((1,) * ndim, (1,) * ndim, (0.0,) * ndim, tuple(sizes))
            continue
        inputs = [a for a in node.all_input_nodes if a in geo]
        if not inputs:
            continue
        window = _window(node, modules, ndim)
        if window is not None:
            k, s, p, d, ceil = window
            padded = padded or any(v > 0 for v in p)
            jump, rf, start, before = geo[inputs[0]]
            k_eff = tuple(d_ * (k_ - 1) + 1 for k_, d_ in zip(k, d, strict=True))
            geo[node] = (
                tuple(j * s_ for j, s_ in zip(jump, s, strict=True)),
                tuple(r + (ke - 1) * j for r, ke, j in zip(rf, k_eff, jump, strict=True)),
                tuple(
                    st + ((ke - 1) / 2 - p_) * j
                    for st, ke, p_, j in zip(start, k_eff, p, jump, strict=True)
                ),
                tuple(_out_size(size, k_eff, s, p, ceil) for size in before),
            )
            continue
        spatial = [i for i in inputs if _spatial(i, ndim) is not None]
        out = _spatial(node, ndim)
        if out is None and node is not target:
            continue  # sizes and other non-map values
        if not spatial or any(_spatial(i, ndim) != out for i in spatial):
            raise ModelError(
                f"node {node.name} ({_kind(node, modules)}): cannot follow the stride and "
                "receptive field through it (it changes the map's size in a way fc2conv "
                "does not know)"
            )
        if len({geo[i][0] for i in spatial}) != 1:
            raise ModelError(f"node {node.name}: joins branches with different strides")
        geo[node] = max((geo[i] for i in spatial), key=lambda g: g[1])
    jump, rf, start, feature_sizes = geo[target]
    found = Geometry(
        stride=jump,
        receptive_field=tuple(r + (k - 1) * j for r, k, j in zip(rf, kernel, jump, strict=True)),
        offset=tuple(st + (k - 1) / 2 * j for st, k, j in zip(start, kernel, jump, strict=True)),
        padded=padded,
        feature_stride=jump,
        feature_receptive_field=rf,
    )
    scores = [tuple(f - k + 1 for f, k in zip(size, kernel, strict=True)) for size in feature_sizes]
    return found, scores


def _out_size(size, k_eff, stride, padding, ceil) -> tuple[int, ...]:
    """A conv's or pool's output size, as torch computes it (``ceil_mode`` included)."""
    out = []
    for n, k, s, p in zip(size, k_eff, stride, padding, strict=True):
        span = n + 2 * p - k
        steps = -(-span // s) if ceil else span // s
        if ceil and steps * s >= n + p:  # the last window must start inside the input
            steps -= 1
        out.append(steps + 1)
    return tuple(out)


def _spatial(node: Any, ndim: int) -> tuple[int, ...] | None:
    shape = _shape(node)
    return tuple(shape[2:]) if shape is not None and len(shape) == ndim + 2 else None


def _ancestors(node: fx.Node) -> set:
    found, pending = set(), list(node.all_input_nodes)
    while pending:
        item = pending.pop()
        if item not in found:
            found.add(item)
            pending.extend(item.all_input_nodes)
    return found


def _window(node: fx.Node, modules: dict[str, Any], ndim: int):
    """(kernel, stride, padding, dilation) of a conv or pool node, else None."""
    import torch

    def tup(value: Any, default: int) -> tuple[int, ...]:
        if value is None:
            value = default
        return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * ndim

    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            k = tup(module.kernel_size, 1)
            d = tup(module.dilation, 1)
            if isinstance(module.padding, str):
                p = (
                    (0,) * ndim
                    if module.padding == "valid"
                    else tuple((d_ * (k_ - 1)) // 2 for k_, d_ in zip(k, d, strict=True))
                )
            else:
                p = tup(module.padding, 0)
            return k, tup(module.stride, 1), p, d, False
        if isinstance(
            module, (torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd)
        ):
            k = tup(module.kernel_size, 1)
            stride = module.stride if module.stride not in (None, ()) else module.kernel_size
            dilation = tup(getattr(module, "dilation", 1), 1)
            ceil = bool(getattr(module, "ceil_mode", False))
            return k, tup(stride, 1), tup(module.padding, 0), dilation, ceil
        return None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name.startswith(("max_pool", "avg_pool")) or name in {"conv1d", "conv2d", "conv3d"}:
            normalized = node.normalized_arguments(
                cast(Any, node.graph.owning_module), normalize_to_only_use_kwargs=True
            )
            if normalized is None:
                return None
            kw = normalized.kwargs
            if name.startswith("conv"):
                weight_shape = cast("tuple[int, ...]", _shape(kw["weight"]))
                k = tuple(weight_shape[2:])
            else:
                k = tup(kw.get("kernel_size"), 1)
            stride = kw.get("stride") or (k if not name.startswith("conv") else 1)
            padding = kw.get("padding", 0)
            if isinstance(padding, str):
                padding = 0 if padding == "valid" else [(kk - 1) // 2 for kk in k]
            ceil = bool(kw.get("ceil_mode", False))
            return k, tup(stride, 1), tup(padding, 0), tup(kw.get("dilation", 1), 1), ceil
    return None
