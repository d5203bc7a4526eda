"""TF.js reader: model.json + binary shards written as tfjs-converter's write_weights does.

``_write_weights`` follows tensorflowjs/write_weights.py and quantization.py (tfjs-converter
python): a group's weights are concatenated, cut into ``shard_size`` pieces named
``group{g}-shard{i}of{n}.bin``, and quantized float32 weights carry ``quantization`` with the
quantized dtype, ``scale`` / ``min`` (affine, zero nudged like TF-Lite) and ``original_dtype``.
The layers model's topology is a real Keras 3 model config, as the converter embeds it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.readers.tfjs import read

os.environ.setdefault("KERAS_BACKEND", "torch")
# Keras' own get_weights on numpy 2 (not this code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --- the writer: tensorflowjs write_weights.py / quantization.py, without tensorflow -------


def _affine_range(min_val: float, max_val: float, dtype: type) -> tuple[float, float, float]:
    """quantization._get_affine_quantization_range: nudge so that 0 is representable."""
    quant_max = np.iinfo(dtype).max
    scale = (max_val - min_val) / quant_max
    if min_val <= 0 <= max_val:
        nudged_zero_point = np.round((0 - min_val) / scale)
        nudged_min = -nudged_zero_point * scale
        return scale, nudged_min, quant_max * scale + nudged_min
    return scale, min_val, max_val


def _quantize(data: np.ndarray, dtype: type) -> tuple[np.ndarray, dict]:
    """quantization.quantize_weights."""
    if dtype in (np.uint8, np.uint16):
        min_val = data.min().astype(np.float64)
        max_val = data.max().astype(np.float64)
        if min_val == max_val:
            return np.zeros_like(data, dtype=dtype), {"min": float(min_val), "scale": 1.0}
        scale, min_val, max_val = _affine_range(min_val, max_val, dtype)
        quantized = np.round((data.clip(min_val, max_val) - min_val) / scale).astype(dtype)
        return quantized, {"min": float(min_val), "scale": float(scale)}
    return data.astype(np.float16), {}


def _write_weights(
    groups: list[list[tuple[str, np.ndarray]]],
    folder: Path,
    shard_size: int = 4 * 1024 * 1024,
    quantization: dict[str, str] | None = None,
) -> list[dict]:
    """write_weights.write_weights: returns the manifest, writes the shards into folder."""
    dtypes = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}
    manifest = []
    for group_index, group in enumerate(groups):
        entries = []
        for name, data in group:
            entry = {"name": name, "data": data}
            qdtype = next(
                (
                    d
                    for d, pattern in (quantization or {}).items()
                    if fnmatch.fnmatch(name, pattern)
                ),
                None,
            )
            if qdtype is not None and data.dtype == np.float32:  # only float32 is quantized
                quantized, meta = _quantize(data, dtypes[qdtype])
                meta["original_dtype"] = data.dtype.name
                entry = {"name": name, "data": quantized, "quantization": meta}
            entries.append(entry)
        group_bytes = b"".join(_serialize(e["data"]) for e in entries)
        count = math.ceil(len(group_bytes) / shard_size)
        paths = []
        for i in range(count):
            filename = f"group{group_index + 1}-shard{i + 1}of{count}.bin"
            (folder / filename).write_bytes(group_bytes[i * shard_size : (i + 1) * shard_size])
            paths.append(filename)
        weights = []
        for e in entries:
            quantized = "quantization" in e
            dtype = e["quantization"]["original_dtype"] if quantized else e["data"].dtype.name
            spec = {"name": e["name"], "shape": list(e["data"].shape), "dtype": dtype}
            if dtype == "object":
                spec["dtype"] = "string"
            if quantized:
                spec["quantization"] = {"dtype": e["data"].dtype.name, **e["quantization"]}
            weights.append(spec)
        manifest.append({"paths": paths, "weights": weights})
    return manifest


def _serialize(data: np.ndarray) -> bytes:
    """_serialize_string_array (uint32 length + bytes per value) or data.tobytes()."""
    if data.dtype == object:
        return b"".join(
            np.array(len(s), "<u4").tobytes() + s for s in (x.encode() for x in data.flat)
        )
    return data.tobytes()


def _write_model(folder: Path, document: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.json"
    path.write_text(json.dumps(document))
    return path


# --- a Keras model: Conv2D -> Flatten -> Dense -> Dense, and its TF.js export ----------------

_SIDE, _CHANNELS, _FILTERS, _HIDDEN, _CLASSES = 6, 3, 4, 5, 3


def _keras_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((_SIDE, _SIDE, _CHANNELS)),
            keras.layers.Conv2D(_FILTERS, 3, name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(_HIDDEN, activation="relu", name="fc1"),
            keras.layers.Dense(_CLASSES, name="fc2"),
        ]
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:  # nonzero biases, so a lost bias shows
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.weights])
    return model


def _layers_topology(model) -> dict:
    """What tfjs-converter's h5_v3 conversion embeds: keras_version and model_config."""
    import keras

    def discard(obj):  # _discard_v3_keys
        if isinstance(obj, dict):
            return {
                k: discard(v)
                for k, v in obj.items()
                if k not in ("module", "registered_name", "date_saved")
            }
        if isinstance(obj, list):
            return [discard(v) for v in obj]
        return obj

    return {
        "keras_version": keras.__version__,
        "model_config": discard(json.loads(model.to_json())),
    }


