"""Topology follows (issue 11, item 4): a region file whose shards own no slots yet is valid and takes no new
accounts; `txroute slots plan` turns the drift between `regions/` (desired) and the shard databases'
slot_ownership (recorded) into the moves that end it (app/ops/placement.py)."""

from __future__ import annotations

from pathlib import Path

from app.ops.placement import PlannedMove, plan, text
from app.topology.loader import load_topology
from app.topology.model import SlotRange, Topology
from app.topology.placement import default_region
from tests.unit.test_topology_loader import region_toml, two_regions, write_regions

KEYS = [(f"client-{i % 5}", f"key-{i}") for i in range(2_000)]


def three_regions_one_empty(tmp_path: Path) -> Topology:
    files = two_regions()
    files["us-east-1.toml"] = region_toml("us-east-1", "10.30.0.0/16", {"use1-a": [], "use1-b": []})
    return load_topology(write_regions(tmp_path, files))


def recorded(topology: Topology) -> dict[str, list[dict[str, object]]]:
    """Each shard's slot_ownership rows as provisioning writes them from `topology`."""
    return {s.name: [{"slot_lo": r.lo, "slot_hi": r.hi, "epoch": 1, "state": "owned"} for r in s.slots]
            for s in topology.shards}


def test_a_region_whose_shards_own_no_slots_loads_and_opens_no_accounts_by_default(tmp_path: Path) -> None:
    topology = three_regions_one_empty(tmp_path)
    empty = topology.region("us-east-1")
    assert [s.slots for s in empty.shards] == [(), ()] and not empty.owns_slots
    assert topology.placing_regions == ("eu-north-1", "eu-west-1")
    chosen = {default_region(client, key, topology.placing_regions) for client, key in KEYS}
    assert chosen == {"eu-north-1", "eu-west-1"}, f"expected the empty region never chosen, got {chosen}"
    # And adding it changed no default placement: the same keys choose as without it.
    before = load_topology(write_regions(tmp_path / "before", two_regions()))
    assert all(default_region(c, k, topology.placing_regions) == default_region(c, k, before.placing_regions)
               for c, k in KEYS)


def test_no_drift_when_the_databases_record_what_the_files_say() -> None:
    topology = load_topology()
    drift = plan(topology, recorded(topology))
    assert drift.clean and drift.moves == [], text(drift)
    assert "no drift" in text(drift)


def test_slots_the_files_give_a_new_region_are_planned_as_one_move_per_source_range(tmp_path: Path) -> None:
    before = load_topology(write_regions(tmp_path / "before", two_regions(
        a_shards={"eun1-a": ["0-1023"], "eun1-b": ["1024-2047"]})))
    files = two_regions(a_shards={"eun1-a": ["0-511"], "eun1-b": ["1024-2047"]},
                        b_shards={"euw1-a": ["2048-2999", "3100-4095"]})
    files["us-east-1.toml"] = region_toml("us-east-1", "10.30.0.0/16", {"use1-a": ["512-1023", "3000-3099"]})
    after = load_topology(write_regions(tmp_path / "after", files))
    drift = plan(after, recorded(before))
    assert drift.moves == [
        PlannedMove(512, 1023, "eun1-a", "use1-a", "eu-north-1", "us-east-1"),
        PlannedMove(3000, 3099, "euw1-a", "use1-a", "eu-west-1", "us-east-1"),
    ], text(drift)
    assert "txroute slots move 512-1023 --to use1-a" in text(drift)
    # Once the moves have switched (the target owns with a new epoch, the source records `moved`), no drift.
    done = recorded(before)
    done["eun1-a"] = [{"slot_lo": 0, "slot_hi": 511, "epoch": 1, "state": "owned"},
                      {"slot_lo": 512, "slot_hi": 1023, "epoch": 2, "state": "moved"}]
    done["euw1-a"] = [{"slot_lo": 2048, "slot_hi": 2999, "epoch": 1, "state": "owned"},
                      {"slot_lo": 3000, "slot_hi": 3099, "epoch": 2, "state": "moved"},
                      {"slot_lo": 3100, "slot_hi": 4095, "epoch": 1, "state": "owned"}]
    done["use1-a"] = [{"slot_lo": 512, "slot_hi": 1023, "epoch": 2, "state": "owned"},
                      {"slot_lo": 3000, "slot_hi": 3099, "epoch": 2, "state": "owned"}]
    assert plan(after, done).clean, text(plan(after, done))


def test_a_range_being_moved_unreadable_shards_and_unowned_slots_are_named_not_planned() -> None:
    topology = load_topology()
    claims = recorded(topology)
    claims["eun1-a"] = [{"slot_lo": 0, "slot_hi": 99, "epoch": 1, "state": "moving"},
                        {"slot_lo": 100, "slot_hi": 682, "epoch": 1, "state": "owned"}]
    del claims["use1-b"]
    drift = plan(topology, claims, {"use1-b": "unreachable (OSError)"})
    assert drift.moves == []
    assert drift.moving == [("eun1-a", SlotRange(0, 99))]
    assert drift.unowned == [SlotRange(3414, 4095)]
    assert drift.unreadable == {"use1-b": "unreachable (OSError)"} and not drift.clean
    assert "moving now: 0-99 from eun1-a" in text(drift) and "unreadable: shard use1-b" in text(drift)
