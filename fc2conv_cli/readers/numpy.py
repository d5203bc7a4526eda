"""NumPy files: ``.npz`` archives, and ``.npy`` files holding one array or one pickled dict.

- ``.npz`` (``np.savez`` / ``np.savez_compressed``): one tensor per member, named by its
  key (the member name without ``.npy``). Each member's ``.npy`` header is parsed here;
  stored members are memory-mapped at their offset inside the zip (zero copy), deflated
  ones are decompressed when first read. Members are never unpickled: an object array is
  refused.
- ``.npy`` holding one array: one tensor named after the file's stem, memory-mapped.
- ``.npy`` holding a pickled dict, as TF-era dumps were saved
  (``np.save("vgg16.npy", {"fc6": [W, b]})``, also a bare pickle of a dict, which
  ``np.load`` reads too): read by a restricted unpickler that builds numpy arrays and
  builtin containers only. Any other global is refused, naming it; nothing in the pickle
  runs. Nested dicts, lists and tuples are flattened with ``.`` (``fc6.0``,
  ``fc6.weights``); entries that are not arrays (numbers, strings) are left out, with a note.

Arrays come out row-major and little-endian: Fortran-ordered or big-endian arrays are
copied, with a note. FC weights are stored ``(in, out)``, as TF keeps them, so
``Loaded.weight_format`` and every tensor's hint are ``in_out``. ``Loaded.graph`` is None:
NumPy files hold no graph.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fc2conv_cli.errors import CheckpointError, shown
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers.base import LazyBuffers, Loaded, TensorInfo, array_dtype_code

if TYPE_CHECKING:
    import numpy as np

__all__ = ["read"]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
# A hostile pickle can nest containers deeply or share one list many times over (its
# flattened size then grows exponentially): both are bounded.
_MAX_DEPTH = 64
_MAX_ENTRIES = 1_000_000
_LISTED = 10  # names a note lists before "and N more"
# Deflate expands at most about 1032-fold: a member claiming more is corrupt or hostile, and
# its buffer is allocated before decompressing.
_MAX_DEFLATE_RATIO = 1100
_INFLATE_CHUNK = 16 << 20
# What zipfile and zlib raise on a damaged member (NotImplementedError: unknown compression).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


@dataclass(frozen=True)
class _Header:
    """A parsed ``.npy`` header: the array's dtype, shape and order, and where data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    length: int  # bytes from the start of the .npy to its data

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def read(path: Path, state_dict_key: str | None = None) -> Loaded:
    """Read an ``.npz``, an ``.npy`` array, or an ``.npy`` pickled dict, by its content.

    Raises ``CheckpointError`` (one line) for a truncated or foreign file, an object array
    outside a pickle, a dtype safetensors cannot store, or a pickle asking for anything
    but numpy arrays and builtin containers.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(len(_NPY_MAGIC))
            if head.startswith(_NPY_MAGIC):
                return _read_npy(path, file, state_dict_key)
            if head[:1] == b"\x80":
                file.seek(0)
                note = "read a bare pickle (no .npy header)"
                return _read_pickle(path, file, state_dict_key, note)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head.startswith(b"PK"):
        return _read_npz(path, state_dict_key)
    raise CheckpointError(
        f"{path}: not a NumPy file (no .npy magic, not a zip archive, not a pickle)"
    )


def _read_npy(path: Path, file: IO[bytes], state_dict_key: str | None) -> Loaded:
    """An ``.npy`` file: an object array is a pickle; anything else one mapped array."""
    file.seek(0)
    header = _parse_header(file, f"{path}: not a valid .npy file")
    if header.dtype.hasobject:
        note = "read a pickled .npy (restricted unpickler: numpy arrays and containers only)"
        return _read_pickle(path, file, state_dict_key, note)
    _refuse_state_dict_key(path, state_dict_key, "an .npy array file")
    name = path.stem
    code = _dtype_code(path, name, header.dtype)
    size = os.fstat(file.fileno()).st_size
    _check_data_size(size - header.length, header, f"{path}: not a valid .npy file")
    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    data = view[header.length : header.length + header.nbytes]
    notes: tuple[str, ...] = (f"a single array, named {name!r} after the file",)
    notes += _order_notes(
        [name] if header.fortran else [], [name] if _big_endian(header.dtype) else []
    )
    buffers = LazyBuffers({name: lambda: _c_order(data, header)})
    tensors = {name: TensorInfo(name, code, header.shape)}
    unmap = _unmapper([data], view, mapped)

    def close() -> None:
        buffers.clear()
        unmap()

    return _loaded(path, tensors, buffers, notes, close)


def _read_npz(path: Path, state_dict_key: str | None) -> Loaded:
    """An ``.npz``: headers parsed now, stored data mapped, deflated data inflated on use."""
    _refuse_state_dict_key(path, state_dict_key, "an .npz archive")
    bad = f"{path}: not a valid .npz archive (truncated or corrupt?)"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{bad}: {_reason(exc)}") from None
    try:
        return _index_npz(path, archive, bad)
    except BaseException:
        archive.close()
        raise


def _index_npz(path: Path, archive: zipfile.ZipFile, bad: str) -> Loaded:
    members = [i for i in archive.infolist() if not i.is_dir()]
    arrays = [i for i in members if i.filename.endswith(".npy")]
    if not arrays:
        raise CheckpointError(f"{path}: not a NumPy .npz archive: it has no .npy members")
    stored = [i for i in arrays if i.compress_type == zipfile.ZIP_STORED]
    mapped = _map_file(path) if stored else None
    view = memoryview(mapped) if mapped is not None else None
    slices: list[memoryview] = []
    unmap = _unmapper(slices, view, mapped)
    try:
        tensors, loaders, fortran, swapped = _index_members(path, archive, arrays, view, slices)
    except BaseException:
        unmap()
        raise
    notes = _npz_notes(members, arrays, stored) + _order_notes(fortran, swapped)
    buffers = LazyBuffers(loaders)

    def close() -> None:
        buffers.clear()
        unmap()
        archive.close()

    return _loaded(path, tensors, buffers, notes, close)


def _index_members(
    path: Path,
    archive: zipfile.ZipFile,
    arrays: list[zipfile.ZipInfo],
    view: memoryview | None,
    slices: list[memoryview],
) -> tuple[dict[str, TensorInfo], dict[str, Callable[[], memoryview]], list[str], list[str]]:
    """Each member's tensor info and loader; the mapped slices handed out go in ``slices``."""
    tensors: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], memoryview]] = {}
    fortran, swapped = [], []
    size = len(view) if view is not None else 0
    for info in arrays:
        name = info.filename.removesuffix(".npy")
        where = f"{path}: member {info.filename!r}"
        if name in tensors:
            raise CheckpointError(f"{where}: two members have this name")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{where}: is encrypted")
        header = _member_header(archive, info, where)
        tensors[name] = TensorInfo(name, _dtype_code(path, name, header.dtype), header.shape)
        _check_data_size(info.file_size - header.length, header, where)
        if view is not None and info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(f"{where}: stored sizes disagree (corrupt archive)")
            start = _member_data_offset(view, info, where) + header.length
            if start + header.nbytes > size:
                raise CheckpointError(f"{where}: data runs past the end of the file (truncated)")
            data = view[start : start + header.nbytes]
            slices.append(data)
            loaders[name] = _mapped_loader(data, header)
        else:
            if (
                info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1)
            ):
                raise CheckpointError(
                    f"{where}: claims {info.file_size} bytes from {info.compress_size} "
                    "compressed, more than deflate can give (corrupt archive)"
                )
            loaders[name] = _inflating_loader(archive, info, header, where)
        fortran += [name] if header.fortran else []
        swapped += [name] if _big_endian(header.dtype) else []
    return tensors, loaders, fortran, swapped


