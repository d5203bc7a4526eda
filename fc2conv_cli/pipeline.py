"""One conversion, start to finish: map -> checkpoint -> plan -> write -> check -> publish.

Returns a ``ConvertResult`` for ``report`` to render; raises ``Fc2convError`` subclasses.
Nothing is published unless every check passed (or checks were turned off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fc2conv_cli import __version__
from fc2conv_cli.digest import FileDigest, sha256_in_background
from fc2conv_cli.errors import EXIT_CHECK_FAILED, EXIT_OK, CheckFailed, CheckpointError, OutputError
from fc2conv_cli.layer_map import DTYPES, LayerMap, read_layer_map
from fc2conv_cli.plan import Plan, build_plan
from fc2conv_cli.readers import open_checkpoint, open_safetensors, read_safetensors_metadata
from fc2conv_cli.schema import language_server_line, schema_text
from fc2conv_cli.suggest import CheckpointSummary, SuggestedMap, suggest_map, summarize
from fc2conv_cli.write import check_output_path, write_safetensors, write_text

if TYPE_CHECKING:
    from fc2conv_cli.check import LayerCheck
    from fc2conv_cli.readers import Checkpoint

__all__ = [
    "DEFAULT_ATOL",
    "ConvertOptions",
    "ConvertResult",
    "InspectResult",
    "Provenance",
    "Steps",
    "convert",
    "convert_in_memory",
    "inspect",
    "verify",
]

# A correct conversion differs by ~1e-12 in float64; a wrong layout or a corrupt byte by
# orders of magnitude more. 1e-6 leaves room for huge weights without hiding real errors.
DEFAULT_ATOL = 1e-6


class Steps(Protocol):
    """Told where a conversion is, for progress and timings (``report`` shows them)."""

    def step(self, name: str, total_bytes: int = 0) -> None:
        """A step begins (the previous one, if any, has ended); ``total_bytes`` it moves."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the current step's bytes are done."""


class _NoSteps:
    def step(self, name: str, total_bytes: int = 0) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for; see ``fc2conv convert --help``."""

    input: Path
    map_path: Path
    output: Path
    atol: float = DEFAULT_ATOL
    check: bool = True
    dry_run: bool = False
    force: bool = False
    seed: int = 0
    format: str | None = None  # --format: read INPUT as this format, whatever it looks like
    dtype: str | None = None  # --dtype: cast floating tensors (float32, float16, bfloat16)
    dtype_scope: str = "all"  # --dtype-scope: "all" floating tensors, or only "converted"
    allow_overflow: bool = False  # --allow-overflow: write a cast's inf / zeros anyway
    layer_map: LayerMap | None = None  # the map itself (from the API); else map_path is read


@dataclass(frozen=True)
class Provenance:
    """A digest recorded in a converted file's metadata, and that of the file given now."""

    key: str  # "source_sha256" or "layer_map_sha256"
    path: Path  # the file given now: ORIGINAL or MAP
    recorded: str | None  # None when the converted file records none
    actual: str

    @property
    def matches(self) -> bool:
        return self.recorded == self.actual

    def warning(self, converted: Path) -> str | None:
        """The line to show when the digests differ; None when they match."""
        if self.matches:
            return None
        if self.recorded is None:
            return f"{converted} records no {self.key} (not written by fc2conv?)"
        what = "another source file" if self.key == "source_sha256" else "another layer map"
        return (
            f"{self.key} recorded in {converted} is {self.recorded[:12]}..., but {self.path} "
            f"has {self.actual[:12]}...: it was converted from {what} (the tensors decide)"
        )


