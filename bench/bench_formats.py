"""Benchmark ``fc2conv convert`` on VGG16 in every format it reads (issue 10).

The same VGG16 fp32 weights (random, from ``zoo.py``) are written once under
``bench/_work/formats/``, each format by its own library and with its own names:

- ``.safetensors`` and ``.pth``: torchvision names (``features.0.weight``);
- ONNX: a VGG16 graph (Conv, MaxPool, Flatten, ``Gemm`` with ``transB=1``) built with
  ``onnx.helper``, its initializers named as ``torch.onnx.export`` names them;
- Keras 3 (``KERAS_BACKEND=torch``): ``keras.applications.VGG16(weights=None)`` holding the
  same weights, saved as ``.keras``, ``.weights.h5`` and legacy ``.h5`` (``fc1/kernel``);
- TF.js: a layers model (``model.json`` with the Keras model's config, 4 MB shards as
  tfjs-converter's ``write_weights`` cuts them), Keras names;
- Caffe: ``VGG_ILSVRC_16_layers.caffemodel``, a V1 NetParameter built with protobuf from
  the shipped ``caffe.proto`` (``conv1_1``, ``fc6``; legacy 4-D blob shapes);
- NumPy: a stored ``.npz`` (``np.savez``: ``fc6_W``, ``fc6_b``) and a TF-era ``.npy``
  holding one pickled dict (``np.save``: ``{"fc6": [W, b]}``, read as ``fc6.0``/``fc6.1``).

Each format's file has a ``.safetensors`` twin holding exactly the tensors the format's
reader gives (names, shapes, values), converted with the same map. Every case runs in one
invocation, interleaved (a warm-up round, then ``--runs`` rounds over every case), with
``bench_convert``'s measurement: a child process per run, wall time from spawn to exit,
peak ``RssAnon`` sampled every 10 ms, ``VmHWM``; medians. Every run must exit 0 and write
its output, and each format's output must hold the same tensors as its twin's: otherwise
the bench fails (exit 1).

    python bench/bench_formats.py              # 3 runs; ``make bench``
    python bench/bench_formats.py --quick      # 1 run
    python bench/bench_formats.py --runs 5 --json bench/_work/formats/result.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import Case, fc2conv_command, log, run_once

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "formats"
CONFIGS = ROOT / "sample_configs"
METRICS = ("wall_s", "cpu_s", "rss_anon_mib", "vm_hwm_mib")
TFJS_SHARD_BYTES = 4 * 1024 * 1024  # tfjs-converter's default weight_shard_size_bytes
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# torchvision classifier index, Keras name, Caffe / TF-era name
_FCS = (("classifier.0", "fc1", "fc6"), ("classifier.3", "fc2", "fc7"),
        ("classifier.6", "predictions", "fc8"))  # fmt: skip
_NUMPY_MAP = """\
# {what}: TF-era names, kernels (in, out), flattened NHWC (hwc).
version: 1
layout: hwc
weight_format: in_out
layers:
  - {{name: fc6, weight: {fc6w}, bias: {fc6b}, kernel: [7, 7], in_channels: 512}}
  - {{name: fc7, weight: {fc7w}, bias: {fc7b}}}
  - {{name: fc8, weight: {fc8w}, bias: {fc8b}}}
"""


# -- the same weights under each format's names -----------------------------------------


def _convs() -> Iterator[tuple[int, int, int, int, int]]:
    """VGG16's convolutions: torchvision index, block, index in block, out, in channels."""
    index, channels = 0, 3
    for block, widths in enumerate(_BLOCKS, 1):
        for number, width in enumerate(widths, 1):
            yield index, block, number, width, channels
            index, channels = index + 2, width
        index += 1  # the block's MaxPool


def _keras_fc(torch_weight: np.ndarray, first: bool) -> np.ndarray:
    """A torch ``(out, in)`` FC weight as Keras' ``(in, out)`` kernel; fc1's input is the
    7 x 7 x 512 map flattened ``hwc`` (NHWC) rather than ``chw``."""
    import numpy as np

    if first:
        out = torch_weight.shape[0]
        kernel = torch_weight.reshape(out, 512, 7, 7).transpose(2, 3, 1, 0).reshape(-1, out)
    else:
        kernel = torch_weight.T
    return np.ascontiguousarray(kernel)


