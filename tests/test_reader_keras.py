"""Keras reader: every file Keras 2 and 3 write, judged by Keras 3 itself (torch backend).

The models are built and saved by Keras (``.keras``, ``.weights.h5``, legacy ``.h5``);
Keras 2 files, which Keras 3 no longer writes, are written with h5py exactly as
``legacy_h5_format`` lays them out (``layer_names`` / ``weight_names`` with ``:0`` names).
Each tensor is compared with the layer's own variable (``layer.weights``), each
conversion with Keras' own forward pass.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is first imported

import io
import json
import mmap
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import open_checkpoint

h5py = pytest.importorskip("h5py")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
SIDE, CHANNELS = 4, 4  # the feature map that Flatten turns into fc1's input
# Every file variant of one model: the name its test id shows, and its file name.
VARIANTS = ("keras", "weights_h5", "legacy_h5", "keras2_full_h5", "keras2_weights_h5")


def _vgg_like(seed: int = 7) -> keras.Model:
    """Conv -> BN -> pool -> Flatten -> fc1 -> nested model (fc2) -> predictions.

    Every variable holds seeded random values (BN statistics too), so each byte tells.
    """
    keras.utils.set_random_seed(seed)
    head = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="relu", name="fc2")], name="head"
    )
    model = keras.Sequential(
        [
            keras.Input((2 * SIDE, 2 * SIDE, 3)),
            keras.layers.Conv2D(CHANNELS, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(6, activation="relu", name="fc1"),
            head,
            keras.layers.Dense(3, name="predictions"),
        ],
        name="vggish",
    )
    _randomize(model, seed)
    return model


def _randomize(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.standard_normal(tuple(variable.shape))
        if variable.name == "moving_variance":
            value = np.abs(value) + 0.5
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _own_variables(model: keras.Model, prefix: str = "") -> dict[str, np.ndarray]:
    """Keras' own ``LAYER/VAR`` -> value, nested models' layers under the model's name."""
    found: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(_own_variables(layer, f"{prefix}{layer.name}/"))
            continue
        for variable in layer.weights:
            found[f"{prefix}{layer.name}/{variable.name}"] = keras.ops.convert_to_numpy(variable)
    return found


def write_keras2(path: Path, model: keras.Model, full: bool) -> Path:
    """A Keras 2 (tf.keras) ``.h5`` as ``legacy_h5_format`` writes it: ``layer_names``,
    one group per layer with ``weight_names`` such as ``fc1/kernel:0`` (a nested model's
    layers keep their own names, in the nested model's group); a full model also has
    ``model_config`` and its weights under ``model_weights``."""
    with h5py.File(path, "w") as file:
        group = file.create_group("model_weights") if full else file
        if full:
            config = {"class_name": "Sequential", "config": model.get_config()}
            file.attrs["model_config"] = json.dumps(config).encode()
            file.attrs["keras_version"] = b"2.15.0"
            file.attrs["backend"] = b"tensorflow"
        group.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        group.attrs["keras_version"] = b"2.15.0"
        group.attrs["backend"] = b"tensorflow"
        for layer in model.layers:
            layer_group = group.create_group(layer.name)
            inner = layer.layers if isinstance(layer, keras.Model) else [layer]
            weights = [(f"{sub.name}/{v.name}:0", v) for sub in inner for v in sub.weights]
            names = [name.encode() for name, _ in weights]
            layer_group.attrs["weight_names"] = names if names else np.zeros(0)
            for name, variable in weights:
                layer_group.create_dataset(name, data=keras.ops.convert_to_numpy(variable))
    return path


@dataclass(frozen=True)
class Saved:
    model: keras.Model
    expected: dict[str, np.ndarray]
    files: dict[str, Path]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """One model, saved every way Keras 2 and 3 save it."""
    folder = tmp_path_factory.mktemp("keras")
    model = _vgg_like()
    files = {
        "keras": folder / "model.keras",
        "weights_h5": folder / "model.weights.h5",
        "legacy_h5": folder / "model.h5",
    }
    model.save(files["keras"])
    model.save_weights(files["weights_h5"])
    model.save(files["legacy_h5"])
    files["keras2_full_h5"] = write_keras2(folder / "keras2_model.h5", model, full=True)
    files["keras2_weights_h5"] = write_keras2(folder / "keras2_weights.h5", model, full=False)
    return Saved(model, _own_variables(model), files)