def _keras_weights(model) -> list[tuple[str, np.ndarray]]:
    return [
        (f"{layer.name}/{w.name}", np.asarray(w.numpy(), dtype=np.float32))
        for layer in model.layers
        for w in layer.weights
    ]


@pytest.fixture(scope="module")
def keras_model():
    return _keras_model()


def _export_layers_model(
    folder: Path, model, shard_size: int = 1000, quantization: dict[str, str] | None = None
) -> Path:
    """A layers model in one group of shards (1000 bytes cuts fc1/kernel in two)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _write_weights([_keras_weights(model)], folder, shard_size, quantization)
    document = {
        "format": "layers-model",
        "generatedBy": "keras v3",
        "convertedBy": "TensorFlow.js Converter v4.22.0",
        "modelTopology": _layers_topology(model),
        "weightsManifest": manifest,
    }
    return _write_model(folder, document)


def _dequantized(data: np.ndarray, qdtype: type) -> np.ndarray:
    """q * scale + min, from the writer's own q, scale and min (independent of the reader)."""
    q, meta = _quantize(data, qdtype)
    if qdtype is np.float16:
        return q.astype(np.float32)
    return (q.astype(np.float64) * meta["scale"] + meta["min"]).astype(np.float32)


# --- reader level ----------------------------------------------------------------------------


def test_layers_model_names_shapes_and_bytes(tmp_path, keras_model):
    path = _export_layers_model(tmp_path / "m", keras_model)
    weights = _keras_weights(keras_model)
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.bin"))
    assert shards == ["group1-shard1of2.bin", "group1-shard2of2.bin"]
    loaded = read(path)
    try:
        assert list(loaded.tensors) == [name for name, _ in weights]
        assert loaded.weight_format is WeightFormat.IN_OUT
        formats = {n: i.weight_format for n, i in loaded.tensors.items()}
        assert formats == {
            "conv/kernel": None, "conv/bias": None, "fc1/kernel": WeightFormat.IN_OUT,
            "fc1/bias": None, "fc2/kernel": WeightFormat.IN_OUT, "fc2/bias": None,
        }  # fmt: skip
        assert loaded.notes == ()
        for name, data in weights:
            info = loaded.tensors[name]
            assert (info.dtype, info.shape) == ("F32", data.shape)
            assert bytes(loaded.buffers[name]) == data.tobytes()
        assert loaded.graph["format"] == "layers-model"
        config = loaded.graph["modelTopology"]["model_config"]
        assert config["class_name"] == "Sequential"
        assert [layer["class_name"] for layer in config["config"]["layers"]][-2:] == [
            "Dense",
            "Dense",
        ]
    finally:
        loaded.close()


