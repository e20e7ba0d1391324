"""Checkpoints: the trained network with the inference contract it was trained under, and
the Segmenter that runs it through the same inference path as ONNX Runtime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing
from segflow.errors import UserError
from segflow.train.models import build_model

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, model, spec: dict, prep: Preprocessing, **info) -> None:
    """Write weights, the spec to rebuild the network and the preprocessing contract.

    Args:
        path: the checkpoint file (written beside, then renamed).
        model: the network, or its state_dict.
        spec, prep: what load_checkpoint rebuilds the network and its inference from.
        info: extra entries (epoch, val_dice).
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec,
        "preprocessing": prep.to_dict(),
        "state_dict": model if isinstance(model, dict) else model.state_dict(),
        **info,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: str | Path):
    """Returns (model in eval mode, Preprocessing) from a checkpoint written by save_checkpoint."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; run `dvc repro train` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: checkpoint format {payload.get('format')} is not supported")
    model = build_model(payload["spec"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, Preprocessing.from_dict(payload["preprocessing"])


def checkpoint_info(path: str | Path) -> dict:
    """A checkpoint's entries beside its weights and contract: spec, epoch, val_dice,
    size_head_error (with a size head), ..."""
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in payload.items() if k not in ("format", "preprocessing", "state_dict")}


def size_head_metrics(path: str | Path) -> dict[str, float]:
    """{"size_head_error": its leave-one-image-out mean |log error|} for a checkpoint with a
    size head (the model's row in `mlflow ui`, artifacts/model/summary.json); {} without one."""
    error = checkpoint_info(path).get("size_head_error")
    return {} if error is None else {"size_head_error": round(error, 4)}


def add_size_head(path: Path, samples: list) -> None:
    """Fit a size head (segflow.train.sizehead) for the checkpoint's network on `samples` and
    save it into the checkpoint, its output named in the preprocessing contract, and its
    leave-one-image-out mean |log error| as the entry size_head_error."""
    from segflow.train.sizehead import SIZE_OUTPUT, fit_size_head

    model, prep = load_checkpoint(path)
    head = fit_size_head(model, prep, samples)
    if head is None:
        return
    model.size_head = head
    info = checkpoint_info(path) | {"size_head_error": head.held_out_error}
    spec = {**info.pop("spec"), "size_head": head.weight.numel()}
    save_checkpoint(path, model, spec, replace(prep, size_output=SIZE_OUTPUT), **info)


def torch_segmenter(model, prep: Preprocessing, batch_size: int = 8) -> Segmenter:
    """A Segmenter over a torch module (evaluation, the parity check, training's validation)."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            out = model(torch.from_numpy(batch)).float().numpy()
        model.train(was_training)
        return out

    def estimate(batch: np.ndarray) -> np.ndarray:  # the size head, as the ONNX graph's second output
        from segflow.train.sizehead import WithSize

        model.eval()  # only fitted models have a size head: they are not training
        with torch.inference_mode():
            return WithSize(model)(torch.from_numpy(batch))[1].float().numpy()

    return Segmenter(run, prep, batch_size, estimate if prep.size_output else None)


def checkpoint_segmenter(path: str | Path, batch_size: int = 8) -> Segmenter:
    """A Segmenter over a training checkpoint (artifacts/model/model.pt)."""
    model, prep = load_checkpoint(path)
    return torch_segmenter(model, prep, batch_size)
