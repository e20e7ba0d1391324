"""A deterministic synthetic phase-contrast microscopy dataset.

Why synthetic: the project must run offline from a clean clone, so its default dataset is
generated, not downloaded. It imitates what makes phase contrast hard: cells whose
interior is barely different from the background (some darker, some brighter), bright
halos just *outside* each cell, inner texture and nuclei, touching neighbours, uneven
illumination, blur and noise. A global intensity threshold mostly finds halos, not cells.

Each image i is drawn from its own seed (seed, i), so the first n images do not depend on
how many are generated, and the bytes are identical on every run (data.dvc relies on it).

A second imaging domain, "shifted", draws the same kind of cells and masks but images them
as another microscope would: stronger uneven illumination and vignetting, a darker
background, less contrast between cells and background, weaker and narrower halos, more
blur and noise. It is an evaluation set for domain shift: a model trained on the default
domain should lose some, not all, of its accuracy there. Its images come from their own
stream (seed, i, 1), so they show other cells than the default images of the same index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from segflow.errors import UserError


@dataclass(frozen=True)
class Imaging:
    """How one domain's microscope renders cells; each pair is a uniform range per image.

    The default domain's values are the generator's original constants, drawn in the
    original order, so its bytes never change; `vignetting` and `offset` are None there
    because drawing them would move every later draw of the default stream.
    """

    stream: tuple[int, ...]  # appended to (seed, index) to seed the image's generator
    background: tuple[float, float]
    tilt: float  # largest slope of the illumination plane, per image side
    spot: tuple[float, float]  # peak of the broad bright illumination spot
    halo_width: tuple[float, float]  # pixels over which the halo fades
    halo_strength: tuple[float, float]
    body_offset: tuple[float, float]  # cell interior minus background, per cell
    texture: tuple[float, float]
    nucleus: tuple[float, float]  # how much darker the nucleus is
    rim: float  # darkening of the cell's inner edge
    blur: tuple[float, float]  # Gaussian sigma in pixels
    noise: tuple[float, float]  # Gaussian noise sigma, in [0, 1] intensity units
    vignetting: tuple[float, float] | None = None  # darkening at the corners, relative
    offset: tuple[float, float] | None = None  # added after illumination (stray light, bias)


DOMAINS: dict[str, Imaging] = {
    "default": Imaging(
        stream=(),
        background=(0.42, 0.55),
        tilt=0.25,
        spot=(0.05, 0.2),
        halo_width=(2.0, 4.0),
        halo_strength=(0.22, 0.38),
        body_offset=(-0.16, 0.06),
        texture=(0.04, 0.12),
        nucleus=(0.03, 0.1),
        rim=0.08,
        blur=(0.7, 1.4),
        noise=(0.02, 0.045),
    ),
    # Another microscope: every cue the default domain offers is still there, only weaker
    # or buried under illumination, blur and noise.
    "shifted": Imaging(
        stream=(1,),
        background=(0.32, 0.42),
        tilt=0.35,
        spot=(0.0, 0.1),
        halo_width=(1.8, 3.2),
        halo_strength=(0.12, 0.22),
        body_offset=(-0.12, 0.05),
        texture=(0.03, 0.08),
        nucleus=(0.03, 0.08),
        rim=0.06,
        blur=(1.1, 1.8),
        noise=(0.03, 0.05),
        vignetting=(0.2, 0.35),
        offset=(0.03, 0.08),
    ),
}


@dataclass(frozen=True)
class SampleSpec:
    """What to generate; defaults are the embedded dataset tracked by data.dvc.

    `domain` picks how cells are imaged: "default" (the embedded dataset) or "shifted"
    (another microscope, for domain-shift evaluation); see DOMAINS.
    """

    count: int = 120
    size: int = 256
    seed: int = 2024
    min_cells: int = 8
    max_cells: int = 22
    min_radius: float = 9.0
    max_radius: float = 22.0
    domain: str = "default"

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise UserError(
                f"unknown sample domain {self.domain!r}; choose one of {', '.join(sorted(DOMAINS))}"
            )


def generate_sample(out_dir: str | Path, spec: SampleSpec = SampleSpec()) -> list[Path]:
    """Write `spec.count` image/mask pairs under out_dir/images and out_dir/masks.

    Images are 8-bit grayscale PNGs; masks are 16-bit PNG instance ids (0 = background,
    1..n one per cell). Existing files of the same name are replaced; nothing else in
    out_dir is touched.

    Returns:
        The image paths written.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(spec.count):
        image, instances = render_image(spec, i)
        name = f"cells_{i:04d}.png"
        Image.fromarray(image).save(out / "images" / name, optimize=False, compress_level=6)
        Image.fromarray(instances).save(out / "masks" / name, optimize=False, compress_level=6)
        written.append(out / "images" / name)
    return written


