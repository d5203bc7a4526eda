"""fc2conv: turn the fully-connected head of a CNN checkpoint into convolution weights.

The Python API (see ``fc2conv_cli.api`` and the README's "Python API")::

    import fc2conv_cli as fc2conv

    result = fc2conv.convert("vgg16.pth", "vgg16", "out/")
    converted = fc2conv.convert_state_dict(model.state_dict(), "vgg16")

Its names are imported on first use, so ``import fc2conv_cli`` stays light (no numpy,
no torch, no YAML parser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from fc2conv_cli.api import (
        DEFAULT_ATOL,
        CheckFailed,
        CheckpointError,
        ConvertResult,
        Fc2convError,
        InputError,
        InspectResult,
        LayerMap,
        MapError,
        OutputError,
        PlanError,
        SuggestedMap,
        convert,
        convert_state_dict,
        error_json,
        inspect,
        output_path,
        suggest_map,
        verify,
    )

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
    "OutputError",
    "PlanError",
    "SuggestedMap",
    "__version__",
    "convert",
    "convert_state_dict",
    "error_json",
    "inspect",
    "output_path",
    "suggest_map",
    "verify",
]
# Every name but __version__ comes from ``fc2conv_cli.api``.
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    """Import the API on first use of one of its names (PEP 562)."""
    if name in _API:
        from fc2conv_cli import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
