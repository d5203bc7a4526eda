"""The batch manifest: which checkpoints to convert with which map, and where outputs go.

Outputs mirror the inputs' paths relative to the manifest's folder (or, for inputs given
on the command line, to their common folder) under the output folder, with the suffix
``.safetensors``. A glob never matches the batch's own output folder (when it lies inside
the manifest's folder) nor fc2conv's temp files.

A job group may name its files' ``format`` (as ``--format`` does). Without one, a glob
takes the files whose suffix names a format fc2conv reads, of the ``.json`` files only
TF.js's ``model.json`` (not every config file); with one, every file it matches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fc2conv_cli.errors import ManifestError
from fc2conv_cli.layer_map import DTYPES, load_yaml, resolve_map_path, yaml_problem

__all__ = ["BatchItem", "items_from_inputs", "read_manifest", "select_shard"]

_TOP_KEYS = ("version", "output_dir", "jobs")
_JOB_KEYS = ("inputs", "map", "format", "dtype")
# The readers' formats and the suffixes that name them (readers.detect's FORMATS and
# SUFFIXES; the manifest comes before the readers in the pipeline, and
# tests/test_manifest.py keeps the two in step).
FORMATS = ("safetensors", "torch", "keras", "onnx", "caffe", "tfjs", "numpy")
CHECKPOINT_SUFFIXES = (
    ".safetensors", ".pth.tar", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".keras", ".h5",
    ".hdf5", ".onnx", ".caffemodel", ".json", ".npz", ".npy",
)  # fmt: skip
# The one .json name a glob takes without a format: what TF.js's converter writes.
_TFJS_MODEL_NAME = "model.json"
# The names of fc2conv's temp files, as write._temp_path makes them (.NAME.TOKEN.tmp);
# the manifest comes before write in the pipeline, and tests/test_manifest.py keeps the two
# in step.
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
# What a job group's glob found: (input, map, format, dtype).
_Found = tuple[Path, Path, str | None, str | None]


@dataclass(frozen=True, order=True)
class BatchItem:
    """One file to convert: ``relative`` is its path as mirrored under the output folder;
    ``format`` is the reader asked for (``--format``), None to detect it; ``dtype`` the
    group's cast (``dtype:``), None for none."""

    relative: str
    input: Path
    map_path: Path
    output: Path
    format: str | None = None
    dtype: str | None = None


