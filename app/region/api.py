"""The regional service's HTTP controllers: decode, call one `RegionLedger` command, answer. Nothing else."""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec

from app import limits, telemetry
from app.api.decoding import decode_body, decode_optional_body, idempotency_key
from app.api.http import json_response, problem_response
from app.api.schemas import (
    Account,
    CaptureRequest,
    EntriesPage,
    FundsRequest,
    OpenAccountRequest,
    ProblemDetails,
    Transfer,
    TransferRequest,
)
from app.errors import Problem
from app.region.identity import caller, verified_body
from app.region.service import RegionLedger
from app.store.shard import Outcome
from app.topology.ids import InvalidId, parse_account_id, parse_transfer_id

REPLAYED_HEADER = "idempotent-replayed"
# Request bodies are decoded by hand (strictly); this tells the OpenAPI document what each route takes.
REQUEST_BODIES: dict[str, type[Any]] = {
    "/v1/accounts": OpenAccountRequest,
    "/v1/deposits": FundsRequest,
    "/v1/withdrawals": FundsRequest,
    "/v1/transfers": TransferRequest,
    "/v1/transfers/{transfer_id}/capture": CaptureRequest,
}
_PROBLEM = ResponseSpec(
    data_container=ProblemDetails, description="problem+json", media_type="application/problem+json"
)
# An entry id in a cursor: ASCII digits only (str.isdigit also accepts '²', which int() refuses) and at most
# 18 of them, so it always fits the bigint it is compared with.
_CURSOR_ENTRY_ID = re.compile(r"^e([0-9]{1,18})$")
_ERRORS = {status: _PROBLEM for status in (400, 401, 404, 409, 413, 415, 421, 422, 429, 503)}


def ledger(request: Request[Any, Any, Any]) -> RegionLedger:
    svc = request.app.state.ledger
    assert isinstance(svc, RegionLedger)
    return svc


def outcome_response(
    request: Request[Any, Any, Any], outcome: Outcome, *, location: str | None = None
) -> Response[bytes]:
    """The ledger's outcome as HTTP: the stored body on success, problem+json otherwise."""
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else {}
    if outcome.replayed:
        telemetry.METRICS.replays.labels(telemetry.route_label(request.scope), request.app.state.region).inc()
    if outcome.status < 400:
        if location and outcome.status in (201, 202):
            headers["location"] = location.format(**outcome.body)
        return json_response(request, outcome.status, outcome.body, headers)
    body = dict(outcome.body)
    code, detail = body.pop("code"), body.pop("detail")
    problem_headers = {}
    if code == "misdirected" and "owner_shard" not in body:
        region, shard = ledger(request).owner_of(int(body["slot"]))
        body.update(owner_region=region, owner_shard=shard)
    elif code == "misdirected":  # the shard's own record of where the slot moved: this region routes there now
        ledger(request).learn(int(body["slot"]), str(body["owner_region"]), str(body["owner_shard"]))
    elif code == "slot_moving":  # frozen by a move (issue 11): nothing was written; the switch lands shortly
        problem_headers["retry-after"] = str(limits.SLOT_MOVING_RETRY_AFTER_S)
    response = problem_response(request, Problem(code, detail, extra=body, headers=problem_headers))
    response.headers.update(headers)
    return response


async def _body(request: Request[Any, Any, Any], target: type[Any], *, optional: bool = False) -> Any:
    # After `caller`: the bytes decoded are those the hop token's body digest was checked against.
    # Every public write comes through here: a drained region refuses it before reading the body.
    ledger(request).refuse_writes_if_draining()
    key = idempotency_key(request.headers.get("idempotency-key"))
    decode = decode_optional_body if optional else decode_body
    data = decode(verified_body(request), request.headers.get("content-type", ""), target)
    return key, data


async def _key(request: Request[Any, Any, Any]) -> str:
    """The Idempotency-Key of a write that takes no body (a void, a close): any body sent is ignored."""
    ledger(request).refuse_writes_if_draining()
    return idempotency_key(request.headers.get("idempotency-key"))


