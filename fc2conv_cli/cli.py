"""The ``fc2conv`` command line: parse, call, render, and map errors to exit codes.

Exit codes: 0 written and every check passed; 1 a check failed (nothing written);
2 bad input or usage (one line per problem, nothing written); 3 an internal error (a bug:
the traceback is shown); 130 interrupted (Ctrl-C or SIGTERM; nothing written). A reader
that closes the pipe early (``| head``) changes none of these: the run completes, and
what it would still have written to that pipe is dropped.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fc2conv_cli import __version__
from fc2conv_cli.errors import (
    EXIT_INPUT_ERROR,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    Fc2convError,
)

if TYPE_CHECKING:
    from rich.console import Console

    from fc2conv_cli.api import ConvertResult
    from fc2conv_cli.layer_map import LayerMap
    from fc2conv_cli.pipeline import Steps

__all__ = ["cli", "main", "run"]

_ATOL_DEFAULT = 1e-6  # keep in step with pipeline.DEFAULT_ATOL (a test pins it)

# Unreadable paths are left to the readers, which report them in one line.
_PATH = click.Path(path_type=Path, readable=False)


class _Tolerance(click.ParamType):
    """A finite number >= 0: ``nan`` would make every comparison false, ``inf`` pass all."""

    name = "float"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"expected a finite number >= 0, got {value!r}", param, ctx)
        return number


_F = TypeVar("_F", bound=Callable[..., Any])
_LEVEL = "fc2conv.output_level"  # where a command's -q / -v are kept, in its context's meta


@dataclass(frozen=True)
class _Level:
    """How much a command prints: ``quiet`` errors only, ``verbose`` notes and timings too."""

    quiet: bool = False
    verbose: bool = False


def _output_options(command: _F) -> _F:
    """Give a command -q/--quiet and -v/--verbose; read them back with ``_level()``."""

    @functools.wraps(command)
    def run(*args: Any, quiet: bool, verbose: bool, **kwargs: Any) -> Any:
        if quiet and verbose:
            raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
        click.get_current_context().meta[_LEVEL] = _Level(quiet, verbose)
        return command(*args, **kwargs)

    run = click.option(
        "-v", "--verbose", is_flag=True, help="Also print notes and each step's time."
    )(run)
    run = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        help="Print errors only; the exit code, --json and data on stdout are unchanged.",
    )(run)
    return run  # type: ignore[return-value]


def _level() -> _Level:
    context = click.get_current_context(silent=True)
    return context.meta.get(_LEVEL, _Level()) if context is not None else _Level()


def _console(stderr: bool = False) -> Console:
    """A report console for this command: silent under -q."""
    from fc2conv_cli.report import make_console

    return make_console(stderr=stderr, quiet=_level().quiet)


def _layer_map_arg(map_path: Path) -> Path | LayerMap:
    """``--map -`` reads the map from stdin; any other value is a path or a shipped name."""
    if str(map_path) != "-":
        return map_path
    from fc2conv_cli.layer_map import LayerMap

    return LayerMap.from_yaml(sys.stdin.read(), "<stdin>")


_json_option = click.option(
    "--json",
    "json_path",
    metavar="PATH|-",
    help="Also write the report as JSON to PATH, or to stdout with '-' (the table then "
    "goes to stderr).",
)
_atol_option = click.option(
    "--atol",
    type=_Tolerance(),
    default=_ATOL_DEFAULT,
    show_default=True,
    help="Largest |fc - conv| (float64) a check accepts.",
)
_FORMATS = ("safetensors", "torch", "keras", "onnx", "caffe", "tfjs", "numpy")
_format_option = click.option(
    "--format",
    "input_format",
    type=click.Choice(_FORMATS),
    help="Read the input as this format; by default it is found from the content, then the suffix.",
)
_DTYPES = ("float32", "float16", "bfloat16")  # layer_map.DTYPES (a test keeps them in step)
_dtype_options = (
    click.option(
        "--dtype",
        type=click.Choice(_DTYPES),
        help="Cast every floating tensor to this dtype (round to nearest even); overrides "
        "the map's dtype:. A value that overflows, or a nonzero tensor flushed to zero, is "
        "an error (exit 2).",
    ),
    click.option(
        "--dtype-scope",
        type=click.Choice(["all", "converted"]),
        default="all",
        show_default=True,
        help="Cast all floating tensors, or only the converted layers' (copies stay as they are).",
    ),
    click.option(
        "--allow-overflow",
        is_flag=True,
        help="Write a cast's overflows as inf (and tensors flushed to zero) instead of refusing.",
    ),
)


def _dtype_option(command: Callable) -> Callable:
    for option in reversed(_dtype_options):
        command = option(command)
    return command


_seed_option = click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the checks' random inputs (an integer >= 0).",
)

_CONVERT_HELP = """Convert the FC layers named in MAP of checkpoint INPUT into conv weights.

