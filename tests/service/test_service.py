"""The service as users meet it: a real `bentoml serve service:svc` process over HTTP."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import geojson
import httpx
import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask
from skimage.measure import regionprops

from tests.conftest import run
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.slow


def post(server, endpoint: str, files, headers=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{endpoint}", files=files, headers=headers, timeout=60, **kwargs)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def scrambled_jpeg(png: bytes) -> bytes:
    """The image as a JPEG with 200 random bytes in the middle of its compressed data: Pillow
    alone decodes it (libjpeg only warns) and the service once segmented the damaged image."""
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(png)) as img:
        img.convert("L").save(buffer, format="JPEG", quality=95)
    damaged, middle = bytearray(buffer.getvalue()), len(buffer.getvalue()) // 2
    damaged[middle : middle + 200] = np.random.default_rng(0).integers(0, 256, 200, np.uint8).tobytes()
    return bytes(damaged)


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_segment_answers_objects_rle_and_model(server, sample_images):
    response = post(server, "/segment", {"image": sample_images[0].read_bytes()})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["image"] == {"height": 64, "width": 64, "channels": 1, "dtype": "uint8"}
    assert body["object_count"] == len(body["objects"])
    assert body["model"]["name"] == "segflow-segmenter" and body["model"]["alias"] == "champion"
    assert abs(sum(body["class_fractions"].values()) - 1) < 1e-4
    # The RLE decodes (with the reference implementation) to the mask /segment_mask returns.
    rle = body["masks"]["cell"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    mask_png = post(server, "/segment_mask", {"image": sample_images[0].read_bytes()}).content
    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    assert np.array_equal(decoded, mask)
    assert abs(body["class_fractions"]["cell"] - mask.mean()) < 1e-6
    for obj in body["objects"]:
        x, y, w, h = obj["bbox"]
        assert obj["class"] == "cell" and 0 <= obj["score"] <= 1
        assert obj["area"] <= w * h and len(obj["polygon"]) >= 6
        xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
        assert min(xs) >= x and max(xs) <= x + w and min(ys) >= y and max(ys) <= y + h
    assert sum(o["area"] for o in body["objects"]) == int(mask.sum())


def test_mask_overlay_and_batch(server, sample_images):
    data = sample_images[1].read_bytes()
    mask = post(server, "/segment_mask", {"image": data})
    assert mask.headers["content-type"] == "image/png"
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(mask.content))))) <= {0, 1}
    overlay = post(server, "/segment_overlay", {"image": data})
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(overlay.content)))
    assert picture.shape == (64, 64, 3)

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sample_images[:3]]
    batch = post(server, "/segment_batch", files)
    assert batch.status_code == 200, batch.text
    singles = [post(server, "/segment", {"image": p.read_bytes()}).json() for p in sample_images[:3]]
    results = batch.json()["results"]
    assert [r["object_count"] for r in results] == [s["object_count"] for s in singles]
    assert [r["masks"] for r in results] == [s["masks"] for s in singles]


def _filled(polygon: list[int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: a COCO polygon (x1, y1, x2, y2, ...) drawn filled."""
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.array(polygon, np.int32).reshape(-1, 2)], 1)
    return canvas.astype(bool)


def test_labels_and_measurements_describe_the_same_objects(server, sample_images):
    data = sample_images[0].read_bytes()
    body = post(server, "/segment", {"image": data}, data={"measurements": "true"}).json()
    assert body["object_count"] > 0
    png = post(server, "/segment_labels", {"image": data})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    labels = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == (64, 64)
    assert sorted(np.unique(labels[labels > 0])) == [o["id"] for o in body["objects"]]
    regions = {r.label: r for r in regionprops(labels)}
    for obj in body["objects"]:
        own, drawn = labels == obj["id"], _filled(obj["polygon"], labels.shape)
        # COCO polygons run through the boundary pixels' centres: drawn back, a small object
        # can lose a pixel or two of its edge, a large one a negligible share.
        assert (own & drawn).sum() / (own | drawn).sum() >= (0.95 if own.sum() >= 100 else 0.8), obj["id"]
        assert regions[obj["id"]].area == obj["area"] == obj["measurements"]["area"]
    # TIFF, by field or by Accept header, holds the same ids.
    by_field = post(server, "/segment_labels", {"image": data}, data={"format": "tiff"})
    by_header = post(server, "/segment_labels", {"image": data}, headers={"accept": "image/tiff"})
    for response in (by_field, by_header):
        assert response.headers["content-type"] == "image/tiff"
        assert np.array_equal(tifffile.imread(io.BytesIO(response.content)), labels)
    table = post(server, "/measurements", {"image": data})
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [(int(r["id"]), float(r["area"])) for r in rows] == [(o["id"], o["area"]) for o in body["objects"]]
    bad = post(server, "/segment_labels", {"image": data}, data={"format": "jpeg"})
    assert bad.status_code == 422 and "format" in bad.json()["error"]
    batch = post(server, "/segment_batch", [("images", ("a.png", data))], data={"measurements": "true"})
    assert batch.json()["results"][0]["objects"] == body["objects"]


