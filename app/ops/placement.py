"""Desired placement against recorded placement: `txroute slots plan` and the drift `txroute status` shows.

`regions/` is the desired state: which shard should own each slot. The shard databases are the truth: each
records the slot ranges it owns (`slot_ownership`: `owned`, `moving` while a move freezes the range for its
switch, `moved` once a range has left, naming nothing here). Drift is every slot whose recorded owner is not
its desired shard; the plan is the moves that would end it, one per run of consecutive slots that leave one
recorded range for one desired shard, written as the command that makes each (`txroute slots move LO-HI
--to SHARD`, which prints its own plan before it acts).

What the plan leaves out, and says so: slots whose range is `moving` (a move is under way: `txroute slots
moves`), slots no readable shard records as its own (a shard that could not be read, or was never
provisioned), and shards that could not be read at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.ops.target import Target, each_shard
from app.topology.model import SLOT_COUNT, SlotRange, Topology

# The slot_ownership states (DESIGN D13): the source keeps `moving` until the switch; `moved` is a record of
# a range that left and claims nothing.
OWNED, MOVING, MOVED = "owned", "moving", "moved"


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """Slots `lo..hi`, recorded as owned by `source` (one of its ranges), that `regions/` gives `target`."""

    lo: int
    hi: int
    source: str
    target: str
    source_region: str
    target_region: str

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def command(self) -> str:
        return f"txroute slots move {self.lo}-{self.hi} --to {self.target}"

    def text(self) -> str:
        where = (f"{self.source_region} -> {self.target_region}" if self.source_region != self.target_region
                 else f"within {self.source_region}")
        return f"{self.command():<44} # {self.size} slots from {self.source} ({where})"


@dataclass
class Drift:
    moves: list[PlannedMove] = field(default_factory=list)
    moving: list[tuple[str, SlotRange]] = field(default_factory=list)  # (source shard, range) frozen now
    unowned: list[SlotRange] = field(default_factory=list)  # no readable shard records them as its own
    unreadable: dict[str, str] = field(default_factory=dict)  # shard -> why

    @property
    def clean(self) -> bool:
        return not (self.moves or self.moving or self.unowned or self.unreadable)


def plan(topology: Topology, claims: Mapping[str, Sequence[Mapping[str, Any]]],
         unreadable: Mapping[str, str] | None = None) -> Drift:
    """The drift between `topology` (desired) and `claims` (shard -> its slot_ownership rows)."""
    # Per slot: the recorded owner (shard, the claim row it is in, its epoch, its state), higher epoch first
    # if two shards claim one slot (mid-switch, the target's claim is the newer).
    recorded: list[tuple[str, int, int, str] | None] = [None] * SLOT_COUNT
    for shard, rows in claims.items():
        for row in rows:
            state = str(row["state"])
            if state not in (OWNED, MOVING):
                continue
            lo, hi, epoch = int(row["slot_lo"]), int(row["slot_hi"]), int(row["epoch"])
            for slot in range(max(lo, 0), min(hi, SLOT_COUNT - 1) + 1):
                seen = recorded[slot]
                if seen is None or epoch > seen[2]:
                    recorded[slot] = (shard, lo, epoch, state)
    drift = Drift(unreadable=dict(unreadable or {}))
    region_of = {s.name: s.region for s in topology.shards}
    run: tuple[str, str, str, int] | None = None  # (kind, source, target, claim lo) of the open run
    start = 0

    def close(end: int) -> None:
        if run is None:
            return
        kind, source, target, _ = run
        if kind == "move":
            drift.moves.append(PlannedMove(start, end, source, target, region_of.get(source, "?"),
                                           region_of[target]))
        elif kind == MOVING:
            drift.moving.append((source, SlotRange(start, end)))
        else:
            drift.unowned.append(SlotRange(start, end))

    for slot in range(SLOT_COUNT):
        desired = topology.shard_for_slot(slot).name
        owner = recorded[slot]
        key: tuple[str, str, str, int] | None
        if owner is None:
            key = ("unowned", "", "", -1)
        elif owner[3] == MOVING:
            key = (MOVING, owner[0], "", owner[1])
        elif owner[0] != desired:
            key = ("move", owner[0], desired, owner[1])
        else:
            key = None
        if key != run:
            close(slot - 1)
            run, start = key, slot
    close(SLOT_COUNT - 1)
    return drift


async def recorded_claims(target: Target) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Every shard's slot_ownership rows, and the shards that could not be read (why)."""

    async def read(conn: Any, shard: str) -> list[dict[str, Any]]:
        rows = await conn.fetch("select slot_lo, slot_hi, epoch, state from slot_ownership order by slot_lo")
        return [dict(r) for r in rows]

    claims: dict[str, list[dict[str, Any]]] = {}
    unreadable: dict[str, str] = {}
    for result in await each_shard(target, read):
        if result.error:
            unreadable[result.shard] = result.error
        else:
            claims[result.shard] = result.value
    return claims, unreadable


def text(drift: Drift) -> str:
    lines = []
    if drift.moves:
        lines.append(f"{len(drift.moves)} move(s) would make the shard databases match regions/ "
                     "(run each; it prints its own plan, then acts with --yes):")
        lines += ["  " + move.text() for move in drift.moves]
    for shard, r in drift.moving:
        lines.append(f"moving now: {r} from {shard} (see `txroute slots moves`)")
    for r in drift.unowned:
        lines.append(f"unowned: slots {r} are recorded as owned by no readable shard")
    for shard, why in sorted(drift.unreadable.items()):
        lines.append(f"unreadable: shard {shard}: {why}")
    if drift.clean:
        lines.append("no drift: every slot is owned by the shard regions/ names")
    return "\n".join(lines)


def document(drift: Drift) -> dict[str, Any]:
    return {
        "moves": [{"slots": f"{m.lo}-{m.hi}", "from": m.source, "to": m.target, "command": m.command()}
                  for m in drift.moves],
        "moving": [{"slots": str(r), "from": shard} for shard, r in drift.moving],
        "unowned": [str(r) for r in drift.unowned],
        "unreadable": drift.unreadable,
        "clean": drift.clean,
    }
