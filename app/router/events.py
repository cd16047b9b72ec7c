"""The client's event feed across regions (issue 13): the router asks every region for its part (one page per
shard, each event with its shard position) and merges them (app/events/feed.py). A region that does not answer
makes the page fail with 503, never a page without it: its events would be skipped by the merged cursor only if
its positions moved, and they never move without its answer, but a client must not mistake a partial page for
the end of the feed. The query is checked here first, so a bad cursor is a 400 before any region is asked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import msgspec

from app.api.upstreams import Answer
from app.events import feed
from app.events.delivery import pages_from_json

_JSON_HEADERS = [(b"content-type", b"application/json")]


async def merged_page(query: str, regions: tuple[str, ...], send: Callable[[str], Awaitable[Answer]]) -> Answer:
    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    positions = feed.decode_cursor(params.get("after"))
    limit = feed.page_size(params.get("limit"))
    feed.event_types(params.get("types"))
    answers = await asyncio.gather(*(send(region) for region in regions))
    pages = []
    for answer in answers:
        if answer.status != 200:
            return answer  # the region's problem (401, 400, 503 ...), as it said it
        pages.extend(pages_from_json(msgspec.json.decode(answer.body)))
    items, moved, more = feed.merge(positions, pages, limit)
    body = msgspec.json.encode({"items": items, "next_cursor": feed.encode_cursor(moved), "has_more": more})
    return Answer(200, list(_JSON_HEADERS), body)
