"""Section 2 of issue 11: the map is read, not guessed, where the file knows it.

ONNX graphs are built with onnx.helper (and one torch.onnx.export), TF.js graph models as
tfjs-converter writes them, Keras configs by Keras itself, Caffe nets by protobuf from the
shipped schema. Each suggested map is converted by the CLI and the converted conv head is
judged by the framework's own runtime: fed the framework's own feature map, it must give
the framework's own FC output. All weights are random: whatever the suggestion knows, it
read from the graph.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.suggest import suggest_map

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "torch")
RNG = np.random.default_rng(11)
# Keras' own get_weights on numpy 2 (not this code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def suggestion(path, net=None):
    with open_checkpoint(path) as checkpoint:
        return suggest_map(checkpoint, path.name, net)


def convert(run_cli, tmp_path, source, text) -> dict[str, np.ndarray]:
    (tmp_path / "map.yaml").write_text(text)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", tmp_path / "map.yaml", "-o", output)
    assert outcome.code == 0, outcome.stderr
    return load_file(output)


def conv_at_native_size(weight: np.ndarray, bias: np.ndarray, nchw: np.ndarray) -> np.ndarray:
    """A conv whose kernel covers the whole map: one output position per filter."""
    return np.einsum("ochw,nchw->no", weight, nchw) + bias


# -- ONNX ------------------------------------------------------------------------------

C_IN, C = 2, 4


def _onnx_model(tmp_path, height, width, shaping, fc="gemm", names=("fc.weight", "fc.bias")):
    """x (1, 2, H+2, W+2) -> Conv 3x3 -> Relu "map" (1, 4, H, W) -> ``shaping`` -> FC -> y.

    ``shaping`` is a list of (op, attributes or a shape tensor) between the map and the
    FC; the map is also a graph output, so onnxruntime hands it out.
    """
    features, out = C * height * width, 6
    conv_w = RNG.standard_normal((C, C_IN, 3, 3)).astype(np.float32)
    weight, bias = names
    fc_w = RNG.standard_normal((out, features) if fc == "gemm" else (features, out))
    inits = [
        numpy_helper.from_array(conv_w, "conv.weight"),
        numpy_helper.from_array(fc_w.astype(np.float32), weight),
        numpy_helper.from_array(RNG.standard_normal(out).astype(np.float32), bias),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["conv"], name="conv"),
        helper.make_node("Relu", ["conv"], ["map"], name="relu"),
    ]
    value = "map"
    for index, (op, spec) in enumerate(shaping):
        name = f"{op.lower()}{index}"
        inputs = [value]
        if op == "Reshape":
            inits.append(numpy_helper.from_array(np.array(spec, np.int64), f"{name}_shape"))
            inputs.append(f"{name}_shape")
            spec = {}
        if op == "Concat":
            inputs = [value, value]
        nodes.append(helper.make_node(op, inputs, [name], name=name, **spec))
        value = name
    if fc == "gemm":
        nodes.append(helper.make_node("Gemm", [value, weight, bias], ["y"], name="fc", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", [value, weight], ["mm"], name="fc"))
        nodes.append(helper.make_node("Add", ["mm", bias], ["y"], name="fc_bias"))
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, height + 2, width + 2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, C, height, width]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "net.onnx"
    onnx.save(model, str(path))
    return path


def _run_onnx(path, height, width):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((1, C_IN, height + 2, width + 2)).astype(np.float32)
    y, fmap = session.run(["y", "map"], {"x": x})
    return y, fmap


@pytest.mark.parametrize(
    ("shaping", "fc", "layout", "size"),
    [
        ([("Flatten", {"axis": 1})], "gemm", "chw", (3, 12)),
        (
            [("Transpose", {"perm": [0, 2, 3, 1]}), ("Reshape", [-1, C * 4])],
            "matmul",
            "hwc",
            (4, 1),
        ),
        ([("Transpose", {"perm": [0, 3, 2, 1]}), ("Flatten", {"axis": 1})], "gemm", "whc", (3, 5)),
        ([("Reshape", [0, -1])], "matmul", "chw", (1, 4)),
    ],
    ids=["flatten-3x12", "nhwc-transpose-reshape-4x1", "whc-transpose-3x5", "reshape-1x4"],
)
def test_onnx_layout_and_shape_are_read_from_the_graph(
    run_cli, tmp_path, shaping, fc, layout, size
):
    path = _onnx_model(tmp_path, *size, shaping, fc)
    found = suggestion(path)
    assert (found.source, found.confidence) == ("graph", 1.0)
    assert (found.layout, found.kernel, found.in_channels) == (layout, size, C)
    assert "read from the graph" in found.text and "fc" in found.reading.nodes[-1]
    doc = yaml.safe_load(found.text)
    assert "weight_format" not in doc  # the reader's per-tensor hint (transB / MatMul) applies
    y, fmap = _run_onnx(path, *size)
    converted = convert(run_cli, tmp_path, path, found.text)
    head = conv_at_native_size(converted["fc.weight"], converted["fc.bias"], fmap)
    np.testing.assert_allclose(head, y, rtol=1e-4, atol=1e-4)


def test_onnx_names_without_a_suffix_get_weight_and_bias_keys(run_cli, tmp_path):
    path = _onnx_model(tmp_path, 2, 3, [("Flatten", {"axis": 1})], "matmul", ("W_fc", "B_fc"))
    found = suggestion(path)
    [rule] = yaml.safe_load(found.text)["layers"]
    assert rule == {"name": "W_fc", "kernel": [2, 3], "in_channels": C, "weight": "W_fc",
                    "bias": "B_fc"}  # fmt: skip
    y, fmap = _run_onnx(path, 2, 3)
    converted = convert(run_cli, tmp_path, path, found.text)
    np.testing.assert_allclose(
        conv_at_native_size(converted["W_fc"], converted["B_fc"], fmap), y, rtol=1e-4, atol=1e-4
    )


def test_onnx_concat_of_maps_is_said_and_the_weights_decide(tmp_path):
    path = _onnx_model(tmp_path, 2, 2, [("Concat", {"axis": 1}), ("Flatten", {"axis": 1})])
    with open_checkpoint(path) as checkpoint:
        found = suggest_map(checkpoint, path.name)
    assert found.reading.problem.startswith("the graph goes through Concat 'concat0'")
    assert found.source == "default"  # random weights: cannot tell, and not read either
    assert any("the weights decide instead" in note for note in found.ambiguities)


def test_onnx_global_average_pool_head_is_a_1x1_read_from_the_graph(run_cli, tmp_path):
    path = _onnx_model(
        tmp_path, 1, 1, [("GlobalAveragePool", {}), ("Flatten", {"axis": 1})], "gemm"
    )
    found = suggestion(path)
    assert (found.source, found.kernel, found.in_channels) == ("graph", (1, 1), C)
    assert "GlobalAveragePool" in found.reading.nodes[0] and found.reading.pooled
    assert "pools the map to 1x1" in found.text


def test_a_torch_export_with_view_is_read_from_the_graph(run_cli, tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)
            self.fc = torch.nn.Linear(5 * 2 * 6, 7)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            return self.fc(x.permute(0, 2, 3, 1).reshape(x.size(0), -1))

    torch.manual_seed(0)
    path = tmp_path / "torch.onnx"
    torch.onnx.export(Net(), (torch.randn(1, 3, 4, 8),), str(path), dynamo=False)
    found = suggestion(path)
    assert (found.source, found.layout, found.kernel) == ("graph", "hwc", (2, 6))
    assert found.in_channels == 5


# -- TF.js graph models ----------------------------------------------------------------


def _tfjs_graph(tmp_path, transpose: list[int] | None, height=3, width=4):
    from test_reader_tfjs import _write_model, _write_weights

    prefix = "StatefulPartitionedCall/model"
    kernel, fc, fc_bias = (f"{prefix}/conv/Conv2D/ReadVariableOp",
                           f"{prefix}/fc1/MatMul/ReadVariableOp",
                           f"{prefix}/fc1/BiasAdd/ReadVariableOp")  # fmt: skip
    weights = {
        kernel: RNG.standard_normal((3, 3, 2, C)).astype(np.float32),
        fc: RNG.standard_normal((C * height * width, 5)).astype(np.float32),
        fc_bias: RNG.standard_normal(5).astype(np.float32),
        f"{prefix}/flatten/Const": np.array([-1, C * height * width], np.int32),
    }
    nodes = [
        {"name": "input", "op": "Placeholder"},
        *({"name": n, "op": "Const"} for n in weights),
        {"name": f"{prefix}/conv/Conv2D", "op": "Conv2D", "input": ["input", kernel],
         "attr": {"data_format": {"s": "TkhXQw=="}, "padding": {"s": "VkFMSUQ="}}},
        {"name": f"{prefix}/conv/Relu", "op": "Relu", "input": [f"{prefix}/conv/Conv2D"]},
    ]  # fmt: skip
    value = f"{prefix}/conv/Relu"
    if transpose is not None:
        weights[f"{prefix}/permute/perm"] = np.array(transpose, np.int32)
        nodes += [{"name": f"{prefix}/permute/perm", "op": "Const"},
                  {"name": f"{prefix}/permute/transpose", "op": "Transpose",
                   "input": [value, f"{prefix}/permute/perm"]}]  # fmt: skip
        value = f"{prefix}/permute/transpose"
    nodes += [
        {"name": f"{prefix}/flatten/Reshape", "op": "Reshape",
         "input": [value, f"{prefix}/flatten/Const"]},
        {"name": f"{prefix}/fc1/MatMul", "op": "MatMul",
         "input": [f"{prefix}/flatten/Reshape", fc], "attr": {"transpose_b": {"b": False}}},
        {"name": f"{prefix}/fc1/BiasAdd", "op": "BiasAdd",
         "input": [f"{prefix}/fc1/MatMul", fc_bias]},
    ]  # fmt: skip
    folder = tmp_path / "graph"
    folder.mkdir()
    manifest = _write_weights([list(weights.items())], folder, shard_size=1 << 20)
    document = {
        "format": "graph-model",
        "modelTopology": {"node": nodes, "library": {}, "versions": {"producer": 1808}},
        "weightsManifest": manifest,
    }
    return _write_model(folder, document), fc


@pytest.mark.parametrize(("transpose", "layout"), [(None, "hwc"), ([0, 3, 1, 2], "chw")])
def test_tfjs_graph_model_layout_is_read_and_the_shape_left_to_the_weights(
    tmp_path, transpose, layout
):
    path, fc = _tfjs_graph(tmp_path, transpose)
    found = suggestion(path)
    assert found.layout == layout and found.layout_source == "graph"
    assert found.shape_source == "default"  # random weights cannot place 3 x 4
    assert found.kernel in {(3, 4), (4, 3), (2, 6), (6, 2), (1, 12), (12, 1)}
    doc = yaml.safe_load(found.text)
    assert doc["layers"][0]["weight"] == fc and "weight_format" not in doc


# -- Keras configs ---------------------------------------------------------------------


def _keras_sequential(layers, input_shape):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(input_shape), *layers])


def _keras_cases():
    import keras

    L = keras.layers
    return {
        "conv-pool-flatten": (
            lambda: [L.Conv2D(4, 3, name="conv"), L.MaxPooling2D(2, name="pool"),
                     L.Flatten(name="flatten"), L.Dense(5, name="fc1")],
            (9, 28, 3), "hwc", (3, 13), 4,
        ),
        "permute-before-flatten": (
            lambda: [L.ZeroPadding2D(1, name="pad"), L.Conv2D(6, 3, strides=2, name="conv"),
                     L.BatchNormalization(name="bn"), L.Permute((3, 1, 2), name="permute"),
                     L.Flatten(name="flatten"), L.Dense(5, name="fc1")],
            (8, 12, 3), "chw", (4, 6), 6,
        ),
        "same-padding-k1": (
            lambda: [L.Conv2D(4, (3, 1), padding="same", name="conv"),
                     L.MaxPooling2D((2, 1), name="pool"), L.Flatten(name="flatten"),
                     L.Dense(5, name="fc1")],
            (10, 1, 2), "hwc", (5, 1), 4,
        ),
        "global-pool": (
            lambda: [L.Conv2D(8, 3, name="conv"), L.GlobalAveragePooling2D(name="gap"),
                     L.Dense(5, name="fc1")],
            (6, 6, 3), "c", (1, 1), 8,
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["conv-pool-flatten", "permute-before-flatten", "same-padding-k1", "global-pool"]
)
def test_keras_config_gives_layout_and_shape(case):
    from fc2conv_cli.evidence.keras_config import read_keras

    make, input_shape, layout, shape, channels = _keras_cases()[case]
    model = _keras_sequential(make(), input_shape)
    import json

    reading = read_keras(json.loads(model.to_json()), "fc1", "Keras")
    assert reading.problem is None, reading.problem
    assert (reading.layout, reading.shape, reading.channels) == (layout, shape, channels)
    assert reading.weight_format is WeightFormat.IN_OUT and reading.how.endswith("Keras config")
    dense_input = model.get_layer("fc1").input.shape[-1]
    assert dense_input == channels * int(np.prod(shape))  # Keras' own shape inference agrees


def test_keras_functional_config_is_followed_back_from_the_dense():
    import json

    import keras

    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b")(inputs)
    x = L.Add(name="add")([a, b])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Permute((2, 1, 3), name="swap")(x)
    outputs = L.Dense(3, name="fc1")(L.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs)
    from fc2conv_cli.evidence.keras_config import read_keras

    reading = read_keras(json.loads(model.to_json()), "fc1", "Keras")
    assert (reading.layout, reading.shape, reading.channels) == ("whc", (4, 4), 4)
    concat = L.Concatenate(name="cat")([a, b])
    joined = keras.Model(inputs, L.Dense(3, name="fc2")(L.Flatten()(concat)))
    reading = read_keras(json.loads(joined.to_json()), "fc2", "Keras")
    assert "joins several inputs" in reading.problem


def test_keras_data_format_disagreement_is_stated():
    from fc2conv_cli.evidence.keras_config import read_keras

    config = {
        "class_name": "Sequential",
        "config": {"layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, 8, 8, 3]}},
            {"class_name": "Conv2D", "config": {"name": "c1", "filters": 4, "kernel_size": 3,
                                                "data_format": "channels_last"}},
            {"class_name": "Conv2D", "config": {"name": "c2", "filters": 4, "kernel_size": 3,
                                                "data_format": "channels_first"}},
            {"class_name": "Flatten", "config": {"name": "flat"}},
            {"class_name": "Dense", "config": {"name": "fc1", "units": 2}},
        ]},
    }  # fmt: skip
    reading = read_keras(config, "fc1", "Keras")
    assert "data_format disagrees" in reading.problem


def test_tfjs_layers_model_with_a_permute_converts_as_keras_computes(run_cli, tmp_path):
    """End to end: a Keras model whose Flatten follows a Permute (a Caffe port), as a TF.js
    layers model; the map is read from its config, and the converted conv head fed Keras'
    own feature map gives Keras' own Dense output."""
    import keras
    from test_reader_tfjs import _export_layers_model

    L = keras.layers
    model = _keras_sequential(
        [L.Conv2D(4, 3, name="conv"), L.MaxPooling2D(2, name="pool"),
         L.Permute((3, 2, 1), name="permute"), L.Flatten(name="flatten"),
         L.Dense(5, name="fc1"), L.Dense(2, name="fc2")],
        (8, 14, 3),
    )  # fmt: skip
    path = _export_layers_model(tmp_path / "tfjs", model, shard_size=1 << 20)
    found = suggestion(path)
    assert (found.source, found.layout, found.kernel, found.in_channels) == (
        "config", "cwh", (3, 6), 4
    )  # fmt: skip
    assert "read from the TF.js config" in found.text
    assert [r["name"] for r in yaml.safe_load(found.text)["layers"]] == ["fc1", "fc2"]
    converted = convert(run_cli, tmp_path, path, found.text)
    x = RNG.standard_normal((1, 8, 14, 3)).astype(np.float32)
    fmap = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    dense = keras.Model(model.inputs, model.get_layer("fc1").output).predict(x, verbose=0)
    nchw = np.asarray(fmap).transpose(0, 3, 1, 2)
    head = conv_at_native_size(converted["fc1/kernel"], converted["fc1/bias"], nchw)
    np.testing.assert_allclose(head, np.asarray(dense), rtol=1e-4, atol=1e-4)