INPUT is a checkpoint in any format fc2conv reads: .safetensors, PyTorch (.pt, .pth,
.bin, .ckpt, .pth.tar; read with torch.load(weights_only=True)), Keras (.keras,
.weights.h5, .h5), ONNX (.onnx), Caffe (.caffemodel), TF.js (model.json) or NumPy (.npz,
.npy; a restricted unpickler). The format is found from the content, then the suffix
(--format overrides); nothing in a file is ever run. The first FC becomes a k x k conv
over the feature map it used to flatten, later FCs 1x1 convs; every other tensor is
copied unchanged. The output is written atomically and only after the checks pass:
every converted value is compared bit for bit with the FC weight it came from, the
layer is run in float64 as a convolution against the FC (on kernel-sized inputs and
densely on a larger map), and every copied tensor is compared byte for byte.

\b
Example:
  fc2conv convert vgg16.pth --map vgg16 -o vgg16_fcn.safetensors

\b
Exit codes: 0 done, every check passed; 1 a check failed (nothing written);
2 bad input or usage (nothing written); 3 internal error (please report it).

\b
The layer map (YAML). --map takes its path, or a shipped map's name (fc2conv
sample-configs); `fc2conv schema map` prints its JSON Schema, for editors.
  version: 1               required
  layout: chw              required: the flatten order feeding the first FC,
                           slowest axis first: chw (torch), hwc (Keras NHWC),
                           whc, cl, cdhw, ...
  weight_format: out_in    FC weights (out, in), or in_out (in, out) as Keras
                           Dense kernels; default: the checkpoint's stored one
  conv_format: oihw        conv weights written oihw (torch, the default) or
                           hwio (Keras / TF)
  strip_prefix: module.    a prefix, or a list, removed from every tensor name
  state_dict_key: model    the nested state dict of a training checkpoint
  direction: fc_to_conv    or conv_to_fc: the rules name convs (kernel exactly
                           the first rule's kernel), written as FC weights
  dtype: float16           cast floating tensors (float32, float16, bfloat16;
                           round to nearest even); --dtype overrides it
  layers:                  required: the FC layers, first FC first
    - name: classifier.0   required: finds NAME.weight or NAME/kernel (or
                           :0 variants) and the matching bias, if any
      rename: fc6          output prefix instead of NAME (default: keep names)
      kernel: [7, 7]       the conv kernel: the first FC's input window;
                           default ones, a 1x1 conv (later FCs)
      in_channels: 512     default: in_features / prod(kernel)
      layout: hwc          a layer's own layout, weight_format and
      weight_format: in_out
      conv_format: hwio    conv_format override the map's
      weight: fc1/kernel   full tensor names, when NAME does not find them
      bias: fc1/bias
      fold_batchnorm: {name: classifier.1, eps: 0.001}
                           fold the BatchNorm after this layer into it;
                           eps default: torch 1e-5, Keras 1e-3 / its config
      fold_batchnorm_before: {name: head.bn}
                           fold a BatchNorm on the layer's input (over the
                           flat features, or the channels) into it
      outputs: "1:1001"    last layer only: keep these outputs (a slice, or
                           a list such as [0, 5, 7])
      fold_spatial: sum    first layer only: sum the kernel into a 1x1 conv,
                           exact only on a replicated map (README: Head algebra)