def _npz_notes(
    members: list[zipfile.ZipInfo], arrays: list[zipfile.ZipInfo], stored: list[zipfile.ZipInfo]
) -> tuple[str, ...]:
    notes = []
    if len(stored) < len(arrays):
        notes.append(
            f"{len(arrays) - len(stored)} of {len(arrays)} .npz members are compressed: "
            "decompressed when first read"
        )
    others = [m.filename for m in members if m not in arrays]
    if others:
        what = _count(others, "non-.npy member", "non-.npy members")
        notes.append(f"left out {what}: {_listed(others)}")
    return tuple(notes)


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> _Header:
    """Parse a member's ``.npy`` header, decompressing only its first bytes."""
    try:
        with archive.open(info) as member:
            return _parse_header(member, f"{where}: not a valid .npy array")
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"{where}: cannot be read (truncated or corrupt?): {_reason(exc)}"
        ) from None


def _member_data_offset(view: memoryview, info: zipfile.ZipInfo, where: str) -> int:
    """Where a stored member's bytes start in the file: after its local header, whose
    name and extra fields may differ in length from the central directory's."""
    start = info.header_offset
    local = bytes(view[start : start + _ZIP_LOCAL_HEADER.size])
    if len(local) < _ZIP_LOCAL_HEADER.size or not local.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{where}: bad local file header (corrupt archive)")
    _, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(local)
    return start + _ZIP_LOCAL_HEADER.size + name_length + extra_length


