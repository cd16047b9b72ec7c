"""The regional service's HTTP controllers: decode, call one `RegionLedger` command, answer. Nothing else."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import re
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from app import limits, telemetry
from app.api.decoding import decode_body, decode_optional_body, idempotency_key
from app.api.http import json_response, problem_response
from app.api.schemas import (
    Account,
    BatchClaim,
    BatchRequest,
    BatchResult,
    CaptureRequest,
    EntriesPage,
    FundsRequest,
    OpenAccountRequest,
    ProblemDetails,
    ReferenceLookup,
    Transfer,
    TransferRequest,
    TransfersPage,
)
from app.errors import Problem, slot_moving
from app.events.webhooks import EndpointRequest
from app.ledger.states import TransferState
from app.region.batches import post_batch
from app.region.identity import batch_claimer, caller, caller_principal, verified_body
from app.region.service import RegionLedger
from app.store.shard import Outcome, TransfersQuery, utc_text
from app.topology.ids import InvalidId, parse_account_id, parse_transfer_id

REPLAYED_HEADER = "idempotent-replayed"
# Request bodies are decoded by hand (strictly); this tells the OpenAPI document what each route takes.
REQUEST_BODIES: dict[str, type[Any]] = {
    "/v1/accounts": OpenAccountRequest,
    "/v1/deposits": FundsRequest,
    "/v1/withdrawals": FundsRequest,
    "/v1/transfers": TransferRequest,
    "/v1/transfers/{transfer_id}/capture": CaptureRequest,
    "/v1/batches": BatchRequest,
    "/v1/webhook-endpoints": EndpointRequest,
}
_PROBLEM = ResponseSpec(
    data_container=ProblemDetails, description="problem+json", media_type="application/problem+json"
)
# An entry id in a cursor: ASCII digits only (str.isdigit also accepts '²', which int() refuses) and at most
# 18 of them, so it always fits the bigint it is compared with.
_CURSOR_ENTRY_ID = re.compile(r"^e([0-9]{1,18})$")
# A transfer cursor: microseconds since the epoch (at most 17 digits, year 5138) and a transfer id.
_CURSOR_TRANSFER = re.compile(r"^t([0-9]{1,17})\.(trf_[0-9A-Za-z]{1,40})$")
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
TRANSFER_STATES = frozenset(state.value for state in TransferState)
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
    if code == "misdirected" and "owner_shard" not in body:
        region, shard = ledger(request).owner_of(int(body["slot"]))
        body.update(owner_region=region, owner_shard=shard)
    elif code == "misdirected":  # the shard's own record of where the slot moved: this region routes there now
        ledger(request).learn(int(body["slot"]), str(body["owner_region"]), str(body["owner_shard"]))
    # slot_moving: frozen by a move (issue 11), nothing was written and the switch lands shortly: a Retry-After.
    problem = (slot_moving(detail, extra=body, advise=False) if code == "slot_moving"
               else Problem(code, detail, extra=body))
    response = problem_response(request, problem)
    response.headers.update(headers)
    return response


async def _body(request: Request[Any, Any, Any], target: type[Any], *, optional: bool = False) -> Any:
    # After `caller`: the bytes decoded are those the hop token's body digest was checked against.
    # Every public write comes through here: a drained region refuses it before reading the body.
    ledger(request).refuse_writes_if_draining()
    key = idempotency_key(request.headers.get("idempotency-key"))
    content_type = request.headers.get("content-type", "")
    if optional:
        return key, decode_optional_body(verified_body(request), content_type, target)
    bytes_max = limits.BATCH_BODY_BYTES_MAX if target is BatchRequest else limits.REQUEST_BODY_BYTES_MAX
    return key, decode_body(verified_body(request), content_type, target, bytes_max=bytes_max)


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
    "/v1/batches",
    summary="Post up to 1,000 transfers, deposits and withdrawals in one request (atomic: all or none, one shard)",
    responses={
        200: ResponseSpec(BatchResult, description="non-atomic: each item's own outcome, in order"),
        201: ResponseSpec(BatchResult, description="atomic: every item posted"),
        **_ERRORS,
    },
    status_code=201,
    request_max_body_size=limits.BATCH_BODY_BYTES_MAX,
)
async def batch(request: Request[Any, Any, Any]) -> Response[bytes]:
    found = await caller_principal(request)
    key, data = await _body(request, BatchRequest)
    return outcome_response(request, await post_batch(ledger(request), found.client, key, data, found.scopes))


@post("/internal/batch-claim", summary="Bind a batch's Idempotency-Key to its body (DESIGN D15)", status_code=200,
      include_in_schema=False)
async def batch_claim(request: Request[Any, Any, Any]) -> Response[bytes]:
    """A router's first call for a client's batch: 200 when the key is new or was claimed by the same body,
    `422 idempotency_key_reused` for another body, the slot's 421/503 when another shard owns it."""
    client = await batch_claimer(request)
    key, claim = await _body(request, BatchClaim)
    store = await ledger(request).store_for_slot(claim.slot)
    return outcome_response(request, await store.claim_batch(client, key, claim.slot, claim.fingerprint))