@dataclass(frozen=True)
class ConvertResult:
    """Everything the report shows about one conversion."""

    options: ConvertOptions
    input_format: str
    plan: Plan
    notes: tuple[str, ...]
    checks: tuple[LayerCheck, ...] = ()
    copy_mismatches: tuple[str, ...] = ()
    index_problems: tuple[str, ...] = ()
    output_bytes: int = 0
    seconds: float = 0.0
    published: bool = False
    verified: bool = False  # from `verify`: the output existed already, nothing was written
    provenance: tuple[Provenance, ...] = ()  # from `verify`: recorded digests against the given

    @property
    def provenance_warnings(self) -> tuple[str, ...]:
        """One line per recorded digest that differs from the given file's (not a failure)."""
        lines = (p.warning(self.options.output) for p in self.provenance)
        return tuple(line for line in lines if line is not None)

    @property
    def checked(self) -> bool:
        return self.options.check and not self.options.dry_run

    @property
    def ok(self) -> bool:
        """True when every check that ran passed."""
        return (
            all(c.ok for c in self.checks) and not self.copy_mismatches and not self.index_problems
        )

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_CHECK_FAILED


def convert(options: ConvertOptions, steps: Steps | None = None) -> ConvertResult:
    """Convert one checkpoint; raises ``InputError`` (2) or ``CheckFailed`` (1).

    ``steps`` is told each step as it begins, and the bytes written and checked.
    """
    started = time.perf_counter()
    steps = steps or _NoSteps()
    steps.step("read map")
    layer_map = _layer_map(options)
    # A dry run replaces nothing, so an existing output is no reason to refuse it.
    check_output_path(options.input, options.output, options.force or options.dry_run)
    # Hashing runs in a thread from here on, overlapping the torch import and the copy.
    digest = None if options.dry_run else sha256_in_background(options.input)
    try:
        return _convert(options, layer_map, digest, started, steps)
    finally:
        if digest is not None:
            digest.cancel()  # a failed conversion must not keep reading its input


def _convert(
    options: ConvertOptions,
    layer_map: LayerMap,
    digest: FileDigest | None,
    started: float,
    steps: Steps,
) -> ConvertResult:
    steps.step("open")
    with open_checkpoint(
        options.input, layer_map.strip_prefixes, layer_map.state_dict_key, options.format
    ) as source:
        steps.step("plan")
        plan = plan_conversion(source, layer_map, options)
        result = ConvertResult(options, source.kind, plan, source.notes)
        if digest is None:  # dry run
            return _finish(result, started)
        _check_same_file(digest, options.input)
        metadata = {
            "format": "pt",
            "fc2conv_version": __version__,
            "source_file": options.input.name,
            "layer_map": layer_map.text,
            "layer_map_sha256": layer_map.sha256,
            **_cast_metadata(plan),
        }
        steps.step("write", sum(t.nbytes for t in plan.tensors))
        staged = write_safetensors(plan, source, options.output, metadata, steps.advance)
        try:
            result = replace(result, output_bytes=staged.nbytes)
            if options.check:
                with open_safetensors(staged.temp) as written:
                    result = _checked(result, source, written, steps)
            if not result.ok:
                raise CheckFailed(_failure_message(result), _finish(result, started))
            steps.step("publish")
            staged.seal(digest.result())
            staged.publish(overwrite=options.force)
        finally:
            staged.discard()
    return _finish(result, started, published=True)


def plan_conversion(source: Checkpoint, layer_map: LayerMap, options: ConvertOptions) -> Plan:
    """The plan ``convert`` follows for ``source``: the map, the format's stored FC weight
    format and BatchNorm eps, and the options' cast."""
    return build_plan(
        source.tensors,
        layer_map,
        source.weight_format,
        kind=source.kind,
        graph=source.graph,
        dtype=options.dtype,
        dtype_scope=options.dtype_scope,
        allow_overflow=options.allow_overflow,
    )


def _cast_metadata(plan: Plan) -> dict[str, str]:
    """What the metadata records of a cast (nothing without one)."""
    if plan.dtype is None:
        return {}
    return {"dtype": plan.dtype, "dtype_scope": plan.dtype_scope, "dtype_rounding": "nearest-even"}