def _mapped_loader(data: memoryview, header: _Header) -> Callable[[], memoryview]:
    return lambda: _c_order(data, header)


def _inflating_loader(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: _Header, where: str
) -> Callable[[], memoryview]:
    """Decompress a member's data into one buffer; reading to its end checks its CRC."""

    def load() -> memoryview:
        buffer = bytearray(header.nbytes)
        view, got = memoryview(buffer), 0
        try:
            with archive.open(info) as member:
                member.read(header.length)
                # Bounded reads: zipfile builds each read's result as a new bytes object.
                while chunk := member.read(min(_INFLATE_CHUNK, header.nbytes - got)):
                    view[got : got + len(chunk)] = chunk
                    got += len(chunk)
                trailing = member.read(1)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(
                f"{where}: cannot be decompressed (truncated or corrupt?): {_reason(exc)}"
            ) from None
        if got != header.nbytes or trailing:
            raise CheckpointError(f"{where}: decompressed data does not match its header")
        return _c_order(view, header)

    return load


def _parse_header(file: IO[bytes], bad: str) -> _Header:
    """Read the ``.npy`` magic and header with numpy's own parser (no pickle, no eval)."""
    import numpy as np

    fmt = np.lib.format
    try:
        version = fmt.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(file)
        else:
            # 3.0 only differs by UTF-8 field names, i.e. structured dtypes: refused anyway.
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        length = file.tell()
    except (ValueError, TypeError, SyntaxError) as exc:
        raise CheckpointError(f"{bad}: {_reason(exc)}") from None
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r} is not a tuple of sizes")
    return _Header(dtype, tuple(shape), bool(fortran), length)


def _check_data_size(held: int, header: _Header, where: str) -> None:
    """Refuse data that is shorter (truncated) or longer than the header says."""
    if held != header.nbytes:
        state = "truncated" if held < header.nbytes else "trailing bytes"
        raise CheckpointError(
            f"{where}: {header.dtype} {list(header.shape)} needs {header.nbytes} data bytes, "
            f"the file holds {max(held, 0)} ({state})"
        )


def _dtype_code(path: Path, name: str, dtype: np.dtype) -> str:
    """The safetensors code for a (possibly big-endian) dtype, or a one-line refusal."""
    what = f"{path}: array {name!r}"
    if dtype.hasobject:
        raise CheckpointError(
            f"{what} is an object array (Python objects); .npz members are never unpickled: "
            "save plain numeric arrays"
        )
    if dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{what}: structured dtype {dtype} cannot be stored in safetensors")
    code = array_dtype_code(dtype.newbyteorder("<"))
    if code is None:
        raise CheckpointError(f"{what}: dtype {dtype} cannot be stored in safetensors")
    return code


def _c_order(data: memoryview, header: _Header) -> memoryview:
    """The array's bytes row-major and little-endian: ``data`` itself where they are."""
    import numpy as np

    if not header.fortran and not _big_endian(header.dtype):
        return data
    array = np.frombuffer(data, dtype=header.dtype).reshape(
        header.shape, order="F" if header.fortran else "C"
    )
    fixed = np.ascontiguousarray(array, dtype=header.dtype.newbyteorder("<"))
    return memoryview(fixed.reshape(-1).view(np.uint8))


