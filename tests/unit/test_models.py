"""build_model: local encoder weights (the offline alternative to named downloads)."""

from __future__ import annotations

import pytest
import torch

from segflow.train.models import build_model

SPEC = {"architecture": "Unet", "encoder": "resnet18", "in_channels": 1, "classes": 1,
        "decoder_channels": [16, 16, 16, 16, 16]}  # fmt: skip


def _rgb_encoder_weights(path):
    torch.manual_seed(3)
    source = build_model({**SPEC, "in_channels": 3}).encoder.state_dict()
    torch.save(source, path)
    return source


def test_rgb_weights_load_into_a_grayscale_model(tmp_path):
    source = _rgb_encoder_weights(tmp_path / "resnet18.pth")
    model = build_model(SPEC, str(tmp_path / "resnet18.pth"))
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    # the first convolution is adapted to one channel from the RGB kernel
    assert loaded["conv1.weight"].shape[1] == 1
    assert torch.allclose(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_weights_for_another_network_are_refused(tmp_path):
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"train\.encoder_weights: no tensor"):
        build_model(SPEC, str(tmp_path / "other.pth"))


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.encoder_weights"):
        build_model(SPEC, str(tmp_path / "absent.pth"))
