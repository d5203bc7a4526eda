"""Property tests: random shapes, layouts, formats and dtypes convert exactly; random maps
either convert or are refused with one ``error:`` line per problem, never a traceback.

Conversions run in-process through ``fc2conv_cli.cli.run``, the console script's entry
point. Equivalence is checked independently of fc2conv's own checks, with torch:
``F.linear`` on the input flattened in the map's layout against ``F.conv1d/2d/3d`` with the
weights read back from the written file, both in float64. Examples are derandomized so
CI sees the same cases on every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
F = torch.nn.functional
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

SPATIAL = {1: "l", 2: "hw", 3: "dhw"}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

SETTINGS = settings(
    max_examples=35,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _run(*args: object) -> tuple[int, str, str]:
    """``fc2conv ARGS...`` in-process; returns (exit code, stdout, stderr)."""
    from fc2conv_cli.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _flatten(x, layout: str):
    """What the original network did: flatten ``x (N, C, *spatial)`` in ``layout`` order."""
    canonical = "c" + SPATIAL[x.dim() - 2]
    return x.permute(0, *(1 + canonical.index(a) for a in layout)).reshape(x.shape[0], -1)


def _assert_conv_equals_fc(weight_oi, bias, conv_weight, layout: str, kernel, seed: int):
    """FC on the flattened window equals the conv: on a kernel-sized input and densely."""
    ndim = len(kernel)
    channels = conv_weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    w = weight_oi.double()
    wc = conv_weight.double()
    b = None if bias is None else bias.double()
    scale = 1e-9 * (1 + float(w.abs().sum(1).max()))

    x = torch.randn(3, channels, *kernel, dtype=torch.float64, generator=generator)
    fc = F.linear(_flatten(x, layout), w, b)
    conv = CONV[ndim](x, wc, b).reshape(3, -1)
    assert conv.shape == fc.shape
    assert float((fc - conv).abs().max()) <= scale

    # Densely: every output position of a map one wider than the kernel is the FC applied
    # to that window.
    big = torch.randn(
        1, channels, *(k + 1 for k in kernel), dtype=torch.float64, generator=generator
    )
    dense = CONV[ndim](big, wc, b)
    assert dense.shape[2:] == (2,) * ndim
    for position in torch.cartesian_prod(*[torch.arange(2)] * ndim).reshape(-1, ndim).tolist():
        window = big[
            (
                slice(None),
                slice(None),
                *(slice(p, p + k) for p, k in zip(position, kernel, strict=True)),
            )
        ]
        expected = F.linear(_flatten(window, layout), w, b)[0]
        got = dense[(0, slice(None), *position)]
        assert float((expected - got).abs().max()) <= scale


@st.composite
def conversion_cases(draw):
    ndim = draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 4 - ndim + 1), min_size=ndim, max_size=ndim)))
    layout = "".join(draw(st.permutations("c" + SPATIAL[ndim])))
    return {
        "kernel": kernel,
        "layout": layout,
        "channels": draw(st.integers(1, 5)),
        "out_features": draw(st.integers(1, 6)),
        "weight_format": draw(st.sampled_from(["out_in", "in_out"])),
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "bias": draw(st.booleans()),
        "explicit_in_channels": draw(st.booleans()),
        "second_layer": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@SETTINGS
@given(case=conversion_cases())
def test_any_shape_layout_format_and_dtype_converts_exactly(case):
    kernel, layout, channels = case["kernel"], case["layout"], case["channels"]
    out_features, dtype = case["out_features"], DTYPES[case["dtype"]]
    in_out = case["weight_format"] == "in_out"
    generator = torch.Generator().manual_seed(case["seed"])
    in_features = channels * math.prod(kernel)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    tensors = {
        "head.0.weight": weight.t().contiguous() if in_out else weight,
        "backbone.weight": torch.randn(channels, 2, 3, generator=generator).to(dtype),
        "steps": torch.tensor([case["seed"]], dtype=torch.int64),
    }
    bias = torch.randn(out_features, generator=generator).to(dtype) if case["bias"] else None
    if bias is not None:
        tensors["head.0.bias"] = bias
    layer = f"  - name: head.0\n    rename: fc6\n    kernel: {list(kernel)}\n"
    if case["explicit_in_channels"]:
        layer += f"    in_channels: {channels}\n"
    second = None
    if case["second_layer"]:
        second = torch.randn(3, out_features, generator=generator).to(dtype)
        tensors["head.1.weight"] = second.t().contiguous() if in_out else second
        layer += "  - name: head.1\n"
    map_text = (
        f"version: 1\nlayout: {layout}\nweight_format: {case['weight_format']}\nlayers:\n{layer}"
    )

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source = folder / "model.safetensors"
        safetensors_torch.save_file(tensors, str(source))
        (folder / "map.yaml").write_text(map_text)
        output = folder / "out.safetensors"
        code, _, stderr = _run("convert", source, "--map", folder / "map.yaml", "-o", output)
        assert code == 0, stderr
        out = safetensors_torch.load_file(str(output))

    expected_names = {"fc6.weight", "backbone.weight", "steps"}
    expected_names |= {"fc6.bias"} if bias is not None else set()
    expected_names |= {"head.1.weight"} if second is not None else set()
    assert set(out) == expected_names
    conv_weight = out["fc6.weight"]
    assert conv_weight.shape == (out_features, channels, *kernel)
    assert conv_weight.dtype == dtype
    # A pure rearrangement: the same multiset of values, no rounding.
    assert torch.equal(conv_weight.reshape(-1).sort().values, weight.reshape(-1).sort().values)
    if bias is not None:
        assert out["fc6.bias"].dtype == dtype and torch.equal(out["fc6.bias"], bias)
    for name in ("backbone.weight", "steps"):
        assert out[name].dtype == tensors[name].dtype and torch.equal(out[name], tensors[name])
    _assert_conv_equals_fc(weight, bias, conv_weight, layout, kernel, case["seed"])
    if second is not None:
        conv2 = out["head.1.weight"]
        assert conv2.shape == (3, out_features, *(1,) * len(kernel))
        _assert_conv_equals_fc(
            second, None, conv2, "c" + SPATIAL[len(kernel)], (1,) * len(kernel), 1
        )


# ------------------------------------------------------------------------ random maps

VALID_MAP = {
    "version": 1,
    "layout": "chw",
    "layers": [{"name": "head.0", "rename": "fc", "kernel": [2, 3]}],
}
TOP_KEYS = ["version", "layout", "weight_format", "strip_prefix", "state_dict_key", "layers"]
LAYER_KEYS = [
    "name",
    "rename",
    "kernel",
    "in_channels",
    "layout",
    "weight_format",
    "weight",
    "bias",
]

# No lone surrogates: a YAML file on disk is UTF-8, which cannot hold them.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
HOSTILE_SCALARS = st.sampled_from(
    [
        None, 0, -1, -7, 1, 2, 3, 6, 24, 2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 1.5, -0.0,
        float("inf"), float("nan"), True, False, "", " ", "\t", "chw", "hwc", "cl", "dhwc",
        "CHW", "out_in", "in_out", "head.0", "head.0.weight", "head.0.bias", "backbone.weight",
        "fc", "module.", "名前", "ünïcödé", "a\nb", "x\x85y", "\u2028", "[2, 3]", "7x7",
    ]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | HOSTILE_SCALARS
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(TEXT | st.sampled_from(TOP_KEYS + LAYER_KEYS), children, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def perturbed_maps(draw):
    """A valid map with a few keys set to hostile values, removed, or added."""
    doc = yaml.safe_load(yaml.safe_dump(VALID_MAP))
    for _ in range(draw(st.integers(1, 3))):
        layer = draw(st.booleans())
        target = doc["layers"][0] if layer and isinstance(doc.get("layers"), list) else doc
        if not isinstance(target, dict):
            target = doc
        keys = LAYER_KEYS if target is not doc else TOP_KEYS
        key = draw(st.sampled_from(keys) | TEXT)
        action = draw(st.sampled_from(["set", "set", "set", "delete"]))
        if action == "delete":
            target.pop(key, None)
        else:
            target[key] = draw(HOSTILE_SCALARS | VALUES)
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode()


def _random_document():
    dumped = VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True, sort_keys=False).encode())
    raw_text = TEXT.map(str.encode) | st.text(max_size=60).map(
        lambda t: t.encode("utf-8", "surrogatepass")
    )
    return perturbed_maps() | perturbed_maps() | dumped | raw_text | st.binary(max_size=40)


@pytest.fixture(scope="module")
def checkpoint_dir():
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name)
    generator = torch.Generator().manual_seed(0)
    safetensors_torch.save_file(
        {
            "backbone.weight": torch.randn(4, 3, 3, 3, generator=generator),
            "head.0.weight": torch.randn(5, 24, generator=generator),
            "head.0.bias": torch.randn(5, generator=generator),
        },
        str(path / "model.safetensors"),
    )
    yield path
    folder.cleanup()


def _expected_problem_count(map_path: Path, source: Path, output: Path) -> int:
    """How many problems fc2conv itself found (a MapError/PlanError lists each one)."""
    from fc2conv_cli.errors import Fc2convError
    from fc2conv_cli.pipeline import ConvertOptions, convert

    try:
        convert(ConvertOptions(source, map_path, output, dry_run=True))
    except Fc2convError as error:
        return len(getattr(error, "problems", [error.message]))
    return 0


# Known-hard documents, always tried: a layer name holding a line break (the problem line
# names the layer), a NEL that str.splitlines() treats as one, huge and negative integers.
NAME_WITH_NEWLINE = b'version: 1\nlayout: chw\nlayers:\n  - name: "a\\nb"\n    kernel: "7x7"\n'
NAME_WITH_NEL = b'version: 1\nlayout: chw\nlayers:\n  - name: "a\\x85b"\n    kernel: [5]\n'
HUGE_NUMBERS = (
    b"version: 18446744073709551617\nlayout: chw\nlayers:\n"
    b"  - {name: head.0, kernel: [1000000000000000000000000000000, -2], in_channels: -1}\n"
)
HUGE_KERNEL = (
    b"version: 1\nlayout: chw\nlayers:\n  - {name: head.0, kernel: [9223372036854775808, 2]}\n"
)


@SETTINGS
@example(document=NAME_WITH_NEWLINE)
@example(document=NAME_WITH_NEL)
@example(document=HUGE_NUMBERS)
@example(document=HUGE_KERNEL)
@given(document=_random_document())
def test_any_map_document_converts_or_is_refused_line_by_line(checkpoint_dir, document):
    source = checkpoint_dir / "model.safetensors"
    map_path = checkpoint_dir / "map.yaml"
    output = checkpoint_dir / "out.safetensors"
    map_path.write_bytes(document)
    output.unlink(missing_ok=True)
    try:
        code, stdout, stderr = _run("convert", source, "--map", map_path, "-o", output)
        assert "Traceback" not in stdout + stderr
        assert code in (0, 2), (code, stderr)
        if code == 0:
            assert output.is_file()
            loaded = safetensors_torch.load_file(str(output))
            assert "backbone.weight" in loaded
        else:
            assert not output.exists()
            lines = stderr.rstrip("\n").split("\n")
            assert all(line.startswith("error: ") and line[7:].strip() for line in lines), stderr
            assert len(lines) == _expected_problem_count(map_path, source, output), stderr
        assert list(checkpoint_dir.glob(".*.tmp")) == []
    finally:
        output.unlink(missing_ok=True)


# ------------------------------------------------------------ changes in a written file

np = pytest.importorskip("numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

CHANGE_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
}
CHANGE_MAP = (
    "version: 1\nlayout: hwc\nweight_format: in_out\nlayers:\n"
    "  - {name: head.0, kernel: [2, 3]}\n  - {name: head.1}\n"
)
# Values a conversion must carry exactly and a careless check compares as equal: zero,
# whose sign flips; NaN, whose payload changes; Inf, one ulp from NaN.
SPECIAL = {(0, 0): 0.0, (1, 2): float("nan"), (2, 3): float("inf"), (3, 4): -0.0}


def _header(data: bytes) -> tuple[int, dict]:
    length = int.from_bytes(data[:8], "little")
    return 8 + length, json.loads(data[8 : 8 + length])


@pytest.fixture(scope="module")
def written_files():
    """Per dtype: a source, its map, and the bytes fc2conv wrote for it."""
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name)
    (path / "map.yaml").write_text(CHANGE_MAP)
    files = {}
    for code, dtype in CHANGE_DTYPES.items():
        rng = np.random.default_rng(0)
        kernel = rng.standard_normal((24, 5)).astype(dtype)  # in_out: (in_features, out)
        for index, value in SPECIAL.items():
            kernel[index] = value
        source = path / f"{code}.safetensors"
        safetensors_numpy.save_file(
            {
                "head.0.weight": kernel,
                "head.0.bias": rng.standard_normal(5).astype(dtype),
                "head.1.weight": rng.standard_normal((5, 3)).astype(dtype),
                "backbone.weight": rng.standard_normal((4, 3, 3)).astype(dtype),
                "steps": np.array([7, -1], np.int64),
            },
            str(source),
        )
        output = path / f"{code}.fcn.safetensors"
        code_, _, stderr = _run("convert", source, "--map", path / "map.yaml", "-o", output)
        assert code_ == 0, stderr
        files[code] = (source, output.read_bytes())
    yield path, files
    folder.cleanup()


@st.composite
def single_value_changes(draw):
    """A dtype, a tensor of the written file, one of its values, and a change of its bits."""
    return (
        draw(st.sampled_from(sorted(CHANGE_DTYPES))),
        draw(st.sampled_from(OUTPUT_TENSORS)),
        draw(st.integers(0, 10**6)),  # the value, modulo the tensor's size
        draw(st.sampled_from(["ulp_up", "ulp_down", "bit", "nan_payload", "sign"])),
        draw(st.integers(0, 63)),  # the bit to flip
        draw(st.integers(1, 2**51)),  # the NaN payload
    )


OUTPUT_TENSORS = ["head.0.weight", "head.0.bias", "head.1.weight", "backbone.weight", "steps"]
MANTISSA_BITS = {"F16": 10, "BF16": 7, "F32": 23, "F64": 52}


def _changed_bits(old: int, dtype: str, size: int, kind: str, bit: int, payload: int) -> int:
    """``old`` bits changed as ``kind`` says; never equal to ``old``."""
    width = 8 * size
    if kind == "ulp_up":
        new = (old + 1) % (1 << width)
    elif kind == "ulp_down":
        new = (old - 1) % (1 << width)
    elif kind == "sign":
        new = old ^ (1 << (width - 1))
    elif kind == "nan_payload" and dtype in MANTISSA_BITS:
        mantissa = MANTISSA_BITS[dtype]
        exponent = ((1 << (width - 1 - mantissa)) - 1) << mantissa
        new = (old & (1 << (width - 1))) | exponent | (payload % ((1 << mantissa) - 1) + 1)
    else:
        new = old ^ (1 << (bit % width))
    return new if new != old else old ^ 1


# In the written (5, 4, 2, 3) conv weight, the special values sit at flat indices 0 (0.0),
# 54 (NaN), 84 (Inf) and 114 (-0.0).
@SETTINGS
@example(case=("F32", "head.0.weight", 0, "sign", 0, 1))  # 0.0 -> -0.0
@example(case=("F32", "head.0.weight", 114, "sign", 0, 1))  # -0.0 -> 0.0
@example(case=("BF16", "head.0.weight", 54, "nan_payload", 0, 5))  # another NaN payload
@example(case=("F16", "head.0.weight", 84, "ulp_down", 0, 1))  # Inf -> largest finite
@example(case=("F32", "head.0.weight", 84, "ulp_up", 0, 1))  # Inf -> NaN
@example(case=("F64", "head.0.bias", 4, "ulp_up", 0, 1))
@given(case=single_value_changes())
def test_any_single_value_change_in_a_written_file_fails_verify(written_files, case):
    code, name, element, kind, bit, payload = case
    folder, files = written_files
    source, data = files[code]
    start, header = _header(data)
    entry = header[name]
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}[entry["dtype"]]
    count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // size
    offset = start + entry["data_offsets"][0] + (element % count) * size
    old = int.from_bytes(data[offset : offset + size], "little")
    new = _changed_bits(old, entry["dtype"], size, kind, bit, payload)
    changed = folder / "changed.safetensors"
    changed.write_bytes(data[:offset] + new.to_bytes(size, "little") + data[offset + size :])

    exit_code, stdout, stderr = _run("verify", source, changed, "--map", folder / "map.yaml")
    assert exit_code == 1, (case, stdout, stderr)
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: differs from its source: ") and name in line, line
    assert "Traceback" not in stdout + stderr
