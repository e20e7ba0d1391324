"""The training loop: augmentations, Dice + BCE or cross-entropy loss, AdamW, best checkpoint by val Dice."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.config import Params
from segflow.images import read_image
from segflow.inference import Preprocessing, Segmenter, scale_intensity, standardize, to_prediction
from segflow.metrics import class_confusions, summarize_classes
from segflow.models import build_model, model_spec
from segflow.runtime import offline_env

CHECKPOINT_FORMAT = 1


@dataclass
class Sample:
    id: str
    image: np.ndarray  # (H, W) or (H, W, C) uint8/uint16, as stored
    mask: np.ndarray  # (H, W) uint8 class ids


def load_samples(manifest: pd.DataFrame, root: Path) -> list[Sample]:
    """Read the canonical images and semantic masks a split manifest lists."""
    return [
        Sample(row.id, read_image(root / row.image), read_image(root / row.mask))
        for row in manifest.itertuples()
    ]


def preprocessing_from(params: Params) -> Preprocessing:
    """The inference contract implied by params (saved with every checkpoint)."""
    base = params.base
    return Preprocessing(
        in_channels=base.in_channels,
        mean=base.normalize.mean,
        std=base.normalize.std,
        pad_multiple=base.pad_multiple,
        threshold=params.evaluate.threshold,
        classes=list(base.classes),
        scaling=base.intensity.scaling,
        low=base.intensity.low,
        high=base.intensity.high,
    )


def build_augmentations(params: Params):
    """albumentations pipeline from params.train.augment (applied to uint8/uint16 images)."""
    offline_env()
    import albumentations as A

    aug, crop = params.train.augment, params.train.crop_size
    steps = []
    if crop:
        steps.append(A.RandomCrop(height=crop, width=crop, pad_if_needed=True))
    steps += [
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.RandomRotate90(p=aug.rotate90),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=aug.brightness_contrast),
        A.GaussNoise(std_range=(0.01, 0.04), p=aug.gauss_noise),
    ]
    return A.Compose(steps, seed=params.base.seed)


class _AugmentedDataset:
    """Torch-style dataset: augment, then the same normalisation inference applies."""

    def __init__(self, samples: list[Sample], augment, prep: Preprocessing):
        self.samples, self.augment, self.prep = samples, augment, prep

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        # Intensities are scaled exactly as inference scales them, then augmented as floats.
        out = self.augment(image=scale_intensity(s.image, self.prep), mask=s.mask)
        x = standardize(out["image"], self.prep)  # (C, h, w) float32
        return x, _target(out["mask"], len(self.prep.classes))


def train_model(
    params: Params,
    train: list[Sample],
    val: list[Sample],
    checkpoint_path: Path,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train, keeping the checkpoint with the best validation Dice.

    Args:
        params: validated params (train section and base used).
        train, val: samples from load_samples.
        checkpoint_path: where the best checkpoint is written.
        on_epoch: called with each epoch's record (epoch, train_loss, val_loss, val_dice, ...).

    Returns:
        One record per epoch.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    cfg = params.train
    torch.manual_seed(params.base.seed)
    prep = preprocessing_from(params)
    spec = model_spec(params.base, cfg)
    model = build_model(spec, cfg.encoder_weights)
    loss_fn = _make_loss(cfg.dice_weight, len(params.base.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * max(1, -(-len(train) // cfg.batch_size))
    )
    loader = DataLoader(
        _AugmentedDataset(train, build_augmentations(params), prep),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(params.base.seed),
        collate_fn=_collate,
    )
    history, best = [], -1.0
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        losses = []
        for x, y in tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        val_loss, val_dice = _validate(model, prep, val, loss_fn)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_dice": val_dice,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
        }
        if val_dice > best:
            best = val_dice
            save_checkpoint(checkpoint_path, model, spec, prep, epoch=epoch, val_dice=val_dice)
        record["best_val_dice"] = best
        history.append(record)
        print(
            f"epoch {epoch:3d}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  "
            f"val_loss {val_loss:.4f}  val_dice {val_dice:.4f}  ({record['seconds']:.1f}s)",
            flush=True,
        )
        if on_epoch:
            on_epoch(record)
    return history


def _target(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Class-id mask -> loss target: (1, h, w) float32 foreground (two classes) or (h, w) int64 ids."""
    if n_classes == 2:
        return (mask > 0).astype(np.float32)[None]
    return mask.astype(np.int64)


def _collate(batch):
    import torch

    xs, ys = zip(*batch, strict=True)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _make_loss(dice_weight: float, n_classes: int):
    """Dice + BCE on one foreground logit (two classes), Dice + cross-entropy over K logits otherwise."""
    import torch
    from segmentation_models_pytorch.losses import DiceLoss

    if n_classes == 2:
        dice, pixelwise = DiceLoss(mode="binary", from_logits=True), torch.nn.BCEWithLogitsLoss()
    else:
        dice, pixelwise = DiceLoss(mode="multiclass", from_logits=True), torch.nn.CrossEntropyLoss()

    def loss(logits, target):
        return dice_weight * dice(logits, target) + (1 - dice_weight) * pixelwise(logits, target)

    return loss


def _validate(model, prep: Preprocessing, val: list[Sample], loss_fn) -> tuple[float, float]:
    """Validation through the inference path, on whole images (no augmentation).

    Returns:
        (mean loss, Dice at the default 0.5 threshold, averaged over foreground classes).
    """
    import torch

    segmenter = Segmenter.from_torch(model, prep)
    n_classes = len(prep.classes)
    counts, losses = [], []
    for s, logit in zip(val, segmenter.logits([s.image for s in val]), strict=True):
        target = torch.from_numpy(_target(s.mask, n_classes))[None]
        losses.append(loss_fn(torch.from_numpy(logit)[None], target).item())
        pred = to_prediction(logit, threshold=0.5).mask
        counts.append(class_confusions(pred, s.mask, n_classes))
    return float(np.mean(losses)), summarize_classes(counts, list(prep.classes))["dice"]


def save_checkpoint(path: Path, model, spec: dict, prep: Preprocessing, **info) -> None:
    """Write weights, the spec to rebuild the network and the preprocessing contract."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec,
        "preprocessing": prep.to_dict(),
        "state_dict": model.state_dict(),
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
        raise ValueError(f"{path}: checkpoint format {payload.get('format')} is not supported")
    model = build_model(payload["spec"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, Preprocessing.from_dict(payload["preprocessing"])
