"""INT8: quantizing a real ONNX model, the accuracy check, and choosing what to run.

The quantization test exports a small real convolutional network and quantizes it with ONNX
Runtime. The choice tests time stand-in models (a Segmenter around a function that sleeps):
what is under test is the choosing, which must not depend on this CPU having VNNI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing
from segflow.errors import UserError
from segflow.release.quantize import (
    accuracy_check,
    calibration_inputs,
    quantize,
    write_without_shape_dequantization,
)
from segflow.serve import precision
from segflow.serve.precision import INT8_FILE, INT8_REPORT, choose, decide, warmup_images

PREP = Preprocessing(in_channels=1, mean=0.5, std=0.25, pad_multiple=8, threshold=0.5)


def _tiny_onnx(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 1, 1),
    ).eval()  # fmt: skip
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model, (torch.zeros(1, 1, 32, 32),), str(path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": dynamic, "logits": dynamic}, opset_version=18, dynamo=False,
    )  # fmt: skip


def test_static_int8_quantization_of_a_real_model(tmp_path):
    import onnx

    _tiny_onnx(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    images = [(rng.random((40, 48)) * 255).astype(np.uint8) for _ in range(4)]
    inputs = calibration_inputs(images, [None] * 4, PREP, count=3, size=32)
    assert len(inputs) == 3 and all(x.shape == (1, 1, 32, 32) and x.dtype == np.float32 for x in inputs)
    quantize(tmp_path / "model.onnx", tmp_path / INT8_FILE, inputs, "image")

    ops = {node.op_type for node in onnx.load(str(tmp_path / INT8_FILE)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # QOperator format: integer convolutions
    fp32 = Segmenter.from_onnx(tmp_path / "model.onnx", PREP)
    int8 = Segmenter.from_onnx(tmp_path / INT8_FILE, PREP)
    a, b = fp32.logits(images[:1])[0], int8.logits(images[:1])[0]
    assert a.shape == b.shape == (1, 40, 48)  # dynamic sizes survive quantization
    # Full-range weights overflow the 16-bit pair sums of CPUs without VNNI (33% off on an
    # AVX2 machine); the 7-bit weights quantize() writes stay close on every CPU.
    assert np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1e-6)


def _skip_net_onnx(path: Path) -> None:
    """A U-Net in miniature: the upsampled path is sized by its skip connection's shape."""
    import torch

    class SkipNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.skip = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(16, 1, 1)

        def forward(self, x):
            skip = torch.relu(self.skip(x))
            deep = torch.relu(self.down(x))
            up = torch.nn.functional.interpolate(deep, size=skip.shape[-2:], mode="nearest")
            return self.head(torch.cat([up, skip], dim=1))

    torch.manual_seed(0)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        SkipNet().eval(), (torch.zeros(1, 1, 32, 32),), str(path), input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": dynamic, "logits": dynamic},
        opset_version=18, dynamo=False,
    )  # fmt: skip


