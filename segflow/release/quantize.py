"""An INT8 variant of the exported model, shipped only if it segments like the fp32 one.

Static quantization with ONNX Runtime: weights int8 per output channel, activations uint8,
calibrated (min-max) on training images, in the QOperator format (QLinearConv and friends).
Weights use 7 of their 8 bits (`reduce_range`): CPUs without VNNI (AVX2, plain AVX-512) sum
u8 x s8 products pairwise in 16 bits, which full-range weights overflow. The file is made
once and served anywhere, so it must be right on both; on a 2-core AVX2 machine full-range
weights put a small convolutional net a third of its output range off fp32, 7-bit ones 2.6%
(tests/unit/test_precision.py).
On CPUs with AVX-512 VNNI these run integer dot products and a U-Net runs about 2.4x the fp32
images per second; QDQ with int8 activations gave no speed-up on the same CPU (issue 14). A
2-core AVX2 machine without VNNI ran the sample U-Net 1.7x fp32 but a small 64x64 network
slower in INT8, which is why the service measures before choosing (segflow.serve.precision).
`quant_pre_process` first folds and shape-infers the graph, as
ONNX Runtime recommends.

The accuracy check runs both models through segflow.core.inference with the tuned
post-processing on the validation split: a variant whose Dice or AP50 falls further below
fp32's than export.int8 allows is deleted, and the reason is recorded in int8.json (the
service reads it: segflow.serve.precision).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing, normalize
from segflow.core.sizes import median_diameter, resize_planes, scale_for, scaled_shape
from segflow.core.tiling import pad_to_multiple
from segflow.serve.precision import FP32_FILE, INT8_FILE, INT8_REPORT

log = logging.getLogger(__name__)


def calibration_inputs(
    images: Sequence[np.ndarray],
    instances: Sequence[np.ndarray | None],
    prep: Preprocessing,
    count: int,
    size: int,
) -> list[np.ndarray]:
    """Up to `count` model inputs (1, C, size, size) as the model sees them at inference:
    normalised, rescaled to the trained object size, padded; a centre crop of each image."""
    inputs = []
    for image, ids in list(zip(images, instances, strict=True))[:count]:
        x = normalize(image, prep)
        if prep.train_diameter and ids is not None:
            scale = scale_for(median_diameter(ids), prep.train_diameter)
            x = resize_planes(x, scaled_shape(x.shape[1:], scale))
        x = pad_to_multiple(x, prep.pad_multiple)
        h, w = x.shape[1:]
        top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
        crop = x[:, top : top + size, left : left + size]
        inputs.append(pad_to_multiple(crop, prep.pad_multiple)[None].astype(np.float32))
    return inputs


def quantize(fp32: Path, int8: Path, inputs: list[np.ndarray], input_name: str) -> None:
    """Write the static INT8 (QOperator, u8 activations, 7-bit s8 per-channel weights) variant."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(inputs)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="segflow-int8-") as tmp, _quiet_root_logger():
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=_size_head_nodes(prepared),
        )
        write_without_shape_dequantization(quantized, int8)


def _size_head_nodes(model: Path) -> list[str]:
    """The size head's nodes (segflow.train.sizehead), which stay in float: one dot product
    over averaged features costs nothing, and ONNX Runtime's QLinearMatMul refuses the
    per-channel zero points a weight vector would get."""
    import onnx

    return [node.name for node in onnx.load(str(model)).graph.node if "size_head" in node.name]


def write_without_shape_dequantization(quantized: Path, out: Path) -> int:
    """Save `quantized` to `out` with every DequantizeLinear whose result only feeds Shape
    nodes removed (those Shape nodes read the integer tensor instead); returns how many.

    The quantizer dequantizes a whole feature map wherever the fp32 graph took its shape (the
    U-Net decoder sizes each upsampling by its skip connection): in a 256x256 U-Net that is
    millions of floats written per image only to read four integers, about 9% of the INT8
    model's time on a 2-core VNNI machine. A shape is the same for the integer tensor, so
    outputs are unchanged.
    """
    import onnx

    model = onnx.load(str(quantized))
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    removed = []
    for node in graph.node:
        users = readers.get(node.output[0], []) if node.op_type == "DequantizeLinear" else []
        if users and node.output[0] not in graph_outputs and all(u.op_type == "Shape" for u in users):
            for user in users:
                user.input[0] = node.input[0]
            removed.append(node)
    for node in removed:
        graph.node.remove(node)
    onnx.save(model, str(out))
    return len(removed)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer warns on the root logger for every integer shape tensor it leaves alone
    (the decoder's resize sizes): expected, and dozens of lines. Errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def accuracy_check(
    fp32: Segmenter, int8: Segmenter, score, max_dice_drop: float, max_ap50_drop: float
) -> dict:
    """Score both segmenters with `score` (segmenter -> summary dict on the validation split)
    and decide whether the INT8 one may ship."""
    reference, candidate = score(fp32), score(int8)
    report = {"images": int(reference["images"])}
    reasons = []
    for metric, allowed in (("dice", max_dice_drop), ("ap50", max_ap50_drop)):
        if metric not in reference:
            continue  # AP50 needs instance ids
        drop = float(reference[metric]) - float(candidate[metric])
        report[f"{metric}_fp32"] = round(float(reference[metric]), 6)
        report[f"{metric}_int8"] = round(float(candidate[metric]), 6)
        report[f"{metric}_drop"] = round(drop, 6)
        if drop > allowed:
            reasons.append(
                f"{metric} falls {drop:.4f} below fp32 (export.int8.max_{metric}_drop is {allowed:g})"
            )
    report["passed"] = not reasons
    report["reason"] = "; ".join(reasons) or "within the allowed drop of fp32 on the validation split"
    return report


def int8_variant(cfg, fp32: Segmenter, folder: Path, train: Sequence, val: Sequence) -> dict:
    """Quantize folder/model.onnx (calibrated on `train` samples), check it against `fp32` on
    the `val` samples, and keep folder/INT8_FILE only if it passed; INT8_REPORT records the
    check either way (the service reads it). `cfg` is params.export.int8."""
    from segflow.evaluate.scoring import score_predictions

    prep = fp32.prep
    inputs = calibration_inputs(
        [s.image for s in train],
        [s.instances for s in train],
        prep,
        cfg.calibration_images,
        cfg.calibration_size,
    )
    quantize(folder / FP32_FILE, folder / INT8_FILE, inputs, prep.input_name)

    def score(segmenter: Segmenter) -> dict:
        predictions = segmenter.predict([s.image for s in val])
        return score_predictions(predictions, list(val), list(prep.classes), "val").summary

    int8 = Segmenter.from_onnx(folder / INT8_FILE, prep)
    report = accuracy_check(fp32, int8, score, cfg.max_dice_drop, cfg.max_ap50_drop)
    (folder / INT8_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"]:
        (folder / INT8_FILE).unlink()
    return report
