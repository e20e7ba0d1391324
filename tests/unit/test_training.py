"""The training loop's pieces: learning-rate schedules, early stopping, per-epoch seeding,
resume states and their fingerprints, and resuming an interrupted run exactly.

Training runs on a few 32x32 images with a small network, seconds per test.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from segflow.config import parse_params
from segflow.data.samples import Sample
from segflow.train.checkpoints import load_checkpoint
from segflow.train.dataset import build_augmentations
from segflow.train.epochs import best_epoch, build_scheduler, epoch_seed, seed_epoch, should_stop
from segflow.train.loop import train_model
from segflow.train.precision import Compute, native_bf16
from segflow.train.resume import ResumeFile, discard, fingerprint

TINY = {
    "train": {
        "encoder": "mobilenet_v2",
        "decoder_channels": [8, 8, 8, 8, 8],
        "epochs": 3,
        "batch_size": 4,
        "crop_size": 32,
    }
}


def _params(**train):
    return parse_params({"train": {**TINY["train"], **train}})


def _samples(n: int, seed: int) -> list[Sample]:
    """Bright squares on a dark, noisy background: (32, 32) uint8 images."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        for y, x in rng.integers(4, 28, (3, 2)):
            mask[y - 3 : y + 3, x - 3 : x + 3] = 1
        image = rng.integers(0, 60, (32, 32), dtype=np.uint8) + 150 * mask
        instances = ndi.label(mask)[0].astype(np.uint16)
        samples.append(
            Sample(id=f"s{seed}_{i}", image=image.astype(np.uint8), mask=mask, instances=instances)
        )
    return samples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small train fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return _samples(8, 0), _samples(3, 1)


def _lrs(schedule: str, steps: int = 40, lr: float = 0.01) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, schedule, lr, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_onecycle_warms_up_to_the_peak_then_anneals():
    lrs = _lrs("onecycle")
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) // 2  # the warm-up is the first 30%
    assert lrs[peak] == pytest.approx(0.01)
    assert lrs[0] < 0.001 and lrs[-1] < 1e-5
    assert all(a <= b for a, b in itertools.pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))


def test_cosine_anneals_from_the_start_lr_towards_zero():
    lrs = _lrs("cosine")
    assert lrs[0] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[len(lrs) // 2] == pytest.approx(0.005, rel=1e-6)  # half-way down the cosine
    assert lrs[-1] < 1e-4


def test_constant_keeps_the_lr():
    assert _lrs("constant") == [0.01] * 40


def test_unknown_schedule_lists_the_choices():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="onecycle, cosine, constant"):
        build_scheduler(optimizer, "linear", 0.01, 10)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_a_restored_scheduler_continues_where_it_stopped(schedule):
    uninterrupted = _lrs(schedule)
    first = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = build_scheduler(first, schedule, 0.01, 40)
    for _ in range(15):
        first.step()
        scheduler.step()
    second = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    restored = build_scheduler(second, schedule, 0.01, 40)
    second.load_state_dict(first.state_dict())
    restored.load_state_dict(scheduler.state_dict())
    rest = []
    for _ in range(25):
        rest.append(second.param_groups[0]["lr"])
        second.step()
        restored.step()
    assert rest == uninterrupted[15:]


def _history(*dice: float) -> list[dict]:
    return [{"epoch": i, "val_dice": d} for i, d in enumerate(dice, start=1)]


def test_early_stopping_waits_patience_epochs_without_a_better_dice():
    assert not should_stop(_history(0.1, 0.3, 0.2), patience=2)
    assert should_stop(_history(0.1, 0.3, 0.2, 0.3), patience=2)  # equal is not better
    assert not should_stop(_history(0.1, 0.3, 0.2, 0.31), patience=2)
    assert should_stop(_history(0.5, 0.4), patience=1)
    assert not should_stop(_history(0.5, 0.4, 0.3, 0.2, 0.1), patience=0)  # 0 = never
    assert best_epoch(_history(0.2, 0.5, 0.5, float("nan")))["epoch"] == 2  # earliest best, NaN never