def render_image(spec: SampleSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image.

    Returns:
        image: (H, W) uint8 phase-contrast-like intensities.
        instances: (H, W) uint16 instance ids, 0 = background.
    """
    imaging = DOMAINS[spec.domain]
    rng = np.random.default_rng([spec.seed, index, *imaging.stream])
    size = spec.size
    instances = _place_cells(rng, spec)  # (H, W) uint16
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    # Background with slow uneven illumination: a tilted plane plus a broad bright spot.
    background = rng.uniform(*imaging.background)
    tilt = rng.uniform(-imaging.tilt, imaging.tilt, size=2)
    cy, cx = rng.uniform(0, 1, size=2)
    spot = rng.uniform(*imaging.spot) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.15)
    illumination = 1.0 + tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5) + spot
    if imaging.vignetting is not None:
        # Radial fall-off: 1 at the centre, 1 - strength in the corners.
        corner_distance = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.5
        illumination *= 1.0 - rng.uniform(*imaging.vignetting) * corner_distance

    image = np.full((size, size), background, np.float32)
    image += _halos(rng, instances, imaging)
    image += _cell_bodies(rng, instances, imaging)
    image *= illumination
    if imaging.offset is not None:
        image += rng.uniform(*imaging.offset)
    image = ndi.gaussian_filter(image, rng.uniform(*imaging.blur))
    image += rng.normal(0, rng.uniform(*imaging.noise), image.shape).astype(np.float32)
    image = np.clip(image * 255.0, 0, 255).round().astype(np.uint8)
    return image, instances


def _place_cells(rng: np.random.Generator, spec: SampleSpec) -> np.ndarray:
    """Irregular elliptical cells; later cells may press against earlier ones (touching)."""
    size = spec.size
    instances = np.zeros((size, size), np.uint16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centres: list[tuple[float, float, float]] = []
    target = int(rng.integers(spec.min_cells, spec.max_cells + 1))
    for _ in range(target * 20):
        if len(centres) == target:
            break
        r = rng.uniform(spec.min_radius, spec.max_radius)
        cy, cx = rng.uniform(r * 0.5, size - r * 0.5, size=2)
        # Allow overlap up to ~25% of the radii so neighbours touch, not stack.
        if any(np.hypot(cy - y, cx - x) < 0.75 * (r + q) for y, x, q in centres):
            continue
        centres.append((cy, cx, r))
        label = len(centres)
        angle = np.arctan2(yy - cy, xx - cx)
        theta = rng.uniform(0, np.pi)
        aspect = rng.uniform(0.6, 1.0)
        # Elongation plus two low-order harmonics make irregular, cell-like outlines.
        wobble = 1.0 + sum(
            rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (3, 5)
        )
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
        inside = np.hypot(u, v) <= r * wobble
        instances[inside & (instances == 0)] = label
    return instances


def _halos(rng: np.random.Generator, instances: np.ndarray, imaging: Imaging) -> np.ndarray:
    """Bright rings just outside each cell, fading over a few pixels (the phase halo)."""
    foreground = instances > 0
    outside_distance = ndi.distance_transform_edt(~foreground)
    width = rng.uniform(*imaging.halo_width)
    strength = rng.uniform(*imaging.halo_strength)
    halo = strength * np.exp(-outside_distance / width)
    halo[foreground] = 0.0
    return halo.astype(np.float32)


def _cell_bodies(rng: np.random.Generator, instances: np.ndarray, imaging: Imaging) -> np.ndarray:
    """Per-cell offsets close to the background, a dark rim, texture and a nucleus."""
    body = np.zeros(instances.shape, np.float32)
    texture = ndi.gaussian_filter(rng.normal(0, 1, instances.shape), 1.5).astype(np.float32)
    inside_distance = ndi.distance_transform_edt(instances > 0)
    for label in range(1, int(instances.max()) + 1):
        cell = instances == label
        if not cell.any():
            continue
        # Mostly darker than the background, sometimes slightly brighter: no single
        # threshold separates every cell.
        body[cell] += rng.uniform(*imaging.body_offset)
        body[cell] += rng.uniform(*imaging.texture) * texture[cell]
        ys, xs = np.nonzero(cell)
        ny, nx = ys.mean() + rng.normal(0, 2), xs.mean() + rng.normal(0, 2)
        nucleus = (ys - ny) ** 2 + (xs - nx) ** 2 <= (0.35 * np.sqrt(cell.sum() / np.pi)) ** 2
        body[ys[nucleus], xs[nucleus]] -= rng.uniform(*imaging.nucleus)
    # A thin dark rim on the inner edge of every cell, as phase contrast shows membranes.
    rim = (inside_distance > 0) & (inside_distance <= 1.5)
    body[rim] -= imaging.rim
    return body
