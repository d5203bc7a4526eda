"""Everyday CLI conventions (issue 13, section 4), each from the command line.

-q/-v on every command, -o DIR/, --map - (stdin), shell completion, tables readable at
80 and 40 columns and as plain text, and the progress bar (terminal only, large inputs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file, save_file

from fc2conv_cli import report
from fc2conv_cli.api import convert
from fc2conv_cli.cli import cli

ROOT = Path(__file__).resolve().parent.parent
LONG = "classifier_with_a_rather_long_module_path.layers.0"
MAP_TEXT = f"""\
version: 1
layout: chw
layers:
  - {{name: {LONG}, rename: fc6_renamed_to_something_long_as_well, kernel: [2, 3]}}
  - {{name: head.2}}
"""
BOX = set("─━│┃┏┓┗┛┡┩└┘├┤┬┴┼╇╈╭╮╰╯")


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    source = tmp_path / "net.safetensors"
    save_file(
        {
            "backbone.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            f"{LONG}.weight": rng.standard_normal((5, 24)).astype(np.float32),
            f"{LONG}.bias": rng.standard_normal(5).astype(np.float32),
            "head.2.weight": rng.standard_normal((3, 5)).astype(np.float32),
        },
        str(source),
    )
    layer_map = tmp_path / "map.yaml"
    layer_map.write_text(MAP_TEXT)
    return source, layer_map


def test_every_command_takes_quiet_and_verbose():
    for name, command in cli.commands.items():
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, name


def test_quiet_prints_errors_only_and_keeps_json_and_exit_codes(case, tmp_path, run_cli):
    source, layer_map = case
    out = tmp_path / "out.safetensors"
    quiet = run_cli("convert", source, "--map", layer_map, "-o", out, "-q")
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert out.is_file()
    loud = run_cli("convert", source, "--map", layer_map, "-o", out, "--force", "--json", "-")
    quiet = run_cli(
        "convert", source, "--map", layer_map, "-o", out, "--force", "--json", "-", "-q"
    )
    assert quiet.stderr == "" and loud.stderr != ""  # the table went to stderr, unless -q
    assert json.loads(quiet.stdout).keys() == json.loads(loud.stdout).keys()
    refused = run_cli("convert", source, "--map", layer_map, "-o", out, "-q")
    assert refused.code == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: ") and "already exists" in refused.stderr
    for args in (["verify", source, out, "--map", layer_map], ["inspect", source]):
        outcome = run_cli(*args, "-q")
        assert (outcome.code, outcome.stdout, outcome.stderr) == (0, "", ""), args
    # Data on stdout is what the command is for: -q keeps it.
    assert run_cli("schema", "map", "-q").stdout.startswith("{")
    both = run_cli("convert", source, "--map", layer_map, "-o", out, "-q", "-v")
    assert both.code == 2 and "exclude each other" in both.stderr


def test_verbose_adds_notes_and_one_line_per_step(case, tmp_path, run_cli):
    source, layer_map = case
    plain = run_cli("convert", source, "--map", layer_map, "-o", tmp_path / "a.safetensors")
    loud = run_cli("convert", source, "--map", layer_map, "-o", tmp_path / "b.safetensors", "-v")
    assert plain.code == loud.code == 0
    steps = [line for line in loud.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == [
        "step read map", "step open", "step plan", "step write", "step check", "step publish",
    ]  # fmt: skip
    assert all(line.endswith(" s") for line in steps)
    assert "step " not in plain.stderr  # in a pipe: nothing per step without -v
    verify = run_cli("verify", source, tmp_path / "b.safetensors", "--map", layer_map, "-v")
    assert "step check:" in verify.stderr and "step write" not in verify.stderr


def test_output_folder_names_the_file_after_the_input(case, tmp_path, run_cli):
    source, layer_map = case
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_cli("convert", source, "--map", layer_map, "-o", existing).code == 0
    assert (existing / "net.safetensors").is_file()
    fresh = f"{tmp_path / 'fresh'}/"
    outcome = run_cli("convert", source, "--map", layer_map, "-o", fresh)
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "fresh" / "net.safetensors").is_file()
    nested = run_cli("convert", source, "--map", layer_map, "-o", f"{tmp_path}/no/such/")
    assert nested.code == 2 and "parent folder does not exist" in nested.stderr


def test_map_from_stdin(case, tmp_path, run_cli, monkeypatch):
    source, _ = case
    monkeypatch.setattr(sys, "stdin", io.StringIO(MAP_TEXT))
    out = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", "-", "-o", out)
    assert outcome.code == 0, outcome.stderr
    assert load_file(str(out)).keys() >= {"fc6_renamed_to_something_long_as_well.weight"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(MAP_TEXT))
    assert run_cli("verify", source, out, "--map", "-").code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("version: 1\nlayers: []\n"))
    bad = run_cli("convert", source, "--map", "-", "-o", tmp_path / "x.safetensors")
    assert bad.code == 2 and bad.stderr.startswith("error: <stdin>: top level: layout")


@pytest.mark.parametrize(
    ("shell", "needle"),
    [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete --no-files")],
)
def test_completion_scripts(shell, needle):
    env = {**os.environ, "_FC2CONV_COMPLETE": f"{shell}_source", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "fc2conv_cli"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and needle in out.stdout and "_FC2CONV_COMPLETE" in out.stdout


def test_completion_completes_commands_and_formats():
    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_FC2CONV_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
            "PYTHONPATH": str(ROOT),
        }
        args = [sys.executable, "-m", "fc2conv_cli"]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60).stdout

    assert "plain,convert" in complete("fc2conv conv").splitlines()
    assert "plain,onnx" in complete("fc2conv convert --format o").splitlines()


def render(width: int, result) -> str:
    """The conversion table of a real run in a fixed-width, colourless console."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    report.render_conversion(console, result)
    return console.file.getvalue()


