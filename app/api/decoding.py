"""Strict decoding of request bodies and headers into typed values, with a stable code for every refusal."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from app import limits
from app.errors import Problem

T = TypeVar("T")

_IDEMPOTENCY_KEY = re.compile(rf"^[\x21-\x7e]{{1,{limits.IDEMPOTENCY_KEY_CHARS_MAX}}}$")
# The field in msgspec's message ("at `$.amount`", "in `$.metadata`"), also in a batch item ("at `$.items[3].amount`").
_FIELD = re.compile(r"(?:at|in) `\$(?:\.items\[[0-9]+\])?\.([a-z_]+)")
_FIELD_CODES = {
    "amount": "invalid_amount",
    "overdraft_limit": "invalid_amount",
    "currency": "unsupported_currency",
    "account": "invalid_account_id",
    "debit_account": "invalid_account_id",
    "credit_account": "invalid_account_id",
    "metadata": "invalid_metadata",
}
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_body(
    body: bytes, content_type: str, target: type[T], *, bytes_max: int = limits.REQUEST_BODY_BYTES_MAX
) -> T:
    """Decode `body` into `target`, or raise a `Problem` naming what is wrong."""
    if len(body) > bytes_max:
        raise Problem("payload_too_large", f"the body may hold at most {bytes_max} bytes")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise Problem("unsupported_media_type", "send the body as application/json")
    decoder = _decoders.get(target)
    if decoder is None:
        decoder = _decoders[target] = msgspec.json.Decoder(target, strict=True)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        message = str(exc)
        m = _FIELD.search(message)
        code = _FIELD_CODES.get(m.group(1), "invalid_request") if m else "invalid_request"
        raise Problem(code, message) from None
    except msgspec.DecodeError:
        raise Problem("malformed_json", "the body is not a valid JSON document") from None


def decode_optional_body(body: bytes, content_type: str, target: type[T]) -> T:
    """Like `decode_body`, for a route whose body may be left out: an empty body is the target's defaults."""
    if not body.strip():
        return target()
    return decode_body(body, content_type, target)


def idempotency_key(value: str | None) -> str:
    if value is None:
        raise Problem("idempotency_key_missing", "send an Idempotency-Key header with every POST")
    if not _IDEMPOTENCY_KEY.match(value):
        raise Problem(
            "idempotency_key_invalid",
            f"the Idempotency-Key must be 1..{limits.IDEMPOTENCY_KEY_CHARS_MAX} visible ASCII characters",
        )
    return value
