"""A Keras head with a BatchNormalization: its tensor names and the eps in its config."""

from __future__ import annotations

import json
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is first imported

import numpy as np
import pytest
from safetensors.numpy import load_file

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
F = torch.nn.functional


def test_dense_batchnorm_folds_with_the_eps_of_the_keras_config(run_cli, tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 3, 4))
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(6, name="fc1")(x)
    outputs = keras.layers.BatchNormalization(epsilon=0.25, name="bn")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    bn = model.get_layer("bn")
    bn.set_weights([rng.random(6) + 0.5, rng.standard_normal(6), rng.standard_normal(6),
                    rng.random(6) + 0.1])  # fmt: skip
    model.save(tmp_path / "head.keras")
    (tmp_path / "map.yaml").write_text(
        "version: 1\nlayout: hwc\nlayers:\n"
        "  - {name: fc1, kernel: [3, 3], fold_batchnorm: {name: bn}}\n"
    )
    target = tmp_path / "out.safetensors"
    outcome = run_cli(
        "convert", tmp_path / "head.keras", "--map", tmp_path / "map.yaml", "-o", target,
        "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    fold = json.loads((tmp_path / "r.json").read_text())["layers"][0]["batchnorm"][0]
    assert fold["eps"] == 0.25 and fold["eps_from"] == "keras config"
    assert "bn/moving_variance" in fold["tensors"]
    written = load_file(str(target))
    assert not any(name.startswith("bn/") for name in written)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    expected = np.asarray(model(x, training=False).detach().cpu())
    conv = F.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(written["fc1/kernel"]),
        torch.from_numpy(written["fc1/bias"]),
    )
    np.testing.assert_allclose(conv[:, :, 0, 0].numpy(), expected, atol=1e-5)
