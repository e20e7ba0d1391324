"""train.members: a seed ensemble trains as independent networks and serves as their mean,
through the checkpoint, the one inference path and the ONNX export.

Networks are tiny (mobilenet_v2 encoder, 8-channel decoder) on 32x32 images: seconds per test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segflow.config import ParamsError, parse_params
from segflow.core.inference import Segmenter
from segflow.release.export import check_parity, export_onnx
from segflow.train.checkpoints import checkpoint_segmenter, load_checkpoint
from segflow.train.ensemble import Ensemble, member_loss
from segflow.train.loop import train_model
from segflow.train.models import build_model, model_spec
from tests.unit.test_training import TINY, _samples

SPEC = {"architecture": "Unet", "encoder": "mobilenet_v2", "in_channels": 1, "classes": 2,
        "decoder_channels": [8, 8, 8, 8, 8]}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_spec_names_members_only_for_an_ensemble():
    one = parse_params(TINY)
    three = parse_params({"train": {**TINY["train"], "members": 3}})

    assert "members" not in model_spec(one.base, one.train)  # specs saved before rebuild as before
    assert model_spec(three.base, three.train)["members"] == 3


def test_members_below_one_are_refused_with_the_key():
    with pytest.raises(ParamsError, match=r"train\.members"):
        parse_params({"train": {"members": 0}})


def test_members_start_apart_and_the_first_starts_as_a_single_network_would():
    torch.manual_seed(7)
    single = build_model(SPEC)
    torch.manual_seed(7)
    ensemble = build_model({**SPEC, "members": 2})

    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    first, second = (m.state_dict() for m in ensemble.members)
    # seeded runs keep their first network's start; the second draws its own weights
    assert all(torch.equal(first[k], v) for k, v in single.state_dict().items())
    assert not torch.equal(first["segmentation_head.0.weight"], second["segmentation_head.0.weight"])


def test_eval_is_the_mean_of_the_members_and_training_sees_each():
    torch.manual_seed(0)
    ensemble = build_model({**SPEC, "members": 2})
    x = torch.randn(3, 1, 32, 32)

    ensemble.eval()
    with torch.no_grad():
        mean = ensemble(x)
        each = [member(x) for member in ensemble.members]
    ensemble.train()
    stacked = ensemble(x)

    assert mean.shape == (3, 2, 32, 32)
    assert torch.allclose(mean, (each[0] + each[1]) / 2, atol=1e-6)
    assert stacked.shape == (2, 3, 2, 32, 32)


def test_each_member_learns_from_its_own_loss_not_the_mean():
    torch.manual_seed(0)
    ensemble = build_model({**SPEC, "members": 2}).train()
    x, target = torch.randn(2, 1, 32, 32), torch.rand(2, 2, 32, 32)

    def loss_fn(logits, t):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, t)

    loss, reported = member_loss(loss_fn, ensemble(x), target)
    loss.backward()
    together = [p.grad.clone() for p in ensemble.members[1].parameters()]
    ensemble.zero_grad()
    alone = loss_fn(ensemble.members[1](x), target)
    alone.backward()

    # the gradient member 1 gets is the one it would get trained alone on the same batch
    for a, b in zip(together, (p.grad for p in ensemble.members[1].parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert reported == pytest.approx(loss.item() / 2)  # reported on a single network's scale


def test_an_ensemble_trains_checkpoints_segments_and_exports(tmp_path):
    params = parse_params({"train": {**TINY["train"], "members": 2, "epochs": 2}})
    history = train_model(params, _samples(8, 0), _samples(3, 1), tmp_path / "model.pt")

    model, prep = load_checkpoint(tmp_path / "model.pt")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert len(history) == 2 and all(np.isfinite(r["train_loss"]) for r in history)
    image = _samples(1, 2)[0].image
    [logits] = checkpoint_segmenter(tmp_path / "model.pt").logits([image])
    assert logits.shape[1:] == image.shape
    # one ONNX graph computes the mean: the service runs an ensemble like any model
    export_onnx(model, prep, tmp_path / "model.onnx", opset=18, ir_version=10)
    report = check_parity(
        checkpoint_segmenter(tmp_path / "model.pt"),
        Segmenter.from_onnx(tmp_path / "model.onnx", prep),
        [image, _samples(1, 3)[0].image],
        atol=1e-4,
    )
    assert report["passed"]
