"""Reading checkpoints: safetensors header validation, torch loading, unwrapping, prefixes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fc2conv_cli.errors import CheckpointError
from fc2conv_cli.readers import open_checkpoint, open_safetensors

torch = pytest.importorskip("torch")


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_index_and_zero_copy_arrays(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, 2], dtype=np.int64)
    save_file({"a": a, "b": b}, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert {n: (i.dtype, i.shape) for n, i in ckpt.tensors.items()} == {
            "a": ("F32", (3, 4)),
            "b": ("I64", (2,)),
        }
        np.testing.assert_array_equal(ckpt.array("a"), a)
        assert bytes(ckpt.raw("b")) == b.tobytes()
        assert not ckpt.array("a").flags.owndata


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "span 4 bytes"),
        (
            {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}},
            b"\0",
            "unsupported dtype 'Q9'",
        ),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed header entry"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "leave a hole",
        ),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_bad_safetensors_headers_are_refused(tmp_path, header, data, expected):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(
        CheckpointError, match=f"bad.safetensors: not a valid safetensors file: .*{expected}"
    ):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "0 bytes is too short"),
        (struct.pack("<Q", 2**62) + b"{}", "header length 4611686018427387904 runs past the end"),
        (struct.pack("<Q", 4) + b"{x:1", "header is not JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "header is not UTF-8"),
    ],
)
def test_corrupt_safetensors_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(path)


def test_unknown_format_missing_file_and_directory(tmp_path):
    (tmp_path / "m.xyz").write_bytes(b"\x01\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format \(suffix '.xyz'"):
        open_checkpoint(tmp_path / "m.xyz")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "m.pth")
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        open_checkpoint(tmp_path / "d.pth")


def test_content_decides_and_a_contradicting_suffix_is_refused(tmp_path):
    save_file({"w": np.ones((2, 3), np.float32)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "weights").write_bytes(data)  # no suffix: the content decides
    with open_checkpoint(tmp_path / "weights") as ckpt:
        assert ckpt.kind == "safetensors" and list(ckpt.tensors) == ["w"]
    (tmp_path / "m.onnx").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"suffix says onnx, but the content is a safet"):
        open_checkpoint(tmp_path / "m.onnx")
    with open_checkpoint(tmp_path / "m.onnx", format="safetensors") as ckpt:
        assert ckpt.kind == "safetensors"
    with pytest.raises(CheckpointError, match=r"--format torch, but the content is a safet"):
        open_checkpoint(tmp_path / "m.onnx", format="torch")
    with pytest.raises(CheckpointError, match=r"unknown format 'pickle'; expected one of"):
        open_checkpoint(tmp_path / "m.onnx", format="pickle")


def test_names_safetensors_cannot_hold_are_refused(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"__metadata__": torch.ones(2), "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="named '__metadata__', which safetensors reserves"):
        open_checkpoint(path)
    torch.save({"module.": torch.ones(2), "module.w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="a tensor has an empty name"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({1: torch.ones(1), "1": torch.ones(1)}, r"keys 1 and '1' are both named '1'"),
        ({"1": torch.ones(1), 1: torch.ones(1)}, r"keys 1 and '1' are both named '1'"),
        ({(1, 2): torch.ones(1)}, r"key \(1, 2\) is a tuple; tensor names must be strings"),
        ({2.5: torch.ones(1)}, r"key 2.5 is a float"),
    ],
)
def test_torch_keys_that_are_not_names_are_refused(tmp_path, state, expected):
    path = tmp_path / "m.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(path)


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", "F4", "F6_E2M3"])
def test_every_safetensors_dtype_is_read(tmp_path, dtype):
    nbytes = {"C64": 64, "F4": 4, "F6_E2M3": 6}.get(dtype, 8)
    header = json.dumps({"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, nbytes]}})
    header += " " * (-len(header) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(range(nbytes)))
    with open_checkpoint(path) as ckpt:
        assert ckpt.tensors["t"].dtype == dtype and ckpt.tensors["t"].nbytes == nbytes
        assert bytes(ckpt.raw("t")) == bytes(range(nbytes))


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_files_zip_and_legacy(tmp_path, zipped):
    state = {"w": torch.randn(3, 4), "h": torch.randn(5, dtype=torch.bfloat16)}
    path = tmp_path / "m.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "torch"
        assert ckpt.tensors["h"].dtype == "BF16"
        np.testing.assert_array_equal(ckpt.array("w"), state["w"].numpy())
        assert bytes(ckpt.raw("h")) == state["h"].view(torch.int16).numpy().tobytes()


def test_nested_checkpoint_is_unwrapped_and_extras_reported(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2), "step": 5}, "optimizer": {}}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["w"]
        assert ckpt.notes == (
            "unwrapped the nested state dict under 'state_dict'; left out epoch, optimizer",
            "left out 1 non-tensor entries: step",
        )


def test_several_nested_dicts_need_state_dict_key(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": {"a": torch.ones(1)}, "state_dict": {"b": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match=r"several nested state dicts .* set state_dict_key"):
        open_checkpoint(path)
    with open_checkpoint(path, state_dict_key="model") as ckpt:
        assert list(ckpt.tensors) == ["a"]
    with pytest.raises(CheckpointError, match="state_dict_key 'ema' is not a dict"):
        open_checkpoint(path, state_dict_key="ema")


def test_wrapper_prefixes_are_stripped_only_when_every_name_has_them(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"module._orig_mod.a": torch.ones(1), "module._orig_mod.b": torch.ones(1)}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["a", "b"]
        assert len(ckpt.notes) == 2 and "DataParallel" in ckpt.notes[0]
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["module.a", "b"]
    with open_checkpoint(path, strip_prefixes=("module.",)) as ckpt:
        assert list(ckpt.tensors) == ["a", "b"]
        assert ckpt.notes == ("stripped prefix 'module.' from 1 names (asked for by the map)",)


def test_prefix_stripping_that_collides_is_refused(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"module.a": torch.ones(1), "a": torch.ones(1)}, path)
    expected = r"stripping prefixes makes 'a' and 'module\.a' both 'a'"
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(path, strip_prefixes=("module.",))


def test_pickles_that_are_not_weights_are_refused(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(
        CheckpointError, match=r"refused: .*torch.nn.modules.linear.Linear.*state_dict"
    ):
        open_checkpoint(path)


def test_tied_and_non_contiguous_tensors_read_in_full(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "m.pth"
    torch.save({"a": weight, "tied": weight, "t": weight.t()}, path)
    with open_checkpoint(path) as ckpt:
        np.testing.assert_array_equal(ckpt.array("tied"), weight.numpy())
        np.testing.assert_array_equal(ckpt.array("t"), weight.t().numpy())


def test_open_safetensors_ignores_the_suffix(tmp_path):
    save_file({"a": np.ones(3, np.float16)}, str(tmp_path / "x.tmp"))
    with open_safetensors(tmp_path / "x.tmp") as ckpt:
        assert ckpt.tensors["a"].dtype == "F16"
