"""The Caffe reader, judged by OpenCV's Caffe importer (``cv2.dnn.readNetFromCaffe``).

Every caffemodel is built with protobuf from the shipped ``caffe.proto``: a small net
Input -> Convolution -> ReLU -> Pooling -> InnerProduct -> ReLU -> InnerProduct, as V2
(``layer``) and V1 (``layers``, legacy 4-D blob shapes, enum types) files, with float
(``data``), double (``double_data``) and half (``raw_data`` FLOAT16) blobs, and with
``inner_product_param.transpose``. OpenCV runs each file (a float twin where it cannot:
it reads no ``double_data`` and ignores ``transpose``) and gives the feature map the
converted conv head is fed, and the FC outputs it must reproduce.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import caffe, caffe_schema, open_checkpoint

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")
from google.protobuf import text_format  # noqa: E402

S = caffe_schema.messages()
ROOT = Path(__file__).resolve().parent.parent
IMAGE = (1, 3, 8, 8)  # native input: conv1 (pad 1) keeps 8x8, pool1 halves it
FEATURE = (4, 4, 4)  # pool1's output (c, h, w): fc1's input, flattened chw
LARGE_IMAGE = (1, 3, 14, 18)  # pool1 -> 7 x 9: fc1 as a 4x4 conv has 4 x 6 positions
NAMES = ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
NP_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}
MAP = """\
version: 1
layout: chw
{weight_format}layers:
  - name: fc1
    kernel: [4, 4]
    in_channels: 4
  - name: fc2
