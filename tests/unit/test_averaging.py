"""train.ema_decay: an exponential moving average of the weights is what training validates,
saves and resumes; the optimizer keeps stepping the raw weights.

Networks are tiny (mobilenet_v2 encoder, 8-channel decoder) on 32x32 images: seconds per test.
"""

from __future__ import annotations

import pytest
import torch

from segflow.config import ParamsError, parse_params
from segflow.train.averaging import WeightAverage
from segflow.train.loop import train_model
from tests.unit.test_training import (
    TINY,
    _comparable,
    _die_after_epoch_1,
    _Killed,
    _samples,
    one_thread,  # noqa: F401  (autouse: tiny tensors train fastest on one thread)
)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def _set(net: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        net[1].running_mean.fill_(value)


def test_the_average_starts_as_a_copy_then_moves_by_one_minus_decay():
    net = _net()
    average = WeightAverage(net, decay=0.75)
    _set(net, 4.0)
    average.update(net)  # the first update copies: the random start does not linger
    assert torch.equal(average.module[0].weight, net[0].weight)

    _set(net, 0.0)
    net[1].num_batches_tracked.fill_(9)
    average.update(net)
    assert torch.allclose(average.module[0].weight, torch.full_like(net[0].weight, 3.0))  # 0.75 * 4
    assert torch.allclose(average.module[1].running_mean, torch.full((2,), 3.0))  # statistics too
    assert average.module[1].num_batches_tracked.item() == 9  # counters are copied, not averaged
    assert not any(p.requires_grad for p in average.module.parameters())
    assert average.steps == 2


def test_a_restored_average_continues_where_it_stopped():
    net = _net()
    first = WeightAverage(net, decay=0.5)
    first.update(net)
    second = WeightAverage(_net(), decay=0.5)
    second.load_state_dict(first.state_dict())
    _set(net, 1.0)
    first.update(net)
    second.update(net)
    assert second.steps == 2
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_a_decay_outside_zero_to_one_is_refused_with_the_key(decay):
    with pytest.raises(ParamsError, match=r"train\.ema_decay"):
        parse_params({"train": {"ema_decay": decay}})


def test_training_saves_the_averaged_weights_and_resumes_them_exactly(tmp_path):
    train, val = _samples(8, 0), _samples(3, 1)
    params = parse_params({"train": {**TINY["train"], "epochs": 3, "ema_decay": 0.9, "schedule": "cosine"}})
    raw = parse_params({"train": {**TINY["train"], "epochs": 3, "schedule": "cosine"}})
    reference = train_model(params, train, val, tmp_path / "reference" / "model.pt")
    unaveraged = train_model(raw, train, val, tmp_path / "raw" / "model.pt")
    # Same batches and steps, another model validated: the averaged one scores differently.
    assert [r["train_loss"] for r in reference] == [r["train_loss"] for r in unaveraged]
    assert [r["val_dice"] for r in reference] != [r["val_dice"] for r in unaveraged]

    state = tmp_path / ".resume" / "train.pt"
    with pytest.raises(_Killed):
        train_model(params, train, val, tmp_path / "first" / "model.pt", _die_after_epoch_1, state)
    assert torch.load(state, weights_only=True)["average"]["steps"] == 2  # 8 images / batch 4, one epoch

    resumed = train_model(params, train, val, tmp_path / "second" / "model.pt", None, state)
    assert _comparable(resumed) == _comparable(reference)
    best = torch.load(tmp_path / "second" / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    for key, tensor in expected["state_dict"].items():
        torch.testing.assert_close(best["state_dict"][key], tensor, rtol=0, atol=1e-6)


def test_a_resume_state_without_an_average_is_not_reused_for_an_averaged_run(tmp_path, caplog):
    train, val = _samples(8, 0), _samples(3, 1)
    state = tmp_path / ".resume" / "train.pt"
    raw = parse_params({"train": {**TINY["train"], "epochs": 1}})
    train_model(raw, train, val, tmp_path / "raw" / "model.pt", None, state)
    averaged = parse_params({"train": {**TINY["train"], "epochs": 1, "ema_decay": 0.9}})
    caplog.set_level("INFO", logger="segflow")
    train_model(averaged, train, val, tmp_path / "averaged" / "model.pt", None, state)
    # ema_decay is in the fingerprint: the raw run's state is named and set aside, training starts afresh
    assert f"resume: ignoring {state}: it was saved for different params" in caplog.text
    assert "resuming" not in caplog.text
