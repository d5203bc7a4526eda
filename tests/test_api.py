"""The Python API, used as a notebook script would: a dict in, a dict out, errors caught.

Every call goes through ``import fc2conv_cli as fc2conv``; nothing may print or exit.
Converted tensors are judged against what ``fc2conv convert`` writes for the same input
(byte for byte) and against torch's own Linear and Conv2d (numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fc2conv_cli as fc2conv

MAP = {
    "version": 1,
    "layout": "hwc",
    "layers": [{"name": "head.0", "rename": "fc", "kernel": (2, 3)}, {"name": "head.2"}],
}
MAP_YAML = """\
version: 1
layout: hwc
layers:
  - {name: head.0, rename: fc, kernel: [2, 3]}
  - {name: head.2}
"""


def tensors() -> dict[str, np.ndarray]:
    """A conv backbone weight, a Linear(24, 5) over a 4 x 2 x 3 map, then a Linear(5, 3)."""
    rng = np.random.default_rng(0)
    return {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
        "head.2.weight": rng.standard_normal((3, 5)).astype(np.float32),
    }


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "net.safetensors"
    save_file(tensors(), str(path))
    return str(path)  # a plain str, as a notebook passes it


@pytest.fixture(autouse=True)
def nothing_printed(capsys):
    yield
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", ""), "the API printed"


def test_importing_the_package_stays_light():
    code = (
        "import sys, fc2conv_cli\n"
        "heavy = ('numpy', 'torch', 'yaml', 'rich', 'click')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "fc2conv_cli.LayerMap\n"
        "print('torch' in sys.modules, callable(fc2conv_cli.convert_state_dict))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["[]", "False True"], out.stderr
    assert set(fc2conv.__all__) <= set(dir(fc2conv))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fc2conv.nope  # noqa: B018


@pytest.mark.parametrize(
    "layer_map",
    [MAP, MAP_YAML, "map.yaml", "path", "LayerMap"],
    ids=["dict", "yaml", "str path", "Path", "LayerMap"],
)
def test_convert_takes_every_kind_of_map(source, tmp_path, layer_map):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    given = (
        {
            "map.yaml": str(tmp_path / "map.yaml"),
            "path": tmp_path / "map.yaml",
            "LayerMap": fc2conv.LayerMap.from_yaml(MAP_YAML),
        }.get(layer_map, layer_map)
        if isinstance(layer_map, str)
        else layer_map
    )
    output = str(tmp_path / "out.safetensors")
    result = fc2conv.convert(source, given, output)
    assert result.ok and result.published and result.exit_code == 0
    assert result.output == Path(output)
    written = load_file(output)
    assert written["fc.weight"].shape == (5, 4, 2, 3)
    assert written["head.2.weight"].shape == (3, 5, 1, 1)
    report = result.to_json()
    assert report["layers"] == result.layers
    assert [layer["name"] for layer in report["layers"]] == ["head.0", "head.2"]
    assert report["ok"] is True and report["output"] == output
    json.dumps(report, allow_nan=False)  # the report is plain JSON


def test_to_json_is_the_cli_report(source, tmp_path, run_cli, capsys):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    api = fc2conv.convert(source, tmp_path / "map.yaml", tmp_path / "a.safetensors").to_json()
    outcome = run_cli(
        "convert", source, "--map", tmp_path / "map.yaml", "-o", tmp_path / "b.safetensors",
        "--json", "-", "-q",
    )  # fmt: skip
    cli = json.loads(outcome.stdout)
    for report in (api, cli):
        report.pop("seconds")
        report.pop("output")
    assert api == cli


def test_convert_into_a_folder_names_the_output_after_the_input(source, tmp_path):
    result = fc2conv.convert(source, MAP, str(tmp_path / "new") + "/")
    assert result.output == tmp_path / "new" / "net.safetensors"
    assert result.output.is_file()
    assert fc2conv.output_path("a/b/model.json", "out/") == Path("out/b.safetensors")
    assert fc2conv.output_path("ckpt/vgg16.pth.tar", tmp_path) == tmp_path / "vgg16.safetensors"
    assert fc2conv.output_path("x.pth", "y.safetensors") == Path("y.safetensors")


def test_convert_state_dict_numpy_gives_what_convert_writes(source, tmp_path):
    state = tensors()
    before = {k: v.copy() for k, v in state.items()}
    converted = fc2conv.convert_state_dict(state, MAP)
    fc2conv.convert(source, MAP, tmp_path / "out.safetensors")
    written = load_file(str(tmp_path / "out.safetensors"))
    assert list(converted) == list(written)  # the same names, in file order
    for name, array in converted.items():
        assert isinstance(array, np.ndarray) and array.flags.writeable
        assert array.dtype == written[name].dtype and array.tobytes() == written[name].tobytes()
    assert all(np.array_equal(state[k], before[k]) for k in state)  # the input is untouched


def test_convert_state_dict_torch_runs_as_the_linear_did():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 3, 5))
    state = {"module.head.1.weight": head[1].weight, "module.head.1.bias": head[1].bias}
    state["module.other"] = torch.arange(3, dtype=torch.int64)
    layer_map = fc2conv.LayerMap.from_dict(
        {"version": 1, "layout": "chw", "layers": [{"name": "head.1", "kernel": [2, 3]}]}
    )
    converted = fc2conv.convert_state_dict(state, layer_map)
    assert set(converted) == {"head.1.weight", "head.1.bias", "other"}  # module. stripped
    assert all(isinstance(t, torch.Tensor) for t in converted.values())
    conv = torch.nn.Conv2d(4, 5, (2, 3))
    conv.load_state_dict({"weight": converted["head.1.weight"], "bias": converted["head.1.bias"]})
    x = torch.randn(7, 4, 2, 3)
    with torch.no_grad():
        assert torch.allclose(conv(x).flatten(1), head(x), atol=1e-6)
    assert torch.equal(converted["other"], state["module.other"])


def test_convert_state_dict_keeps_bfloat16_bits():
    torch = pytest.importorskip("torch")
    weight = torch.randn(6, 8).to(torch.bfloat16)
    layer_map = {"version": 1, "layout": "hwc", "layers": [{"name": "fc", "kernel": [2, 2]}]}
    converted = fc2conv.convert_state_dict({"fc.weight": weight}, layer_map)
    out = converted["fc.weight"]
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (6, 2, 2, 2)
    # hwc rows: the conv weight read back in (h, w, c) order is the FC row.
    assert torch.equal(out.permute(0, 2, 3, 1).reshape(6, 8), weight)


def test_errors_are_typed_with_one_line_and_an_exit_code(source, tmp_path):
    cases = [
        (lambda: fc2conv.convert(source, {"version": 1, "layers": []}, tmp_path / "o.safetensors"),
         fc2conv.MapError, "layout"),
        (lambda: fc2conv.convert_state_dict(tensors(), {**MAP, "layers": [{"name": "head.0",
         "kernel": [5, 5]}]}), fc2conv.PlanError, "not divisible"),
        (lambda: fc2conv.convert(tmp_path / "missing.pth", MAP, tmp_path / "o.safetensors"),
         fc2conv.CheckpointError, "no such file"),
        (lambda: fc2conv.convert(source, MAP, source), fc2conv.OutputError, "safetensors"),
        (lambda: fc2conv.convert_state_dict({"head.0.weight": [1.0]}, MAP),
         fc2conv.CheckpointError, "expected a torch tensor or a numpy array"),
        (lambda: fc2conv.LayerMap.from_yaml("version: 1\nlayout: chw\nlayers: [}"),
         fc2conv.MapError, "YAML syntax error"),
        (lambda: fc2conv.LayerMap.from_path("no-such-map"), fc2conv.MapError, "not found"),
    ]  # fmt: skip
    for call, kind, words in cases:
        with pytest.raises(kind, match=words) as caught:
            call()
        error = caught.value
        assert isinstance(error, fc2conv.InputError) and error.exit_code == 2
        assert all("\n" not in problem for problem in error.problems)
        assert fc2conv.error_json(error)["error"]["code"] == error.code
    assert not list(tmp_path.glob("o.safetensors*"))


def test_a_failed_check_raises_with_the_report(source, tmp_path, monkeypatch):
    from fc2conv_cli import write

    real = write._write_tensor

    def corrupt(file, planned, checkpoint):
        if planned.name != "fc.weight":
            return real(file, planned, checkpoint)
        data = bytearray(checkpoint.raw(planned.source))
        data[5] ^= 0x40
        file.write(data)

    monkeypatch.setattr(write, "_write_tensor", corrupt)
    for call in (
        lambda: fc2conv.convert_state_dict(tensors(), MAP),
        lambda: fc2conv.convert(source, MAP, tmp_path / "out.safetensors"),
    ):
        with pytest.raises(fc2conv.CheckFailed, match=r"head\.0") as caught:
            call()
        assert caught.value.exit_code == 1
        report = caught.value.result.to_json()
        assert report["ok"] is False
        assert [layer["ok"] for layer in report["layers"]] == [False, True]
    assert not (tmp_path / "out.safetensors").exists()


def test_verify_and_inspect_and_suggest_map(source, tmp_path):
    output = tmp_path / "out.safetensors"
    fc2conv.convert(source, MAP_YAML, output)
    verified = fc2conv.verify(source, str(output), MAP)
    assert verified.verified and verified.ok and not verified.published
    assert verified.to_json()["verified"] is True
    other = tmp_path / "other.safetensors"
    save_file({**load_file(str(output)), "head.2.weight": np.zeros((3, 5, 1, 1), np.float32)},
              str(other))  # fmt: skip
    with pytest.raises(fc2conv.CheckFailed, match="differs from its source"):
        fc2conv.verify(source, other, MAP)

    inspected = fc2conv.inspect(source)
    assert inspected.suggestion is None
    assert inspected.to_json()["tensors"] == 4
    suggestion = fc2conv.suggest_map(source)
    assert suggestion.layers == ("head.0", "head.2")
    layer_map = fc2conv.LayerMap.from_yaml(suggestion.text)
    assert [rule.name for rule in layer_map.rules] == ["head.0", "head.2"]
    written = fc2conv.inspect(source, map_output=tmp_path / "suggested.yaml")
    assert written.suggestion is not None
    assert (tmp_path / "suggested.yaml").read_text() == written.suggestion.text


def test_layer_map_constructors_agree():
    from_dict = fc2conv.LayerMap.from_dict(MAP)
    from_yaml = fc2conv.LayerMap.from_yaml(MAP_YAML)
    assert from_dict.rules == from_yaml.rules
    assert fc2conv.LayerMap.from_yaml(from_dict.text).rules == from_dict.rules  # text round-trips
    assert from_dict.source == "<dict>" and from_yaml.source == "<yaml>"
    assert fc2conv.LayerMap.from_path("vgg16").rules[0].name == "classifier.0"  # shipped
    with pytest.raises(fc2conv.MapError) as caught:
        fc2conv.LayerMap.from_dict({"version": 2, "layout": "xyz", "layers": "fc"})
    assert len(caught.value.problems) == 3  # every problem at once