# -- Caffe -----------------------------------------------------------------------------


def _caffe_pair(tmp_path, image=(1, 3, 8, 20)):
    """A caffemodel without an input shape, and its deploy prototxt with one."""
    from google.protobuf import text_format
    from test_reader_caffe import S, _fill_blob

    arrays = {
        "conv1.weight": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv1.bias": RNG.standard_normal(4).astype(np.float32),
        "fc1.weight": RNG.standard_normal((6, 4 * 4 * 10)).astype(np.float32),
        "fc1.bias": RNG.standard_normal(6).astype(np.float32),
    }

    def net(with_input: bool):
        net = S.NetParameter(name="wide")
        if with_input:
            net.input.append("data")
            net.input_dim.extend(image)
        conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
        conv.convolution_param.num_output = 4
        conv.convolution_param.kernel_size.append(3)
        conv.convolution_param.pad.append(1)
        net.layer.add(name="relu1", type="ReLU", bottom=["conv1"], top=["conv1"])
        pool = net.layer.add(name="pool1", type="Pooling", bottom=["conv1"], top=["pool1"])
        pool.pooling_param.kernel_size = 2
        pool.pooling_param.stride = 2
        fc = net.layer.add(name="fc1", type="InnerProduct", bottom=["pool1"], top=["fc1"])
        fc.inner_product_param.num_output = 6
        return net

    model = net(False)
    for layer in model.layer:
        for suffix in ("weight", "bias"):
            if f"{layer.name}.{suffix}" in arrays:
                _fill_blob(layer.blobs.add(), arrays[f"{layer.name}.{suffix}"], legacy=False)
    (tmp_path / "wide.caffemodel").write_bytes(model.SerializeToString())
    (tmp_path / "wide.prototxt").write_text(text_format.MessageToString(net(True)))
    return tmp_path / "wide.caffemodel", tmp_path / "wide.prototxt", arrays