"""


@dataclass
class Built:
    """A caffemodel, its deploy prototxt, and the arrays it holds (as stored)."""

    model: Path
    prototxt: Path
    arrays: dict[str, np.ndarray]
    version: str
    transpose: bool


def _arrays(seed: int, dtype: str, transpose: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1.weight": (4, 3, 3, 3),
        "conv1.bias": (4,),
        "fc1.weight": (10, 64),
        "fc1.bias": (10,),
        "fc2.weight": (5, 10),
        "fc2.bias": (5,),
    }
    arrays = {}
    for name, shape in shapes.items():
        value = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if transpose and name.startswith("fc") and name.endswith("weight"):
            value = np.ascontiguousarray(value.T)  # Caffe's transpose: stored (in, out)
        arrays[name] = value.astype(NP_DTYPES[dtype])
    return arrays


def _fill_blob(blob, array: np.ndarray, legacy: bool) -> None:
    if legacy:  # (num, channels, height, width), the shape padded with leading 1s
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
    else:
        blob.shape.dim.extend(array.shape)
    if array.dtype == np.float32:
        blob.data.extend(array.ravel().tolist())
    elif array.dtype == np.float64:
        blob.double_data.extend(array.ravel().tolist())
    else:  # NVIDIA Caffe's half blobs, as OpenCV's importer reads them
        blob.raw_data_type = S.FLOAT16
        blob.raw_data = array.astype("<f2").tobytes()


def _net_v2(arrays: dict[str, np.ndarray], transpose: bool, image=IMAGE, head: bool = True):
    net = S.NetParameter(name="tiny")
    data = net.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add().dim.extend(image)
    conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 4
    conv.convolution_param.kernel_size.append(3)
    conv.convolution_param.pad.append(1)
    net.layer.add(name="relu1", type="ReLU", bottom=["conv1"], top=["conv1"])
    pool = net.layer.add(name="pool1", type="Pooling", bottom=["conv1"], top=["pool1"])
    pool.pooling_param.pool = S.PoolingParameter.MAX
    pool.pooling_param.kernel_size = 2
    pool.pooling_param.stride = 2
    if head:
        for name, bottom, out in (("fc1", "pool1", 10), ("fc2", "relu2", 5)):
            fc = net.layer.add(name=name, type="InnerProduct", bottom=[bottom], top=[name])
            fc.inner_product_param.num_output = out
            fc.inner_product_param.transpose = transpose
            if name == "fc1":
                net.layer.add(name="relu2", type="ReLU", bottom=["fc1"], top=["relu2"])
    for layer in net.layer:
        for suffix in ("weight", "bias"):
            if f"{layer.name}.{suffix}" in arrays:
                _fill_blob(layer.blobs.add(), arrays[f"{layer.name}.{suffix}"], legacy=False)
    return net


def _net_v1(arrays: dict[str, np.ndarray], image=IMAGE, head: bool = True):
    V1 = S.V1LayerParameter
    net = S.NetParameter(name="tiny", input=["data"], input_dim=image)
    conv = net.layers.add(name="conv1", type=V1.CONVOLUTION, bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 4
    conv.convolution_param.kernel_size.append(3)
    conv.convolution_param.pad.append(1)
    net.layers.add(name="relu1", type=V1.RELU, bottom=["conv1"], top=["conv1"])
    pool = net.layers.add(name="pool1", type=V1.POOLING, bottom=["conv1"], top=["pool1"])
    pool.pooling_param.pool = S.PoolingParameter.MAX
    pool.pooling_param.kernel_size = 2
    pool.pooling_param.stride = 2
    if head:
        for name, bottom, out in (("fc1", "pool1", 10), ("fc2", "relu2", 5)):
            fc = net.layers.add(name=name, type=V1.INNER_PRODUCT, bottom=[bottom], top=[name])
            fc.inner_product_param.num_output = out
            if name == "fc1":
                net.layers.add(name="relu2", type=V1.RELU, bottom=["fc1"], top=["relu2"])
    for layer in net.layers:
        for suffix in ("weight", "bias"):
            if f"{layer.name}.{suffix}" in arrays:
                _fill_blob(layer.blobs.add(), arrays[f"{layer.name}.{suffix}"], legacy=True)
    return net


def _without_blobs(net):
    bare = type(net)()
    bare.CopyFrom(net)
    for layer in (*bare.layer, *bare.layers):
        del layer.blobs[:]
    return bare


def _build(
    folder: Path, version: str = "V2", dtype: str = "F32", transpose: bool = False, seed: int = 0
) -> Built:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(seed, dtype, transpose)
    net = _net_v2(arrays, transpose) if version == "V2" else _net_v1(arrays)
    model, prototxt = folder / "tiny.caffemodel", folder / "tiny.prototxt"
    model.write_bytes(net.SerializeToString())
    prototxt.write_text(text_format.MessageToString(_without_blobs(net)))
    return Built(model, prototxt, arrays, version, transpose)


def _opencv_twin(built: Built, folder: Path) -> Built:
    """What OpenCV can run: float32 ``data``, and weights (out, in) without ``transpose``."""
    arrays = {n: a.astype(np.float32) for n, a in built.arrays.items()}
    if built.transpose:
        arrays = {
            n: np.ascontiguousarray(a.T) if n.startswith("fc") and a.ndim == 2 else a
            for n, a in arrays.items()
        }
    net = _net_v2(arrays, False) if built.version == "V2" else _net_v1(arrays)
    folder.mkdir(exist_ok=True)
    model, prototxt = folder / "twin.caffemodel", folder / "twin.prototxt"
    model.write_bytes(net.SerializeToString())
    prototxt.write_text(text_format.MessageToString(_without_blobs(net)))
    return Built(model, prototxt, arrays, built.version, False)


def _opencv(built: Built, image: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(built.prototxt), str(built.model))
    net.setInput(image)
    return [np.asarray(x, np.float64) for x in net.forward(outputs)]


def _opencv_features(built: Built, image: np.ndarray) -> np.ndarray:
    """pool1 of a net without the head (its deploy text cut there), on any input size."""
    arrays = {n: a for n, a in built.arrays.items() if n.startswith("conv")}
    net = (
        _net_v2(arrays, False, image.shape, head=False)
        if built.version == "V2"
        else _net_v1(arrays, image.shape, head=False)
    )
    prototxt = built.model.with_name(f"features_{image.shape[2]}x{image.shape[3]}.prototxt")
    prototxt.write_text(text_format.MessageToString(_without_blobs(net)))
    cut = Built(built.model, prototxt, arrays, built.version, False)
    return _opencv(cut, image, ["pool1"])[0]


def _head(converted: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """The converted head: conv fc1, ReLU, conv fc2, in float64."""
    t = {n: torch.from_numpy(a.astype(np.float64)) for n, a in converted.items()}
    x = torch.nn.functional.conv2d(torch.from_numpy(features), t["fc1.weight"], t["fc1.bias"])
    x = torch.nn.functional.conv2d(torch.relu(x), t["fc2.weight"], t["fc2.bias"])
    return x.numpy()


def _fc(arrays: dict[str, np.ndarray], x: np.ndarray, transpose: bool) -> np.ndarray:
    """The FC head by Caffe's definition: y = W x + b, or y = x W + b under ``transpose``."""
    w1, b1, w2, b2 = (arrays[n].astype(np.float64) for n in NAMES[2:])
    if transpose:
        return np.maximum(x @ w1 + b1, 0) @ w2 + b2
    return np.maximum(x @ w1.T + b1, 0) @ w2.T + b2


