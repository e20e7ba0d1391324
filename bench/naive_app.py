"""The naive baseline bench/serve.py compares against: what people hand-write today.

A FastAPI app that decodes the upload with Pillow and calls the PyTorch model once per
request (no batching, no ONNX Runtime), returning the mask as PNG.

    SEGFLOW_CHECKPOINT=artifacts/model/model.pt uvicorn bench.naive_app:app --port 3200
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import Response
from PIL import Image

from segflow.train.checkpoints import load_checkpoint

torch.set_num_threads(int(os.environ.get("NAIVE_THREADS", "2")))
model, prep = load_checkpoint(os.environ.get("SEGFLOW_CHECKPOINT", "artifacts/model/model.pt"))
model.eval()
app = FastAPI()


@app.post("/segment_mask")
def segment_mask(image: UploadFile = File(...)) -> Response:  # noqa: B008 - FastAPI's idiom
    array = np.asarray(Image.open(io.BytesIO(image.file.read())).convert("L"), dtype=np.float32) / 255.0
    h, w = array.shape
    x = torch.from_numpy((array - prep.mean) / prep.std)[None, None]
    x = torch.nn.functional.pad(x, (0, (-w) % 32, 0, (-h) % 32), mode="reflect")
    with torch.inference_mode():
        logits = model(x)[0, 0, :h, :w]
    mask = (torch.sigmoid(logits) > prep.threshold).numpy().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(mask).save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")
