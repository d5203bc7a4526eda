"""The NumPy reader: .npz archives, .npy arrays and .npy pickled dicts (TF-era dumps).

Every file is written by numpy itself (np.savez, np.savez_compressed, np.save), or by
pickle where a dump's exact bytes matter (protocols, Python 2 / numpy 1.x module paths).
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.layout import WeightFormat
from fc2conv_cli.readers import numpy as numpy_reader
from fc2conv_cli.readers import open_checkpoint

RNG = np.random.default_rng(10)


def arrays() -> dict[str, np.ndarray]:
    """One array of each kind a dump holds: float32 FC and conv weights, other dtypes."""
    return {
        "fc6_W": RNG.standard_normal((12, 5)).astype(np.float32),
        "fc6_b": RNG.standard_normal(5).astype(np.float32),
        "conv1": RNG.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "half": RNG.standard_normal((2, 3)).astype(np.float16),
        "f64": RNG.standard_normal(7),
        "steps": np.arange(4, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "pixels": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "spectrum": (RNG.standard_normal(3) + 1j * RNG.standard_normal(3)).astype(np.complex64),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def index(ckpt) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (info.dtype, info.shape) for name, info in ckpt.tensors.items()}


def assert_same_arrays(ckpt, expected: dict[str, np.ndarray]) -> None:
    assert list(ckpt.tensors) == list(expected)
    for name, array in expected.items():
        got = ckpt.array(name)
        assert got.dtype == array.dtype.newbyteorder("<"), name
        assert got.shape == array.shape, name
        np.testing.assert_array_equal(got, array, err_msg=name)
        assert bytes(ckpt.raw(name)) == np.ascontiguousarray(array).astype(got.dtype).tobytes()


# --- .npz -------------------------------------------------------------------------------


def test_npz_stored_members_are_mapped_in_place(tmp_path):
    expected = arrays()
    np.savez(tmp_path / "w.npz", **expected)
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert ckpt.kind == "numpy"
        assert ckpt.weight_format is WeightFormat.IN_OUT
        assert index(ckpt)["fc6_W"] == ("F32", (12, 5))
        assert index(ckpt)["spectrum"] == ("C64", (3,))
        assert index(ckpt)["scalar"] == ("F32", ())
        assert_same_arrays(ckpt, expected)
        # Zero copy: the bytes are a slice of the file's memory map, at the member's data.
        raw = ckpt.raw("fc6_W")
        assert isinstance(raw.obj, mmap.mmap)
        data = (tmp_path / "w.npz").read_bytes()
        assert data.find(expected["fc6_W"].tobytes()) >= 0
        assert not ckpt.array("conv1").flags.owndata
        assert ckpt.notes == ()


def test_npz_compressed_members_are_decompressed(tmp_path):
    expected = arrays()
    np.savez_compressed(tmp_path / "w.npz", **expected)
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert_same_arrays(ckpt, expected)
        assert ckpt.notes == (
            f"{len(expected)} of {len(expected)} .npz members are compressed: "
            "decompressed when first read",
        )


def test_npz_positional_and_nested_member_names(tmp_path):
    a, b = np.ones(2, np.float32), np.zeros(3, np.float32)
    np.savez(tmp_path / "w.npz", a, b, **{"fc6/weights": a})
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert sorted(ckpt.tensors) == ["arr_0", "arr_1", "fc6/weights"]
        assert list(ckpt.tensors) == np.load(tmp_path / "w.npz").files  # archive order


def test_compressed_members_are_only_read_when_used(tmp_path):
    """A damaged member's data fails when read (its CRC), not when the file is indexed."""
    big = RNG.standard_normal(20_000).astype(np.float32)
    np.savez_compressed(tmp_path / "w.npz", fc6=big, fc7=np.ones(3, np.float32))
    with zipfile.ZipFile(tmp_path / "w.npz") as archive:
        info = archive.getinfo("fc6.npy")
    data = bytearray((tmp_path / "w.npz").read_bytes())
    data[info.header_offset + info.compress_size * 3 // 4] ^= 0xFF  # deep in fc6's data
    (tmp_path / "w.npz").write_bytes(bytes(data))
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert index(ckpt) == {"fc6": ("F32", (20_000,)), "fc7": ("F32", (3,))}
        np.testing.assert_array_equal(ckpt.array("fc7"), np.ones(3))
        with pytest.raises(CheckpointError, match=r"member 'fc6.npy': cannot be decompressed"):
            ckpt.raw("fc6")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_fortran_and_big_endian_arrays_come_out_row_major_little_endian(tmp_path, save):
    fortran = np.asfortranarray(RNG.standard_normal((3, 4, 2)).astype(np.float32))
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    save(tmp_path / "w.npz", fortran=fortran, big=big)
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert index(ckpt) == {"fortran": ("F32", (3, 4, 2)), "big": ("I32", (2, 3))}
        assert_same_arrays(ckpt, {"fortran": fortran, "big": big})
        assert "copied 1 array stored column-major (Fortran order) to row-major: fortran" in (
            ckpt.notes
        )
        assert "copied 1 array stored big-endian to little-endian: big" in ckpt.notes


def test_npz_members_that_are_not_arrays_are_left_out(tmp_path):
    np.savez(tmp_path / "w.npz", fc6=np.ones(2, np.float32))
    with zipfile.ZipFile(tmp_path / "w.npz", "a") as archive:
        archive.writestr("README.txt", "weights of a small net")
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert list(ckpt.tensors) == ["fc6"]
        assert ckpt.notes == ("left out 1 non-.npy member: README.txt",)


def test_npz_data_offset_follows_the_local_header_not_the_directory(tmp_path):
    """A local header may carry a longer extra field than the central directory says."""
    fc6 = RNG.standard_normal((4, 3)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, fc6)
    info = zipfile.ZipInfo("fc6.npy")
    info.extra = struct.pack("<HH", 0xCAFE, 12) + b"x" * 12  # an unknown extra field
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as archive:
        archive.writestr(info, buffer.getvalue())
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        np.testing.assert_array_equal(ckpt.array("fc6"), fc6)


# --- .npy holding one array -------------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
def test_plain_npy_is_one_tensor_named_by_the_stem(tmp_path, order):
    fc6 = np.asarray(RNG.standard_normal((6, 4)).astype(np.float32), order=order)
    np.save(tmp_path / "fc6_W.npy", fc6)
    with open_checkpoint(tmp_path / "fc6_W.npy") as ckpt:
        assert index(ckpt) == {"fc6_W": ("F32", (6, 4))}
        assert_same_arrays(ckpt, {"fc6_W": fc6})
        assert ckpt.notes[0] == "a single array, named 'fc6_W' after the file"
        assert isinstance(ckpt.raw("fc6_W").obj, mmap.mmap) == (order == "C")


# --- .npy holding a pickled dict ---------------------------------------------------------


def tf_dump() -> dict:
    """A TF-era dump: layer -> [W, b] (bvlc_alexnet.npy, vgg16.npy) or {weights, biases}."""
    return {
        "conv1": [
            RNG.standard_normal((3, 3, 2, 4)).astype(np.float32),
            RNG.standard_normal(4).astype(np.float32),
        ],
        "fc6": {
            "weights": RNG.standard_normal((16, 5)).astype(np.float32),
            "biases": RNG.standard_normal(5).astype(np.float32),
        },
        "block": OrderedDict(
            [("bn", (np.ones(4, np.float32), np.zeros(4, np.float32))), ("step", np.int64(7))]
        ),
        "lr": 0.01,
        "classes": ["cat", "dog"],
    }


DUMP_NAMES = {
    "conv1.0": ("F32", (3, 3, 2, 4)),
    "conv1.1": ("F32", (4,)),
    "fc6.weights": ("F32", (16, 5)),
    "fc6.biases": ("F32", (5,)),
    "block.bn.0": ("F32", (4,)),
    "block.bn.1": ("F32", (4,)),
    "block.step": ("I64", ()),
}


def dump_arrays(dump: dict) -> dict[str, np.ndarray]:
    return {
        "conv1.0": dump["conv1"][0],
        "conv1.1": dump["conv1"][1],
        "fc6.weights": dump["fc6"]["weights"],
        "fc6.biases": dump["fc6"]["biases"],
        "block.bn.0": dump["block"]["bn"][0],
        "block.bn.1": dump["block"]["bn"][1],
        "block.step": np.asarray(dump["block"]["step"]),
    }


def test_np_save_of_a_dict_is_read_with_joined_names(tmp_path):
    dump = tf_dump()
    np.save(tmp_path / "vgg16.npy", dump, allow_pickle=True)
    with open_checkpoint(tmp_path / "vgg16.npy") as ckpt:
        assert index(ckpt) == DUMP_NAMES
        assert_same_arrays(ckpt, dump_arrays(dump))
        assert ckpt.weight_format is WeightFormat.IN_OUT
        assert {i.weight_format for i in ckpt.tensors.values()} == {WeightFormat.IN_OUT}
        assert ckpt.notes == (
            "read a pickled .npy (restricted unpickler: numpy arrays and containers only)",
            "left out 3 non-array entries: lr, classes.0, classes.1",
        )


def npy_with_pickle(path: Path, obj: object, protocol: int) -> bytes:
    """What np.save writes for an object, at any pickle protocol: header, then the pickle."""
    data = pickle.dumps(np.array(obj, dtype=object), protocol=protocol)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|O", "fortran_order": False, "shape": ()}
    )
    path.write_bytes(buffer.getvalue() + data)
    return data


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_numpy_and_a_bare_pickle(tmp_path, protocol):
    dump = tf_dump()
    npy_with_pickle(tmp_path / "w.npy", dump, protocol)
    (tmp_path / "bare.npy").write_bytes(pickle.dumps(dump, protocol=protocol))
    for name in ("w.npy", "bare.npy"):
        with open_checkpoint(tmp_path / name) as ckpt:
            assert index(ckpt) == DUMP_NAMES
            assert_same_arrays(ckpt, dump_arrays(dump))
    with open_checkpoint(tmp_path / "bare.npy") as ckpt:
        assert ckpt.notes[0] == "read a bare pickle (no .npy header)"


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as a Python 2 np.save did."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_a_python2_numpy1_dump_like_bvlc_alexnet(tmp_path):
    """bvlc_alexnet.npy was pickled by Python 2 and numpy 1.x: ``numpy.core`` paths, array
    bytes as Python 2 str (np.load needs encoding='latin1' for it)."""
    dump = {
        "conv1": [np.arange(24, dtype=np.float32).reshape(2, 3, 1, 4), np.ones(4, np.float32)],
        "fc8": [RNG.standard_normal((6, 3)).astype(np.float32), np.zeros(3, np.float32)],
    }
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(np.array(dump, dtype=object))
    data = buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"numpy._core" not in data
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": ()}
    )
    (tmp_path / "bvlc_alexnet.npy").write_bytes(header.getvalue() + data)
    with open_checkpoint(tmp_path / "bvlc_alexnet.npy") as ckpt:
        assert list(ckpt.tensors) == ["conv1.0", "conv1.1", "fc8.0", "fc8.1"]
        np.testing.assert_array_equal(ckpt.array("conv1.0"), dump["conv1"][0])
        np.testing.assert_array_equal(ckpt.array("fc8.0"), dump["fc8"][0])


