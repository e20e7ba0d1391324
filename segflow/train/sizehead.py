"""The size head: a ridge regression from a trained network's deepest encoder features to the
size of the objects it is shown, a second start for inference.diameter auto.

inference.diameter auto measures each image's objects in the model's own output and rescales
until they match the trained size (segflow.core.inference). That has fixed points: a model
that cuts large nuclei into pieces of the trained size reads them at the trained size and
stays. Cellpose answers size with a separate regression on its network's style vector; here
the trained network's encoder, averaged over the image, feeds a linear regression fitted
after training on the training and validation images shown at 0.5x-2x the trained size.
It lives in the network (`size_head`, in the checkpoint and the ONNX graph as a second
output), so the service needs nothing besides model.onnx.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from segflow.core.preprocessing import Preprocessing, normalize
from segflow.core.sizes import median_diameter, resize_planes, scaled_shape, size_view
from segflow.data.samples import Sample

log = logging.getLogger(__name__)

# The sizes each fitting image is shown at, as multiples of the trained object size: the
# range inference.diameter auto's estimates clip to (4x either way) is wider, but a model
# shown objects beyond 2x sees them too poorly for its features to say more than "large".
RATIOS = np.exp(np.linspace(np.log(0.5), np.log(2.0), 5))
# Ridge penalties tried; leave-one-image-out error picks one.
PENALTIES = (1.0, 10.0, 100.0, 1000.0, 10000.0)
SIZE_OUTPUT = "log_size"  # the ONNX output's name (Preprocessing.size_output)


class SizeHead(torch.nn.Module):
    """Standardised pooled features -> log(object diameter as shown / trained diameter)."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.register_buffer("weight", torch.zeros(features))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (N, features) -> (N,)
        return ((pooled - self.mean) / self.scale) @ self.weight + self.bias


def networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The smp networks in `model`: its members for a seed ensemble, else itself."""
    return list(model.members) if hasattr(model, "members") else [model]


class WithSize(torch.nn.Module):
    """`model` with two outputs: its logits and its size head's estimate, from one pass.

    The encoders' deepest features are caught on their way to the decoders, so the ONNX
    graph computes the encoder once for both outputs.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = logits_and_features(self.model, x)
        return logits, self.model.size_head(pooled)


def logits_and_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits, and its networks' deepest encoder features averaged over the image,
    (N, features), the members' side by side."""
    caught: list[torch.Tensor] = []

    def catch(_module, _inputs, features):
        caught.append(features[-1].float().mean(dim=(2, 3)))

    hooks = [net.encoder.register_forward_hook(catch) for net in networks(model)]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, torch.cat(caught, dim=1)


def fit_size_head(model: torch.nn.Module, prep: Preprocessing, samples: list[Sample]) -> SizeHead | None:
    """Fit a SizeHead for `model` (eval mode, float32) on `samples` with instance ids, each
    shown at RATIOS times the trained size; None with fewer than three such images.

    The penalty is the one with the smallest leave-one-image-out mean |log error|, logged
    (0.18-0.19 on the dsb subset's folds: sizes within about 20%)."""
    usable = [s for s in samples if s.instances is not None and median_diameter(s.instances)]
    if len(usable) < 3:
        log.warning("size head: %d image(s) with objects, 3 needed; not fitted", len(usable))
        return None
    features, targets, images = [], [], []
    for k, sample in enumerate(usable):
        x = normalize(sample.image, prep)
        natural = prep.train_diameter / median_diameter(sample.instances)  # shows objects at the trained size
        for ratio in RATIOS:
            view = size_view(resize_planes(x, scaled_shape(x.shape[1:], natural * ratio)), prep.pad_multiple)
            with torch.inference_mode():
                _, pooled = logits_and_features(model, torch.from_numpy(view[None]))
            features.append(pooled[0].numpy().astype(np.float64))
            targets.append(np.log(ratio))
            images.append(k)
    X, y, groups = np.array(features), np.array(targets), np.array(images)
    errors = {penalty: _leave_one_image_out(X, y, groups, penalty) for penalty in PENALTIES}
    penalty = min(errors, key=errors.get)
    log.info(
        "size head: %d images x %d sizes, ridge penalty %g, leave-one-image-out mean |log error| %.3f",
        len(usable), len(RATIOS), penalty, errors[penalty],
    )  # fmt: skip
    mean, scale, weight, bias = _ridge(X, y, penalty)
    head = SizeHead(X.shape[1])
    head.held_out_error = float(errors[penalty])  # not a buffer: the checkpoint keeps it as info
    for name, value in (("mean", mean), ("scale", scale), ("weight", weight), ("bias", bias)):
        getattr(head, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return head


def _ridge(X: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge regression on standardised features: (mean, scale, weight, bias). Solved in its
    dual form: a few hundred rows against a thousand features.

    No feature is scaled up by more than a tenth of the features' mean spread: a channel
    nearly constant on the fitting images (a dead filter of a briefly trained network) would
    otherwise multiply any change, such as the INT8 variant's rounding, by thousands. On a
    dsb fold's model (spreads 0.06-8.1) the floor leaves the held-out error as it was (0.185
    against 0.187)."""
    mean, spread = X.mean(axis=0), X.std(axis=0)
    scale = np.maximum(spread, 0.1 * spread.mean()) + 1e-12  # 1e-12: features all constant
    Z = (X - mean) / scale
    bias = float(y.mean())
    dual = np.linalg.solve(Z @ Z.T + penalty * np.eye(len(Z)), y - bias)
    return mean, scale, Z.T @ dual, bias


def _leave_one_image_out(X: np.ndarray, y: np.ndarray, groups: np.ndarray, penalty: float) -> float:
    """Mean |log error| on each image's rows of a regression fitted without that image."""
    errors = []
    for group in np.unique(groups):
        held = groups == group
        mean, scale, weight, bias = _ridge(X[~held], y[~held], penalty)
        errors.append(np.abs((X[held] - mean) / scale @ weight + bias - y[held]))
    return float(np.mean(np.concatenate(errors)))