def _convert(
    run_cli, built: Built, folder: Path, layer_map_text: str = MAP.format(weight_format="")
):
    """``fc2conv convert`` with a map; the converted tensors, the map and output, the JSON."""
    layer_map = folder / "map.yaml"
    layer_map.write_text(layer_map_text)
    output, report = folder / "out.safetensors", folder / "report.json"
    outcome = run_cli("convert", built.model, "--map", layer_map, "-o", output, "--json", report)
    assert outcome.code == 0, outcome.stderr
    return load_file(output), layer_map, output, json.loads(report.read_text())


VARIANTS = [("V2", "F32", False), ("V2", "F64", False), ("V2", "F16", False), ("V1", "F32", False)]
VARIANTS += [("V1", "F16", False), ("V2", "F32", True), ("V2", "F16", True)]


# -- reader level --------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "dtype", "transpose"), VARIANTS)
def test_names_shapes_dtypes_and_bytes(tmp_path, version, dtype, transpose):
    built = _build(tmp_path, version, dtype, transpose)
    with open_checkpoint(built.model) as checkpoint:
        assert checkpoint.kind == "caffe"
        assert list(checkpoint.tensors) == NAMES
        for name, array in built.arrays.items():
            info = checkpoint.tensors[name]
            assert (info.dtype, info.shape) == (dtype, array.shape), name
            little_endian = array.astype(array.dtype.newbyteorder("<"))
            assert bytes(checkpoint.raw(name)) == little_endian.tobytes()
            assert checkpoint.array(name).dtype == array.dtype
        stored = WeightFormat.IN_OUT if transpose else WeightFormat.OUT_IN
        assert checkpoint.tensors["fc1.weight"].weight_format is stored
        assert checkpoint.tensors["fc2.weight"].weight_format is stored
        assert checkpoint.tensors["conv1.weight"].weight_format is None
        assert checkpoint.weight_format is WeightFormat.OUT_IN
        # The values are views of the mapped file, not copies.
        assert isinstance(checkpoint.raw("fc1.weight").obj, mmap.mmap)


def test_v1_legacy_shapes_are_squeezed_with_a_note(tmp_path):
    built = _build(tmp_path, "V1")
    with open_checkpoint(built.model) as checkpoint:
        note = " ".join(checkpoint.notes)
    assert "squeezed legacy 4-D blob shapes" in note
    assert "fc1.weight (1, 1, 10, 64) -> (10, 64)" in note
    assert "fc1.bias (1, 1, 1, 10) -> (10,)" in note
    assert "conv1.weight" not in note  # already (out, in, kh, kw)


def test_graph_lists_layers_and_key_params(tmp_path):
    built = _build(tmp_path, "V2", transpose=True)
    with open_checkpoint(built.model) as checkpoint:
        graph = checkpoint.graph
    json.dumps(graph)  # plain data
    assert graph["version"] == "V2" and graph["name"] == "tiny"
    assert graph["inputs"] == [{"name": "data", "shape": list(IMAGE)}]
    layers = {layer["name"]: layer for layer in graph["layers"]}
    assert [layer["type"] for layer in graph["layers"]] == [
        "Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "ReLU", "InnerProduct",
    ]  # fmt: skip
    assert layers["conv1"]["params"] == {
        "num_output": 4, "kernel": [3, 3], "stride": [1, 1], "pad": [1, 1],
        "dilation": [1, 1], "group": 1, "bias_term": True, "axis": 1,
    }  # fmt: skip
    assert layers["pool1"]["params"] == {
        "pool": "MAX", "kernel": [2, 2], "stride": [2, 2], "pad": [0, 0],
        "global_pooling": False, "round_mode": "CEIL",
    }  # fmt: skip
    assert layers["fc1"]["params"] == {
        "num_output": 10, "axis": 1, "transpose": True, "bias_term": True,
    }  # fmt: skip
    assert layers["fc1"]["bottom"] == ["pool1"] and layers["fc1"]["top"] == ["fc1"]
    assert layers["fc1"]["blobs"] == ["fc1.weight", "fc1.bias"]
    assert layers["data"]["params"] == {"shape": [list(IMAGE)]}
    # The deploy prototxt gives the same graph, without blobs.
    text_graph = caffe.read_prototxt(built.prototxt)
    for layer in text_graph["layers"]:
        assert layer["blobs"] == []
        assert {**layer, "blobs": layers[layer["name"]]["blobs"]} == layers[layer["name"]]


def test_v1_graph_uses_v2_type_names_and_net_inputs(tmp_path):
    built = _build(tmp_path, "V1")
    with open_checkpoint(built.model) as checkpoint:
        graph = checkpoint.graph
    assert graph["version"] == "V1"
    assert graph["inputs"] == [{"name": "data", "shape": list(IMAGE)}]
    assert [layer["type"] for layer in graph["layers"]] == [
        "Convolution", "ReLU", "Pooling", "InnerProduct", "ReLU", "InnerProduct",
    ]  # fmt: skip
    assert caffe.read_prototxt(built.prototxt)["layers"][0]["params"]["kernel"] == [3, 3]


