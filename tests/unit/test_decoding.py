"""Strict decoding of request bodies: each kind of bad input is refused with its own stable code, and
nothing is coerced (no float, string or bool becomes an amount)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import limits
from app.api.decoding import decode_body, idempotency_key
from app.api.schemas import FundsRequest, OpenAccountRequest, TransferRequest
from app.errors import CODES, Problem

ACCOUNT = "acc_7a001JDQ2ZJ4M7Q0VKDA9X6QH3N5A"
OTHER = "acc_7a001JDQ2ZJ4M7Q0VKDA9X6QH3N6A"
JSON = "application/json"


def funds(**overrides: Any) -> bytes:
    body: dict[str, Any] = {"account": ACCOUNT, "amount": 100, "currency": "EUR", **overrides}
    return json.dumps(body).encode()


def refusal(body: bytes, target: type[Any] = FundsRequest, content_type: str = JSON) -> Problem:
    with pytest.raises(Problem) as caught:
        decode_body(body, content_type, target)
    assert caught.value.code in CODES
    return caught.value


def test_a_valid_deposit_decodes_exactly() -> None:
    request = decode_body(funds(reference="order-1"), JSON, FundsRequest)
    assert (request.account, request.amount, str(request.currency), request.reference) == (
        ACCOUNT, 100, "EUR", "order-1",
    )


def test_the_largest_exact_amount_is_accepted() -> None:
    assert decode_body(funds(amount=2**53 - 1), JSON, FundsRequest).amount == 2**53 - 1


def test_charset_parameter_on_the_content_type_is_accepted() -> None:
    assert decode_body(funds(), "application/json; charset=utf-8", FundsRequest).amount == 100


@pytest.mark.parametrize(
    ("raw_amount", "why"),
    [
        ("100.0", "float"),
        ("1e2", "float in exponent form"),
        ("0.5", "fraction"),
        ('"100"', "string"),
        ("true", "bool"),
        ("null", "null"),
        ("0", "zero"),
        ("-0", "negative zero"),
        ("-5", "negative"),
        (str(2**53), "2^53"),
        (str(2**64), "beyond 64 bits"),
        ("1" + "0" * 40, "far beyond 64 bits"),
        ("[100]", "array"),
        ('{"minor": 100}', "object"),
    ],
)
def test_bad_amounts_are_invalid_amount(raw_amount: str, why: str) -> None:
    body = f'{{"account": "{ACCOUNT}", "amount": {raw_amount}, "currency": "EUR"}}'.encode()
    problem = refusal(body)
    assert problem.code == "invalid_amount", f"expected invalid_amount for a {why} amount, got {problem.code}"
    assert problem.status == 400


@pytest.mark.parametrize("value", [-1, 2**53, 1.5, "10", True])
def test_bad_overdraft_limits_are_invalid_amount(value: Any) -> None:
    problem = refusal(json.dumps({"currency": "EUR", "overdraft_limit": value}).encode(), OpenAccountRequest)
    assert problem.code == "invalid_amount", f"expected invalid_amount for overdraft {value!r}, got {problem.code}"


@pytest.mark.parametrize("currency", ["XXX", "eur", "EURO", "", 978, None, "BTC"])
def test_unknown_currencies_are_unsupported_currency(currency: Any) -> None:
    problem = refusal(funds(currency=currency))
    assert problem.code == "unsupported_currency", f"expected unsupported_currency for {currency!r}, got {problem.code}"


@pytest.mark.parametrize(
    "account",
    [ACCOUNT.upper(), ACCOUNT.replace("acc_", "trf_"), ACCOUNT[:-1], ACCOUNT + "0", "acc_7a0", "", 7, None],
)
def test_malformed_account_ids_in_the_body_are_invalid_account_id(account: Any) -> None:
    problem = refusal(funds(account=account))
    assert problem.code == "invalid_account_id", f"expected invalid_account_id for {account!r}, got {problem.code}"


def test_malformed_transfer_accounts_are_invalid_account_id() -> None:
    body = {"debit_account": ACCOUNT, "credit_account": "acc_nope", "amount": 1, "currency": "EUR"}
    assert refusal(json.dumps(body).encode(), TransferRequest).code == "invalid_account_id"


@pytest.mark.parametrize("target", [FundsRequest, TransferRequest, OpenAccountRequest])
def test_unknown_fields_are_refused(target: type[Any]) -> None:
    bodies = {
        FundsRequest: {"account": ACCOUNT, "amount": 1, "currency": "EUR"},
        TransferRequest: {"debit_account": ACCOUNT, "credit_account": OTHER, "amount": 1, "currency": "EUR"},
        OpenAccountRequest: {"currency": "EUR"},
    }
    problem = refusal(json.dumps({**bodies[target], "memo": "x"}).encode(), target)
    assert problem.code == "invalid_request" and "memo" in problem.detail, (problem.code, problem.detail)


def test_a_missing_field_is_invalid_request() -> None:
    problem = refusal(json.dumps({"account": ACCOUNT, "currency": "EUR"}).encode())
    assert problem.code == "invalid_request" and "amount" in problem.detail, (problem.code, problem.detail)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"amount": 1,}', b"{'amount': 1}", b"\xff\xfe", b"NaN", funds() + b" trailing"],
)
def test_malformed_json_is_malformed_json(body: bytes) -> None:
    problem = refusal(body)
    assert problem.code == "malformed_json", f"expected malformed_json for {body!r}, got {problem.code}"


@pytest.mark.parametrize("body", [b"[]", b"null", b"42", b'"text"'])
def test_json_that_is_not_an_object_is_invalid_request(body: bytes) -> None:
    assert refusal(body).code == "invalid_request"


def test_an_oversized_body_is_payload_too_large() -> None:
    body = funds(reference="x" * (limits.REQUEST_BODY_BYTES_MAX + 1))
    problem = refusal(body)
    assert (problem.code, problem.status) == ("payload_too_large", 413)


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_a_wrong_content_type_is_unsupported_media_type(content_type: str) -> None:
    problem = refusal(funds(), content_type=content_type)
    assert (problem.code, problem.status) == ("unsupported_media_type", 415), content_type


def test_a_reference_longer_than_its_limit_is_invalid_request() -> None:
    assert refusal(funds(reference="r" * (limits.REFERENCE_CHARS_MAX + 1))).code == "invalid_request"


def test_idempotency_key_missing_and_malformed_have_their_own_codes() -> None:
    with pytest.raises(Problem) as missing:
        idempotency_key(None)
    assert missing.value.code == "idempotency_key_missing"
    for bad in ["", "has space", "x" * (limits.IDEMPOTENCY_KEY_CHARS_MAX + 1), "ключ"]:
        with pytest.raises(Problem) as malformed:
            idempotency_key(bad)
        assert malformed.value.code == "idempotency_key_invalid", f"expected idempotency_key_invalid for {bad!r}"
    assert idempotency_key("order-42/retry") == "order-42/retry"


def test_a_well_formed_account_id_with_a_trailing_newline_passes_the_schema_pattern() -> None:
    """msgspec matches patterns with `re.search`, so `$` accepts a trailing newline: the schema lets
    "acc_...\\n" through, and the service's strict parse must refuse it (see the HTTP test)."""
    request = decode_body(funds(account=ACCOUNT + "\n"), JSON, FundsRequest)
    assert request.account == ACCOUNT + "\n"
