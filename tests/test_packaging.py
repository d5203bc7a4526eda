"""Packaging: what `pip install fc2conv` gives, with and without the framework extras.

The slow tests build the sdist and the wheel as `make dist` does, install the wheel into
a fresh virtual environment that has fc2conv's core dependencies and no torch, and run
the installed `fc2conv` there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fc2conv_cli import __version__
from fc2conv_cli.layer_map import SAMPLE_CONFIGS, read_layer_map, resolve_map_path, sample_configs
from fc2conv_cli.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent
TORCH_HINT = "error: reading .pth needs torch: pip install 'fc2conv[torch]'\n"
# The checkout's (or the unpacked sdist's) sample maps: what an install must ship.
SHIPPED = tuple(sorted(p.stem for p in (ROOT / "fc2conv_cli" / "sample_configs").glob("*.yaml")))


def _hwc_checkpoint(folder: Path) -> tuple[Path, Path, np.ndarray]:
    """A 4-output FC over a 3-channel 2x2 map flattened hwc, and its map."""
    weight = np.arange(48, dtype=np.float32).reshape(4, 12) / 7
    save_file(
        {"fc.weight": weight, "fc.bias": np.ones(4, np.float32)}, str(folder / "in.safetensors")
    )
    (folder / "map.yaml").write_text(
        "version: 1\nlayout: hwc\nlayers: [{name: fc, kernel: [2, 2]}]\n"
    )
    expected = weight.reshape(4, 2, 2, 3).transpose(0, 3, 1, 2)
    return folder / "in.safetensors", folder / "map.yaml", expected


def _torch_file(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    torch.save({"fc.weight": torch.ones(4, 12)}, path)
    return path


# ------------------------------------------------------------------ shipped sample maps


def test_sample_maps_ship_inside_the_package():
    assert {"alexnet", "vgg11", "vgg16", "vgg16_keras", "vgg19"} <= set(SHIPPED)
    assert tuple(sample_configs()) == SHIPPED
    assert SAMPLE_CONFIGS.parent == Path(__import__("fc2conv_cli").__file__).resolve().parent
    for path in sample_configs().values():
        assert read_layer_map(path).rules


def test_the_checkout_keeps_a_top_level_sample_configs_path():
    link = ROOT / "sample_configs"
    if not link.exists():
        pytest.skip("not a git checkout (an sdist has only fc2conv_cli/sample_configs)")
    assert sorted(p.name for p in link.glob("*.yaml")) == [f"{n}.yaml" for n in SHIPPED]


def test_fc2conv_sample_configs_lists_and_prints_them(run_cli):
    listing = run_cli("sample-configs")
    assert listing.code == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(SHIPPED)
    assert "torchvision vgg16" in lines[SHIPPED.index("vgg16")]
    shown = run_cli("sample-configs", "vgg16")
    assert shown.stdout == (SAMPLE_CONFIGS / "vgg16.yaml").read_text()
    missing = run_cli("sample-configs", "vgg17")
    assert missing.code == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and f"shipped: {', '.join(SHIPPED)}" in missing.stderr


def test_a_bare_name_finds_the_shipped_map_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_map_path(Path("vgg16")) == SAMPLE_CONFIGS / "vgg16.yaml"
    assert read_layer_map(Path("vgg16_keras")).source == str(SAMPLE_CONFIGS / "vgg16_keras.yaml")
    # Not bare: a suffix or a folder means a path, found or not.
    for path in ("vgg16.yaml", "vgg16.YML", "maps/vgg16", "./sub/vgg16"):
        assert resolve_map_path(Path(path)) == Path(path)
    (tmp_path / "vgg16").write_text("version: 1\nlayout: hwc\nlayers: [{name: mine}]\n")
    assert resolve_map_path(Path("vgg16")) == Path("vgg16")
    assert read_layer_map(Path("vgg16")).rules[0].name == "mine"


def test_every_command_with_a_map_takes_a_shipped_name(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, _, _ = _hwc_checkpoint(tmp_path)
    # vgg16's map is read: its layers are looked for in this small checkpoint.
    converted = run_cli("convert", source, "--map", "vgg16", "-o", tmp_path / "out.safetensors")
    assert converted.code == 2
    assert f"{SAMPLE_CONFIGS / 'vgg16.yaml'}: layers[1] (classifier.3)" in converted.stderr
    assert not (tmp_path / "out.safetensors").exists()
    for args in (
        ("convert", source, "--map", "vgg17", "-o", tmp_path / "out.safetensors"),
        ("verify", source, source, "--map", "vgg17"),
    ):
        result = run_cli(*args)
        assert result.code == 2
        assert result.stderr == (
            f"error: vgg17: layer map not found, nor a shipped sample map ({', '.join(SHIPPED)})\n"
        )
    (tmp_path / "manifest.yaml").write_text(
        "version: 1\noutput_dir: out\njobs: [{inputs: '*.safetensors', map: alexnet}]\n"
    )
    (item,) = read_manifest(tmp_path / "manifest.yaml")
    assert item.map_path == SAMPLE_CONFIGS / "alexnet.yaml"


# ------------------------------------------------------------------ torch is an extra


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_is_an_extra_and_all_gives_every_format():
    project = _pyproject()["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core and "h5py" not in core and "onnx" not in core
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.2"]
    formats = sorted(set(extras) - {"all", "dev"})
    assert extras["all"] == [f"fc2conv[{','.join(sorted(formats, key=list(extras).index))}]"]
    assert project["scripts"] == {"fc2conv": "fc2conv_cli.cli:main"}


def test_a_torch_file_without_torch_gives_the_one_line_hint(tmp_path):
    """torch made unimportable in a fresh interpreter, as where the extra is not installed."""
    model = _torch_file(tmp_path / "model.pth")
    code = (
        "import sys\nsys.modules['torch'] = None\nfrom fc2conv_cli.cli import run\n"
        f"sys.exit(run(['convert', {str(model)!r}, '--map', 'vgg16', '-o', "
        f"{str(tmp_path / 'out.safetensors')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", TORCH_HINT)
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------ sdist and wheel

# A meta-path finder in the fresh venv that logs every attempt to import torch.
PROBE = """
import os, sys

