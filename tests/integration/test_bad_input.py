"""Bad input over HTTP: each is a 4xx problem+json with its stable code and a request id, nothing that
looks like a stack trace, and the ledger is exactly as it was."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx

from app import limits
from app.topology.model import Topology
from tests.helpers import ApiClient, accounts_in_one_shard, ledger_snapshot, new_key

PROBLEM_KEYS = {"type", "title", "status", "detail", "code", "request_id"}
LEAK_MARKERS = ("Traceback", 'File "', "asyncpg", "msgspec.", "psycopg", "SELECT ", "select ", "/app/")


def assert_problem(response: httpx.Response, status: int, code: str, what: str) -> None:
    assert response.status_code == status, (
        f"{what}: expected {status} {code}, got {response.status_code} {response.text}"
    )
    assert response.headers["content-type"].startswith("application/problem+json"), (
        f"{what}: expected problem+json, got {response.headers['content-type']}"
    )
    body = response.json()
    assert body["code"] == code, f"{what}: expected code {code}, got {body['code']}"
    assert PROBLEM_KEYS <= set(body), f"{what}: expected the problem fields {PROBLEM_KEYS}, got {set(body)}"
    assert body["status"] == status and body["request_id"] == response.headers["x-request-id"], what
    assert not any(marker in response.text for marker in LEAK_MARKERS), f"{what}: internals leaked: {response.text}"


def raw_cases(a: str, b: str) -> list[tuple[str, str, bytes | str, int, str]]:
    """(what, path, body, status, code); a body given as str is sent as JSON text verbatim."""
    funds = '{"account": "%s", "amount": %s, "currency": "EUR"}'
    move = '{"debit_account": "%s", "credit_account": "%s", "amount": %s, "currency": "EUR"}'
    cases: list[tuple[str, str, bytes | str, int, str]] = []
    for path in ("/v1/deposits", "/v1/withdrawals"):
        for raw, why in [("1.0", "float"), ("1e3", "exponent"), ("0", "zero"), ("-5", "negative"),
                         (str(2**53), "above 2^53-1"), ('"100"', "string"), ("true", "bool"), ("null", "null")]:
            cases.append((f"{path} amount {why}", path, funds % (a, raw), 400, "invalid_amount"))
    for raw, why in [("2.5", "float"), ("0", "zero"), ("-1", "negative"), (str(2**63), "2^63"), ('"7"', "string")]:
        cases.append((f"transfer amount {why}", "/v1/transfers", move % (a, b, raw), 400, "invalid_amount"))
    cases += [
        ("unknown currency", "/v1/deposits", f'{{"account": "{a}", "amount": 1, "currency": "XXX"}}', 400,
         "unsupported_currency"),
        ("lowercase currency", "/v1/transfers",
         f'{{"debit_account": "{a}", "credit_account": "{b}", "amount": 1, "currency": "eur"}}', 400,
         "unsupported_currency"),
        ("unknown field", "/v1/deposits", f'{{"account": "{a}", "amount": 1, "currency": "EUR", "fee": 1}}', 400,
         "invalid_request"),
        ("unknown field on open", "/v1/accounts", '{"currency": "EUR", "colour": "red"}', 400, "invalid_request"),
        ("missing field", "/v1/transfers", f'{{"debit_account": "{a}", "amount": 1, "currency": "EUR"}}', 400,
         "invalid_request"),
        ("malformed json", "/v1/deposits", '{"account": ', 400, "malformed_json"),
        ("not json at all", "/v1/transfers", "amount=5", 400, "malformed_json"),
        ("array body", "/v1/deposits", "[]", 400, "invalid_request"),
        ("uppercase id", "/v1/deposits", funds % (a.upper(), 1), 400, "invalid_account_id"),
        ("transfer id as account", "/v1/deposits", funds % ("trf_" + a[4:], 1), 400, "invalid_account_id"),
        ("short id", "/v1/transfers", move % (a, b[:-1], 1), 400, "invalid_account_id"),
        ("id with trailing newline", "/v1/deposits", funds % (a + "\\n", 1), 400, "invalid_account_id"),
        ("credit id with trailing newline", "/v1/transfers", move % (a, b + "\\n", 1), 400, "invalid_account_id"),
        ("id with bad ULID letter", "/v1/withdrawals", funds % (a[:-1] + "U", 1), 400, "invalid_account_id"),
        ("overdraft negative", "/v1/accounts", '{"currency": "EUR", "overdraft_limit": -1}', 400, "invalid_amount"),
        ("overdraft float", "/v1/accounts", '{"currency": "EUR", "overdraft_limit": 1.5}', 400, "invalid_amount"),
        ("oversized body", "/v1/deposits",
         json.dumps({"account": a, "amount": 1, "currency": "EUR",
                     "reference": "x" * (limits.REQUEST_BODY_BYTES_MAX + 1)}), 413, "payload_too_large"),
    ]
    return cases


async def test_bad_bodies_are_refused_with_their_code_and_change_nothing(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 1_000)
    before = await ledger_snapshot(shard_dsn(shard))
    for what, path, body, status, code in raw_cases(a, b):
        content = body.encode() if isinstance(body, str) else body
        assert_problem(await api.post_raw(path, content, key=new_key()), status, code, what)
    after = await ledger_snapshot(shard_dsn(shard))
    assert after == before, "expected balances and entry counts unchanged by refused requests"
    assert (await api.balance(a), await api.balance(b)) == (1_000, 0)


async def test_a_wrong_content_type_is_unsupported_media_type(api: ApiClient) -> None:
    account = await api.new_account()
    body = f'{{"account": "{account}", "amount": 1, "currency": "EUR"}}'.encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = await api.post_raw("/v1/deposits", body, key=new_key(), content_type=content_type)
        assert_problem(response, 415, "unsupported_media_type", content_type)
    assert await api.balance(account) == 0


async def test_malformed_ids_in_the_path_read_as_not_found(api: ApiClient) -> None:
    account = await api.new_account()
    for bad in (account.upper(), account[:-1], account + "0", "acc_zzz" + account[7:], "not-an-id", account[:-1] + "O"):
        assert_problem(await api.account(bad), 404, "account_not_found", f"GET account {bad!r}")
        assert_problem(await api.entries(bad), 404, "account_not_found", f"GET entries {bad!r}")
    for bad in ("trf_123", account, "trf_" + account[4:-1]):
        assert_problem(await api.get(f"/v1/transfers/{bad}"), 404, "transfer_not_found", f"GET transfer {bad!r}")


async def test_bad_pagination_parameters_are_refused(api: ApiClient) -> None:
    account = await api.new_account()

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    bad_cursors = ["!!!", "e12", b64(b"x12"), b64(b"e"), b64(b"e-1"), b64("e²".encode()), b64("e\u0661\u0662".encode()),
                   b64(b"e" + b"9" * 19), b64(b"e" + b"9" * 40), b64(b"\xff\xfe")]
    for cursor in bad_cursors:
        assert_problem(await api.entries(account, cursor=cursor), 400, "invalid_cursor", f"cursor {cursor!r}")
    for limit in ("0", "-1", str(limits.ENTRIES_PAGE_SIZE_MAX + 1), "abc", "1.5", "²"):
        response = await api.get(f"/v1/accounts/{account}/entries", params={"limit": limit})
        assert_problem(response, 400, "invalid_request", f"limit {limit!r}")


async def test_unknown_routes_and_methods_are_problems(api: ApiClient) -> None:
    assert_problem(await api.get("/v1/nothing-here"), 404, "not_found", "unknown route")
    response = await api.http.delete("/v1/accounts/acc_000", headers=api.headers())
    assert response.status_code in (404, 405), response.text
    assert response.headers["content-type"].startswith("application/problem+json")




async def test_out_of_range_cursors_times_and_nul_characters_are_refused_not_failed(
    api: ApiClient, topology: Topology
) -> None:
    """Values that pass a pattern but not the database's types: a feed position past bigint or xid8, a time that
    has no UTC instant, a NUL character (which jsonb and text cannot hold)."""
    shard, (account,) = await accounts_in_one_shard(api, topology, 1)
    for position in ("1.9999999999999999999", "99999999999999999999.1"):
        cursor = base64.urlsafe_b64encode(json.dumps({shard: position}).encode()).decode().rstrip("=")
        response = await api.get("/v1/events", params={"after": cursor})
        assert_problem(response, 400, "invalid_cursor", f"feed position {position}")
    response = await api.account(account, as_of="0001-01-01T00:00:00+01:00")
    assert_problem(response, 400, "invalid_as_of", "a time before the first UTC instant")
    before = await api.deposit(account, 1)
    assert before.status_code == 201, before.text
    response = await api.post("/v1/deposits", {"account": account, "amount": 1, "currency": "EUR",
                                               "metadata": {"note": "a\u0000b"}})
    assert_problem(response, 400, "invalid_metadata", "a NUL character in metadata")
    response = await api.post("/v1/deposits", {"account": account, "amount": 1, "currency": "EUR",
                                               "reference": "a\u0000b"})
    assert_problem(response, 400, "invalid_request", "a NUL character in a reference")
    response = await api.post("/v1/webhook-endpoints", {"url": "https://example.com/hook", "description": "a\u0000b"})
    assert_problem(response, 400, "invalid_request", "a NUL character in a webhook endpoint's description")
    assert await api.balance(account) == 1
