"""The ONNX reader: graphs built with onnx.helper (and torch.onnx.export), judged by
onnx's own ``numpy_helper.to_array`` and, end to end, by onnxruntime."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import open_checkpoint

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# A non-square feature map, so an h/w mix-up cannot pass: input 3 x 6 x 7, a 3x3 conv
# to 4 channels gives 4 x 4 x 5 = 80 features; FCs 80 -> 8 -> 5.
IN_SHAPE = (1, 3, 6, 7)
CHANNELS, FEATURE_HW, HIDDEN, CLASSES = 4, (4, 5), 8, 5
FEATURES = CHANNELS * FEATURE_HW[0] * FEATURE_HW[1]
FLAT_INPUT = "features"  # the value Flatten reads: the feature map


def _initializer(name: str, array: np.ndarray, raw: bool = True) -> TensorProto:
    if raw:
        return numpy_helper.from_array(array, name)
    dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor(name, dtype, array.shape, array.reshape(-1), raw=False)


def _weights(seed: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(dtype)

    return {
        "conv.weight": draw(CHANNELS, 3, 3, 3),
        "conv.bias": draw(CHANNELS),
        "fc1": draw(HIDDEN, FEATURES),  # Gemm transB=1: (out, in)
        "fc1.bias": draw(HIDDEN),
        "fc2": draw(HIDDEN, CLASSES),  # the second FC stores (in, out)
        "fc2.bias": draw(CLASSES),
    }


def _model(nodes: list, initializers: list):
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, IN_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, CLASSES))],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_model(seed: int = 0, dtype: type = np.float32, raw: bool = True):
    """conv -> relu -> flatten -> Gemm(transB=1) -> relu -> Gemm(transB=0).

    Names: ``fc1.weight`` / ``fc1.bias`` (out_in), ``fc2.weight`` / ``fc2.bias`` (in_out).
    With a ``dtype`` other than float32, every tensor is stored in it and Cast to float
    before use (how fp16 exports keep weights); ``raw=False`` stores them in typed fields.
    """
    w = _weights(seed, dtype)
    stored = {
        "conv.weight": w["conv.weight"],
        "conv.bias": w["conv.bias"],
        "fc1.weight": w["fc1"],
        "fc1.bias": w["fc1.bias"],
        "fc2.weight": w["fc2"],
        "fc2.bias": w["fc2.bias"],
    }
    nodes, used = [], {}
    for name in stored:
        if dtype is np.float32:
            used[name] = name
        else:
            used[name] = f"{name}.f32"
            nodes.append(helper.make_node("Cast", [name], [used[name]], to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("Conv", ["x", used["conv.weight"], used["conv.bias"]], ["conv"]),
        helper.make_node("Relu", ["conv"], [FLAT_INPUT]),
        helper.make_node("Flatten", [FLAT_INPUT], ["flat"], axis=1),
        helper.make_node(
            "Gemm", ["flat", used["fc1.weight"], used["fc1.bias"]], ["fc1_out"], transB=1
        ),
        helper.make_node("Relu", ["fc1_out"], ["fc1_relu"]),
        helper.make_node("Gemm", ["fc1_relu", used["fc2.weight"], used["fc2.bias"]], ["y"]),
    ]
    inits = [_initializer(name, array, raw) for name, array in stored.items()]
    return _model(nodes, inits)


def matmul_model(seed: int = 0, nhwc: bool = False):
    """flatten -> MatMul + Add -> relu -> MatMul + Add, with tf2onnx-style names
    (``dense/kernel:0``, in_out). ``nhwc``: the feature map is transposed to NHWC before
    the Flatten, as tf2onnx graphs of Keras models do (layout hwc)."""
    w = _weights(seed)
    stored = {
        "conv.weight": w["conv.weight"],
        "conv.bias": w["conv.bias"],
        "dense/kernel:0": np.ascontiguousarray(w["fc1"].T),
        "dense/bias:0": w["fc1.bias"],
        "dense_1/kernel:0": w["fc2"],
        "dense_1/bias:0": w["fc2.bias"],
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["conv"]),
        helper.make_node("Relu", ["conv"], [FLAT_INPUT]),
        *[helper.make_node("Transpose", [FLAT_INPUT], ["nhwc"], perm=[0, 2, 3, 1])] * nhwc,
        helper.make_node("Flatten", ["nhwc" if nhwc else FLAT_INPUT], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "dense/kernel:0"], ["mm1"]),
        helper.make_node("Add", ["mm1", "dense/bias:0"], ["fc1_out"]),
        helper.make_node("Relu", ["fc1_out"], ["fc1_relu"]),
        helper.make_node("MatMul", ["fc1_relu", "dense_1/kernel:0"], ["mm2"]),
        helper.make_node("Add", ["mm2", "dense_1/bias:0"], ["y"]),
    ]
    return _model(nodes, [_initializer(n, a) for n, a in stored.items()])


def save(model, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def torch_export(path: Path) -> Path:
    """A torch.nn model exported by torch.onnx (TorchScript exporter): the same head."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, CHANNELS, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    ).eval()
    torch.onnx.export(model, (torch.randn(*IN_SHAPE),), str(path), dynamo=False, input_names=["x"])
    return path


