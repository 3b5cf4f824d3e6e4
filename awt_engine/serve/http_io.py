"""Reading the HTTP layer's requests and writing its answers' rows (:mod:`.app` has the
routes and documents the formats): multipart and JSON classify requests, base64 and data
URL images (URLs are refused: nothing is ever fetched), OpenAI embeddings requests, and
the ``{"error": {...}}`` body. Framework-free but for the multipart form Starlette parses.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:([^,;]*)(;[^,]*)?,", re.DOTALL)
_NEVER_FETCHED = (
    "images are never fetched from URLs: send the image's bytes (multipart) or base64 / a "
    "data: URL (JSON)"
)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "payload_too_large",
    422: "unprocessable_error",
    499: "client_closed_request",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class HTTPProblem(Exception):
    """An error answer of the app itself: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "status": status}}


async def classify_request(request, config) -> tuple[list, list, dict]:
    """(images: bytes each, or the reason one cannot be read; names; classify keywords)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images, names, fields = await _multipart(request, config.max_images)
    elif kind in ("application/json", ""):
        body = await json_body(request)
        if "images" not in body:
            raise HTTPProblem(422, 'a JSON request needs "images": [base64 or data URL, ...]')
        if not isinstance(body["images"], list) or not all(
            isinstance(s, str) for s in body["images"]
        ):
            raise HTTPProblem(422, '"images" must be a list of base64 strings or data URLs')
        _count(len(body["images"]), config.max_images)
        images = [_decode_image_text(s) for s in body["images"]]
        names, fields = [None] * len(images), body
    else:
        raise HTTPProblem(400, f"unsupported content type {kind!r}: multipart/form-data or JSON")
    _count(len(images), config.max_images)
    return images, names, _settings(fields, config)


async def _multipart(request, max_images: int) -> tuple[list, list, dict]:
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=max_images + 1, max_fields=1000)
    except (MultiPartException, HTTPException) as exc:
        message = getattr(exc, "message", None) or getattr(exc, "detail", str(exc))
        if "Too many files" in str(message):
            raise HTTPProblem(413, f"more than {max_images} images in one request") from None
        raise HTTPProblem(400, f"malformed multipart body: {message}") from None
    try:  # uploads over 1 MiB spool to temporary files: closed whatever happens
        return await _form_fields(form, max_images)
    finally:
        await form.close()


async def _form_fields(form, max_images: int) -> tuple[list, list, dict]:
    from starlette.datastructures import UploadFile

    uploads = form.getlist("image")
    for u in uploads:
        if isinstance(u, str) and _URL.match(u.strip()):
            raise HTTPProblem(422, f"image {u.strip()[:80]!r} is a URL: {_NEVER_FETCHED}")
        if not isinstance(u, UploadFile):
            raise HTTPProblem(422, '"image" fields must be files (-F image=@photo.jpg)')
    _count(len(uploads), max_images)
    images = [await u.read() for u in uploads]
    names = [u.filename for u in uploads]
    labels = [
        part.strip()
        for field in form.getlist("candidate_labels")
        if isinstance(field, str)
        for part in field.split(",")
        if part.strip()
    ]
    fields = {k: form.get(k) for k in ("top_k", "template", "scorer", "views") if k in form}
    if labels:
        fields["candidate_labels"] = labels
    return images, names, fields


async def json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPProblem(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the JSON body must be an object")
    return body


def _count(n: int, max_images: int) -> None:
    if n == 0:
        raise HTTPProblem(422, "no image given: send image file fields or JSON images")
    if n > max_images:
        raise HTTPProblem(413, f"{n} images in one request; the server takes {max_images}")


def _settings(fields: dict, config) -> dict:
    """The classify keywords of the request's fields, each checked (422 naming it)."""
    out: dict[str, Any] = {"top_k": _int(fields.get("top_k", 5), "top_k")}
    labels = fields.get("candidate_labels")
    if isinstance(labels, str):
        labels = [p.strip() for p in labels.split(",") if p.strip()]
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise HTTPProblem(422, "candidate_labels must be a list of strings or a comma list")
        if not labels:
            raise HTTPProblem(422, "candidate_labels is empty")
        if len(labels) > config.max_labels:
            raise HTTPProblem(
                422, f"{len(labels)} candidate labels; the server takes {config.max_labels}"
            )
        out["labels"] = labels
    for name in ("template", "scorer"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise HTTPProblem(422, f"{name} must be a string")
        if value:
            out[name] = value
    if fields.get("views") is not None:
        views = _int(fields["views"], "views")
        if config.max_views is not None and views > config.max_views:
            raise HTTPProblem(422, f"views {views}: the server takes at most {config.max_views}")
        out["views"] = views
    return out


def _int(value, name: str) -> int:
    try:
        number = int(value) if not isinstance(value, bool | float) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise HTTPProblem(422, f"{name} must be a whole number >= 1, got {value!r}")
    return number


def _decode_image_text(text: str) -> bytes | str:
    """The bytes of a base64 string or data URL; the reason as a str when they cannot be
    read (that image's error row); 422 for a URL (never fetched)."""
    if _URL.match(text):
        raise HTTPProblem(422, _NEVER_FETCHED)
    m = _DATA_URL.match(text)
    if m and "base64" not in (m.group(2) or "").lower():
        return "a data URL image must be base64-encoded (data:image/png;base64,...)"
    payload = text[m.end() :] if m else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"not valid base64: {exc}"


def result_row(index: int, name: str | None, result: dict) -> dict:
    row: dict[str, Any] = {"index": index, "path": name}
    if "error" in result:
        row["error"] = result["error"]
        return row
    labels, scores = list(result["labels"]), [float(s) for s in result["scores"]]
    row.update(labels=labels, scores=scores)
    row["predictions"] = [{"label": a, "score": s} for a, s in zip(labels, scores, strict=True)]
    return row


def embedding_request(body: dict, model_name: str, config) -> tuple[dict, dict, str]:
    """({index: text}, {index: image bytes}, encoding format) of an embeddings request."""
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise HTTPProblem(422, f'encoding_format must be "float" or "base64", got {fmt!r}')
    model = body.get("model")
    if model not in (None, "", model_name):
        raise HTTPProblem(404, f"model {model!r} is not served here; GET /v1/models lists it")
    given = body.get("input")
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise HTTPProblem(
            422,
            '"input" must be a string or a non-empty list of strings (token arrays are '
            "not supported)",
        )
    texts, pictures = {}, {}
    _count(sum(s.startswith("data:") for s in items) or 1, config.max_images)
    if len(items) > config.max_labels:
        raise HTTPProblem(
            422, f"{len(items)} inputs in one request; the server takes {config.max_labels}"
        )
    for i, item in enumerate(items):
        if item.startswith("data:"):
            image = _decode_image_text(item)
            if isinstance(image, str):
                raise HTTPProblem(422, f"input {i}: {image}")
            pictures[i] = image
        elif _URL.match(item):
            raise HTTPProblem(
                422, f"input {i} is a URL: images are never fetched; send a data: URL"
            )
        else:
            texts[i] = item
    return texts, pictures, fmt


def encode_vector(vector: list[float], fmt: str):
    if fmt == "float":
        return vector
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# The request bodies as OpenAPI describes them (the routes read the body themselves, so
# the framework cannot infer them): /openapi.json and /docs show these.
_SETTINGS = {
    "top_k": {"type": "integer", "minimum": 1, "default": 5},
    "template": {"type": "string", "description": 'a prompt with one "{}"'},
    "scorer": {"type": "string", "description": "a scorer name (awt-engine scorers)"},
    "views": {"type": "integer", "minimum": 1, "description": "views per image"},
}
OPENAPI_CLASSIFY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "candidate_labels": {"type": "string", "description": "a comma list"},
                        **_SETTINGS,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "description": "base64 or a data: URL"},
                        },
                        "candidate_labels": {"type": "array", "items": {"type": "string"}},
                        **_SETTINGS,
                    },
                }
            },
        },
    }
}
OPENAPI_EMBEDDINGS = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input"],
                    "properties": {
                        "input": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}},
                            ],
                            "description": "texts, or images as data:image/...;base64 URLs",
                        },
                        "model": {"type": "string"},
                        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
                    },
                }
            }
        },
    }
}


__all__ = [
    "OPENAPI_CLASSIFY",
    "OPENAPI_EMBEDDINGS",
    "HTTPProblem",
    "classify_request",
    "embedding_request",
    "encode_vector",
    "error_body",
    "json_body",
    "result_row",
]