def test_ragged_object_arrays_count_as_lists_and_fortran_arrays_are_copied(tmp_path):
    weight = np.asfortranarray(RNG.standard_normal((4, 3)).astype(np.float32))
    pair = np.empty(2, dtype=object)  # what np.array([W, b]) made of ragged arrays
    pair[0], pair[1] = weight, np.ones(3, np.float32)
    np.save(tmp_path / "w.npy", {"fc6": pair}, allow_pickle=True)
    with open_checkpoint(tmp_path / "w.npy") as ckpt:
        assert index(ckpt) == {"fc6.0": ("F32", (4, 3)), "fc6.1": ("F32", (3,))}
        assert ckpt.array("fc6.0").flags.c_contiguous
        np.testing.assert_array_equal(ckpt.array("fc6.0"), weight)
        assert "copied 1 array stored column-major (Fortran order) to row-major: fc6.0" in (
            ckpt.notes
        )


def test_state_dict_key_picks_a_nested_dict_of_a_pickle(tmp_path):
    dump = {"weights": tf_dump(), "epoch": 3}
    np.save(tmp_path / "w.npy", dump, allow_pickle=True)
    with open_checkpoint(tmp_path / "w.npy", state_dict_key="weights") as ckpt:
        assert index(ckpt) == DUMP_NAMES
        assert "took the nested dict under 'weights'" in ckpt.notes
    with pytest.raises(CheckpointError, match=r"state_dict_key 'model' is not a dict.*weights"):
        open_checkpoint(tmp_path / "w.npy", state_dict_key="model")
    np.savez(tmp_path / "w.npz", a=np.ones(1))
    with pytest.raises(CheckpointError, match=r"w.npz: state_dict_key 'x' picks a nested dict"):
        open_checkpoint(tmp_path / "w.npz", state_dict_key="x")


