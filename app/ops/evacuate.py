"""`txroute regions evacuate REGION --to REGION2`: move every slot range REGION's shards own to REGION2's
shards, one move per contiguous range of one shard, one after the other (app/placement/mover.py does each).

The ranges come from the shard databases (what each shard records as `owned`, or `moving` for a move already
under way, which re-running resumes), not from `regions/`: evacuating is for a region about to be taken down,
whatever its files say. Source shards are paired with REGION2's shards in name order, round robin, so a region
of two shards evacuated into a region of two keeps them apart. Sequential, because a shard takes one move at a
time and because every freeze is then the only one: a region's requests are held for one range at a time.
A move that does not end `done` (aborted by its verify, or refused) stops the evacuation there; running the
command again resumes the move in progress and goes on with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.ops.placement import MOVING, OWNED, recorded_claims
from app.ops.target import OpsError, Target


@dataclass(frozen=True, slots=True)
class Evacuation:
    region: str
    to_region: str
    moves: tuple[tuple[int, int, str, str], ...]  # (lo, hi, source shard, target shard), in order

    def plan(self) -> list[str]:
        if not self.moves:
            return [f"region {self.region} owns no slots: nothing to move"]
        steps = [f"txroute slots move {lo}-{hi} --to {target}   (from {source}; copy, freeze, verify, switch)"
                 for lo, hi, source, target in self.moves]
        return [*steps, f"then: update regions/ so that {self.region}'s shards own no slots "
                        "(`txroute slots plan` shows the drift until they do)"]


async def plan_evacuation(target: Target, region: str, to_region: str) -> Evacuation:
    topology = target.topology
    names = {r.name for r in topology.regions}
    for name in (region, to_region):
        if name not in names:
            raise OpsError(f"no region {name[:40]!r} in regions/ (known: {', '.join(sorted(names))})")
    if region == to_region:
        raise OpsError("--to must name another region")
    sources = [s.name for s in topology.region(region).shards]
    targets = [s.name for s in topology.region(to_region).shards]
    claims, unreadable = await recorded_claims(target)
    blind = sorted(set(sources + targets) & set(unreadable))
    if blind:
        raise OpsError(f"cannot read shard(s) {', '.join(blind)} ({unreadable[blind[0]]}): an evacuation needs "
                       "every database of both regions")
    moves = []
    for i, source in enumerate(sources):
        destination = targets[i % len(targets)]
        rows = sorted((int(r["slot_lo"]), int(r["slot_hi"])) for r in claims.get(source, [])
                      if r["state"] in (OWNED, MOVING))
        for lo, hi in _contiguous(rows):
            moves.append((lo, hi, source, destination))
    return Evacuation(region, to_region, tuple(moves))


async def evacuate(target: Target, evacuation: Evacuation, *, progress: Callable[[str], None] = print) -> bool:
    """Run the planned moves in order; True when every one ended `done`."""
    from app.placement.mover import Mover

    mover = Mover(target, progress=progress)
    for n, (lo, hi, source, destination) in enumerate(evacuation.moves, 1):
        spec = await mover.spec(lo, hi, destination)  # the move in progress for this range, if any
        progress(f"[{n}/{len(evacuation.moves)}] {spec.id}: slots {lo}-{hi} {source} -> {destination}")
        await mover.begin(spec)  # as `txroute slots move`: recording it again is a no-op
        phase = await mover.run(spec)
        progress(f"[{n}/{len(evacuation.moves)}] {spec.id}: {phase}")
        if phase != "done":
            return False
    return True


def _contiguous(rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in rows:
        if merged and merged[-1][1] + 1 == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged
