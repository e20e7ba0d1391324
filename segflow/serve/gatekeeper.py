"""ASGI middleware in front of the service: access control, upload limits, request log.

It runs before BentoML parses a request, so it is where a body that is too large, of
the wrong type, or without the right token is refused cheaply, and where every API call
(refusals included) gets a request id and a row in the request log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

# Each API's one multipart field (BentoML would JSON-parse any other field, and a text
# field holding a path would name a file on the server, so only file parts get through).
UPLOAD_FIELDS = {
    "/segment": "image",
    "/segment_mask": "image",
    "/segment_labels": "image",
    "/measurements": "image",
    "/segment_overlay": "image",
    "/segment_batch": "images",
}
API_PATHS = frozenset(UPLOAD_FIELDS)
# Optional text fields besides the files. Every API takes `diameter`, the objects' diameter in
# pixels for models trained at one object size (it replaces the model's per-image estimate).
OPTION_FIELDS = {
    "/segment": ("diameter", "measurements"),
    "/segment_batch": ("diameter", "measurements"),
    "/segment_labels": ("diameter", "format"),
}
# The values a choice field accepts (what the API's type admits once BentoML JSON-parses it).
CHOICES = {"measurements": ("true", "false"), "format": ("png", "tiff")}
MAX_DIAMETER = 10_000.0  # larger than any image serve.max_pixels admits: a typo, not a cell
# Reachable without a token: health probes, and static pages that hold no data (the page
# sends the token the user types with each of its API calls).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/", "/docs", "/docs.json"})
PUBLIC_PREFIXES = ("/static_content/",)
UPLOAD_HINT = "send the image as multipart/form-data, e.g. curl -F image=@cells.png"


def error_body(status: int, reason: str, request_id: str | None) -> dict:
    return {"error": reason, "status": status, "request_id": request_id}


def error_response(status: int, reason: str, scope: dict):
    """A 4xx JSON response for a handler to return (carries the request's id)."""
    from starlette.responses import JSONResponse

    request_id = scope.get("state", {}).get("request_id")
    return JSONResponse(error_body(status, reason, request_id), status_code=status)


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(supplied.strip().encode(), token.encode())


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Gatekeeper:
    """ASGI middleware; the service instance supplies token, limits and the request log."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import bentoml

        service = bentoml.get_current_service()
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, seen = time.perf_counter(), {"status": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def refuse(status: int, reason: str, extra: tuple = ()) -> None:
            body = json.dumps(error_body(status, reason, request_id)).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *extra,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        try:
            if (
                service.token
                and not is_public(path)
                and not token_matches(headers.get("authorization"), service.token)
            ):
                await refuse(
                    401,
                    "missing or wrong token: send 'Authorization: Bearer <token>' (SEGFLOW_API_TOKEN)",
                    ((b"www-authenticate", b'Bearer realm="segflow"'),),
                )
            elif path in API_PATHS and method == "POST":
                limits = service.limits
                body, problem = await _read_upload(headers, receive, limits.max_bytes, limits.body_timeout_s)
                if problem:
                    # The rest of the body is still coming (or never will): end the connection
                    # with the answer, or its bytes would be read as the next request.
                    await refuse(*problem, ((b"connection", b"close"),))
                elif problem := await _check_form(
                    scope, body, UPLOAD_FIELDS[path], OPTION_FIELDS.get(path, ("diameter",))
                ):
                    await refuse(*problem)
                else:
                    await self.app(scope, _replay(body), send_with_id)
            elif path == "/docs.json" and method == "GET":
                await _completed_spec(self.app, scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if path in API_PATHS:
                details = scope["state"].get("segflow", {})
                service.log.record(
                    {
                        "id": request_id,
                        "time": time.time(),
                        "client": (scope.get("client") or ("", 0))[0],
                        "endpoint": path,
                        "status": seen["status"],
                        "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                        **{k: details.get(k) for k in ("images", "height", "width", "object_count")},
                        "model_version": service.model_info["version"],
                    },
                    details.get("observations", ()),
                )


async def _completed_spec(app, scope, receive, send) -> None:
    """BentoML's OpenAPI description with segflow's statuses added (segflow.serve.openapi)."""
    from segflow.serve.openapi import complete_spec

    start, chunks = {}, []

    async def keep(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    body = b"".join(chunks)
    if start.get("status") == 200:
        body = json.dumps(complete_spec(json.loads(body), API_PATHS)).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_upload(
    headers: dict, receive, max_bytes: int, timeout_s: float
) -> tuple[bytes, tuple | None]:
    """The whole request body, or (b"", (status, reason)) when it must be refused: a body
    that has not all arrived `timeout_s` after the headers gets 408 (a trickling client
    would otherwise hold a worker thread's upload slot indefinitely)."""
    content_type = headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return b"", (415, f"content type {content_type or '(none)'} is not accepted; {UPLOAD_HINT}")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return b"", (413, f"the request has {declared} bytes; this service accepts at most {max_bytes}")
    chunks, size = [], 0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return b"", (
                408,
                f"the request body did not arrive within {timeout_s:g} s (serve.body_timeout_s); "
                f"{size} bytes came",
            )
        if message["type"] == "http.disconnect":
            return b"", (400, "the client disconnected before sending the whole request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return b"", (413, f"the request exceeds {max_bytes} bytes; send a smaller image")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if size == 0:
        return b"", (400, f"the request body is empty; {UPLOAD_HINT}")
    return b"".join(chunks), None


async def _check_form(scope: dict, body: bytes, field: str, options: tuple[str, ...]) -> tuple | None:
    """(status, reason) unless the multipart body holds only file parts named `field`
    and, optionally, one valid value per field in `options`."""
    from starlette.requests import Request

    hint = f"send the file(s) in field '{field}', e.g. curl -F {field}=@cells.png"
    try:
        async with Request(scope, _replay(body)).form() as form:
            names = set(form.keys())
            if field not in names:
                return 400, f"no field '{field}' in the form; {hint}"
            if names - {field, *options}:
                return 400, f"unexpected form field(s) {_few(names - {field, *options})}; {hint}"
            if field == "image" and len(form.getlist(field)) > 1:
                return (
                    400,
                    "several files in field 'image'; send one, or use /segment_batch with field 'images'",
                )
            if any(isinstance(value, str) for value in form.getlist(field)):
                return 400, f"field '{field}' must be a file upload, not text; {hint}"
            if "diameter" in names and (problem := _check_diameter(form.getlist("diameter"))):
                return problem
            for name in names & set(CHOICES):
                if problem := _check_choice(name, form.getlist(name)):
                    return problem
    except Exception as exc:
        return 400, f"the multipart body cannot be parsed ({exc}); {hint}"
    return None


def _few(names: set[str], shown: int = 5, length: int = 40) -> str:
    """Some of `names` for an error message, each cut short, then how many more: a client
    sending thousands of fields must not get them all back."""
    listed = ", ".join(repr(n[:length]) for n in sorted(names)[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_choice(name: str, values: list) -> tuple | None:
    """(422, reason) unless `values` is one of the field's CHOICES."""
    allowed = CHOICES[name]
    if len(values) == 1 and isinstance(values[0], str) and values[0] in allowed:
        return None
    shown = values[0][:40] if len(values) == 1 and isinstance(values[0], str) else "not one text value"
    return 422, f"field {name!r} is {shown!r}; send one of {', '.join(allowed)}, e.g. -F {name}={allowed[0]}"


def _check_diameter(values: list) -> tuple | None:
    """(422, reason) unless `values` is one positive, finite number of pixels."""
    hint = "send the objects' typical diameter in pixels, e.g. -F diameter=30, or leave it out (auto)"
    if len(values) != 1 or not isinstance(values[0], str):
        return 422, f"field 'diameter' must be one number, not a file or several values; {hint}"
    try:
        value = float(values[0])
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_DIAMETER:  # NaN fails too
        return 422, f"field 'diameter' is {values[0][:40]!r}; {hint} (at most {MAX_DIAMETER:g})"
    return None


def _replay(body: bytes):
    """A `receive` that hands the already-read body to the app once."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