def test_caffe_prototxt_gives_the_map_and_opencv_agrees(run_cli, tmp_path):
    cv2 = pytest.importorskip("cv2")
    model, prototxt, _ = _caffe_pair(tmp_path)
    without = run_cli("inspect", model, "--suggest-map", "--json", tmp_path / "a.json")
    assert without.code == 0, without.stderr
    # Without the prototxt: 40 positions, random weights: the squarest shape, a default.
    assert yaml.safe_load(without.stdout)["layers"][0]["kernel"] == [5, 8]
    assert "cannot tell" in without.stdout
    with_net = run_cli(
        "inspect", model, "--prototxt", prototxt, "--suggest-map", "--json", tmp_path / "b.json"
    )
    assert with_net.code == 0, with_net.stderr
    import json

    report = json.loads((tmp_path / "b.json").read_text())["suggested_map"]
    assert (report["source"], report["kernel"], report["layout"]) == ("graph", [4, 10], "chw")
    assert report["reading"]["how"] == "read from the prototxt" and report["confidence"] == 1.0
    # OpenCV runs the net: its pool1 output fed to the converted head gives its fc1.
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
    x = RNG.standard_normal((1, 3, 8, 20)).astype(np.float32)
    net.setInput(x)
    fmap, fc1 = net.forward(["pool1", "fc1"])
    converted = convert(run_cli, tmp_path, model, with_net.stdout)
    head = conv_at_native_size(converted["fc1.weight"], converted["fc1.bias"], fmap)
    np.testing.assert_allclose(head, fc1.reshape(1, -1), rtol=1e-4, atol=1e-4)