def _check_same_file(digest: FileDigest, path: Path) -> None:
    """The reader opened ``path`` by name after the hash did: it must be the same file."""
    if not digest.same_file(path):
        if not digest.started:
            digest.result()  # raises why the file could not be opened for hashing
        raise CheckpointError(
            f"{path}: was replaced by another file while it was being opened; nothing "
            "written, run again"
        )


@dataclass(frozen=True)
class InspectResult:
    """A checkpoint's summary and, if asked for, a suggested layer map."""

    summary: CheckpointSummary
    suggestion: SuggestedMap | None


def inspect(
    path: Path,
    suggest: bool = False,
    map_output: Path | None = None,
    force: bool = False,
    format: str | None = None,
    schema_output: Path | None = None,
    prototxt: Path | None = None,
) -> InspectResult:
    """Summarize a checkpoint; suggest a map (and write it to ``map_output``) if asked.

    With ``schema_output``, the map's JSON Schema is written there and the suggested map
    starts with a ``# yaml-language-server: $schema=`` line pointing to it (relative to
    the map's folder, or to the current one for a map on stdout). ``prototxt`` is a Caffe
    net definition whose input shape the suggestion reads. Raises ``InputError`` (2).
    """
    for target in (map_output, schema_output):
        if target is not None and target.exists() and not force:
            raise OutputError(f"{target}: already exists; pass --force to replace it")
    with open_checkpoint(path, format=format) as checkpoint:
        summary = summarize(checkpoint)
        net = None
        if suggest and prototxt is not None:
            from fc2conv_cli.readers.caffe import read_prototxt

            net = read_prototxt(prototxt)
        suggestion = suggest_map(checkpoint, path.name, net) if suggest else None
    if schema_output is not None and suggestion is not None:
        folder = map_output.parent if map_output is not None else Path.cwd()
        header = language_server_line(schema_output, folder)
        suggestion = replace(suggestion, text=header + suggestion.text)
        write_text(schema_output, schema_text("map"), overwrite=force)
    if map_output is not None and suggestion is not None:
        write_text(map_output, suggestion.text, overwrite=force)
    return InspectResult(summary, suggestion)


def verify(options: ConvertOptions, steps: Steps | None = None) -> ConvertResult:
    """Check an existing converted file (``options.output``) against its source and map.

    Writes nothing. Every rule's tensors must be present with the planned shapes, hold
    the source's bits exactly and pass the float64 window and dense checks; every other
    tensor must be byte-equal to the source's; nothing may be missing or extra. The
    ``source_sha256`` and ``layer_map_sha256`` the file records are compared with the
    ORIGINAL's and MAP's: a difference is a warning (``provenance``), not a failure.
    Raises ``InputError`` (2) or ``CheckFailed`` (1).
    """
    started = time.perf_counter()
    steps = steps or _NoSteps()
    steps.step("read map")
    layer_map = _layer_map(options)
    digest = sha256_in_background(options.input)  # overlaps the checks
    try:
        steps.step("open")
        with (
            open_checkpoint(
                options.input, layer_map.strip_prefixes, layer_map.state_dict_key, options.format
            ) as source,
            open_checkpoint(options.output, format="safetensors") as converted,
        ):
            _check_same_file(digest, options.input)
            recorded = read_safetensors_metadata(options.output)
            # Without --dtype, the cast the file records (if any) is the one to check.
            if options.dtype is None and recorded.get("dtype") in DTYPES:
                scope = recorded.get("dtype_scope", "all")
                options = replace(options, dtype=recorded["dtype"], dtype_scope=scope)
            steps.step("plan")
            plan = plan_conversion(source, layer_map, options)
            result = ConvertResult(
                options,
                source.kind,
                plan,
                source.notes,
                output_bytes=options.output.stat().st_size,
                verified=True,
            )
            result = _checked(result, source, converted, steps)
        result = replace(result, provenance=_provenance(options, layer_map, digest, recorded))
    finally:
        digest.cancel()
    result = _finish(result, started)
    if not result.ok:
        raise CheckFailed(_failure_message(result), result)
    return result


