"""A retried open across regions (issue 11): a region asks another for the answers it holds under a client's
Idempotency-Key at slots that moved there from the asking region, over the internal API with a saga token
(region-to-region; routers hold no key that signs one), as the webhook worker reads another region's feed.

    asker    `peer_asker(...)` is `RegionLedger.ask_peer`: POST REPLAY_LOOKUP_PATH, one call per region and
             walk step, answered within OPEN_REPLAY_PEER_TIMEOUT_S
    answerer `replay_lookup`: this region's shards, read in one statement each (RegionLedger.stored_answers)

Failures, to the client whose open asked: a region that cannot be reached, answers late, or answers anything but
200 with its answers leaves it unknown whether that region holds the key's first answer, so the open is refused
503 region_unavailable with nothing written (opening anyway could open a second account); the client retries
with its key. Reads only: the answerer writes nothing, and an answer once stored never changes.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from app import limits
from app.api.decoding import decode_body
from app.api.http import json_response
from app.api.schemas import ReplayLookup
from app.api.upstreams import UpstreamError, Upstreams
from app.errors import Problem
from app.region.identity import saga_peer, verified_body
from app.region.service import AskPeer, RegionLedger, StoredAnswer
from app.security.tokens import BoundRequest, SagaTokenMinter

REPLAY_LOOKUP_PATH = "/internal/replay-lookup"


def peer_asker(peers: Upstreams, minter: SagaTokenMinter) -> AskPeer:
    async def ask(region: str, client: str, key: str, slots: list[int]) -> list[StoredAnswer]:
        if not peers.knows(region):
            raise _unknown(region, "it is not among this region's peers")
        body = msgspec.json.encode(ReplayLookup(client=client, key=key, slots=slots))
        token = minter.token(region, BoundRequest("POST", REPLAY_LOOKUP_PATH, body))
        try:
            answer = await peers.send(
                region, "POST", REPLAY_LOOKUP_PATH,
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
                body=body, timeout_s=limits.OPEN_REPLAY_PEER_TIMEOUT_S,
            )
        except UpstreamError as exc:
            raise _unknown(region, exc.error_type) from None
        if answer.status != 200:
            raise _unknown(region, f"it answered {answer.status}")
        try:
            doc = msgspec.json.decode(answer.body, type=_Answers)
        except msgspec.ValidationError:
            raise _unknown(region, "its answer was malformed") from None
        asked = set(slots)
        answers = [StoredAnswer(a.slot, fingerprint=a.fingerprint, status=a.status, body=a.body, moved_to=a.moved_to,
                                in_flight=a.in_flight, arriving=a.arriving) for a in doc.answers if a.slot in asked]
        if {a.slot for a in answers} != asked:
            raise _unknown(region, "it did not answer for every slot asked")
        return answers

    return ask


def _unknown(region: str, why: str) -> Problem:
    return Problem(
        "region_unavailable",
        f"region {region} holds slots where this Idempotency-Key may have been used before and could not be "
        f"asked ({why}); nothing was written, retry with the same key",
        extra={"region": region},
        headers={"retry-after": str(limits.SLOT_MOVING_RETRY_AFTER_S)},
    )


class _Answer(msgspec.Struct, kw_only=True):
    slot: int
    fingerprint: str | None = None
    status: int | None = None
    body: dict[str, Any] | None = None
    moved_to: tuple[str, str] | None = None
    in_flight: bool = False
    arriving: bool = False


class _Answers(msgspec.Struct):
    answers: list[_Answer]


@post(REPLAY_LOOKUP_PATH, summary="The answers stored under a client's key at these slots (issue 11)",
      status_code=200, include_in_schema=False)
async def replay_lookup(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Only from another region (a saga token): the stored answers are the client's, and only regions ask."""
    await saga_peer(request)
    lookup = decode_body(verified_body(request), request.headers.get("content-type", ""), ReplayLookup)
    ledger: RegionLedger = request.app.state.ledger
    answers = await ledger.stored_answers(lookup.client, lookup.key, list(dict.fromkeys(lookup.slots)))
    return json_response(request, 200, {"answers": [
        {"slot": a.slot, "fingerprint": a.fingerprint, "status": a.status, "body": a.body, "moved_to": a.moved_to,
         "in_flight": a.in_flight, "arriving": a.arriving}
        for a in answers
    ]})
