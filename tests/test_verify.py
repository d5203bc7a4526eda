"""fc2conv verify: a converted file against its source, without writing anything."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

MAP = "version: 1\nlayout: hwc\nlayers:\n  - {name: head.0, kernel: [2, 3]}\n  - {name: head.2}\n"


@pytest.fixture
def converted(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    source = tmp_path / "model.safetensors"
    save_file(
        {
            "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
            "head.0.bias": rng.standard_normal(5).astype(np.float32),
            "head.2.weight": rng.standard_normal((3, 5)).astype(np.float32),
        },
        str(source),
    )
    (tmp_path / "map.yaml").write_text(MAP)
    output = tmp_path / "fcn.safetensors"
    assert run_cli("convert", source, "--map", tmp_path / "map.yaml", "-o", output).code == 0
    return source, output, tmp_path / "map.yaml"


def verify(run_cli, source, output, map_path, *extra):
    return run_cli("verify", source, output, "--map", map_path, *extra)


def rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_a_good_file_verifies(run_cli, converted, tmp_path):
    source, output, map_path = converted
    before = sorted(p.name for p in tmp_path.iterdir())
    outcome = verify(run_cli, source, output, map_path, "--json", tmp_path / "r.json")
    assert outcome.code == 0, outcome.stderr
    assert "fc2conv verified" in outcome.stdout and "layers checked" in outcome.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["ok"] and report["verified"] and [x["ok"] for x in report["layers"]] == [True, True]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "r.json"])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t["backbone.weight"].__setitem__((0, 0, 0, 0), 9.0), "copied tensors differ"),
        (lambda t: t["head.0.weight"].__setitem__((1, 2, 0, 1), 9.0), "layers head.0 differ"),
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
    outcome = verify(run_cli, source, output, map_path)
    assert outcome.code == 1
    [line] = outcome.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(expected, line), line
    assert "Traceback" not in outcome.stderr


def test_a_file_converted_with_the_wrong_layout_fails(run_cli, converted, tmp_path):
    source, _, _ = converted
    (tmp_path / "chw.yaml").write_text(MAP.replace("hwc", "chw"))
    wrong = tmp_path / "wrong.safetensors"
    assert run_cli("convert", source, "--map", tmp_path / "chw.yaml", "-o", wrong).code == 0
    outcome = verify(run_cli, source, wrong, tmp_path / "map.yaml")
    assert outcome.code == 1
    assert "FAILED" in outcome.stdout
    assert "layers head.0 differ by more than --atol" in outcome.stderr


def test_bad_input_exits_2_with_one_line(run_cli, converted, tmp_path):
    source, _, map_path = converted
    outcome = verify(run_cli, source, tmp_path / "nope.safetensors", map_path)
    assert outcome.code == 2
    assert outcome.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file"
