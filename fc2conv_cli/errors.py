"""Every error fc2conv raises on purpose, each with its exit code and a stable code for JSON.

Library modules raise these; only ``cli`` catches them and turns them into exit codes.
Anything else that escapes is a bug and exits with ``EXIT_INTERNAL_ERROR``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_INPUT_ERROR",
    "EXIT_INTERNAL_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "CheckFailed",
    "CheckpointError",
    "Fc2convError",
    "InputError",
    "InternalError",
    "ManifestError",
    "MapError",
    "OutputError",
    "PlanError",
    "shown",
]

EXIT_OK = 0  # written, and every check passed
EXIT_CHECK_FAILED = 1  # a check failed: nothing was published
EXIT_INPUT_ERROR = 2  # bad input or usage: nothing was written
EXIT_INTERNAL_ERROR = 3  # a bug in fc2conv: a traceback is shown
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: nothing was published


def shown(name: str) -> str:
    """A user-supplied name as it may appear in a one-line message: quoted if it is not
    plainly printable (a newline in a tensor name must not split an error line)."""
    return name if name.isprintable() else repr(name)


class Fc2convError(Exception):
    """Base class. ``problems`` are shown one line each; ``message`` joins them."""

    exit_code = EXIT_INTERNAL_ERROR
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.problems = [message]


class InputError(Fc2convError):
    """The user's input or usage is wrong; exit code 2."""

    exit_code = EXIT_INPUT_ERROR
    code = "input_error"


class MapError(InputError):
    """The YAML layer map is invalid. ``problems`` lists every one found, one line each."""

    code = "map_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class ManifestError(InputError):
    """The batch manifest (or the list of inputs) is invalid; every problem, one line each."""

    code = "manifest_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class CheckpointError(InputError):
    """The checkpoint cannot be read: missing, corrupt, unsupported or unsafe."""

    code = "checkpoint_error"


class PlanError(InputError):
    """The map does not fit the checkpoint (missing tensor, wrong shape, name clash)."""

    code = "plan_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class OutputError(InputError):
    """The output cannot be written where asked (exists, same as input, folder, disk)."""

    code = "output_error"


class InternalError(Fc2convError):
    """fc2conv caught itself about to do something wrong (a bug); exit code 3.

    Raised where a self-check fails, e.g. a staged file that the ``safetensors`` library
    refuses or reads differently from the plan; nothing was published.
    """

    exit_code = EXIT_INTERNAL_ERROR
    code = "internal_error"


class CheckFailed(Fc2convError):
    """A converted layer or a copied tensor differs from its source; nothing was published.

    ``result`` carries the full report so the caller can still show which layer failed.
    """

    exit_code = EXIT_CHECK_FAILED
    code = "check_failed"

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result