def read_manifest(path: Path, output_dir: Path | None = None) -> tuple[BatchItem, ...]:
    """Expand a manifest's globs into sorted items; raises ``ManifestError`` listing problems.

    ``output_dir`` (the ``-o`` option) overrides the manifest's ``output_dir``.
    """
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError([f"{path}: manifest not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: cannot read manifest: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([yaml_problem(str(path), exc)]) from None
    problems: list[str] = []
    folder = path.parent
    if not isinstance(doc, Mapping):
        raise ManifestError([f"{path}: expected a mapping with version, output_dir and jobs"])
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(f"{path}: unknown key {key!r}; allowed: {', '.join(_TOP_KEYS)}")
    if doc.get("version") != 1:
        problems.append(f"{path}: version: expected 1, got {doc.get('version')!r}")
    target = output_dir
    if target is None:
        if not isinstance(doc.get("output_dir"), str):
            problems.append(f"{path}: output_dir: expected a folder (or pass -o OUTDIR)")
        else:
            target = folder / doc["output_dir"]
    jobs = doc.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        problems.append(f"{path}: jobs: expected a non-empty list of {{inputs, map}}")
        jobs = []
    found: list[_Found] = []
    for index, job in enumerate(jobs):
        found += _expand_job(path, folder, index, job, problems, target)
    if problems or target is None:
        raise ManifestError(problems)
    return _items(found, folder, target, str(path))


def items_from_inputs(
    inputs: Sequence[Path], map_path: Path, output_dir: Path, format: str | None = None
) -> tuple[BatchItem, ...]:
    """Items for inputs named on the command line, mirrored from their common folder;
    ``format`` (``--format``) applies to each."""
    problems = [f"{p}: no such file" for p in inputs if not p.is_file()]
    if problems:
        raise ManifestError(problems)
    common = Path(os.path.commonpath([p.absolute().parent for p in inputs]))
    return _items([(p, map_path, format, None) for p in inputs], common, output_dir, "inputs")


def select_shard(items: Sequence[BatchItem], index: int, count: int) -> tuple[BatchItem, ...]:
    """Shard ``index`` of ``count`` (1-based): every count-th item of the sorted list.

    Shards 1..count together hold every item exactly once, whatever the machine.
    """
    return tuple(sorted(items)[index - 1 :: count])


def _expand_job(
    path: Path, folder: Path, index: int, job: Any, problems: list[str], output_dir: Path | None
) -> list[_Found]:
    where = f"{path}: jobs[{index}]"
    if not isinstance(job, Mapping):
        problems.append(f"{where}: expected a mapping with inputs and map")
        return []
    for key in job:
        if key not in _JOB_KEYS:
            problems.append(f"{where}: unknown key {key!r}; allowed: {', '.join(_JOB_KEYS)}")
    pattern, map_name, kind = job.get("inputs"), job.get("map"), job.get("format")
    if kind is not None and kind not in FORMATS:
        problems.append(
            f"{where}: format: unknown format {kind!r}; expected one of {', '.join(FORMATS)}"
        )
        kind = None  # report the glob's problems too, as if no format were given
    dtype = job.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype in DTYPES):
        problems.append(f"{where}: dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(pattern, str) or not pattern.strip():
        problems.append(f"{where}: inputs: expected a glob such as 'vgg16/**/*.pth'")
        return []
    if not isinstance(map_name, str) or not map_name.strip():
        problems.append(f"{where}: map: expected the path of a layer map, or a shipped map's name")
        return []
    map_path = resolve_map_path(Path(map_name), folder)  # or a shipped map by bare name
    if not map_path.is_file():
        problems.append(f"{where}: map: {map_path} does not exist")
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        problems.append(f"{where}: inputs: {pattern!r} must stay inside the manifest's folder")
        return []
    skip = _own_files(path, output_dir)
    found = sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and (kind is not None or _is_checkpoint(p)) and not skip(p)
    )
    if not found:
        problems.append(f"{where}: inputs: {pattern!r} matches no checkpoint under {folder}")
    return [(p, map_path, kind, dtype) for p in found]


def _is_checkpoint(path: Path) -> bool:
    """True for a file a glob takes without ``format``: its suffix names a format, and of
    the ``.json`` files only ``model.json``."""
    name = path.name.lower()
    if name.endswith(".json"):
        return name == _TFJS_MODEL_NAME
    return name.endswith(CHECKPOINT_SUFFIXES)


def _own_files(manifest: Path, output_dir: Path | None) -> Callable[[Path], bool]:
    """A test for the batch's own files: the manifest, temp files, and anything under the
    output folder when that folder lies inside the inputs' (not when it holds them, e.g.
    ``.``)."""
    folder, itself = manifest.parent, manifest.resolve()
    out = output_dir.resolve() if output_dir is not None else None
    if out is not None and folder.resolve().is_relative_to(out):
        out = None

    def own(candidate: Path) -> bool:
        return (
            TEMP_NAME.fullmatch(candidate.name) is not None
            or candidate.resolve() == itself
            or (out is not None and candidate.resolve().is_relative_to(out))
        )

    return own


def _items(found: list[_Found], root: Path, output_dir: Path, source: str) -> tuple[BatchItem, ...]:
    problems = []
    items: dict[Path, BatchItem] = {}
    seen_inputs: set[Path] = set()
    for input_path, map_path, kind, dtype in found:
        if input_path.resolve() in seen_inputs:
            problems.append(f"{source}: {input_path} is matched twice; list each file once")
            continue
        seen_inputs.add(input_path.resolve())
        relative = Path(os.path.relpath(input_path.absolute(), root.absolute()))
        relative = relative.with_suffix(".safetensors")
        output = output_dir / relative
        if output in items:
            problems.append(
                f"{source}: {input_path} and {items[output].input} would both be written to "
                f"{output}; rename one"
            )
            continue
        items[output] = BatchItem(relative.as_posix(), input_path, map_path, output, kind, dtype)
    if problems:
        raise ManifestError(problems)
    return tuple(sorted(items.values()))
