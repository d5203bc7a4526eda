"""Save the dense model as ``.pt2`` (torch.export) or ``.onnx``, staged, then reload it.

Both have dynamic batch, height and width; both carry fc2conv's geometry (stride,
receptive field, offset) in their own metadata: ``.pt2`` as the extra file
``fc2conv.json``, ``.onnx`` as the ``metadata_props`` entry ``fc2conv``. The file is
written under a hidden temporary name beside the target and only renamed into place by
``publish``, after its checks pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv_cli.errors import InputError, OutputError
from fc2conv_cli.export.model import ModelError
from fc2conv_cli.write import check_writable

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "Staged",
    "check_target",
    "load_exported",
    "stage",
]

FORMATS = {".pt2": "pt2", ".onnx": "onnx"}
METADATA_KEY = "fc2conv"
_PT2_EXTRA = "fc2conv.json"
_SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def check_target(target: Path, overwrite: bool) -> str:
    """The output format from the suffix; refuses an output that cannot be written."""
    kind = FORMATS.get(target.suffix.lower())
    if kind is None:
        raise OutputError(f"{target}: the output must end in .pt2 (torch.export) or .onnx")
    check_writable(target, overwrite, ".pt2 or .onnx")
    return kind


@dataclass
class Staged:
    """An exported file under its temporary name, and how it was exported."""

    temp: Path
    target: Path
    kind: str
    notes: list[str]
    nbytes: int = 0

    def publish(self, overwrite: bool) -> None:
        """Rename into place atomically; without ``overwrite`` never replace a file."""
        try:
            if overwrite:
                os.replace(self.temp, self.target)
            else:
                os.link(self.temp, self.target)
                os.unlink(self.temp)
            fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            reason = (
                "already exists; pass --force to replace it"
                if isinstance(exc, FileExistsError)
                else f"cannot publish: {exc.strerror or exc}"
            )
            self.discard()
            raise OutputError(f"{self.target}: {reason}") from None

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


def stage(
    gm: torch.nn.Module,
    example: torch.Tensor,
    native: tuple[int, ...],
    target: Path,
    kind: str,
    metadata: dict[str, Any],
) -> Staged:
    """Export ``gm`` (dynamic batch and spatial sizes, each at least ``native``) to a temp file."""
    # The suffix stays last: torch.export.load wants a name ending in .pt2.
    temp = target.parent / f".{target.stem}.{secrets.token_hex(4)}.tmp{target.suffix}"
    staged = Staged(temp, target, kind, [])
    try:
        temp.touch(exist_ok=False)  # claims the name; the exporter then writes it in place
        (_pt2 if kind == "pt2" else _onnx)(gm, example, native, metadata, staged.notes, temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        staged.nbytes = temp.stat().st_size
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    except Exception as exc:  # the exporter refused the dense graph: say which and why
        staged.discard()
        exporter = "torch.export" if kind == "pt2" else "torch.onnx.export"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{exporter} cannot export the dense model: {text[:300]}") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def _pt2(gm, example, native, metadata, notes, temp: Path) -> None:
    """torch.export with ``Dim``s; size-oblivious shapes where a 1-sized map would specialize."""
    import torch
    from torch.export import Dim

    names = _SPATIAL_NAMES[len(native)]
    dims = {0: Dim("batch")}
    dims |= {2 + i: Dim(n, min=size) for i, (n, size) in enumerate(zip(names, native, strict=True))}
    shapes = {_input_name(gm): dims}
    try:
        program = torch.export.export(gm, (example,), dynamic_shapes=shapes)
    except Exception as first:
        # A score map of size 1 at the native size makes torch specialize ("!= 1" guards,
        # or sympy failures). Size-oblivious reasoning is torch's option for exactly this.
        from torch.fx.experimental import _config

        try:
            with _config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
                program = torch.export.export(gm, (example,), dynamic_shapes=shapes)
        except Exception:
            raise first from None
        notes.append(
            "torch.export needed size-oblivious shapes (backed_size_oblivious): the score map "
            "is 1 wide at the native size"
        )
    torch.export.save(program, str(temp), extra_files={_PT2_EXTRA: json.dumps(metadata)})


def _input_name(gm: Any) -> str:
    return next(n.name for n in gm.graph.nodes if n.op == "placeholder")


def _onnx(gm, example, native, metadata, notes, temp: Path) -> None:
    """The TorchScript-based exporter (no onnxscript needed), with dynamic axes."""
    import onnx
    import torch

    names = _SPATIAL_NAMES[len(native)]
    with torch.no_grad():
        outputs = gm(example)
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = ["scores"] if count == 1 else [f"scores_{i}" for i in range(count)]
    axes = {0: "batch", **{2 + i: n for i, n in enumerate(names)}}
    out_axes = {0: "batch", **{2 + i: f"score_{n}" for i, n in enumerate(names)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            gm,
            (example,),
            str(temp),
            dynamo=False,
            input_names=["input"],
            output_names=output_names,
            dynamic_axes={"input": axes, **{o: out_axes for o in output_names}},
            opset_version=17,
        )
    model = onnx.load(str(temp))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, str(temp))


def load_exported(path: Path) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], dict]:
    """Reload an exported file without fc2conv's model code: a runner and the metadata."""
    kind = FORMATS.get(path.suffix.lower())
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if kind is None:
        raise InputError(f"{path}: expected a .pt2 or .onnx file written by fc2conv export")
    return (_load_pt2 if kind == "pt2" else _load_onnx)(path)


def load_staged(staged: Staged) -> tuple[Callable, dict]:
    """Reload the staged file with the loader of its format."""
    return (_load_pt2 if staged.kind == "pt2" else _load_onnx)(staged.temp)


def _load_pt2(path: Path):
    import torch

    extra = {_PT2_EXTRA: ""}
    program = torch.export.load(str(path), extra_files=extra)
    module = program.module()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        from fc2conv_cli.export.prove import leaves

        with torch.no_grad():
            return leaves(module(x))

    return run, json.loads(extra[_PT2_EXTRA] or "{}")


def _load_onnx(path: Path):
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = session.run(None, {name: x.detach().numpy()})
        return [torch.from_numpy(o) for o in outputs]

    return run, json.loads(meta)


def onnx_ops(path: Path) -> list[str]:
    """The operator types of an ONNX file's graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node})
