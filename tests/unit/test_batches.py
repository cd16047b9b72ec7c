"""The checks a batch passes before anything is sent or posted (app/api/batches.py), the same at the router
and at the region: derived item keys, duplicate keys and unique references, the funds scope."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from app.api import batches
from app.api.decoding import decode_body
from app.api.schemas import BatchRequest, FundsRequest, TransferRequest
from app.errors import Problem
from app.security import scopes
from app.topology.ids import new_account_id

A, B = new_account_id(1), new_account_id(2)
ALL = frozenset(scopes.PUBLIC_SCOPES)


def batch(*items: dict[str, Any], atomic: bool = False) -> BatchRequest:
    body = msgspec.json.encode({"atomic": atomic, "items": list(items)})
    return decode_body(body, "application/json", BatchRequest, bytes_max=len(body))


def deposit(account: str = A, **extra: Any) -> dict[str, Any]:
    return {"type": "deposit", "account": account, "amount": 5, "currency": "EUR", **extra}


def test_items_get_keys_derived_from_the_batch_key_and_their_index_unless_they_bring_their_own() -> None:
    request = batch(deposit(), deposit(idempotency_key="mine"), deposit())
    assert batches.check("k1", request, ALL) == [0, 1, 2]
    keys = [batches.item_key("k1", i, item) for i, item in enumerate(request.items)]
    assert keys == ["k1 #0", "mine", "k1 #2"], keys


def test_an_item_is_the_single_request_it_stands_for() -> None:
    request = batch(deposit(reference="r", unique_reference=True, idempotency_key="x"),
                    {"type": "transfer", "debit_account": A, "credit_account": B, "amount": 3, "currency": "EUR"})
    funds, transfer = (batches.single_request(item) for item in request.items)
    assert isinstance(funds, FundsRequest) and funds.reference == "r" and funds.unique_reference
    assert isinstance(transfer, TransferRequest) and (transfer.debit_account, transfer.amount) == (A, 3)
    assert batches.home_account(request.items[1]) == A and batches.accounts(request.items[1]) == (A, B)


@pytest.mark.parametrize(
    ("items", "code"),
    [
        ((deposit(idempotency_key="same"), deposit(B, idempotency_key="same")), "batch_duplicate_item_key"),
        ((deposit(idempotency_key="k1"),), "batch_duplicate_item_key"),  # the batch's own key
        ((deposit(idempotency_key="k1 #1"), deposit()), "invalid_request"),  # a space: no client key has one
        ((deposit(reference="r", unique_reference=True), deposit(reference="r", unique_reference=True)),
         "batch_duplicate_reference"),
        ((deposit(unique_reference=True),), "invalid_request"),
    ],
)
def test_a_batch_that_no_region_could_post_is_refused_with_its_code(
    items: tuple[dict[str, Any], ...], code: str
) -> None:
    with pytest.raises(Problem) as caught:
        batches.check("k1", batch(*items), ALL)
    assert caught.value.code == code, f"expected {code}, got {caught.value.code}: {caught.value.detail}"


def test_the_same_unique_reference_on_two_accounts_is_two_payments() -> None:
    assert batches.check("k", batch(deposit(A, reference="r", unique_reference=True),
                                    deposit(B, reference="r", unique_reference=True)), ALL) == [0, 1]


def test_deposits_and_withdrawals_in_a_batch_need_the_funds_scope() -> None:
    transfers_only = frozenset({scopes.TRANSFERS_WRITE})
    with pytest.raises(Problem) as caught:
        batches.check("k", batch(deposit()), transfers_only)
    assert caught.value.code == "forbidden"
    transfer = {"type": "transfer", "debit_account": A, "credit_account": B, "amount": 1, "currency": "EUR"}
    assert batches.check("k", batch(transfer), transfers_only) == [0]


def test_a_malformed_item_names_its_field() -> None:
    with pytest.raises(Problem) as caught:
        batch(deposit(), {**deposit(), "amount": 1.5})
    assert caught.value.code == "invalid_amount", caught.value.detail
    with pytest.raises(Problem) as caught:
        batch({**deposit(), "type": "hold"})
    assert caught.value.code == "invalid_request"
