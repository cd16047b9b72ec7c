"""Errors as RFC 9457 problem+json with a stable `code` (DESIGN D10).

The tree, drawn once:

    Problem                  an expected outcome with an HTTP status and a stable code; its detail is safe
                             to show the client (it never holds a secret, a stack trace or SQL)
    anything else            a bug: logged with the request id, answered as 500 `internal_error` and nothing
                             more

Every code the API can answer with is in `CODES`, with its status and title; the OpenAPI document and the
README list them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from app import limits

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://docs.txroute.dev/problems/"

# code -> (HTTP status, title)
CODES: Mapping[str, tuple[int, str]] = {
    "invalid_request": (400, "The request is not valid"),
    "malformed_json": (400, "The body is not valid JSON"),
    "invalid_amount": (400, "The amount must be an integer number of minor units in 1..2^53-1"),
    "unsupported_currency": (400, "The currency is not supported"),
    "invalid_account_id": (400, "An account id in the body is malformed"),
    "idempotency_key_missing": (400, "Every POST needs an Idempotency-Key header"),
    "idempotency_key_invalid": (400, "The Idempotency-Key header is malformed"),
    "invalid_cursor": (400, "The pagination cursor is malformed"),
    "invalid_metadata": (400, "Metadata must be at most 20 string keys of 1..40 characters, values of at most 500"),
    "invalid_as_of": (400, "as_of must be an RFC 3339 time with its offset, not in the future"),
    "unknown_shard": (400, "A saga message names a shard that does not exist here"),
    "invalid_webhook_url": (400, "The webhook url may not receive deliveries (https, public address)"),
    "unknown_event_type": (400, "An event type named is not one the API writes"),
    "unauthorized": (401, "Authentication is required"),
    "forbidden": (403, "The token does not grant this operation"),
    "not_found": (404, "No such route"),
    "account_not_found": (404, "The account was not found"),
    "transfer_not_found": (404, "The transfer was not found"),
    "webhook_endpoint_not_found": (404, "The webhook endpoint was not found"),
    "method_not_allowed": (405, "The method is not allowed on this route"),
    "idempotency_key_in_flight": (409, "A request with this Idempotency-Key is in flight"),
    "transfer_not_held": (409, "The transfer is not a hold that can still be captured or voided"),
    "account_not_empty": (409, "Only an account with balance 0, nothing held and nothing in flight can close"),
    "reference_in_use": (409, "The unique reference is already used by another transfer of the account"),
    "account_busy": (409, "An account of this posting is locked by another operation; retry shortly"),
    "payload_too_large": (413, "The body is too large"),
    "unsupported_media_type": (415, "The body must be application/json"),
    "misdirected": (421, "This region does not own the account's slot"),
    "idempotency_key_reused": (422, "The Idempotency-Key was used for a different request"),
    "insufficient_funds": (422, "The account has insufficient funds"),
    "currency_mismatch": (422, "The currency does not match the account's"),
    "account_closed": (422, "The account is closed"),
    "balance_limit_exceeded": (422, "The balance would exceed its limit"),
    "webhook_endpoints_limit": (422, "The client has as many webhook endpoints as it may"),
    "same_account": (422, "Debit and credit accounts are the same"),
    "capture_exceeds_hold": (422, "The capture is larger than the hold"),
    "as_of_before_move": (422, "as_of is before the account arrived on its shard by a slot move; see earliest"),
    "hold_not_supported": (422, "Only transfers and withdrawals can be held"),
    "batch_spans_shards": (422, "An atomic batch must keep every account on one shard"),
    "batch_refused": (422, "An item of the atomic batch was refused; nothing was posted"),
    "batch_item_not_posted": (422, "Not posted: another item of the atomic batch was refused"),
    "batch_duplicate_item_key": (422, "Two items of the batch have the same Idempotency-Key"),
    "batch_duplicate_reference": (422, "Two items of the batch declare the same unique reference"),
    "cross_shard_not_supported": (422, "Transfers between shards are not supported yet"),
    "rate_limited": (429, "Too many requests from this client; retry after the time given"),
    "internal_error": (500, "Internal error"),
    "shard_unavailable": (503, "The account's database is unavailable"),
    "region_unavailable": (503, "The account's home region is unavailable"),
    "region_draining": (503, "The account's home region is drained for maintenance; writes wait"),
    "slot_moving": (503, "The account's slot is moving to another shard; nothing was written, retry shortly"),
    "overloaded": (503, "The service is overloaded"),
    "ledger_limit_reached": (503, "A system account of the shard is at its limit; operators are alerted"),
}


class Problem(Exception):
    """An expected outcome: status and stable code from `CODES`, and a detail safe to show the client."""

    def __init__(
        self,
        code: str,
        detail: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        assert code in CODES, code
        self.code = code
        self.status, self.title = CODES[code]
        self.detail = detail or self.title
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        super().__init__(f"{code}: {self.detail}")

    def body(self, request_id: str) -> bytes:
        return problem_body(self.code, self.detail, request_id, self.extra)


def slot_moving(detail: str, *, extra: Mapping[str, Any] | None = None, advise: bool = True) -> Problem:
    """503 `slot_moving` (DESIGN D13): the slot is frozen for a move's switch or changing owner, and nothing was
    written. The one constructor of this problem, for the regions and the routers alike: it carries the
    Retry-After (SLOT_MOVING_RETRY_AFTER_S) that routers hold by and clients retry by, and appends to the
    caller's `detail` (what is moving) the advice to retry after that long with the same Idempotency-Key.
    `advise=False` relays a shard's own refusal (txr_misdirected), whose detail already says how to retry."""
    retry_after = str(limits.SLOT_MOVING_RETRY_AFTER_S)
    if advise:
        detail = f"{detail}; retry after {retry_after} s with the same Idempotency-Key"
    return Problem("slot_moving", detail, extra=extra, headers={"retry-after": retry_after})


def problem_body(code: str, detail: str, request_id: str, extra: Mapping[str, Any] | None = None) -> bytes:
    status, title = CODES[code]
    doc: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    }
    if extra:
        doc.update({k: v for k, v in extra.items() if k not in doc})
    return msgspec.json.encode(doc)
