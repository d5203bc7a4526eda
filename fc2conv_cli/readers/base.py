"""What every reader returns: tensor names, dtypes and shapes first, bytes on demand.

A reader turns one file format into a ``Loaded``; ``readers.open_checkpoint`` turns that
into the ``Checkpoint`` the pipeline uses (prefixes stripped, notes joined). Dtypes are
safetensors' codes, the output format's own vocabulary.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DTYPE_BITS",
    "FLOAT_DTYPES",
    "Checkpoint",
    "LazyBuffers",
    "Loaded",
    "TensorInfo",
    "array_dtype_code",
    "import_extra",
    "loaded_from_arrays",
    "numpy_dtype",
    "tensor_nbytes",
]

# Every dtype safetensors defines, with its size in bits (F4 and F6 are packed).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
# Floating dtypes numpy (with ml_dtypes) can compute in: an FC weight may be converted.
FLOAT_DTYPES = (
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64",
)  # fmt: skip
_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip
_NUMPY_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
    "U64": "uint64", "F64": "float64", "C64": "complex64",
}  # fmt: skip


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` takes; raises ``ValueError`` if not whole."""
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} {list(shape)} is not a whole number of bytes")
    return bits // 8


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype for a safetensors code; ``ValueError`` for packed F4 / F6."""
    # numpy is imported only where arrays are needed: a plain copy never needs it.
    import numpy as np

    if code in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
    if code not in _NUMPY_DTYPES:
        raise ValueError(f"{code} is a packed dtype numpy cannot hold element by element")
    return np.dtype(_NUMPY_DTYPES[code])


def array_dtype_code(dtype: np.dtype) -> str | None:
    """The safetensors code of a numpy dtype, or None if safetensors has no such dtype."""
    for code in (*_NUMPY_DTYPES, *_ML_DTYPES):
        if numpy_dtype(code) == dtype:
            return code
    return None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name (after prefix stripping), safetensors dtype code and shape.

    ``weight_format`` is how the source format stores this tensor if it is an FC weight
    (ONNX knows it per Gemm node), or None where only the format's default applies.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    weight_format: WeightFormat | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class LazyBuffers(Mapping[str, memoryview]):
    """Tensor bytes loaded on first use by one callable per name, then kept."""

    def __init__(self, loaders: Mapping[str, Callable[[], memoryview]]) -> None:
        self._loaders = dict(loaders)
        self._loaded: dict[str, memoryview] = {}

    def __getitem__(self, name: str) -> memoryview:
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def clear(self) -> None:
        self._loaded.clear()


@dataclass
class Loaded:
    """What a reader found: ``tensors`` in source order, their bytes, and what it did.

    ``buffers`` give each tensor's bytes row-major (C order) as unsigned-byte
    memoryviews. ``weight_format`` is the format's stored FC weight format (Keras
    ``in_out``), used where a map does not say. ``graph`` is the model's graph or config
    where the file has one, for ``suggest``.
    """

    format: str
    tensors: dict[str, TensorInfo]
    buffers: Mapping[str, memoryview]
    notes: tuple[str, ...] = ()
    close: Callable[[], None] = lambda: None
    weight_format: WeightFormat = WeightFormat.OUT_IN
    graph: Any = None
    # Where a tensor's bytes lie as they are in the file (an open descriptor, kept until
    # ``close``, and each such tensor's byte offset), so a byte copy can stay in the kernel.
    file_fd: int | None = None
    file_offsets: Mapping[str, int] = field(default_factory=dict)


def loaded_from_arrays(
    path: Path,
    format: str,
    arrays: Mapping[str, np.ndarray],
    notes: tuple[str, ...] = (),
    weight_format: WeightFormat = WeightFormat.OUT_IN,
    weight_formats: Mapping[str, WeightFormat] | None = None,
    graph: Any = None,
) -> Loaded:
    """A ``Loaded`` over in-memory numpy arrays (for formats decoded by a library).

    Raises ``CheckpointError`` for an array safetensors cannot store.
    """
    import numpy as np

    tensors: dict[str, TensorInfo] = {}
    buffers: dict[str, memoryview] = {}
    hints = weight_formats or {}
    for name, array in arrays.items():
        code = array_dtype_code(array.dtype)
        if code is None:
            raise CheckpointError(
                f"{path}: tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors"
            )
        data = np.ascontiguousarray(array)
        tensors[name] = TensorInfo(name, code, tuple(data.shape), hints.get(name))
        buffers[name] = memoryview(data.reshape(-1).view(np.uint8))
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the {format} file")
    return Loaded(format, tensors, buffers, notes, buffers.clear, weight_format, graph)


def import_extra(module: str, path: Path, extra: str) -> Any:
    """Import a format's optional library, or raise the one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise CheckpointError(
            f"reading {path.suffix or path.name} needs {top}: pip install 'fc2conv[{extra}]'"
        ) from None


class Checkpoint:
    """An opened checkpoint: ``tensors`` (name -> TensorInfo, in source order) and bytes.

    ``kind`` names the format; ``notes`` say what was unwrapped, stripped or left out on
    the way; ``graph`` is the format's graph or config, if it has one. Use as a context
    manager, or call ``close``.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        tensors: dict[str, TensorInfo],
        buffers: Mapping[str, memoryview],
        notes: tuple[str, ...],
        closer: Callable[[], None] = lambda: None,
        weight_format: WeightFormat = WeightFormat.OUT_IN,
        graph: Any = None,
        file_fd: int | None = None,
        file_offsets: Mapping[str, int] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.tensors = tensors
        self.notes = notes
        self.weight_format = weight_format
        self.graph = graph
        self._buffers = buffers
        self._closer = closer
        self._file_fd = file_fd
        self._file_offsets = file_offsets or {}

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, row-major, as a zero-copy unsigned-byte memoryview."""
        return self._buffers[name]

    def file_span(self, name: str) -> tuple[int, int] | None:
        """(open descriptor, byte offset) of the tensor's bytes as stored in the file, or
        None where they are not stored as ``raw`` gives them (decoded, or in memory)."""
        offset = self._file_offsets.get(name)
        return None if offset is None or self._file_fd is None else (self._file_fd, offset)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array of its own dtype and shape (no copy)."""
        import numpy as np

        info = self.tensors[name]
        return np.frombuffer(self.raw(name), dtype=numpy_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        self._buffers = {}
        self._closer()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
