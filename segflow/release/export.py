"""ONNX export with dynamic batch/height/width, and the parity check against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segflow.artifacts import write_json
from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing, normalize
from segflow.core.sizes import size_view
from segflow.errors import UserError
from segflow.release.quantize import int8_variant
from segflow.serve.monitoring import REFERENCE_FILE, profile_model
from segflow.train.checkpoints import torch_segmenter
from segflow.train.sizehead import WithSize


class ParityError(UserError):
    """ONNX Runtime and torch disagree by more than the allowed tolerance."""


def export_onnx(model, prep: Preprocessing, path: Path, opset: int, ir_version: int) -> None:
    """Write `model` as ONNX with dynamic N, H and W.

    The TorchScript-based exporter is used: it handles smp's decoders with symbolic H/W
    reliably. The IR version is lowered to one the pinned onnxruntime loads.
    """
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(1, prep.in_channels, 2 * prep.pad_multiple, 2 * prep.pad_multiple)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    outputs = {prep.output_name: {0: "batch", 2: "height", 3: "width"}}
    if prep.size_output:  # the size head: a second output from the same encoder pass
        model = WithSize(model)
        outputs[prep.size_output] = {0: "batch"}
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=[prep.input_name],
        output_names=list(outputs),
        dynamic_axes={prep.input_name: {0: "batch", 2: "height", 3: "width"}, **outputs},
        opset_version=opset,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    proto.ir_version = ir_version
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    tmp.unlink()


def check_parity(
    torch_segmenter: Segmenter, onnx_segmenter: Segmenter, images: list[np.ndarray], atol: float
) -> dict:
    """Compare logits of both backends on the same images through the inference path.

    Returns:
        {"max_abs_diff", "mean_abs_diff", "images", "atol", "passed"}.

    Raises:
        ParityError: when the largest difference exceeds atol.
    """
    if not images:
        raise ValueError("parity check needs at least one image")
    # Size-normalised models: both at the training data's usual scale. Each backend's own size
    # estimate could round to another scale near a threshold, which would compare two scales,
    # not two backends.
    diameters = [torch_segmenter.prep.data_diameter or None] * len(images)
    pairs = zip(
        torch_segmenter.logits(images, diameters), onnx_segmenter.logits(images, diameters), strict=True
    )
    diffs = [np.abs(a - b) for a, b in pairs]
    report = {
        # np.max, not max(): a NaN anywhere must propagate and fail the check.
        "max_abs_diff": float(np.max([d.max() for d in diffs])),
        "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
        "images": len(images),
        "atol": atol,
    }
    report["passed"] = bool(np.isfinite(report["max_abs_diff"]) and report["max_abs_diff"] <= atol)
    if not report["passed"]:
        raise ParityError(
            f"ONNX logits differ from torch by up to {report['max_abs_diff']:.3g} "
            f"(export.parity_atol is {atol:g}); the exported model does not reproduce the "
            "trained one: check the opset (export.opset) and custom layers"
        )
    if torch_segmenter.prep.size_output:
        report["size_max_abs_diff"] = _size_parity(torch_segmenter, onnx_segmenter, images)
    return report


# The size heads' estimates (log diameter) may differ by this much: 0.1% of an object's size,
# far below what changes a rescaled image by one pixel.
SIZE_ATOL = 1e-3


def _size_parity(torch_segmenter: Segmenter, onnx_segmenter: Segmenter, images: list[np.ndarray]) -> float:
    """The largest difference between both backends' size-head estimates on `images`.

    Raises:
        ParityError: above SIZE_ATOL.
    """
    prep = torch_segmenter.prep
    views = [size_view(normalize(image, prep), prep.pad_multiple)[None] for image in images]
    diff = float(
        np.max([np.abs(torch_segmenter.estimate(v) - onnx_segmenter.estimate(v)).max() for v in views])
    )
    if not (np.isfinite(diff) and diff <= SIZE_ATOL):
        raise ParityError(
            f"the exported size head's estimates differ from torch's by up to {diff:.3g} (log diameter; "
            f"{SIZE_ATOL:g} allowed): the exported model does not reproduce the trained one"
        )
    return diff


def write_export(cfg, model, prep: Preprocessing, out: Path, train, test, val) -> tuple[dict, dict | None]:
    """What the export stage ships, in `out`: model.onnx, preprocessing.json, parity.json, the
    drift reference (the model's profile on the training images) and, with export.int8, the
    INT8 variant checked on `val`.

    Returns:
        The parity report, and the INT8 report (None without export.int8).

    Raises:
        ParityError: ONNX and torch disagree on the test images; nothing is registered.
    """
    export_onnx(model, prep, out / "model.onnx", cfg.opset, cfg.ir_version)
    prep.save(out / "preprocessing.json")
    onnx = Segmenter.from_onnx(out / "model.onnx", prep)
    parity = check_parity(torch_segmenter(model, prep), onnx, [s.image for s in test], cfg.parity_atol)
    write_json(out / "parity.json", parity)
    write_json(out / REFERENCE_FILE, profile_model(onnx, [s.image for s in train]))
    int8 = int8_variant(cfg.int8, onnx, out, train, val) if cfg.int8.enabled else None
    return parity, int8
