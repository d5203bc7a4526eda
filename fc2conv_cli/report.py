"""All output: a rich table for people, JSON for machines, one-line messages on stderr.

Renderers take the console to write to; rich decides colour (none when not a terminal).
User-supplied names always go in ``Text``, never parsed as markup.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from fc2conv_cli import __version__
from fc2conv_cli.errors import Fc2convError, OutputError

if TYPE_CHECKING:
    from fc2conv_cli.batch import BatchResult, FileOutcome
    from fc2conv_cli.check import Mismatch
    from fc2conv_cli.pipeline import ConvertResult, InspectResult
    from fc2conv_cli.plan import Conversion, LayerPlan, PlannedTensor

__all__ = [
    "PIPE_WIDTH",
    "PROGRESS_MIN_BYTES",
    "BatchProgress",
    "StepProgress",
    "batch_json",
    "check_json_path",
    "conversion_json",
    "error_json",
    "flush_stdout",
    "inspect_json",
    "is_plain",
    "make_console",
    "new_table",
    "print_table",
    "render_batch",
    "render_conversion",
    "render_error",
    "render_inspect",
    "render_notes",
    "render_plan",
    "size_text",
    "write_json",
    "write_stdout",
]

# Rich assumes 80 columns when not writing to a terminal; CI logs read better unwrapped.
PIPE_WIDTH = 160


class _Console(Console):
    """A rich console for which a reader that went away (``| head``) is not a failure.

    rich's own ``on_broken_pipe`` raises ``SystemExit(1)``, which is fc2conv's "a check
    failed". Here the rest of the output is dropped and the command carries on: the
    conversion still publishes, a ``--json`` file is still written, and the exit code is
    the one the run earned.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _discard_rest(self.file)


def make_console(stderr: bool = False, quiet: bool = False) -> Console:
    """A console for stdout or stderr; colour and width follow the terminal, if any.

    Off a terminal the width is ``COLUMNS`` if set, else ``PIPE_WIDTH``. ``quiet``
    (``-q``) makes it print nothing.
    """
    console = _Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = PIPE_WIDTH
    return console


def is_plain(console: Console) -> bool:
    """True off a terminal when ``NO_COLOR`` or ``TERM=dumb`` is set: tables are then
    plain text, columns apart by spaces, with no box-drawing characters."""
    asked = "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb"
    return asked and not console.is_terminal


def new_table(console: Console, **options: Any) -> Table:
    """A table in the console's style: boxed, or plain text (``is_plain``)."""
    if is_plain(console):
        options.update(box=None, show_edge=False, pad_edge=False)
    return Table(**options)


def print_table(console: Console, table: Table) -> None:
    """The table if it fits the console's width with every cell whole (no-wrap columns at
    full width, others at their longest word); else one block per row, its first cell
    on a line and each other column as ``header: value`` below, so that nothing is ever
    cut to an ellipsis in a narrow terminal."""
    unbounded = console.options.update_width(1 << 20)  # get() clips to the width given
    if Measurement.get(console, unbounded, table).minimum <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(Text(str(table.title)))
    columns = [(str(c.header), list(c.cells)) for c in table.columns]
    for row in range(table.row_count):
        first = columns[0][1][row]
        console.print(first if isinstance(first, Text) else Text(str(first)), overflow="fold")
        for header, cells in columns[1:]:
            cell = cells[row]
            line = Text(f"  {header}: ")
            line.append(cell if isinstance(cell, Text) else Text(str(cell)))
            console.print(line, overflow="fold")