def convert_in_memory(
    source: Checkpoint, layer_map: LayerMap, options: ConvertOptions
) -> tuple[ConvertResult, Checkpoint]:
    """Convert an opened checkpoint into memory: the same plan, tensor data and checks as
    ``convert`` (unless ``options.check`` is off), and no file. Returns the result and a
    checkpoint over the written tensors. Raises ``InputError`` (2) or ``CheckFailed`` (1).
    """
    from fc2conv_cli.write import write_to_memory

    started = time.perf_counter()
    plan = plan_conversion(source, layer_map, options)
    written = write_to_memory(plan, source)
    result = ConvertResult(options, source.kind, plan, source.notes)
    result = replace(result, output_bytes=sum(t.nbytes for t in plan.tensors))
    if options.check:
        result = _checked(result, source, written)
    if not result.ok:
        raise CheckFailed(_failure_message(result), _finish(result, started))
    return _finish(result, started), written


def _layer_map(options: ConvertOptions) -> LayerMap:
    return options.layer_map if options.layer_map is not None else read_layer_map(options.map_path)


def _provenance(
    options: ConvertOptions, layer_map: LayerMap, digest: FileDigest, metadata: dict[str, str]
) -> tuple[Provenance, ...]:
    """The digests the converted file's ``metadata`` records, against the ORIGINAL's and
    the MAP's."""
    return (
        Provenance("source_sha256", options.input, metadata.get("source_sha256"), digest.result()),
        Provenance(
            "layer_map_sha256",
            options.map_path,
            metadata.get("layer_map_sha256"),
            layer_map.sha256,
        ),
    )


def _checked(
    result: ConvertResult, source: Checkpoint, written: Checkpoint, steps: Steps | None = None
) -> ConvertResult:
    # Imported here, with numpy: a --no-check copy needs neither.
    from fc2conv_cli.check import check_written

    options, plan = result.options, result.plan
    steps = steps or _NoSteps()
    steps.step("check", sum(t.nbytes for t in plan.tensors))
    # Tensors that are missing or misshapen are reported as such; the rest are checked.
    checked = check_written(
        plan, source, written, options.atol, options.seed, progress=steps.advance
    )
    return replace(
        result,
        checks=checked.layers,
        copy_mismatches=checked.copy_mismatches,
        index_problems=tuple(f"{name}: {why}" for name, why in checked.index_problems.items()),
    )


def _failure_message(result: ConvertResult) -> str:
    """One line: each failed layer with its first differing value, then copies and index."""
    parts = []
    for check in result.checks:
        if check.ok:
            continue
        if check.mismatches:
            parts += [f"layer {check.layer}: {m.describe()}" for m in check.mismatches]
        else:
            parts.append(f"layer {check.layer}: {_float64_failure(check, result.options.atol)}")
    if result.copy_mismatches:
        parts.append(f"copied tensors differ from the source: {', '.join(result.copy_mismatches)}")
    parts += result.index_problems
    outcome = "differs from its source" if result.verified else "check failed, nothing written"
    return f"{outcome}: {'; '.join(parts)}"


def _float64_failure(check: LayerCheck, atol: float) -> str:
    """Why a layer whose bits are equal failed its float64 checks."""
    for name, diff in (("window", check.max_abs_diff), ("dense", check.dense_max_abs_diff)):
        if name == "dense" and not check.dense_checked:
            continue
        if diff is None:
            return f"float64 {name} outputs are NaN or Inf where the source's are finite"
        if diff > atol:
            return f"float64 {name} max |diff| {diff:.3g} is over --atol {atol:g}"
    return "check failed"


def _finish(result: ConvertResult, started: float, published: bool = False) -> ConvertResult:
    return replace(result, seconds=time.perf_counter() - started, published=published)
