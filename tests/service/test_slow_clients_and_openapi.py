"""What a client can rely on beyond the happy path, against a real `bentoml serve`: the OpenAPI
description names every status the service answers, and slow clients are cut off."""

from __future__ import annotations

import json
import socket
import time

import httpx
import jsonschema
import pytest

from segflow.serve.gatekeeper import API_PATHS
from segflow.serve.openapi import ERROR_SCHEMA
from tests.service.conftest import SLOW_CLIENT_DEADLINES, TOKEN

pytestmark = pytest.mark.slow

REFUSALS = ("400", "401", "408", "413", "415", "422")


def test_openapi_documents_every_refusal_with_the_error_body(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert spec["components"]["schemas"]["SegflowError"] == ERROR_SCHEMA
    for path in API_PATHS:
        responses = spec["paths"][path]["post"]["responses"]
        for status in REFUSALS:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/SegflowError"}, (path, status)
        assert "200" in responses and "500" in responses  # BentoML's own, kept
    for path in ("/metadata", "/stats"):
        assert set(spec["paths"][path]["get"]["responses"]) >= {"200", "401"}
    # A real refusal is what the description says.
    refused = httpx.post(f"{server.url}/segment", files={"image": ("x.png", b"not an image")})
    assert str(refused.status_code) in REFUSALS
    jsonschema.validate(refused.json(), {**ERROR_SCHEMA, "additionalProperties": False})


def _read_all(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or `limit_s` passes)."""
    sock.settimeout(limit_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def _address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickled-headers"])
def test_late_headers_get_408_and_the_connection_closed(locked_server, trickle):
    deadline = SLOW_CLIENT_DEADLINES["header_timeout_s"]
    with socket.create_connection(_address(locked_server)) as sock:
        started = time.monotonic()
        if trickle:  # a byte of headers every 0.2 s: never complete, never idle
            for byte in b"POST /segment HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break  # closed on us: what should happen
                time.sleep(0.2)
                if time.monotonic() - started > deadline + 3:
                    break
        answer = _read_all(sock, deadline + 5)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"serve.header_timeout_s" in answer
    assert deadline - 0.5 < elapsed < deadline + 4
    assert httpx.get(f"{locked_server.url}/readyz").status_code == 200


def test_a_trickled_body_gets_408_with_the_bytes_that_came(locked_server, sample_images):
    body = sample_images[0].read_bytes()
    boundary = "segflowboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(form)}\r\n\r\n"
    ).encode()
    deadline = SLOW_CLIENT_DEADLINES["body_timeout_s"]
    with socket.create_connection(_address(locked_server)) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sent = 0
        sock.setblocking(True)
        while time.monotonic() - started < deadline + 3:
            try:
                sock.send(form[sent : sent + 50])  # 50 bytes every 0.25 s
            except OSError:
                break
            sent += 50
            time.sleep(0.25)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the answer has come
            except (TimeoutError, BlockingIOError):
                pass
            sock.settimeout(None)
        answer = _read_all(sock, 5)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert "serve.body_timeout_s" in error["error"] and error["status"] == 408 and error["request_id"]
    assert sent < len(form)  # cut off while it was still arriving
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ok = httpx.post(f"{locked_server.url}/segment", files={"image": ("a.png", body)}, headers=headers)
    assert ok.status_code == 200
