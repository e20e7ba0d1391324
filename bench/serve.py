"""Serving benchmark, side by side: raw ONNX Runtime (fp32 and INT8), the running service
(each precision, 1 and 2 workers) and a naive FastAPI+torch app, on one machine in one run.

    python bench/serve.py                       # champion from the BentoML store, data/images
    python bench/serve.py --requests 240 --json bench/serve.json

Measures, on the same 256x256 images:
  1. raw ONNX Runtime in-process, for fp32 and for the INT8 variant (when export shipped
     one): p50 latency of one image, the best throughput over batch sizes 1-16, and the
     best with calls side by side in lanes as the service makes them under load (model
     calls only: the floor any server adds to; "raw best" is the higher of the two);
  2. `bentoml serve service:svc` (POST /segment, full JSON answer) at concurrency 1 and 8,
     with serve.precision forced to fp32 and to int8 (one worker);
  3. the service as configured (serve.precision auto) with 2 workers, at concurrency 8;
     its /metadata says which precision `auto` chose here;
  4. the naive baseline (bench/naive_app.py: FastAPI, torch, one model call per request)
     at concurrency 1 and 8;
  5. raw ONNX Runtime again, to show whether the machine's speed moved during the run (a
     warning when the raw best changed by more than 15%: the ratios are then unreliable).
Each line also gives the CPU seconds spent per image (the server's whole process tree for
the servers; the load generator is not counted). Ends with

    ratios: service/raw=... service/naive=... int8/fp32=...

(service at concurrency 8, one worker, in the precision auto chose, against raw best of that
precision; against the naive peer at concurrency 8; raw best INT8 against raw best fp32) and
checks the targets: service/raw >= 0.9, service p50 at concurrency 1 <= raw p50 + 8 ms,
service/naive >= 3, int8/fp32 >= 2 (the last only where an INT8 variant exists).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segflow.core.images import read_image  # noqa: E402
from segflow.core.inference import Segmenter  # noqa: E402
from segflow.core.preprocessing import normalize  # noqa: E402
from segflow.core.tiling import pad_to_multiple  # noqa: E402
from segflow.serve.batching import lanes_for  # noqa: E402
from segflow.serve.precision import FP32_FILE, INT8_FILE, usable_int8  # noqa: E402
from segflow.serve.settings import champion_model_tag, load_serve_params, onnx_threads  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)


def champion_dir() -> Path:
    """The folder of the model `bentoml serve service:svc` would serve."""
    import bentoml

    tag = os.environ.get("SEGFLOW_MODEL_TAG") or champion_model_tag(Path.cwd())
    return Path(bentoml.models.get(tag).path)


def raw_onnxruntime(model_dir: Path, model_file: str, images: list[np.ndarray], repeats: int) -> dict:
    """Model calls only, in this process: p50 of one image, throughput by batch size, and the
    CPU seconds (all of ONNX Runtime's threads) per image at batch 1 and at the best batch."""
    segmenter = Segmenter.from_onnx(model_dir / model_file, model_dir / "preprocessing.json")
    prep = segmenter.prep
    inputs = [pad_to_multiple(normalize(img, prep), prep.pad_multiple) for img in images]
    run = segmenter._run_batch  # the bare session.run: model call only
    for x in inputs[:3]:
        run(x[None])
    single = []
    cpu = time.process_time()
    for i in range(repeats):
        started = time.perf_counter()
        run(inputs[i % len(inputs)][None])
        single.append(1000 * (time.perf_counter() - started))
    cpu_single = (time.process_time() - cpu) / repeats
    throughput, cpu_per_image = {}, {}
    for size in BATCHES:
        batch = np.stack([inputs[i % len(inputs)] for i in range(size)])
        run(batch)
        times = []
        cpu = time.process_time()
        for _ in range(max(3, repeats // size)):
            started = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - started)
        cpu_per_image[size] = (time.process_time() - cpu) / (len(times) * size)
        throughput[size] = size / float(np.median(times))
    best = max(throughput, key=throughput.get)
    result = {
        "p50_ms": round(float(np.percentile(single, 50)), 2),
        "batch1_throughput": round(1000 / float(np.median(single)), 2),
        "cpu_s_per_image_batch1": round(cpu_single, 4),
        "throughput_by_batch": {k: round(v, 2) for k, v in throughput.items()},
        "best_batch": best,
        "best_throughput": round(throughput[best], 2),
        "cpu_s_per_image": round(cpu_per_image[best], 4),
    }
    threads = segmenter_threads()
    if lanes_for(threads) > 1:
        lane = Segmenter.from_onnx(model_dir / model_file, prep, threads // lanes_for(threads))
        result["lanes"] = raw_lanes(lane._run_batch, lanes_for(threads), inputs, repeats)
    return result


def segmenter_threads() -> int:
    """The ONNX Runtime threads one service worker gets here, as service.py sizes them."""
    params = load_serve_params(ROOT / "params.yaml").model_copy(update={"workers": 1})
    return onnx_threads(params)


def raw_lanes(run, lanes: int, inputs: list[np.ndarray], repeats: int) -> dict:
    """Model calls side by side, as the service runs them under load (segflow.serve.batching):
    `lanes` threads each calling one session with a lane's share of the threads. The best
    throughput over batch sizes, and its CPU seconds per image."""
    best: dict = {"throughput": 0.0}
    for size in (1, 4, 8):
        batch = np.stack([inputs[i % len(inputs)] for i in range(size)])
        run(batch)
        calls = max(3, repeats // (size * lanes))

        def lane(batch: np.ndarray = batch, calls: int = calls) -> None:
            for _ in range(calls):
                run(batch)

        cpu, started = time.process_time(), time.perf_counter()
        workers = [threading.Thread(target=lane) for _ in range(lanes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        images = calls * size * lanes
        if images / wall > best["throughput"]:
            best = {"lanes": lanes, "batch": size, "throughput": round(images / wall, 2),
                    "cpu_s_per_image": round(cpu / images, 4)}  # fmt: skip
    return best


def raw_best(raw: dict) -> float:
    """The most images/s raw ONNX Runtime gave in any arrangement measured: one call at a
    time at its best batch, or lanes side by side."""
    return max(raw["best_throughput"], raw.get("lanes", {}).get("throughput", 0.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
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


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (BentoML's workers)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def load_test(url: str, field: str, files: list[bytes], concurrency: int, requests: int, pid: int) -> dict:
    """`requests` POSTs spread over `concurrency` threads, each with a keep-alive connection.

    Bodies are encoded up front and sent with http.client, so the load generator (which
    shares the machine's cores with the server) spends as little CPU as possible. The
    server's CPU seconds (process `pid` and its children) are read around the timed part.
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
    for i in range(2 * concurrency):  # every worker process and batch size has run once
        post(warm, i)
    warm.close()
    cpu = tree_cpu_seconds(pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu = tree_cpu_seconds(pid) - cpu
    if not latencies:
        raise SystemExit(f"{url}: all {requests} requests failed (not 200); see the server's log")
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failures": len(failures),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p90_ms": round(float(np.percentile(latencies, 90)), 2),
        "throughput": round(len(latencies) / wall, 2),
        "cpu_s_per_image": round(cpu / max(1, len(latencies)), 4),
    }


class Server:
    """A server process on a free loopback port, stopped on exit."""

    def __init__(self, cmd: list[str], ready_path: str, env: dict, log: Path, cwd: Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._output = log.open("w")
        self.process = subprocess.Popen(
            [*cmd, "--port", str(self.port)], cwd=cwd, env={**os.environ, **env},
            stdout=self._output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.log = log
        try:
            wait_ready(self.url + ready_path, self.process)
        except RuntimeError as exc:
            self.stop()
            raise SystemExit(f"{exc}; its log:\n{log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self._output.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def service_params(tmp: Path, precision: str, workers: int) -> Path:
    """A copy of params.yaml with serve.precision and serve.workers set (SEGFLOW_PARAMS)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"] |= {"precision": precision, "workers": workers}
    path = tmp / f"params-{precision}-{workers}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def bench_service(tmp: Path, precision: str, workers: int, files, concurrencies, requests) -> dict:
    """The service (POST /segment) with one precision setting and worker count."""
    env = {
        "SEGFLOW_PARAMS": str(service_params(tmp, precision, workers)),
        "SEGFLOW_REQUEST_LOG": str(tmp / f"requests-{precision}-{workers}.db"),
        "SEGFLOW_API_TOKEN": "",  # empty: no token asked (service.py)
        "BENTOML_DO_NOT_TRACK": "True",
    }
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    log = tmp / f"serve-{precision}-{workers}.log"
    with Server([bentoml_bin, "serve", "service:svc"], "/readyz", env, log) as server:
        import httpx

        metadata = httpx.get(server.url + "/metadata", timeout=30).json()
        result = {
            "precision": metadata["precision"]["precision"],
            "reason": metadata["precision"]["reason"],
            "workers": workers,
        }
        for c in concurrencies:
            result[f"c{c}"] = load_test(
                f"{server.url}/segment", "image", files, c, requests, server.process.pid
            )
    return result


def bench_naive(tmp: Path, checkpoint: Path, files, requests) -> dict:
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: no checkpoint for the naive baseline; run `dvc repro`")
    env = {"SEGFLOW_CHECKPOINT": str(checkpoint), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "uvicorn", "bench.naive_app:app", "--log-level", "warning"]
    with Server(cmd, "/docs", env, tmp / "naive.log") as server:
        return {
            f"c{c}": load_test(f"{server.url}/segment_mask", "image", files, c, requests, server.process.pid)
            for c in (1, 8)
        }


def row(name: str, p50: float | None, throughput: float, cpu: float) -> str:
    p50_text = f"{p50:8.2f}" if p50 is not None else f"{'':8}"
    return f"{name:<42} {p50_text} {throughput:8.2f} {cpu:10.4f}"


def table(results: dict) -> list[str]:
    """The side-by-side table: p50 ms, img/s and CPU s/img per line."""
    lines = [f"{'':<42} {'p50 ms':>8} {'img/s':>8} {'CPU s/img':>10}"]
    for precision, raw in results["raw_onnxruntime"].items():
        lines.append(row(f"raw ONNX Runtime {precision}, batch 1", raw["p50_ms"], raw["batch1_throughput"],
                         raw["cpu_s_per_image_batch1"]))  # fmt: skip
        lines.append(row(f"raw ONNX Runtime {precision}, best batch ({raw['best_batch']})", None,
                         raw["best_throughput"], raw["cpu_s_per_image"]))  # fmt: skip
        if "lanes" in raw:
            lanes = raw["lanes"]
            lines.append(row(f"raw {precision}, {lanes['lanes']} lanes side by side (batch {lanes['batch']})",
                             None, lanes["throughput"], lanes["cpu_s_per_image"]))  # fmt: skip
    for name, run in results["service"].items():
        for key in ("c1", "c8"):
            if key in run:
                r = run[key]
                label = f"service {name}, concurrency {key[1:]}"
                lines.append(row(label, r["p50_ms"], r["throughput"], r["cpu_s_per_image"]))
    for key, r in results.get("naive_fastapi_torch", {}).items():
        lines.append(row(f"naive FastAPI + torch, concurrency {key[1:]}", r["p50_ms"], r["throughput"],
                         r["cpu_s_per_image"]))  # fmt: skip
    return lines


def targets(results: dict) -> tuple[dict, str]:
    """The issue's targets, and the one-line ratios summary."""
    raw, service = results["raw_onnxruntime"], results["service"]
    served = results["auto_precision"]  # what `auto` chose on this machine
    ours = service[f"{served} 1 worker"]
    raw_served = raw[served]
    found = {
        "service/raw": (ours["c8"]["throughput"] / raw_best(raw_served), 0.9),
        "c1 p50 - raw p50 (ms)": (ours["c1"]["p50_ms"] - raw_served["p50_ms"], 8.0),
    }
    if "naive_fastapi_torch" in results:
        found["service/naive"] = (
            ours["c8"]["throughput"] / results["naive_fastapi_torch"]["c8"]["throughput"],
            3.0,
        )
    if "int8" in raw:
        found["int8/fp32"] = (raw_best(raw["int8"]) / raw_best(raw["fp32"]), 2.0)
    checks = {
        name: {"value": round(value, 2), "bound": bound,
               "met": value <= bound if name.startswith("c1") else value >= bound}
        for name, (value, bound) in found.items()
    }  # fmt: skip
    ratios = " ".join(f"{name}={t['value']:.2f}" for name, t in checks.items() if "/" in name)
    return checks, f"ratios: {ratios}"


def speed_drift(results: dict, tolerance: float = 0.15) -> dict:
    """Raw best throughput at the end against the start, per precision; prints a warning
    when the machine's speed moved by more than `tolerance` during the run."""
    drift = {}
    for precision, start in results["raw_onnxruntime"].items():
        end = raw_best(results["raw_onnxruntime_at_end"][precision])
        drift[precision] = round(end / raw_best(start) - 1, 3)
        print(f"raw {precision} best at the end: {end:.2f} img/s ({drift[precision]:+.1%} on the start)")
    if any(abs(d) > tolerance for d in drift.values()):
        print(
            f"WARNING: this machine's speed changed by more than {tolerance:.0%} during the run, so "
            "the ratios below compare measurements taken at different speeds; run it again on a "
            "quiet machine"
        )
    return drift


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
    has_int8, why_not = usable_int8(model_dir)
    precisions = ("fp32", "int8") if has_int8 else ("fp32",)
    print(f"model {model_dir}\nimages {len(images)} x {images[0].shape}, {os.cpu_count()} CPUs")
    if not has_int8:
        print(f"no INT8 lines: {why_not}")

    results: dict = {"image_shape": list(images[0].shape), "cpus": os.cpu_count(), "requests": args.requests}
    files_by_precision = {"fp32": FP32_FILE, "int8": INT8_FILE}
    results["raw_onnxruntime"] = {
        p: raw_onnxruntime(model_dir, files_by_precision[p], images, args.requests) for p in precisions
    }
    results["service"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for precision in precisions:
            results["service"][f"{precision} 1 worker"] = bench_service(
                tmp, precision, 1, files, (1, 8), args.requests
            )
        auto = bench_service(tmp, "auto", 2, files, (8,), args.requests)
        results["auto_precision"] = auto["precision"]
        results["service"][f"auto ({auto['precision']}) 2 workers"] = auto
        if not args.skip_naive:
            results["naive_fastapi_torch"] = bench_naive(tmp, args.checkpoint, files, args.requests)
    # A shared virtual machine can change speed while this runs; the ratios set measurements
    # from the start against ones from later, so the raw model is timed again to show it.
    results["raw_onnxruntime_at_end"] = {
        p: raw_onnxruntime(model_dir, files_by_precision[p], images, args.requests) for p in precisions
    }

    print("\n".join(table(results)))
    print(f"auto chose {auto['precision']}: {auto['reason']}")
    results["speed_drift"] = speed_drift(results)
    checks, ratios = targets(results)
    results["targets"] = checks
    for name, t in checks.items():
        relation = "<=" if name.startswith("c1") else ">="
        print(f"target {name} {relation} {t['bound']}: {t['value']}: {'met' if t['met'] else 'MISSED'}")
    print(ratios)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(t["met"] for t in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