@pytest.fixture
def result(case, tmp_path):
    source, layer_map = case
    return convert(source, layer_map, tmp_path / "out.safetensors")


@pytest.mark.parametrize("width", [200, 80, 40])
def test_tables_keep_every_number_and_shape_whole(result, width):
    text = render(width, result)
    assert "…" not in text
    # The footer is one soft-wrapped line (the terminal folds it); the table fits.
    assert all(len(line) <= width for line in text.splitlines() if " | " not in line)
    for whole in ("(5, 24)", "(5, 4, 2, 3)", "(3, 5)", "(3, 5, 1, 1)", "2x3", "1x1"):
        assert any(whole in line for line in text.splitlines()), (whole, text)
    assert text.count(" ok") >= 2 and "out_in>oihw" in text
    flat = "".join(c for c in "".join(text.split()) if c not in BOX)
    for name in (f"{LONG}.weight", "fc6_renamed_to_something_long_as_well.weight"):
        assert name in flat  # long names wrap, but nothing of them is lost


def test_inspect_and_plan_tables_at_40_columns(case, run_cli, monkeypatch, tmp_path):
    source, layer_map = case
    monkeypatch.setenv("COLUMNS", "40")
    for args in (
        ["inspect", source],
        ["convert", source, "--map", layer_map, "-o", tmp_path / "o.safetensors", "--dry-run"],
    ):
        outcome = run_cli(*args)
        assert outcome.code == 0 and "…" not in outcome.stdout
        lines = [line for line in outcome.stdout.splitlines() if " | " not in line]  # footer
        assert all(len(line) <= 40 for line in lines), outcome.stdout
        assert "(5, 24)" in outcome.stdout or "(5, 4, 2, 3)" in outcome.stdout


@pytest.mark.parametrize("setting", [("NO_COLOR", "1"), ("TERM", "dumb")])
def test_plain_text_without_box_characters_off_a_terminal(case, run_cli, monkeypatch, setting):
    source, _ = case
    boxed = run_cli("inspect", source)
    assert BOX & set(boxed.stdout)  # by default rich draws boxes, even in a pipe
    monkeypatch.setenv(*setting)
    plain = run_cli("inspect", source)
    assert plain.code == 0 and not BOX & set(plain.stdout)
    assert "(5, 24)" in plain.stdout and "backbone" in plain.stdout


def progress_console() -> Console:
    return Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)


def test_progress_bar_on_a_terminal_for_large_inputs_only(case, tmp_path, monkeypatch):
    source, layer_map = case
    monkeypatch.delenv("CI", raising=False)
    small = report.StepProgress(progress_console(), report.PROGRESS_MIN_BYTES - 1)
    assert small._progress is None
    off_terminal = Console(file=io.StringIO(), width=100)
    assert report.StepProgress(off_terminal, 10 * report.PROGRESS_MIN_BYTES)._progress is None
    monkeypatch.setenv("CI", "true")
    assert report.StepProgress(progress_console(), report.PROGRESS_MIN_BYTES)._progress is None
    monkeypatch.delenv("CI")

    console = progress_console()
    with report.StepProgress(console, report.PROGRESS_MIN_BYTES) as steps:
        assert steps._progress is not None
        result = convert(source, layer_map, tmp_path / "o.safetensors", steps=steps)
    assert result.ok
    assert [name for name, _ in steps.timings] == [
        "read map", "open", "plan", "write", "check", "publish",
    ]  # fmt: skip
    shown = console.file.getvalue()
    # Each step that moves bytes gets a bar: its bytes, rate and time left.
    assert "write" in shown and "check" in shown and "/992 bytes" in shown