def assert_matches_onnx(path: Path) -> None:
    """Every initializer: same name, shape, dtype and bytes as numpy_helper.to_array."""
    model = onnx.load(str(path))  # loads external data from the model's folder
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == list(expected)
        for name, array in expected.items():
            got = ckpt.array(name)
            assert got.dtype == array.dtype, name
            assert got.shape == array.shape, name
            assert got.tobytes() == array.tobytes(), name


VARIANTS = {
    "gemm": lambda p: save(gemm_model(), p),
    "matmul": lambda p: save(matmul_model(), p),
    "float16": lambda p: save(gemm_model(dtype=np.float16), p),
    "float16_int32_data": lambda p: save(gemm_model(dtype=np.float16, raw=False), p),
    "float32_float_data": lambda p: save(gemm_model(raw=False), p),
    "external": lambda p: save(gemm_model(), p, external=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tensors_equal_onnx_to_array(tmp_path, variant):
    assert_matches_onnx(VARIANTS[variant](tmp_path / "m.onnx"))


@pytest.mark.slow
def test_torch_export_tensors_equal_onnx_to_array(tmp_path):
    path = torch_export(tmp_path / "torch.onnx")
    assert_matches_onnx(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "onnx"
        assert ckpt.tensors["3.weight"].weight_format is WeightFormat.OUT_IN
        assert ckpt.tensors["5.weight"].weight_format is WeightFormat.OUT_IN
        assert ckpt.tensors["0.weight"].shape == (CHANNELS, 3, 3, 3)  # OIHW, as stored
        graph = ckpt.graph
    flatten = next(node for node in graph["nodes"] if node["op_type"] == "Flatten")
    assert graph["shapes"][flatten["inputs"][0]] == [1, CHANNELS, *FEATURE_HW]


@pytest.mark.parametrize(
    "dtype",
    [
        TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
        TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
        TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32, TensorProto.UINT64,
        TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ,
        TensorProto.FLOAT8E8M0,
    ],
    ids=TensorProto.DataType.Name,
)  # fmt: skip
@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "typed_field"])
def test_every_dtype_in_raw_data_and_typed_fields(tmp_path, dtype, raw):
    rng = np.random.default_rng(dtype)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    values = rng.standard_normal((3, 4)) * 20
    if dtype == TensorProto.COMPLEX64:
        values = values + 1j * rng.standard_normal((3, 4))
    if dtype == TensorProto.FLOAT8E8M0:
        values = np.abs(values) + 0.5
    array = values.astype(np_dtype)
    tensor = _initializer("t", array, raw)
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("t", dtype, None)])
    graph.initializer.append(tensor)
    path = tmp_path / "t.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with open_checkpoint(path) as ckpt:
        got = ckpt.array("t")
        expected = numpy_helper.to_array(tensor)
        assert got.dtype == expected.dtype and got.shape == (3, 4)
        assert got.tobytes() == expected.tobytes()


def test_raw_data_and_external_data_are_zero_copy_views_of_a_map(tmp_path):
    for external in (False, True):
        path = save(gemm_model(), tmp_path / f"m{external}.onnx", external=external)
        with open_checkpoint(path) as ckpt:
            for name in ckpt.tensors:
                assert isinstance(ckpt.raw(name).obj, mmap.mmap), name
                assert not ckpt.array(name).flags.owndata
            assert any("external data" in n for n in ckpt.notes) is external