def test_epoch_seeds_differ_per_epoch_and_repeat_per_seed():
    assert epoch_seed(42, 3) == epoch_seed(42, 3)
    assert len({epoch_seed(42, e) for e in range(1, 50)} | {epoch_seed(7, 1)}) == 50


def test_seeded_augmentations_repeat_per_epoch_and_flip_independently():
    flips_only = {"hflip": 0.5, "vflip": 0.5, "rotate90": 0, "brightness_contrast": 0, "gauss_noise": 0}
    augment = build_augmentations(parse_params({"train": {"crop_size": None, "augment": flips_only}}))
    image = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1024
    generator = torch.Generator()

    def epoch(e: int) -> list[np.ndarray]:
        seed_epoch(42, e, generator, augment)
        return [augment(image=image, mask=np.zeros((32, 32), np.uint8))["image"] for _ in range(40)]

    first, other, again = epoch(1), epoch(2), epoch(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    # One shared generator: horizontal and vertical flips happen alone too, not only together.
    corners = {float(out[0, 0]) for out in first}  # which corner of `image` ended up top left
    assert corners == {float(image[y, x]) for y in (0, -1) for x in (0, -1)}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_resolution_loss_blurs_the_image_keeping_its_dtype_and_the_mask(dtype):
    off = dict.fromkeys(("hflip", "vflip", "rotate90", "brightness_contrast", "gauss_noise"), 0)
    off["downscale"] = 1.0
    augment = build_augmentations(parse_params({"train": {"crop_size": None, "augment": off}}))
    image = (np.random.default_rng(0).random((64, 64)) * 200).astype(dtype)  # pixel noise
    mask = (np.arange(64 * 64).reshape(64, 64) % 3).astype(np.uint8)
    out = augment(image=image, mask=mask)
    assert out["image"].dtype == dtype and out["image"].shape == image.shape
    assert out["image"].std() < 0.8 * image.std()  # averaged over neighbours: blurred
    assert abs(float(out["image"].mean()) - float(image.mean())) < 2  # same intensities
    assert np.array_equal(out["mask"], mask)  # labels stay sharp


def test_fingerprint_tracks_what_changes_the_epochs(data):
    train, val = data
    base = fingerprint(_params(), {"p": 1}, {"train": train, "val": val})
    assert fingerprint(_params(), {"p": 1}, {"train": train, "val": val}) == base
    # threads only changes rounding; early_stopping is re-applied on resume
    assert fingerprint(_params(threads=1, early_stopping=3), {"p": 1}, {"train": train, "val": val}) == base
    assert fingerprint(_params(lr=0.01), {"p": 1}, {"train": train, "val": val})["params"] != base["params"]
    assert fingerprint(_params(), {"p": 2}, {"train": train, "val": val})["params"] != base["params"]
    edited = [Sample(s.id, s.image.copy(), s.mask, s.instances) for s in train]
    edited[3].image[5, 5] ^= 1  # one pixel
    assert fingerprint(_params(), {"p": 1}, {"train": edited, "val": val})["data"] != base["data"]
    swapped = {"train": train[1:] + train[:1], "val": val}  # same images, other order
    assert fingerprint(_params(), {"p": 1}, swapped)["data"] != base["data"]


def test_state_with_another_fingerprint_is_ignored_with_the_reason(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="segflow")
    path = tmp_path / ".resume" / "train.pt"
    ResumeFile(path, {"params": "a", "data": "b", "code": "c"}).save({"epoch": 2})
    assert ResumeFile(path, {"params": "a", "data": "b", "code": "c"}).load()["epoch"] == 2
    assert ResumeFile(path, {"params": "x", "data": "b", "code": "c"}).load() is None
    out = caplog.text
    assert f"ignoring {path}: it was saved for different params" in out and "from epoch 1" in out
    assert ResumeFile(path, {"params": "a", "data": "y", "code": "z"}).load() is None
    assert "different data, code" in caplog.text
    path.write_bytes(b"half a file")
    assert ResumeFile(path, {"params": "a", "data": "b", "code": "c"}).load() is None
    assert "cannot be read" in caplog.text
    discard(path)
    assert not path.exists() and not path.parent.exists()


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class _Killed(Exception):
    pass


def _die_after_epoch_1(record: dict) -> None:
    """An on_epoch callback that kills the run once epoch 1 is saved."""
    if record["epoch"] == 1:
        raise _Killed


def test_interrupted_training_resumes_exactly(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="segflow")
    train, val = data
    params = _params(epochs=3, schedule="cosine")
    reference = train_model(params, train, val, tmp_path / "reference" / "model.pt")

    state = tmp_path / ".resume" / "train.pt"
    with pytest.raises(_Killed):
        train_model(params, train, val, tmp_path / "first" / "model.pt", _die_after_epoch_1, state)
    assert torch.load(state, weights_only=True)["epoch"] == 1

    logged = []
    resumed = train_model(params, train, val, tmp_path / "second" / "model.pt", logged.append, state)
    assert f"resuming from epoch 2/3 ({state})" in caplog.text
    assert [r["epoch"] for r in logged] == [1, 2, 3]  # restored epochs are reported too
    assert _comparable(resumed) == _comparable(reference)
    best = torch.load(tmp_path / "second" / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert best["epoch"] == expected["epoch"] == best_epoch(reference)["epoch"]
    for key, tensor in expected["state_dict"].items():
        torch.testing.assert_close(best["state_dict"][key], tensor, rtol=0, atol=1e-6)


def test_early_stopping_ends_the_run_and_keeps_the_best(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="segflow")
    train, val = data
    # A learning rate far too high: val Dice stops improving almost at once.
    params = _params(epochs=8, early_stopping=1, schedule="constant", lr=5.0)
    history = train_model(params, train, val, tmp_path / "model.pt")
    assert len(history) < 8
    assert should_stop(history, 1) and not should_stop(history[:-1], 1)
    assert f"early stopping after epoch {len(history)}/8" in caplog.text
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert best["epoch"] == best_epoch(history)["epoch"]
    assert best["val_dice"] == max(r["val_dice"] for r in history)


def test_deterministic_mode_holds_while_training_only(data, tmp_path):
    train, val = data
    before = torch.are_deterministic_algorithms_enabled()
    seen = []

    def check(_: dict) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())

    train_model(_params(epochs=1, deterministic=True), train, val, tmp_path / "model.pt", check)
    assert seen == [True]
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize(
    ("setting", "native", "expected"),
    [("fp32", True, "fp32"), ("auto", True, "bf16"), ("auto", False, "fp32"), ("bf16", True, "bf16")],
)
def test_training_precision_resolves_by_what_the_cpu_has(setting, native, expected):
    assert Compute.resolve(setting, False, native=native).precision == expected


def test_bf16_on_a_cpu_without_it_falls_back_to_fp32_and_warns(caplog):
    compute = Compute.resolve("bf16", True, native=False)
    assert (compute.precision, compute.channels_last) == ("fp32", True)
    assert "train.precision is bf16 but this CPU has no native bfloat16" in caplog.text
    assert "training in float32" in caplog.text


def test_bf16_channels_last_training_saves_a_float32_checkpoint_that_predicts(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="segflow")
    train, val = data
    history = train_model(
        _params(epochs=2, precision="bf16", channels_last=True), train, val, tmp_path / "m.pt"
    )
    ran = "bf16" if native_bf16() else "fp32"
    assert f"training in {ran}, channels-last" in caplog.text
    assert all(np.isfinite(r["train_loss"]) for r in history)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()} == {torch.float32}
    model, _ = load_checkpoint(tmp_path / "m.pt")  # a contiguous float32 network, as export needs
    with torch.inference_mode():
        out = model(torch.zeros(1, 1, 32, 32))
    assert out.dtype == torch.float32 and out.shape[-2:] == (32, 32)
