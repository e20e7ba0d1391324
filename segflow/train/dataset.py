"""What the network is shown: training images at the trained object size, augmented, and the
targets each one teaches (class ids, plus the interior or distance map that seeds the watershed,
and optionally where touching objects meet, which the loss weighs more)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from segflow.config import Params
from segflow.core.instances import distance_target, interior_target
from segflow.core.postprocessing import SEEDED
from segflow.core.preprocessing import Preprocessing, scale_intensity, standardize
from segflow.core.sizes import median_diameter, resize_image, resize_labels, scale_for, scaled_shape
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.runtime import offline_env

log = logging.getLogger(__name__)


def data_diameter(samples: list[Sample]) -> float:
    """The median over images of each image's typical object diameter (sizes.median_diameter),
    in pixels; 0 without instance ids. Inference's first guess for an image of unknown size."""
    found = [median_diameter(s.instances) for s in samples if s.instances is not None]
    found = [d for d in found if d]
    return float(np.median(found)) if found else 0.0


def rescale_samples(samples: list[Sample], target: float, fallback: float) -> list[Sample]:
    """Samples rescaled so each image's median object is `target` pixels across.

    An image without objects is rescaled as if its objects had the `fallback` diameter (the
    dataset's median), so background-only crops keep the dataset's usual scale.
    """
    out = []
    for s in samples:
        found = median_diameter(s.instances) if s.instances is not None else None
        shape = scaled_shape(s.image.shape, scale_for(found or fallback, target))
        instances = None if s.instances is None else resize_labels(s.instances, shape)
        out.append(Sample(s.id, resize_image(s.image, shape), resize_labels(s.mask, shape), instances))
    return out


def _resolution_loss(A, p: float):
    """An albumentations transform that shrinks the image (not the mask) by 0.5-0.9 and
    enlarges it back with probability p, keeping its dtype.

    Objects imaged at lower magnification and enlarged to the trained size at inference arrive
    blurred; this shows the model such images, resized the way inference resizes them
    (sizes.resize_image: area averaging down, bilinear up). albumentations' own Downscale
    returns 16-bit images as float, which intensity scaling would misread.
    """

    class ResolutionLoss(A.Downscale):
        def apply(self, img: np.ndarray, scale: float, **params) -> np.ndarray:
            return resize_image(resize_image(img, scaled_shape(img.shape, scale)), img.shape[:2])

    return ResolutionLoss(scale_range=(0.5, 0.9), p=p)


def build_augmentations(params: Params):
    """albumentations pipeline from params.train.augment (applied to uint8/uint16 images)."""
    offline_env()
    import albumentations as A

    aug, crop = params.train.augment, params.train.crop_size
    steps = []
    if aug.scale:  # objects of several sizes around train.diameter (or the native size)
        steps.append(A.RandomScale(scale_limit=aug.scale, p=1.0))
    if crop:
        steps.append(A.RandomCrop(height=crop, width=crop, pad_if_needed=True))
    steps += [
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.RandomRotate90(p=aug.rotate90),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=aug.brightness_contrast),
        A.GaussNoise(std_range=(0.01, 0.04), p=aug.gauss_noise),
    ]
    if aug.downscale:
        steps.append(_resolution_loss(A, aug.downscale))
    return A.Compose(steps, seed=params.base.seed)


class AugmentedDataset:
    """Torch-style dataset: augment, then the same normalisation inference applies."""

    def __init__(
        self,
        samples: list[Sample],
        augment,
        prep: Preprocessing,
        interior_margin: int,
        repeats: int = 1,
        borders: bool = False,
        sampling: str = "uniform",
    ):
        self.samples, self.augment, self.prep = samples, augment, prep
        # Interior targets come from whole images, so a crop's border is not taken for an edge.
        self.labels = [sample_labels(s, prep, interior_margin, borders) for s in samples]
        # Which image each item of an epoch crops (each item is another random crop).
        self.order = crop_order(samples, repeats, sampling, interior_margin)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        i = self.order[i]
        s = self.samples[i]
        # Intensities are scaled exactly as inference scales them, then augmented as floats.
        out = self.augment(image=scale_intensity(s.image, self.prep), mask=self.labels[i])
        x = standardize(out["image"], self.prep)  # (C, h, w) float32
        return x, loss_targets(out["mask"], len(self.prep.classes))