def test_weight_format_per_tensor_from_gemm_and_matmul(tmp_path):
    with open_checkpoint(save(gemm_model(), tmp_path / "gemm.onnx")) as ckpt:
        formats = {name: info.weight_format for name, info in ckpt.tensors.items()}
        assert ckpt.weight_format is WeightFormat.IN_OUT
        assert any("1 out_in" in note and "1 in_out" in note for note in ckpt.notes)
    assert formats == {
        "conv.weight": None,
        "conv.bias": None,
        "fc1.weight": WeightFormat.OUT_IN,
        "fc1.bias": None,
        "fc2.weight": WeightFormat.IN_OUT,
        "fc2.bias": None,
    }
    with open_checkpoint(save(matmul_model(), tmp_path / "matmul.onnx")) as ckpt:
        assert ckpt.tensors["dense/kernel:0"].weight_format is WeightFormat.IN_OUT
        assert ckpt.tensors["dense_1/kernel:0"].weight_format is WeightFormat.IN_OUT
    # float16 weights Cast before the Gemm keep their hints through the Cast.
    with open_checkpoint(save(gemm_model(dtype=np.float16), tmp_path / "f16.onnx")) as ckpt:
        assert ckpt.tensors["fc1.weight"].dtype == "F16"
        assert ckpt.tensors["fc1.weight"].weight_format is WeightFormat.OUT_IN
        assert ckpt.tensors["fc2.weight"].weight_format is WeightFormat.IN_OUT


def _one_fc_model(nodes: list, weights: dict[str, np.ndarray], out: str = "y"):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 6))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(graph)


def test_a_transpose_before_matmul_swaps_the_format_and_a_conflict_gives_no_hint(tmp_path):
    w = np.ones((4, 6), np.float32)  # (out, in), transposed in the graph
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    with open_checkpoint(save(_one_fc_model(nodes, {"w": w}), tmp_path / "t.onnx")) as ckpt:
        assert ckpt.tensors["w"].weight_format is WeightFormat.OUT_IN
    square = np.ones((6, 6), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Gemm", ["a", "w"], ["y"], transB=1),
    ]
    with open_checkpoint(save(_one_fc_model(nodes, {"w": square}), tmp_path / "c.onnx")) as ckpt:
        assert ckpt.tensors["w"].weight_format is None
        assert any("no weight format for 'w'" in note for note in ckpt.notes)


def test_gemm_alpha_beta_are_noted(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=2.0)]
    weights = {"w": np.ones((4, 6), np.float32), "b": np.ones(4, np.float32)}
    with open_checkpoint(save(_one_fc_model(nodes, weights), tmp_path / "g.onnx")) as ckpt:
        assert any("alpha=2, beta=1" in note for note in ckpt.notes)


def test_constant_node_weights_are_read_under_their_output_names(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "ignored")),
        helper.make_node("Constant", [], ["B"], value=_initializer("ignored", b, raw=False)),
        helper.make_node("Constant", [], ["axis"], value_int=1),
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["y"]),
    ]
    path = save(_one_fc_model(nodes, {"scale": np.ones(1, np.float32)}), tmp_path / "c.onnx")
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["scale", "W", "B"]
        np.testing.assert_array_equal(ckpt.array("W"), w)
        np.testing.assert_array_equal(ckpt.array("B"), b)
        assert ckpt.tensors["W"].weight_format is WeightFormat.IN_OUT
        assert any("2 Constant node tensors" in note for note in ckpt.notes)
        assert any("left out 1 Constant nodes" in note for note in ckpt.notes)
        assert ckpt.graph["constants"] == ["W", "B"]


