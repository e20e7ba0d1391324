"""The gatekeeper in process: token, upload limits, form rules, request ids and the request log.

Starlette's TestClient drives the real middleware in front of a small app standing in for
BentoML's routes, so every refusal is checked in milliseconds; tests/service/test_service.py
checks the same behaviour once more against a real `bentoml serve`. The service instance the
middleware asks BentoML for is a plain object with the attributes it reads (token, limits,
request log, model info): the log is the real SQLite RequestLog.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import bentoml
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from segflow.serve.gatekeeper import Gatekeeper
from segflow.serve.monitoring import RequestLog
from segflow.serve.uploads import UploadLimits

TOKEN = "s3cret-token"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # enough to pass through; decoding is the handler's job


async def _accepted(request):
    form = await request.form()
    sizes = {
        name: value if isinstance(value, str) else len(await value.read())
        for name, value in form.multi_items()
    }
    return JSONResponse({"accepted": sizes})


async def _ready(_request):
    return JSONResponse({"ready": True})


def _service(tmp_path: Path, token: str | None, max_bytes: int = 4096):
    limits = UploadLimits(max_bytes, 2048 * 2048, ("png",), ("uint8",))
    log = RequestLog(tmp_path / "requests.db")
    return SimpleNamespace(token=token, limits=limits, log=log, model_info={"version": "7"})


@pytest.fixture
def make_client(tmp_path: Path, monkeypatch):
    def make(token: str | None = None, max_bytes: int = 4096):
        service = _service(tmp_path, token, max_bytes)
        monkeypatch.setattr(bentoml, "get_current_service", lambda: service)
        paths = ("/segment", "/segment_batch", "/segment_labels", "/measurements")
        routes = [Route(path, _accepted, methods=["POST"]) for path in paths]
        app = Starlette(routes=[*routes, Route("/readyz", _ready), Route("/metadata", _ready)])
        app.add_middleware(Gatekeeper)
        return TestClient(app), service

    return make


def test_a_good_upload_passes_with_a_request_id_and_a_log_row(make_client, tmp_path):
    client, service = make_client()
    response = client.post("/segment", files={"image": ("cells.png", PNG)}, headers={"x-request-id": "abc"})
    assert response.status_code == 200 and response.json() == {"accepted": {"image": len(PNG)}}
    assert response.headers["x-request-id"] == "abc"
    service.log.flush()
    rows = sqlite3.connect(tmp_path / "requests.db").execute("SELECT id, endpoint, status FROM requests")
    assert list(rows) == [("abc", "/segment", 200)]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": f"Bearer {TOKEN}"}, 200)],
)
def test_the_token_guards_the_api(make_client, headers, status):
    client, _ = make_client(token=TOKEN)
    response = client.post("/segment", files={"image": ("cells.png", PNG)}, headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in response.text and "SEGFLOW_API_TOKEN" in response.json()["error"]


def test_health_is_public_and_data_is_not(make_client):
    client, _ = make_client(token=TOKEN)
    assert client.get("/readyz").status_code == 200
    assert client.get("/metadata").status_code == 401


def test_refusals_name_the_problem(make_client):
    client, _ = make_client(max_bytes=2048)
    cases = {
        "too large": (client.post("/segment", files={"image": ("big.png", PNG * 40)}), 413, "bytes"),
        "not multipart": (client.post("/segment", content=PNG), 415, "multipart/form-data"),
        "wrong field": (client.post("/segment", files={"file": ("c.png", PNG)}), 400, "no field 'image'"),
        "text field": (
            client.post("/segment", files={"image": (None, "/etc/passwd")}),
            400,
            "must be a file",
        ),
        "two images": (
            client.post("/segment", files=[("image", ("a.png", PNG)), ("image", ("b.png", PNG))]),
            400,
            "/segment_batch",
        ),
        "extra field": (
            client.post("/segment", files={"image": ("a.png", PNG), "other": ("b.png", PNG)}),
            400,
            "unexpected form field",
        ),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, name
        body = response.json()
        assert body["status"] == status and words in body["error"], (name, body)
        assert body["request_id"] == response.headers["x-request-id"], name


def test_the_batch_takes_several_files_in_its_own_field(make_client):
    client, _ = make_client()
    files = [("images", ("a.png", PNG)), ("images", ("b.png", PNG))]
    response = client.post("/segment_batch", files=files)
    assert response.status_code == 200


def test_an_optional_diameter_passes_and_a_bad_one_is_refused(make_client):
    client, _ = make_client()
    good = client.post("/segment", files={"image": ("a.png", PNG)}, data={"diameter": "32.5"})
    assert good.status_code == 200 and good.json()["accepted"]["diameter"] == "32.5"
    for value in ("0", "-4", "nan", "inf", "wide", "1e9"):
        response = client.post("/segment", files={"image": ("a.png", PNG)}, data={"diameter": value})
        assert response.status_code == 422, value
        assert "diameter" in response.json()["error"] and "pixels" in response.json()["error"]
    as_file = client.post("/segment", files={"image": ("a.png", PNG), "diameter": ("d.txt", b"30")})
    assert as_file.status_code == 422


def test_each_api_takes_its_own_options_with_valid_values(make_client):
    client, _ = make_client()
    image = {"image": ("a.png", PNG)}
    passes = [
        ("/segment", {"measurements": "true"}),
        ("/segment_batch", {"measurements": "false"}),
        ("/segment_labels", {"format": "tiff", "diameter": "12"}),
        ("/measurements", {"diameter": "12"}),
    ]
    for path, data in passes:
        files = {"images": ("a.png", PNG)} if path == "/segment_batch" else image
        response = client.post(path, files=files, data=data)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["accepted"] | data == response.json()["accepted"]
    bad_values = [("/segment", "measurements", "yes"), ("/segment_labels", "format", "jpeg")]
    for path, field, value in bad_values:
        response = client.post(path, files=image, data={field: value})
        assert response.status_code == 422, (path, response.text)
        assert field in response.json()["error"] and "send one of" in response.json()["error"]
    # An option another API takes is refused by name, not silently ignored.
    misplaced = client.post("/measurements", files=image, data={"format": "png"})
    assert misplaced.status_code == 400 and "'format'" in misplaced.json()["error"]


def test_an_error_lists_a_few_unexpected_fields_not_all_of_them(make_client):
    client, _ = make_client(max_bytes=1_000_000)
    fields = {f"field_{i:04d}_" + "x" * 200: "1" for i in range(999)}
    response = client.post("/segment", files={"image": ("a.png", PNG)}, data=fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'field_0000_" in error and "and 994 more" in error and len(error) < 600, error
