"""fc2conv verify: a converted file against its source, without writing anything.

Every change to a converted value is caught by its bits, named by layer, index and both
values; digests that differ from the given files are warnings, not failures.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

MAP = "version: 1\nlayout: hwc\nlayers:\n  - {name: head.0, kernel: [2, 3]}\n  - {name: head.2}\n"


def source_tensors(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        "head.0.bias": rng.standard_normal(5).astype(np.float32),
        "head.2.weight": rng.standard_normal((3, 5)).astype(np.float32),
    }
    return {**tensors, **overrides}


def convert(run_cli, folder, tensors):
    source = folder / "model.safetensors"
    save_file(tensors, str(source))
    (folder / "map.yaml").write_text(MAP)
    output = folder / "fcn.safetensors"
    outcome = run_cli("convert", source, "--map", folder / "map.yaml", "-o", output)
    assert outcome.code == 0, outcome.stderr
    return source, output, folder / "map.yaml", outcome


@pytest.fixture
def converted(tmp_path, run_cli):
    return convert(run_cli, tmp_path, source_tensors())[:3]


def verify(run_cli, source, output, map_path, *extra):
    return run_cli("verify", source, output, "--map", map_path, *extra)


def rewrite(path, change):
    """Change the converted file's tensors, keeping its metadata (its recorded digests)."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as file:
        metadata = file.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def one_line_error(outcome) -> str:
    assert outcome.code == 1, outcome.stderr
    [line] = outcome.stderr.strip().splitlines()
    assert line.startswith("error: differs from its source: ") and "Traceback" not in line
    return line


def bits(value) -> str:
    return f"0x{np.float32(value).view(np.uint32):08x}"


def test_a_good_file_verifies(run_cli, converted, tmp_path):
    source, output, map_path = converted
    before = sorted(p.name for p in tmp_path.iterdir())
    outcome = verify(run_cli, source, output, map_path, "--json", tmp_path / "r.json")
    assert outcome.code == 0, outcome.stderr
    assert "fc2conv verified" in outcome.stdout and "layers checked" in outcome.stdout
    assert (
        "every value bit-exact, float64 within atol" in outcome.stdout
        and "warning" not in outcome.stdout
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["verified"]
    assert [(x["ok"], x["bits_equal"], x["mismatches"]) for x in report["layers"]] == [
        (True, True, []),
        (True, True, []),
    ]
    assert {k: v["matches"] for k, v in report["provenance"].items()} == {
        "source_sha256": True,
        "layer_map_sha256": True,
    }
    assert report["warnings"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "r.json"])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t["backbone.weight"].__setitem__((0, 0, 0, 0), 9.0), "copied tensors differ"),
        (
            lambda t: t["head.0.weight"].__setitem__((1, 2, 0, 1), 9.0),
            r"layer head.0: head.0.weight differs from the source at \(output 1, channel 2, "
            r"position \(0, 1\)\): source -?\d\.\d+ \(0x[0-9a-f]{8}\), written 9.0 \(0x41100000\)",
        ),
        (lambda t: t.pop("head.0.bias"), "head.0.bias: missing from the written file"),
        (
            lambda t: t.__setitem__("extra", np.ones(2, np.float32)),
            "extra: in the written file but not in the plan",
        ),
        (
            lambda t: t.__setitem__("head.2.weight", np.ones((3, 5), np.float32)),
            r"head.2.weight: written as F32 \[3, 5\], planned F32 \[3, 5, 1, 1\]",
        ),
    ],
    ids=["copy-altered", "weight-altered", "missing", "extra", "wrong-shape"],
)
def test_any_difference_fails_and_says_which(run_cli, converted, change, expected):
    source, output, map_path = converted
    rewrite(output, change)
    line = one_line_error(verify(run_cli, source, output, map_path))
    assert re.search(expected, line), line


def test_a_one_ulp_change_fails(run_cli, converted, tmp_path):
    source, output, map_path = converted
    original = load_file(str(output))["head.0.weight"][3, 1, 1, 2]
    nudged = np.nextafter(original, np.float32(np.inf))

    rewrite(output, lambda t: t["head.0.weight"].__setitem__((3, 1, 1, 2), nudged))
    outcome = verify(run_cli, source, output, map_path, "--json", tmp_path / "r.json")
    line = one_line_error(outcome)
    assert "(output 3, channel 1, position (1, 2))" in line
    assert f"({bits(original)})" in line and f"({bits(nudged)})" in line
    layer = json.loads((tmp_path / "r.json").read_text())["layers"][0]
    assert layer["bits_equal"] is False and layer["ok"] is False
    # The float64 figure alone is far inside --atol: only the bits see one ulp.
    assert layer["max_abs_diff"] < 1e-6
    assert layer["mismatches"] == [
        {
            "tensor": "head.0.weight",
            "output": 3,
            "channel": 1,
            "position": [1, 2],
            "source": f"{float(original)!r} ({bits(original)})",
            "written": f"{float(nudged)!r} ({bits(nudged)})",
            "count": 1,
        }
    ]
    assert "head.0.weight differs from the source at" in outcome.stdout  # under the table