def _assert_same_tensors(checkpoint, expected: dict[str, np.ndarray]) -> None:
    assert set(checkpoint.tensors) == set(expected)
    for name, value in expected.items():
        info = checkpoint.tensors[name]
        assert (info.dtype, info.shape) == ("F32", value.shape), name
        assert bytes(checkpoint.raw(name)) == value.tobytes(), name


# Reader level: names, dtypes, shapes and bytes equal Keras' own variables.


def test_the_model_has_what_the_names_promise(saved):
    assert sorted(saved.expected) == sorted(
        [
            "conv1/kernel", "conv1/bias", "bn/gamma", "bn/beta", "bn/moving_mean",
            "bn/moving_variance", "fc1/kernel", "fc1/bias", "head/fc2/kernel", "head/fc2/bias",
            "predictions/kernel", "predictions/bias",
        ]
    )  # fmt: skip
    assert saved.expected["fc1/kernel"].shape == (SIDE * SIDE * CHANNELS, 6)  # (in, out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_reads_keras_own_variables(saved, variant):
    with open_checkpoint(saved.files[variant]) as checkpoint:
        assert checkpoint.kind == "keras"
        assert checkpoint.weight_format is WeightFormat.IN_OUT
        _assert_same_tensors(checkpoint, saved.expected)


def test_model_order_where_the_file_gives_it(saved):
    order = list(saved.expected)  # Keras' own layer order
    for variant in ("keras", "legacy_h5", "keras2_full_h5", "keras2_weights_h5"):
        with open_checkpoint(saved.files[variant]) as checkpoint:
            assert list(checkpoint.tensors) == order, variant


def test_graph_is_the_model_config(saved):
    with zipfile.ZipFile(saved.files["keras"]) as archive:
        config = json.loads(archive.read("config.json"))
    with open_checkpoint(saved.files["keras"]) as checkpoint:
        assert checkpoint.graph == config
        assert checkpoint.graph["class_name"] == "Sequential"
    with h5py.File(saved.files["legacy_h5"]) as file:
        model_config = json.loads(file.attrs["model_config"])
    with open_checkpoint(saved.files["legacy_h5"]) as checkpoint:
        assert checkpoint.graph == model_config
        layers = [la["config"]["name"] for la in checkpoint.graph["config"]["layers"]]
        assert "fc1" in layers and "predictions" in layers
    for variant in ("weights_h5", "keras2_weights_h5"):
        with open_checkpoint(saved.files[variant]) as checkpoint:
            assert checkpoint.graph is None


@pytest.mark.parametrize("variant", ["keras", "weights_h5", "legacy_h5", "keras2_full_h5"])
def test_contiguous_data_is_memory_mapped(saved, variant):
    with open_checkpoint(saved.files[variant]) as checkpoint:
        for name in checkpoint.tensors:
            assert isinstance(checkpoint.raw(name).obj, mmap.mmap), name
            assert not checkpoint.array(name).flags.owndata
        assert not any("memory" in note for note in checkpoint.notes)


def test_compressed_keras_zip_is_extracted_to_memory(saved, tmp_path):
    deflated = tmp_path / "deflated.keras"
    _rezip(saved.files["keras"], deflated, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(deflated) as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    with open_checkpoint(deflated) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)
        assert any("compressed" in n and "memory" in n for n in checkpoint.notes)


def test_chunked_compressed_and_big_endian_datasets(saved, tmp_path):
    """h5py can store a variable chunked + gzip, or big-endian: read through h5py, same
    values and dtype, and the note names them."""
    rewritten = tmp_path / "odd.weights.h5"
    with h5py.File(saved.files["weights_h5"]) as source, h5py.File(rewritten, "w") as target:
        for key in source:
            source.copy(source[key], target, name=key)
        for path in ("layers/dense/vars/0", "layers/conv2d/vars/0"):
            value, attrs = source[path][()], dict(source[path].attrs)
            del target[path]
            target.create_dataset(path, data=value, chunks=True, compression="gzip")
            target[path].attrs.update(attrs)
        bias = source["layers/dense/vars/1"][()]
        del target["layers/dense/vars/1"]
        target.create_dataset("layers/dense/vars/1", data=bias.astype(">f4"))
        for group in ("vars", "layers/dense/vars"):
            target[group].attrs.update(dict(source[group].attrs))
    with open_checkpoint(rewritten) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)
        (note,) = [n for n in checkpoint.notes if "into memory" in n]
        assert "fc1/kernel" in note and "fc1/bias" in note and "conv1/kernel" in note
        assert "predictions/kernel" not in note


