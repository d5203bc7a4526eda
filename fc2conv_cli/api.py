"""The Python API: convert, verify and inspect checkpoints from a script or a notebook.

Every function here is what the ``fc2conv`` command runs, without the printing: it
returns a result, or raises an ``Fc2convError`` subclass (``InputError``, exit code 2;
``CheckFailed``, 1) with a one-line ``message``. Nothing prints and nothing exits.

>>> import fc2conv_cli as fc2conv
>>> result = fc2conv.convert("vgg16.pth", "vgg16", "vgg16_fcn.safetensors")
>>> result.to_json()["layers"][0]["max_abs_diff"]

Paths are ``str`` or ``os.PathLike``. A map is a ``LayerMap``, a ``dict`` (the YAML
document as data), YAML text (a ``str`` with a line break, or one starting with ``{``),
or a path / shipped map name (any other ``str``, or a path object).

``api`` comes after ``report`` in the module order: ``to_json()`` returns what
``report`` builds for ``--json``, so the two cannot drift apart (it imports only
report's pure JSON builders, never a console).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union, cast

from fc2conv_cli import pipeline
from fc2conv_cli.errors import (
    CheckFailed,
    CheckpointError,
    Fc2convError,
    InputError,
    MapError,
    OutputError,
    PlanError,
)
from fc2conv_cli.layer_map import LayerMap, read_layer_map
from fc2conv_cli.pipeline import DEFAULT_ATOL, ConvertOptions, Steps
from fc2conv_cli.suggest import SuggestedMap

if TYPE_CHECKING:
    from fc2conv_cli.readers import Checkpoint

__all__ = [
    "DEFAULT_ATOL",
    "CheckFailed",
    "CheckpointError",
    "ConvertResult",
    "Fc2convError",
    "InputError",
    "InspectResult",
    "LayerMap",
    "MapError",
    "MapLike",
    "OutputError",
    "PathLike",
    "PlanError",
    "Steps",
    "SuggestedMap",
    "convert",
    "convert_state_dict",
    "error_json",
    "inspect",
    "output_path",
    "resolve_layer_map",
    "suggest_map",
    "verify",
]

PathLike = Union[str, "os.PathLike[str]"]
MapLike = Union[LayerMap, Mapping[str, Any], str, "os.PathLike[str]"]
_T = TypeVar("_T")
_STATE_DICT = Path("<state_dict>")
_MEMORY = Path("<memory>")


@dataclass(frozen=True)
class ConvertResult(pipeline.ConvertResult):
    """One conversion (or verification): what the table shows, with ``to_json()``.

    The fields are the pipeline's (``plan``, ``checks``, ``notes``, ``output_bytes``,
    ``seconds``, ``published``, ``verified``, ...); ``ok`` is True when every check that
    ran passed.
    """

    @property
    def input(self) -> Path:
        return self.options.input

    @property
    def output(self) -> Path:
        return self.options.output

    @property
    def layers(self) -> list[dict[str, Any]]:
        """One entry per converted layer, as in the JSON report's ``layers``."""
        return self.to_json()["layers"]

    def to_json(self) -> dict[str, Any]:
        """The JSON report (``fc2conv convert --json``), as a dict."""
        from fc2conv_cli.report import conversion_json

        return conversion_json(self)


@dataclass(frozen=True)
class InspectResult(pipeline.InspectResult):
    """A checkpoint's ``summary`` and, if asked for, a ``suggestion`` (a ``SuggestedMap``)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON report (``fc2conv inspect --json``), as a dict."""
        from fc2conv_cli.report import inspect_json

        return inspect_json(self)


def error_json(error: Fc2convError) -> dict[str, Any]:
    """The JSON report of a run that raised ``error`` (``--json`` on failure)."""
    from fc2conv_cli.report import error_json as build

    return build(error)


def resolve_layer_map(layer_map: MapLike) -> LayerMap:
    """A validated ``LayerMap`` from any form a map may take (see the module docstring).

    Raises ``MapError`` (every problem, one line each) or ``TypeError`` for another type.
    """
    if isinstance(layer_map, LayerMap):
        return layer_map
    if isinstance(layer_map, Mapping):
        return LayerMap.from_dict(layer_map)
    if isinstance(layer_map, str) and ("\n" in layer_map or layer_map.lstrip().startswith("{")):
        return LayerMap.from_yaml(layer_map)
    if isinstance(layer_map, (str, os.PathLike)):
        return read_layer_map(Path(layer_map))
    raise TypeError(
        f"layer_map: expected a LayerMap, a dict, YAML text or a path, got {type(layer_map)}"
    )