# --- pickles that ask for code ----------------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(("payload", "asked"), [(_System, r"posix\.system"), (_Open, r"io\.open")])
def test_a_pickle_asking_for_code_is_refused_and_never_runs(tmp_path, payload, asked):
    marker = tmp_path / "marker"
    dump = {"fc6": [np.ones((2, 2), np.float32), payload(marker)]}
    np.save(tmp_path / "evil.npy", dump, allow_pickle=True)
    (tmp_path / "bare.npy").write_bytes(pickle.dumps(dump))
    for name in ("evil.npy", "bare.npy"):
        with pytest.raises(
            CheckpointError, match=rf"{name}: refused: the pickle asks for {asked}; only numpy"
        ):
            open_checkpoint(tmp_path / name)
        assert not marker.exists()
    # The payload is live: an unrestricted load runs it.
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("__builtin__", "exec"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "frombuffer"),
        ("numpy.lib.format", "read_array"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_only_the_globals_arrays_need_are_allowed(tmp_path, module, name):
    # GLOBAL module name, then call it with no arguments: a protocol 2 pickle by hand.
    data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    (tmp_path / "w.npy").write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"refused: the pickle asks for {module}\.{name};"):
        open_checkpoint(tmp_path / "w.npy")


def test_ndarray_cannot_be_called_and_reconstruct_builds_only_ndarrays(tmp_path):
    call_ndarray = b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85R."  # ndarray((10**9,))
    (tmp_path / "a.npy").write_bytes(call_ndarray)
    with pytest.raises(CheckpointError, match=r"a.npy: not a readable pickle"):
        open_checkpoint(tmp_path / "a.npy")
    reconstruct_set = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncbuiltins\nset\n)U\x01b\x87R."
    (tmp_path / "b.npy").write_bytes(reconstruct_set)
    with pytest.raises(CheckpointError, match=r"b.npy: not a readable pickle.*ndarray only"):
        open_checkpoint(tmp_path / "b.npy")