def test_optimizer_state_is_left_out(tmp_path):
    model = _vgg_like(seed=3)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((4, 8, 8, 3)), rng.random((4, 3)), verbose=0)
    model.save(tmp_path / "trained.keras")
    model.save(tmp_path / "trained.h5")
    model.save_weights(tmp_path / "trained.weights.h5")
    for name in ("trained.keras", "trained.h5", "trained.weights.h5"):
        with open_checkpoint(tmp_path / name) as checkpoint:
            _assert_same_tensors(checkpoint, _own_variables(model))
            assert any("left out the optimizer" in note for note in checkpoint.notes), name


def test_batch_norm_without_center_is_named_from_the_config(tmp_path):
    """A BN without beta saves 3 numbered variables: the config says which 3; a bare
    ``.weights.h5`` cannot, so they are named by position, and a note says so."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, use_bias=False, name="proj"),
            keras.layers.BatchNormalization(center=False, name="bn"),
            keras.layers.LayerNormalization(scale=False, name="ln"),
        ]
    )
    _randomize(model, 1)
    expected = _own_variables(model)
    assert sorted(expected) == [
        "bn/gamma", "bn/moving_mean", "bn/moving_variance", "ln/beta", "proj/kernel",
    ]  # fmt: skip
    model.save(tmp_path / "m.keras")
    model.save(tmp_path / "m.h5")
    model.save_weights(tmp_path / "m.weights.h5")
    for name in ("m.keras", "m.h5"):
        with open_checkpoint(tmp_path / name) as checkpoint:
            _assert_same_tensors(checkpoint, expected)
    with open_checkpoint(tmp_path / "m.weights.h5") as checkpoint:
        by_position = {"bn/gamma": "bn/0", "bn/moving_mean": "bn/1", "bn/moving_variance": "bn/2"}
        by_position.update({"ln/beta": "ln/0"})
        _assert_same_tensors(checkpoint, {by_position.get(k, k): v for k, v in expected.items()})
        (note,) = [n for n in checkpoint.notes if "by position" in n]
        assert "bn/0, bn/1, bn/2, ln/0" in note


def test_names_without_name_attributes(saved, tmp_path):
    """Keras 3 before 3.6 saved no ``name`` attribute: a ``.keras`` file names layers
    from config.json (Keras' group names count each class in model order); a bare
    ``.weights.h5`` can only use the group names, which are Keras' class-based ones."""
    bare = tmp_path / "bare.weights.h5"
    _strip_name_attributes(saved.files["weights_h5"].read_bytes(), bare)
    with open_checkpoint(bare) as checkpoint:
        group_names = {
            "conv1": "conv2d", "bn": "batch_normalization", "fc1": "dense",
            "predictions": "dense_1", "head/fc2": "sequential/dense",
        }  # fmt: skip
        renamed = {}
        for name, value in saved.expected.items():
            layer, var = name.rsplit("/", 1)
            renamed[f"{group_names[layer]}/{var}"] = value
        _assert_same_tensors(checkpoint, renamed)
    rezipped = tmp_path / "bare.keras"
    _rezip(saved.files["keras"], rezipped, zipfile.ZIP_STORED, _strip_name_attributes)
    with open_checkpoint(rezipped) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)
        assert list(checkpoint.tensors) == list(saved.expected)