def test_a_bad_prototxt_is_one_line_exit_2(run_cli, tmp_path):
    model, _, _ = _caffe_pair(tmp_path)
    (tmp_path / "bad.prototxt").write_text("layer { name: ")
    outcome = run_cli("inspect", model, "--prototxt", tmp_path / "bad.prototxt", "--suggest-map")
    assert outcome.code == 2 and len(outcome.stderr.strip().splitlines()) == 1
    assert "not a readable Caffe prototxt" in outcome.stderr


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_file_reads_its_config_and_converts_as_keras_computes(run_cli, tmp_path, suffix):
    """End to end on a saved Keras model (``.keras`` and a full-model ``.h5``): a channels
    last net whose Flatten follows ``Permute((3, 1, 2))``, so it flattens ``chw``."""
    import keras

    L = keras.layers
    model = _keras_sequential(
        [L.Conv2D(4, 3, name="conv"), L.MaxPooling2D(2, name="pool"),
         L.Permute((3, 1, 2), name="to_chw"), L.Flatten(name="flatten"),
         L.Dense(5, name="fc1"), L.Dense(2, name="fc2")],
        (10, 16, 3),
    )  # fmt: skip
    path = tmp_path / f"model{suffix}"
    model.save(path)
    found = suggestion(path)
    assert (found.source, found.layout, found.kernel, found.in_channels) == (
        "config", "chw", (4, 7), 4
    )  # fmt: skip
    assert "read from the Keras config" in found.text
    doc = yaml.safe_load(found.text)
    assert [r["name"] for r in doc["layers"]] == ["fc1", "fc2"] and "weight_format" not in doc
    converted = convert(run_cli, tmp_path, path, found.text)
    x = RNG.standard_normal((1, 10, 16, 3)).astype(np.float32)
    fmap = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    dense = keras.Model(model.inputs, model.get_layer("fc1").output).predict(x, verbose=0)
    head = conv_at_native_size(
        converted["fc1/kernel"], converted["fc1/bias"], np.asarray(fmap).transpose(0, 3, 1, 2)
    )
    np.testing.assert_allclose(head, np.asarray(dense), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_a_caffemodel_with_its_own_input_shape_needs_no_prototxt(tmp_path, version):
    from test_reader_caffe import FEATURE, _build

    built = _build(tmp_path, version, "F32")
    found = suggestion(built.model)
    assert (found.source, found.kernel, found.in_channels, found.layout) == (
        "graph", FEATURE[1:], FEATURE[0], "chw"
    )  # fmt: skip
    assert found.reading.how == "read from the Caffe net"
