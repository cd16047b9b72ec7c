"""The event feed's cursor and the merge of per-shard streams (pure; issue 13).

Each shard orders its events by (xid, seq) and hands out only those whose transaction ended before the
reader's snapshot (migration 0011): a shard's stream never grows before a position already handed out. A
cursor is the vector of per-shard positions, `{shard: "xid.seq"}`, as base64url JSON: opaque to clients,
validated on the way in (a bad one is 400 `invalid_cursor`). A page takes events from the shards' streams in
created_at order and advances each shard's position only past what it took (or, when it took all the shard
gave, to where that shard read: a `types` filter passes over events of other types, which are final, so a rare
type costs a bounded read per page), so no page skips or repeats an event of the page's filter, whatever is
written meanwhile. A cursor belongs to its filter: given with other `types` it would pass over events the first
filter read past. A shard missing from the cursor starts from its beginning.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from app import limits
from app.errors import Problem

_POSITION = re.compile(r"^[0-9]{1,20}\.[0-9]{1,19}$")
_SHARD = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TYPE = re.compile(r"^[a-z]{1,32}\.[a-z_]{1,32}$")
START = "0.0"

EVENT_TYPES = (
    "account.opened", "account.closed",
    "transfer.posted", "transfer.pending", "transfer.returned",
    "transfer.held", "transfer.captured", "transfer.voided", "transfer.expired",
)


def _bad_cursor() -> Problem:
    return Problem("invalid_cursor", "use the next_cursor of a previous page as it was given")


def decode_cursor(text: str | None) -> dict[str, str]:
    if text is None or text == "":
        return {}
    if len(text) > limits.EVENTS_CURSOR_CHARS_MAX:
        raise _bad_cursor()
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _bad_cursor() from None
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and _SHARD.match(k) and isinstance(v, str) and _in_range(v) for k, v in doc.items()
    ):
        raise _bad_cursor()
    return dict(doc)


def valid_position(position: str) -> bool:
    return isinstance(position, str) and _in_range(position)


def _in_range(position: str) -> bool:
    """A position the database can read: xid8 is unsigned 64-bit, seq a bigint (the pattern bounds digits only)."""
    if not _POSITION.match(position):
        return False
    xid, seq = split_position(position)
    return xid < 2**64 and seq < 2**63


def encode_cursor(positions: dict[str, str]) -> str:
    raw = json.dumps(dict(sorted(positions.items())), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def split_position(position: str) -> tuple[int, int]:
    xid, seq = position.split(".")
    return int(xid), int(seq)


def page_size(text: str | None) -> int:
    if text is None:
        return limits.EVENTS_PAGE_SIZE_DEFAULT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= limits.EVENTS_PAGE_SIZE_MAX:
        raise Problem("invalid_request", f"limit must be an integer in 1..{limits.EVENTS_PAGE_SIZE_MAX}")
    return int(text)


def event_types(text: str | None) -> list[str] | None:
    """`types=a,b`: None for every type."""
    if text is None or text == "":
        return None
    names = text.split(",")
    if len(names) > limits.EVENT_TYPES_PER_QUERY_MAX or not all(_TYPE.match(n) for n in names):
        raise Problem("invalid_request", f"types is a comma-separated list of at most "
                                         f"{limits.EVENT_TYPES_PER_QUERY_MAX} event types, e.g. transfer.posted")
    return sorted(set(names))


@dataclass(frozen=True, slots=True)
class ShardPage:
    """What one shard answered after its position: events in its order, each with its position."""

    shard: str
    items: list[tuple[str, dict[str, Any]]]
    more: bool  # the shard had at least this many events; there may be more
    # How far the shard read its stream for this page (a types filter reads past events of other types): the
    # position moves there once every item is taken, even when no event matched. None: to the last item taken.
    scanned: str | None = None


def merge(
    positions: dict[str, str], pages: list[ShardPage], limit: int
) -> tuple[list[dict[str, Any]], dict[str, str], bool]:
    """Up to `limit` events from the shards' pages, oldest created_at first (ties by id), each shard consumed in
    its own order; the new positions; whether more events are known to wait."""
    heads = {p.shard: 0 for p in pages}
    by_shard = {p.shard: p for p in pages}
    out: list[dict[str, Any]] = []
    new_positions = dict(positions)
    while len(out) < limit:
        candidates = [(by_shard[s].items[i][1]["created_at"], by_shard[s].items[i][1]["id"], s)
                      for s, i in heads.items() if i < len(by_shard[s].items)]
        if not candidates:
            break
        _, _, shard = min(candidates)
        position, event = by_shard[shard].items[heads[shard]]
        heads[shard] += 1
        new_positions[shard] = position
        out.append(event)
    for page in pages:  # a shard whose every item was taken moves to where it read (events of other types)
        if page.scanned is not None and heads[page.shard] == len(page.items):
            new_positions[page.shard] = page.scanned
    more = any(heads[p.shard] < len(p.items) or p.more for p in pages)
    return out, new_positions, more
