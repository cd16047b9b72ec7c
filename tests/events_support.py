"""Helpers for the events and webhooks tests: the feed walked page by page, the committed events read straight
from every shard database, and an independent Standard Webhooks verifier (not app.events.signing)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import asyncpg

from app.local.postgres import Cluster
from app.topology.model import Topology
from tests.helpers import ApiClient


async def feed_page(api: ApiClient, *, after: str | None = None, limit: int = 100,
                    types: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if after is not None:
        params["after"] = after
    if types is not None:
        params["types"] = types
    response = await api.get("/v1/events", params=params)
    assert response.status_code == 200, f"expected 200 from the feed, got {response.status_code}: {response.text}"
    page: dict[str, Any] = response.json()
    return page


async def walk_feed(api: ApiClient, after: str | None = None, *, limit: int = 100,
                    types: str | None = None, pages_max: int = 1_000) -> tuple[list[dict[str, Any]], str]:
    """Every event the feed has after `after`, page by page until a page says no more; and the last cursor."""
    items: list[dict[str, Any]] = []
    for _ in range(pages_max):
        page = await feed_page(api, after=after, limit=limit, types=types)
        items.extend(page["items"])
        after = page["next_cursor"]
        if not page["has_more"]:
            assert after is not None
            return items, after
    raise AssertionError(f"expected the feed to end within {pages_max} pages")


async def committed_events(clusters: dict[str, Cluster], topology: Topology, client: str) -> list[dict[str, Any]]:
    """Every event of `client` committed in any shard, each shard's in its (xid, seq) order."""
    found: list[dict[str, Any]] = []
    for shard in topology.shards:
        conn = await asyncpg.connect(clusters[shard.region].dsn(shard.database))
        try:
            rows = await conn.fetch(
                "select id, type, resource_id from events where client = $1 order by xid, seq", client)
        finally:
            await conn.close()
        found.extend({"id": r["id"], "type": r["type"], "resource": r["resource_id"], "shard": shard.name}
                     for r in rows)
    return found


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks, written from the specification: any `v1,` signature of the header matching
    HMAC-SHA256(base64-decoded secret after `whsec_`, "{id}.{timestamp}.{body}") verifies."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = headers["webhook-id"].encode() + b"." + headers["webhook-timestamp"].encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [part.split(",", 1)[1] for part in headers["webhook-signature"].split(" ") if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)
