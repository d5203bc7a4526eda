"""The user's model: imported from its factory, with the checkpoint loaded strictly.

This runs the user's own code, on purpose: ``export`` needs the model's graph. The
checkpoint itself is still read as data only, by ``readers``, unwrapped as ``convert``
unwraps it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fc2conv_cli.errors import InputError
from fc2conv_cli.readers import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["ModelError", "load_factory", "load_state", "parse_model_args", "parse_shape"]


class ModelError(InputError):
    """The model cannot be built, traced or matched to the map or checkpoint (exit 2)."""

    code = "model_error"


def parse_shape(text: str, option: str) -> tuple[int, ...]:
    """``3x224x224`` -> ``(3, 224, 224)``: channels, then 1 to 3 spatial sizes."""
    parts = text.lower().replace("*", "x").split("x")
    if not 2 <= len(parts) <= 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise InputError(
            f"{option} {text!r}: expected CxHxW (e.g. 3x224x224), CxL or CxDxHxW, "
            "every size a positive integer"
        )
    return tuple(int(p) for p in parts)


def parse_model_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("num_classes=10", "pretrained=false")`` -> keyword arguments, values as YAML scalars."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. num_classes=10")
        try:
            kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            kwargs[key.strip()] = value
    return kwargs


def load_factory(spec: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Import ``MODULE:FACTORY`` (or ``path/models.py:Net``), call it, return the module in eval."""
    import torch

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ModelError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.nets:LeNet5")
    module = _import(where, spec)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"--model {spec!r}: {where} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"--model {spec!r}: {attr} is not callable")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(f"--model {spec!r}: calling {attr}() failed: {_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"--model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model.eval()


def _import(where: str, spec: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ModelError(f"--model {spec!r}: no such file {path}")
        name = f"fc2conv_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelError(f"--model {spec!r}: {path} cannot be imported as a module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelError(
                f"--model {spec!r}: importing {path} failed: {_first_line(exc)}"
            ) from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise ModelError(f"--model {spec!r}: cannot import {where}: {_first_line(exc)}") from None


def load_state(model: torch.nn.Module, checkpoint: Checkpoint, label: str) -> None:
    """Load every tensor of ``checkpoint`` into ``model``, strictly; one line on any mismatch."""
    import torch

    expected = model.state_dict()
    names = set(checkpoint.tensors)
    missing = [n for n in expected if n not in names]
    unexpected = [n for n in checkpoint.tensors if n not in expected]
    misshapen = [
        f"{n} {list(checkpoint.tensors[n].shape)} vs {list(expected[n].shape)}"
        for n in expected
        if n in names and tuple(checkpoint.tensors[n].shape) != tuple(expected[n].shape)
    ]
    problems = [
        f"{what} {_few(items)}"
        for what, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape (checkpoint vs model) of", misshapen),
        )
        if items
    ]
    if problems:
        raise ModelError(
            f"{checkpoint.path}: does not load strictly into {label}: {'; '.join(problems)}"
        )
    state = {name: _tensor(checkpoint, name, torch) for name in expected}
    model.load_state_dict(state, strict=True)


def _tensor(checkpoint: Checkpoint, name: str, torch: Any) -> torch.Tensor:
    import numpy as np

    array = checkpoint.array(name)
    try:
        return torch.from_numpy(np.array(array))
    except TypeError:  # bfloat16 / float8 from ml_dtypes: widened exactly, cast back on load
        return torch.from_numpy(array.astype(np.float64))


def _few(items: list[str], count: int = 3) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:300] if line else type(exc).__name__