def output_path(input: PathLike, output: PathLike) -> Path:
    """Where ``convert`` writes: ``output`` itself, or, for an existing folder or a path
    ending in ``/``, ``output/<input stem>.safetensors``.

    A TF.js ``model.json`` is named after its folder (``web/mobilenet/model.json`` ->
    ``mobilenet.safetensors``); every other input after its file name up to the first
    dot (``vgg16.pth.tar`` -> ``vgg16.safetensors``).
    """
    text = os.fspath(output)
    target = Path(text)
    if not (text.endswith(("/", os.sep)) or target.is_dir()):
        return target
    source = Path(input)
    stem = source.name.split(".")[0] or source.stem
    if source.name.lower() == "model.json" and source.absolute().parent.name:
        stem = source.absolute().parent.name
    return target / f"{stem}.safetensors"


def convert(
    input: PathLike,
    layer_map: MapLike,
    output: PathLike,
    *,
    atol: float = DEFAULT_ATOL,
    check: bool = True,
    dry_run: bool = False,
    force: bool = False,
    seed: int = 0,
    format: str | None = None,
    dtype: str | None = None,
    dtype_scope: str = "all",
    allow_overflow: bool = False,
    steps: Steps | None = None,
) -> ConvertResult:
    """Convert the checkpoint ``input`` by ``layer_map`` into the ``.safetensors`` file
    ``output`` (or ``output/<stem>.safetensors``, see ``output_path``; a folder named
    with a trailing ``/`` is created if missing, not its parents).

    The file is published only after every check passed (``check=False`` skips them;
    ``dry_run=True`` plans and writes nothing). ``format`` names the input's format
    instead of detecting it. ``dtype`` casts floating tensors (``float32``, ``float16``,
    ``bfloat16``; all of them, or with ``dtype_scope="converted"`` only the converted ones)
    and refuses an overflow unless ``allow_overflow``. Raises ``InputError`` (exit code
    2: bad map, checkpoint, plan or output) or ``CheckFailed`` (1; its ``result`` says
    which layer failed). ``steps`` (a ``pipeline.Steps``) is told each step and the bytes
    written and checked.
    """
    target = output_path(input, output)
    options = _options(input, layer_map, target, atol, seed, format)
    options = _replace(
        options,
        check=check,
        dry_run=dry_run,
        force=force,
        dtype=dtype,
        dtype_scope=dtype_scope,
        allow_overflow=allow_overflow,
    )
    if target != Path(output) and not dry_run:
        _make_folder(target.parent)
    return _run(pipeline.convert, options, steps)


def _make_folder(folder: Path) -> None:
    """Create the output folder named ``DIR/`` (its parent must exist); ``OutputError``."""
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise OutputError(f"{folder}/: its parent folder does not exist") from None
    except OSError as exc:
        raise OutputError(f"{folder}/: cannot create the folder: {exc.strerror}") from None


def verify(
    original: PathLike,
    converted: PathLike,
    layer_map: MapLike,
    *,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
    format: str | None = None,
    steps: Steps | None = None,
) -> ConvertResult:
    """Check an existing converted file against its ``original`` and ``layer_map``.

    Writes nothing. Returns the result with ``verified`` True; raises ``CheckFailed``
    (1) when anything differs, ``InputError`` (2) for bad input.
    """
    options = _options(original, layer_map, Path(converted), atol, seed, format)
    return _run(pipeline.verify, options, steps)


def inspect(
    input: PathLike,
    *,
    suggest: bool = False,
    map_output: PathLike | None = None,
    schema_output: PathLike | None = None,
    force: bool = False,
    format: str | None = None,
    prototxt: PathLike | None = None,
) -> InspectResult:
    """Summarize a checkpoint's tensors; with ``suggest`` (implied by ``map_output`` or
    ``schema_output``), suggest a layer map and write it to ``map_output`` if given.

    ``prototxt`` is a Caffe net definition whose input shape the suggestion reads.
    Raises ``InputError`` (2).
    """
    suggest = suggest or map_output is not None or schema_output is not None
    result = pipeline.inspect(
        Path(input),
        suggest,
        _path(map_output),
        force,
        format,
        _path(schema_output),
        _path(prototxt),
    )
    return InspectResult(result.summary, result.suggestion)


