"""Section 3 of issue 11: heads that are already convolutional, pooled heads, several
chains, and FCs that only share a size with a recurrent or attention layer."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from fc2conv_cli.errors import InputError
from fc2conv_cli.readers import open_checkpoint
from fc2conv_cli.suggest import suggest_map

RNG = np.random.default_rng(3)


def save(tmp_path, shapes: dict[str, tuple[int, ...]], name="net.safetensors"):
    path = tmp_path / name
    save_file({n: RNG.standard_normal(s).astype(np.float32) for n, s in shapes.items()}, str(path))
    return path


def suggest(path):
    with open_checkpoint(path) as checkpoint:
        return suggest_map(checkpoint, path.name)


BACKBONE = {"features.0.weight": (8, 3, 3, 3), "features.2.weight": (16, 8, 3, 3)}


def test_an_already_convolutional_head_is_reported(run_cli, tmp_path):
    # timm's VGG: pre_logits.fc1 is a 7x7 conv, pre_logits.fc2 a 1x1 conv, head.fc an FC.
    shapes = {
        **BACKBONE,
        "pre_logits.fc1.weight": (64, 16, 7, 7),
        "pre_logits.fc2.weight": (64, 64, 1, 1),
        "head.fc.weight": (10, 64),
    }
    found = suggest(save(tmp_path, shapes))
    assert found.layers == ("head.fc",) and found.kernel == (1, 1) and found.in_channels == 64
    [note] = found.notes
    assert note.startswith("already fully convolutional: pre_logits.fc1.weight [64, 16, 7, 7]")
    assert f"# Note: {note}" in found.text
    del shapes["head.fc.weight"]
    outcome = run_cli("inspect", save(tmp_path, shapes, "conv_only.safetensors"), "--suggest-map")
    assert outcome.code == 2
    assert outcome.stderr.strip() == (
        "error: conv_only.safetensors: no FC weights to convert: the head is already fully "
        "convolutional (pre_logits.fc1.weight [64, 16, 7, 7])"
    )


def test_a_global_average_pooling_head_is_a_1x1_conv_with_a_comment(run_cli, tmp_path):
    path = save(tmp_path, {**BACKBONE, "layer4.conv.weight": (32, 16, 3, 3), "fc.weight": (10, 32)})
    found = suggest(path)
    assert (found.kernel, found.in_channels, found.layout) == ((1, 1), 32, "chw")
    assert "global average pooling" in found.text and "layer4.conv.weight" in found.text
    assert yaml.safe_load(found.text)["layers"] == [
        {"name": "fc", "kernel": [1, 1], "in_channels": 32}
    ]
    (tmp_path / "map.yaml").write_text(found.text)
    converted = run_cli(
        "convert", path, "--map", tmp_path / "map.yaml", "-o", tmp_path / "o.safetensors"
    )
    assert converted.code == 0, converted.stderr


def test_several_heads_are_all_kept(tmp_path):
    # A detection head: one trunk, three outputs (class, box, landmarks), as MTCNN's ONet.
    found = suggest(
        save(
            tmp_path,
            {
                "conv.weight": (8, 3, 3, 3),
                "trunk.weight": (32, 8 * 3 * 3),
                "cls.weight": (2, 32),
                "box.weight": (4, 32),
                "landmarks.weight": (10, 32),
            },
        )
    )
    assert found.layers == ("trunk", "box", "cls", "landmarks")


def test_an_fc_after_an_lstm_is_flagged_and_left_out(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(input_size=16, hidden_size=32)
    tensors = {f"rnn.{k}": v.detach().numpy() for k, v in lstm.state_dict().items()}
    tensors.update(
        {
            "conv.weight": RNG.standard_normal((16, 3, 3, 3)).astype(np.float32),
            "fc1.weight": RNG.standard_normal((32, 16 * 2 * 2)).astype(np.float32),
            # reads 32: fc1's out_features, but also the LSTM's hidden size
            "fc2.weight": RNG.standard_normal((10, 32)).astype(np.float32),
        }
    )
    path = tmp_path / "crnn.safetensors"
    save_file(tensors, str(path))
    found = suggest(path)
    assert found.layers == ("fc1",)
    [note] = [n for n in found.notes if "fc2.weight" in n]
    assert "recurrent" in note and "left out" in note and "(rnn.weight_hh_l0)" in note
    assert f"# Note: {note}" in found.text


def test_only_recurrent_outputs_is_an_input_error(tmp_path):
    torch = pytest.importorskip("torch")
    lstm = torch.nn.GRU(input_size=12, hidden_size=20, bidirectional=True)
    tensors = {f"gru.{k}": v.detach().numpy() for k, v in lstm.state_dict().items()}
    tensors["conv.weight"] = np.zeros((12, 3, 3, 3), np.float32)
    tensors["classifier.weight"] = np.zeros((7, 40), np.float32)  # reads 2 x hidden
    path = tmp_path / "rnn.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match="no FC head to convert: every FC weight is a recurrent"):
        suggest(path)
