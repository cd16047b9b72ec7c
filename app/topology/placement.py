"""Where a new account lives: a pure function of (client, Idempotency-Key) and the topology (DESIGN D1, D5).

A retried `POST /v1/accounts` must reach the shard that holds its idempotency record, or it opens a second
account. So both choices below depend only on the request's (client, key) and on data every router and
region reads alike (`regions/`), never on which router or region process happened to take the request.

- The region, when the body names none: rendezvous (highest random weight) hashing over the names of the
  regions that own slots in `regions/` (`Topology.placing_regions`). Every router computes the same answer,
  so a retry through another region's router lands in the same region. A region file whose shards own no
  slots yet takes part in nothing: adding one changes no placement until the file gives it slots. Then only
  the keys that the new region wins move (about 1/N of them), and a body that names its region (which a
  client with a jurisdiction should do) is never affected.
- The slot inside the region: a per-key probe sequence over all 4096 slots; the first probe that the region
  owns wins. The choice is a function of the slot set the region owns, not of how its shards divide it, so
  adding or splitting shards inside a region changes no placement at all (the slot's new shard inherits its
  idempotency records, DESIGN D13). Slots leaving the region change nothing for keys whose slot stays;
  slots arriving change a key's slot only when an arriving slot comes earlier in that key's sequence (a key
  whose first probe the region owns never changes). Each probe is uniform over the 4096 slots, so accounts
  spread evenly over the owned slots. Past `PLACEMENT_PROBES_MAX` probes (a region owning very few slots),
  rendezvous over the owned slots decides, which keeps the same properties at the cost of one hash per slot.
  `probe_sequence` is that whole order; when moves across regions changed a key's slot, the region walks it
  to find where the key's first answer was stored (app.region.service, `RegionLedger._placement`).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator, Sequence

from app import limits
from app.topology.model import SLOT_COUNT, Topology

_SEPARATOR = "\x1f"


def _weight(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b(_SEPARATOR.join(parts).encode(), digest_size=8).digest(), "big")


def default_region(client: str, key: str, regions: Iterable[str]) -> str:
    """The region of an account opened without `region`: the same for (client, key) on every router."""
    names = sorted(regions)
    assert names, "a topology has at least one region"
    return max(names, key=lambda name: (_weight("region", client, key, name), name))


def placement_slot(client: str, key: str, owned: Sequence[bool]) -> int:
    """The slot of an account opened with (client, key) in a region owning the slots where `owned` is true."""
    assert len(owned) == SLOT_COUNT, len(owned)
    candidates = (slot for slot in range(SLOT_COUNT) if owned[slot])
    slot = next((slot for slot in probe_sequence(client, key, among=candidates) if owned[slot]), None)
    assert slot is not None, "the region owns at least one slot"
    return slot


def batch_home_slot(client: str, key: str) -> int:
    """The slot where a batch's Idempotency-Key is bound to its body (DESIGN D15): a hash of (client, key)
    alone, whichever accounts the batch names, so two bodies sent under one key meet there."""
    return _weight("batch", client, key) % SLOT_COUNT


def probe_sequence(client: str, key: str, *, among: Iterable[int] | None = None) -> Iterator[int]:
    """The slots in the order (client, key) prefers them: the PLACEMENT_PROBES_MAX hashed probes (a slot may come
    twice), then the slots of `among` (default: all) by rendezvous weight, highest first (the fallback, computed
    only when reached, over `among` only: a caller that skips every other slot need not rank them). The
    placement is the first slot of this sequence the region owns; a retry looks for its earlier answer along
    the same sequence (app.region.service)."""
    for probe in range(limits.PLACEMENT_PROBES_MAX):
        yield _weight("slot", client, key, str(probe)) % SLOT_COUNT
    # A heap, not a sort: a caller usually stops after a few slots. Of equal weights the lowest slot comes first.
    heap = [(-_weight("slot-fallback", client, key, str(slot)), slot)
            for slot in (range(SLOT_COUNT) if among is None else among)]
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)[1]


def owned_slots(topology: Topology, region: str) -> tuple[bool, ...]:
    """Which of the 4096 slots `region` owns, as `placement_slot` takes them."""
    owned = [False] * SLOT_COUNT
    for shard in topology.region(region).shards:
        for r in shard.slots:
            owned[r.lo : r.hi + 1] = [True] * r.size
    return tuple(owned)