def test_the_reader_imports_the_real_numpy():
    """``readers/numpy.py`` is named like numpy: its own ``import numpy`` must not find it."""
    assert numpy_reader.__name__ == "fc2conv_cli.readers.numpy"
    code = (
        "import fc2conv_cli.readers.numpy as r, numpy, sys\n"
        "print(numpy is not r, hasattr(numpy, 'savez'), 'site-packages' in numpy.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


# --- bad input ----------------------------------------------------------------------------


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_truncated_files_are_refused(tmp_path):
    expected = arrays()
    np.savez(tmp_path / "s.npz", **expected)
    np.savez_compressed(tmp_path / "c.npz", **expected)
    np.save(tmp_path / "a.npy", expected["fc6_W"])
    np.save(tmp_path / "d.npy", tf_dump(), allow_pickle=True)
    for name in ("s.npz", "c.npz"):
        with pytest.raises(CheckpointError, match=rf"{name}: not a valid \.npz archive"):
            open_checkpoint(truncated(tmp_path / name))
    with pytest.raises(CheckpointError, match=r"a.npy: not a valid .npy file: .* \(truncated\)"):
        open_checkpoint(truncated(tmp_path / "a.npy", 0.9))
    with pytest.raises(CheckpointError, match=r"d.npy: not a readable pickle .truncated"):
        open_checkpoint(truncated(tmp_path / "d.npy"))
    header_only = tmp_path / "h.npy"
    header_only.write_bytes((tmp_path / "a.npy").read_bytes()[:9])
    with pytest.raises(CheckpointError, match=r"h.npy: not a valid .npy file: EOF"):
        open_checkpoint(header_only)


def test_a_stored_member_cut_short_inside_a_valid_zip_is_refused(tmp_path):
    """A zip whose directory claims more bytes for a stored member than its .npy holds."""
    buffer = io.BytesIO()
    np.save(buffer, np.ones(100, np.float32))
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as archive:
        archive.writestr("fc6.npy", buffer.getvalue()[:-40])
    with pytest.raises(
        CheckpointError, match=r"member 'fc6.npy'.* needs 400 data bytes.*truncated"
    ):
        open_checkpoint(tmp_path / "w.npz")


def test_a_plain_npy_with_trailing_bytes_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.ones(3, np.float32))
    with open(tmp_path / "a.npy", "ab") as file:
        np.save(file, np.ones(3, np.float32))  # a second array appended
    with pytest.raises(CheckpointError, match=r"a.npy: not a valid .npy file: .*trailing bytes"):
        open_checkpoint(tmp_path / "a.npy")