def test_a_weight_in_one_shard_is_a_view_of_the_map_and_a_spanning_one_is_joined(
    tmp_path, keras_model
):
    path = _export_layers_model(tmp_path / "m", keras_model)
    loaded = read(path)
    try:
        # conv/kernel [0, 432) lies in shard 1; fc1/kernel [448, 1728) spans both shards.
        assert isinstance(loaded.buffers["conv/kernel"].obj, mmap.mmap)
        assert isinstance(loaded.buffers["fc2/kernel"].obj, mmap.mmap)
        assert not isinstance(loaded.buffers["fc1/kernel"].obj, mmap.mmap)
        fc1 = dict(_keras_weights(keras_model))["fc1/kernel"]
        assert bytes(loaded.buffers["fc1/kernel"]) == fc1.tobytes()
    finally:
        loaded.close()


@pytest.mark.parametrize("shard_size", [3, 7, 432, 448, 1820, 1 << 20])
def test_every_shard_size_gives_the_same_bytes(tmp_path, keras_model, shard_size):
    path = _export_layers_model(tmp_path / "m", keras_model, shard_size=shard_size)
    with open_checkpoint(path) as checkpoint:
        for name, data in _keras_weights(keras_model):
            np.testing.assert_array_equal(checkpoint.array(name), data)


@pytest.mark.parametrize(
    ("qdtype", "name"), [(np.uint8, "uint8"), (np.uint16, "uint16"), (np.float16, "float16")]
)
def test_quantized_weights_are_dequantized_to_float32(tmp_path, keras_model, qdtype, name):
    path = _export_layers_model(tmp_path / "m", keras_model, quantization={name: "*"})
    manifest = json.loads(path.read_text())["weightsManifest"][0]["weights"]
    assert {w["quantization"]["dtype"] for w in manifest} == {name}
    with open_checkpoint(path) as checkpoint:
        assert f"dequantized 6 tensors from {name} to float32" in checkpoint.notes
        for weight_name, data in _keras_weights(keras_model):
            assert checkpoint.tensors[weight_name].dtype == "F32"
            expected = _dequantized(data, qdtype)
            np.testing.assert_array_equal(checkpoint.array(weight_name), expected)
            if qdtype is not np.float16:  # quantized: close to the source, not equal
                step = (data.max() - data.min()) / np.iinfo(qdtype).max
                assert np.abs(checkpoint.array(weight_name) - data).max() <= step
    # The quantized shards are a quarter (uint8) or half the float32 size.
    stored = sum(p.stat().st_size for p in path.parent.glob("*.bin"))
    assert stored == sum(d.size for _, d in _keras_weights(keras_model)) * np.dtype(qdtype).itemsize


def test_only_matching_weights_are_quantized_and_noted(tmp_path, keras_model):
    path = _export_layers_model(tmp_path / "m", keras_model, quantization={"uint8": "fc1/*"})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.notes == ("dequantized 2 tensors from uint8 to float32",)
        weights = dict(_keras_weights(keras_model))
        np.testing.assert_array_equal(checkpoint.array("conv/kernel"), weights["conv/kernel"])
        np.testing.assert_array_equal(
            checkpoint.array("fc1/kernel"), _dequantized(weights["fc1/kernel"], np.uint8)
        )


def test_int32_dequantization_rounds_halves_up_as_tfjs_does(tmp_path):
    q = np.array([0, 1, 2, 3, 255], np.uint8)
    (tmp_path / "w.bin").write_bytes(q.tobytes())
    spec = {"dtype": "uint8", "scale": 0.5, "min": -1.0, "original_dtype": "int32"}
    weights = [{"name": "ids", "shape": [5], "dtype": "int32", "quantization": spec}]
    path = _write_model(tmp_path, {"weightsManifest": [{"paths": ["w.bin"], "weights": weights}]})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.tensors["ids"].dtype == "I32"
        # JavaScript Math.round(q * 0.5 - 1): -1, -0.5 -> -0, 0, 0.5 -> 1, 126.5 -> 127
        assert checkpoint.array("ids").tolist() == [-1, 0, 0, 1, 127]
        assert checkpoint.notes == ("dequantized 1 tensor from uint8 to int32",)


