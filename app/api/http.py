"""HTTP plumbing shared by both deployables: request ids, JSON and problem responses, exception handlers, and
the liveness route both serve (`healthz`).

Errors are mapped to problem+json once, here. Nothing but a `Problem`'s own detail reaches a client: an
unexpected exception answers `internal_error` with the request id, and is logged by type, never with its
message or stack (which could hold SQL or a secret).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec

from app import telemetry
from app.api.schemas import Health
from app.errors import PROBLEM_CONTENT_TYPE, Problem, problem_body

log = logging.getLogger("txroute.http")

REQUEST_ID_HEADER = "x-request-id"
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def request_id(request: Request[Any, Any, Any]) -> str:
    """The caller's X-Request-Id when well-formed, else a new one; the same for the whole request."""
    state = request.scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER)
        rid = telemetry.request_id(given)
        state["request_id"] = rid
    return str(rid)


def json_response(
    request: Request[Any, Any, Any], status: int, body: Any, headers: dict[str, str] | None = None
) -> Response[bytes]:
    h = {"x-request-id": request_id(request)}
    if headers:
        h.update(headers)
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=h)


# The body is the msgspec struct the OpenAPI document describes, so the answer cannot drift from it.
@get("/healthz", summary="Liveness: the process answers (no database work)",
     responses={200: ResponseSpec(Health, description="alive")})
async def healthz(request: Request[Any, Any, Any]) -> Response[bytes]:
    return json_response(request, 200, Health(status="ok"))


def problem_response(request: Request[Any, Any, Any], problem: Problem) -> Response[bytes]:
    rid = request_id(request)
    telemetry.annotate(error_code=problem.code)
    if problem.code == "misdirected":
        telemetry.METRICS.misdirected.labels("region", str(request.app.state.get("region", ""))).inc()
    return Response(
        problem.body(rid),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers={"x-request-id": rid, **problem.headers},
    )


def handle_problem(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


def handle_http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code)
    if code is None:
        return handle_unexpected(request, exc)
    headers = {"allow": exc.headers["allow"]} if exc.headers and "allow" in exc.headers else None
    return problem_response(request, Problem(code, headers=headers))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    rid = request_id(request)
    telemetry.annotate(error_code="internal_error")
    log.error(
        "unhandled_error",
        extra={"request_id": rid, "error_type": type(exc).__name__, "path": request.url.path},
    )
    return Response(
        problem_body("internal_error", f"internal error; quote request id {rid}", rid),
        status_code=500,
        media_type=PROBLEM_CONTENT_TYPE,
        headers={"x-request-id": rid},
    )


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