def _rezip(
    source: Path,
    target: Path,
    compression: int,
    transform: Callable[[bytes, io.BytesIO], None] | None = None,
) -> None:
    """Copy a ``.keras`` zip, its model.weights.h5 passed through ``transform``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            data = old.read(info)
            if transform is not None and info.filename == "model.weights.h5":
                buffer = io.BytesIO()
                transform(data, buffer)
                data = buffer.getvalue()
            new.writestr(info.filename, data)


def _strip_name_attributes(h5_bytes: bytes, target: Path | io.BytesIO) -> None:
    with h5py.File(io.BytesIO(h5_bytes)) as source, h5py.File(target, "w") as out:
        for key in source:
            source.copy(source[key], out, name=key)
        named: list[str] = []
        out.visititems(lambda key, obj: named.append(key) if "name" in obj.attrs else None)
        for key in named:
            del out[key].attrs["name"]
        assert "vars" in named and "layers/dense/vars" in named


def test_hdf5_suffix_and_keras_2_13_group_name(saved, tmp_path):
    """``.hdf5`` is read like ``.h5``; Keras 2.13's ``.keras`` format named the layer list
    ``_layer_checkpoint_dependencies`` where Keras 3 says ``layers``."""
    hdf5 = tmp_path / "model.hdf5"
    hdf5.write_bytes(saved.files["legacy_h5"].read_bytes())
    with open_checkpoint(hdf5) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)
    old_style = tmp_path / "old.weights.h5"
    old_style.write_bytes(saved.files["weights_h5"].read_bytes())
    with h5py.File(old_style, "a") as file:
        file.move("layers", "_layer_checkpoint_dependencies")
        file.move(
            "_layer_checkpoint_dependencies/sequential/layers",
            "_layer_checkpoint_dependencies/sequential/_layer_checkpoint_dependencies",
        )
    with open_checkpoint(old_style) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)


def test_bfloat16_is_kept(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16", name="d")])
    _randomize(model, 2)
    model.save(tmp_path / "bf16.keras")
    with open_checkpoint(tmp_path / "bf16.keras") as checkpoint:
        for name, value in _own_variables(model).items():
            assert checkpoint.tensors[name].dtype == "BF16"
            assert str(value.dtype) == "bfloat16"
            assert bytes(checkpoint.raw(name)) == value.tobytes()


def test_split_layer_names_attribute(saved, tmp_path):
    """A long ``layer_names`` is split into ``layer_names0``, ``layer_names1``, ..."""
    path = write_keras2(tmp_path / "split.h5", saved.model, full=False)
    with h5py.File(path, "a") as file:
        names = list(file.attrs["layer_names"])
        del file.attrs["layer_names"]
        file.attrs["layer_names0"] = names[:3]
        file.attrs["layer_names1"] = names[3:]
    with open_checkpoint(path) as checkpoint:
        _assert_same_tensors(checkpoint, saved.expected)


# Bad input: one line naming the file and what is wrong, exit 2, nothing written.


def _truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return target


def _not_keras_hdf5(target: Path) -> Path:
    with h5py.File(target, "w") as file:
        file.create_dataset("x", data=np.arange(4.0))
    return target


def _zip_without_weights(target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        archive.writestr("metadata.json", "{}")
    return target


def _zip_with_text_weights(target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        archive.writestr("model.weights.h5", "not hdf5")
    return target


def _with_link(kind: str) -> Callable[[Saved, Path], Path]:
    def make(saved: Saved, target: Path) -> Path:
        with h5py.File(saved.files["weights_h5"]) as source, h5py.File(target, "w") as out:
            for key in source:
                source.copy(source[key], out, name=key)
            del out["layers/dense/vars/0"]
            if kind == "soft":
                out["layers/dense/vars/0"] = h5py.SoftLink("/layers/dense_1/vars/0")
            else:
                out["layers/dense/vars/0"] = h5py.ExternalLink("other.h5", "/x")
        return target

    return make


def _missing_weight(saved: Saved, target: Path) -> Path:
    path = write_keras2(target, saved.model, full=True)
    with h5py.File(path, "a") as file:
        del file["model_weights/fc1/fc1/bias:0"]
    return path


def _layer_listed_twice(saved: Saved, target: Path) -> Path:
    path = write_keras2(target, saved.model, full=False)
    with h5py.File(path, "a") as file:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in file.attrs["layer_names"]]
        file.attrs["layer_names"] = [name.encode() for name in [*names, "fc1"]]
    return path


BAD_INPUTS = {
    "truncated .h5": (lambda s, d: _truncated(s.files["legacy_h5"], d / "t.h5"), "truncated"),
    "truncated .keras": (lambda s, d: _truncated(s.files["keras"], d / "t.keras"), "truncated"),
    "truncated .weights.h5": (
        lambda s, d: _truncated(s.files["weights_h5"], d / "t.weights.h5"),
        "truncated",
    ),
    "text named .h5": (
        lambda s, d: (d / "notes.h5").write_text("not hdf5") and d / "notes.h5",
        "not a readable HDF5 file",
    ),
    "HDF5, not Keras": (lambda s, d: _not_keras_hdf5(d / "data.h5"), "not a Keras checkpoint"),
    ".keras without weights": (
        lambda s, d: _zip_without_weights(d / "empty.keras"),
        "without model.weights.h5",
    ),
    "text named .keras": (
        lambda s, d: (d / "notes.keras").write_text("not a zip") and d / "notes.keras",
        "not a readable .keras zip",
    ),
    "zip member not HDF5": (
        lambda s, d: _zip_with_text_weights(d / "text.keras"),
        "model.weights.h5 in the zip is not a readable HDF5 file",
    ),
    "soft link": (lambda s, d: _with_link("soft")(s, d / "soft.weights.h5"), "is a soft link"),
    "external link": (
        lambda s, d: _with_link("external")(s, d / "ext.weights.h5"),
        "is an external link",
    ),
    "layer listed twice": (
        lambda s, d: _layer_listed_twice(s, d / "twice.h5"),
        "two variables are both named 'fc1/kernel'",
    ),
    "missing weight": (
        lambda s, d: _missing_weight(s, d / "missing.h5"),
        "lists weight 'fc1/bias:0'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line(saved, tmp_path, run_cli, case):
    make, needle = BAD_INPUTS[case]
    source = make(saved, tmp_path)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(source)
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(_map_text())
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output)
    assert outcome.code == 2, (outcome.code, outcome.stderr)
    assert "Traceback" not in outcome.stderr and outcome.stdout == ""
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and str(source) in lines[0] and needle in lines[0], outcome.stderr
    assert not output.exists()
    assert list(tmp_path.glob(".*.tmp")) == []


# End to end: convert the head with a map, then prove it with Keras' own forward pass.


def _map_text(conv_format: str = "oihw", explicit: bool = False) -> str:
    """The head's map: ``name: fc1`` finds ``fc1/kernel`` and ``fc1/bias``; no
    ``weight_format``, so the checkpoint's stored one (Keras: ``in_out``) applies."""
    lines = ["version: 1", "layout: hwc", f"conv_format: {conv_format}", "layers:"]
    for name, extra in (
        ("fc1", [f"kernel: [{SIDE}, {SIDE}]", f"in_channels: {CHANNELS}"]),
        ("head/fc2", []),
        ("predictions", []),
    ):
        lines.append(f"  - name: {name}")
        if explicit:
            lines += [f"    weight: {name}/kernel", f"    bias: {name}/bias"]
        lines += [f"    {e}" for e in extra]
    return "\n".join(lines) + "\n"