def render_conversion(console: Console, result: ConvertResult) -> None:
    """The table of converted layers with their checks, and a one-line footer."""
    console.print(_title(result))
    table = new_table(console)
    table.add_column("layer (source -> output)", overflow="fold")
    table.add_column("old shape", no_wrap=True)
    table.add_column("new shape", no_wrap=True)
    table.add_column("kernel", no_wrap=True)
    table.add_column("layout")
    table.add_column("bits", no_wrap=True)
    table.add_column("max |diff| window", justify="right")
    table.add_column("max |diff| dense", justify="right")
    table.add_column("result")
    checks = {c.layer: c for c in result.checks}
    for layer in result.plan.layers:
        check = checks.get(layer.rule.name)
        bits: str | Text
        window: str | Text
        dense: str | Text
        if check is None:
            bits = window = dense = "-"
            status = Text("planned" if result.options.dry_run else "not checked", style="yellow")
        else:
            bits = (
                _bits(check.bits_equal)
                if check.bits_equal is not None
                else Text(check.proof.removeprefix("float64, "), style="cyan")
            )
            window = _diff(check.max_abs_diff)
            dense = _diff(check.dense_max_abs_diff) if check.dense_checked else "n/a (1x1)"
            status = Text("ok", style="green") if check.ok else Text("FAILED", style="bold red")
        table.add_row(
            Text(f"{layer.weight.source} -> {layer.weight.name}"),
            _shape(layer.source_shape),
            _shape(layer.weight.shape),
            "x".join(map(str, layer.conversion.kernel)),
            Text(_layout_cell(layer.conversion)),
            bits,
            window,
            dense,
            status,
        )
    print_table(console, table)
    for line in _check_lines(result):
        console.print(Text(line), soft_wrap=True)
    for warning in result.provenance_warnings:
        console.print(Text(f"warning: {_one_line(warning)}", style="yellow"), soft_wrap=True)
    console.print(Text(_footer(result)), soft_wrap=True)


def _operation_lines(result: ConvertResult) -> list[str]:
    """Under the table: each layer's folded tensors, kept outputs and cast."""
    lines = []
    for layer in result.plan.layers:
        name = layer.rule.name
        for fold in layer.folds:
            lines.append(
                f"{name}: {layer.proof}: BatchNorm {fold.name} {fold.position} the layer "
                f"(eps {fold.eps:g}, {fold.eps_from}) folded in; {', '.join(fold.tensors)} "
                "left out"
            )
        if layer.conversion.fold_spatial:
            kernel = "x".join(map(str, layer.conversion.kernel))
            lines.append(
                f"{name}: {layer.proof}: the {kernel} kernel summed into a 1x1 conv (exact "
                "only where the map is replicated)"
            )
        kept = _outputs_json(layer)
        if kept is not None:
            lines.append(
                f"{name}: out_features {layer.source_out_features} -> {layer.out_features} "
                f"({kept['text']})"
            )
    if result.plan.dtype is not None:
        cast = sum(1 for t in result.plan.tensors if t.cast is not None)
        lines.append(
            f"cast: {cast} tensors to {result.plan.dtype} (round to nearest even, scope "
            f"{result.plan.dtype_scope})"
        )
    return lines


def _check_lines(result: ConvertResult) -> list[str]:
    """Under the table: what each layer does beyond moving values, what differs in each
    failed layer, and rows with NaN or Inf."""
    lines = _operation_lines(result)
    for check in result.checks:
        lines += [f"{check.layer}: {m.describe()}" for m in check.mismatches]
        if check.nonfinite_rows:
            lines.append(
                f"{check.layer}: {check.nonfinite_rows} of {check.out_features} output rows hold "
                "NaN or Inf in the source; their float64 outputs are not compared (their bits are)"
            )
    return [_one_line(line) for line in lines]


