"""Placement of new accounts is a pure function of (client, key) and the topology (app.topology.placement):
the same on every router, unchanged when a region gains shards, and spread over the region's slots."""

from __future__ import annotations

import dataclasses
from collections import Counter

from app.topology.loader import load_topology
from app.topology.model import SLOT_COUNT, Region, Shard, SlotRange, Topology
from app.topology.placement import default_region, owned_slots, placement_slot, probe_sequence

KEYS = [(f"client-{i % 7}", f"key-{i}") for i in range(3_000)]


def _with_region(topology: Topology, region: Region) -> Topology:
    return Topology(tuple(region if r.name == region.name else r for r in topology.regions))


def _split_each_shard(region: Region) -> Region:
    """The region with every shard split in two: a new shard takes the upper half of each shard's slots."""
    shards: list[Shard] = []
    for shard in region.shards:
        (whole,) = shard.slots
        middle = (whole.lo + whole.hi) // 2
        shards.append(dataclasses.replace(shard, slots=(SlotRange(whole.lo, middle),)))
        shards.append(Shard(shard.name + "x", region.name, (SlotRange(middle + 1, whole.hi),)))
    return dataclasses.replace(region, shards=tuple(shards))


def test_the_default_region_is_the_same_whatever_the_order_of_the_regions_and_spreads_keys() -> None:
    names = ["eu-north-1", "eu-west-1", "us-east-1"]
    chosen = [default_region(client, key, names) for client, key in KEYS]
    assert chosen == [default_region(client, key, reversed(names)) for client, key in KEYS], (
        "expected the default region not to depend on the order a router lists the regions in"
    )
    counts = Counter(chosen)
    assert set(counts) == set(names) and min(counts.values()) > len(KEYS) / 3 * 0.8, (
        f"expected keys spread about evenly over the regions, got {counts}"
    )


def test_adding_a_region_moves_only_the_keys_the_new_region_wins() -> None:
    names = ["eu-north-1", "eu-west-1", "us-east-1"]
    before = {k: default_region(*k, names) for k in KEYS}
    after = {k: default_region(*k, [*names, "ap-south-1"]) for k in KEYS}
    moved = {k for k in KEYS if before[k] != after[k]}
    assert all(after[k] == "ap-south-1" for k in moved), "expected a key to move only to the new region"
    assert len(moved) < len(KEYS) / 4 * 1.3, f"expected about a quarter of the keys to move, got {len(moved)}"


def test_adding_shards_to_a_region_changes_no_existing_placement() -> None:
    topology = load_topology()
    for region in topology.regions:
        grown = _with_region(topology, _split_each_shard(region))
        assert len(grown.region(region.name).shards) == 2 * len(region.shards)
        old, new = owned_slots(topology, region.name), owned_slots(grown, region.name)
        for client, key in KEYS:
            slot = placement_slot(client, key, old)
            assert old[slot], f"expected {slot} owned by {region.name}"
            assert placement_slot(client, key, new) == slot, (
                f"expected ({client}, {key}) to keep slot {slot} in {region.name} after its shards were split"
            )


def test_a_slot_that_stays_owned_keeps_its_keys_when_the_region_gains_or_loses_other_slots() -> None:
    region_slots = [False] * SLOT_COUNT
    region_slots[0:1366] = [True] * 1366
    grown = list(region_slots)
    grown[3000:3200] = [True] * 200  # slots moved in from another region
    shrunk = list(region_slots)
    shrunk[600:700] = [False] * 100  # slots moved out to another region
    changed_by_growth = 0
    for client, key in KEYS:
        slot = placement_slot(client, key, region_slots)
        after_growth = placement_slot(client, key, grown)
        # A key moves only to an arriving slot that comes earlier in its own probe sequence.
        assert after_growth == slot or 3000 <= after_growth < 3200, (client, key, slot, after_growth)
        changed_by_growth += after_growth != slot
        if not 600 <= slot < 700:
            assert placement_slot(client, key, shrunk) == slot, (
                f"expected ({client}, {key}) to keep slot {slot}, which its region still owns"
            )
    assert changed_by_growth < len(KEYS) * 200 / 1566 * 1.3, (
        f"expected only the arriving slots' share of keys to move, got {changed_by_growth}"
    )


def test_accounts_spread_over_the_region_slots_and_a_region_owning_few_slots_still_places() -> None:
    owned = [False] * SLOT_COUNT
    owned[0:1366] = [True] * 1366
    slots = Counter(placement_slot(client, key, owned) for client, key in KEYS)
    halves = (sum(n for s, n in slots.items() if s < 683), sum(n for s, n in slots.items() if s >= 683))
    assert min(halves) > len(KEYS) / 2 * 0.85, f"expected both halves of the slots used evenly, got {halves}"
    tiny = [False] * SLOT_COUNT
    tiny[4000] = tiny[17] = True  # past the probe bound, rendezvous over the owned slots decides
    placed = Counter(placement_slot(client, key, tiny) for client, key in KEYS)
    assert set(placed) == {17, 4000}, f"expected only owned slots, got {placed}"


def test_the_placement_is_the_first_owned_slot_of_the_keys_probe_sequence_fallback_included() -> None:
    """A retried open walks `probe_sequence` to find where it was placed before (app.region.service): the
    sequence must order the slots exactly as placement prefers them, past the probes too."""
    few = tuple(slot < 16 for slot in range(SLOT_COUNT))  # misses every probe for most keys
    for owned in (owned_slots(load_topology(), "eu-west-1"), few):
        for client, key in KEYS[:300]:
            assert placement_slot(client, key, owned) == next(s for s in probe_sequence(client, key) if owned[s]), (
                f"expected the placement of {key} to be the first owned slot of its probe sequence")