@get(
    "/v1/transfers",
    summary="Find the client's transfers by their reference, newest first",
    responses={200: ResponseSpec(ReferenceLookup), **_ERRORS},
)
async def transfers_by_reference(
    request: Request[Any, Any, Any], reference: str, limit: int | None = None
) -> Response[bytes]:
    """This region's answer; the router asks every region and merges (`unavailable_regions` names any that did
    not answer)."""
    client = await caller(request)
    text = request.query_params.get("reference", "")
    if not 1 <= len(text) <= limits.REFERENCE_CHARS_MAX:
        raise Problem("invalid_request", f"reference must have 1..{limits.REFERENCE_CHARS_MAX} characters")
    page_size = _page_size(request.query_params.get("limit"), limits.TRANSFERS_PAGE_SIZE_DEFAULT,
                           limits.TRANSFERS_PAGE_SIZE_MAX)
    stores = list(ledger(request).stores.values())
    found = await asyncio.gather(*(s.transfers_by_reference(client, text, limit=page_size) for s in stores))
    rows = sorted((row for rows in found for row in rows), key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return json_response(request, 200, {"items": [r["body"] for r in rows[:page_size]]})


@get(
    "/v1/accounts/{account_id:str}/transfers",
    summary="List an account's transfers, newest first (from/to RFC 3339, state, limit, cursor)",
    responses={200: ResponseSpec(TransfersPage), **_ERRORS},
)
async def list_account_transfers(
    request: Request[Any, Any, Any], account_id: str, cursor: str | None = None, limit: int | None = None,
    state_: Annotated[str | None, Parameter(query="state")] = None,
    from_: Annotated[str | None, Parameter(query="from")] = None, to: str | None = None,
) -> Response[bytes]:
    client = await caller(request)
    parsed = _path_id(parse_account_id, account_id, "account_not_found")
    params = request.query_params
    page_size = _page_size(params.get("limit"), limits.TRANSFERS_PAGE_SIZE_DEFAULT, limits.TRANSFERS_PAGE_SIZE_MAX)
    state_text = params.get("state")
    if state_text is not None and state_text not in TRANSFER_STATES:
        raise Problem("invalid_request", f"state must be one of {', '.join(sorted(TRANSFER_STATES))}")
    before = decode_transfers_cursor(params.get("cursor"))
    page = TransfersQuery(
        limit=page_size, from_at=_instant(params.get("from"), "from"), to_at=_instant(params.get("to"), "to"),
        state=state_text, before_at=before[0] if before else None, before_id=before[1] if before else None,
    )
    store = await ledger(request).store_for_slot(parsed.slot)
    account, rows, arrived = await store.account_transfers(parsed.text, client, parsed.slot, page)
    if account.status != 200:
        return outcome_response(request, account)
    last = rows[-1] if len(rows) == page_size else None
    next_cursor = encode_transfers_cursor(last["created_at"], last["id"]) if last else None
    body: dict[str, Any] = {"items": [r["body"] for r in rows], "next_cursor": next_cursor}
    if arrived is not None:  # the account came by a slot move: say from when the listing is whole
        body["complete_from"] = utc_text(arrived)
    return json_response(request, 200, body)


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


@get(
    "/v1/accounts/{account_id:str}",
    summary="Read an account",
    description=(
        "With `as_of` (RFC 3339 with its offset), the balance, held and available amounts at that instant, from the "
        "journal. A time before the account arrived on its shard by a slot move is refused: 422 `as_of_before_move`, "
        "whose `earliest` is the first time the shard can answer for it."
    ),
    responses={200: ResponseSpec(Account), **_ERRORS},
)
async def get_account(
    request: Request[Any, Any, Any], account_id: str, as_of: str | None = None
) -> Response[bytes]:
    """With `as_of` (RFC 3339), the balance, held and available amounts at that instant, from the journal; a time
    before the account arrived on its shard by a slot move is refused, 422 `as_of_before_move` with `earliest`, the
    first time the shard can answer for it."""
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
    page_size = _page_size(request.query_params.get("limit"), limits.ENTRIES_PAGE_SIZE_DEFAULT,
                           limits.ENTRIES_PAGE_SIZE_MAX)
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
    try:
        at = at.astimezone(datetime.UTC)  # as the database driver sends it: 0001-01-01T00:00:00+01:00 has no UTC
    except OverflowError:
        raise Problem("invalid_as_of", "as_of is before the first representable instant") from None
    if at > datetime.datetime.now(datetime.UTC):
        raise Problem("invalid_as_of", "as_of is in the future")
    return at


def _page_size(text: str | None, default: int, size_max: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= size_max:
        raise Problem("invalid_request", f"limit must be an integer in 1..{size_max}")
    return int(text)


def _instant(text: str | None, name: str) -> datetime.datetime | None:
    """An RFC 3339 instant with its offset (a time without one is ambiguous and refused)."""
    if text is None:
        return None
    at = None
    if _RFC3339.match(text):
        try:
            at = datetime.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        except ValueError:
            at = None
    if at is None:
        raise Problem("invalid_request", f"{name} must be an RFC 3339 time with an offset, e.g. 2026-11-28T06:00:00Z")
    return at


def encode_transfers_cursor(created_at: datetime.datetime, transfer_id: str) -> str:
    """Opaque to clients: the last listed transfer's creation instant (microseconds) and id."""
    micros = (created_at - _EPOCH) // datetime.timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"t{micros}.{transfer_id}".encode()).decode().rstrip("=")


def decode_transfers_cursor(text: str | None) -> tuple[datetime.datetime, str] | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    m = _CURSOR_TRANSFER.match(raw)
    if m is None:
        raise Problem("invalid_cursor", "use the next_cursor of a previous page as it was given")
    return _EPOCH + datetime.timedelta(microseconds=int(m.group(1))), m.group(2)


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
    open_account, deposit, withdraw, transfer, capture, void, close_account, batch, get_account, list_entries,
    list_account_transfers, get_transfer, transfers_by_reference,
]