DEPLOY_V1 = """\
name: "VGG_ILSVRC_16_layers"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 224
input_dim: 224
layers {
  bottom: "data"
  top: "conv1_1"
  name: "conv1_1"
  type: CONVOLUTION
  blobs_lr: 1
  convolution_param { num_output: 64 pad: 1 kernel_size: 3 }
}
layers { bottom: "conv1_1" top: "norm1" name: "norm1" type: LRN
  lrn_param { local_size: 5 alpha: 0.0005 beta: 0.75 } }
layers { bottom: "norm1" top: "pool5" name: "pool5" type: POOLING
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { bottom: "pool5" top: "fc6" name: "fc6" type: INNER_PRODUCT
  inner_product_param { num_output: 4096 } }
layers { bottom: "fc6" top: "fc6" name: "drop6" type: DROPOUT
  dropout_param { dropout_ratio: 0.5 } include { phase: TEST } }
"""


def test_a_deploy_prototxt_with_fields_the_schema_leaves_out(tmp_path):
    path = tmp_path / "VGG_ILSVRC_16_layers_deploy.prototxt"
    path.write_text(DEPLOY_V1)
    graph = caffe.read_prototxt(path)
    assert graph["version"] == "V1" and graph["name"] == "VGG_ILSVRC_16_layers"
    assert graph["inputs"] == [{"name": "data", "shape": [10, 3, 224, 224]}]
    layers = {layer["name"]: layer for layer in graph["layers"]}
    assert [layer["type"] for layer in graph["layers"]] == [
        "Convolution", "LRN", "Pooling", "InnerProduct", "Dropout",
    ]  # fmt: skip
    assert layers["conv1_1"]["params"]["kernel"] == [3, 3]
    assert layers["conv1_1"]["params"]["pad"] == [1, 1]
    assert layers["pool5"]["params"]["stride"] == [2, 2]
    assert layers["fc6"]["params"]["num_output"] == 4096
    assert layers["norm1"]["params"] == {}


def test_other_layers_blob_names(tmp_path):
    net = S.NetParameter()
    blobs = {
        ("bn", "BatchNorm"): 3, ("scale", "Scale"): 2, ("bias", "Bias"): 1,
        ("prelu", "PReLU"): 1, ("conv", "Convolution"): 1, ("lstm", "LSTM"): 3,
    }  # fmt: skip
    for (name, kind), count in blobs.items():
        layer = net.layer.add(name=name, type=kind)
        for i in range(count):
            _fill_blob(layer.blobs.add(), np.full(3, i, np.float32), legacy=False)
    path = tmp_path / "other.caffemodel"
    path.write_bytes(net.SerializeToString())
    with open_checkpoint(path) as checkpoint:
        assert list(checkpoint.tensors) == [
            "bn.mean", "bn.variance", "bn.scale_factor", "scale.weight", "scale.bias",
            "bias.bias", "prelu.weight", "conv.weight",
            "lstm.blobs.0", "lstm.blobs.1", "lstm.blobs.2",
        ]  # fmt: skip
        assert checkpoint.array("bn.scale_factor").tolist() == [2, 2, 2]


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def test_unpacked_and_split_values_read_as_protobuf_does(tmp_path):
    """Parsers must accept repeated floats unpacked, or packed over several records."""
    values = np.arange(6, dtype=np.float32) / 4
    shape = S.BlobShape(dim=[2, 3]).SerializeToString()
    unpacked = b"".join(_key(5, 5) + struct.pack("<f", v) for v in values)
    split = _length_field(5, values[:2].tobytes()) + _length_field(5, values[2:].tobytes())
    net = b""
    for name, blob in (("a", unpacked), ("b", split)):
        layer = S.LayerParameter(name=name, type="InnerProduct").SerializeToString()
        net += _length_field(100, layer + _length_field(7, _length_field(7, shape) + blob))
    # protobuf itself reads the same values
    decoded = S.NetParameter.FromString(net)
    assert [list(layer.blobs[0].data) for layer in decoded.layer] == [values.tolist()] * 2
    path = tmp_path / "wire.caffemodel"
    path.write_bytes(net)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.array("a.weight").tolist() == values.reshape(2, 3).tolist()
        assert checkpoint.array("b.weight").tolist() == values.reshape(2, 3).tolist()
        assert any("copied" in note for note in checkpoint.notes)


