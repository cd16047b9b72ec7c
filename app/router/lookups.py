"""`GET /v1/transfers?reference=R` through the router: a reference names no account, so no slot says where its
transfers live. Every region is asked at once (one call each, so the fan-out is bounded by the topology), each
answer waited for at most LOOKUP_FANOUT_TIMEOUT_S; the answers are merged newest first and cut at the limit.

A region that does not answer in time is named in `unavailable_regions`: the list may then miss its transfers,
and says so, rather than pass an incomplete answer off as complete (DESIGN D7). A region that refuses the
query itself (400: a malformed reference or limit) is answered as it said, since every region would say the
same. Each region answers only for the transfers whose debit shard it owns (a saga's credit-side copy is left
to its debit shard), so a transfer is listed once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from app import limits
from app.api.upstreams import Answer, UpstreamError
from app.security.tokens import BoundRequest, Principal, request_target

if TYPE_CHECKING:
    from app.router.app import Router

_JSON_HEADERS = [(b"content-type", b"application/json")]


async def find_by_reference(
    router: Router, principal: Principal, path: str, query: bytes, client_headers: dict[str, str]
) -> Answer:
    path_qs = path + "?" + query.decode("latin-1") if query else path
    hop = router.minter.for_client(principal, BoundRequest("GET", request_target(path, query), b""))
    headers = {**client_headers, "authorization": "Bearer " + hop}

    async def ask(region: str) -> Answer | None:
        try:
            async with asyncio.timeout(limits.LOOKUP_FANOUT_TIMEOUT_S):
                return await router.upstreams.send(region, "GET", path_qs, headers=headers, body=None,
                                                   timeout_s=limits.LOOKUP_FANOUT_TIMEOUT_S)
        except (UpstreamError, TimeoutError):
            return None

    regions = sorted(router.upstreams.urls)
    answers = await asyncio.gather(*(ask(region) for region in regions))
    items: dict[str, dict[str, Any]] = {}
    unavailable = []
    for region, answer in zip(regions, answers, strict=True):
        if answer is not None and 400 <= answer.status < 500 and answer.status not in (408, 421, 429):
            return answer  # the query itself is refused (every region would say the same)
        if answer is None or answer.status != 200:
            unavailable.append(region)
            continue
        for item in msgspec.json.decode(answer.body)["items"]:
            items[item["id"]] = item
    limit = _limit(query)
    merged = sorted(items.values(), key=lambda t: (t["created_at"], t["id"]), reverse=True)[:limit]
    body: dict[str, Any] = {"items": merged}
    if unavailable:
        body["unavailable_regions"] = unavailable
    return Answer(200, list(_JSON_HEADERS), msgspec.json.encode(body))


def _limit(query: bytes) -> int:
    """The page size the regions applied (they refused anything malformed, so this parse cannot fail)."""
    for pair in query.decode("latin-1").split("&"):
        name, _, value = pair.partition("=")
        if name == "limit" and value.isascii() and value.isdigit():
            return min(int(value), limits.TRANSFERS_PAGE_SIZE_MAX)
    return limits.TRANSFERS_PAGE_SIZE_DEFAULT
