"""The segmentation service: `bentoml serve service:svc`.

Serves the model in the BentoML store through segflow.inference on ONNX Runtime, the same
path evaluation measured. Inside a built Bento the model is the one pinned at build time
(build argument `model_tag`); from the repository it is the newest imported, which the
promotion step keeps equal to the registry's `champion`.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType

with bentoml.importing():
    from PIL import Image

    from segflow.images import ImageReadError, read_image
    from segflow.inference import Segmenter

MODEL_TAG = getattr(bentoml.use_arguments(), "model_tag", None) or os.environ.get(
    "SEGFLOW_MODEL_TAG", "segflow-segmenter:latest"
)


@bentoml.service(name="segflow", traffic={"timeout": 60}, workers=1)
class SegflowService:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        folder = Path(self.model.path)
        threads = int(os.environ.get("SEGFLOW_THREADS", "0"))
        self.segmenter = Segmenter.from_onnx(folder / "model.onnx", folder / "preprocessing.json", threads)
        self.labels = dict(self.model.info.labels)

    def _predict(self, image: Path):
        try:
            array = read_image(image)
            return array, self.segmenter.predict_one(array)
        except (ImageReadError, ValueError) as exc:
            raise InvalidArgument(f"cannot segment this file: {exc}") from None

    @bentoml.api
    def segment(self, image: Path) -> dict:
        """One image -> foreground fraction and the model that answered."""
        started = time.perf_counter()
        array, prediction = self._predict(image)
        return {
            "height": int(array.shape[0]),
            "width": int(array.shape[1]),
            "foreground_fraction": float(prediction.mask.mean()),
            "model": {
                "tag": str(self.model.tag),
                "registry_name": self.labels.get("registry_name"),
                "registry_version": self.labels.get("registry_version"),
            },
            "milliseconds": round(1000 * (time.perf_counter() - started), 2),
        }

    @bentoml.api
    def segment_mask(self, image: Path) -> Annotated[bytes, ContentType("image/png")]:
        """One image -> PNG of class ids (0 background, 1 foreground)."""
        _, prediction = self._predict(image)
        buffer = io.BytesIO()
        Image.fromarray(prediction.mask).save(buffer, format="PNG")
        return buffer.getvalue()


svc = SegflowService