# --- pickles ------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, numpy scalars and builtin containers; refuses every other global.

    ``np.save`` of a dict pickles a 0-d object array; its globals are numpy's array
    rebuilders (``numpy.core`` in numpy 1.x, ``numpy._core`` in 2.x), ``numpy.ndarray`` and
    ``numpy.dtype``, plus ``_codecs.encode`` for bytes at protocol 2, ``_frombuffer`` at
    protocol 5, and ``__builtin__`` names in Python 2 pickles.
    """

    def __init__(self, file: IO[bytes], path: Path) -> None:
        # latin1 reads Python 2 str data (the array bytes of old dumps) byte for byte.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise CheckpointError(
                f"{self._path}: refused: the pickle asks for {shown(module)}.{shown(name)}; only "
                "numpy arrays and builtin containers are read (re-save with np.savez)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._path}: refused: the pickle asks for a persistent id")


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` in a pickle: a rebuild argument that cannot be called
    (a bare ``ndarray(shape)`` call could allocate any size)."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals an array pickle needs, each resolved here (nothing is imported by name)."""
    import collections

    import numpy as np

    # numpy's own rebuild functions, found from what its objects reduce to, under every
    # module path numpy 1.x and 2.x write.
    reconstruct: Any = np.zeros(1).__reduce__()[0]
    scalar: Any = np.float32(0).__reduce__()[0]
    frombuffer: Any = np.zeros(1).__reduce_ex__(5)[0]

    def rebuild(subtype: Any, shape: Any, dtype_char: Any) -> Any:
        if subtype is not _NdarrayType:
            raise TypeError("_reconstruct builds numpy.ndarray only")
        return reconstruct(np.ndarray, (0,), dtype_char)  # __setstate__ sets shape and data

    def latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise TypeError("_codecs.encode is allowed for latin1 bytes only")
        return text.encode("latin-1")

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): latin1,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = rebuild
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for builtins in ("builtins", "__builtin__"):
        for container in (set, frozenset, bytearray):
            allowed[(builtins, container.__name__)] = container
    return allowed


def _read_pickle(path: Path, file: IO[bytes], state_dict_key: str | None, note: str) -> Loaded:
    """Unpickle (restricted) a dict of arrays; flatten it to ``.``-joined names."""
    import numpy as np

    try:
        obj = _RestrictedUnpickler(file, path).load()
    except CheckpointError:
        raise
    # A corrupt pickle raises whatever its opcodes lead to (UnpicklingError, EOFError,
    # TypeError from a rebuild, ValueError from __setstate__, ...): each means unreadable.
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable pickle (truncated or corrupt?): {_reason(exc)}"
        ) from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()  # np.save wraps the dict in a 0-d object array
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: the pickle holds {_kind(obj)}, expected a dict of layer name -> arrays"
        )
    notes = [note]
    if state_dict_key is not None:
        if not isinstance(obj.get(state_dict_key), dict):
            keys = ", ".join(map(str, list(obj)[:_LISTED])) or "none"
            raise CheckpointError(
                f"{path}: state_dict_key {state_dict_key!r} is not a dict in this pickle; "
                f"top-level keys: {keys}"
            )
        obj = obj[state_dict_key]
        notes.append(f"took the nested dict under {state_dict_key!r}")
    arrays, left_out = _flatten(path, obj)
    tensors: dict[str, TensorInfo] = {}
    buffers: dict[str, memoryview] = {}
    fortran, swapped = [], []
    for name, array in arrays.items():
        code = _dtype_code(path, name, array.dtype)
        fortran += [] if array.flags.c_contiguous else [name]
        swapped += [name] if _big_endian(array.dtype) else []
        # astype, not ascontiguousarray: that one makes a 0-d scalar 1-D.
        data = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
        tensors[name] = TensorInfo(name, code, tuple(data.shape))
        buffers[name] = memoryview(data.reshape(-1).view(np.uint8))
    if left_out:
        what = _count(left_out, "non-array entry", "non-array entries")
        notes.append(f"left out {what}: {_listed(left_out)}")
    notes += _order_notes(fortran, swapped)
    return _loaded(path, tensors, buffers, tuple(notes), buffers.clear)