@pytest.mark.parametrize("content", ["these are not weights\n", ""])
@pytest.mark.parametrize("name", ["w.npy", "w.npz"])
def test_a_file_that_is_not_numpy_is_refused(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=rf"{name}: not a NumPy file"):
        open_checkpoint(tmp_path / name)


def test_a_zip_without_arrays_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=r"w.npz: not a NumPy .npz archive: it has no .npy"):
        open_checkpoint(tmp_path / "w.npz")


def test_a_member_that_is_not_npy_inside_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as archive:
        archive.writestr("fc6.npy", b"not an array at all")
    with pytest.raises(
        CheckpointError, match=r"member 'fc6.npy': not a valid .npy array: the magic string"
    ):
        open_checkpoint(tmp_path / "w.npz")


def test_object_arrays_in_an_npz_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    np.savez(tmp_path / "w.npz", fc6=np.ones(2), evil=np.array([_Open(marker)], dtype=object))
    with pytest.raises(CheckpointError, match=r"array 'evil' is an object array .*never unpickled"):
        open_checkpoint(tmp_path / "w.npz")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.ones(2, np.complex128), "complex128"),
        (np.array(["cat", "dog"]), "<U3"),
        (np.array([b"ab"]), "|S2"),
        (np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "structured"),
        (np.array(["2024-01-01"], dtype="datetime64[D]"), "datetime64"),
        (np.ones(2, np.float128 if hasattr(np, "float128") else np.complex128), ""),
    ],
)
def test_unsupported_dtypes_are_refused(tmp_path, array, dtype):
    np.savez(tmp_path / "w.npz", fc6=np.ones(2, np.float32), bad=array)
    with pytest.raises(CheckpointError, match=rf"w.npz: array 'bad': .*{dtype}.*cannot be stored"):
        open_checkpoint(tmp_path / "w.npz")
    np.save(tmp_path / "w.npy", {"fc6": [np.ones(2, np.float32), array]}, allow_pickle=True)
    with pytest.raises(
        CheckpointError, match=rf"w.npy: array 'fc6.1': .*{dtype}.*cannot be stored"
    ):
        open_checkpoint(tmp_path / "w.npy")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([np.ones(2), np.ones(3)], "the pickle holds a 1-D object array, expected a dict"),
        ("weights", "the pickle holds a str, expected a dict"),
        ({(1, 2): np.ones(2)}, r"key \(1, 2\) is a tuple; names must be strings"),
        ({"fc6": {b"w": np.ones(2)}}, r"key b'w' under 'fc6' is a bytes"),
        ({"fc6.0": np.ones(2), "fc6": [np.ones(2)]}, "two entries are both named 'fc6.0'"),
        ({"fc6": np.empty((2, 2), dtype=object)}, "entry 'fc6' is a 2-D object array"),
        ({"lr": 0.1}, "no arrays found"),
    ],
)
def test_pickles_that_are_not_a_dict_of_arrays_are_refused(tmp_path, obj, expected):
    npy_with_pickle(tmp_path / "w.npy", obj, protocol=4)
    with pytest.raises(CheckpointError, match=rf"w.npy: {expected}"):
        open_checkpoint(tmp_path / "w.npy")