def test_unknown_fields_and_groups_are_skipped(tmp_path):
    """Fork-specific fields, and groups (OpenCV's custom layer params), are not ours to read."""
    inner = _key(901, 3) + _key(1, 0) + _varint(5) + _key(901, 4)
    group = _key(900, 3) + _length_field(1, b"key") + inner + _key(900, 4)
    layer = _fc_layer().SerializeToString() + group + _length_field(1999, b"fork param")
    net = _length_field(100, layer) + _length_field(77, b"fork net field")
    assert S.NetParameter.FromString(net).layer[0].name == "fc"  # protobuf agrees
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(net)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.array("fc.weight").tolist() == [[0.5] * 3] * 2


def test_diff_is_left_out_with_a_note(tmp_path):
    net = S.NetParameter()
    layer = net.layer.add(name="fc", type="InnerProduct")
    blob = layer.blobs.add()
    _fill_blob(blob, np.ones((2, 2), np.float32), legacy=False)
    blob.diff.extend([9.0] * 4)
    path = tmp_path / "diff.caffemodel"
    path.write_bytes(net.SerializeToString())
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.array("fc.weight").tolist() == [[1, 1], [1, 1]]
        assert any("gradients (diff)" in note for note in checkpoint.notes)


def test_schema_numbers_are_caffes():
    """The field numbers the wire format depends on (BVLC and OpenCV caffe.proto)."""
    numbers = {
        ("NetParameter", "layer"): 100, ("NetParameter", "layers"): 2,
        ("LayerParameter", "blobs"): 7, ("LayerParameter", "inner_product_param"): 117,
        ("LayerParameter", "convolution_param"): 106, ("LayerParameter", "input_param"): 143,
        ("V1LayerParameter", "blobs"): 6, ("V1LayerParameter", "type"): 5,
        ("V1LayerParameter", "inner_product_param"): 17, ("BlobProto", "data"): 5,
        ("BlobProto", "double_data"): 8, ("BlobProto", "raw_data_type"): 10,
        ("BlobProto", "raw_data"): 12, ("BlobProto", "shape"): 7, ("BlobProto", "num"): 1,
        ("InnerProductParameter", "transpose"): 6, ("PoolingParameter", "round_mode"): 13,
    }  # fmt: skip
    for (message, field), number in numbers.items():
        assert getattr(S, message).DESCRIPTOR.fields_by_name[field].number == number
    assert (S.FLOAT16, S.V1LayerParameter.INNER_PRODUCT) == (2, 14)


# -- bad input -------------------------------------------------------------------------------


def _net_bytes(*layers) -> bytes:
    net = S.NetParameter(name="bad")
    for layer in layers:
        net.layer.add().CopyFrom(layer)
    return net.SerializeToString()