def crop_order(samples: list[Sample], repeats: int, sampling: str, radius: int) -> list[int]:
    """The sample index of each of an epoch's len(samples) x repeats crops.

    "uniform": every image `repeats` times (0, 1, ..., n-1, 0, 1, ...). "contacts": every image
    once, and the other n x (repeats - 1) crops in proportion to each image's touching_band
    pixels (largest remainders rounded up), so an image of many touching objects is cropped
    often and one of a few isolated objects once. Same epoch length, so the same steps.
    """
    n = len(samples)
    if sampling == "uniform":
        return list(range(n)) * repeats
    if any(s.instances is None for s in samples):
        raise UserError(
            "train.crop_sampling contacts needs instance ids in every training image; set it to uniform"
        )
    touching = np.array([touching_band(s.instances, radius).sum() for s in samples], float)
    extra = n * (repeats - 1)
    if not touching.sum():
        log.warning(
            "train.crop_sampling contacts: no objects touch in any training image; crops dealt uniformly"
        )
        return list(range(n)) * repeats
    share = touching / touching.sum() * extra
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share, kind="stable")[: extra - counts.sum()]] += 1  # largest remainders
    log.info(
        "crops per epoch, by where objects touch: %s",
        {s.id: 1 + int(c) for s, c in zip(samples, counts, strict=True)},
    )
    return [i for i in range(n) for _ in range(1 + counts[i])]


def sample_labels(
    sample: Sample, prep: Preprocessing, interior_margin: int, borders: bool = False
) -> np.ndarray:
    """What a sample teaches: (H, W) uint8 class ids, or for watershed and distance models
    (H, W, 2) uint8 class ids + the seed target scaled to 0-255 (interior 0/255, or distance),
    and with `borders` a third channel, 255 on touching_band(instances, interior_margin)."""
    if prep.instances not in SEEDED:
        return sample.mask
    if sample.instances is None:
        raise UserError(
            f"{sample.id}: inference.instances is {prep.instances} but the dataset has no instance ids; "
            "use instance masks (ingest.mask_kind: instance, or COCO) or set inference.instances: components"
        )
    if prep.instances == "distance":
        seed = np.round(distance_target(sample.instances) * 255)
    else:
        seed = interior_target(sample.instances, interior_margin) * 255
    channels = [sample.mask, seed.astype(np.uint8)]
    if borders:
        channels.append(touching_band(sample.instances, interior_margin).astype(np.uint8) * 255)
    return np.dstack(channels)


def touching_band(instances: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) instance ids -> (H, W) bool: pixels with two different objects within `radius`
    pixels (a (2 radius + 1)-pixel square): the line where touching objects meet and the narrow
    gaps between close ones.

    Why weigh them: they are few (a few percent of a dense image's pixels), so an unweighted
    loss barely notices a seed map that stays high across them, yet that is exactly where
    touching nuclei merge into one object. U-Net weighs the gaps between touching cells for the
    same reason.
    """
    objects = instances > 0
    if not objects.any():
        return np.zeros(instances.shape, bool)
    ids = instances.astype(np.float32)  # exact up to 2**24 ids
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    highest = cv2.dilate(ids, kernel)  # the largest id in each window (0 where none)
    # The smallest id in each window, background read as "no id".
    lowest = cv2.erode(np.where(objects, ids, np.float32(2**24)), kernel)
    return highest > lowest  # two different ids in the window (lowest stays 2**24 where none)


def loss_targets(labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Labels from `sample_labels` -> loss targets.

    Returns:
        "semantic": (1, h, w) float32 foreground (two classes) or (h, w) int64 class ids;
        "interior" (watershed and distance): (1, h, w) float32 in [0, 1];
        "border" (when sample_labels added borders): (1, h, w) float32, 1 on the touching band.
    """
    mask = labels[..., 0] if labels.ndim == 3 else labels
    target = {"semantic": (mask > 0).astype(np.float32)[None] if n_classes == 2 else mask.astype(np.int64)}
    if labels.ndim == 3:
        target["interior"] = (labels[..., 1].astype(np.float32) / 255.0)[None]
    if labels.ndim == 3 and labels.shape[2] > 2:
        target["border"] = (labels[..., 2] > 127).astype(np.float32)[None]
    return target


def collate(batch):
    import torch

    xs, ys = zip(*batch, strict=True)
    return torch.from_numpy(np.stack(xs)), {k: torch.from_numpy(np.stack([y[k] for y in ys])) for k in ys[0]}