def _shape_only_dequantizations(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return sum(
        node.op_type == "DequantizeLinear" and set(readers.get(node.output[0], [])) == {"Shape"}
        for node in graph.node
    )


def test_int8_model_takes_shapes_from_integer_tensors_with_unchanged_outputs(tmp_path, monkeypatch):
    import onnxruntime.quantization

    _skip_net_onnx(tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    images = [(rng.random((40, 56)) * 255).astype(np.uint8) for _ in range(3)]
    inputs = calibration_inputs(images, [None] * 3, PREP, count=3, size=32)
    # The quantizer's own output, before segflow prunes it: it dequantizes the skip tensor
    # only to take its shape.
    kept = {}
    original = onnxruntime.quantization.quantize_static

    def keep_raw(model_input, model_output, *args, **kwargs):
        original(model_input, model_output, *args, **kwargs)
        kept["raw"] = Path(model_output).read_bytes()

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", keep_raw)
    quantize(tmp_path / "model.onnx", tmp_path / INT8_FILE, inputs, "image")
    (tmp_path / "raw.onnx").write_bytes(kept["raw"])

    assert _shape_only_dequantizations(tmp_path / "raw.onnx") >= 1
    assert _shape_only_dequantizations(tmp_path / INT8_FILE) == 0
    assert write_without_shape_dequantization(tmp_path / INT8_FILE, tmp_path / "again.onnx") == 0
    raw = Segmenter.from_onnx(tmp_path / "raw.onnx", PREP)
    pruned = Segmenter.from_onnx(tmp_path / INT8_FILE, PREP)
    for image in images:  # 40x56: odd sizes after the stride-2 path, so the shapes matter
        a, b = raw.logits([image])[0], pruned.logits([image])[0]
        assert a.shape == (1, 40, 56)
        np.testing.assert_array_equal(a, b)


def test_the_accuracy_check_names_what_fell_too_far():
    scores = {
        "fp32": {"images": 5, "dice": 0.90, "ap50": 0.80},
        "int8": {"images": 5, "dice": 0.89, "ap50": 0.795},
    }
    report = accuracy_check("fp32", "int8", scores.get, max_dice_drop=0.005, max_ap50_drop=0.01)
    assert not report["passed"] and report["dice_drop"] == pytest.approx(0.01)
    assert "dice falls 0.0100 below fp32" in report["reason"] and "ap50" not in report["reason"]
    assert accuracy_check("fp32", "int8", scores.get, 0.02, 0.01)["passed"]


class Sleeper:
    """A stand-in network taking `ms` per image (zero logits, one channel)."""

    def __init__(self, ms: float):
        self.ms = ms

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.ms / 1000 * len(batch))
        return np.zeros((len(batch), 1, *batch.shape[2:]), np.float32)


def _folder(tmp_path: Path, check: dict | None, int8_file: bool = True) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"fp32")
    if int8_file:
        (tmp_path / INT8_FILE).write_bytes(b"int8")
    if check is not None:
        (tmp_path / INT8_REPORT).write_text(json.dumps(check))
    return tmp_path


def _opener(ms: dict[str, float]):
    return lambda path: Segmenter(Sleeper(ms["int8" if path.name == INT8_FILE else "fp32"]), PREP)


PASSED = {"passed": True, "reason": "within the allowed drop"}


@pytest.mark.parametrize(("fp32_ms", "int8_ms", "expected"), [(20, 8, "int8"), (8, 20, "fp32")])
def test_auto_serves_the_faster_variant_measured_here(tmp_path, fp32_ms, int8_ms, expected):
    folder = _folder(tmp_path, PASSED)
    segmenter, choice = choose(
        folder, "auto", _opener({"fp32": fp32_ms, "int8": int8_ms}), warmup_images(PREP, 2, 32)
    )
    assert (
        choice.precision == expected
        and segmenter._run_batch.ms == {"fp32": fp32_ms, "int8": int8_ms}[expected]
    )
    assert set(choice.ms_per_image) == {"fp32", "int8"}
    assert ("faster than fp32" if expected == "int8" else "not faster") in choice.reason
    assert choice.to_dict()["int8_check"] == PASSED


def test_auto_falls_back_to_fp32_and_says_why(tmp_path):
    failed, missing = tmp_path / "failed", tmp_path / "missing"
    failed.mkdir()
    missing.mkdir()
    opener = _opener({"fp32": 1, "int8": 1})
    _, choice = choose(
        _folder(failed, {"passed": False, "reason": "dice falls 0.0100 below fp32"}), "auto", opener, []
    )
    assert choice.precision == "fp32" and "failed export's accuracy check: dice falls" in choice.reason
    _, choice = choose(_folder(missing, None, int8_file=False), "auto", opener, [])
    assert choice.precision == "fp32" and "no INT8 variant" in choice.reason and choice.ms_per_image == {}


def test_asking_for_int8_without_a_usable_variant_is_refused(tmp_path):
    folder = _folder(tmp_path, {"passed": False, "reason": "ap50 falls"})
    with pytest.raises(UserError, match="precision int8 was asked for, but its INT8 variant failed"):
        choose(folder, "int8", _opener({"fp32": 1, "int8": 1}), [])
    with pytest.raises(UserError, match="not one of auto, fp32, int8"):
        choose(folder, "bf16", _opener({"fp32": 1, "int8": 1}), [])
    assert choose(folder, "fp32", _opener({"fp32": 1, "int8": 1}), [])[1].reason.startswith("asked for")


def test_a_small_edge_is_not_worth_switching():
    assert decide({"fp32": 10.0, "int8": 9.8})[0] == "fp32"  # 2% faster: within noise
    assert decide({"fp32": 10.0, "int8": 9.0})[0] == "int8"
    assert precision.MIN_SPEEDUP > 1