\b
Example map (shipped as vgg16):
  version: 1
  layout: chw
  weight_format: out_in
  layers:
    - {name: classifier.0, rename: fc6, kernel: [7, 7], in_channels: 512}
    - {name: classifier.3, rename: fc7}
    - {name: classifier.6, rename: fc8}
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="fc2conv")
def cli() -> None:
    """fc2conv: turn the fully-connected head of a CNN checkpoint into conv weights,
    so the network runs on images of any size and gives dense score maps.

    Run `fc2conv convert --help` for the main command.
    """


@cli.command(help=_CONVERT_HELP)
@_output_options
@click.argument("input_path", metavar="INPUT", type=_PATH)
@click.option(
    "--map",
    "map_path",
    required=True,
    type=_PATH,
    help="YAML layer map (its keys: at the end of this help), a shipped map's name, or - "
    "to read it from stdin.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),  # a str: a trailing / (a folder) must survive
    help="Output .safetensors file (never the input), or a folder (existing, or ending in "
    "/) for FOLDER/<input stem>.safetensors (a model.json: its folder's name).",
)
@_json_option
@_atol_option
@click.option("--no-check", is_flag=True, help="Skip the equivalence and byte checks.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan and the shape changes; write nothing."
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_seed_option
@_format_option
@_dtype_option
def convert(
    input_path: Path,
    map_path: Path,
    output: str,
    json_path: str | None,
    atol: float,
    no_check: bool,
    dry_run: bool,
    force: bool,
    seed: int,
    input_format: str | None,
    dtype: str | None,
    dtype_scope: str,
    allow_overflow: bool,
) -> int:
    from fc2conv_cli import api
    from fc2conv_cli.report import check_json_path

    target = api.output_path(input_path, output)
    layer_map = _layer_map_arg(map_path)
    check_json_path(json_path, input_path, map_path, target)

    def run(steps: Steps) -> ConvertResult:
        return api.convert(
            input_path,
            layer_map,
            output,
            atol=atol,
            check=not no_check,
            dry_run=dry_run,
            force=force,
            seed=seed,
            format=input_format,
            dtype=dtype,
            dtype_scope=dtype_scope,
            allow_overflow=allow_overflow,
            steps=steps,
        )

    return _report_conversion(run, input_path, json_path)


def _report_conversion(
    action: Callable[[Steps], ConvertResult], input_path: Path, json_path: str | None
) -> int:
    """Run ``convert`` or ``verify`` with progress, and render its table, notes and JSON."""
    from fc2conv_cli import report

    level = _level()
    table_console = _console(stderr=json_path == "-")
    messages = _console(stderr=True)
    try:
        input_bytes = input_path.stat().st_size
    except OSError:
        input_bytes = 0  # the reader says why, in one line
    try:
        with report.StepProgress(messages, input_bytes, level.verbose) as steps:
            result = action(steps)
    except Fc2convError as error:
        failed = getattr(error, "result", None)
        if failed is not None:
            report.render_conversion(table_console, failed)
        if json_path:
            report.write_json(json_path, report.error_json(error))
        raise
    if result.options.dry_run:
        report.render_plan(table_console, result)
    report.render_conversion(table_console, result)
    report.render_notes(messages, result, notes=level.verbose)
    if json_path:
        report.write_json(json_path, report.conversion_json(result))
    return result.exit_code


_INSPECT_HELP = """Show what checkpoint INPUT holds; with --suggest-map, write its layer map.

The table lists tensor groups (prefixes) with shapes, dtypes and sizes, marking the conv
backbone and the FC head. --suggest-map finds the FC chain by matching sizes and reads
how the first FC reads the backbone's map from the file's graph or config where it has
one (ONNX, TF.js, Keras; Caffe with --prototxt); otherwise it scores every map shape
the conv geometry allows with every flatten order on the weights' smoothness, and says
"cannot tell" with the candidates when they do not separate. The map is commented and
converts as written. The map goes to -o MAP.yaml, or to stdout (the table then goes to
stderr). --schema-out writes the map's JSON Schema and starts the map with a
`# yaml-language-server: $schema=` line pointing to it, so editors validate and
complete the map.

\b
Example:
  fc2conv inspect vgg16.pth -o vgg16.yaml --schema-out fc2conv-map.schema.json
"""


@cli.command(help=_INSPECT_HELP)
@_output_options
@click.argument("input_path", metavar="INPUT", type=_PATH)
@click.option("--suggest-map", is_flag=True, help="Suggest a layer map for this checkpoint.")
@click.option(
    "-o",
    "--output",
    "map_output",
    type=_PATH,
    help="Write the suggested map here (implies --suggest-map).",
)
@click.option(
    "--schema-out",
    "schema_output",
    metavar="PATH",
    type=_PATH,
    help="Write the map's JSON Schema to PATH (e.g. next to the map) and point the map's "
    "first line at it, for editors (implies --suggest-map).",
)
@click.option("--force", is_flag=True, help="Replace the -o (and --schema-out) file if it exists.")
@click.option(
    "--prototxt",
    type=_PATH,
    help="A Caffe deploy .prototxt: the suggestion reads the map's shape from it.",
)
@_json_option
@_format_option
def inspect(
    input_path: Path,
    suggest_map: bool,
    map_output: Path | None,
    schema_output: Path | None,
    force: bool,
    prototxt: Path | None,
    json_path: str | None,
    input_format: str | None,
) -> int:
    from fc2conv_cli import api, report

    started = time.perf_counter()
    suggest_map = suggest_map or map_output is not None or schema_output is not None
    map_to_stdout = suggest_map and map_output is None
    if map_to_stdout and json_path == "-":
        raise click.UsageError("--json - and a map on stdout collide: give the map -o MAP.yaml")
    if schema_output and map_output and schema_output.absolute() == map_output.absolute():
        raise click.UsageError("--schema-out and -o name the same file")
    report.check_json_path(json_path, input_path, map_output, schema_output)
    result = api.inspect(
        input_path,
        suggest=suggest_map,
        map_output=map_output,
        schema_output=schema_output,
        force=force,
        format=input_format,
        prototxt=prototxt,
    )
    report.render_inspect(_console(stderr=map_to_stdout or json_path == "-"), result)
    if map_to_stdout and result.suggestion is not None:
        report.write_stdout(result.suggestion.text)
    if json_path:
        report.write_json(json_path, result.to_json())
    _timed(started)
    return 0


def _timed(started: float) -> None:
    """Under -v, the command's time on stderr."""
    if _level().verbose:
        from rich.text import Text

        _console(stderr=True).print(Text(f"took {time.perf_counter() - started:.3f} s"))


_VERIFY_HELP = """Check a CONVERTED file against its ORIGINAL checkpoint and MAP; write nothing.

Every rule's tensors must be present with the right shapes, hold the original's values
bit for bit, and pass the float64 window and dense checks; every other tensor must be
byte-equal to the original's; nothing may be missing or extra. The source_sha256 and
layer_map_sha256 recorded in CONVERTED are compared with ORIGINAL's and MAP's: a
difference is a warning, not a failure. Prints the same table (and --json) as convert.

\b
Example:
  fc2conv verify vgg16.pth vgg16_fcn.safetensors --map vgg16

\b
Exit codes: 0 all good; 1 any difference (the table and the error line say which);
2 bad input or usage.
"""


@cli.command(help=_VERIFY_HELP)
@_output_options
@click.argument("original", type=_PATH)
@click.argument("converted", type=_PATH)
@click.option(
    "--map",
    "map_path",
    required=True,
    type=_PATH,
    help="The layer map the file was converted with (a path, a shipped map's name, or - "
    "for stdin).",
)
@_json_option
@_atol_option
@_seed_option
@_format_option
def verify(
    original: Path,
    converted: Path,
    map_path: Path,
    json_path: str | None,
    atol: float,
    seed: int,
    input_format: str | None,
) -> int:
    from fc2conv_cli import api
    from fc2conv_cli.report import check_json_path

    layer_map = _layer_map_arg(map_path)
    check_json_path(json_path, original, converted, map_path)

    def run(steps: Steps) -> ConvertResult:
        return api.verify(
            original, converted, layer_map, atol=atol, seed=seed, format=input_format, steps=steps
        )

    return _report_conversion(run, original, json_path)


_BATCH_HELP = """Convert many checkpoints: every file of a MANIFEST, or INPUT files with --map.

Each file is converted and checked exactly as `fc2conv convert` would (the same bytes
come out), in --jobs worker processes reused across files. An output whose metadata
records the same source SHA-256 and map is up to date and skipped, so a stopped batch,
rerun, finishes the rest (--force converts again). A file that fails does not stop the
others (unless --fail-fast). --shard I/N takes every N-th file of the sorted list, so N
machines together convert every file exactly once.

\b
The manifest (globs and maps relative to its folder; outputs mirror the inputs' paths
under output_dir with the suffix .safetensors):
  version: 1
  output_dir: converted/
  jobs:
    - inputs: "vgg16/**/*.pth"
      map: vgg16            # a path, or a shipped map's name
    - inputs: "web/**/model.json"
      map: web.yaml
      format: tfjs
      dtype: float16        # optional: cast this group's outputs

Each file's format is found as `convert` finds it, or named by its group's optional
format: key (--format for INPUT files). Without format:, a glob takes the files whose
suffix names a format fc2conv reads (of .json files only model.json, TF.js's name);
with it, every file it matches.

\b
Examples:
  fc2conv batch zoo/manifest.yaml --jobs 4 --timeout 600
  fc2conv batch --map vgg16 -o converted/ ckpts/*.pth

\b
Exit codes: 0 every file converted or up to date (or an empty shard); 1 a file failed,
a check failed or a file timed out; 2 bad manifest or usage; 130 interrupted (finished
outputs kept, no temp files left).
"""


class _Seconds(click.ParamType):
    """A finite number of seconds > 0."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"expected a finite number of seconds > 0, got {value!r}", param, ctx)
        return number


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise click.BadParameter(f"expected I/N with 1 <= I <= N, e.g. 2/8; got {value!r}")
    return int(index), int(count)


@cli.command(help=_BATCH_HELP)
@_output_options
@click.argument("paths", nargs=-1, required=True, type=_PATH)
@click.option(
    "--map",
    "map_path",
    type=_PATH,
    help="Layer map for INPUT files (instead of a manifest): a path or a shipped name.",
)
@click.option(
    "-o",
    "--output-dir",
    type=_PATH,
    help="Output folder; overrides the manifest's output_dir.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    help="Worker processes. Default: the CPUs this process may use, i.e. its CPU affinity "
    "capped by a cgroup CPU quota (rounded up), not the machine's core count.",
)
@click.option(
    "--timeout",
    type=_Seconds(),
    metavar="SECONDS",
    help="Stop a file that runs longer than this (its worker is killed and replaced, its "
    "temp file removed) and report it 'timed out'.",
)
@click.option(
    "--shard",
    callback=_parse_shard,
    metavar="I/N",
    help="Convert only shard I of N of the sorted file list.",
)
@_json_option
@click.option("--force", is_flag=True, help="Convert again even when the output is up to date.")
@click.option("--dry-run", is_flag=True, help="Show what would be converted; write nothing.")
@click.option("--fail-fast", is_flag=True, help="Start no new file after the first failure.")
@_atol_option
@_seed_option
@click.option(
    "--format",
    "input_format",
    type=click.Choice(_FORMATS),
    help="Read the INPUT files (with --map) as this format; in a manifest, give a job "
    "group a format: key instead. By default each file's is found from its content.",
)
@_dtype_option
def batch(
    paths: tuple[Path, ...],
    map_path: Path | None,
    output_dir: Path | None,
    jobs: int | None,
    timeout: float | None,
    shard: tuple[int, int] | None,
    json_path: str | None,
    force: bool,
    dry_run: bool,
    fail_fast: bool,
    atol: float,
    seed: int,
    input_format: str | None,
    dtype: str | None,
    dtype_scope: str,
    allow_overflow: bool,
) -> int:
    from rich.text import Text

    from fc2conv_cli import report
    from fc2conv_cli.batch import BatchOptions, BatchResult, available_cpus, run_batch
    from fc2conv_cli.manifest import items_from_inputs, read_manifest, select_shard

    report.check_json_path(json_path, map_path, *paths)  # before the manifest is read, too
    if map_path is not None:
        if output_dir is None:
            raise click.UsageError("with --map, give the output folder with -o OUTDIR")
        items = items_from_inputs(paths, map_path, output_dir, input_format)
    elif len(paths) != 1:
        raise click.UsageError("give one MANIFEST.yaml, or --map MAP.yaml with INPUT files")
    elif input_format is not None:
        raise click.UsageError(
            "--format applies to INPUT files with --map; in a manifest, give the job group "
            "a format: key"
        )
    else:
        items = read_manifest(paths[0], output_dir)
    report.check_json_path(json_path, *(p for i in items for p in (i.input, i.map_path, i.output)))
    if shard is not None:
        total, items = len(items), select_shard(items, *shard)
        if not items:
            line = f"shard {shard[0]}/{shard[1]} is empty ({total} files in all); nothing to do"
            _console(stderr=json_path == "-").print(Text(line), soft_wrap=True)
            if json_path:
                report.write_json(json_path, report.batch_json(BatchResult((), 0.0)))
            return 0
    jobs = jobs if jobs is not None else available_cpus()
    options = BatchOptions(
        jobs, force, dry_run, fail_fast, atol, seed, timeout, dtype, dtype_scope, allow_overflow
    )
    started = time.perf_counter()
    messages = _console(stderr=True)
    total_bytes = sum(item.input.stat().st_size for item in items)
    with report.BatchProgress(messages, len(items), total_bytes) as progress:
        result = run_batch(items, options, progress.advance)
    report.render_batch(_console(stderr=json_path == "-"), result)
    _timed(started)
    if json_path:
        report.write_json(json_path, report.batch_json(result))
    return result.exit_code


_SAMPLE_CONFIGS_HELP = """List the layer maps shipped with fc2conv; with NAME, print that map.

Every --map (convert, verify, batch) and a manifest's map: take a shipped map's name
in place of a path: a bare name, with no folder and no .yaml suffix, that is not a file
in the current folder (or the manifest's).

\b
Examples:
  fc2conv sample-configs
  fc2conv sample-configs vgg16 > my_vgg16.yaml
  fc2conv convert vgg16.pth --map vgg16 -o vgg16_fcn.safetensors
"""


@cli.command("sample-configs", help=_SAMPLE_CONFIGS_HELP)
@_output_options
@click.argument("name", required=False)
def sample_configs_command(name: str | None) -> int:
    from fc2conv_cli.layer_map import sample_configs
    from fc2conv_cli.report import write_stdout

    configs = sample_configs()
    if name is None:
        width = max(map(len, configs))
        write_stdout("".join(f"{n:<{width}}  {_summary(p)}\n" for n, p in configs.items()))
        return 0
    if name not in configs:
        raise click.BadParameter(
            f"no shipped map {name!r}; shipped: {', '.join(configs)}", param_hint="NAME"
        )
    write_stdout(configs[name].read_text(encoding="utf-8"))
    return 0


def _summary(path: Path) -> str:
    """A sample map's opening comment up to its first colon (what network it is for),
    at most 64 characters."""
    lines = path.read_text(encoding="utf-8").splitlines()
    comment = " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    summary = comment.split(": ")[0]
    return summary if len(summary) <= 64 else summary[:61].rsplit(" ", 1)[0] + " ..."


_SCHEMA_HELP = """Print the JSON Schema (draft 2020-12) of a layer map or a batch manifest.

Editors that use yaml-language-server (VS Code's YAML extension, Neovim, Helix, ...)
then validate and complete a map that starts with a line naming the schema file:

\b
  fc2conv schema map > fc2conv-map.schema.json
  # first line of my_map.yaml:
  # yaml-language-server: $schema=fc2conv-map.schema.json

`fc2conv inspect CKPT -o MAP.yaml --schema-out PATH` writes both. The checks fc2conv
runs on a map stay the final word.
"""


@cli.command(help=_SCHEMA_HELP)
@_output_options
@click.argument("kind", type=click.Choice(["map", "manifest"]))
def schema(kind: str) -> int:
    from fc2conv_cli.report import write_stdout
    from fc2conv_cli.schema import schema_text

    write_stdout(schema_text(kind))
    return 0


_EXPORT_ATOL_DEFAULT = 1e-4  # keep in step with export.DEFAULT_EXPORT_ATOL (a test pins it)

_EXPORT_HELP = """Export MODEL with CHECKPOINT as a dense, fully convolutional .pt2 or .onnx.

--model MODULE:FACTORY (or path/models.py:Net) names your model's factory. This RUNS YOUR
CODE, on purpose: the factory is imported and called (with the --model-arg KEY=VALUE
pairs), and the model is traced with torch.fx. CHECKPOINT itself is still read as data
only (as convert reads it) and loaded strictly. The flatten feeding the map's first FC
is found in the graph, its layout must be the map's; flatten + Linear becomes a k x k
conv and each later Linear a 1x1 conv, with fc2conv's own converted weights. An adaptive
pool before the flatten is removed when it is the identity at --input-shape, else refused.

\b
Proofs, on the rewritten graph and on the exported file reloaded (torch.export.load or
onnxruntime): at --input-shape it equals the original model; at --dense-shape the score
map has the size the geometry predicts, and every position equals the original model's
own head applied to that window of its backbone's feature map (and, for a backbone
without padding, the original model run on the crop). The file is published only when
every check passes; stride, receptive field and offset are stored in it.

\b
Example:
  fc2conv export --model torchvision.models:vgg16 vgg16.pth \\
      --map sample_configs/vgg16.yaml -o vgg16_dense.pt2

\b
Exit codes: 0 written, every check passed; 1 a check failed (nothing written);
2 bad input: untraceable model, map not matching the graph, checkpoint not loading.
"""


@cli.command(name="export", help=_EXPORT_HELP)
@_output_options
@click.argument("checkpoint", type=_PATH)
@click.option(
    "--model",
    "model_spec",
    required=True,
    metavar="MODULE:FACTORY",
    help="Your model's factory, e.g. mypkg.nets:LeNet5 or models.py:Net (runs your code).",
)
@click.option("--map", "map_path", required=True, type=_PATH, help="The YAML layer map.")
@click.option("-o", "--output", required=True, type=_PATH, help="Output .pt2 or .onnx file.")
@click.option(
    "--input-shape",
    default="3x224x224",
    show_default=True,
    help="The model's native input, CxHxW (CxL for 1-D).",
)
@click.option(
    "--dense-shape",
    help="The larger input of the dense proof [default: --input-shape plus 3 strides per axis].",
)
@_json_option
@click.option(
    "--atol",
    type=_Tolerance(),
    default=_EXPORT_ATOL_DEFAULT,
    show_default=True,
    help="Largest |diff| a check accepts, times max(1, max |reference|) (float32 math).",
)
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keyword argument for the factory (repeatable); VALUE is read as YAML (10, true, x).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_seed_option
def export_command(
    checkpoint: Path,
    model_spec: str,
    map_path: Path,
    output: Path,
    input_shape: str,
    dense_shape: str | None,
    json_path: str | None,
    atol: float,
    model_args: tuple[str, ...],
    force: bool,
    seed: int,
) -> int:
    from fc2conv_cli import report, report_export
    from fc2conv_cli.export import ExportOptions, export_model, parse_model_args, parse_shape

    report.check_json_path(json_path, checkpoint, map_path, output)
    console = _console(stderr=json_path == "-")
    try:
        options = ExportOptions(
            model_spec,
            checkpoint,
            map_path,
            output,
            parse_shape(input_shape, "--input-shape"),
            parse_shape(dense_shape, "--dense-shape") if dense_shape else None,
            atol,
            parse_model_args(model_args),
            seed,
            force,
        )
        result = export_model(options)
    except Fc2convError as error:
        failed = getattr(error, "result", None)
        if failed is not None:
            report_export.render_export(console, failed)
        if json_path:
            report.write_json(json_path, report_export.export_error_json(error))
        raise
    report_export.render_export(console, result)
    if json_path:
        report.write_json(json_path, report_export.export_json(result))
    return result.exit_code


_HEATMAP_HELP = """Run a dense MODEL (.pt2 or .onnx from export) on IMAGE; draw the score map.

The PNG is IMAGE with the class-score map overlaid, each score at the centre of its
receptive field (the stride and offset export stored in the file), and a legend below.
The image's pixels are scaled to [0, 1], without any other normalization.

\b
Example:
  fc2conv heatmap vgg16_dense.pt2 street.png -o heat.png --top 1
"""


@cli.command(help=_HEATMAP_HELP)
@_output_options
@click.argument("model_path", metavar="MODEL", type=_PATH)
@click.argument("image", type=_PATH)
@click.option("-o", "--output", required=True, type=_PATH, help="Output .png file.")
@click.option("--class", "class_index", type=click.IntRange(min=0), help="Draw this class.")
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Without --class: draw the max over the TOP classes with the highest peak scores.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_json_option
def heatmap(
    model_path: Path,
    image: Path,
    output: Path,
    class_index: int | None,
    top: int,
    force: bool,
    json_path: str | None,
) -> int:
    from fc2conv_cli import report, report_export
    from fc2conv_cli.export.heatmap import make_heatmap

    report.check_json_path(json_path, model_path, image, output)
    result = make_heatmap(model_path, image, output, class_index, top, force)
    report_export.render_heatmap(_console(stderr=json_path == "-"), result)
    if json_path:
        report.write_json(json_path, report_export.heatmap_json(result))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and exit with the documented code."""
    signal.signal(signal.SIGTERM, _interrupt)
    code = run(argv)
    from fc2conv_cli.report import flush_stdout

    flush_stdout()  # here, not at shutdown, where a broken pipe would make it exit 120
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; returns the exit code instead of exiting."""
    from fc2conv_cli.report import make_console, render_error

    messages = make_console(stderr=True)
    try:
        code = cli.main(args=argv, prog_name="fc2conv", standalone_mode=False)
    except click.ClickException as error:
        render_error(messages, [_usage_problem(error)])
        return EXIT_INPUT_ERROR
    except (click.Abort, KeyboardInterrupt):
        messages.print("interrupted: no partial or temporary file was left", style="red")
        return EXIT_INTERRUPTED
    except Fc2convError as error:
        render_error(messages, error.problems)
        return error.exit_code
    except Exception:
        traceback.print_exc()
        messages.print(
            f"internal error in fc2conv {__version__}: this is a bug, please report it "
            "with the traceback above",
            style="red",
        )
        return EXIT_INTERNAL_ERROR
    return code if isinstance(code, int) else 0


def _usage_problem(error: click.ClickException) -> str:
    """A usage error as one line, with where to read the usage."""
    ctx = getattr(error, "ctx", None)
    command = ctx.command_path if ctx is not None else "fc2conv"
    return f"{error.format_message()} (see '{command} --help')"


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so staged files are removed on the way out."""
    raise KeyboardInterrupt
