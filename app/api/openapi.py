"""The OpenAPI document both deployables serve at `/openapi.json`: Litestar's, plus the request bodies we
decode ourselves (strictly, with msgspec) and the problem codes."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.openapi import OpenAPIConfig

from app.errors import CODES

OPENAPI_CONFIG = OpenAPIConfig(
    title="txroute",
    version="1",
    description=(
        "Accounts and transfers in integer minor units. Every POST needs an Idempotency-Key header; a replay "
        "answers the stored response with `Idempotent-Replayed: true`. Errors are RFC 9457 problem+json with a "
        "stable `code`."
    ),
    path="/schema",
)


OPTIONAL_BODIES = frozenset({"CaptureRequest"})


def build_document(application: Litestar, bodies: dict[str, type[Any]]) -> dict[str, Any]:
    document: dict[str, Any] = application.openapi_schema.to_schema()
    _, components = msgspec.json.schema_components(
        list(bodies.values()), ref_template="#/components/schemas/{name}"
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(components)
    for path, struct in bodies.items():
        document["paths"][path]["post"]["requestBody"] = {
            # A capture's body may be left out (the whole hold is captured); every other body is required.
            "required": struct.__name__ not in OPTIONAL_BODIES,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{struct.__name__}"}}},
        }
    # Every public POST, with a body or without (a void, a close), needs its Idempotency-Key.
    for path, item in document["paths"].items():
        if path.startswith("/v1/") and "post" in item:
            item["post"].setdefault("parameters", []).append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x21-\\x7e]+$"},
                }
            )
    document["info"]["x-problem-codes"] = {code: {"status": s, "title": t} for code, (s, t) in CODES.items()}
    return document


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_document(request: Request[Any, Any, Any]) -> Response[bytes]:
    cached = request.app.state.get("openapi_document")
    if cached is None:
        doc = build_document(request.app, request.app.state.request_bodies)
        cached = request.app.state.openapi_document = msgspec.json.encode(doc)
    return Response(cached, media_type="application/json")
