"""Serving benchmark: raw ONNX Runtime vs the running service vs a naive FastAPI+torch app.

    python bench/serve.py                       # champion from the BentoML store, data/images
    python bench/serve.py --requests 200 --json bench/serve.json

Measures, in one run on this machine and on the same 256x256 images:
  1. raw ONNX Runtime in-process: p50 latency of one image, and the best throughput over
     batch sizes 1-16 (model call only: the floor any server adds to);
  2. `bentoml serve service:svc` (POST /segment, full JSON answer) at concurrency 1 and 8;
  3. the naive baseline (bench/naive_app.py: FastAPI, torch, one model call per request)
     at concurrency 1 and 8.
Then checks the targets: service p50 at concurrency 1 <= 1.25 x raw + 10 ms, and service
throughput at concurrency 8 >= 0.8 x raw best batched throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segflow.core.images import read_image  # noqa: E402
from segflow.core.inference import Segmenter, normalize  # noqa: E402
from segflow.core.tiling import pad_to_multiple  # noqa: E402
from segflow.serve.settings import champion_model_tag  # noqa: E402


def champion_dir() -> Path:
    """The folder of the model `bentoml serve service:svc` would serve."""
    import bentoml

    tag = os.environ.get("SEGFLOW_MODEL_TAG") or champion_model_tag(Path.cwd())
    return Path(bentoml.models.get(tag).path)


def raw_onnxruntime(model_dir: Path, images: list[np.ndarray], repeats: int) -> dict:
    segmenter = Segmenter.from_onnx(model_dir / "model.onnx", model_dir / "preprocessing.json")
    prep = segmenter.prep
    inputs = [pad_to_multiple(normalize(img, prep), prep.pad_multiple) for img in images]
    run = segmenter._run_batch  # the bare session.run: model call only
    for x in inputs[:3]:
        run(x[None])
    single = []
    for i in range(repeats):
        started = time.perf_counter()
        run(inputs[i % len(inputs)][None])
        single.append(1000 * (time.perf_counter() - started))
    throughput = {}
    for size in (1, 2, 4, 8, 16):
        batch = np.stack([inputs[i % len(inputs)] for i in range(size)])
        run(batch)
        times = []
        for _ in range(max(3, repeats // size)):
            started = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - started)
        throughput[size] = size / float(np.median(times))
    best = max(throughput, key=throughput.get)
    return {
        "p50_ms": round(float(np.percentile(single, 50)), 2),
        "throughput_by_batch": {k: round(v, 2) for k, v in throughput.items()},
        "best_batch": best,
        "best_throughput": round(throughput[best], 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    """A pre-encoded multipart/form-data body with one file part, and its content type."""
    boundary = "segflowbench7d1e"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load_test(url: str, field: str, files: list[bytes], concurrency: int, requests: int) -> dict:
    """`requests` POSTs spread over `concurrency` threads, each with a keep-alive connection.

    Bodies are encoded up front and sent with http.client, so the load generator (which
    shares the machine's cores with the server) spends as little CPU as possible.
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    bodies = [multipart(field, f"img{i}.png", data) for i, data in enumerate(files)]
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def post(conn, i: int) -> int:
        body, content_type = bodies[i % len(bodies)]
        conn.request("POST", parts.path, body, {"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                conn.close()
                return
            started = time.perf_counter()
            status = post(conn, i)
            elapsed = 1000 * (time.perf_counter() - started)
            with lock:
                (latencies if status == 200 else failures).append(elapsed)

    warm = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    for i in range(4):
        post(warm, i)
    warm.close()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failures": len(failures),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p90_ms": round(float(np.percentile(latencies, 90)), 2),
        "throughput": round(len(latencies) / wall, 2),
    }


def serve(cmd: list[str], ready_path: str, env: dict, cwd: Path, log: Path):
    port = free_port()
    process = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=cwd, env={**os.environ, **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}{ready_path}", process)
    return process, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "images")
    parser.add_argument("--count", type=int, default=16, help="distinct images to cycle through")
    parser.add_argument("--requests", type=int, default=160, help="requests per load test")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "artifacts" / "model" / "model.pt")
    parser.add_argument("--skip-naive", action="store_true", help="skip the FastAPI+torch baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    paths = sorted(args.images.glob("*.png"))[: args.count]
    if not paths:
        raise SystemExit(f"{args.images}: no PNG images; run `make data` or pass --images")
    files = [p.read_bytes() for p in paths]
    images = [read_image(p) for p in paths]
    model_dir = champion_dir()
    shape = images[0].shape
    print(f"model {model_dir}\nimages {len(images)} x {shape}, {os.cpu_count()} CPUs")

    results: dict = {"image_shape": list(shape), "cpus": os.cpu_count()}
    results["raw_onnxruntime"] = raw = raw_onnxruntime(model_dir, images, args.requests)
    best = f"{raw['best_throughput']} img/s at batch {raw['best_batch']}"
    print(f"raw ONNX Runtime: p50 {raw['p50_ms']} ms; best {best}")

    with tempfile.TemporaryDirectory() as tmp:
        env = {"SEGFLOW_REQUEST_LOG": f"{tmp}/requests.db", "BENTOML_DO_NOT_TRACK": "True"}
        env.pop("SEGFLOW_API_TOKEN", None)
        bentoml_bin = str(Path(sys.executable).parent / "bentoml")
        process, url = serve(
            [bentoml_bin, "serve", "service:svc"], "/readyz", env, ROOT, Path(tmp) / "serve.log"
        )
        try:
            results["service"] = {
                f"c{c}": load_test(f"{url}/segment", "image", files, c, args.requests) for c in (1, 8)
            }
        finally:
            process.terminate()
            process.wait(30)
        for c, r in results["service"].items():
            print(
                f"service /segment {c}: p50 {r['p50_ms']} ms, {r['throughput']} img/s, {r['failures']} failed"
            )

        if not args.skip_naive:
            if not args.checkpoint.is_file():
                raise SystemExit(f"{args.checkpoint}: no checkpoint for the naive baseline; run `dvc repro`")
            env = {"SEGFLOW_CHECKPOINT": str(args.checkpoint), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "uvicorn", "bench.naive_app:app", "--log-level", "warning"]
            process, url = serve(cmd, "/docs", env, ROOT, Path(tmp) / "naive.log")
            try:
                results["naive_fastapi_torch"] = {
                    f"c{c}": load_test(f"{url}/segment_mask", "image", files, c, args.requests)
                    for c in (1, 8)
                }
            finally:
                process.terminate()
                process.wait(30)
            for c, r in results["naive_fastapi_torch"].items():
                print(f"naive FastAPI+torch {c}: p50 {r['p50_ms']} ms, {r['throughput']} img/s")

    latency_bound = 1.25 * raw["p50_ms"] + 10
    throughput_bound = 0.8 * raw["best_throughput"]
    service = results["service"]
    results["targets"] = {
        "latency_c1": {"value": service["c1"]["p50_ms"], "bound": round(latency_bound, 2),
                       "met": service["c1"]["p50_ms"] <= latency_bound},
        "throughput_c8": {"value": service["c8"]["throughput"], "bound": round(throughput_bound, 2),
                          "met": service["c8"]["throughput"] >= throughput_bound},
    }  # fmt: skip
    for name, t in results["targets"].items():
        print(f"target {name}: {t['value']} vs bound {t['bound']}: {'met' if t['met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(t["met"] for t in results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
