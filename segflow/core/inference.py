"""The one inference path: preprocess -> model -> postprocess.

evaluate, export's parity check, the CLI and the service all go through `Segmenter`, so
what is measured is what is served. The model is anything that maps a (N, C, H, W)
float32 batch to (N, K, H, W) float32 logits: a torch module or an ONNX Runtime session.
The steps either side of the model are segflow.core.preprocessing (image -> model input, as
preprocessing.json says) and segflow.core.postprocessing (logits -> mask and objects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from segflow.core.postprocessing import Prediction, to_prediction
from segflow.core.preprocessing import Preprocessing, normalize
from segflow.core.sizes import (
    predicted_diameter,
    resize_planes,
    scale_for,
    scaled_shape,
    shared_outline,
    size_view,
    solid_fraction,
)
from segflow.core.tiling import tiled_logits
from segflow.core.tta import averaged_logits
from segflow.errors import UserError

log = logging.getLogger(__name__)

# Model passes at most per image whose object size is estimated (inference.diameter: auto).
# Most images settle after one or two; objects several times the trained size are measured a
# little larger each pass (a model sees them only in part), and three passes left the dsb
# subset's 96-pixel nuclei at half their size, cut in pieces; five brought them to three
# quarters, where the model sees them whole. An estimate that swings (neighbours merged at one
# size, apart at the next) spends all five and keeps the last; inference.diameter_choices is
# the check for that.
SIZE_PASSES = 5


class Segmenter:
    """Segments images with any backend that maps (N, C, H, W) -> (N, K, H, W) logits.

    A size-normalised model may also carry a size head (prep.size_output): `estimate_batch`
    maps (N, C, h, w) -> (N,) log(object diameter as shown / prep.train_diameter).
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        prep: Preprocessing,
        batch_size: int = 8,
        estimate_batch: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self._run_batch = run_batch
        self._estimate_batch = estimate_batch
        self.prep = prep
        self.batch_size = batch_size
        # Size-normalised models enlarge images of small objects (up to 4x per side); the service
        # sets this to serve.max_pixels so no request grows past what it would accept.
        self.max_pixels = 0  # 0 = no limit

    @classmethod
    def from_onnx(
        cls, model_path: str | Path, prep: Preprocessing | str | Path, threads: int = 0
    ) -> Segmenter:
        """Open an ONNX model with ONNX Runtime on the CPU.

        Args:
            model_path: model.onnx.
            prep: a Preprocessing, or the path of its preprocessing.json.
            threads: intra-op threads; 0 lets ONNX Runtime decide.
        """
        import onnxruntime as ort

        if not isinstance(prep, Preprocessing):
            prep = Preprocessing.load(prep)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: the service decodes, post-processes
        # and answers requests on the same cores while the model runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([prep.output_name], {prep.input_name: batch})[0]

        def estimate(batch: np.ndarray) -> np.ndarray:
            return session.run([prep.size_output], {prep.input_name: batch})[0]

        return cls(run, prep, estimate_batch=estimate if prep.size_output else None)

    def estimate(self, batch: np.ndarray) -> np.ndarray:
        """The size head's log(object diameter as shown / prep.train_diameter), (N,), for
        (N, C, h, w) model inputs."""
        if self._estimate_batch is None:
            raise UserError("this model has no size head (preprocessing.json names no size_output)")
        return np.asarray(self._estimate_batch(batch), np.float32).reshape(len(batch))

    def logits(
        self, images: Sequence[np.ndarray], diameters: Sequence[float | None] | None = None
    ) -> list[np.ndarray]:
        """Raw images -> (channels, H, W) float32 logits each, at each image's own size
        (scaled_logits without the scales)."""
        return self.scaled_logits(images, diameters)[0]

    def scaled_logits(
        self, images: Sequence[np.ndarray], diameters: Sequence[float | None] | None = None
    ) -> tuple[list[np.ndarray], list[float]]:
        """Raw images -> (channels, H, W) float32 logits each, at each image's own size, and
        the factor each image was resized by for the model (1.0 at native scale).

        A model trained at one object size (prep.train_diameter) sees every image rescaled so
        its objects have that size: `diameters` gives each image's object diameter in pixels
        (None for an image: prep.diameter decides, a number or "auto", estimated by a first
        pass). The logits are resized back, so post-processing runs at the original size.

        Images larger than prep.tile_size run as overlapping tiles blended together, so memory
        stays bounded whatever the image size. Whole images of one padded shape, and tiles,
        share model calls up to batch_size. prep.tta averages flipped or rotated views.
        """
        prep = self.prep
        inputs = [normalize(image, prep) for image in images]
        if not prep.train_diameter:
            return self._model_logits(inputs), [1.0] * len(inputs)
        given = list(diameters) if diameters is not None else [None] * len(inputs)
        if len(given) != len(inputs):
            raise UserError(f"{len(given)} diameters for {len(inputs)} images; give one per image")
        bad = [d for d in given if d is not None and not 0 < d < float("inf")]
        if bad:
            raise UserError(f"diameter {bad[0]} is not a positive number of pixels (the objects' diameter)")
        given = [d if d is not None else _fixed_diameter(prep.diameter) for d in given]
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        scales = [scale_for(d, prep.train_diameter) if d else guess for d in given]
        logits = self._scaled_logits(inputs, scales)
        unknown = [i for i, d in enumerate(given) if not d]
        if unknown:
            self._rerun_at_estimated_sizes(inputs, logits, scales, unknown)
            if self._estimate_batch is not None:
                self._refine_from_size_head(inputs, logits, scales, unknown)
            if prep.diameter_choices != [1.0]:
                self._choose_sizes(inputs, logits, scales, unknown)
        return logits, [self._applied_scale(x.shape[1:], s) for x, s in zip(inputs, scales, strict=True)]

    def _rerun_at_estimated_sizes(
        self, inputs: list[np.ndarray], logits: list[np.ndarray], scales: list[float], which: list[int]
    ) -> None:
        """Measure the objects of images `which` in their first-pass logits (run at the scale
        `guess`) and replace those logits by a run at the scale the measurement implies, where
        it differs from the last run's by more than 10%; measure again, up to SIZE_PASSES
        passes in all. A model sees objects far from its size poorly, so a first pass
        underestimates big objects (it splits them) and one correction can stop short; the
        measurement converges as the objects approach the trained size. Scales stay within 4x
        of `guess`, so a poor pass cannot blow an image up or shrink it away. `logits` and
        `scales` (each image's, the first pass's `guess` for those in `which`) are updated."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        pending = list(which)
        for _ in range(SIZE_PASSES - 1):
            wanted = {}
            for i in pending:
                applied = self._applied_scale(inputs[i].shape[1:], scales[i])
                found = predicted_diameter(to_prediction(logits[i], prep, applied).instances)
                scale = scale_for(found, prep.train_diameter) if found else scales[i]
                wanted[i] = float(np.clip(scale, guess / 4, guess * 4))
                log.debug("image %d: objects about %s px across, scale %.3f", i, found, wanted[i])
            # Within 10% another pass is not worth its cost: the scale augmentation in training
            # covers more than that.
            pending = [i for i in pending if abs(wanted[i] / scales[i] - 1) > 0.1]
            if not pending:
                return
            rerun = self._scaled_logits([inputs[i] for i in pending], [wanted[i] for i in pending])
            for i, logit in zip(pending, rerun, strict=True):
                logits[i], scales[i] = logit, wanted[i]

    def _refine_from_size_head(
        self, inputs: list[np.ndarray], logits: list[np.ndarray], scales: list[float], which: list[int]
    ) -> None:
        """Refine the sizes of images `which` a second time, from the size head's estimate, and
        keep per image the end whose objects share less outline (shared_outline).

        Refining from the model's own objects has fixed points: a model that cuts large
        nuclei into pieces of the trained size measures them at the trained size and stays
        at its first guess; one that merges small nuclei reads them large. Which one an
        image lands in depends on where refining starts, and the size head (a regression
        on the encoder's features, blind to the objects' outlines) starts it elsewhere.
        Pieces of one nucleus border each other, so the end that cut objects up shares more
        outline. Only images whose head start is over 10% from the first guess run again
        (up to SIZE_PASSES more passes); where both ends agree within 10%, the first stays.
        `logits` and `scales` are updated in place."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        starts = {i: self._size_head_scale(inputs[i]) for i in which}
        other = [i for i in which if abs(starts[i] / guess - 1) > 0.1]
        if not other:
            return
        alt_logits, alt_scales = list(logits), list(scales)
        rerun = self._scaled_logits([inputs[i] for i in other], [starts[i] for i in other])
        for i, logit in zip(other, rerun, strict=True):
            alt_logits[i], alt_scales[i] = logit, starts[i]
        self._rerun_at_estimated_sizes(inputs, alt_logits, alt_scales, other)
        for i in other:
            if abs(alt_scales[i] / scales[i] - 1) <= 0.1:
                continue
            here = shared_outline(self._instances(inputs[i], logits[i], scales[i]))
            there = shared_outline(self._instances(inputs[i], alt_logits[i], alt_scales[i]))
            log.debug(
                "image %d: scale %.3f shares %.3f of its outline, %.3f (size head's start) %.3f",
                i, scales[i], here, alt_scales[i], there,
            )  # fmt: skip
            if there < here:
                logits[i], scales[i] = alt_logits[i], alt_scales[i]

    def _size_head_scale(self, x: np.ndarray) -> float:
        """The scale the size head says (C, H, W) input `x` needs, read at the first guess and
        read again at the scale that implies (the head is most accurate near the trained size).
        Within 4x of the first guess, like every estimate."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        scale = guess
        for _ in range(2):
            view = size_view(resize_planes(x, self._scaled_shape(x.shape[1:], scale)), prep.pad_multiple)
            shown = prep.train_diameter * float(np.exp(self.estimate(view[None])[0]))
            diameter = shown / self._applied_scale(x.shape[1:], scale)
            scale = float(np.clip(scale_for(diameter, prep.train_diameter), guess / 4, guess * 4))
        return scale

    def _instances(self, x: np.ndarray, logit: np.ndarray, scale: float) -> np.ndarray:
        """The objects in `logit`, run at `scale` on input `x`."""
        return to_prediction(logit, self.prep, self._applied_scale(x.shape[1:], scale)).instances

    def _choose_sizes(
        self, inputs: list[np.ndarray], logits: list[np.ndarray], scales: list[float], which: list[int]
    ) -> None:
        """Segment images `which` as if their estimated diameter were each multiple in
        prep.diameter_choices; with more than one, keep the run whose objects are most solid
        (solid_fraction).

        The estimate is read off the model's own objects, so its errors feed themselves: a
        first pass that merges neighbours reads them as large, shrinks the image and merges
        more, and outlines that run a little wide read every object a little large. A
        multiple below 1.0 corrects the second; several, judged by a check from outside the
        estimate, break the first. One model pass per multiple besides 1.0 (the estimate's
        own run); ties keep the estimate (without 1.0, the smallest multiple). `logits` and
        `scales` are updated in place."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        choices = prep.diameter_choices
        single = len(choices) == 1

        def solidity(i: int, logit: np.ndarray, scale: float) -> float:
            if single:  # nothing to compare
                return 0.0
            applied = self._applied_scale(inputs[i].shape[1:], scale)
            return solid_fraction(to_prediction(logit, prep, applied).instances)

        estimated = {i: scales[i] for i in which}
        best = {i: solidity(i, logits[i], scales[i]) if 1.0 in choices else None for i in which}
        for multiple in choices:
            if multiple == 1.0:
                continue
            # A diameter `multiple` times larger means objects need `multiple` times less enlarging.
            tried = [float(np.clip(estimated[i] / multiple, guess / 4, guess * 4)) for i in which]
            rerun = self._scaled_logits([inputs[i] for i in which], tried)
            for i, logit, scale in zip(which, rerun, tried, strict=True):
                score = solidity(i, logit, scale)
                if best[i] is None or score > best[i]:
                    best[i], logits[i], scales[i] = score, logit, scale
        for i in which:
            log.debug("image %d: scale %.3f chosen (estimate's %.3f)", i, scales[i], estimated[i])

    def _scaled_logits(self, inputs: list[np.ndarray], scales: list[float]) -> list[np.ndarray]:
        """Model logits of (C, H, W) inputs each rescaled by its factor, resized back to its size."""
        scaled = [
            resize_planes(x, self._scaled_shape(x.shape[1:], s)) for x, s in zip(inputs, scales, strict=True)
        ]
        out = self._model_logits(scaled)
        return [resize_planes(y, x.shape[1:]) for x, y in zip(inputs, out, strict=True)]

    def _applied_scale(self, shape: tuple[int, int], scale: float) -> float:
        """The factor an image of `shape` is actually resized by for `scale` (area ratio, root)."""
        h, w = self._scaled_shape(shape, scale)
        return ((h * w) / (shape[0] * shape[1])) ** 0.5

    def _scaled_shape(self, shape: tuple[int, int], scale: float) -> tuple[int, int]:
        """scaled_shape, enlarging no further than max_pixels allows (shrinking is never limited)."""
        if self.max_pixels and scale > 1:
            scale = max(1.0, min(scale, (self.max_pixels / (shape[0] * shape[1])) ** 0.5))
        return scaled_shape(shape, scale)

    def _model_logits(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """(C, H, W) model inputs -> (K, H, W) logits: tiled, averaged over prep.tta's views."""
        prep = self.prep

        def run(batch: list[np.ndarray]) -> list[np.ndarray]:
            return tiled_logits(
                self._run_batch, batch, prep.tile_size, prep.tile_overlap, prep.pad_multiple, self.batch_size
            )

        return run(inputs) if prep.tta == "none" else averaged_logits(run, inputs, prep.tta)

    def predict(
        self,
        images: Sequence[np.ndarray],
        threshold: float | None = None,
        diameters: Sequence[float | None] | None = None,
    ) -> list[Prediction]:
        """Raw images -> Prediction (probability and thresholded class-id mask) each.

        A pixel is foreground when P(foreground) exceeds the threshold; with more than two
        classes it then takes the most probable foreground class. `diameters` as in logits().
        """
        prep = self.prep if threshold is None else replace(self.prep, threshold=threshold)
        logits, scales = self.scaled_logits(images, diameters)
        return [to_prediction(logit, prep, scale) for logit, scale in zip(logits, scales, strict=True)]

    def predict_one(self, image: np.ndarray, diameter: float | None = None) -> Prediction:
        return self.predict([image], diameters=[diameter])[0]


def _fixed_diameter(setting: float | str) -> float | None:
    """prep.diameter as a number of pixels, or None for "auto"."""
    if setting == "auto":
        return None
    try:
        value = float(setting)
    except (TypeError, ValueError):
        raise UserError(f"diameter {setting!r} must be auto or a number of pixels") from None
    if not value > 0:
        raise UserError(f"diameter {setting!r} must be a positive number of pixels, or auto")
    return value
