"""Account and transfer ids that embed their slot (DESIGN D1).

`acc_` or `trf_`, then the slot as 3 lowercase hex digits, then a ULID (26 Crockford base32 characters).
Routing is `parse_*(id).slot` plus the shard map: no lookup. Parsing is strict: anything else is refused
before any routing or database work.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from app.topology.model import SLOT_COUNT

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# A ULID is 128 bits in 26 base32 characters, so its first character is at most '7'.
_ULID = "[0-7][0-9A-HJKMNP-TV-Z]{25}"
_ACCOUNT = re.compile(rf"^acc_([0-9a-f]{{3}})({_ULID})$")
_TRANSFER = re.compile(rf"^trf_([0-9a-f]{{3}})({_ULID})$")
ACCOUNT_ID_PATTERN = _ACCOUNT.pattern
TRANSFER_ID_PATTERN = _TRANSFER.pattern


class InvalidId(ValueError):
    """The text is not a well-formed id of the expected kind."""


@dataclass(frozen=True, slots=True)
class ParsedId:
    text: str
    slot: int


def new_ulid(now_ms: int | None = None) -> str:
    """48 bits of milliseconds then 80 random bits: sortable by creation time."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    assert 0 <= ms < 1 << 48
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def new_account_id(slot: int) -> str:
    assert 0 <= slot < SLOT_COUNT, slot
    return f"acc_{slot:03x}{new_ulid()}"


def new_transfer_id(slot: int) -> str:
    assert 0 <= slot < SLOT_COUNT, slot
    return f"trf_{slot:03x}{new_ulid()}"


def parse_account_id(text: str) -> ParsedId:
    return _parse(_ACCOUNT, text, "account")


def parse_transfer_id(text: str) -> ParsedId:
    return _parse(_TRANSFER, text, "transfer")


def _parse(pattern: re.Pattern[str], text: str, kind: str) -> ParsedId:
    m = pattern.match(text) if isinstance(text, str) and len(text) == 33 else None
    if m is None:
        raise InvalidId(f"not a valid {kind} id")
    return ParsedId(text=text, slot=int(m.group(1), 16))
