"""Soak drill: bounded concurrency for a bounded time against a real `bentoml serve`, with the
resident memory of the server's processes sampled from /proc.

    python bench/soak.py --concurrency 16 --minutes 4          # the full drill (README figures)
    python bench/soak.py --concurrency 4 --minutes 0.3         # the bounded run of the slow tests

Serves this checkout's champion (`bentoml serve service:svc`) unless --url names a server
(then --pid names its main process, for memory). Clients cycle the sample images over
/segment, /segment_mask, /segment_labels and /segment_batch (4 images) on keep-alive
connections. Memory is the RSS summed over the server process and all its descendants,
sampled every 2 s; growth is measured from the end of a warm-up (--warmup requests per
client, which fill ONNX Runtime's arenas and the allocator's pools) to the end of the run.
It ends with one line:
    soak: N requests in S s at concurrency C: errors 0, p50 .. ms, p99 .. ms; server RSS A -> B MB (+g%)
Exit 1 on any error or an RSS growth of 5% or more.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import Server, multipart  # noqa: E402  (bench/serve.py)

ENDPOINTS = ("/segment", "/segment_mask", "/segment_labels", "/segment_batch")
MAX_GROWTH = 0.05


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MB) of `pid` and every process descended from it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it ended meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def batch_body(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "segflowsoakbatch"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Soak:
    """Clients posting until told to stop; latencies and failures per request."""

    def __init__(self, url: str, files: list[bytes], token: str | None):
        self.parts = urlsplit(url)
        self.bodies = {
            path: [multipart("image", f"{i}.png", data) for i, data in enumerate(files)]
            for path in ENDPOINTS[:-1]
        }
        self.bodies["/segment_batch"] = [batch_body(files[i : i + 4]) for i in range(0, len(files) - 3, 4)]
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, index: int, warmup: int, warmed: threading.Barrier) -> None:
        conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=120)
        n = 0
        while not self.stop.is_set():
            path = ENDPOINTS[(index + n) % len(ENDPOINTS)]
            options = self.bodies[path]
            body, content_type = options[(index + n) % len(options)]
            started = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": content_type, **self.auth})
                response = conn.getresponse()
                response.read()
                failed = None if response.status == 200 else f"{path}: HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                failed = f"{path}: {type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=120)
            elapsed = 1000 * (time.perf_counter() - started)
            n += 1
            if n == warmup:
                warmed.wait()  # measured from here, once every client is warm
            if n > warmup:
                with self.lock:
                    if failed:
                        self.errors.append(failed)
                    else:
                        self.latencies.append(elapsed)
            elif failed:
                with self.lock:
                    self.errors.append(failed)
        conn.close()


def run(url: str, pid: int, files: list[bytes], concurrency: int, seconds: float, warmup: int, token) -> dict:
    soak = Soak(url, files, token)
    warmed = threading.Barrier(concurrency + 1)
    threads = [
        threading.Thread(target=soak.client, args=(i, warmup, warmed), daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    warmed.wait(timeout=600)
    started = time.perf_counter()
    samples = [(0.0, tree_rss_mb(pid))]
    while (elapsed := time.perf_counter() - started) < seconds:
        time.sleep(min(2.0, seconds - elapsed))
        samples.append((round(time.perf_counter() - started, 1), tree_rss_mb(pid)))
    soak.stop.set()
    for t in threads:
        t.join(timeout=180)
    wall = time.perf_counter() - started
    first, last = samples[0][1], samples[-1][1]
    latencies = soak.latencies or [float("nan")]
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 1),
        "requests": len(soak.latencies) + len(soak.errors),
        "errors": len(soak.errors),
        "first_errors": soak.errors[:5],
        "throughput": round(len(soak.latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "rss_mb": {
            "after_warmup": round(first, 1),
            "end": round(last, 1),
            "max": round(max(s for _, s in samples), 1),
        },
        "rss_growth": round((last - first) / first, 4),
        "rss_samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running service (default: serve this checkout's champion)")
    parser.add_argument(
        "--pid", type=int, help="with --url: the server's main process id (its RSS is sampled)"
    )
    parser.add_argument("--token", help="the service's SEGFLOW_API_TOKEN, if it has one")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=10, help="requests per client before measuring")
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "images")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 request per client")
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server's process id, whose memory is sampled)")

    files = [p.read_bytes() for p in sorted(args.images.glob("*.png"))[:16]]
    if len(files) < 4:
        raise SystemExit(f"{args.images}: fewer than 4 PNG images; run `make data` or pass --images")
    process, url, pid = None, args.url, args.pid
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="segflow-soak-")) / "serve.log"
        server = Server([str(Path(sys.executable).parent / "bentoml"), "serve", "service:svc"],
                        "/readyz", {"BENTOML_DO_NOT_TRACK": "True"}, log, cwd=Path.cwd())  # fmt: skip
        process, url = server.process, server.url
        pid = process.pid
        print(f"serving on {url} (log {log}), {os.cpu_count()} CPUs")
    try:
        result = run(url, pid, files, args.concurrency, 60 * args.minutes, args.warmup, args.token)
        alive = process is None or process.poll() is None
    finally:
        if process is not None:
            server.stop()
    rss = result["rss_mb"]
    print(
        f"soak: {result['requests']} requests in {result['seconds']:.0f} s at concurrency "
        f"{result['concurrency']}: errors {result['errors']}, {result['throughput']} req/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; server RSS {rss['after_warmup']:.0f} -> "
        f"{rss['end']:.0f} MB ({100 * result['rss_growth']:+.1f}%, max {rss['max']:.0f})"
    )
    for error in result["first_errors"]:
        print(f"  error: {error}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if alive and not result["errors"] and result["rss_growth"] < MAX_GROWTH else 1


if __name__ == "__main__":
    sys.exit(main())