def suggest_map(
    input: PathLike, *, format: str | None = None, prototxt: PathLike | None = None
) -> SuggestedMap:
    """The layer map suggested for a checkpoint: ``.text`` is its commented YAML (load it
    with ``LayerMap.from_yaml``), with the evidence (``layers``, ``kernel``,
    ``in_channels``, ``layout_guess``, ``ambiguities``). Raises ``InputError`` (2)."""
    suggestion = inspect(input, suggest=True, format=format, prototxt=prototxt).suggestion
    if suggestion is None:  # inspect always suggests when asked to
        raise AssertionError("inspect returned no suggestion")
    return suggestion


def convert_state_dict(
    state_dict: Mapping[str, _T],
    layer_map: MapLike,
    *,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
    check: bool = True,
) -> dict[str, _T]:
    """Convert a state dict in memory: names -> torch tensors, or names -> numpy arrays.

    Returns a new dict of the same kind, in the output's order and names (prefixes the
    map strips are stripped, ``rename`` applied): the same tensors ``convert`` would
    write, after the same checks (``check=False`` skips them), as CPU tensors (or
    writable arrays) sharing one new buffer. No file is written; the input is not
    changed. Raises ``CheckFailed`` (1) when a check fails, ``InputError`` (2) for a bad
    map, a value that is not a tensor, or a map that does not fit.
    """
    from fc2conv_cli.readers import open_loaded

    rules = resolve_layer_map(layer_map)
    kind = _state_dict_kind(state_dict)
    if kind == "torch":
        from fc2conv_cli.readers.torch import loaded_from_tensors

        loaded = loaded_from_tensors(_STATE_DICT, state_dict)
    else:
        from fc2conv_cli.readers import loaded_from_arrays

        loaded = loaded_from_arrays(_STATE_DICT, "numpy", cast("Mapping[str, Any]", state_dict))
    options = ConvertOptions(
        _STATE_DICT, Path(rules.source), _MEMORY, atol, check, seed=seed, layer_map=rules
    )
    with open_loaded(_STATE_DICT, loaded, rules.strip_prefixes) as source:
        try:
            _, written = pipeline.convert_in_memory(source, rules, options)
        except CheckFailed as error:
            error.result = _wrap(error.result)
            raise
        return _tensors_out(written, kind)


def _state_dict_kind(state_dict: Mapping[str, Any]) -> str:
    """``torch`` or ``numpy``: every value must be of one kind; raises ``CheckpointError``."""
    import numpy as np

    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"state_dict: expected a dict of tensors, got {type(state_dict)}")
    kinds = set()
    for name, value in state_dict.items():
        if isinstance(value, np.ndarray):
            kinds.add("numpy")
        elif type(value).__module__.split(".")[0] == "torch" and hasattr(value, "dtype"):
            kinds.add("torch")
        else:
            raise CheckpointError(
                f"state_dict[{name!r}]: expected a torch tensor or a numpy array, got "
                f"{type(value).__name__}"
            )
    if len(kinds) > 1:
        raise CheckpointError("state_dict: mixes torch tensors and numpy arrays; give one kind")
    return kinds.pop() if kinds else "numpy"


def _tensors_out(written: Checkpoint, kind: str) -> dict[str, Any]:
    """Writable arrays (or tensors) over the written bytes, one buffer for all."""
    import numpy as np

    from fc2conv_cli.readers import numpy_dtype

    out: dict[str, Any] = {}
    for name, info in written.tensors.items():
        raw = np.frombuffer(written.raw(name), np.uint8)
        if kind == "numpy":
            out[name] = raw.view(numpy_dtype(info.dtype)).reshape(info.shape)
        else:
            import torch

            from fc2conv_cli.readers.torch import torch_dtype

            out[name] = torch.from_numpy(raw).view(torch_dtype(info.dtype)).reshape(info.shape)
    return out


def _options(
    input: PathLike,
    layer_map: MapLike,
    output: Path,
    atol: float,
    seed: int,
    format: str | None,
) -> ConvertOptions:
    rules = resolve_layer_map(layer_map)
    return ConvertOptions(
        Path(input), Path(rules.source), output, atol, seed=seed, format=format, layer_map=rules
    )


def _replace(options: ConvertOptions, **changes: Any) -> ConvertOptions:
    from dataclasses import replace

    return replace(options, **changes)


def _run(action: Any, options: ConvertOptions, steps: Steps | None) -> ConvertResult:
    try:
        return _wrap(action(options, steps))
    except CheckFailed as error:
        error.result = _wrap(error.result)
        raise


def _wrap(result: pipeline.ConvertResult) -> ConvertResult:
    if isinstance(result, ConvertResult):
        return result
    return ConvertResult(**{f.name: getattr(result, f.name) for f in fields(result)})


def _path(path: PathLike | None) -> Path | None:
    return None if path is None else Path(path)