def _fc_layer(shape=(2, 3), count=6, **blob) -> object:
    layer = S.LayerParameter(name="fc", type="InnerProduct")
    b = layer.blobs.add(**blob)
    b.shape.dim.extend(shape)
    b.data.extend([0.5] * count)
    return layer


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = _build(tmp_path / "good").model.read_bytes()
    rng = np.random.default_rng(0)
    raw_int = S.LayerParameter(name="fc", type="InnerProduct")
    raw_int.blobs.add(raw_data_type=S.INT, raw_data=b"\0" * 8).shape.dim.append(2)
    raw_untyped = S.LayerParameter(name="fc", type="InnerProduct")
    raw_untyped.blobs.add(raw_data=b"\0" * 8).shape.dim.append(2)
    raw_odd = S.LayerParameter(name="fc", type="InnerProduct")
    raw_odd.blobs.add(raw_data_type=S.FLOAT16, raw_data=b"\0" * 5).shape.dim.append(2)
    legacy_clash = _fc_layer(num=1, channels=1, height=3, width=2)
    both = S.NetParameter(name="x")
    both.layer.add().CopyFrom(_fc_layer())
    both.layers.add(name="old", type=S.V1LayerParameter.INNER_PRODUCT)
    bad_param = S.LayerParameter(name="fc", type="InnerProduct").SerializeToString()
    bad_param += _length_field(117, b"\x08\xff")  # num_output: a varint cut short
    v0 = _length_field(2, _length_field(1, S.LayerParameter(name="x").SerializeToString()))
    deep = S.LayerParameter(name="x").SerializeToString() + _key(900, 3) * 100_000
    not_utf8 = _fc_layer().SerializeToString().replace(b"\x0a\x02fc", b"\x0a\x02\xff\xfe", 1)
    return {
        "truncated in half": (good[: len(good) // 2], "truncated"),
        "truncated by one byte": (good[:-1], "truncated"),
        "random bytes": (rng.bytes(4096), "not a valid caffemodel"),
        "a prototxt": (b'name: "tiny"\nlayer {\n  name: "data"\n}\n', "looks like text"),
        "empty": (b"", "no layers"),
        "no layers": (S.NetParameter(name="x", input=["data"]).SerializeToString(), "no layers"),
        "layers without blobs": (
            _net_bytes(S.LayerParameter(name="relu", type="ReLU")),
            "no blobs",
        ),
        "shape and data disagree": (_net_bytes(_fc_layer(count=5)), "holds 6 values"),
        "legacy and shape disagree": (_net_bytes(legacy_clash), "disagree"),
        "raw_data INT": (_net_bytes(raw_int), "not a float type"),
        "raw_data without type": (_net_bytes(raw_untyped), "without raw_data_type"),
        "raw_data not whole": (_net_bytes(raw_odd), "not whole F16 values"),
        "both layer and layers": (both.SerializeToString(), "both V2"),
        "two layers named fc": (_net_bytes(_fc_layer(), _fc_layer()), "collide"),
        "corrupt layer params": (_length_field(100, bad_param), "protobuf cannot decode"),
        "V0 layers": (v0, "V0 layer format"),
        "data and double_data": (_net_bytes(_fc_layer(double_data=[0.5] * 6)), "more than one"),
        "packed data not whole": (
            _length_field(100, _length_field(7, _length_field(5, b"\0" * 6))),
            "not a whole number",
        ),
        "groups nested 100000 deep": (_length_field(100, deep), "truncated"),
        "a layer name not UTF-8": (_length_field(100, not_utf8), "not UTF-8 text"),
        "an ONNX-like message": (_key(1, 0) + _varint(8) + _length_field(2, b"pytorch"), "wire"),
    }


def test_a_net_name_that_looks_like_json_is_still_a_caffemodel(tmp_path):
    """A 123-byte name makes the file start "\\n{": not JSON, whose "{" opens a key."""
    net = _net_v1(_arrays(0, "F32", False))
    net.name = "N" * 123
    path = tmp_path / "long_name.caffemodel"
    path.write_bytes(net.SerializeToString())
    assert path.read_bytes()[:2] == b"\n{"
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.kind == "caffe" and len(checkpoint.tensors) == 6


def test_bad_input_raises_one_line(tmp_path):
    for case, (content, expected) in _bad_inputs(tmp_path).items():
        path = tmp_path / f"{case.replace(' ', '_')}.caffemodel"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            open_checkpoint(path).close()
        message = caught.value.message
        assert expected in message, (case, message)
        assert str(path) in message and "\n" not in message, case


def test_every_truncation_and_byte_flip_is_read_or_refused(tmp_path):
    """No cut or corrupted byte makes the reader fail other than with one line."""
    good = _build(tmp_path / "good", "V1", "F16").model.read_bytes()
    rng = np.random.default_rng(0)
    variants = [good[:cut] for cut in range(0, len(good), 5)]
    for _ in range(150):
        flipped = bytearray(good)
        flipped[rng.integers(len(good))] = rng.integers(256)
        variants.append(bytes(flipped))
    path = tmp_path / "variant.caffemodel"
    refused = 0
    for content in variants:
        path.write_bytes(content)
        try:
            open_checkpoint(path).close()
        except CheckpointError as exc:
            assert "\n" not in exc.message
            refused += 1
    assert refused > len(variants) // 2


def test_bad_input_from_the_cli_exits_2_and_writes_nothing(tmp_path, run_cli):
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP.format(weight_format=""))
    for case, (content, _) in _bad_inputs(tmp_path).items():
        path = tmp_path / f"{case.replace(' ', '_')}.caffemodel"
        path.write_bytes(content)
        output = tmp_path / "out.safetensors"
        outcome = run_cli("convert", path, "--map", layer_map, "-o", output)
        assert outcome.code == 2, (case, outcome.stderr)
        assert len(outcome.stderr.strip().splitlines()) == 1, (case, outcome.stderr)
        assert "Traceback" not in outcome.stderr
        assert not output.exists()
        assert not list(tmp_path.glob("*.tmp*")), case


def test_missing_protobuf_names_the_extra(tmp_path, monkeypatch):
    built = _build(tmp_path)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # import raises ImportError
    with pytest.raises(CheckpointError, match=r"needs protobuf: pip install 'fc2conv\[caffe\]'"):
        open_checkpoint(built.model)


def test_format_flag_reads_a_caffemodel_under_another_name(tmp_path, run_cli):
    built = _build(tmp_path)
    renamed = built.model.rename(tmp_path / "weights.bin")  # .bin says torch
    assert run_cli("inspect", renamed).code == 2
    outcome = run_cli("inspect", renamed, "--format", "caffe", "--json", "-")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["input_format"] == "caffe"


def test_batch_converts_a_caffemodel_as_convert_does(tmp_path, run_cli):
    built = _build(tmp_path / "zoo", "V1", "F16")
    converted, layer_map, *_ = _convert(run_cli, built, tmp_path)
    outcome = run_cli("batch", "--map", layer_map, "-o", tmp_path / "out", "-j", "1", built.model)
    assert outcome.code == 0, outcome.stderr
    (batched,) = (tmp_path / "out").rglob("*.safetensors")
    assert load_file(batched).keys() == converted.keys()
    for name, array in load_file(batched).items():
        assert np.array_equal(array, converted[name]), name


def test_prototxt_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer { name: "x" type: }\n')
    with pytest.raises(CheckpointError, match="not a readable Caffe prototxt"):
        caffe.read_prototxt(path)


# -- end to end, judged by OpenCV --------------------------------------------------------------


@pytest.mark.parametrize(("version", "dtype", "transpose"), VARIANTS)
def test_converted_head_matches_opencv(tmp_path, run_cli, version, dtype, transpose):
    built = _build(tmp_path, version, dtype, transpose)
    runnable = built if dtype != "F64" and not transpose else _opencv_twin(built, tmp_path / "t")
    # The map gives no weight_format: each layer takes the one the file stores.
    converted, layer_map, output, report = _convert(run_cli, built, tmp_path)
    stored = "in_out" if transpose else "out_in"
    assert [layer["weight_format"] for layer in report["layers"]] == [stored, stored]
    assert [(layer["output_weight"], layer["output_bias"]) for layer in report["layers"]] == [
        ("fc1.weight", "fc1.bias"), ("fc2.weight", "fc2.bias"),
    ]  # fmt: skip
    assert report["input_format"] == "caffe"
    assert converted["fc1.weight"].shape == (10, *FEATURE)
    assert converted["fc2.weight"].shape == (5, 10, 1, 1)
    assert converted["fc1.weight"].dtype == NP_DTYPES[dtype]
    assert np.array_equal(converted["conv1.weight"], built.arrays["conv1.weight"])  # no flip
    rng = np.random.default_rng(1)

    # (a) native size: OpenCV's own pool1 into the conv head gives OpenCV's own FC output.
    image = rng.standard_normal(IMAGE).astype(np.float32)
    features, fc2 = _opencv(runnable, image, ["pool1", "fc2"])
    assert features.shape == (1, *FEATURE)
    dense = _head(converted, features)
    assert dense.shape == (1, 5, 1, 1)
    np.testing.assert_allclose(dense.reshape(5), fc2.reshape(5), rtol=1e-5, atol=1e-5)
    # ... which is Caffe's definition of the FC head on that feature map.
    by_definition = _fc(built.arrays, features.reshape(-1), transpose)
    np.testing.assert_allclose(dense.reshape(5), by_definition, rtol=1e-9, atol=1e-9)

    # (b) a larger map: every position is the FC head on that position's 4x4 window.
    large = rng.standard_normal(LARGE_IMAGE).astype(np.float32)
    features = _opencv_features(runnable, large)
    assert features.shape == (1, 4, 7, 9)
    dense = _head(converted, features)
    assert dense.shape == (1, 5, 4, 6)
    for i in range(4):
        for j in range(6):
            window = features[0, :, i : i + 4, j : j + 4].reshape(-1)
            expected = _fc(built.arrays, window, transpose)
            np.testing.assert_allclose(dense[0, :, i, j], expected, rtol=1e-9, atol=1e-9)

    assert run_cli("inspect", built.model).code == 0
    verified = run_cli("verify", built.model, output, "--map", layer_map)
    assert verified.code == 0, verified.stderr


def test_rename_and_hwio_output(tmp_path, run_cli):
    """``rename`` replaces the layer prefix and keeps Caffe's suffix; ``hwio`` kernels."""
    built = _build(tmp_path, "V1", "F32", transpose=False)
    text = MAP.replace("  - name: fc1\n", "  - name: fc1\n    rename: score1\n")
    text = text.format(weight_format="conv_format: hwio\n")
    converted, *_ = _convert(run_cli, built, tmp_path, text)
    oihw = built.arrays["fc1.weight"].reshape(10, *FEATURE)
    assert np.array_equal(converted["score1.weight"], oihw.transpose(2, 3, 1, 0))
    assert np.array_equal(converted["score1.bias"], built.arrays["fc1.bias"])
    assert converted["fc2.weight"].shape == (1, 1, 10, 5)
    assert "fc1.weight" not in converted


def test_inspect_and_a_suggested_map(tmp_path, run_cli):
    built = _build(tmp_path, "V1", "F16")
    outcome = run_cli("inspect", built.model, "--json", "-")
    assert outcome.code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["input_format"] == "caffe"
    kinds = {group["prefix"]: group["kind"] for group in report["groups"]}
    assert kinds == {"conv1": "conv", "fc1": "fc", "fc2": "fc"}
    assert any("squeezed legacy" in note for note in report["notes"])
    suggested = tmp_path / "suggested.yaml"
    assert run_cli("inspect", built.model, "-o", suggested).code == 0
    output = tmp_path / "suggested.safetensors"
    outcome = run_cli("convert", built.model, "--map", suggested, "-o", output)
    assert outcome.code == 0, outcome.stderr
    assert load_file(output)["fc1.weight"].shape == (10, *FEATURE)


# -- sample config ------------------------------------------------------------------------------

# VGG_ILSVRC_16_layers.caffemodel (2014) is a V1 file with legacy 4-D blob shapes: its FC head.
VGG_FC = (("fc6", 4096, 25088), ("fc7", 4096, 4096), ("fc8", 1000, 4096))


def _write_vgg_head(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The FC layers of VGG_ILSVRC_16_layers at their real shapes, as Caffe wrote them.

    Layers and blob metadata are serialized by protobuf; each blob's packed ``data`` field
    (412 MB for fc6) is appended as its wire record, the encoding protobuf itself uses
    (checked here on a small blob), so the file never has to be held twice in memory.
    """
    V1 = S.V1LayerParameter
    arrays = {}
    small = np.arange(3, dtype=np.float32)
    by_protobuf = S.BlobProto(num=1, channels=1, height=1, width=3, data=small.tolist())
    check = S.BlobProto(num=1, channels=1, height=1, width=3)
    assert _blob_bytes(check, small) == by_protobuf.SerializeToString()
    with open(path, "wb") as file:
        file.write(_length_field(1, b"VGG_ILSVRC_16_layers"))
        for name, out, inp in VGG_FC:
            weight = (rng.standard_normal((out, inp), np.float32) * 0.01).astype(np.float32)
            bias = rng.standard_normal(out, np.float32).astype(np.float32)
            arrays[f"{name}.weight"], arrays[f"{name}.bias"] = weight, bias
            layer = V1(name=name, type=V1.INNER_PRODUCT, bottom=["x"], top=[name])
            layer.inner_product_param.num_output = out
            body = layer.SerializeToString()
            for value, dims in ((weight, (1, 1, out, inp)), (bias, (1, 1, 1, out))):
                blob = S.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
                body += _length_field(6, _blob_bytes(blob, value))
            file.write(_key(2, 2) + _varint(len(body)))
            file.write(body)
    return arrays


def _blob_bytes(blob, values: np.ndarray) -> bytes:
    return blob.SerializeToString() + _length_field(5, values.astype("<f4").tobytes())


@pytest.mark.slow
def test_vgg16_caffe_sample_config(tmp_path, run_cli, sample_configs):
    """sample_configs/vgg16_caffe.yaml on VGG_ILSVRC_16_layers' FC head at full size."""
    model = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    arrays = _write_vgg_head(model, np.random.default_rng(0))
    with open_checkpoint(model) as checkpoint:
        shapes = {n: t.shape for n, t in checkpoint.tensors.items()}
    assert shapes == {
        "fc6.weight": (4096, 25088), "fc6.bias": (4096,), "fc7.weight": (4096, 4096),
        "fc7.bias": (4096,), "fc8.weight": (1000, 4096), "fc8.bias": (1000,),
    }  # fmt: skip
    layer_map = sample_configs / "vgg16_caffe.yaml"
    output = tmp_path / "vgg16_fcn.safetensors"
    outcome = run_cli("convert", model, "--map", layer_map, "-o", output)
    assert outcome.code == 0, outcome.stderr
    converted = load_file(output)
    expected = {
        "fc6.weight": arrays["fc6.weight"].reshape(4096, 512, 7, 7),  # chw: a reshape
        "fc7.weight": arrays["fc7.weight"].reshape(4096, 4096, 1, 1),
        "fc8.weight": arrays["fc8.weight"].reshape(1000, 4096, 1, 1),
    }
    for name in ("fc6", "fc7", "fc8"):
        assert np.array_equal(converted[f"{name}.weight"], expected[f"{name}.weight"])
        assert np.array_equal(converted[f"{name}.bias"], arrays[f"{name}.bias"])
    verified = run_cli("verify", model, output, "--map", layer_map)
    assert verified.code == 0, verified.stderr