@post("/v1/accounts", summary="Open an account", responses={201: ResponseSpec(Account), **_ERRORS}, status_code=201)
async def open_account(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    key, data = await _body(request, OpenAccountRequest)
    outcome = await ledger(request).open_account(client, key, data)
    return outcome_response(request, outcome, location="/v1/accounts/{id}")


@post("/v1/deposits", summary="Deposit money", responses={201: ResponseSpec(Transfer), **_ERRORS}, status_code=201)
async def deposit(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    key, data = await _body(request, FundsRequest)
    outcome = _counted("deposit", request, await ledger(request).deposit(client, key, data))
    return outcome_response(request, outcome, location="/v1/transfers/{id}")


@post("/v1/withdrawals", summary="Withdraw money", responses={201: ResponseSpec(Transfer), **_ERRORS}, status_code=201)
async def withdraw(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    key, data = await _body(request, FundsRequest)
    outcome = _counted("withdrawal", request, await ledger(request).withdraw(client, key, data))
    return outcome_response(request, outcome, location="/v1/transfers/{id}")


@post("/v1/transfers", summary="Transfer money", responses={201: ResponseSpec(Transfer), **_ERRORS}, status_code=201)
async def transfer(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    key, data = await _body(request, TransferRequest)
    outcome = _counted("transfer", request, await ledger(request).transfer(client, key, data))
    return outcome_response(request, outcome, location="/v1/transfers/{id}")


@post(
    "/v1/transfers/{transfer_id:str}/capture",
    summary="Capture a hold, all or part (the rest is released)",
    responses={201: ResponseSpec(Transfer), 202: ResponseSpec(Transfer), **_ERRORS},
    status_code=201,
)
async def capture(request: Request[Any, Any, Any], transfer_id: str) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_transfer_id, transfer_id, "transfer_not_found")
    key, data = await _body(request, CaptureRequest, optional=True)
    outcome = _counted("capture", request, await ledger(request).capture(client, key, parsed, data))
    return outcome_response(request, outcome)


@post(
    "/v1/transfers/{transfer_id:str}/void",
    summary="Void a hold (release it all)",
    responses={200: ResponseSpec(Transfer), **_ERRORS},
    status_code=200,
)
async def void(request: Request[Any, Any, Any], transfer_id: str) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_transfer_id, transfer_id, "transfer_not_found")
    key = await _key(request)
    outcome = _counted("void", request, await ledger(request).void(client, key, parsed))
    return outcome_response(request, outcome)


@post(
    "/v1/accounts/{account_id:str}/close",
    summary="Close an empty account",
    responses={200: ResponseSpec(Account), **_ERRORS},
    status_code=200,
)
async def close_account(request: Request[Any, Any, Any], account_id: str) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_account_id, account_id, "account_not_found")
    key = await _key(request)
    return outcome_response(request, await ledger(request).close_account(client, key, parsed))


@get("/v1/accounts/{account_id:str}", summary="Read an account", responses={200: ResponseSpec(Account), **_ERRORS})
async def get_account(
    request: Request[Any, Any, Any], account_id: str, as_of: str | None = None
) -> Response[bytes]:
    """With `as_of` (RFC 3339), the balance, held and available amounts at that instant, from the journal."""
    client = await caller(request)
    parsed = _path_id(parse_account_id, account_id, "account_not_found")
    at = _as_of(request.query_params.get("as_of"))
    store = await ledger(request).store_for_slot(parsed.slot)
    if at is not None:
        return outcome_response(request, await store.get_account_as_of(parsed.text, client, parsed.slot, at))
    return outcome_response(request, await store.get_account(parsed.text, client, parsed.slot))


@get(
    "/v1/accounts/{account_id:str}/entries",
    summary="List an account's entries, newest first",
    responses={200: ResponseSpec(EntriesPage), **_ERRORS},
)
async def list_entries(
    request: Request[Any, Any, Any], account_id: str, cursor: str | None = None, limit: int | None = None
) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_account_id, account_id, "account_not_found")
    page_size = _page_size(request.query_params.get("limit"))
    before_id = _decode_cursor(request.query_params.get("cursor"))
    store = await ledger(request).store_for_slot(parsed.slot)
    account, items = await store.list_entries(
        parsed.text, client, parsed.slot, before_id=before_id, limit=page_size
    )
    if account.status != 200:
        return outcome_response(request, account)
    next_cursor = _encode_cursor(items[-1]["id"]) if len(items) == page_size else None
    return json_response(request, 200, {"items": items, "next_cursor": next_cursor})


@get("/v1/transfers/{transfer_id:str}", summary="Read a transfer", responses={200: ResponseSpec(Transfer), **_ERRORS})
async def get_transfer(request: Request[Any, Any, Any], transfer_id: str) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_transfer_id, transfer_id, "transfer_not_found")
    store = await ledger(request).store_for_slot(parsed.slot)
    return outcome_response(request, await store.get_transfer(parsed.text, client, parsed.slot))


def _counted(kind: str, request: Request[Any, Any, Any], outcome: Outcome) -> Outcome:
    """Count a posting by its outcome: its state (posted, pending, returned) or its refusal's code."""
    if not outcome.replayed:
        label = str(outcome.body.get("state", "posted") if outcome.status < 400 else outcome.body.get("code"))
        telemetry.METRICS.transfers.labels(kind, label, request.app.state.region).inc()
    return outcome


def _path_id(parse: Any, text: str, code: str) -> Any:
    try:
        return parse(text)
    except InvalidId:
        raise Problem(code, f"{text[:40]!r} is not a valid id") from None


def _as_of(text: str | None) -> datetime.datetime | None:
    """An RFC 3339 time with its offset ('Z' or +hh:mm), not in the future."""
    if text is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(text) if len(text) <= 40 and "T" in text.upper() else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise Problem("invalid_as_of", "as_of must be an RFC 3339 time with its offset, e.g. 2026-11-28T06:00:00Z")
    if at > datetime.datetime.now(datetime.UTC):
        raise Problem("invalid_as_of", "as_of is in the future")
    return at


def _page_size(text: str | None) -> int:
    if text is None:
        return limits.ENTRIES_PAGE_SIZE_DEFAULT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= limits.ENTRIES_PAGE_SIZE_MAX:
        raise Problem("invalid_request", f"limit must be an integer in 1..{limits.ENTRIES_PAGE_SIZE_MAX}")
    return int(text)


def _encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"e{entry_id}".encode()).decode().rstrip("=")


def _decode_cursor(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    m = _CURSOR_ENTRY_ID.match(raw)
    if m is None:
        raise Problem("invalid_cursor", "use the next_cursor of a previous page as it was given")
    return int(m.group(1))


PUBLIC_ROUTES = [
    open_account, deposit, withdraw, transfer, capture, void, close_account, get_account, list_entries, get_transfer,
]
