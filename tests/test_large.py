"""Chunked conversion is byte-for-byte the plain reshape, for every layout and float dtype.

The writer and the checks work in chunks of rows; these files are larger than a chunk,
with row counts that do not divide evenly into chunks.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from fc2conv_cli import check, write

torch = pytest.importorskip("torch")

LAYOUTS = ["chw", "cwh", "hcw", "hwc", "wch", "whc"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def plain_reshape(weight, layout: str, weight_format: str, channels: int, kernel):
    """The reference: what a user's one-liner does, in torch."""
    rows = weight if weight_format == "out_in" else weight.t()
    size = dict(zip("chw", (channels, *kernel), strict=True))
    shaped = rows.reshape(rows.shape[0], *(size[a] for a in layout))
    return shaped.permute(0, *(1 + layout.index(a) for a in "chw")).contiguous()


def as_bytes(tensor):
    return tensor.contiguous().view(-1).view(torch.uint8)


def convert(run_cli, tmp_path, tensors, layout, weight_format, kernel):
    source = tmp_path / "in.safetensors"
    save_file(tensors, str(source))
    (tmp_path / "map.yaml").write_text(
        f"version: 1\nlayout: {layout}\nweight_format: {weight_format}\n"
        f"layers:\n  - {{name: fc1, kernel: {list(kernel)}}}\n  - {{name: fc2}}\n"
    )
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", tmp_path / "map.yaml", "-o", output)
    assert outcome.code == 0, outcome.stderr
    return load_file(str(output))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_format", ["out_in", "in_out"])
def test_every_tensor_is_the_plain_reshape(
    run_cli, tmp_path, monkeypatch, dtype, layout, weight_format
):
    # Small chunks, so a small file spans many chunks, with a ragged last one.
    monkeypatch.setattr(write, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(check, "_CHECK_CHUNK_BYTES", 8192)
    channels, kernel, out_features = 6, (3, 5), 37
    generator = torch.Generator().manual_seed(0)
    fc1 = torch.randn(out_features, channels * 15, generator=generator).to(dtype)
    fc2 = torch.randn(10, out_features, generator=generator).to(dtype)
    stored = {"fc1": fc1, "fc2": fc2}
    if weight_format == "in_out":
        stored = {k: v.t().contiguous() for k, v in stored.items()}
    tensors = {
        "fc1.weight": stored["fc1"],
        "fc1.bias": torch.randn(out_features, generator=generator).to(dtype),
        "fc2.weight": stored["fc2"],
        "backbone.weight": torch.randn(channels, 3, 3, 3, generator=generator).to(dtype),
        "steps": torch.tensor([7], dtype=torch.int64),
    }
    out = convert(run_cli, tmp_path, tensors, layout, weight_format, kernel)
    expected = {
        "fc1.weight": plain_reshape(stored["fc1"], layout, weight_format, channels, kernel),
        "fc2.weight": plain_reshape(stored["fc2"], layout, weight_format, out_features, (1, 1)),
        "fc1.bias": tensors["fc1.bias"],
        "backbone.weight": tensors["backbone.weight"],
        "steps": tensors["steps"],
    }
    assert set(out) == set(expected)
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(out[name]), as_bytes(tensor)), name


def test_a_file_larger_than_the_real_chunk_size(run_cli, tmp_path):
    assert write.CHUNK_BYTES == 8 << 20
    channels, kernel = 64, (7, 5)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, channels * 35, generator=generator)  # 8.96 MB > one chunk
    tensors = {"fc1.weight": weight, "fc2.weight": torch.randn(3, 1000, generator=generator)}
    out = convert(run_cli, tmp_path, tensors, "hwc", "out_in", kernel)
    expected = plain_reshape(weight, "hwc", "out_in", channels, kernel)
    assert torch.equal(out["fc1.weight"], expected)