def test_self_referencing_and_deep_pickles_are_refused(tmp_path, monkeypatch):
    loop: dict = {"fc6": np.ones(2)}
    loop["self"] = loop
    (tmp_path / "loop.npy").write_bytes(pickle.dumps(loop))
    with pytest.raises(
        CheckpointError, match=r"loop.npy: entry 'self' refers back to a container above"
    ):
        open_checkpoint(tmp_path / "loop.npy")
    deep: list = [np.ones(1)]
    for _ in range(100):
        deep = [deep]
    (tmp_path / "deep.npy").write_bytes(pickle.dumps({"a": deep}))
    with pytest.raises(CheckpointError, match=r"deep.npy: the pickled dict is too deep"):
        open_checkpoint(tmp_path / "deep.npy")
    # A list holding the same list 40 times over, 40 levels deep: 40**40 paths.
    wide: list = [np.ones(1)]
    for _ in range(40):
        wide = [wide] * 40
    (tmp_path / "wide.npy").write_bytes(pickle.dumps({"a": wide}))
    monkeypatch.setattr(numpy_reader, "_MAX_ENTRIES", 10_000)  # the real bound, 1e6, takes 3 s
    with pytest.raises(CheckpointError, match=r"wide.npy: the pickled dict is more than 10000 "):
        open_checkpoint(tmp_path / "wide.npy")


def test_legacy_torch_pickle_named_npy_is_still_torch(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"a": torch.ones(1)}, tmp_path / "w.npy", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"suffix says numpy, but the content is a pickle"):
        open_checkpoint(tmp_path / "w.npy")


def test_a_member_claiming_more_than_deflate_can_give_is_refused(tmp_path):
    """Its buffer would be allocated before decompressing: a small file must not claim GBs."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**8,)}
    )
    with zipfile.ZipFile(tmp_path / "w.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fc6.npy", header.getvalue() + bytes(1000))
    claim = len(header.getvalue()) + 4 * 10**8
    data = bytearray((tmp_path / "w.npz").read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", claim)  # uncompressed size
    (tmp_path / "w.npz").write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"member 'fc6.npy': claims {claim} bytes from \d+ compressed"
    ):
        open_checkpoint(tmp_path / "w.npz")


# --- from the command line ----------------------------------------------------------------

CLI_MAP = (
    "version: 1\nlayout: hwc\nweight_format: in_out\n"
    "layers:\n  - {name: fc6, kernel: [3, 3], weight: fc6.0, bias: fc6.1}\n"
)


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input of the issue, as a file, with the words its one error line holds."""
    fc6 = [np.ones((36, 5), np.float32), np.zeros(5, np.float32)]
    made: dict[str, tuple[Path, str]] = {}

    def add(case: str, name: str, needle: str) -> Path:
        path = folder / case / name
        path.parent.mkdir()
        made[case] = (path, needle)
        return path

    np.savez(add("truncated-npz", "w.npz", "not a valid .npz archive"), **{"fc6.0": fc6[0]})
    np.save(add("truncated-npy", "w.npy", "(truncated)"), fc6[0])
    np.save(add("truncated-pickle", "w.npy", "not a readable pickle"), {"fc6": fc6})
    for case in ("truncated-npz", "truncated-npy", "truncated-pickle"):
        truncated(made[case][0], 0.6)
    add("text-npy", "w.npy", "not a NumPy file").write_text("weights\n")
    add("text-npz", "w.npz", "not a NumPy file").write_text("weights\n")
    marker = folder / "marker"
    np.save(add("evil", "w.npy", "refused: the pickle asks for io.open"), {"fc6": _Open(marker)})
    np.savez(add("object", "w.npz", "is an object array"), fc6=np.array([{}], dtype=object))
    np.savez(add("complex", "w.npz", "dtype complex128 cannot be stored"), fc6=np.ones(2, "c16"))
    np.save(add("strings", "w.npy", "dtype <U3 cannot be stored"), {"fc6": [np.array(["cat"])]})
    np.save(add("list", "w.npy", "holds a 1-D object array"), np.array([*fc6, 1], dtype=object))
    return made


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, run_cli):
    (tmp_path / "map.yaml").write_text(CLI_MAP)
    for case, (path, needle) in _bad_files(tmp_path).items():
        output = path.parent / "out.safetensors"
        for args in (
            ("convert", path, "--map", tmp_path / "map.yaml", "-o", output),
            ("inspect", path),
        ):
            outcome = run_cli(*args)
            assert outcome.code == 2, (case, args[0], outcome.stderr)
            lines = outcome.stderr.strip().splitlines()
            assert len(lines) == 1, (case, outcome.stderr)
            assert str(path) in lines[0] and needle in lines[0], (case, lines[0])
            assert "Traceback" not in outcome.stdout + outcome.stderr
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name], case
    assert not (tmp_path / "marker").exists()


