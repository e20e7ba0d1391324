"""Fuzzing drill: schemathesis against a real `bentoml serve`, then mutated image files.

    python bench/fuzz.py                                     # the full drill (README figures)
    python bench/fuzz.py --max-examples 5 --mutations 60     # the bounded run of the slow tests

Serves this checkout's champion (`bentoml serve service:svc`) unless --url names a server.
1. Schema cases: schemathesis (`st run`) on /docs.json, every operation, with the checks that
   hold a service to its description: no 5xx (not_a_server_error), no undocumented status
   (status_code_conformance, ST103), documented content types, headers and response schemas,
   and auth not ignored. Left out: positive_data_acceptance and negative_data_rejection,
   whose premise (the schema decides what is valid) cannot hold for uploads: a schema-valid
   "image" of random bytes must get a 4xx, and an empty array sent as a form field is no
   field at all.
2. Mutated files: the sample images as PNG, JPEG, TIFF and .npy, each damaged by a random
   mutation (bits flipped, a run of bytes scrambled, truncated, bytes inserted or deleted,
   a header field overwritten), sent to every upload API. Every answer must be 200 or a
   documented 4xx with the error body; none may be a 5xx.
It ends with the server still answering /readyz, and one line:
    fuzz: schema cases N (failures F), mutated files M: 5xx 0, statuses {...}, server up
Exit 1 on a 5xx, an undocumented status, a schemathesis failure or a dead server.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import Server  # noqa: E402  (bench/serve.py: starts a server and waits for it)

from segflow.core.images import read_image  # noqa: E402
from segflow.serve.gatekeeper import UPLOAD_FIELDS  # noqa: E402

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,ignored_auth"
)
DOCUMENTED = {200, 400, 401, 408, 413, 415, 422}  # what segflow.serve.openapi describes


def schema_cases(url: str, max_examples: int, seed: int, token: str | None) -> dict:
    """Run schemathesis on the server's description; returns cases, failures and its output."""
    cmd = [
        str(Path(sys.executable).parent / "st"), "--no-color", "run", f"{url}/docs.json", "--checks", CHECKS,
        "--max-examples", str(max_examples), "--workers", "2", "--seed", str(seed),
        "--request-timeout", "60", "--suppress-health-check", "all",
    ]  # fmt: skip
    if token:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    generated = re.search(r"(\d+) generated", result.stdout)
    failures = re.search(r"(\d+) unique failures?", result.stdout)
    return {
        "cases": int(generated.group(1)) if generated else 0,
        "failures": int(failures.group(1)) if failures else 0,
        "exit_code": result.returncode,
        "output": result.stdout[-6000:] + result.stderr[-2000:],
    }


def encodings(image: np.ndarray) -> dict[str, bytes]:
    """One image as every accepted format."""
    import tifffile
    from PIL import Image

    out = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt)
        out[fmt.lower()] = buffer.getvalue()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, compression="zlib")
    out["tiff"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.save(buffer, image, allow_pickle=False)
    out["npy"] = buffer.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """`data` damaged one random way; returns the mutation's name and the bytes."""
    out = bytearray(data)
    kind = rng.choice(["flip", "scramble", "truncate", "insert", "delete", "header"])
    if kind == "flip":
        for pos in rng.integers(0, len(out), int(rng.integers(1, 16))):
            out[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "scramble":
        start, n = int(rng.integers(0, len(out))), int(rng.integers(1, 400))
        out[start : start + n] = rng.integers(0, 256, len(out[start : start + n]), np.uint8).tobytes()
    elif kind == "truncate":
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == "insert":
        pos = int(rng.integers(0, len(out)))
        out[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 200)), np.uint8).tobytes()
    elif kind == "delete":
        pos = int(rng.integers(0, len(out)))
        del out[pos : pos + int(rng.integers(1, 200))]
    else:  # sizes, lengths and offsets live in the first bytes of every format
        for pos in rng.integers(0, min(64, len(out)), 4):
            out[pos] = int(rng.choice([0, 0xFF, 0x7F, 0x80, int(rng.integers(0, 256))]))
    return str(kind), bytes(out)


def mutated_files(url: str, images: list[np.ndarray], count: int, seed: int, token: str | None) -> dict:
    """Send `count` damaged files, spread over every format and upload API."""
    import httpx

    rng = np.random.default_rng(seed)
    originals = [(fmt, data) for image in images for fmt, data in encodings(image).items()]
    paths = sorted(UPLOAD_FIELDS)
    statuses: collections.Counter = collections.Counter()
    bad: list[dict] = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        for i in range(count):
            fmt, data = originals[i % len(originals)]
            kind, damaged = mutate(data, rng)
            path = paths[i % len(paths)]
            response = client.post(path, files={UPLOAD_FIELDS[path]: (f"fuzz.{fmt}", damaged)})
            statuses[response.status_code] += 1
            body_ok = response.status_code == 200 or _error_body(response)
            if response.status_code >= 500 or response.status_code not in DOCUMENTED or not body_ok:
                bad.append({"path": path, "format": fmt, "mutation": kind, "status": response.status_code})
    return {"files": count, "statuses": dict(sorted(statuses.items())), "bad": bad}


def _error_body(response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return set(body) == {"error", "status", "request_id"} and body["status"] == response.status_code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running service (default: serve this checkout's champion)")
    parser.add_argument("--token", help="its SEGFLOW_API_TOKEN, if it has one")
    parser.add_argument(
        "--max-examples", type=int, default=300, help="schemathesis cases per operation and phase"
    )
    parser.add_argument("--mutations", type=int, default=1200, help="mutated files to send")
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    paths = sorted(args.images.glob("*.png"))[:8]
    if not paths:
        raise SystemExit(f"{args.images}: no PNG images; run `make data` or pass --images")
    images = [read_image(p) for p in paths]
    process, url = None, args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="segflow-fuzz-")) / "serve.log"
        server = Server([str(Path(sys.executable).parent / "bentoml"), "serve", "service:svc"],
                        "/readyz", {"BENTOML_DO_NOT_TRACK": "True"}, log, cwd=Path.cwd())  # fmt: skip
        process, url = server.process, server.url
        print(f"serving on {url} (log {log})")
    try:
        started = time.perf_counter()
        schema = schema_cases(url, args.max_examples, args.seed, args.token)
        cases, failures = schema["cases"], schema["failures"]
        print(f"schemathesis: {cases} cases, {failures} failures, exit {schema['exit_code']}")
        if schema["failures"] or schema["exit_code"]:
            print(schema["output"])
        files = mutated_files(url, images, args.mutations, args.seed, args.token)
        import httpx

        up = httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        if process is not None:
            server.stop()
    fives = sum(n for status, n in files["statuses"].items() if status >= 500)
    print(
        f"fuzz: schema cases {schema['cases']} (failures {schema['failures']}), mutated files "
        f"{files['files']}: 5xx {fives}, statuses {files['statuses']}, server {'up' if up else 'DOWN'} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    for item in files["bad"][:20]:
        print(f"  bad answer: {item}")
    if args.json:
        args.json.write_text(json.dumps({"schema": {k: v for k, v in schema.items() if k != "output"},
                                         "files": files, "server_up": up}, indent=2))  # fmt: skip
    return 0 if up and not files["bad"] and not schema["failures"] and schema["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
