"""The segmentation service: `bentoml serve service:svc`.

Serves the champion through segflow.core.inference on ONNX Runtime, the path evaluation
measured. Inside a built Bento the model is the one pinned at build time (build argument
`model_tag`); from a checkout it is the one its last promotion or rollback imported
(logs/release.json), else the newest imported. `SEGFLOW_MODEL_TAG` picks another.

Endpoints (POST takes multipart/form-data: `image`, or `images` for the batch):
  POST /segment          JSON: objects (id, class, area, bbox, polygon, score), count,
                         class fractions, COCO RLE masks, model; `measurements=true` adds
                         each object's measurements
  POST /segment_batch    the same for up to serve.max_batch_images images
  POST /segment_mask     PNG of class ids
  POST /segment_labels   the instance label image (object ids): 16-bit PNG, or TIFF with
                         `format=tiff` or `Accept: image/tiff` (32-bit beyond 65,535 objects)
  POST /measurements     CSV: one row of measurements per object
  POST /segment_overlay  PNG of the input with every object outlined
  GET  /metadata         model, registry version, test metrics, lineage, input contract
  GET  /stats            recent traffic, latency percentiles, errors, input drift
  GET  /                 a page to try it; GET /docs the OpenAPI explorer
  /healthz /readyz /livez /metrics come from BentoML.

Every refusal is a 4xx JSON {"error": ..., "status": ..., "request_id": ...}.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Literal

import bentoml
from bentoml.validators import ContentType

with bentoml.importing():
    import numpy as np
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    from segflow.core.inference import Segmenter
    from segflow.core.measurements import channel_count, measure_objects
    from segflow.core.postprocessing import to_prediction
    from segflow.core.preprocessing import Preprocessing
    from segflow.errors import UserError
    from segflow.serve.answers import (
        LABEL_FORMATS,
        answer,
        label_format,
        labels_image,
        mask_png,
        measurements_csv,
        model_info,
        overlay_png,
    )
    from segflow.serve.batching import MicroBatcher, lanes_for
    from segflow.serve.gatekeeper import Gatekeeper, error_response
    from segflow.serve.monitoring import RequestLog, intensity_mean, load_reference
    from segflow.serve.precision import MODEL_FILES, warmup_images
    from segflow.serve.precision import choose as choose_precision
    from segflow.serve.settings import champion_model_tag, load_serve_params, onnx_threads
    from segflow.serve.slowclients import bound_header_time
    from segflow.serve.stored import stored_model
    from segflow.serve.uploads import UploadError, UploadLimits, decode_upload

HERE = Path(__file__).resolve().parent
STATIC = HERE / "segflow" / "serve" / "static"
BUILT_WITH = getattr(bentoml.use_arguments(), "model_tag", None)  # a built Bento: its model
MODEL_TAG = (
    BUILT_WITH
    or os.environ.get("SEGFLOW_MODEL_TAG")
    or champion_model_tag(HERE)  # a checkout: its last promotion's model
)
if not BUILT_WITH:  # a checkout: the model must be in this machine's store
    try:
        stored_model(MODEL_TAG)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
# serve section of params.yaml (the Bento carries its copy); read here because the worker
# count must be known when the service is declared.
CONFIG = load_serve_params(os.environ.get("SEGFLOW_PARAMS") or HERE / "params.yaml")
MODEL_TIMEOUT_S = 55.0  # below the 60 s request timeout
PNG = Annotated[bytes, ContentType("image/png")]
CSV = Annotated[str, ContentType("text/csv")]
log = logging.getLogger("segflow.service")

objects_per_image = bentoml.metrics.Histogram(
    name="segflow_objects_per_image",
    documentation="Objects found per segmented image",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
model_batch_size = bentoml.metrics.Histogram(
    name="segflow_model_batch_size",
    documentation="Images per model call (adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32),
)
precision_info = bentoml.metrics.Gauge(
    name="segflow_precision_info",
    documentation="The model variant this process runs (1 for the one in use): fp32 or int8",
    labelnames=["precision"],
)
rejected_inputs = bentoml.metrics.Counter(
    name="segflow_rejected_inputs",
    documentation="Uploads refused with a 4xx, by status",
    labelnames=["status"],
)


def _json(data: dict) -> Response:
    """A JSON response serialised once with the standard library (the answers are plain
    dicts; BentoML's generic path would validate them through pydantic first)."""
    return Response(json.dumps(data, separators=(",", ":")), media_type="application/json")


async def _page(_request) -> Response:
    return FileResponse(STATIC / "index.html")


async def _docs(_request) -> Response:
    return FileResponse(STATIC / "docs.html")


async def _metadata(_request) -> Response:
    return JSONResponse(bentoml.get_current_service().metadata())


async def _stats(_request) -> Response:
    return JSONResponse(bentoml.get_current_service().stats())


# Plain GET routes beside BentoML's POST APIs (the mount only answers these paths).
pages = Starlette(
    routes=[
        Route("/", _page, methods=["GET"]),
        Route("/docs", _docs, methods=["GET"]),
        Route("/metadata", _metadata, methods=["GET"]),
        Route("/stats", _stats, methods=["GET"]),
    ]
)


@bentoml.service(name="segflow", traffic={"timeout": 60}, workers=CONFIG.workers, threads=16)
@bentoml.asgi_app(pages, path="/")
class SegflowService:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import cv2

        logging.getLogger("segflow").setLevel(logging.INFO)  # BentoML's handlers show WARNING and up only
        cv2.setNumThreads(1)  # post-processing stays on the request's thread: the cores are ONNX Runtime's
        self.config = CONFIG
        self.onnx_threads = onnx_threads(CONFIG)  # reads the cgroup quota: once per worker
        bound_header_time(self.config.header_timeout_s)  # uvicorn has no deadline for headers
        self.limits = UploadLimits.from_params(self.config)
        folder = Path(self.model.path)
        prep = Preprocessing.load(folder / "preprocessing.json")
        # fp32, or the INT8 variant where it passed export's check and is faster on this CPU.
        warmup = warmup_images(prep, self.config.model_batch_size)
        self.segmenter, self.precision = choose_precision(
            folder,
            self.config.precision,
            lambda path: Segmenter.from_onnx(path, prep, self.onnx_threads),
            warmup,
        )
        precision_info.labels(precision=self.precision.precision).set(1)
        # Under load, batches run side by side in lanes, each with its share of the threads; a
        # lone request gets them all (segflow.serve.batching).
        self.lanes = lanes_for(self.onnx_threads)
        served_file = folder / MODEL_FILES[self.precision.precision]
        self.lane_segmenter = (
            Segmenter.from_onnx(served_file, prep, self.onnx_threads // self.lanes)
            if self.lanes > 1
            else self.segmenter
        )
        for segmenter in (self.segmenter, self.lane_segmenter):
            segmenter.batch_size = self.config.model_batch_size
            segmenter.max_pixels = self.config.max_pixels  # also after rescaling to the trained object size
        self.lane_segmenter.logits(warmup)  # its first call sets up its memory: not on a request's time
        self.classes = list(self.segmenter.prep.classes)
        self.batcher = MicroBatcher(
            lambda items: self._model(items, self.segmenter),
            self.config.model_batch_size,
            model_batch_size.observe,
            lanes=self.lanes,
            run_shared=lambda items: self._model(items, self.lane_segmenter),
        )
        self.model_info = model_info(dict(self.model.info.labels), str(self.model.tag))
        self.reference = load_reference(folder)
        self.log = RequestLog(_request_log_path(self.config.request_log))
        self.token = os.environ.get("SEGFLOW_API_TOKEN") or None
        if self.token is None:
            log.warning(
                "SEGFLOW_API_TOKEN is not set; every endpoint is open to anyone who can reach "
                "this port. Set it to require 'Authorization: Bearer <token>'."
            )
        log.info(
            "serving %s (registry version %s) in %s: %s; %d worker(s), %d ONNX Runtime thread(s) "
            "each, in %d lane(s) under load",
            self.model_info["tag"],
            self.model_info["version"],
            self.precision.precision,
            self.precision.reason,
            self.config.workers,
            self.onnx_threads,
            self.lanes,
        )

    # -- the model path shared by every endpoint ------------------------------------------

    def _model(self, items: list[tuple], segmenter: Segmenter) -> list[tuple]:
        """(image, diameter or None) pairs -> (logits, scale) pairs, in one model call (a
        batcher lane's thread). Only the model runs here: post-processing happens on each
        request's own thread (_segment), so the model never waits for another request's watershed."""
        logits, scales = segmenter.scaled_logits([image for image, _ in items], [d for _, d in items])
        return list(zip(logits, scales, strict=True))

    def _segment(self, files: list[Path], ctx: bentoml.Context, diameter: float | None = None) -> list[tuple]:
        """Decode, validate and segment; returns (image, prediction) per file or raises UploadError.

        `diameter` (pixels) replaces the per-image size estimate of a size-normalised model."""
        images = []
        for index, path in enumerate(files):
            try:
                images.append(decode_upload(Path(path).read_bytes(), self.limits))
            except UploadError as exc:
                rejected_inputs.labels(status=str(exc.status)).inc()
                prefix = f"image {index + 1} of {len(files)}: " if len(files) > 1 else ""
                raise UploadError(exc.status, prefix + exc.reason) from None
        started = time.perf_counter()
        outputs = self.batcher.submit([(image, diameter) for image in images], timeout=MODEL_TIMEOUT_S)
        model_ms = 1000 * (time.perf_counter() - started)
        # Segmenter.predict's post-processing, as evaluation runs it, on this request's thread.
        predictions = [to_prediction(logit, self.segmenter.prep, scale) for logit, scale in outputs]
        counts = [int(p.instances.max()) for p in predictions]  # ids are 1..n
        for count in counts:
            objects_per_image.observe(count)
        self._note(ctx, images, predictions, counts, model_ms)
        return list(zip(images, predictions, strict=True))

    def _note(self, ctx: bentoml.Context, images, predictions, counts: list[int], model_ms: float) -> None:
        """Hand what the request log needs to the gatekeeper (it writes the row)."""
        ctx.request.state.segflow = {
            "images": len(images),
            "height": int(images[0].shape[0]) if len(images) == 1 else None,
            "width": int(images[0].shape[1]) if len(images) == 1 else None,
            "object_count": sum(counts),
            "observations": [
                (intensity_mean(img), np.count_nonzero(p.mask) / p.mask.size)
                for img, p in zip(images, predictions, strict=True)
            ],
            "model_ms": round(model_ms, 2),
        }

    def _refuse(self, exc: UploadError, ctx: bentoml.Context) -> Response:
        ctx.response.status_code = exc.status  # BentoML applies the context's status to any response
        return error_response(exc.status, exc.reason, ctx.request.scope)

    # -- endpoints -------------------------------------------------------------------------

    @bentoml.api
    def segment(
        self, image: Path, ctx: bentoml.Context, diameter: float | None = None, measurements: bool = False
    ) -> dict:
        """One image -> objects (id, class, area, bbox, polygon, score), class fractions, COCO RLE.

        Optional `diameter`: the objects' diameter in pixels (models trained at one object size
        otherwise estimate it per image). `measurements=true`: each object also gets its
        measurements (as /measurements gives them)."""
        started = time.perf_counter()
        try:
            [(array, prediction)] = self._segment([image], ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        result = answer(array, prediction, self.classes, self.model_info, measurements)
        result["timing_ms"] = {
            "model": ctx.request.state.segflow["model_ms"],
            "total": round(1000 * (time.perf_counter() - started), 2),
        }
        return _json(result)

    @bentoml.api
    def segment_batch(
        self,
        images: list[Path],
        ctx: bentoml.Context,
        diameter: float | None = None,
        measurements: bool = False,
    ) -> dict:
        """Several images in one request -> {"results": [the /segment answer for each]}."""
        started = time.perf_counter()
        if not images:
            return self._refuse(UploadError(400, "no images: send one or more files in field 'images'"), ctx)
        if len(images) > self.config.max_batch_images:
            return self._refuse(
                UploadError(413, f"{len(images)} images; at most {self.config.max_batch_images} per request"),
                ctx,
            )
        try:
            pairs = self._segment(images, ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        results = [answer(im, found, self.classes, self.model_info, measurements) for im, found in pairs]
        timing = {
            "model": ctx.request.state.segflow["model_ms"],
            "total": round(1000 * (time.perf_counter() - started), 2),
        }
        return _json({"count": len(results), "results": results, "timing_ms": timing})

    @bentoml.api
    def segment_mask(self, image: Path, ctx: bentoml.Context, diameter: float | None = None) -> PNG:
        """One image -> PNG of class ids (0 background, 1 the first class, ...)."""
        try:
            [(_, prediction)] = self._segment([image], ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        return mask_png(prediction)

    @bentoml.api
    def segment_labels(
        self,
        image: Path,
        ctx: bentoml.Context,
        diameter: float | None = None,
        format: Literal["png", "tiff"] | None = None,
    ) -> PNG:
        """One image -> its instance label image (0 background, each object its id, as in /segment):
        a 16-bit PNG, or a TIFF with `format=tiff` or an `Accept: image/tiff` header; beyond
        65,535 objects always a 32-bit TIFF."""
        try:
            [(_, prediction)] = self._segment([image], ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        accept = ctx.request.headers.get("accept", "")
        asked = format or ("tiff" if "image/tiff" in accept and "image/png" not in accept else None)
        try:
            fmt = label_format(prediction, asked)
        except ValueError as exc:
            return self._refuse(UploadError(422, str(exc)), ctx)
        return Response(labels_image(prediction, fmt), media_type=LABEL_FORMATS[fmt])

    @bentoml.api
    def measurements(self, image: Path, ctx: bentoml.Context, diameter: float | None = None) -> CSV:
        """One image -> CSV, one row per object: id, class, centroid, box, area, perimeter,
        equivalent diameter, major/minor axis, eccentricity, solidity, mean/min/max intensity."""
        try:
            [(array, prediction)] = self._segment([image], ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        rows = measure_objects(prediction.instances, prediction.mask, array, self.classes)
        return Response(measurements_csv(rows, channel_count(array)), media_type="text/csv")

    @bentoml.api
    def segment_overlay(self, image: Path, ctx: bentoml.Context, diameter: float | None = None) -> PNG:
        """One image -> PNG of the image with every predicted object outlined."""
        try:
            [(array, prediction)] = self._segment([image], ctx, diameter)
        except UploadError as exc:
            return self._refuse(exc, ctx)
        return overlay_png(array, prediction)

    # -- GET routes (see `pages`) ----------------------------------------------------------

    def metadata(self) -> dict:
        info = self.model.info
        prep = self.segmenter.prep
        return {
            "model": self.model_info,
            "precision": self.precision.to_dict(),
            "runtime": {
                "workers": self.config.workers,
                "onnx_threads": self.onnx_threads,
                "lanes": self.lanes,  # batches side by side under load, onnx_threads / lanes threads each
            },
            "test_metrics": dict(info.metadata.get("test_metrics", {})),
            "lineage": {
                "git_commit": info.labels.get("git_commit"),
                "data_hash": info.labels.get("data_hash"),
                "imported": info.creation_time.isoformat(),
            },
            "input": {
                "formats": list(self.limits.formats),
                "dtypes": list(self.limits.dtypes),
                "max_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels,
                "max_batch_images": self.config.max_batch_images,
                "shape": "(H, W) or (H, W, C), C = 1, 3 or 4; floats finite in [0, 1]",
                "channels_used": prep.in_channels,
                "size_rule": f"any size; padded to a multiple of {prep.pad_multiple}, cropped back"
                + (f"; over {prep.tile_size} px: overlapping tiles" if prep.tile_size else ""),
            },
            "output": {
                "classes": self.classes,
                "threshold": prep.threshold,
                "objects": prep.instances,  # watershed: touching objects split; components: connected regions
                "seed_threshold": prep.seed_threshold,
                "seed_prominence": prep.seed_prominence,
                "min_area": prep.min_area,
                "mask_png": "class ids",
                "rle": "COCO compressed RLE, column-major (pycocotools.mask.decode)",
            },
            "drift_reference": None
            if self.reference is None
            else {"images": self.reference["images"], "features": ["intensity_mean", "foreground_fraction"]},
        }

    def stats(self) -> dict:
        self.log.flush()
        summary = self.log.summary(self.config.stats_window, self.reference, self.config.drift_min_images)
        return summary | {"precision": self.precision.precision}


def _request_log_path(configured: str) -> Path:
    """Where the request log goes: $SEGFLOW_REQUEST_LOG, else serve.request_log.

    A relative path is taken from the repository when serving from a checkout; a built
    Bento is never written into, so there it goes under $XDG_STATE_HOME/segflow
    (default ~/.local/state/segflow).
    """
    path = Path(os.environ.get("SEGFLOW_REQUEST_LOG") or configured)
    if path.is_absolute():
        return path
    if (HERE / "dvc.yaml").is_file():
        return HERE / path
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "segflow" / path


svc = SegflowService
# Runs in front of everything: bearer token, body size and type, request log.
svc.add_asgi_middleware(Gatekeeper)
