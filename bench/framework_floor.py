"""What the server framework costs per request, before segflow does anything.

    python bench/framework_floor.py                      # 2,000 requests per load test
    python bench/framework_floor.py --raw-best 86.45     # also: what service/raw 0.9 leaves

Serves bench/floor_app.py's empty endpoint (the same multipart upload as POST /segment,
a tiny JSON answer) three ways: as a BentoML `@bentoml.api` (what service.py's /segment is),
as a Starlette route mounted in a BentoML service (`@bentoml.asgi_app`), and on plain
Starlette + uvicorn. Each is driven at concurrency 1 and 8 by bench/serve.py's load
generator with the sample's images, and each line gives the server's CPU seconds per request
(its process tree) and the load generator's (this process), which share the machine's cores.

With --raw-best (raw ONNX Runtime's best img/s from `python bench/serve.py`, on this
machine), it also prints the CPU budget that service/raw >= 0.9 leaves for everything beside
the model: on N cores, N / (0.9 * raw) - N / raw seconds per image, to be shared by the
server framework, segflow's decoding, post-processing and answer, and the load generator.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import Server, load_test  # noqa: E402

SERVERS = {
    "BentoML @bentoml.api": ("bentoml", "serve", "bench.floor_app:BentoApi", "/readyz"),
    "Starlette route mounted in BentoML": ("bentoml", "serve", "bench.floor_app:BentoMounted", "/readyz"),
    "plain Starlette + uvicorn": ("uvicorn", "bench.floor_app:app", "--no-access-log", "/ready"),
}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, files: list[bytes], requests: int, log: Path) -> list[dict]:
    *args, ready = SERVERS[name]
    binary = str(Path(sys.executable).parent / args[0])
    env = {"BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT)}
    rows = []
    with Server([binary, *args[1:]], ready, env, log) as server:
        for concurrency in (1, 8):
            before = own_cpu_seconds()
            result = load_test(
                f"{server.url}/segment", "image", files, concurrency, requests, server.process.pid
            )
            client = (own_cpu_seconds() - before) / requests
            rows.append({"server": name, **result, "client_cpu_s": round(client, 5)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "images")
    parser.add_argument("--requests", type=int, default=2000, help="requests per load test")
    parser.add_argument("--raw-best", type=float, help="raw ONNX Runtime best img/s (bench/serve.py)")
    args = parser.parse_args()

    files = [p.read_bytes() for p in sorted(args.images.glob("*.png"))[:16]]
    if not files:
        raise SystemExit(f"{args.images}: no PNG images; run `make data` or pass --images")
    cores = len(os.sched_getaffinity(0))
    print(f"{len(files)} images, {sum(map(len, files)) // len(files)} bytes each on average, {cores} cores")
    print("| server, empty endpoint | concurrency | req/s | p50 ms | server CPU ms/req | client CPU ms/req |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(SERVERS):
            for r in measure(name, files, args.requests, Path(tmp) / f"server{i}.log"):
                print(
                    f"| {name} | {r['concurrency']} | {r['throughput']:.0f} | {r['p50_ms']:.2f} "
                    f"| {1000 * r['cpu_s_per_image']:.1f} | {1000 * r['client_cpu_s']:.2f} |"
                )
    if args.raw_best:
        budget = cores / (0.9 * args.raw_best) - cores / args.raw_best
        print(
            f"service/raw >= 0.9 against raw best {args.raw_best} img/s on {cores} cores leaves "
            f"{1000 * budget:.1f} ms of CPU per image beside the model, for the server, segflow's "
            "own work and the load generator together"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