def test_every_accepted_input_type(server):
    rng = np.random.default_rng(0)
    gray8 = (rng.random((70, 90)) * 255).astype(np.uint8)
    cases = {
        "png8": png_bytes(gray8),
        "png16": png_bytes((rng.random((40, 40)) * 65535).astype(np.uint16)),
        "png_rgb": png_bytes(np.dstack([gray8] * 3)),
        "npy_float": npy_bytes(rng.random((33, 47)).astype(np.float32)),
        "npy_uint16": npy_bytes((rng.random((32, 32)) * 4000).astype(np.uint16)),
    }
    jpeg = io.BytesIO()
    Image.fromarray(np.dstack([gray8] * 3)).save(jpeg, format="JPEG")
    cases["jpeg_rgb"] = jpeg.getvalue()
    import tifffile

    tiff = io.BytesIO()
    tifffile.imwrite(tiff, (rng.random((50, 60)) * 65535).astype(np.uint16))
    cases["tiff16"] = tiff.getvalue()
    for name, data in cases.items():
        response = post(server, "/segment", {"image": (name, data)})
        assert response.status_code == 200, (name, response.text)
        image = response.json()["image"]
        assert image["height"] * image["width"] > 0, name


BAD_INPUTS = {
    "truncated png": (lambda png: png[: len(png) // 2], 400, "truncated"),
    "scrambled jpeg": (scrambled_jpeg, 400, "corrupt jpeg data"),
    "text file": (lambda _: b"just some text\n" * 10, 415, "not a PNG"),
    "30000x30000 png header": (lambda _: huge_png_header(30000, 30000), 413, "pixels"),
    "pickled npy": (
        lambda _: npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True),
        422,
        "pickle",
    ),
    "nan array": (lambda _: npy_bytes(np.full((16, 16), np.nan, np.float32)), 422, "NaN"),
    "int32 array": (lambda _: npy_bytes(np.zeros((16, 16), np.int32)), 422, "int32"),
    "empty file": (lambda _: b"", 400, "empty"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_get_4xx_with_a_reason(server, sample_images, name):
    make, status, words = BAD_INPUTS[name]
    for endpoint in ("/segment", "/segment_mask", "/segment_overlay"):
        response = post(server, endpoint, {"image": ("upload", make(sample_images[0].read_bytes()))})
        assert response.status_code == status, (endpoint, response.text)
        body = response.json()
        assert words.lower() in body["error"].lower() and body["status"] == status
    assert server.alive()
    assert post(server, "/segment", {"image": sample_images[0].read_bytes()}).status_code == 200


def test_bad_requests_get_4xx(server, sample_images):
    data = sample_images[0].read_bytes()
    url = f"{server.url}/segment"
    # Wrong content type, JSON naming a server-side path, empty body, wrong or extra fields.
    assert httpx.post(url, content=data, headers={"content-type": "image/png"}).status_code == 415
    assert httpx.post(url, json={"image": "/etc/passwd"}).status_code == 415
    assert httpx.post(url, content=b"").status_code == 415
    empty_multipart = httpx.post(
        url, content=b"", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert empty_multipart.status_code == 400
    assert post(server, "/segment", {"file": data}).status_code == 400
    assert httpx.post(url, data={"image": '"/etc/passwd"'}, files={"x": b"1"}).status_code == 400
    assert post(server, "/segment", [("image", data), ("image", data)]).status_code == 400
    too_many = [("images", (f"{i}.png", data)) for i in range(17)]
    assert post(server, "/segment_batch", too_many).status_code == 413
    bad_in_batch = post(
        server, "/segment_batch", [("images", ("a.png", data)), ("images", ("b.txt", b"text"))]
    )
    assert bad_in_batch.status_code == 415 and "image 2 of 2" in bad_in_batch.json()["error"]
    bad_diameter = post(server, "/segment", {"image": data}, data={"diameter": "-3"})
    assert bad_diameter.status_code == 422 and "diameter" in bad_diameter.json()["error"]
    assert server.alive()
    assert post(server, "/segment", {"image": data}).status_code == 200
    # The optional diameter reaches BentoML's parser (this model is at native scale: no effect).
    with_diameter = post(server, "/segment", {"image": data}, data={"diameter": "20"})
    assert with_diameter.status_code == 200
    assert (
        with_diameter.json()["object_count"]
        == post(server, "/segment", {"image": data}).json()["object_count"]
    )


def test_answers_under_load_are_the_answers_alone(server, sample_images):
    """Requests that arrive together run side by side in the batcher's lanes, on a session
    with a lane's share of the threads; a lone request runs on the session with all of
    them (segflow.serve.batching). Which one ran must not change the answer."""
    files = [p.read_bytes() for p in sample_images[:8]]

    def labels(data: bytes) -> bytes:
        response = post(server, "/segment_labels", {"image": data})
        assert response.status_code == 200, response.text
        return response.content

    alone = [labels(data) for data in files]
    with ThreadPoolExecutor(len(files)) as pool:
        for _ in range(3):
            assert list(pool.map(labels, files)) == alone
    runtime = httpx.get(f"{server.url}/metadata").json()["runtime"]
    assert runtime["lanes"] == (2 if runtime["onnx_threads"] >= 2 else 1)


def test_metadata_and_health(server):
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"]["name"] == "segflow-segmenter" and meta["model"]["alias"] == "champion"
    assert set(meta["test_metrics"]) >= {"dice", "iou"}
    assert len(meta["lineage"]["git_commit"]) == 40 and meta["lineage"]["data_hash"]
    assert meta["input"]["max_pixels"] == 2048 * 2048 and "npy" in meta["input"]["formats"]
    assert meta["output"]["classes"] == ["background", "cell"]
    # Which variant runs, and why: measured at start when the INT8 variant passed its check.
    chosen = meta["precision"]
    assert chosen["setting"] == "auto" and chosen["precision"] in ("fp32", "int8") and chosen["reason"]
    if chosen["int8_check"] and chosen["int8_check"]["passed"]:
        assert set(chosen["ms_per_image"]) == {"fp32", "int8"}
    assert httpx.get(f"{server.url}/stats").json()["precision"] == chosen["precision"]
    for path in ("/healthz", "/readyz", "/livez", "/docs.json", "/docs", "/"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "segflow_objects_per_image" in metrics and "segflow_model_batch_size" in metrics
    running = re.search(r'segflow_precision_info\{[^}]*precision="(\w+)"[^}]*\} 1\.0', metrics)
    assert running and running.group(1) == chosen["precision"], metrics[-3000:]


def test_stats_request_log_and_drift(server, sample_images):
    images = [("images", (p.name, p.read_bytes())) for p in sample_images[:16]]
    for _ in range(2):
        assert post(server, "/segment_batch", images).status_code == 200
    post(server, "/segment", {"image": b"not an image"})
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["requests"]["by_status"]["415"] >= 1 and stats["errors"]["count"] >= 1
    assert stats["latency_ms"]["p50"] > 0 and stats["images"] >= 32
    assert stats["drift"]["status"] in {"ok", "moderate", "drift"}
    baseline_psi = stats["drift"]["features"]["intensity_mean"]["psi"]
    # Black images: far outside the training intensities, the drift signal must say so.
    black = png_bytes(np.zeros((64, 64), np.uint8))
    for _ in range(3):
        post(server, "/segment_batch", [("images", (f"{i}.png", black)) for i in range(16)])
    drift = httpx.get(f"{server.url}/stats").json()["drift"]
    assert drift["features"]["intensity_mean"]["psi"] > max(0.25, baseline_psi)
    assert drift["status"] == "drift"
    # The log is a plain SQLite file with one row per request.
    import sqlite3

    with sqlite3.connect(server.request_log) as db:
        rows = db.execute("SELECT endpoint, status, images, model_version FROM requests").fetchall()
    assert any(r[:2] == ("/segment", 415) for r in rows)
    assert any(r[0] == "/segment_batch" and r[2] == 16 for r in rows)


def test_token_required_when_set(locked_server, sample_images):
    data = sample_images[0].read_bytes()
    url = locked_server.url
    assert post(locked_server, "/segment", {"image": data}).status_code == 401
    wrong = post(locked_server, "/segment", {"image": data}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    ok = post(locked_server, "/segment", {"image": data}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    for path in ("/metadata", "/stats", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
        assert httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for path in ("/healthz", "/readyz", "/"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_warning_when_no_token(server):
    assert "SEGFLOW_API_TOKEN is not set" in server.log.read_text()


def test_cli_predict_matches_the_service(server, built_repo, sample_images, tmp_path):
    """`segflow predict` writes exactly what the service answers (timings aside), in the
    precision the service chose (`auto` times both in each process; close timings may differ)."""
    out = tmp_path / "predictions"
    picked = sample_images[2:4]
    formats = ["--formats", "roi", "geojson"]
    precision = httpx.get(f"{server.url}/metadata").json()["precision"]["precision"]
    run(
        ["segflow", "predict", *map(str, picked), "--out", str(out), *formats, "--precision", precision],
        built_repo,
    )
    for path in picked:
        data = path.read_bytes()
        service = post(server, "/segment", {"image": data}).json()
        del service["timing_ms"]
        assert json.loads((out / f"{path.stem}.json").read_text()) == service
        assert (out / f"{path.stem}_mask.png").read_bytes() == post(
            server, "/segment_mask", {"image": data}
        ).content
        assert (out / f"{path.stem}_overlay.png").read_bytes() == post(
            server, "/segment_overlay", {"image": data}
        ).content
        assert (out / f"{path.stem}_labels.png").read_bytes() == post(
            server, "/segment_labels", {"image": data}
        ).content
        measured = post(server, "/measurements", {"image": data}).text
        assert (out / f"{path.stem}_objects.csv").read_text() == measured
        # Fiji's ROI set and QuPath's GeoJSON: one outline per object of the label image.
        labels = cv2.imread(str(out / f"{path.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        rois = roifile.roiread(out / f"{path.stem}_rois.zip")
        features = geojson.loads((out / f"{path.stem}.geojson").read_text())
        assert features.is_valid and len(rois) == len(features["features"]) == labels.max()
        for roi, feature in zip(rois, features["features"], strict=True):
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert np.array_equal(ring[:-1], roi.coordinates())
            assert feature["properties"]["measurements"]["area"] == (labels == feature["id"]).sum()
    # One table for the folder: every object of every image, named by file.
    table = list(csv.DictReader((out / "objects.csv").open()))
    counts = [json.loads((out / f"{p.stem}.json").read_text())["object_count"] for p in picked]
    assert [sum(r["image"] == p.name for r in table) for p in picked] == counts


def test_cli_predict_reports_bad_files(built_repo, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(npy_bytes(np.full((8, 8), np.nan, np.float32)))
    result = run(["segflow", "predict", str(bad), "--out", str(tmp_path / "o")], built_repo, check=False)
    assert result.returncode == 1 and "NaN" in result.stderr


def _chromium() -> tuple[str, str] | None:
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(
    _chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
def test_page_in_headless_chromium(server, sample_images):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{server.url}/")
        driver.find_element(By.ID, "file").send_keys(str(sample_images[5]))
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "count").text.strip())
        expected = post(server, "/segment", {"image": sample_images[5].read_bytes()}).json()["object_count"]
        count_text = driver.find_element(By.ID, "count").text
        assert count_text.startswith(f"{expected} object"), count_text
        # The outlined picture rendered at the image's size.
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") == 64
        )
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