# --- end to end: a TF-era dump of a small net, converted and proven -----------------------

# image (H, W, 2) -> conv1 3x3 valid, relu -> feature map (H-2, W-2, 4) -> flatten hwc ->
# fc6 (64 -> 5), relu -> fc7 (5 -> 3). Native image 6x6: the feature map is 4x4x4.
NATIVE, LARGER = (6, 6), (9, 8)


def tf_conv2d(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """TF's conv2d, VALID: NHWC input, (kh, kw, in, out) kernel, cross-correlation."""
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(image, (kh, kw), axis=(1, 2))
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias


def tf_dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """TF's dense on an NHWC map: ``tf.reshape(x, [n, -1])`` (hwc order) ``@ kernel + b``."""
    return x.reshape(len(x), -1) @ kernel + bias


def small_net() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv1_W": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "conv1_b": rng.standard_normal(4).astype(np.float32),
        "fc6_W": (rng.standard_normal((4 * 4 * 4, 5)) / 8).astype(np.float32),
        "fc6_b": rng.standard_normal(5).astype(np.float32),
        "fc7_W": rng.standard_normal((5, 3)).astype(np.float32),
        "fc7_b": rng.standard_normal(3).astype(np.float32),
    }


def save_dump(folder: Path, style: str, net: dict[str, np.ndarray]) -> tuple[Path, dict]:
    """The net saved as TF-era code did; returns the file and each FC's weight/bias names."""
    layers = ("conv1", "fc6", "fc7")
    if style == "npy-list":  # bvlc_alexnet.npy / vgg16.npy: name -> [W, b]
        path = folder / "net.npy"
        np.save(path, {n: [net[f"{n}_W"], net[f"{n}_b"]] for n in layers}, allow_pickle=True)
        return path, {n: (f"{n}.0", f"{n}.1") for n in layers}
    if style == "npy-dict":  # name -> {"weights": W, "biases": b}
        path = folder / "net.npy"
        dump = {n: {"weights": net[f"{n}_W"], "biases": net[f"{n}_b"]} for n in layers}
        np.save(path, dump, allow_pickle=True)
        return path, {n: (f"{n}.weights", f"{n}.biases") for n in layers}
    path = folder / "net.npz"  # vgg16_weights.npz: fc6_W, fc6_b, ...
    (np.savez_compressed if style == "npz-deflated" else np.savez)(path, **net)
    return path, {n: (f"{n}_W", f"{n}_b") for n in layers}


def layer_map(names: dict) -> str:
    """No weight_format: the format's stored one (in_out) applies."""
    (w6, b6), (w7, b7) = names["fc6"], names["fc7"]
    return (
        "version: 1\nlayout: hwc\nlayers:\n"
        f"  - {{name: fc6, kernel: [4, 4], weight: {w6}, bias: {b6}}}\n"
        f"  - {{name: fc7, weight: {w7}, bias: {b7}}}\n"
    )


