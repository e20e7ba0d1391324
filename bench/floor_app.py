"""Empty endpoints for bench/framework_floor.py: what a request costs a server before any
segmentation. Each takes the same upload as POST /segment (multipart/form-data, one `image`
file part) and answers a tiny JSON, so what is measured is HTTP, routing, upload parsing and
the framework's per-request work, nothing of segflow's.

    bentoml serve bench.floor_app:BentoApi        # an @bentoml.api, as service.py's /segment is
    bentoml serve bench.floor_app:BentoMounted    # a Starlette route inside a BentoML service
    uvicorn bench.floor_app:app                   # the same route on plain Starlette + uvicorn
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def _segment(request: Request) -> JSONResponse:
    form = await request.form()
    data = await form["image"].read()
    return JSONResponse({"objects": 0, "bytes": len(data)})


async def _ready(request: Request) -> JSONResponse:
    return JSONResponse({})


app = Starlette(
    routes=[Route("/segment", _segment, methods=["POST"]), Route("/ready", _ready, methods=["GET"])]
)


# Same service options as service.py's: a 60 s timeout, one worker, 16 threads for sync APIs.
@bentoml.service(name="floor-api", traffic={"timeout": 60}, workers=1, threads=16)
class BentoApi:
    @bentoml.api
    def segment(self, image: Path) -> dict:
        return {"objects": 0, "bytes": image.stat().st_size}


@bentoml.service(name="floor-mounted", traffic={"timeout": 60}, workers=1, threads=16)
@bentoml.asgi_app(app, path="/")
class BentoMounted:
    pass