def _convert(run_cli, source: Path, folder: Path, map_text: str) -> tuple[dict, dict]:
    folder.mkdir(exist_ok=True)
    layer_map = folder / "map.yaml"
    layer_map.write_text(map_text)
    output = folder / "fcn.safetensors"
    report_path = folder / "report.json"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", output, "--json", report_path)
    assert outcome.code == 0, outcome.stderr
    report = json.loads(report_path.read_text())
    return report, load_file(str(output))


def _conv_layers(report: dict, written: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each converted layer: the source names, kept."""
    assert [(la["output_weight"], la["output_bias"]) for la in report["layers"]] == [
        (f"{n}/kernel", f"{n}/bias") for n in ("fc1", "head/fc2", "predictions")
    ]
    return [(written[la["output_weight"]], written[la["output_bias"]]) for la in report["layers"]]


def _conv_head(feature_map: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The converted head on an NHWC feature map, with torch conv2d (oihw weights):
    relu after fc1 and fc2 as in the model; returns NHWC scores."""
    x = torch.from_numpy(feature_map.transpose(0, 3, 1, 2).astype(np.float64))
    for index, (weight, bias) in enumerate(layers):
        x = torch.nn.functional.conv2d(
            x,
            torch.from_numpy(weight.astype(np.float64)),
            torch.from_numpy(bias.astype(np.float64)),
        )
        if index < len(layers) - 1:
            x = torch.relu(x)
    return x.numpy().transpose(0, 2, 3, 1)


def _keras_head(model: keras.Model, windows: np.ndarray) -> np.ndarray:
    """Keras' own Flatten -> fc1 -> head -> predictions on NHWC windows."""
    x = windows
    for name in ("flatten", "fc1", "head", "predictions"):
        x = model.get_layer(name)(x)
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_head_gives_keras_own_output(saved, tmp_path, run_cli, variant):
    report, written = _convert(run_cli, saved.files[variant], tmp_path, _map_text())
    assert [la["weight_format"] for la in report["layers"]] == ["in_out"] * 3
    layers = _conv_layers(report, written)
    assert layers[0][0].shape == (6, CHANNELS, SIDE, SIDE)
    model = saved.model
    # (a) At the native input size: Keras' own feature map (the layer before Flatten)
    # through the conv head gives Keras' own Dense output.
    images = np.random.default_rng(0).standard_normal((5, 2 * SIDE, 2 * SIDE, 3)).astype("f4")
    features = keras.Model(model.inputs, model.get_layer("pool").output)(images)
    features = keras.ops.convert_to_numpy(features)
    assert features.shape == (5, SIDE, SIDE, CHANNELS)
    scores = _conv_head(features, layers)
    np.testing.assert_allclose(
        scores[:, 0, 0, :], keras.ops.convert_to_numpy(model(images)), atol=1e-5
    )
    # (b) On a larger feature map, every position is Keras' head on that window.
    larger = np.random.default_rng(1).standard_normal((2, SIDE + 3, SIDE + 2, CHANNELS))
    dense = _conv_head(larger.astype("f4"), layers)
    assert dense.shape == (2, 4, 3, 3)
    for i in range(4):
        for j in range(3):
            window = larger[:, i : i + SIDE, j : j + SIDE, :].astype("f4")
            np.testing.assert_allclose(dense[:, i, j, :], _keras_head(model, window), atol=1e-5)
    # Every other variable is copied byte for byte, under its own name.
    for name, value in saved.expected.items():
        if name.split("/")[0] in ("conv1", "bn"):
            assert written[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("variant", ["keras", "weights_h5", "legacy_h5"])
def test_inspect_and_verify_read_keras_files(saved, tmp_path, run_cli, variant):
    source = saved.files[variant]
    outcome = run_cli("inspect", source)
    assert outcome.code == 0, outcome.stderr
    assert "fc1/kernel" in outcome.stdout
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(_map_text())
    output = tmp_path / "fcn.safetensors"
    assert run_cli("convert", source, "--map", layer_map, "-o", output).code == 0
    outcome = run_cli("verify", source, output, "--map", layer_map)
    assert outcome.code == 0, outcome.stderr


def test_hwio_output_loads_into_keras_conv2d(saved, tmp_path, run_cli):
    """``conv_format: hwio`` writes (kh, kw, in, out) kernels: Keras' own Conv2D layers
    holding them are the fully convolutional head."""
    report, written = _convert(run_cli, saved.files["keras"], tmp_path, _map_text("hwio"))
    assert [la["conv_format"] for la in report["layers"]] == ["hwio"] * 3
    layers = _conv_layers(report, written)
    assert [w.shape for w, _ in layers] == [(SIDE, SIDE, CHANNELS, 6), (1, 1, 6, 5), (1, 1, 5, 3)]
    head = keras.Sequential(
        [
            keras.Input((None, None, CHANNELS)),
            keras.layers.Conv2D(6, SIDE, activation="relu"),
            keras.layers.Conv2D(5, 1, activation="relu"),
            keras.layers.Conv2D(3, 1),
        ]
    )
    for conv, (weight, bias) in zip(head.layers, layers, strict=True):
        conv.set_weights([weight, bias])
    model = saved.model
    images = np.random.default_rng(2).standard_normal((3, 2 * SIDE, 2 * SIDE, 3)).astype("f4")
    features = keras.Model(model.inputs, model.get_layer("pool").output)(images)
    scores = keras.ops.convert_to_numpy(head(features))
    np.testing.assert_allclose(
        scores[:, 0, 0, :], keras.ops.convert_to_numpy(model(images)), atol=1e-5
    )
    larger = (
        np.random.default_rng(3).standard_normal((2, SIDE + 2, SIDE + 1, CHANNELS)).astype("f4")
    )
    dense = keras.ops.convert_to_numpy(head(larger))
    assert dense.shape == (2, 3, 2, 3)
    for i in range(3):
        for j in range(2):
            window = larger[:, i : i + SIDE, j : j + SIDE, :]
            np.testing.assert_allclose(dense[:, i, j, :], _keras_head(model, window), atol=1e-5)


def test_explicit_weight_and_bias_keys_keep_the_source_names(saved, tmp_path, run_cli):
    implicit, _ = _convert(run_cli, saved.files["legacy_h5"], tmp_path / "a", _map_text())
    explicit, written = _convert(
        run_cli, saved.files["legacy_h5"], tmp_path / "b", _map_text(explicit=True)
    )
    names = [(la["weight"], la["output_weight"], la["output_bias"]) for la in explicit["layers"]]
    assert names == [
        (la["weight"], la["output_weight"], la["output_bias"]) for la in implicit["layers"]
    ]
    assert set(written) == set(saved.expected)


def test_fc_weights_are_stored_in_out(saved):
    with open_checkpoint(saved.files["weights_h5"]) as checkpoint:
        for name, info in checkpoint.tensors.items():
            assert info.weight_format is WeightFormat.IN_OUT, name


# Sample configs: on files with exactly the names and shapes keras.applications.VGG16 saves.

_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_VGG16_HEAD = (("fc1", 7 * 7 * 512, 4096), ("fc2", 4096, 4096), ("predictions", 4096, 1000))
# (map, conv_format, the converted fc1 / fc2 / predictions kernels' shapes)
SAMPLE_CONFIGS = {
    "vgg16_keras": ("oihw", [(4096, 512, 7, 7), (4096, 4096, 1, 1), (1000, 4096, 1, 1)]),
    "vgg16_keras_hwio": ("hwio", [(7, 7, 512, 4096), (1, 1, 4096, 4096), (1, 1, 4096, 1000)]),
}
_Layer = tuple[str, str, list[tuple[str, tuple[int, ...]]]]  # class, name, variables


def _vgg16_layers() -> list[_Layer]:
    """keras.applications.VGG16's layers in order: class, name, (variable, shape)s."""
    layers: list[_Layer] = [("InputLayer", "input_layer", [])]
    channels = 3
    for block, widths in enumerate(_VGG16_BLOCKS, 1):
        for index, width in enumerate(widths, 1):
            variables = [("kernel", (3, 3, channels, width)), ("bias", (width,))]
            layers.append(("Conv2D", f"block{block}_conv{index}", variables))
            channels = width
        layers.append(("MaxPooling2D", f"block{block}_pool", []))
    layers.append(("Flatten", "flatten", []))
    for name, fan_in, width in _VGG16_HEAD:
        layers.append(("Dense", name, [("kernel", (fan_in, width)), ("bias", (width,))]))
    return layers


Fill = Callable[[tuple[int, ...]], np.ndarray] | None  # values, or None: shapes only


def _dataset(group, key: str, shape: tuple[int, ...], fill: Fill) -> None:
    if fill is None:  # declared, never written: HDF5 stores no data for it
        group.create_dataset(key, shape=shape, dtype="f2")
    else:
        group.create_dataset(key, data=fill(shape))


def _write_vgg16_weights_h5(target: Path | io.BytesIO, fill: Fill) -> None:
    """A Keras 3 ``.weights.h5`` as ``save_weights`` writes VGG16's."""
    used: dict[str, int] = {}
    with h5py.File(target, "w") as file:
        file.create_group("vars").attrs["name"] = "vgg16"
        for cls, name, variables in _vgg16_layers():
            snake = {"InputLayer": "input_layer", "MaxPooling2D": "max_pooling2d"}.get(
                cls, cls.lower()
            )
            used[snake] = used.get(snake, -1) + 1
            key = snake if used[snake] == 0 else f"{snake}_{used[snake]}"
            group = file.create_group(f"layers/{key}/vars")
            group.attrs["name"] = name
            for index, (_, shape) in enumerate(variables):
                _dataset(group, str(index), shape, fill)


def _vgg16_config() -> dict:
    layers = [{"class_name": c, "config": {"name": n}, "name": n} for c, n, _ in _vgg16_layers()]
    return {"class_name": "Functional", "config": {"name": "vgg16", "layers": layers}}


def _write_vgg16(folder: Path, variant: str, fill: Fill) -> Path:
    """VGG16 as ``.weights.h5``, ``.keras`` or legacy ``.h5`` (Keras 3's own layouts)."""
    if variant == "weights_h5":
        path = folder / "vgg16.weights.h5"
        _write_vgg16_weights_h5(path, fill)
    elif variant == "keras":
        path = folder / "vgg16.keras"
        buffer = io.BytesIO()
        _write_vgg16_weights_h5(buffer, fill)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
            archive.writestr("config.json", json.dumps(_vgg16_config()))
            archive.writestr("model.weights.h5", buffer.getvalue())
    else:
        path = folder / "vgg16.h5"
        with h5py.File(path, "w") as file:
            file.attrs["model_config"] = json.dumps(_vgg16_config())
            group = file.create_group("model_weights")
            group.attrs["layer_names"] = [name.encode() for _, name, _ in _vgg16_layers()]
            for _, name, variables in _vgg16_layers():
                layer = group.create_group(name)
                weights = [f"{name}/{var}".encode() for var, _ in variables]
                layer.attrs["weight_names"] = weights if weights else np.zeros(0)
                for var, shape in variables:
                    _dataset(layer, f"{name}/{var}", shape, fill)
    return path


@pytest.mark.parametrize("variant", ["keras", "weights_h5", "legacy_h5"])
@pytest.mark.parametrize("config", list(SAMPLE_CONFIGS))
def test_sample_config_plans_vgg16_as_keras_saves_it(tmp_path, run_cli, config, variant):
    source = _write_vgg16(tmp_path, variant, fill=None)
    assert source.stat().st_size < 1 << 20  # shapes only: no data stored
    with open_checkpoint(source) as checkpoint:
        assert {n: i.shape for n, i in checkpoint.tensors.items()} == {
            f"{name}/{var}": shape for _, name, vs in _vgg16_layers() for var, shape in vs
        }
    conv_format, shapes = SAMPLE_CONFIGS[config]
    report_path = tmp_path / "plan.json"
    outcome = run_cli(
        "convert", source, "--map", ROOT / "fc2conv_cli" / "sample_configs" / f"{config}.yaml",
        "-o", tmp_path / "fcn.safetensors", "--dry-run", "--json", report_path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    report = json.loads(report_path.read_text())
    assert report["copied"] == 26  # 13 convs' kernels and biases
    assert [
        (la["weight"], la["output_weight"], la["output_bias"], la["old_shape"], la["new_shape"])
        for la in report["layers"]
    ] == [
        (f"{n}/kernel", f"{n}/kernel", f"{n}/bias", [fan_in, width], list(shape))
        for (n, fan_in, width), shape in zip(_VGG16_HEAD, shapes, strict=True)
    ]
    for layer in report["layers"]:
        assert (layer["layout"], layer["weight_format"]) == ("hwc", "in_out")
        assert layer["conv_format"] == conv_format


@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory) -> Iterator[Path]:
    """A real-sized VGG16 ``.weights.h5`` with random float16 values (about 270 MB),
    deleted after the tests that use it."""
    rng = np.random.default_rng(5)

    def fill(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype("f2")

    path = _write_vgg16(tmp_path_factory.mktemp("vgg16"), "weights_h5", fill)
    yield path
    path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SAMPLE_CONFIGS))
def test_sample_config_converts_real_sized_vgg16(vgg16_weights, tmp_path, run_cli, config):
    output = tmp_path / "fcn.safetensors"
    report_path = tmp_path / "report.json"
    layer_map = ROOT / "fc2conv_cli" / "sample_configs" / f"{config}.yaml"
    outcome = run_cli(
        "convert", vgg16_weights, "--map", layer_map, "-o", output, "--json", report_path
    )
    assert outcome.code == 0, outcome.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["checked"] and report["published"]
    assert all(la["ok"] and la["max_abs_diff"] < 1e-9 for la in report["layers"])
    written = load_file(str(output))
    conv_format, shapes = SAMPLE_CONFIGS[config]
    with open_checkpoint(vgg16_weights) as checkpoint:
        for (name, _, width), shape in zip(_VGG16_HEAD, shapes, strict=True):
            kernel = checkpoint.array(f"{name}/kernel")
            side = 7 if name == "fc1" else 1
            # Written out by hand: (in, out) with in = h, w, c (hwc flatten).
            by_hand = kernel.reshape(side, side, -1, width)
            if conv_format == "oihw":
                by_hand = by_hand.transpose(3, 2, 0, 1)
            assert written[f"{name}/kernel"].shape == shape
            assert np.array_equal(written[f"{name}/kernel"], by_hand), name
            assert np.array_equal(written[f"{name}/bias"], checkpoint.array(f"{name}/bias"))
        for name in checkpoint.tensors:
            if name.startswith("block"):
                assert written[name].tobytes() == bytes(checkpoint.raw(name)), name