def tf_layers(t: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(Keras name, Caffe / TF-era name, kernel, bias) per layer, in TF's layouts:
    conv kernels ``(kh, kw, in, out)``, FC kernels ``(in, out)`` on an ``hwc`` flatten."""
    import numpy as np

    layers = []
    for index, block, number, _, _ in _convs():
        kernel = np.ascontiguousarray(t[f"features.{index}.weight"].transpose(2, 3, 1, 0))
        layers.append(
            (f"block{block}_conv{number}", f"conv{block}_{number}", kernel,
             t[f"features.{index}.bias"])
        )  # fmt: skip
    for position, (torch_name, keras_name, tf_name) in enumerate(_FCS):
        kernel = _keras_fc(t[f"{torch_name}.weight"], first=position == 0)
        layers.append((keras_name, tf_name, kernel, t[f"{torch_name}.bias"]))
    return layers


def keras_arrays(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``LAYER/VAR`` -> value, as the Keras and TF.js readers name them."""
    arrays = {}
    for name, _, kernel, bias in tf_layers(t):
        arrays[f"{name}/kernel"], arrays[f"{name}/bias"] = kernel, bias
    return arrays


def caffe_arrays(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``LAYER.weight`` / ``LAYER.bias`` of VGG_ILSVRC_16_layers: torch's layouts (Caffe
    is NCHW and stores InnerProduct weights ``(out, in)``)."""
    arrays = {}
    for index, block, number, _, _ in _convs():
        arrays[f"conv{block}_{number}.weight"] = t[f"features.{index}.weight"]
        arrays[f"conv{block}_{number}.bias"] = t[f"features.{index}.bias"]
    for torch_name, _, caffe_name in _FCS:
        arrays[f"{caffe_name}.weight"] = t[f"{torch_name}.weight"]
        arrays[f"{caffe_name}.bias"] = t[f"{torch_name}.bias"]
    return arrays


def npz_arrays(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``conv1_1_W``, ``fc6_b``: the keys of TF-era ``vgg16_weights.npz`` dumps."""
    arrays = {}
    for _, name, kernel, bias in tf_layers(t):
        arrays[f"{name}_W"], arrays[f"{name}_b"] = kernel, bias
    return arrays


def npy_dict(t: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """``{"conv1_1": [W, b], ..., "fc8": [W, b]}``, as tensorflow-vgg's ``vgg16.npy``."""
    return {name: [kernel, bias] for _, name, kernel, bias in tf_layers(t)}


def npy_arrays(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``.npy`` dict's tensors as the NumPy reader names them (``fc6.0``, ``fc6.1``)."""
    return {f"{k}.{i}": v for k, pair in npy_dict(t).items() for i, v in enumerate(pair)}


# -- writers: each format by its own library --------------------------------------------


def _base(work: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(work / "vgg16.safetensors"))


def write_safetensors(work: Path, target: Path) -> None:
    from zoo import save_checkpoint, state_dict_shapes

    save_checkpoint(state_dict_shapes("vgg16"), target)


def write_pth(work: Path, target: Path) -> None:
    import torch

    state = {k: torch.from_numpy(v) for k, v in _base(work).items()}
    torch.save(state, target)


def _twin_writer(arrays: Callable[[dict], dict]) -> Callable[[Path, Path], None]:
    def write(work: Path, target: Path) -> None:
        from safetensors.numpy import save_file

        save_file(arrays(_base(work)), str(target))

    return write


def _keras_vgg16(work: Path):
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    model = keras.applications.VGG16(weights=None)  # the architecture only, no download
    arrays = keras_arrays(_base(work))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([arrays[f"{layer.name}/{w.name}"] for w in layer.weights])
    return model


def write_keras(work: Path, target: Path) -> None:
    _keras_vgg16(work).save(target)


def write_weights_h5(work: Path, target: Path) -> None:
    _keras_vgg16(work).save_weights(target)


def write_legacy_h5(work: Path, target: Path) -> None:
    _keras_vgg16(work).save(target)  # Keras 3's legacy_h5_format: model_weights/...


def write_tfjs(work: Path, target: Path) -> None:
    """A layers model as tfjs-converter writes a Keras model: the model's config as
    ``modelTopology``, one weight group cut into 4 MB ``group1-shardIofN.bin`` files."""
    model = _keras_vgg16(work)
    import keras
    import numpy as np

    def discard(obj):  # tfjs-converter's _discard_v3_keys
        if isinstance(obj, dict):
            drop = ("module", "registered_name", "date_saved")
            return {k: discard(v) for k, v in obj.items() if k not in drop}
        return [discard(v) for v in obj] if isinstance(obj, list) else obj

    weights = [
        (f"{layer.name}/{w.name}", np.asarray(keras.ops.convert_to_numpy(w), np.float32))
        for layer in model.layers
        for w in layer.weights
    ]
    data = b"".join(array.tobytes() for _, array in weights)
    count = math.ceil(len(data) / TFJS_SHARD_BYTES)
    target.mkdir()
    paths = []
    for i in range(count):
        name = f"group1-shard{i + 1}of{count}.bin"
        (target / name).write_bytes(data[i * TFJS_SHARD_BYTES : (i + 1) * TFJS_SHARD_BYTES])
        paths.append(name)
    specs = [{"name": n, "shape": list(a.shape), "dtype": "float32"} for n, a in weights]
    document = {
        "format": "layers-model",
        "generatedBy": f"keras v{keras.__version__}",
        "convertedBy": "TensorFlow.js Converter v4.22.0",
        "modelTopology": {
            "keras_version": keras.__version__,
            "backend": "torch",
            "model_config": discard(json.loads(model.to_json())),
        },
        "weightsManifest": [{"paths": paths, "weights": specs}],
    }
    (target / "model.json").write_text(json.dumps(document))


def write_onnx(work: Path, target: Path) -> None:
    """VGG16 as an ONNX graph: Conv/Relu/MaxPool, Flatten, Gemm(transB=1) x 3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = _base(work)
    nodes, x = [], "input"
    last_conv = {}
    for index, block, _, _, _ in _convs():
        last_conv[block] = index
    for index, block, _, _, _ in _convs():
        w, b = f"features.{index}.weight", f"features.{index}.bias"
        nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [f"/features.{index}/Conv"], kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )  # fmt: skip
        x = f"/features.{index + 1}/Relu"
        nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], [x]))
        if last_conv[block] == index:
            pooled = f"/features.{index + 2}/MaxPool"
            nodes.append(
                helper.make_node("MaxPool", [x], [pooled], kernel_shape=[2, 2], strides=[2, 2])
            )
            x = pooled
    nodes.append(helper.make_node("Flatten", [x], ["/Flatten"], axis=1))
    x = "/Flatten"
    for position, (name, _, _) in enumerate(_FCS):
        out = "output" if position == len(_FCS) - 1 else f"/{name}/Gemm"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out],
                                      alpha=1.0, beta=1.0, transB=1))  # fmt: skip
        x = out
        if position < len(_FCS) - 1:
            x = f"/{name}/Relu"
            nodes.append(helper.make_node("Relu", [out], [x]))
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1000])],
        [numpy_helper.from_array(array, name) for name, array in t.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def write_caffe(work: Path, target: Path) -> None:
    """VGG_ILSVRC_16_layers as Caffe saved it: a V1 NetParameter (``layers``), blobs with
    legacy 4-D shapes, serialized by protobuf from the shipped ``caffe.proto``."""
    from fc2conv_cli.readers import caffe_schema

    s = caffe_schema.messages()
    v1 = s.V1LayerParameter
    arrays = caffe_arrays(_base(work))
    net = s.NetParameter(name="VGG_ILSVRC_16_layers", input=["data"], input_dim=[10, 3, 224, 224])

    def add(name: str, kind: int, bottom: str, top: str):
        return net.layers.add(name=name, type=kind, bottom=[bottom], top=[top])

    def blobs(layer, name: str) -> None:
        for suffix in ("weight", "bias"):
            array = arrays[f"{name}.{suffix}"]
            blob = layer.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
            flat = array.ravel()
            for start in range(0, flat.size, 1 << 20):  # bounded Python-float lists
                blob.data.extend(flat[start : start + (1 << 20)].tolist())

    bottom = "data"
    for _, block, number, width, _ in _convs():
        name = f"conv{block}_{number}"
        conv = add(name, v1.CONVOLUTION, bottom, name)
        conv.convolution_param.num_output = width
        conv.convolution_param.pad.append(1)
        conv.convolution_param.kernel_size.append(3)
        blobs(conv, name)
        add(f"relu{block}_{number}", v1.RELU, name, name)
        bottom = name
        if number == len(_BLOCKS[block - 1]):
            pool = add(f"pool{block}", v1.POOLING, bottom, f"pool{block}")
            pool.pooling_param.pool = s.PoolingParameter.MAX
            pool.pooling_param.kernel_size, pool.pooling_param.stride = 2, 2
            bottom = f"pool{block}"
    for _, _, name in _FCS:
        fc = add(name, v1.INNER_PRODUCT, bottom, name)
        fc.inner_product_param.num_output = arrays[f"{name}.bias"].shape[0]
        blobs(fc, name)
        bottom = name
        if name != "fc8":
            add(f"relu{name[2:]}", v1.RELU, name, name)
            drop = add(f"drop{name[2:]}", v1.DROPOUT, name, name)
            drop.dropout_param.dropout_ratio = 0.5
    add("prob", v1.SOFTMAX, "fc8", "prob")
    target.write_bytes(net.SerializeToString())


def write_npz(work: Path, target: Path) -> None:
    import numpy as np

    np.savez(target, **npz_arrays(_base(work)))  # stored members, not deflated


def write_npy(work: Path, target: Path) -> None:
    import numpy as np

    np.save(target, npy_dict(_base(work)), allow_pickle=True)


# -- the cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    """One file (or TF.js folder) to convert: what reads it, with which map, and its twin."""

    key: str
    label: str
    file: str  # relative to the work folder; for TF.js, the folder holding model.json
    writer: Callable[[Path, Path], None]
    map: str  # a sample config's name, or a map written under the work folder
    twin: str | None  # the fixture holding the same tensors as .safetensors; None: itself
    source: str = ""  # what ``convert`` is given, if not ``file`` (TF.js: model.json)


FIXTURES = (
    Fixture("safetensors", ".safetensors (torchvision names)", "vgg16.safetensors",
            write_safetensors, "vgg16.yaml", None),
    Fixture("pth", "torch .pth", "vgg16.pth", write_pth, "vgg16.yaml", "safetensors"),
    Fixture("onnx", "ONNX (Gemm transB=1)", "vgg16.onnx", write_onnx, "vgg16.yaml",
            "safetensors"),
    Fixture("keras_twin", ".safetensors, Keras names", "vgg16_keras_twin.safetensors",
            _twin_writer(keras_arrays), "vgg16_keras.yaml", None),
    Fixture("keras", "Keras 3 .keras", "vgg16.keras", write_keras, "vgg16_keras.yaml",
            "keras_twin"),
    Fixture("weights_h5", "Keras 3 .weights.h5", "vgg16.weights.h5", write_weights_h5,
            "vgg16_keras.yaml", "keras_twin"),
    Fixture("legacy_h5", "Keras 3 legacy .h5", "vgg16.h5", write_legacy_h5,
            "vgg16_keras.yaml", "keras_twin"),
    Fixture("tfjs", "TF.js layers model, 4 MB shards", "vgg16_tfjs", write_tfjs,
            "vgg16_keras.yaml", "keras_twin", source="vgg16_tfjs/model.json"),
    Fixture("caffe_twin", ".safetensors, Caffe names", "vgg16_caffe_twin.safetensors",
            _twin_writer(caffe_arrays), "vgg16_caffe.yaml", None),
    Fixture("caffe", "Caffe V1 .caffemodel", "VGG_ILSVRC_16_layers.caffemodel", write_caffe,
            "vgg16_caffe.yaml", "caffe_twin"),
    Fixture("npz_twin", ".safetensors, .npz names", "vgg16_npz_twin.safetensors",
            _twin_writer(npz_arrays), "npz.yaml", None),
    Fixture("npz", "NumPy .npz (stored)", "vgg16_weights.npz", write_npz, "npz.yaml",
            "npz_twin"),
    Fixture("npy_twin", ".safetensors, .npy dict names", "vgg16_npy_twin.safetensors",
            _twin_writer(npy_arrays), "npy.yaml", None),
    Fixture("npy", "NumPy .npy pickled dict", "vgg16.npy", write_npy, "npy.yaml", "npy_twin"),
)  # fmt: skip
BY_KEY = {f.key: f for f in FIXTURES}
MAPS = {
    "npz.yaml": _NUMPY_MAP.format(
        what="vgg16_weights.npz (np.savez)", fc6w="fc6_W", fc6b="fc6_b", fc7w="fc7_W",
        fc7b="fc7_b", fc8w="fc8_W", fc8b="fc8_b",
    ),
    "npy.yaml": _NUMPY_MAP.format(
        what="vgg16.npy, a pickled {name: [W, b]} dict", fc6w="fc6.0", fc6b="fc6.1",
        fc7w="fc7.0", fc7b="fc7.1", fc8w="fc8.0", fc8b="fc8.1",
    ),
}  # fmt: skip


def map_path(fixture: Fixture, work: Path) -> Path:
    return work / fixture.map if fixture.map in MAPS else CONFIGS / fixture.map


def source_path(fixture: Fixture, work: Path) -> Path:
    return work / (fixture.source or fixture.file)


def size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def build(key: str, work: Path) -> None:
    """Write one fixture under a temporary name, then rename it: no half file is reused."""
    fixture = BY_KEY[key]
    target = work / fixture.file
    temp = target.with_name("tmp_" + target.name)
    if temp.is_dir():
        shutil.rmtree(temp)
    temp.unlink(missing_ok=True)
    fixture.writer(work, temp)
    temp.rename(target)


def ensure_fixtures(work: Path) -> None:
    """Make what is missing, each in its own process (so this one stays small)."""
    work.mkdir(parents=True, exist_ok=True)
    for name, text in MAPS.items():
        if not (work / name).exists() or (work / name).read_text() != text:
            (work / name).write_text(text)
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    for fixture in FIXTURES:  # safetensors first: every other one is made from it
        if (work / fixture.file).exists():
            continue
        log(f"making {work / fixture.file}")
        command = [sys.executable, __file__, "--build", fixture.key, "--work", str(work)]
        subprocess.run(command, check=True, env=env)


def check_names(work: Path) -> list[str]:
    """Each file's reader gives exactly its twin's tensor names, dtypes and shapes."""
    from fc2conv_cli.readers import open_checkpoint

    problems = []
    for fixture in FIXTURES:
        if fixture.twin is None:
            continue
        twin = BY_KEY[fixture.twin]
        with (
            open_checkpoint(source_path(fixture, work)) as got,
            open_checkpoint(source_path(twin, work)) as want,
        ):
            index = {n: (i.dtype, i.shape) for n, i in got.tensors.items()}
            expected = {n: (i.dtype, i.shape) for n, i in want.tensors.items()}
        if index != expected:
            diff = sorted(set(index.items()) ^ set(expected.items()))[:4]
            problems.append(f"{fixture.key}: tensors differ from {twin.key}'s: {diff}")
    return problems


def build_cases(work: Path) -> list[Case]:
    out = work / "out"
    out.mkdir(exist_ok=True)
    fc2conv = fc2conv_command()
    cases = []
    for fixture in FIXTURES:
        output = out / f"{fixture.key}.safetensors"
        argv = [*fc2conv, "convert", str(source_path(fixture, work)),
                "--map", str(map_path(fixture, work)), "-o", str(output)]  # fmt: skip
        cases.append(Case(fixture.key, fixture.label, [argv], output=output))
    return cases


def same_outputs(a: Path, b: Path) -> str | None:
    """None when both converted files hold the same tensors, else what differs."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(a), "numpy") as fa, safe_open(str(b), "numpy") as fb:
        names, other = set(fa.keys()), set(fb.keys())
        if names != other:
            return f"names differ: {sorted(names ^ other)[:4]}"
        for name in sorted(names):
            if not np.array_equal(fa.get_tensor(name), fb.get_tensor(name)):
                return f"{name} differs"
    return None


def run_rounds(cases: list[Case], runs: int, work: Path) -> None:
    """A warm-up round, then ``runs`` rounds over every case; each run must exit 0 and
    write its output. The last round's outputs are kept for ``compare_outputs``."""
    for round_ in range(runs + 1):
        log(("warm-up" if round_ == 0 else f"run {round_}/{runs}") + ": " +
            " ".join(c.key for c in cases))  # fmt: skip
        for case in cases:
            result = run_once(case, work, sync_first=True)
            if result.returncode == 0 and not case.output.is_file():
                case.failures.append("exit 0 but no output file")
                log(f"  {case.key}: exit 0 but no {case.output}")
            if round_ > 0:
                case.runs.append(result)


def compare_outputs(cases: list[Case]) -> None:
    by_key = {c.key: c for c in cases}
    for fixture in FIXTURES:
        case, twin = by_key[fixture.key], by_key.get(fixture.twin or "")
        if twin is None or case.failures or twin.failures:
            continue
        problem = same_outputs(case.output, twin.output)
        if problem:
            case.failures.append(f"output differs from {twin.key}'s: {problem}")
            log(f"  {case.key}: output differs from {twin.key}'s: {problem}")
    for case in cases:
        case.output.unlink(missing_ok=True)


# -- reporting ---------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} MiB" if value < 10 else f"{value:.0f} MiB"


def ratio(case: Case, by_key: dict[str, Case], metric: str = "wall_s") -> float | None:
    """The median over rounds of ``metric`` / the twin's in the same round: paired, so a
    load that drifts between rounds cancels out."""
    twin = by_key.get(BY_KEY[case.key].twin or "")
    if twin is None or not case.runs or len(twin.runs) != len(case.runs):
        return None
    pairs = [
        (getattr(m, metric), getattr(b, metric)) for m, b in zip(case.runs, twin.runs, strict=True)
    ]
    if any(base <= 0 for _, base in pairs):
        return None
    return statistics.median(value / base for value, base in pairs)


def render(cases: list[Case], work: Path, header: list[str]) -> str:
    by_key = {c.key: c for c in cases}
    lines = [*header, ""]
    lines += [
        "| format | file size | wall (median, min-max) | wall vs twin | CPU (user+sys) "
        "| CPU vs twin | peak RssAnon | VmHWM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def versus(case: Case, metric: str) -> str:
        if BY_KEY[case.key].twin is None:
            return "baseline"
        value = ratio(case, by_key, metric)
        return "n/a" if value is None else f"{value:.2f} x"

    for case in cases:
        if not case.runs:
            continue
        walls = [m.wall_s for m in case.runs]
        failed = " **FAILED**" if case.failures else ""
        lines.append(
            f"| {case.label}{failed} | {size_bytes(work / BY_KEY[case.key].file) / 1e6:.0f} MB"
            f" | {case.median('wall_s'):.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f" | {versus(case, 'wall_s')} | {case.median('cpu_s'):.2f} s"
            f" | {versus(case, 'cpu_s')} | {_mib(case.median('rss_anon_mib'))}"
            f" | {_mib(case.median('vm_hwm_mib'))} |"
        )
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per case (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 measured run per case")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the raw numbers")
    parser.add_argument("--work", type=Path, default=WORK, help=f"fixtures (default {WORK})")
    parser.add_argument("--build", choices=list(BY_KEY), help=argparse.SUPPRESS)
    parser.add_argument("--check-names", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:  # children of ensure_fixtures: this process's memory stays small
        build(args.build, args.work)
        return 0
    if args.check_names:
        problems = check_names(args.work)
        for problem in problems:
            log(f"bench_formats: {problem}")
        return 1 if problems else 0
    runs = 1 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")

    ensure_fixtures(args.work)
    check = [sys.executable, __file__, "--check-names", "--work", str(args.work)]
    if subprocess.run(check).returncode != 0:
        return 1
    cases = build_cases(args.work)
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    date = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    nproc = len(os.sched_getaffinity(0))
    load_start = loadavg()
    run_rounds(cases, runs, args.work)
    load_end = loadavg()
    compare_outputs(cases)

    header = [
        f"`{command}` on {date}, {nproc} cores (`nproc`), Python {sys.version.split()[0]}; "
        f"load average (1, 5, 15 min) {load_start} at the start, {load_end} at the end.",
        "VGG16 fp32, random weights, in each format with its own names; each format's "
        "twin is a .safetensors file with the same tensors, converted with the same map "
        "(`fc2conv convert`, checks on). Hot page cache, `sync` before each run, 1 warm-up "
        f'+ {runs} run{"s" if runs > 1 else ""} per case, interleaved; medians. "vs twin": '
        "the median over rounds of the ratio to the twin's run in the same round. CPU: the "
        "child's user + system time. Memory: peak `RssAnon` sampled every 10 ms; `VmHWM` "
        "includes file-backed pages.",
    ]
    print(render(cases, args.work, header), flush=True)

    if args.json:
        by_key = {c.key: c for c in cases}
        data = {
            "date": date,
            "nproc": nproc,
            "command": command,
            "runs": runs,
            "loadavg": {"start": load_start, "end": load_end},
            "cases": {
                c.key: {
                    "label": c.label,
                    "twin": BY_KEY[c.key].twin,
                    "file_bytes": size_bytes(args.work / BY_KEY[c.key].file),
                    "commands": [shlex.join(cmd) for cmd in c.commands],
                    "runs": [asdict(m) for m in c.runs],
                    "median": {m: c.median(m) for m in METRICS},
                    "ratio_to_twin": {m: ratio(c, by_key, m) for m in ("wall_s", "cpu_s")},
                    "failures": c.failures,
                }
                for c in cases
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    failed = [c.key for c in cases if c.failures]
    if failed:
        log(f"bench_formats: FAILED: {', '.join(failed)}")
        for case in cases:
            for failure in case.failures[:3]:
                log(f"  {case.key}: {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