@pytest.mark.parametrize("style", ["npy-list", "npy-dict", "npz", "npz-deflated"])
def test_a_tf_era_dump_converts_to_a_conv_head_that_computes_the_fc(tmp_path, run_cli, style):
    import json

    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    net = small_net()
    source, names = save_dump(tmp_path, style, net)
    (tmp_path / "map.yaml").write_text(layer_map(names))
    output, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    outcome = run_cli(
        "convert", source, "--map", tmp_path / "map.yaml", "-o", output, "--json", report
    )
    assert outcome.code == 0, outcome.stderr
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert {n: layers[n]["weight_format"] for n in layers} == {"fc6": "in_out", "fc7": "in_out"}
    converted = load_file(str(output))
    # Source names are kept; the conv weights are copied as stored.
    assert (layers["fc6"]["output_weight"], layers["fc6"]["output_bias"]) == names["fc6"]
    conv_w, conv_b = names["conv1"]
    assert converted[conv_w].tobytes() == net["conv1_W"].tobytes()
    assert converted[conv_b].tobytes() == net["conv1_b"].tobytes()
    w6, b6 = (converted[layers["fc6"][k]] for k in ("output_weight", "output_bias"))
    w7, b7 = (converted[layers["fc7"][k]] for k in ("output_weight", "output_bias"))
    assert w6.shape == (5, 4, 4, 4) and w7.shape == (3, 5, 1, 1)  # oihw

    def head(feature_map: np.ndarray) -> np.ndarray:
        """The converted head on an NHWC map, with torch's conv2d: (n, 3, h', w')."""
        x = torch.from_numpy(np.ascontiguousarray(feature_map.transpose(0, 3, 1, 2)))
        x = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(w6), torch.from_numpy(b6)))
        return torch.nn.functional.conv2d(x, torch.from_numpy(w7), torch.from_numpy(b7)).numpy()

    def fc(feature_map: np.ndarray) -> np.ndarray:
        x = np.maximum(tf_dense(feature_map, net["fc6_W"], net["fc6_b"]), 0)
        return tf_dense(x, net["fc7_W"], net["fc7_b"])

    rng = np.random.default_rng(8)
    images = {
        size: rng.standard_normal((2, *size, 2)).astype(np.float32) for size in (NATIVE, LARGER)
    }
    maps = {
        s: np.maximum(tf_conv2d(i, net["conv1_W"], net["conv1_b"]), 0) for s, i in images.items()
    }
    native = maps[NATIVE]
    assert native.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(head(native)[:, :, 0, 0], fc(native), rtol=1e-5, atol=1e-5)
    chw = native.transpose(0, 3, 1, 2)  # the same FC on the map flattened c, h, w instead
    assert np.abs(head(native)[:, :, 0, 0] - fc(chw)).max() > 0.1  # so the layout matters
    larger = maps[LARGER]
    dense = head(larger)
    assert dense.shape == (2, 3, 4, 3)
    for i in range(dense.shape[2]):
        for j in range(dense.shape[3]):
            window = larger[:, i : i + 4, j : j + 4, :]
            np.testing.assert_allclose(dense[:, :, i, j], fc(window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["npy-list", "npz"])
def test_inspect_and_verify_run_on_numpy_files(tmp_path, run_cli, style):
    source, names = save_dump(tmp_path, style, small_net())
    (tmp_path / "map.yaml").write_text(layer_map(names))
    output = tmp_path / "out.safetensors"
    assert run_cli("convert", source, "--map", tmp_path / "map.yaml", "-o", output).code == 0
    inspected = run_cli("inspect", source)
    assert inspected.code == 0, inspected.stderr
    for name in (*names["fc6"], *names["conv1"]):
        assert name.rsplit(".", 1)[-1] in inspected.stdout
    verified = run_cli("verify", source, output, "--map", tmp_path / "map.yaml")
    assert verified.code == 0, verified.stderr
    assert "fc6" in verified.stdout and "ok" in verified.stdout