def _flatten(path: Path, root: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """Arrays under ``.``-joined keys and list indices, in order; names of other leaves."""
    import numpy as np

    arrays: dict[str, np.ndarray] = {}
    left_out: list[str] = []
    open_ids: set[int] = set()
    visits = 0

    def visit(name: str, value: Any, depth: int) -> None:
        nonlocal visits
        visits += 1
        if visits > _MAX_ENTRIES or depth > _MAX_DEPTH:
            limit = f"more than {_MAX_ENTRIES} entries" if visits > _MAX_ENTRIES else "too deep"
            raise CheckpointError(f"{path}: the pickled dict is {limit} (at {name!r})")
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            if value.ndim > 1:
                raise CheckpointError(
                    f"{path}: entry {name!r} is a {value.ndim}-D object array; "
                    "expected arrays, lists or dicts"
                )
            value = value.item() if value.ndim == 0 else value.tolist()
        if isinstance(value, (np.ndarray, np.number, np.bool_)):
            if name in arrays:
                raise CheckpointError(
                    f"{path}: two entries are both named {name!r} once nested keys "
                    "are joined with '.'"
                )
            arrays[name] = np.asarray(value)
            return
        if isinstance(value, dict):
            children = [(_key(path, name, k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(str(i), v) for i, v in enumerate(value)]
        else:
            left_out.append(name)
            return
        if id(value) in open_ids:
            raise CheckpointError(f"{path}: entry {name!r} refers back to a container above it")
        open_ids.add(id(value))
        for key, child in children:
            visit(f"{name}.{key}" if name else key, child, depth + 1)
        open_ids.discard(id(value))

    visit("", root, 0)
    return arrays, left_out


def _key(path: Path, parent: str, key: Any) -> str:
    if type(key) not in (str, int):
        where = f" under {parent!r}" if parent else ""
        raise CheckpointError(
            f"{path}: key {key!r}{where} is a {type(key).__name__}; names must be strings"
        )
    return str(key)


# --- shared helpers -----------------------------------------------------------------------


def _loaded(
    path: Path,
    tensors: dict[str, TensorInfo],
    buffers: Any,
    notes: tuple[str, ...],
    close: Callable[[], None],
) -> Loaded:
    """The ``Loaded``, every tensor hinted ``in_out``: any FC weight in a NumPy dump is
    stored as TF kept it, so the hint holds per tensor as well as for the file."""
    if not tensors:
        close()
        raise CheckpointError(f"{path}: no arrays found in the NumPy file")
    hinted = {n: replace(info, weight_format=WeightFormat.IN_OUT) for n, info in tensors.items()}
    return Loaded("numpy", hinted, buffers, notes, close, WeightFormat.IN_OUT)


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def _unmapper(
    slices: list[memoryview], view: memoryview | None, mapped: mmap.mmap | None
) -> Callable[[], None]:
    """Release the slices handed out, then the map (kept if an array still views it)."""

    def close() -> None:
        for part in [*slices, *([view] if view is not None else [])]:
            part.release()
        if mapped is not None:
            # An array may still view the map; it is then unmapped when that array is freed.
            with contextlib.suppress(BufferError):
                mapped.close()

    return close


def _refuse_state_dict_key(path: Path, state_dict_key: str | None, what: str) -> None:
    if state_dict_key is not None:
        raise CheckpointError(
            f"{path}: state_dict_key {state_dict_key!r} picks a nested dict, but {what} "
            "holds flat arrays; remove it from the map"
        )


def _order_notes(fortran: list[str], swapped: list[str]) -> tuple[str, ...]:
    notes = []
    if fortran:
        notes.append(
            f"copied {_count(fortran)} stored column-major (Fortran order) to row-major: "
            f"{_listed(fortran)}"
        )
    if swapped:
        notes.append(
            f"copied {_count(swapped)} stored big-endian to little-endian: {_listed(swapped)}"
        )
    return tuple(notes)


def _count(names: list[str], one: str = "array", many: str = "arrays") -> str:
    return f"{len(names)} {one if len(names) == 1 else many}"


def _big_endian(dtype: np.dtype) -> bool:
    return dtype != dtype.newbyteorder("<")


def _listed(names: list[str]) -> str:
    shown_names = ", ".join(shown(n) for n in names[:_LISTED])
    return shown_names + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _kind(obj: Any) -> str:
    import numpy as np

    if isinstance(obj, np.ndarray):
        return f"a {obj.ndim}-D {obj.dtype} array"
    return f"a {type(obj).__name__}"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:200]
