"""Account and transfer ids round-trip their slot, and parsing refuses anything not exactly well-formed."""

from __future__ import annotations

import pytest

from app.topology.ids import (
    InvalidId,
    new_account_id,
    new_transfer_id,
    new_ulid,
    parse_account_id,
    parse_transfer_id,
)
from app.topology.model import SLOT_COUNT

VALID_ULID = "01JDQ2ZJ4M7Q0VKDA9X6QH3N5A"


@pytest.mark.parametrize("slot", [0, 1, 255, 683, 2048, SLOT_COUNT - 1])
def test_new_ids_round_trip_their_slot(slot: int) -> None:
    account, transfer = new_account_id(slot), new_transfer_id(slot)
    assert parse_account_id(account).slot == slot, account
    assert parse_account_id(account).text == account
    assert parse_transfer_id(transfer).slot == slot, transfer


def test_ulids_sort_by_time_and_are_unique() -> None:
    earlier, later = new_ulid(now_ms=1_000), new_ulid(now_ms=2_000)
    assert earlier < later
    assert len({new_ulid() for _ in range(1_000)}) == 1_000, "expected 1000 distinct ULIDs"


def test_slot_out_of_range_is_a_programmer_error() -> None:
    with pytest.raises(AssertionError):
        new_account_id(SLOT_COUNT)
    with pytest.raises(AssertionError):
        new_account_id(-1)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"trf_001{VALID_ULID}", id="transfer-prefix-for-account"),
        pytest.param(f"ACC_001{VALID_ULID}", id="uppercase-prefix"),
        pytest.param(f"acct001{VALID_ULID}", id="wrong-prefix"),
        pytest.param(f"acc_00A{VALID_ULID}", id="uppercase-slot-hex"),
        pytest.param(f"acc_00g{VALID_ULID}", id="non-hex-slot"),
        pytest.param(f"acc_01{VALID_ULID}", id="two-digit-slot"),
        pytest.param(f"acc_001{VALID_ULID.lower()}", id="lowercase-ulid"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}U", id="ulid-letter-U"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}I", id="ulid-letter-I"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}L", id="ulid-letter-L"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}O", id="ulid-letter-O"),
        pytest.param(f"acc_0018{VALID_ULID[1:]}", id="ulid-overflows-128-bits"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}", id="too-short"),
        pytest.param(f"acc_001{VALID_ULID}0", id="too-long"),
        pytest.param(f"acc_001{VALID_ULID}\n", id="trailing-newline"),
        pytest.param(f" acc_001{VALID_ULID}", id="leading-space"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}\n", id="newline-in-place-of-last-char"),
        pytest.param("", id="empty"),
        pytest.param("acc_", id="prefix-only"),
        pytest.param(f"acc_001{VALID_ULID[:-1]}٣", id="non-ascii-digit"),
    ],
)
def test_malformed_account_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidId):
        parse_account_id(text)


def test_a_well_formed_account_id_parses() -> None:
    parsed = parse_account_id(f"acc_0ff{VALID_ULID}")
    assert parsed.slot == 0x0FF


def test_account_id_is_not_a_transfer_id() -> None:
    with pytest.raises(InvalidId):
        parse_transfer_id(f"acc_001{VALID_ULID}")


def test_non_string_ids_are_refused() -> None:
    with pytest.raises(InvalidId):
        parse_account_id(12345)  # type: ignore[arg-type]


def test_the_openapi_example_account_id_is_a_valid_account_id() -> None:
    from app.api.schemas import AccountId

    (meta,) = AccountId.__metadata__
    for example in meta.examples:
        assert parse_account_id(example).text == example, f"expected the documented example {example} to parse"