class _TorchProbe:
    def find_spec(self, name, path=None, target=None):
        log = os.environ.get("FC2CONV_TORCH_LOG")
        if log and name.split(".")[0] == "torch":
            with open(log, "a") as file:
                file.write(name + "\\n")
        return None

sys.meta_path.insert(0, _TorchProbe())
"""


_NOT_SOURCES = (
    ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", ".ruff_cache",
    "*.egg-info", "dist", "build", "demo", "_work",
)  # fmt: skip


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and wheel, built as `make dist` builds them, and checked by twine."""
    pytest.importorskip("build")
    # From a copy: building writes fc2conv.egg-info into the source tree.
    source = tmp_path_factory.mktemp("source") / "fc2conv"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    files = sorted(out.iterdir())
    twine = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert twine.returncode == 0, twine.stdout + twine.stderr
    return out


def _core_distributions() -> list[importlib.metadata.Distribution]:
    """fc2conv's core dependencies and theirs, as installed here (extras left out)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {**default_environment(), "extra": ""}
    wanted = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        requirement = wanted.pop()
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        distribution = importlib.metadata.distribution(requirement.name)
        name = distribution.metadata["Name"].lower()
        if name not in found:
            found[name] = distribution
            wanted += [Requirement(r) for r in distribution.requires or ()]
    return list(found.values())


@pytest.fixture(scope="module")
def torchless_venv(dist, tmp_path_factory) -> Path:
    """A fresh venv: the built wheel, fc2conv's core dependencies linked in, no torch."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    names = set()
    for distribution in _core_distributions():
        assert "torch" not in distribution.metadata["Name"].lower()
        for file in distribution.files or ():
            if file.parts[0] != ".." and not file.parts[0].endswith(".pth"):
                names.add((Path(distribution.locate_file(file.parts[0])), file.parts[0]))
    for target, name in names:
        (site / name).symlink_to(target)
    (site / "_torch_probe.py").write_text(PROBE)
    (site / "_torch_probe.pth").write_text("import _torch_probe\n")
    (wheel,) = dist.glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--no-compile", str(wheel)],
        check=True,
        capture_output=True,
        env=_clean_env(),  # a PYTHONPATH to a source tree would make pip skip the install
        timeout=300,
    )  # fmt: skip
    assert (venv / "bin" / "fc2conv").is_file()
    return venv


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH and friends, and without the user's site."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def _installed(venv: Path, *args: object, cwd: Path, log: Path) -> subprocess.CompletedProcess:
    """Run the venv's installed `fc2conv`, away from this checkout's sources."""
    env = {**_clean_env(), "FC2CONV_TORCH_LOG": str(log), "NO_COLOR": "1"}
    return subprocess.run(
        [str(venv / "bin" / "fc2conv"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_the_wheel_converts_safetensors_without_torch(torchless_venv, tmp_path):
    venv, log = torchless_venv, tmp_path / "torch_imports.log"
    no_torch = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, cwd=tmp_path
    )
    assert no_torch.returncode == 1 and b"No module named 'torch'" in no_torch.stderr
    version = _installed(venv, "--version", cwd=tmp_path, log=log)
    assert version.stdout.strip() == f"fc2conv, version {__version__}"

    source, map_path, expected = _hwc_checkpoint(tmp_path)
    output = tmp_path / "out.safetensors"
    result = _installed(
        venv, "convert", source, "--map", map_path, "-o", output, cwd=tmp_path, log=log
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = load_file(str(output))
    assert np.array_equal(written["fc.weight"], expected)
    assert not log.exists(), log.read_text()  # torch was never even looked for

    model = _torch_file(tmp_path / "model.pth")
    refused = _installed(
        venv,
        "convert",
        model,
        "--map",
        map_path,
        "-o",
        tmp_path / "o.safetensors",
        cwd=tmp_path,
        log=log,
    )
    assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", TORCH_HINT)
    assert "torch" in log.read_text().split()  # the reader did try, and said what to install
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.slow
def test_the_wheel_ships_the_sample_maps_and_the_schemas(torchless_venv, tmp_path):
    venv, log = torchless_venv, tmp_path / "log"
    listing = _installed(venv, "sample-configs", cwd=tmp_path, log=log)
    assert [line.split()[0] for line in listing.stdout.splitlines()] == list(SHIPPED)
    source, _, _ = _hwc_checkpoint(tmp_path)
    result = _installed(
        venv, "convert", source, "--map", "vgg19", "-o", "o.safetensors", cwd=tmp_path, log=log
    )
    assert result.returncode == 2
    assert (
        f"{venv}/lib/" in result.stderr and "fc2conv_cli/sample_configs/vgg19.yaml" in result.stderr
    )
    from fc2conv_cli.schema import schema_text

    assert _installed(venv, "schema", "map", cwd=tmp_path, log=log).stdout == schema_text("map")


def _tree_files(*folders: str) -> set[str]:
    files = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT)
            skipped = {"__pycache__", "_work", ".hypothesis", ".pytest_cache"}
            if path.is_file() and not skipped & set(relative.parts) and path.suffix != ".pyc":
                files.add(relative.as_posix())
    return files


@pytest.mark.slow
def test_the_sdist_holds_what_the_tests_and_sample_maps_need(dist, tmp_path):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        prefix = f"fc2conv-{__version__}/"
        members = {m.name.removeprefix(prefix) for m in archive.getmembers() if m.isfile()}
        # The "data" filter (refuse links out, absolute paths) where this Python has it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(tmp_path, **safe)
    expected = _tree_files("fc2conv_cli", "tests", "bench", "docs")
    expected |= {"README.md", "CHANGELOG.md", "Makefile", "MANIFEST.in", "pyproject.toml"}
    assert expected - members == set()
    assert not any(m.startswith("sample_configs/") for m in members)  # the checkout's link
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"fc2conv_cli/sample_configs/{n}.yaml" for n in SHIPPED} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # The tests run from the unpacked sdist, against its own sources.
    unpacked = tmp_path / prefix
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_layer_map.py", "tests/test_schema.py"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