def render_plan(console: Console, result: ConvertResult) -> None:
    """Every output tensor, in file order, and what produces it (for ``--dry-run``)."""
    table = new_table(console, title="plan: output tensors in file order", title_justify="left")
    table.add_column("output tensor", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("from", overflow="fold", min_width=16)
    for planned in result.plan.tensors:
        action = _plan_action(planned)
        table.add_row(Text(planned.name), planned.dtype, _shape(planned.shape), Text(action))
    print_table(console, table)
    if result.plan.folded:
        folded = ", ".join(result.plan.folded)
        console.print(Text(f"folded (not in the output): {folded}"), soft_wrap=True)


def _plan_action(planned: PlannedTensor) -> str:
    """What produces one planned tensor, for the dry run's plan."""
    conversion = planned.conversion
    if planned.source is None:
        action = "new bias"
    elif conversion is None and planned.steps:
        action = f"from {planned.source}"
    elif conversion is None:
        action = "copy" if planned.source == planned.name else f"copy {planned.source}"
    elif conversion.direction == "conv_to_fc":
        action = (
            f"convert {planned.source} (conv {conversion.conv_format.value} -> FC "
            f"{conversion.weight_format.value}, {conversion.layout}"
            f"{': bytes move' if conversion.moves_bytes else ': bytes unchanged'})"
        )
    elif conversion.moves_bytes or planned.steps:
        moved = "" if planned.steps else ": bytes move"
        action = (
            f"convert {planned.source} ({conversion.weight_format.value}, "
            f"{conversion.layout} -> {conversion.conv_format.value}{moved})"
        )
    else:
        action = f"reshape {planned.source} (bytes unchanged)"
    steps = "; ".join(step.describe() for step in planned.steps)
    return f"{action}; {steps}" if steps else action


def render_notes(console: Console, result: ConvertResult, notes: bool = True) -> None:
    """The plan's warnings and, with ``notes``, what the reader unwrapped or stripped."""
    for note in result.notes if notes else ():
        console.print(Text(f"note: {note}"))
    for warning in result.plan.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))


def render_error(console: Console, problems: Sequence[str]) -> None:
    """One line per problem, prefixed ``error:``; line breaks inside one are escaped."""
    for problem in problems:
        console.print(Text(f"error: {_one_line(problem)}", style="red"), soft_wrap=True)


def conversion_json(result: ConvertResult) -> dict[str, Any]:
    """The machine-readable report of one conversion."""
    checks = {c.layer: c for c in result.checks}
    layers = []
    for layer in result.plan.layers:
        check = checks.get(layer.rule.name)
        layers.append(
            {
                "name": layer.rule.name,
                "rename": layer.rule.rename,
                "weight": layer.weight.source,
                "output_weight": layer.weight.name,
                "bias": layer.bias.source if layer.bias else None,
                "output_bias": layer.bias.name if layer.bias else None,
                "old_shape": list(layer.source_shape),
                "new_shape": list(layer.weight.shape),
                "kernel": list(layer.conversion.kernel),
                "layout": str(layer.rule.layout),
                "weight_format": layer.conversion.weight_format.value,
                "conv_format": layer.conversion.conv_format.value,
                "bytes_unchanged": layer.weight.is_byte_copy,
                "direction": layer.conversion.direction,
                "operations": list(layer.operations),
                "folded": list(layer.folded),
                "batchnorm": [
                    {
                        "name": f.name,
                        "position": f.position,
                        "eps": f.eps,
                        "eps_from": f.eps_from,
                        "tensors": list(f.tensors),
                    }
                    for f in layer.folds
                ],
                "outputs": _outputs_json(layer),
                "out_features": layer.out_features,
                "source_out_features": layer.source_out_features,
                "fold_spatial": "sum" if layer.conversion.fold_spatial else None,
                "dtype": layer.weight.dtype,
                "proof": layer.proof,
                "tolerance": check.tolerance if check else None,
                "bits_equal": check.bits_equal if check else None,
                "mismatches": [_mismatch_json(m) for m in check.mismatches] if check else [],
                "max_abs_diff": check.max_abs_diff if check else None,
                "dense_max_abs_diff": check.dense_max_abs_diff if check else None,
                "nonfinite_rows": check.nonfinite_rows if check else None,
                "float64_rows": check.float64_rows if check else None,
                "ok": check.ok if check else None,
            }
        )
    options = result.options
    return {
        "fc2conv_version": __version__,
        "ok": result.ok,
        "input": str(options.input),
        "input_format": result.input_format,
        "output": str(options.output),
        "published": result.published,
        "verified": result.verified,
        "dry_run": options.dry_run,
        "checked": result.checked,
        "atol": options.atol,
        "seed": options.seed,
        "layers": layers,
        "copied": len(result.plan.copied),
        "folded": list(result.plan.folded),
        "dtype": result.plan.dtype,
        "dtype_scope": result.plan.dtype_scope if result.plan.dtype else None,
        "copy_mismatches": list(result.copy_mismatches),
        "index_problems": list(result.index_problems),
        "notes": list(result.notes),
        "warnings": [*result.plan.warnings, *result.provenance_warnings],
        "provenance": {
            p.key: {
                "recorded": p.recorded,
                "actual": p.actual,
                "path": str(p.path),
                "matches": p.matches,
            }
            for p in result.provenance
        },
        "output_bytes": result.output_bytes,
        "seconds": round(result.seconds, 3),
    }


