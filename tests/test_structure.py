"""The shape of the code: one step per module, no backward imports, torch only when needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import fc2conv_cli
from fc2conv_cli import cli, pipeline

PACKAGE = Path(fc2conv_cli.__file__).parent
# The pipeline's order; a module may import only modules before it.
ORDER = [
    "errors",
    "digest",
    "layout",
    "guess",
    "layer_map",
    "manifest",
    "schema",
    "readers",
    "plan",
    "evidence",
    "suggest",
    "compute",
    "write",
    "check",
    "pipeline",
    "batch",
    "export",
    "report",
    "report_export",
    "api",  # after report: to_json() is report's JSON; before cli, a thin layer over it
    "cli",
]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("fc2conv_cli.")
        ):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fc2conv_cli.")}
    return found


def sources(name: str) -> list[Path]:
    """A step's files: its module, or every module of its package (``readers``)."""
    package = PACKAGE / name
    return sorted(package.glob("*.py")) if package.is_dir() else [PACKAGE / f"{name}.py"]


def test_every_module_is_in_the_pipeline_order():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules | packages == set(ORDER)


def test_no_module_imports_a_later_one():
    for position, name in enumerate(ORDER):
        later = set().union(*(imported_modules(p) for p in sources(name))) & set(
            ORDER[position + 1 :]
        )
        assert not later, f"{name} imports later modules {later}"


def test_library_modules_do_not_import_click_or_print():
    for name in ORDER[:-1]:
        for path in sources(name):
            source = path.read_text()
            assert "import click" not in source, path
            assert "print(" not in source or name in ("report", "report_export"), path
            assert "sys.exit" not in source, path


def test_cli_default_atol_is_the_checks_default():
    assert cli._ATOL_DEFAULT == pipeline.DEFAULT_ATOL


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_safetensors_conversion_never_imports_torch(tmp_path):
    save_file(
        {"fc.weight": np.ones((4, 12), np.float32), "fc.bias": np.zeros(4, np.float32)},
        str(tmp_path / "in.safetensors"),
    )
    (tmp_path / "map.yaml").write_text(
        "version: 1\nlayout: hwc\nlayers: [{name: fc, kernel: [2, 2]}]\n"
    )
    args = [
        str(tmp_path / "in.safetensors"),
        "--map",
        str(tmp_path / "map.yaml"),
        "-o",
        str(tmp_path / "out.safetensors"),
    ]
    result = run_python(
        "import sys\nfrom fc2conv_cli.cli import run\n"
        f"code = run(['convert', *{args!r}])\n"
        "print('torch' in sys.modules, code)\n"
    )
    assert result.stdout.strip().splitlines()[-1] == "False 0", result.stdout + result.stderr
    assert (tmp_path / "out.safetensors").exists()


def test_help_imports_neither_torch_nor_numpy_and_errors_not_torch():
    result = run_python(
        "import sys\nfrom fc2conv_cli.cli import run\n"
        "run(['--help']); run(['convert', '--help'])\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
        "run(['convert', 'x.pth', '--map', 'nope.yaml', '-o', 'y.safetensors'])\n"
        "print('torch' in sys.modules)\n"
    )
    assert result.stdout.strip().splitlines()[-2:] == ["[]", "False"], result.stdout + result.stderr


def test_a_plain_copy_without_checks_never_imports_numpy(tmp_path):
    # Only the safetensors library's own reading of the staged file (issue 9: every
    # published file opens in safetensors) imports numpy: its safe_open always does.
    save_file({"fc.weight": np.ones((4, 12), np.float32)}, str(tmp_path / "in.safetensors"))
    (tmp_path / "map.yaml").write_text("version: 1\nlayout: chw\nlayers: [{name: fc}]\n")
    args = [
        "convert",
        str(tmp_path / "in.safetensors"),
        "--map",
        str(tmp_path / "map.yaml"),
        "-o",
        str(tmp_path / "out.safetensors"),
        "--no-check",
    ]
    result = run_python(
        "import sys\nfrom fc2conv_cli import write\nfrom fc2conv_cli.cli import run\n"
        "check, seen = write._check_with_safetensors, []\n"
        "def spy(*args):\n"
        "    seen.append('numpy' in sys.modules)\n"
        "    check(*args)\n"
        "write._check_with_safetensors = spy\n"
        f"code = run({args!r})\n"
        "print(seen, 'torch' in sys.modules, code)\n"
    )
    assert result.stdout.strip().splitlines()[-1] == "[False] False 0", (
        result.stdout + result.stderr
    )
    assert (tmp_path / "out.safetensors").stat().st_size > 4 * 48


def test_the_cli_lists_every_reader_format():
    from fc2conv_cli.readers import FORMATS

    assert cli._FORMATS == FORMATS  # the CLI keeps its own copy so --help imports no reader


def test_importing_every_reader_imports_no_format_library():
    from fc2conv_cli.readers import FORMATS

    libraries = ("torch", "h5py", "onnx", "google.protobuf", "keras", "cv2", "onnxruntime")
    result = run_python(
        "import importlib, sys\n"
        f"for name in {FORMATS!r}:\n"
        "    importlib.import_module('fc2conv_cli.readers.' + name)\n"
        f"print(sorted(m for m in {libraries!r} if m in sys.modules))\n"
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