def test_graph_summary_walks_back_from_the_first_gemm(tmp_path):
    with open_checkpoint(save(gemm_model(), tmp_path / "m.onnx")) as ckpt:
        graph = ckpt.graph
    ops = [node["op_type"] for node in graph["nodes"]]
    assert ops == ["Conv", "Relu", "Flatten", "Gemm", "Relu", "Gemm"]
    flatten = graph["nodes"][2]
    assert flatten["inputs"] == [FLAT_INPUT] and flatten["attributes"] == {"axis": 1}
    assert graph["nodes"][3]["attributes"] == {"transB": 1}
    # onnx shape inference gives the feature map Flatten reads: (1, C, H, W).
    assert graph["shapes"][FLAT_INPUT] == [1, CHANNELS, *FEATURE_HW]
    assert graph["inputs"] == [{"name": "x", "dtype": "F32", "shape": list(IN_SHAPE)}]
    assert graph["initializers"][:2] == ["conv.weight", "conv.bias"]
    json.dumps(graph)  # plain data


# -- Bad input ---------------------------------------------------------------------------


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path.name) in message
    for needle in needles:
        assert needle in message, message
    return message


def _external_model(tmp_path: Path, location: str, extra: dict[str, str] | None = None) -> Path:
    tensor = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **(extra or {})}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([], "g", [], [], [tensor])
    path = tmp_path / "model" / "e.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def test_truncated_file(tmp_path):
    path = save(gemm_model(), tmp_path / "m.onnx")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 3):
        path.write_bytes(data[:cut])
        _refused(path, "not a valid ONNX model")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "not a valid ONNX model: the file is empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "protobuf"),
        (json.dumps({"format": "graph-model", "weightsManifest": []}).encode(), "JSON"),
        (b"\x0a\x03net\x12\x00", "no ir_version and graph"),  # a protobuf, not a model
    ],
    ids=["empty", "random", "json", "other_protobuf"],
)
def test_not_an_onnx_file(tmp_path, content, needle):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    _refused(path, needle)


def test_dims_and_data_disagree(tmp_path):
    short = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    short.raw_data = short.raw_data[:-4]
    typed = _initializer("w", np.ones((2, 3), np.float16), raw=False)
    del typed.int32_data[-1]
    for tensor, needle in ((short, "need 24 bytes, raw_data holds 20"),
                           (typed, "need 6 values, int32_data holds 5")):  # fmt: skip
        graph = helper.make_graph([], "g", [], [], [tensor])
        path = tmp_path / "bad.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
        _refused(path, "initializer 'w'", needle)


@pytest.mark.parametrize(
    ("dtype", "needle"),
    [
        (TensorProto.STRING, "string tensors are not supported"),
        (TensorProto.COMPLEX128, "COMPLEX128: safetensors has no such dtype"),
        (TensorProto.INT4, "INT4"),
    ],
)
def test_unsupported_data_types(tmp_path, dtype, needle):
    tensor = TensorProto(name="t", data_type=dtype, dims=[1])
    graph = helper.make_graph([], "g", [], [], [tensor])
    path = tmp_path / "s.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    _refused(path, "initializer 't'", needle)


def test_external_data_is_confined_to_the_models_folder(tmp_path):
    _refused(_external_model(tmp_path, "/etc/passwd"), "relative path")
    _refused(_external_model(tmp_path, "../secret.bin"), "without '..'")
    _refused(_external_model(tmp_path, "sub/../../secret.bin"), "without '..'")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 24)
    path = _external_model(tmp_path, "link.bin")
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    _refused(path, "symbolic link")
    (path.parent / "sub").symlink_to(tmp_path, target_is_directory=True)
    _refused(_external_model(tmp_path, "sub/secret.bin"), "leads out of the model's folder")
    os.link(tmp_path / "secret.bin", path.parent / "hard.bin")
    _refused(_external_model(tmp_path, "hard.bin"), "hard links")
    _refused(_external_model(tmp_path, "missing.bin"), "missing or unreadable")


