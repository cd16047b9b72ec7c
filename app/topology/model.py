"""The topology as typed, immutable values: regions, their shards and the slots each shard owns.

Pure: no I/O. `app.topology.loader` builds a `Topology` from `regions/`; the shard map the router keeps is
a `ShardMap` assembled from the shards' own claims (DESIGN D2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SLOT_COUNT = 4096


@dataclass(frozen=True, slots=True)
class SlotRange:
    """An inclusive range of slots, `lo..hi`."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        assert 0 <= self.lo <= self.hi < SLOT_COUNT, (self.lo, self.hi)

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.lo <= slot <= self.hi

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"


@dataclass(frozen=True, slots=True)
class Capacity:
    """What infra/ provisions for one region."""

    db_instance_class: str
    db_allocated_storage_gb: int
    db_max_connections: int
    region_service_tasks: int
    router_tasks: int
    task_cpu: int
    task_memory_mib: int


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    region: str
    slots: tuple[SlotRange, ...]

    @property
    def database(self) -> str:
        """The PostgreSQL database that holds this shard."""
        return "shard_" + self.name.replace("-", "_")

    def owns(self, slot: int) -> bool:
        return any(slot in r for r in self.slots)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    vpc_cidr: str
    capacity: Capacity
    shards: tuple[Shard, ...]
    source: str = ""  # the file it came from, for error messages

    @property
    def owns_slots(self) -> bool:
        """False for a region whose shards own no slots yet (added, waiting for moves): it opens no accounts."""
        return any(shard.slots for shard in self.shards)


@dataclass(frozen=True)
class Topology:
    regions: tuple[Region, ...]
    _slot_to_shard: tuple[Shard, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table: list[Shard | None] = [None] * SLOT_COUNT
        for shard in self.shards:
            for r in shard.slots:
                for slot in range(r.lo, r.hi + 1):
                    table[slot] = shard
        assert all(s is not None for s in table), "topology must cover every slot (the loader checks this)"
        object.__setattr__(self, "_slot_to_shard", tuple(s for s in table if s is not None))

    @property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(s for r in self.regions for s in r.shards)

    @property
    def placing_regions(self) -> tuple[str, ...]:
        """The regions a new account may be opened in: those that own slots (app.topology.placement)."""
        return tuple(r.name for r in self.regions if r.owns_slots)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def shard(self, name: str) -> Shard:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    def shard_for_slot(self, slot: int) -> Shard:
        return self._slot_to_shard[slot]