def test_stored_dtypes_are_kept_and_strings_are_left_out(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [
        ("half", rng.normal(size=(3, 2)).astype(np.float16)),
        ("words", np.array(["a", "", "héllo"], dtype=object)),
        ("ints", rng.integers(-9, 9, size=(4,)).astype(np.int32)),
        ("mask", np.array([True, False, True])),
        ("bytes", np.arange(5, dtype=np.uint8)),
        ("u16", np.arange(3, dtype=np.uint16)),
        ("z", (rng.normal(size=2) + 1j * rng.normal(size=2)).astype(np.complex64)),
        ("scalar", np.array(2.5, np.float32)),
        ("empty", np.zeros((0, 3), np.float32)),
    ]
    manifest = _write_weights([arrays], tmp_path, shard_size=5)
    path = _write_model(tmp_path, {"format": "graph-model", "weightsManifest": manifest})
    with open_checkpoint(path) as checkpoint:
        codes = {n: (i.dtype, i.shape) for n, i in checkpoint.tensors.items()}
        assert codes == {
            "half": ("F16", (3, 2)), "ints": ("I32", (4,)), "mask": ("BOOL", (3,)),
            "bytes": ("U8", (5,)), "u16": ("U16", (3,)), "z": ("C64", (2,)),
            "scalar": ("F32", ()), "empty": ("F32", (0, 3)),
        }  # fmt: skip
        for name, data in arrays:
            if name != "words":
                assert bytes(checkpoint.raw(name)) == data.tobytes(), name
        assert checkpoint.notes == ("left out 1 string tensors (not numeric): words",)


def test_groups_have_their_own_shards(tmp_path, keras_model):
    weights = _keras_weights(keras_model)
    by_layer = [weights[0:2], weights[2:4], weights[4:6]]  # split_weights_by_layer
    manifest = _write_weights(by_layer, tmp_path, shard_size=300)
    path = _write_model(tmp_path, {"format": "layers-model", "weightsManifest": manifest})
    assert len(manifest) == 3 and len(manifest[1]["paths"]) == 5
    with open_checkpoint(path) as checkpoint:
        for name, data in weights:
            np.testing.assert_array_equal(checkpoint.array(name), data)


def test_shards_may_lie_in_a_subfolder(tmp_path, keras_model):
    (tmp_path / "weights").mkdir()
    manifest = _write_weights([_keras_weights(keras_model)], tmp_path / "weights", 1000)
    for group in manifest:
        group["paths"] = [f"weights/{p}" for p in group["paths"]]
    path = _write_model(tmp_path, {"weightsManifest": manifest, "modelTopology": None})
    with open_checkpoint(path) as checkpoint:
        assert len(checkpoint.tensors) == 6
        assert checkpoint.graph == {"format": None, "modelTopology": None, "signature": None}


def _graph_model(folder: Path, transpose_b: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """A graph model as tensorflowjs_converter writes one from a SavedModel: a GraphDef as
    JSON whose Const weights were moved to the manifest (names = node names)."""
    rng = np.random.default_rng(2)
    prefix = "StatefulPartitionedCall/sequential"
    kernel = f"{prefix}/fc1/MatMul/ReadVariableOp"
    bias = f"{prefix}/fc1/BiasAdd/ReadVariableOp"
    kernel2 = f"{prefix}/fc2/MatMul/ReadVariableOp"
    shape = (5, 8) if transpose_b else (8, 5)
    weights = {
        kernel: rng.normal(size=shape).astype(np.float32),
        bias: rng.normal(size=5).astype(np.float32),
        kernel2: rng.normal(size=(5, 3)).astype(np.float32),
    }
    attr = {"T": {"type": "DT_FLOAT"}, "transpose_a": {"b": False}}
    dims = {"dim": [{"size": "-1"}, {"size": "8"}]}
    nodes = [
        {"name": "input", "op": "Placeholder", "attr": {"shape": {"shape": dims}}},
        *({"name": n, "op": "Const", "attr": {"dtype": {"type": "DT_FLOAT"}}} for n in weights),
        {"name": f"{prefix}/fc1/MatMul", "op": "MatMul", "input": ["input", kernel],
         "attr": {**attr, "transpose_b": {"b": transpose_b}}},
        {"name": f"{prefix}/fc1/BiasAdd", "op": "BiasAdd", "input": [f"{prefix}/fc1/MatMul", bias]},
        {"name": f"{prefix}/fc2/MatMul", "op": "MatMul",
         "input": [f"{prefix}/fc1/BiasAdd", kernel2], "attr": attr},
        {"name": "Identity", "op": "Identity", "input": [f"{prefix}/fc2/MatMul"]},
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _write_weights([list(weights.items())], folder, shard_size=64)
    document = {
        "format": "graph-model",
        "generatedBy": "2.16.1",
        "convertedBy": "TensorFlow.js Converter v4.22.0",
        "signature": {"outputs": {"output_0": {"name": "Identity:0"}}},
        "modelTopology": {"node": nodes, "library": {}, "versions": {"producer": 1808}},
        "weightsManifest": manifest,
    }
    return _write_model(folder, document), weights


@pytest.mark.parametrize("transpose_b", [False, True])
def test_graph_model_names_and_matmul_hints(tmp_path, transpose_b):
    path, weights = _graph_model(tmp_path, transpose_b)
    with open_checkpoint(path) as checkpoint:
        assert list(checkpoint.tensors) == list(weights)
        for name, data in weights.items():
            np.testing.assert_array_equal(checkpoint.array(name), data)
        kernel, bias, kernel2 = weights
        stored = WeightFormat.OUT_IN if transpose_b else WeightFormat.IN_OUT
        assert checkpoint.tensors[kernel].weight_format is stored
        assert checkpoint.tensors[kernel2].weight_format is WeightFormat.IN_OUT
        assert checkpoint.tensors[bias].weight_format is None  # not 2-D: no FC format
        assert checkpoint.graph["format"] == "graph-model"
        ops = [node["op"] for node in checkpoint.graph["modelTopology"]["node"]]
        assert ops.count("MatMul") == 2


def test_format_is_inferred_from_the_topology_when_missing(tmp_path):
    path, _ = _graph_model(tmp_path)
    document = json.loads(path.read_text())
    del document["format"]
    path.write_text(json.dumps(document))
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.graph["format"] == "graph-model"
        assert any("taken as a graph-model" in note for note in checkpoint.notes)


def test_an_unknown_format_is_noted(tmp_path):
    path, weights = _graph_model(tmp_path)
    _edit(path, lambda d: d.update(format="saved-model"))
    with open_checkpoint(path) as checkpoint:
        assert list(checkpoint.tensors) == list(weights)
        assert checkpoint.notes == (
            "format 'saved-model' is neither of layers-model, graph-model: only its "
            "weightsManifest is read",
        )


def test_a_bare_weights_manifest_is_read(tmp_path, keras_model):
    manifest = _write_weights([_keras_weights(keras_model)], tmp_path, 1000)
    path = tmp_path / "weights_manifest.json"
    path.write_text(json.dumps(manifest))
    with open_checkpoint(path) as checkpoint:
        assert len(checkpoint.tensors) == 6
        assert checkpoint.graph is None
        assert checkpoint.notes == ("a bare weights manifest: no model topology",)


def test_trailing_shard_bytes_are_noted(tmp_path, keras_model):
    path = _export_layers_model(tmp_path, keras_model)
    with open(tmp_path / "group1-shard2of2.bin", "ab") as file:
        file.write(b"\0" * 8)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.notes == (
            "weight group 1: 8 bytes after its weights in the shards were ignored",
        )


def test_a_symlinked_shard_is_followed(tmp_path, keras_model):
    """As in a Hugging Face cache, where snapshot files link to ../../blobs."""
    path = _export_layers_model(tmp_path / "snapshot", keras_model)
    shard = tmp_path / "snapshot" / "group1-shard2of2.bin"
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shard.rename(blob)
    shard.symlink_to(Path("..") / "blobs" / blob.name)
    with open_checkpoint(path) as checkpoint:
        fc2 = dict(_keras_weights(keras_model))["fc2/kernel"]
        np.testing.assert_array_equal(checkpoint.array("fc2/kernel"), fc2)


# --- bad input -------------------------------------------------------------------------------


def _edit(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _first_weight(document: dict) -> dict:
    return document["weightsManifest"][0]["weights"][0]


def _safetensors_bytes(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(path))


_BAD = {
    "not_tfjs": (
        lambda p: p.write_text(json.dumps({"class_name": "Sequential", "config": {}})),
        "not a TF.js model (no 'weightsManifest')",
    ),
    "missing_shard": (
        lambda p: (p.parent / "group1-shard2of2.bin").unlink(),
        "missing weight shard 'group1-shard2of2.bin'",
    ),
    "short_shard": (
        lambda p: os.truncate(p.parent / "group1-shard2of2.bin", 819),
        "holds 1819 bytes, but its weights need 1820: a shard is short",
    ),
    "truncated_json": (
        lambda p: p.write_text(p.read_text()[:-40]),
        "not a valid TF.js model.json (truncated or corrupt JSON",
    ),
    "empty_json": (lambda p: p.write_text(""), "truncated or corrupt JSON"),
    "unknown_dtype": (
        lambda p: _edit(p, lambda d: _first_weight(d).update(dtype="float64")),
        "weight 'conv/kernel': unknown dtype 'float64'",
    ),
    "bad_shape": (
        lambda p: _edit(p, lambda d: _first_weight(d).update(shape=[3, -1])),
        "weight 'conv/kernel': shape [3, -1] is not a list of sizes",
    ),
    "dotdot_path": (
        lambda p: _edit(p, lambda d: d["weightsManifest"][0]["paths"].__setitem__(0, "../x.bin")),
        "refused shard path '../x.bin'",
    ),
    "absolute_path": (
        lambda p: _edit(
            p, lambda d: d["weightsManifest"][0]["paths"].__setitem__(0, "/etc/passwd")
        ),
        "refused shard path '/etc/passwd'",
    ),
    "url_path": (
        lambda p: _edit(
            p, lambda d: d["weightsManifest"][0]["paths"].__setitem__(0, "https://x/y.bin")
        ),
        "refused shard path 'https://x/y.bin'",
    ),
    "duplicate_name": (
        lambda p: _edit(
            p, lambda d: d["weightsManifest"][0]["weights"][1].update(name="conv/kernel")
        ),
        "weight 'conv/kernel' appears twice",
    ),
    "bad_quantization": (
        lambda p: _edit(p, lambda d: _first_weight(d).update(quantization={"dtype": "uint8"})),
        "uint8 quantization needs a finite number 'scale'",
    ),
    "unknown_quantization": (
        lambda p: _edit(p, lambda d: _first_weight(d).update(quantization={"dtype": "int4"})),
        "unknown quantization dtype 'int4'",
    ),
    "float16_quantized_int": (
        lambda p: _edit(
            p, lambda d: _first_weight(d).update(dtype="int32", quantization={"dtype": "float16"})
        ),
        "float16 quantization of a 'int32' weight",
    ),
    "manifest_not_a_list": (
        lambda p: _edit(p, lambda d: d.update(weightsManifest={"paths": []})),
        "'weightsManifest' must be a list",
    ),
    "no_weights": (
        lambda p: _edit(p, lambda d: d.update(weightsManifest=[])),
        "no tensors found in the TF.js weights manifest",
    ),
    "not_utf8": (lambda p: p.write_bytes(b'{"a": "\xff"}'), "not UTF-8 text"),
    "binary_under_json": (lambda p: p.write_bytes(bytes(range(256)) * 4), "not UTF-8 text"),
    "safetensors_under_json": (_safetensors_bytes, "the content is a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_input_is_one_line(tmp_path, keras_model, case):
    path = _export_layers_model(tmp_path / "m", keras_model)
    spoil, message = _BAD[case]
    spoil(path)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    assert message in caught.value.message
    assert "\n" not in caught.value.message and str(path) in caught.value.message


@pytest.mark.parametrize(
    "case",
    ["missing_shard", "short_shard", "truncated_json", "not_tfjs", "unknown_dtype",
     "dotdot_path", "binary_under_json", "safetensors_under_json"],
)  # fmt: skip
def test_bad_input_from_the_cli_exits_2_and_writes_nothing(run_cli, tmp_path, keras_model, case):
    path = _export_layers_model(tmp_path / "m", keras_model)
    _BAD[case][0](path)
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(
        "version: 1\nlayers:\n  - {name: fc1, weight: fc1/kernel, bias: fc1/bias}\n"
    )
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", path, "--map", layer_map, "-o", output)
    assert outcome.code == 2, outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "map.yaml"]


# --- end to end: convert, then prove with Keras ----------------------------------------------

_MAP = """\
version: 1
layout: hwc             # Keras Flatten on NHWC
layers:                 # no weight_format: TF.js stores in_out
  - name: fc1
    kernel: [4, 4]
    in_channels: 4
  - name: fc2
"""


def _convert(run_cli, tmp_path: Path, source: Path, text: str = _MAP) -> tuple[dict, dict]:
    """Run ``fc2conv convert``; returns the output tensors and the JSON report."""
    from safetensors.numpy import load_file

    layer_map = tmp_path / "head.yaml"
    layer_map.write_text(text)
    output, report = tmp_path / "head_fcn.safetensors", tmp_path / "report.json"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report)
    assert outcome.code == 0, outcome.stderr
    return load_file(str(output)), json.loads(report.read_text())


def _conv_head(tensors: dict, report: dict, features_nhwc: np.ndarray) -> np.ndarray:
    """The converted head (oihw conv weights) run by torch on a Keras NHWC feature map:
    conv fc1, relu, 1x1 conv fc2; returns NHWC."""
    import torch
    from torch.nn.functional import conv2d, relu

    (fc1, fc2) = report["layers"]
    x = torch.from_numpy(np.ascontiguousarray(features_nhwc.transpose(0, 3, 1, 2))).double()
    for layer, act in ((fc1, relu), (fc2, lambda t: t)):
        weight = torch.from_numpy(tensors[layer["output_weight"]]).double()
        bias = torch.from_numpy(tensors[layer["output_bias"]]).double()
        x = act(conv2d(x, weight, bias))
    return x.numpy().transpose(0, 2, 3, 1)


def _keras_with(weights: dict[str, np.ndarray]):
    """The same Keras architecture holding ``weights`` (dequantized ones where quantized)."""
    model = _keras_model()
    for layer in model.layers:
        layer.set_weights([weights[f"{layer.name}/{w.name}"] for w in layer.weights])
    return model


def _keras_fc(model, features_nhwc: np.ndarray) -> np.ndarray:
    """Keras' own Flatten -> fc1 -> fc2 on a feature map of the native size."""
    import keras

    x = features_nhwc
    for layer in model.layers[1:]:
        x = keras.ops.convert_to_numpy(layer(x))
    return x


@pytest.mark.parametrize("quantization", [None, "uint8", "uint16", "float16"])
def test_converted_head_matches_keras(run_cli, tmp_path, keras_model, quantization):
    """(a) native size: Keras' feature map -> converted conv head == Keras' FC output;
    (b) a larger feature map: every position == Keras' FC on that window."""
    import keras

    qdtypes = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}
    source = _export_layers_model(
        tmp_path / "web_model",
        keras_model,
        quantization={quantization: "*"} if quantization else None,
    )
    tensors, report = _convert(run_cli, tmp_path, source)
    assert [layer["weight_format"] for layer in report["layers"]] == ["in_out", "in_out"]
    assert [layer["output_weight"] for layer in report["layers"]] == ["fc1/kernel", "fc2/kernel"]
    assert tensors["fc1/kernel"].shape == (_HIDDEN, _FILTERS, 4, 4)
    if quantization:
        assert f"dequantized 6 tensors from {quantization} to float32" in report["notes"]
    weights = {
        name: _dequantized(data, qdtypes[quantization]) if quantization else data
        for name, data in _keras_weights(keras_model)
    }
    model = _keras_with(weights)
    rng = np.random.default_rng(3)

    # (a) native input size: the whole Keras model vs the conv head on Keras' feature map.
    images = rng.normal(size=(4, _SIDE, _SIDE, _CHANNELS)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(images))
    features = keras.ops.convert_to_numpy(model.layers[0](images))  # Keras' own Conv2D
    assert features.shape == (4, 4, 4, _FILTERS)
    conv = _conv_head(tensors, report, features.astype(np.float64))
    assert conv.shape == (4, 1, 1, _CLASSES)
    np.testing.assert_allclose(conv[:, 0, 0], expected, rtol=1e-5, atol=1e-5)

    # (b) a larger map (9 x 9 images -> 7 x 7 features): every 4 x 4 window, by Keras.
    big = rng.normal(size=(2, 9, 9, _CHANNELS)).astype(np.float32)
    features = keras.ops.convert_to_numpy(model.layers[0](big))
    dense = _conv_head(tensors, report, features.astype(np.float64))
    assert dense.shape == (2, 4, 4, _CLASSES)
    for i in range(4):
        for j in range(4):
            window = features[:, i : i + 4, j : j + 4, :]
            np.testing.assert_allclose(
                dense[:, i, j], _keras_fc(model, window), rtol=1e-5, atol=1e-5
            )


def test_hwio_output_loads_into_a_keras_conv2d(run_cli, tmp_path, keras_model):
    import keras

    source = _export_layers_model(tmp_path / "web_model", keras_model)
    tensors, _ = _convert(
        run_cli, tmp_path, source, _MAP.replace("layers:", "conv_format: hwio\nlayers:")
    )
    assert tensors["fc1/kernel"].shape == (4, 4, _FILTERS, _HIDDEN)
    head = keras.Sequential(
        [
            keras.Input((None, None, _FILTERS)),
            keras.layers.Conv2D(_HIDDEN, 4, activation="relu", name="fc1"),
            keras.layers.Conv2D(_CLASSES, 1, name="fc2"),
        ]
    )
    for name in ("fc1", "fc2"):
        head.get_layer(name).set_weights([tensors[f"{name}/kernel"], tensors[f"{name}/bias"]])
    features = np.random.default_rng(4).normal(size=(3, 4, 4, _FILTERS)).astype(np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(head(features))[:, 0, 0],
        _keras_fc(keras_model, features),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("transpose_b", [False, True])
def test_graph_model_converts_with_its_matmul_weight_format(run_cli, tmp_path, transpose_b):
    """The graph's own arithmetic (MatMul with transpose_b, BiasAdd) on a 2 x 2 x 2 map."""
    path, weights = _graph_model(tmp_path / "graph", transpose_b)
    kernel, bias, _ = weights
    text = (
        "version: 1\nlayout: hwc\nlayers:\n"
        f"  - {{name: fc1, weight: '{kernel}', bias: '{bias}', kernel: [2, 2], in_channels: 2}}\n"
    )
    tensors, report = _convert(run_cli, tmp_path, path, text)
    (layer,) = report["layers"]
    assert layer["weight_format"] == ("out_in" if transpose_b else "in_out")
    assert layer["output_weight"] == kernel
    features = np.random.default_rng(5).normal(size=(3, 2, 2, 2))
    w = weights[kernel].astype(np.float64)
    fc = features.reshape(3, 8) @ (w.T if transpose_b else w) + weights[bias]
    conv = np.einsum("nhwc,ochw->no", features, tensors[kernel]) + tensors[bias]
    np.testing.assert_allclose(conv, fc, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quantization", [None, "uint8"])
def test_inspect_and_verify_exit_0(run_cli, tmp_path, keras_model, quantization):
    source = _export_layers_model(
        tmp_path / "web_model",
        keras_model,
        quantization={quantization: "*"} if quantization else None,
    )
    _convert(run_cli, tmp_path, source)
    inspected = run_cli("inspect", source)
    assert inspected.code == 0, inspected.stderr
    assert "fc1/kernel" in inspected.stdout
    verified = run_cli(
        "verify", source, tmp_path / "head_fcn.safetensors", "--map", tmp_path / "head.yaml"
    )
    assert verified.code == 0, verified.stderr