def test_external_data_must_hold_the_tensor(tmp_path):
    path = _external_model(tmp_path, "w.bin", {"offset": "8", "length": "24"})
    (path.parent / "w.bin").write_bytes(b"\0" * 20)
    _refused(path, "external data", "needs 24 bytes")
    path = _external_model(tmp_path, "w.bin", {"length": "20"})
    _refused(path, "needs 24 bytes, 'w.bin' holds 20")
    path = _external_model(tmp_path, "w.bin", {"offset": "x"})
    _refused(path, "offset and length must be integers")
    (path.parent / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    with open_checkpoint(_external_model(tmp_path, "w.bin")) as ckpt:  # no length: to the end
        np.testing.assert_array_equal(ckpt.array("w"), np.arange(6).reshape(2, 3))


def test_duplicate_names_are_refused(tmp_path):
    tensors = [numpy_helper.from_array(np.ones(2, np.float32), "w") for _ in range(2)]
    graph = helper.make_graph([], "g", [], [], tensors)
    path = tmp_path / "d.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    _refused(path, "two tensors are named 'w'")


# -- From the command line ---------------------------------------------------------------

GEMM_MAP = f"""\
version: 1
layout: chw
layers:
  - name: fc1
    kernel: [{FEATURE_HW[0]}, {FEATURE_HW[1]}]
    in_channels: {CHANNELS}
  - name: fc2
"""


def _assert_refused_by_cli(run_cli, tmp_path: Path, path: Path, needle: str) -> None:
    map_path = tmp_path / "map.yaml"
    map_path.write_text(GEMM_MAP)
    out = tmp_path / "out.safetensors"
    before = sorted(tmp_path.rglob("*"))
    outcome = run_cli("convert", path, "--map", map_path, "-o", out)
    assert outcome.code == 2, (outcome.code, outcome.stderr)
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], outcome.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temp file


def test_bad_files_exit_2_with_one_line_and_write_nothing(tmp_path, run_cli):
    path = save(gemm_model(), tmp_path / "m.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_refused_by_cli(run_cli, tmp_path, path, "truncated")
    path.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 999, dtype=np.uint8)))
    _assert_refused_by_cli(run_cli, tmp_path, path, "not a valid ONNX model")
    path.write_text('{"modelTopology": {}}')
    _assert_refused_by_cli(run_cli, tmp_path, path, "JSON")
    short = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc1.weight")
    short.raw_data = short.raw_data[:8]
    path.write_bytes(
        helper.make_model(helper.make_graph([], "g", [], [], [short])).SerializeToString()
    )
    _assert_refused_by_cli(run_cli, tmp_path, path, "raw_data holds 8")
    secret = _external_model(tmp_path, "/etc/passwd")
    _assert_refused_by_cli(run_cli, tmp_path, secret, "relative path")


# -- End to end: convert, then prove with onnxruntime ------------------------------------


def _layers_map(
    first: str, second: str, rename: tuple[str, str] | None = None, layout: str = "chw"
) -> str:
    renames = [f"    rename: {r}\n" for r in rename] if rename else ["", ""]
    return (
        f"version: 1\nlayout: {layout}\nlayers:\n"
        f'  - name: "{first}"\n{renames[0]}'
        f"    kernel: [{FEATURE_HW[0]}, {FEATURE_HW[1]}]\n    in_channels: {CHANNELS}\n"
        f'  - name: "{second}"\n{renames[1]}'
    )


def _fc_values(model) -> tuple[str, str, str]:
    """The NCHW feature map Flatten reads (before a Transpose to NHWC), the first FC's
    output (after its bias) and the graph output."""
    nodes = list(model.graph.node)
    flatten = next(n for n in nodes if n.op_type == "Flatten")
    producer = next(n for n in nodes if flatten.input[0] in n.output)
    if producer.op_type == "Transpose":
        flatten = producer
    fc = next(i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul"))
    if nodes[fc].op_type == "MatMul":
        fc += 1  # the Add of its bias
    return flatten.input[0], nodes[fc].output[0], model.graph.output[0].name


def _session(model, outputs: list[str]):
    ort = pytest.importorskip("onnxruntime")
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    del extended.graph.output[:]
    for name in outputs:
        extended.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])


def _conv_head(features: np.ndarray, tensors: dict, layers: list[dict]) -> list[np.ndarray]:
    """The converted head (conv -> relu -> 1x1 conv) on a feature map, in float64."""
    torch = pytest.importorskip("torch")
    outputs, x = [], torch.from_numpy(features.astype(np.float64))
    for index, layer in enumerate(layers):
        weight = torch.from_numpy(tensors[layer["output_weight"]].astype(np.float64))
        bias = torch.from_numpy(tensors[layer["output_bias"]].astype(np.float64))
        x = torch.nn.functional.conv2d(torch.relu(x) if index else x, weight, bias)
        outputs.append(x.numpy())
    return outputs


