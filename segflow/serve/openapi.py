"""The OpenAPI description, completed with every status the service answers.

BentoML describes each API's 200 and its own 400/404/500. The gatekeeper and the decoders
also answer 401, 408, 413, 415 and 422 with segflow's error body, and the GET routes
(/metadata, /stats) are not described at all; a client generated from the description
could not know them. The gatekeeper passes BentoML's /docs.json through `complete_spec`.
"""

from __future__ import annotations

ERROR_SCHEMA_NAME = "SegflowError"
ERROR_SCHEMA = {
    "type": "object",
    "title": ERROR_SCHEMA_NAME,
    "description": "Every refusal: what was wrong and how to fix it.",
    "required": ["error", "status", "request_id"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, and how to fix it"},
        "status": {"type": "integer", "description": "the HTTP status, repeated"},
        "request_id": {
            "type": "string",
            "nullable": True,
            "description": "also in the x-request-id header; null when the connection never became a request",
        },
    },
}
UPLOAD_STATUSES = {
    400: "Empty, truncated or corrupt file; malformed form; a missing or unexpected field",
    401: "Missing or wrong bearer token (when the service runs with SEGFLOW_API_TOKEN)",
    408: "The headers or body did not arrive in time (serve.header_timeout_s, serve.body_timeout_s)",
    413: "Too many bytes, pixels or batch images (serve.max_upload_bytes, max_pixels, max_batch_images)",
    415: "Not multipart/form-data, or a file format the service does not accept (serve.formats)",
    422: "Decodable but unusable: pixel type, shape, NaN, a pickled array, or a bad option value",
}
# Answers an API gives besides the content type BentoML derives from its return type.
EXTRA_ANSWERS = {"/segment_labels": {"image/tiff": {"schema": {"type": "string", "format": "binary"}}}}
GET_ROUTES = {
    "/metadata": "The model, its registry version, test metrics, lineage and the input contract",
    "/stats": "Recent traffic: latency percentiles, errors by status, input drift",
}


def complete_spec(spec: dict, api_paths: frozenset[str]) -> dict:
    """`spec` (BentoML's OpenAPI description, as a dict) with segflow's refusals on every API
    in `api_paths` and the GET routes described. Modifies and returns `spec`."""
    spec.setdefault("components", {}).setdefault("schemas", {})[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    paths = spec.setdefault("paths", {})
    for path in api_paths:
        operation = paths.get(path, {}).get("post")
        if operation is not None:
            operation.setdefault("responses", {}).update(
                {str(status): _error(text) for status, text in UPLOAD_STATUSES.items()}
            )
            _tighten(operation)
            ok = operation["responses"].get("200") or operation["responses"].get(200)
            if ok is not None:
                ok.setdefault("content", {}).update(EXTRA_ANSWERS.get(path, {}))
    for path, text in GET_ROUTES.items():
        paths[path] = {
            "get": {
                "summary": text,
                "operationId": path.strip("/"),
                "responses": {
                    "200": {
                        "description": text,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _error(UPLOAD_STATUSES[401]),
                    "408": _error(UPLOAD_STATUSES[408]),
                },
            }
        }
    return spec


def _tighten(operation: dict) -> None:
    """Describe the form as the gatekeeper enforces it: no fields beyond the API's own, and a
    diameter that is a positive number of pixels (BentoML's description allows any number
    and any extra field, so a client built from it would send requests that get 400 or 422).
    What no schema can say, that the file must be a decodable image, stays a 4xx."""
    from segflow.serve.gatekeeper import MAX_DIAMETER

    for media in operation.get("requestBody", {}).get("content", {}).values():
        schema = media.get("schema", {})
        schema["additionalProperties"] = False
        diameter = schema.get("properties", {}).get("diameter")
        if diameter is not None:
            diameter.update(
                {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMinimum": True,  # OpenAPI 3.0's form
                    "maximum": MAX_DIAMETER,
                    "description": "the objects' typical diameter in pixels; leave it out to estimate it",
                }
            )


def _error(description: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}
