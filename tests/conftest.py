"""Shared fixtures: run the CLI in-process, and build checkpoints from bench/zoo.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # zoo.py: real architectures' names and shapes


@dataclass
class CliOutcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Run ``fc2conv ARGS...`` in-process through the same entry point as the console script."""
    from fc2conv_cli.cli import run

    def invoke(*args: object) -> CliOutcome:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliOutcome(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def sample_configs() -> Path:
    return ROOT / "fc2conv_cli" / "sample_configs"