E2E = {
    "gemm": (
        lambda p: save(gemm_model(), p),
        _layers_map("fc1", "fc2"),
        ("fc1.weight", "fc2.weight"),
    ),
    "matmul": (
        lambda p: save(matmul_model(), p),
        _layers_map("dense", "dense_1"),
        ("dense/kernel:0", "dense_1/kernel:0"),
    ),
    "matmul_nhwc": (
        lambda p: save(matmul_model(nhwc=True), p),
        _layers_map("dense", "dense_1", layout="hwc"),
        ("dense/kernel:0", "dense_1/kernel:0"),
    ),
    "float16": (
        lambda p: save(gemm_model(dtype=np.float16), p),
        _layers_map("fc1", "fc2"),
        ("fc1.weight", "fc2.weight"),
    ),
    "external": (
        lambda p: save(gemm_model(), p, external=True),
        _layers_map("fc1", "fc2"),
        ("fc1.weight", "fc2.weight"),
    ),
    "torch_export": (
        torch_export,
        _layers_map("3", "5", rename=("fc6", "fc7")),  # the docs' example map
        ("fc6.weight", "fc7.weight"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(E2E))
def test_converted_head_computes_what_onnxruntime_computes(tmp_path, run_cli, variant):
    from safetensors.numpy import load_file

    build, map_text, expected_names = E2E[variant]
    path = build(tmp_path / "m.onnx")
    map_path = tmp_path / "map.yaml"
    map_path.write_text(map_text)
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    outcome = run_cli("convert", path, "--map", map_path, "-o", out, "--json", report)
    assert outcome.code == 0, outcome.stderr
    layers = json.loads(report.read_text())["layers"]
    assert [layer["output_weight"] for layer in layers] == list(expected_names)
    assert [layer["weight_format"] for layer in layers] == (
        ["in_out", "in_out"] if variant.startswith("matmul") else
        ["out_in", "out_in"] if variant == "torch_export" else ["out_in", "in_out"]
    )  # fmt: skip
    tensors = load_file(str(out))
    assert tensors[expected_names[0]].shape == (HIDDEN, CHANNELS, *FEATURE_HW)  # oihw
    assert tensors[expected_names[1]].shape == (CLASSES, HIDDEN, 1, 1)

    model = onnx.load(str(path))
    features, fc1, y = _fc_values(model)
    rng = np.random.default_rng(7)
    # (a) At the native size: onnxruntime's own feature map through the converted head
    # gives onnxruntime's own FC outputs.
    x = rng.standard_normal(IN_SHAPE).astype(np.float32)
    feature_map, fc1_out, y_out = _session(model, [features, fc1, y]).run(None, {"x": x})
    assert feature_map.shape == (1, CHANNELS, *FEATURE_HW)
    conv1, conv2 = _conv_head(feature_map, tensors, layers)
    np.testing.assert_allclose(conv1.reshape(fc1_out.shape), fc1_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv2.reshape(y_out.shape), y_out, rtol=1e-5, atol=1e-5)
    # (b) On a larger feature map, every position equals onnxruntime's FC head applied to
    # that window.
    head_path = tmp_path / "head.onnx"
    onnx.utils.extract_model(str(path), str(head_path), [features], [y])
    head = _session(onnx.load(str(head_path)), [y])
    big = rng.standard_normal((1, CHANNELS, FEATURE_HW[0] + 3, FEATURE_HW[1] + 2))
    dense = _conv_head(big.astype(np.float32), tensors, layers)[1]
    assert dense.shape == (1, CLASSES, 4, 3)
    for i in range(4):
        for j in range(3):
            window = big[:, :, i : i + FEATURE_HW[0], j : j + FEATURE_HW[1]].astype(np.float32)
            (expected,) = head.run(None, {features: window})
            np.testing.assert_allclose(dense[0, :, i, j], expected[0], rtol=1e-5, atol=1e-5)

    assert run_cli("inspect", path).code == 0
    verified = run_cli("verify", path, out, "--map", map_path)
    assert verified.code == 0, verified.stderr