@pytest.mark.parametrize(
    ("tensor", "index", "expected"),
    [
        ("head.0.weight", (4, 3, 1, 0), "head.0.weight differs from the source at (output 4, "),
        ("head.2.weight", (2, 4, 0, 0), "layer head.2: head.2.weight differs from the source at "),
        ("head.0.bias", (2,), "layer head.0: head.0.bias differs from the source at (output 2):"),
    ],
    ids=["another-row", "another-layer", "bias"],
)
def test_a_change_anywhere_else_fails(run_cli, converted, tensor, index, expected):
    source, output, map_path = converted
    rewrite(output, lambda t: t[tensor].__setitem__(index, t[tensor][index] * -2))
    assert expected in one_line_error(verify(run_cli, source, output, map_path))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_row_scrambled_elsewhere_fails(run_cli, tmp_path, bad):
    weight = source_tensors()["head.0.weight"]
    weight[2, 5] = bad  # channel 1, position (0, 1) in hwc: i = (h * 3 + w) * 4 + c
    source, output, map_path, converted = convert(
        run_cli, tmp_path, source_tensors(**{"head.0.weight": weight})
    )
    assert "head.0: 1 of 5 output rows hold NaN or Inf in the source" in converted.stdout
    assert verify(run_cli, source, output, map_path).code == 0

    def scramble(tensors):
        row = tensors["head.0.weight"][2].reshape(-1)  # (4, 2, 3): the non-finite filter
        finite = np.isfinite(row)
        row[finite] = row[finite][::-1]

    rewrite(output, scramble)
    outcome = verify(run_cli, source, output, map_path, "--json", "-")
    report = json.loads(outcome.stdout)
    assert outcome.code == 1
    layer = report["layers"][0]
    assert layer["nonfinite_rows"] == 1 and layer["bits_equal"] is False
    assert layer["mismatches"][0]["output"] == 2 and layer["mismatches"][0]["count"] == 22
    assert (
        "layer head.0: head.0.weight differs from the source at (output 2, "
        in (report["error"]["message"])
    )


def test_recorded_digests_that_differ_are_warnings_not_failures(run_cli, converted, tmp_path):
    source, output, _ = converted
    # The same tensors in another file (other metadata), and the same map with a comment.
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(source)), str(other), metadata={"saved_by": "someone else"})
    other_map = tmp_path / "other.yaml"
    other_map.write_text("# the same rules\n" + MAP)
    outcome = verify(run_cli, other, output, other_map, "--json", tmp_path / "r.json")
    assert outcome.code == 0, outcome.stderr
    warnings = [line for line in outcome.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, outcome.stdout
    assert "source_sha256 recorded in" in warnings[0] and "another source file" in warnings[0]
    assert "layer_map_sha256 recorded in" in warnings[1] and "another layer map" in warnings[1]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True and len(report["warnings"]) == 2
    provenance = report["provenance"]
    assert provenance["source_sha256"]["matches"] is False
    assert provenance["source_sha256"]["actual"] != provenance["source_sha256"]["recorded"]
    assert provenance["layer_map_sha256"]["matches"] is False


def test_a_file_without_fc2conv_metadata_is_warned_about(run_cli, converted):
    source, output, map_path = converted
    save_file(load_file(str(output)), str(output))  # the same tensors, no metadata
    outcome = verify(run_cli, source, output, map_path)
    assert outcome.code == 0, outcome.stderr
    assert f"warning: {output} records no source_sha256 (not written by fc2conv?)" in (
        outcome.stdout
    )


def test_a_file_converted_with_the_wrong_layout_fails(run_cli, converted, tmp_path):
    source, _, _ = converted
    (tmp_path / "chw.yaml").write_text(MAP.replace("hwc", "chw"))
    wrong = tmp_path / "wrong.safetensors"
    assert run_cli("convert", source, "--map", tmp_path / "chw.yaml", "-o", wrong).code == 0
    outcome = verify(run_cli, source, wrong, tmp_path / "map.yaml")
    line = one_line_error(outcome)
    assert "FAILED" in outcome.stdout and "DIFFER" in outcome.stdout
    assert "layer head.0: head.0.weight differs from the source at (output 0, " in line
    assert "warning: layer_map_sha256 recorded in" in outcome.stdout


def test_bad_input_exits_2_with_one_line(run_cli, converted, tmp_path):
    source, _, map_path = converted
    outcome = verify(run_cli, source, tmp_path / "nope.safetensors", map_path)
    assert outcome.code == 2
    assert outcome.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file"