def _outputs_json(layer: LayerPlan) -> dict[str, Any] | None:
    """The kept outputs (``outputs:``), None when the layer keeps all."""
    if layer.out_features == layer.source_out_features:
        return None
    from fc2conv_cli.plan import SelectRows

    select = layer.weight.step(SelectRows)
    return {"text": select.text, "kept": len(select.indices), "of": select.of}


def _mismatch_json(mismatch: Mismatch) -> dict[str, Any]:
    return {
        "tensor": mismatch.tensor,
        "output": mismatch.output,
        "channel": mismatch.channel,
        "position": None if mismatch.position is None else list(mismatch.position),
        "source": mismatch.source,
        "written": mismatch.written,
        "count": mismatch.count,
    }


def error_json(error: Fc2convError) -> dict[str, Any]:
    """The machine-readable report of a run that stopped on an error."""
    report: dict[str, Any] = (
        conversion_json(error.result) if hasattr(error, "result") else {"ok": False}
    )
    report["error"] = {"code": error.code, "message": error.message, "exit_code": error.exit_code}
    return report


def check_json_path(destination: str | None, *own_files: Path | None) -> None:
    """Refuse a ``--json`` destination that could not be written, before any work starts.

    ``None`` (no report) and ``-`` (stdout) always pass. A file must lie in an existing,
    writable folder, must not be a directory or a read-only file, and must not be one of
    ``own_files`` (the command's inputs and outputs), which the report would overwrite.
    Raises ``OutputError``.
    """
    if destination is None or destination == "-":
        return
    path = Path(destination)
    where = f"--json {destination}"
    if path.is_dir():
        raise OutputError(f"{where}: is a directory; give a file name for the JSON report")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{where}: folder {folder} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{where}: the file is not writable")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{where}: folder {folder} is not writable")
    for own in own_files:
        if own is not None and _same_file(path, own):
            raise OutputError(f"{where}: is {own}, which the command reads or writes")


def write_json(destination: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a file, or to stdout when ``destination`` is ``-``."""
    text = json.dumps(data, allow_nan=False, sort_keys=True, indent=2) + "\n"
    if destination == "-":
        _write_to_stdout(text)
    else:
        with open(destination, "w", encoding="utf-8") as file:
            file.write(text)


def _bytes_progress(console: Console, label: str, transient: bool) -> Any:
    """A rich progress bar of bytes (done, rate, time left) after the column ``label``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class BatchProgress:
    """Progress of a batch: a live bar on a terminal, one plain line per file otherwise."""

    def __init__(self, console: Console, total_files: int, total_bytes: int) -> None:
        self.console = console
        self.total_files = total_files
        self.done = 0
        self._progress = None
        if console.is_terminal:
            self._progress = _bytes_progress(console, "{task.fields[files]}", transient=False)
            self._task = self._progress.add_task("batch", total=total_bytes, files=self._files())

    def _files(self) -> str:
        return f"{self.done}/{self.total_files} files"

    def __enter__(self) -> BatchProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, outcome: FileOutcome) -> None:
        """Count one finished file."""
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=outcome.input_bytes, files=self._files())
            return
        line = f"[{self.done}/{self.total_files}] {outcome.status.value}: {outcome.item.input}"
        if outcome.error:
            line += f": {outcome.error.removeprefix(f'{outcome.item.input}: ')}"
        else:
            line += f" -> {outcome.item.output} ({outcome.seconds:.1f} s)"
        self.console.print(Text(line), soft_wrap=True)


