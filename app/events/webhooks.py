"""Webhook endpoints (issue 13): where they live, their ids, the requests that manage them, the retry schedule.

An endpoint lives on the shard owning its client's home slot, a hash of the client (`home_slot`): every router
and region computes it alone, the client's list is one shard's read, and the id embeds the slot (`we_` + slot
+ ULID, like an account), so an endpoint is found through the shard map and moves with its slot. That shard's
region runs the endpoint's deliveries: its worker reads the client's events from every shard's feed (other
regions' over their internal API), so one place holds the endpoint's secret, schedule and history, and no
endpoint is replicated between regions.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Annotated, Any

import msgspec

from app import limits
from app.api.schemas import NO_NUL_PATTERN
from app.events.feed import EVENT_TYPES
from app.ledger.postings import fingerprint
from app.topology.ids import new_ulid
from app.topology.model import SLOT_COUNT

_ENDPOINT_ID = re.compile(r"^we_([0-9a-f]{3})[0-7][0-9A-HJKMNP-TV-Z]{25}$")

EventType = Annotated[str, msgspec.Meta(pattern=r"^[a-z]{1,32}\.[a-z_]{1,32}$", max_length=65)]


EventTypes = Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=limits.EVENT_TYPES_PER_QUERY_MAX)]


class EndpointRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=limits.WEBHOOK_URL_CHARS_MAX)]
    event_types: EventTypes | None = None
    description: Annotated[
        str, msgspec.Meta(max_length=limits.WEBHOOK_DESCRIPTION_CHARS_MAX, pattern=NO_NUL_PATTERN)
    ] | None = None


def home_slot(client: str) -> int:
    """The slot whose shard holds the client's webhook endpoints."""
    return int.from_bytes(hashlib.sha256(client.encode()).digest()[:4], "big") % SLOT_COUNT


def new_endpoint_id(slot: int) -> str:
    assert 0 <= slot < SLOT_COUNT, slot
    return f"we_{slot:03x}{new_ulid()}"


def endpoint_slot(text: str) -> int | None:
    """The slot of a well-formed endpoint id, else None."""
    m = _ENDPOINT_ID.match(text) if len(text) == 32 else None
    return int(m.group(1), 16) if m else None


def unknown_types(types: list[str] | None) -> list[str]:
    return sorted(set(types or ()) - set(EVENT_TYPES))


def create_fingerprint(request: EndpointRequest) -> str:
    return fingerprint("webhook_endpoint", msgspec.structs.asdict(request))


def retry_delay_s(
    attempts: int, schedule: tuple[float, ...] = limits.WEBHOOK_RETRY_SCHEDULE_S, *, rng: random.Random | None = None
) -> float | None:
    """How long after the `attempts`-th failed attempt the next one is due (with jitter), or None: the schedule
    is over and the endpoint is disabled."""
    if attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    jitter = limits.WEBHOOK_RETRY_JITTER_RATIO * base
    return max(0.0, base + (rng or random).uniform(-jitter, jitter))


def attempt_view(row: Any) -> dict[str, Any]:
    return {
        "event_id": row["event_id"], "attempt": row["attempt"], "at": row["at"], "status": row["status"],
        "latency_ms": row["latency_ms"], "error": row["error"],
    }
