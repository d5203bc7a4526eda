"""Which reader opens a file: its content first (magic bytes, zip members), its suffix second."""

from __future__ import annotations

import zipfile
from pathlib import Path

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.readers.safetensors import MAX_HEADER_BYTES

__all__ = ["FORMATS", "SUFFIXES", "detect_format", "sniff"]

FORMATS = ("safetensors", "torch", "keras", "onnx", "caffe", "tfjs", "numpy")
# Suffixes, longest first, and the format each names.
SUFFIXES = (
    (".safetensors", "safetensors"),
    (".pth.tar", "torch"), (".pt", "torch"), (".pth", "torch"), (".bin", "torch"),
    (".ckpt", "torch"), (".tar", "torch"),
    (".keras", "keras"), (".h5", "keras"), (".hdf5", "keras"),
    (".onnx", "onnx"),
    (".caffemodel", "caffe"),
    (".json", "tfjs"),
    (".npz", "numpy"), (".npy", "numpy"),
)  # fmt: skip
_HDF5 = b"\x89HDF\r\n\x1a\n"
_SNIFF_BYTES = 512
# torch.save's legacy format pickles this number (0x1950a86a20f9469cfc6c) first.
_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def detect_format(path: Path, asked: str | None = None) -> str:
    """The format to read ``path`` as; ``asked`` is ``--format``, which wins over the suffix.

    Raises ``CheckpointError`` when the content and the suffix (or ``asked``) disagree, or
    when neither says what the file is.
    """
    found = sniff(path)
    by_suffix = suffix_format(path)
    if asked is not None:
        if asked not in FORMATS:
            raise CheckpointError(f"unknown format {asked!r}; expected one of {', '.join(FORMATS)}")
        if found is not None and found[0] != asked:
            raise CheckpointError(
                f"{path}: --format {asked}, but the content is {found[1]} ({found[0]})"
            )
        return asked
    if found is not None:
        if by_suffix is not None and by_suffix != found[0]:
            raise CheckpointError(
                f"{path}: the suffix says {by_suffix}, but the content is {found[1]} "
                f"({found[0]}); rename the file or pass --format {found[0]}"
            )
        return found[0]
    if by_suffix is not None:
        return by_suffix
    known = ", ".join(suffix for suffix, _ in SUFFIXES)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (suffix {path.suffix or 'none'!r}, content not "
        f"recognised); expected {known}, or pass --format"
    )


def suffix_format(path: Path) -> str | None:
    """The format the file name's suffix names, if any."""
    name = path.name.lower()
    return next((fmt for suffix, fmt in SUFFIXES if name.endswith(suffix)), None)


def sniff(path: Path) -> tuple[str, str] | None:
    """(format, what was seen) from the file's first bytes, or None if they do not tell.

    ONNX and Caffe files are bare protocol buffers with no magic: only their suffix (or
    ``--format``) names them.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError:
        return None  # the reader reports an unreadable file in its own words
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES:
        return "safetensors", "a safetensors file"
    if head.startswith(_HDF5):
        return "keras", "an HDF5 file"
    if head.startswith(b"\x93NUMPY"):
        return "numpy", "a .npy array file"
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # np.load reads a bare pickle too; legacy torch.save opens with its magic number.
        if suffix_format(path) == "numpy" and _TORCH_MAGIC not in head[:32]:
            return "numpy", "a pickle"
        return "torch", "a pickle (legacy torch.save)"
    if head[257:262] == b"ustar":
        return "torch", "a tar archive (legacy torch.save)"
    # A JSON object opens with a key or closes at once; a protobuf (a caffemodel whose name
    # is 123 bytes long: "\n{...") may also open with whitespace and "{".
    if head.lstrip()[:1] == b"{" and head.lstrip()[1:].lstrip()[:1] in (b'"', b"}"):
        return "tfjs", "a JSON document"
    return None


def _sniff_zip(path: Path) -> tuple[str, str] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None  # truncated: the suffix's reader says so
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "keras", "a Keras v3 zip archive"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch", "a torch zip archive"
    if names and all(n.endswith(".npy") for n in names):
        return "numpy", "a NumPy .npz archive"
    return None