# Inputs from about this size get a progress bar on a terminal: smaller ones take seconds.
PROGRESS_MIN_BYTES = 1 << 30


class StepProgress:
    """Where ``convert`` / ``verify`` are (``pipeline.Steps``), shown as they go.

    On a terminal, for an input of ``PROGRESS_MIN_BYTES`` or more, a live bar per step
    that moves bytes (bytes done, rate, time left); never in a pipe or a CI log (``CI``
    set). With ``verbose``, one line per finished step with its time, wherever the
    output goes. ``timings`` keeps (step, seconds) for the report.
    """

    def __init__(self, console: Console, input_bytes: int, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.timings: list[tuple[str, float]] = []
        self._current: tuple[str, float] | None = None
        self._progress: Any = None
        self._task: Any = None
        on_terminal = console.is_terminal and not console.quiet and "CI" not in os.environ
        if on_terminal and input_bytes >= PROGRESS_MIN_BYTES:
            self._progress = _bytes_progress(console, "{task.description:<6}", transient=True)

    def __enter__(self) -> StepProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_step()
        if self._progress is not None:
            self._progress.stop()

    def step(self, name: str, total_bytes: int = 0) -> None:
        """A step begins; the one before it ends (and is timed)."""
        self._end_step()
        self._current = (name, time.perf_counter())
        if self._progress is not None and total_bytes:
            self._task = self._progress.add_task(name, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the current step are done."""
        if self._task is not None:
            self._progress.update(self._task, advance=nbytes)

    def _end_step(self) -> None:
        if self._current is None:
            return
        name, started = self._current
        seconds = time.perf_counter() - started
        self.timings.append((name, seconds))
        self._current = None
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        if self.verbose:
            self.console.print(Text(f"step {name}: {seconds:.3f} s"), soft_wrap=True)


def render_batch(console: Console, result: BatchResult) -> None:
    """The summary table of a batch: one row per file, then the counts."""
    table = new_table(console)
    for name in ("input", "output"):
        table.add_column(name, overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("max |diff|", justify="right", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    table.add_column("error", min_width=16)
    styles = {True: "green", False: "bold red"}
    for outcome in result.outcomes:
        table.add_row(
            Text(str(outcome.item.input)),
            Text(str(outcome.item.output)),
            Text(outcome.status.value, style=styles[outcome.status.ok]),
            str(outcome.layers) if outcome.layers else "-",
            _diff(outcome.max_abs_diff) if outcome.max_abs_diff is not None else "-",
            f"{outcome.seconds:.1f}",
            Text(outcome.error or ""),
        )
    print_table(console, table)
    counts = ", ".join(f"{n} {status}" for status, n in _counts(result).items())
    console.print(Text(f"{len(result.outcomes)} files: {counts} | {result.seconds:.1f} s"))


def batch_json(result: BatchResult) -> dict[str, Any]:
    """The machine-readable summary of a batch."""
    return {
        "fc2conv_version": __version__,
        "ok": result.ok,
        "counts": _counts(result),
        "seconds": round(result.seconds, 3),
        "files": [
            {
                "input": str(o.item.input),
                "output": str(o.item.output),
                "map": str(o.item.map_path),
                "status": o.status.value,
                "layers": o.layers,
                "max_abs_diff": o.max_abs_diff,
                "seconds": round(o.seconds, 3),
                "error": o.error,
            }
            for o in result.outcomes
        ],
    }


def render_inspect(console: Console, result: InspectResult) -> None:
    """The checkpoint's tensor groups, totals, and the suggested map's evidence."""
    summary = result.summary
    console.print(Text(f"fc2conv inspect: {summary.path} ({summary.kind})"))
    table = new_table(console)
    table.add_column("group", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("tensors (shape, dtype)", min_width=24)
    table.add_column("size", justify="right", no_wrap=True)
    for group in summary.groups:
        tensors = "\n".join(
            f"{_member_name(t.name, group.prefix)} {_shape(t.shape)} {t.dtype}"
            for t in group.tensors
        )
        table.add_row(Text(group.prefix), group.kind, Text(tensors), size_text(group.nbytes))
    print_table(console, table)
    kinds = [g.kind for g in summary.groups]
    console.print(
        Text(
            f"{summary.tensor_count} tensors in {len(kinds)} groups | "
            f"{size_text(summary.nbytes)} | "
            f"conv backbone: {kinds.count('conv')} layers | FC head: {kinds.count('fc')} layers"
        )
    )
    for note in summary.notes:
        console.print(Text(f"note: {note}"))
    suggestion = result.suggestion
    if suggestion is not None:
        kernel = "x".join(map(str, suggestion.kernel))
        console.print(
            Text(
                f"suggested map: {' -> '.join(suggestion.layers)}; first FC reads "
                f"{suggestion.in_channels} channels x {kernel}, layout {suggestion.layout} "
                f"(from the {suggestion.source}, confidence {suggestion.confidence:.2f})"
            )
        )
        if suggestion.reading is not None and suggestion.reading.nodes:
            console.print(Text(f"{suggestion.reading.how}: {', '.join(suggestion.reading.nodes)}"))
        if suggestion.candidates:
            table = Table(title="map candidates (shape x layout), best first")
            for column in ("shape", "layout", "score", "z", "support", "confidence", "same as"):
                table.add_column(column, no_wrap=True)
            for c in suggestion.candidates[:8]:
                table.add_row(
                    "x".join(map(str, c.shape)),
                    c.layout,
                    f"{c.score:.3f}",
                    f"{c.z:.1f}",
                    f"{c.support:.2f}",
                    f"{c.confidence:.2f}",
                    Text(", ".join(f"{'x'.join(map(str, s))} {a}" for s, a in c.members[1:4])),
                )
            console.print(table)
        for note in suggestion.ambiguities:
            console.print(Text(f"check: {note}", style="yellow"))
        for note in suggestion.notes:
            console.print(Text(f"note: {note}", style="yellow"))


def _member_name(name: str, prefix: str) -> str:
    """``weight`` for ``features.0.weight`` in group ``features.0``; a name whose layer is
    joined by ``/`` (``fc1/kernel``, Keras and TF) is shown whole."""
    if name.startswith(prefix + ".") and len(name) > len(prefix) + 1:
        return name[len(prefix) + 1 :]
    return name


def inspect_json(result: InspectResult) -> dict[str, Any]:
    """The machine-readable inspect report."""
    summary, suggestion = result.summary, result.suggestion
    report: dict[str, Any] = {
        "fc2conv_version": __version__,
        "input": summary.path,
        "input_format": summary.kind,
        "tensors": summary.tensor_count,
        "bytes": summary.nbytes,
        "notes": list(summary.notes),
        "groups": [
            {
                "prefix": g.prefix,
                "kind": g.kind,
                "bytes": g.nbytes,
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in g.tensors
                ],
            }
            for g in summary.groups
        ],
        "suggested_map": None,
    }
    if suggestion is not None:
        reading = suggestion.reading
        report["suggested_map"] = {
            "text": suggestion.text,
            "layers": list(suggestion.layers),
            "in_channels": suggestion.in_channels,
            "kernel": list(suggestion.kernel),
            "layout": suggestion.layout,
            "source": suggestion.source,
            "layout_source": suggestion.layout_source,
            "shape_source": suggestion.shape_source,
            "confidence": suggestion.confidence,
            "reason": suggestion.guess.reason if suggestion.guess else None,
            "candidates": [
                {
                    "shape": list(c.shape),
                    "layout": c.layout,
                    "score": c.score,
                    "z": c.z,
                    "support": c.support,
                    "confidence": c.confidence,
                    "equivalent": [{"shape": list(s), "layout": a} for s, a in c.members],
                }
                for c in suggestion.candidates
            ],
            "reading": None
            if reading is None
            else {
                "source": reading.source,
                "how": reading.how,
                "nodes": list(reading.nodes),
                "problem": reading.problem,
            },
            "ambiguities": list(suggestion.ambiguities),
            "notes": list(suggestion.notes),
        }
    return report


def write_stdout(text: str) -> None:
    """Data for a pipe (a suggested map): plain text on stdout, nothing added."""
    _write_to_stdout(text)


def flush_stdout() -> None:
    """Flush stdout before exit; a reader that went away gets nothing more, silently.

    Python flushes stdout again at shutdown and, if that fails, prints "Exception
    ignored" and exits 120: after a broken pipe stdout points at the null device.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_rest(sys.stdout)


def _write_to_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_rest(sys.stdout)


def _discard_rest(stream: Any) -> None:
    """Point ``stream``'s file descriptor at the null device (the recipe in the ``signal``
    docs, "Note on SIGPIPE"): later writes, and the flush at exit, succeed and go nowhere."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing to redirect
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _counts(result: BatchResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in result.outcomes:
        counts[outcome.status.value] = counts.get(outcome.status.value, 0) + 1
    return counts


def _title(result: ConvertResult) -> Text:
    options = result.options
    verb = "dry run" if options.dry_run else "verified" if result.verified else "converted"
    return Text(f"fc2conv {verb}: {options.input} -> {options.output}")


def _footer(result: ConvertResult) -> str:
    verb = "checked" if result.verified else "converted"
    parts = [f"{len(result.plan.layers)} layers {verb}"]
    copied = len(result.plan.copied)
    if result.options.dry_run:
        parts.append(f"{copied} tensors to copy; nothing written (dry run)")
    elif result.verified:
        same = "byte-identical" if not result.copy_mismatches else "DIFFERENT"
        parts.append(f"{copied} copied tensors {same} to the source")
        if result.index_problems:
            parts.append("; ".join(result.index_problems))
        elif result.ok:
            parts.append(_all_ok(result))
    else:
        same = "byte-identical" if result.checked and not result.copy_mismatches else "unchecked"
        parts.append(f"{copied} tensors copied ({same})")
        parts.append(f"output {size_text(result.output_bytes)}")
        if not result.checked:
            parts.append("checks skipped (--no-check)")
        elif result.ok:
            parts.append(_all_ok(result))
    parts.append(f"{result.seconds:.2f} s")
    return " | ".join(parts)


def _layout_cell(conversion: Conversion) -> str:
    """Flatten layout, FC weight format used, and conv format written: ``hwc in_out>oihw``
    (in reverse, the conv format read and the FC format written: ``chw oihw>out_in``)."""
    fc, conv = conversion.weight_format.value, conversion.conv_format.value
    if conversion.direction == "conv_to_fc":
        return f"{conversion.layout} {conv}>{fc}"
    return f"{conversion.layout} {fc}>{conv}"


def _all_ok(result: ConvertResult) -> str:
    sampled = [c for c in result.checks if c.float64_rows < c.out_features]
    where = f" (<= {max(c.float64_rows for c in sampled)} filters a layer)" if sampled else ""
    computed = [c for c in result.checks if c.proof != "exact"]
    scaled = [c for c in result.checks if c.tolerance is not None]
    if not computed and not scaled:
        return f"every value bit-exact, float64{where} within atol {result.options.atol:g}"
    exact = "every moved value bit-exact" + (
        " (against an independent cast)" if result.plan.dtype else ""
    )
    folded = f", computed layers ({len(computed)})" if computed else ""
    return f"{exact}{folded}, float64{where} within the dtype-scaled bound"


def _one_line(text: str) -> str:
    """Escape characters that would break a line (a newline in a file name, say)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _bits(equal: bool | None) -> Text:
    if equal is None:
        return Text("-")
    return Text("equal", style="green") if equal else Text("DIFFER", style="bold red")


def _diff(value: float | None) -> Text:
    return (
        Text("nan/inf", style="red")
        if value is None or not math.isfinite(value)
        else Text(f"{value:.1e}")
    )


def size_text(nbytes: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``527.8 MiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    exponent = min(3, int(math.log(nbytes, 1024)))
    return f"{nbytes / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
