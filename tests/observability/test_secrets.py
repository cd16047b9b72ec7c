"""Secrets never reach a log line, an error body or a span (DESIGN D8): real requests with a real client
token, forged and malformed tokens, a direct call to a region and refusals; then every log file, every
answer body and every exported span (decoded attributes and raw OTLP bytes) is searched for the token, its
signature, any JWT at all, the database passwords and the internal private key."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.security.keys import private_pem
from app.security.tokens import mint_client_token
from tests.e2e.conftest import RouterApi
from tests.helpers import poll_until
from tests.keys import CLIENT_KID, TEST_ISSUER
from tests.observability.conftest import TracedWorld, open_in
from tests.tls import verify

_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


def _pem_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


async def _exercise(traced: TracedWorld, api: RouterApi) -> tuple[list[bytes], str, str]:
    """Requests that succeed and fail in every way we know; returns their bodies, the last trace id and the
    forged token."""
    bodies: list[bytes] = []
    forged = mint_client_token(ed25519.Ed25519PrivateKey.generate(), issuer=TEST_ISSUER, client=api.client_id,
                               scopes=["accounts:read"], lifetime_s=60, kid=CLIENT_KID)
    account = await open_in(api, "eu-west-1")
    other = await open_in(api, "us-east-1")
    http = api.http
    responses = [
        await api.deposit(account, 700),
        await api.transfer(account, other, 100),
        await api.withdraw(other, 10_000),  # insufficient funds
        await http.get(f"/v1/accounts/{account}", headers={"Authorization": "Bearer " + forged}),
        await http.get(f"/v1/accounts/{account}", headers={"Authorization": "Bearer " + api.token + "x"}),
        await http.get(f"/v1/accounts/{account}", headers={"Authorization": api.token}),  # no scheme
        await http.post("/v1/deposits", content=b'{"account": "' + api.token.encode() + b'", "amount": 1}',
                        headers=api.headers(key="key-" + secrets.token_hex(8),
                                            extra={"content-type": "application/json"})),
        await http.post("/v1/deposits", content=b"{not json", headers=api.headers(key="k" * 200)),
        await http.get("/v1/accounts/" + api.token),  # the token where an id belongs, without credentials
        await http.get("/metrics"),
    ]
    async with httpx.AsyncClient(base_url=traced.services["eu-west-1"].url, timeout=10, verify=verify()) as region:
        responses.append(await region.get(f"/v1/accounts/{account}", headers={"Authorization": "Bearer " + forged}))
        responses.append(await region.get(f"/v1/accounts/{account}",
                                          headers={"Authorization": "Bearer " + api.token}))  # a client token
        responses.append(await region.post("/internal/saga/apply", content=b"{}",
                                           headers={"Authorization": "Bearer " + forged}))
    assert [r.status_code for r in responses[:3]] == [201, 201, 422]
    assert all(r.status_code in (400, 401, 404, 422) for r in responses[3:9]), [r.status_code for r in responses]
    trace_id = secrets.token_hex(16)
    last = await http.get(f"/v1/accounts/{account}", headers=api.headers(
        extra={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}))
    assert last.status_code == 200
    bodies += [r.content for r in [*responses, last]]
    bodies += [json.dumps(dict(r.headers)).encode() for r in [*responses, last]]
    return bodies, trace_id, forged


async def test_no_token_password_or_private_key_reaches_a_log_an_error_body_or_a_span(
    traced: TracedWorld, traced_api: RouterApi
) -> None:
    bodies, trace_id, forged = await _exercise(traced, traced_api)
    traced.collector.wait_for(lambda spans: any(s.trace_id == trace_id and s.service == "txroute-router"
                                                for s in spans), what="the last request's spans")
    hop_pem, saga_pem = private_pem(traced.keys.hop_private), private_pem(traced.keys.saga_private)
    needles = {
        "client token": traced_api.token,
        "client token signature": traced_api.token.rsplit(".", 1)[1],
        "forged token signature": forged.rsplit(".", 1)[1],
        "hop private key": hop_pem,
        "saga private key": saga_pem,
        **{f"hop key line {i}": line for i, line in enumerate(_pem_lines(hop_pem))},
        **{f"saga key line {i}": line for i, line in enumerate(_pem_lines(saga_pem))},
        **{f"{region} database password": c.password() for region, c in traced.clusters.items()},
        "PEM header": "PRIVATE KEY-----",
    }
    places: dict[str, bytes] = {str(path): path.read_bytes() for path in traced.log_files()}
    places |= {f"answer body {i}": body for i, body in enumerate(bodies)}
    places |= {f"OTLP export {i}": body for i, body in enumerate(traced.collector.bodies)}
    for span in traced.collector.snapshot():
        places[f"span {span.service} {span.name}"] = json.dumps(
            {"name": span.name, "attributes": span.attributes}, default=str).encode()
    assert len(places) > 10 and any("region-eu-west-1" in p for p in places), sorted(places)
    for where, text in places.items():
        for what, needle in needles.items():
            assert needle.encode() not in text, f"expected no {what} in {where}"
        jwt = _JWT.search(text)
        assert jwt is None, f"expected no JWT in {where}: ...{text[max(0, jwt.start() - 80):jwt.start()]!r}"


async def test_log_lines_are_json_with_time_level_event_and_per_request_ids_trace_region_and_shard(
    traced: TracedWorld, traced_api: RouterApi
) -> None:
    account = await open_in(traced_api, "eu-west-1")
    response = await traced_api.deposit(account, 5)
    assert response.status_code == 201
    rid = response.headers["x-request-id"]
    logs = [traced.world.folder / "logs" / "region-eu-west-1.log", traced.world.folder / "logs" / "router-traced.log"]

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for path in logs for line in path.read_text().splitlines() if line.startswith("{")]

    async def both_logged() -> bool:  # a request's line is written as it ends, just after its answer
        services = {doc["service"] for doc in read() if doc.get("request_id") == rid and doc["event"] == "request"}
        return services == {"region", "router"}

    await poll_until(both_logged, what="the request's line in the router's and the region's log")
    lines = read()
    assert lines and all({"time", "level", "event", "service", "region"} <= set(doc) for doc in lines)
    mine = [doc for doc in lines if doc.get("request_id") == rid]
    region_line = next(doc for doc in mine if doc["service"] == "region" and doc["event"] == "request")
    router_line = next(doc for doc in mine if doc["service"] == "router" and doc["event"] == "request")
    assert region_line["trace_id"] == router_line["trace_id"] and re.fullmatch(r"[0-9a-f]{32}", region_line["trace_id"])
    assert region_line["shard"].startswith("euw1-") and region_line["region"] == "eu-west-1"
    assert region_line["route"] == "POST /v1/deposits" and region_line["status"] == 201
