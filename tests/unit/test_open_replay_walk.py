"""Where a region looks for a key's first answer before it opens an account (issue 11; RegionLedger._placement):
nowhere beyond its own slot when no move touched the key's probe sequence, the slot given away when the key's
slot left the region, the original slot when an earlier one arrived; and nothing changes for a move between
the region's own shards; in a region whose every slot came by a move, no further than the first range that
came. The ownership is read through `refresh_ownership` from shards that answer with fixed
claims (the real reads are proved against PostgreSQL in tests/e2e/test_open_replay_moves.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from app.errors import Problem
from app.region.service import RegionLedger
from app.store.shard import ShardStore
from app.topology.loader import load_topology
from app.topology.placement import owned_slots, placement_slot, probe_sequence

REGION = "eu-west-1"
CLIENT = "client-walk"
KEYS = [f"key-{i}" for i in range(500)]
EARLY = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


class _Claims:
    """A shard that answers its slot claims and arrivals as given."""

    def __init__(self, claims: list[dict[str, Any]], arrivals: list[tuple[int, int, datetime]] | None = None) -> None:
        self.claims = claims
        self.arrivals = arrivals or []

    async def slot_claims(self) -> list[dict[str, Any]]:
        return self.claims

    async def slot_arrivals(self) -> list[tuple[int, int, datetime]]:
        return self.arrivals


def _claim(lo: int, hi: int, state: str = "owned", owner: tuple[str, str] | None = None) -> dict[str, Any]:
    region, shard = owner or (None, None)
    return {"slot_lo": lo, "slot_hi": hi, "epoch": 1, "state": state, "owner_region": region, "owner_shard": shard}


async def _ledger(a: _Claims, b: _Claims) -> RegionLedger:
    ledger = RegionLedger(REGION, load_topology(), cast(dict[str, ShardStore], {"euw1-a": a, "euw1-b": b}))
    await ledger.refresh_ownership()
    return ledger


def _initial() -> tuple[_Claims, _Claims]:
    return _Claims([_claim(1366, 2048)]), _Claims([_claim(2049, 2731)])


def _without(claims: list[dict[str, Any]], slot: int, state: str, owner: tuple[str, str]) -> list[dict[str, Any]]:
    """The claims with `slot` split out of its range as `state` (a move's record on its source)."""
    out = []
    for c in claims:
        if c["slot_lo"] <= slot <= c["slot_hi"]:
            if c["slot_lo"] < slot:
                out.append(_claim(c["slot_lo"], slot - 1))
            out.append(_claim(slot, slot, state, owner))
            if slot < c["slot_hi"]:
                out.append(_claim(slot + 1, c["slot_hi"]))
        else:
            out.append(c)
    return out


async def test_a_key_whose_sequence_meets_no_move_is_placed_as_before_and_looks_nowhere_else() -> None:
    ledger = await _ledger(*_initial())
    owned = owned_slots(load_topology(), REGION)
    for key in KEYS:
        assert ledger._placement(CLIENT, key) == (placement_slot(CLIENT, key, owned), []), key


async def test_the_slot_a_key_was_placed_at_is_looked_at_after_it_left_the_region() -> None:
    key = KEYS[0]
    a, b = _initial()
    first, _ = (await _ledger(a, b))._placement(CLIENT, key)
    shard = a if first <= 2048 else b
    shard.claims = _without(shard.claims, first, "moved", ("eu-north-1", "eun1-a"))
    placed, earlier = (await _ledger(a, b))._placement(CLIENT, key)
    assert placed != first and earlier == [first], (
        f"expected the key placed on another slot and its first slot {first} looked at, got {placed}, {earlier}")


async def test_the_original_slot_is_looked_at_when_an_earlier_slot_of_the_sequence_arrives() -> None:
    owned = owned_slots(load_topology(), REGION)
    key = next(k for k in KEYS if not owned[next(probe_sequence(CLIENT, k))])
    arriving = next(probe_sequence(CLIENT, key))
    a, b = _initial()
    first, _ = (await _ledger(a, b))._placement(CLIENT, key)
    a.claims = [*a.claims, _claim(arriving, arriving)]
    a.arrivals = [(arriving, arriving, EARLY)]
    assert (await _ledger(a, b))._placement(CLIENT, key) == (arriving, [first]), (
        f"expected the key placed on the arrived slot {arriving} and its first slot {first} looked at")


async def test_a_move_between_the_regions_own_shards_changes_nothing() -> None:
    key = KEYS[0]
    a, b = _initial()
    first, _ = (await _ledger(a, b))._placement(CLIENT, key)
    source, target = (a, b) if first <= 2048 else (b, a)
    source.claims = _without(source.claims, first, "moved", (REGION, "euw1-b" if source is a else "euw1-a"))
    target.claims = [*target.claims, _claim(first, first)]  # no arrival: the slot came from this region
    assert (await _ledger(a, b))._placement(CLIENT, key) == (first, []), (
        "expected a move inside the region to change neither the slot nor where the key's answer is looked for")


async def test_in_a_region_whose_every_slot_arrived_the_walk_stops_at_the_range_that_arrived_first() -> None:
    """Before its first range arrived the region owned nothing and opened nothing: a slot of that range is as good
    a stop as a slot owned all along, so a region filled by moves does not walk every key's whole sequence."""
    a = _Claims([_claim(1366, 2048)], [(1366, 2048, EARLY)])
    b = _Claims([_claim(2049, 2731)], [(2049, 2731, EARLY + timedelta(minutes=5))])
    ledger = await _ledger(a, b)
    for key in KEYS:
        placed, earlier = ledger._placement(CLIENT, key)
        in_first = [slot for slot in [placed, *earlier] if slot <= 2048]
        assert len(in_first) == 1 and [placed, *earlier][-1] == in_first[0], (
            f"expected the walk of {key} to end at its first slot of the range that arrived first: {placed}, {earlier}")


class _Answering(_Claims):
    """A shard that also answers the stored-answer read (ShardStore.stored_answers) with fixed rows per slot."""

    def __init__(self, claims: list[dict[str, Any]], rows: dict[int, dict[str, Any]]) -> None:
        super().__init__(claims)
        self.rows = rows

    async def stored_answers(self, client: str, key: str, slots: list[int]) -> list[dict[str, Any]]:
        return [{"slot": slot, "free": True, **self.rows[slot]} for slot in slots]


async def test_a_slot_still_switching_in_on_its_new_shard_is_answered_slot_moving_not_nothing_stored() -> None:
    """A move's target has no claim on the range until its switch-in commits, seconds at 10,000 accounts, while
    the source already says `moved` naming it. A retried open that looked there and found no claim took it for
    "nothing stored" and opened a second account; whether that shard holds the key's answer is not known yet, so
    the open is answered 503 slot_moving (routers hold it), nothing written."""
    slot = 1500  # euw1-a's in regions/, moving to euw1-b
    a = _Claims(_without([_claim(1366, 2048)], slot, "moved", (REGION, "euw1-b")))
    unclaimed = {"state": None, "owner_region": None, "owner_shard": None, "fingerprint": "f" * 64,
                 "status_code": 201, "body": {"id": "acc_copied"}}
    b = _Answering([_claim(2049, 2731)], {slot: unclaimed})
    ledger = await _ledger(a, cast(_Claims, b))
    assert ledger.owner_of(slot) == (REGION, "euw1-b"), ledger.owner_of(slot)

    answers = await ledger.stored_answers(CLIENT, KEYS[0], [slot])
    with pytest.raises(Problem) as refused:
        await ledger._earlier_answer(CLIENT, KEYS[0], "f" * 64, [slot])

    assert [(x.slot, x.arriving, x.status) for x in answers] == [(slot, True, None)], answers
    assert refused.value.code == "slot_moving", refused.value.code
