"""Shared test helpers: one HTTP client that knows how the API identifies callers, account placement
helpers, bounded polling, and the money-conservation checker that reads a shard's database directly.

The caller's identity is sent by `ApiClient.auth` and `ApiClient.headers` and nowhere else: a regional
service accepts only a router's hop token bound to the request (DESIGN D8), so a test talking to a region
directly signs each request with the session's hop key (`HopAuth`), as the router would. A client that goes
through the router sends its client token in `headers` instead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from app.topology.ids import parse_account_id
from app.topology.model import Shard, Topology
from tests.keys import HopAuth

HTTP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05


def new_key() -> str:
    return "key-" + uuid.uuid4().hex


def new_client_id(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class ApiClient:
    """The public API as one client sees it. Every write takes an explicit idempotency key or makes one."""

    def __init__(self, http: httpx.AsyncClient, client_id: str) -> None:
        self.http = http
        self.client_id = client_id

    @property
    def auth(self) -> httpx.Auth | None:
        """Who the caller is, straight to a region: each request signed with a hop token for this client (all
        public scopes), bound to that request."""
        return HopAuth(self.client_id)

    def headers(self, *, key: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if key is not None:
            headers["Idempotency-Key"] = key
        headers.update(extra or {})
        return headers

    # Raw requests ------------------------------------------------------------------------------------

    async def post(self, path: str, body: dict[str, Any], *, key: str | None = None) -> httpx.Response:
        return await self.http.post(path, json=body, headers=self.headers(key=key or new_key()), auth=self.auth)

    async def post_raw(
        self,
        path: str,
        content: bytes,
        *,
        key: str | None,
        content_type: str = "application/json",
    ) -> httpx.Response:
        """A POST whose body, content type and key (None: no header) are exactly as given."""
        return await self.http.post(
            path, content=content, headers=self.headers(key=key, extra={"Content-Type": content_type}),
            auth=self.auth,
        )

    async def get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.get(path, params=params, headers=self.headers(), auth=self.auth)

    # The API -----------------------------------------------------------------------------------------

    async def open_account(
        self,
        currency: str = "EUR",
        *,
        key: str | None = None,
        overdraft_limit: int | None = None,
        region: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"currency": currency}
        if overdraft_limit is not None:
            body["overdraft_limit"] = overdraft_limit
        if region is not None:
            body["region"] = region
        return await self.post("/v1/accounts", body, key=key)

    async def deposit(
        self, account: str, amount: int, currency: str = "EUR", *, key: str | None = None, reference: str | None = None
    ) -> httpx.Response:
        return await self.post("/v1/deposits", _funds(account, amount, currency, reference), key=key)

    async def withdraw(
        self, account: str, amount: int, currency: str = "EUR", *, key: str | None = None, reference: str | None = None
    ) -> httpx.Response:
        return await self.post("/v1/withdrawals", _funds(account, amount, currency, reference), key=key)

    async def transfer(
        self,
        debit: str,
        credit: str,
        amount: int,
        currency: str = "EUR",
        *,
        key: str | None = None,
        reference: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "debit_account": debit, "credit_account": credit, "amount": amount, "currency": currency,
        }
        if reference is not None:
            body["reference"] = reference
        return await self.post("/v1/transfers", body, key=key)

    async def hold(
        self, debit: str, credit: str, amount: int, currency: str = "EUR", *, expires_in_s: int = 3600,
        key: str | None = None, metadata: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A transfer created as a hold (DESIGN D14)."""
        body: dict[str, Any] = {
            "debit_account": debit, "credit_account": credit, "amount": amount, "currency": currency,
            "hold": {"expires_in_s": expires_in_s},
        }
        if metadata is not None:
            body["metadata"] = metadata
        return await self.post("/v1/transfers", body, key=key)

    async def capture(self, transfer_id: str, amount: int | None = None, *, key: str | None = None) -> httpx.Response:
        path = f"/v1/transfers/{transfer_id}/capture"
        if amount is None:  # the body may be left out: the whole hold is captured
            return await self.post_raw(path, b"", key=key or new_key())
        return await self.post(path, {"amount": amount}, key=key)

    async def void(self, transfer_id: str, *, key: str | None = None) -> httpx.Response:
        return await self.post_raw(f"/v1/transfers/{transfer_id}/void", b"", key=key or new_key())

    async def close(self, account_id: str, *, key: str | None = None) -> httpx.Response:
        return await self.post_raw(f"/v1/accounts/{account_id}/close", b"", key=key or new_key())

    async def account(self, account_id: str, *, as_of: str | None = None) -> httpx.Response:
        return await self.get(f"/v1/accounts/{account_id}", params={"as_of": as_of} if as_of is not None else None)

    async def entries(self, account_id: str, *, limit: int | None = None, cursor: str | None = None) -> httpx.Response:
        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        return await self.get(f"/v1/accounts/{account_id}/entries", params=params)

    # Conveniences that insist on success -------------------------------------------------------------

    async def new_account(self, currency: str = "EUR", *, overdraft_limit: int | None = None) -> str:
        response = await self.open_account(currency, overdraft_limit=overdraft_limit)
        assert response.status_code == 201, (
            f"expected 201 opening an account, got {response.status_code}: {response.text}"
        )
        return str(response.json()["id"])

    async def balance(self, account_id: str) -> int:
        response = await self.account(account_id)
        assert response.status_code == 200, (
            f"expected 200 reading {account_id}, got {response.status_code}: {response.text}"
        )
        return int(response.json()["balance"])

    async def funded(self, account_id: str, amount: int, currency: str = "EUR") -> None:
        response = await self.deposit(account_id, amount, currency)
        assert response.status_code == 201, f"expected 201 for a deposit, got {response.status_code}: {response.text}"

    async def all_entries(self, account_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
        """Every entry of the account, walking the cursor; newest first."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(10_000):
            response = await self.entries(account_id, limit=limit, cursor=cursor)
            assert response.status_code == 200, f"expected 200 listing entries, got {response.status_code}"
            page = response.json()
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return items
        raise AssertionError("entries pagination did not end within 10000 pages")


def _funds(account: str, amount: int, currency: str, reference: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"account": account, "amount": amount, "currency": currency}
    if reference is not None:
        body["reference"] = reference
    return body


def shard_of(topology: Topology, account_id: str) -> str:
    return topology.shard_for_slot(parse_account_id(account_id).slot).name


def source_move_spec(topology: Topology, slot: int, move_id: str, *, target: Shard | None = None) -> dict[str, Any]:
    """The source side's record of a move of `slot` alone (txr_move_begin's argument, as the mover builds it),
    to `target` (default: the first other shard of the topology), epoch 2."""
    source = topology.shard_for_slot(slot)
    to = target if target is not None else next(s for s in topology.shards if s.name != source.name)
    return {"id": move_id, "slot_lo": slot, "slot_hi": slot, "source_shard": source.name,
            "source_region": source.region, "target_shard": to.name, "target_region": to.region, "epoch": 2,
            "role": "source"}


async def accounts_in_one_shard(
    api: ApiClient, topology: Topology, count: int, currency: str = "EUR", *, attempts_max: int = 200, **open_args: Any
) -> tuple[str, list[str]]:
    """Open accounts until `count` of them share a shard (placement hashes the key); return (shard, ids)."""
    by_shard: dict[str, list[str]] = {}
    for _ in range(attempts_max):
        account_id = await api.new_account(currency, **open_args)
        shard = shard_of(topology, account_id)
        by_shard.setdefault(shard, []).append(account_id)
        if len(by_shard[shard]) == count:
            return shard, by_shard[shard]
    raise AssertionError(f"expected {count} accounts in one shard within {attempts_max} opens, got {by_shard}")


async def account_in_shard(
    api: ApiClient, topology: Topology, shard: str, *, attempts_max: int = 200, **open_args: Any
) -> str:
    """Open accounts until one lands in `shard`."""
    for _ in range(attempts_max):
        account_id = await api.new_account(**open_args)
        if shard_of(topology, account_id) == shard:
            return account_id
    raise AssertionError(f"expected an account in shard {shard} within {attempts_max} opens")


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Await `check` until it is true, at most `timeout_s` (never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"expected {what} within {timeout_s}s")


async def ledger_snapshot(dsn: str) -> dict[str, tuple[int, int]]:
    """Every account's (balance, entry count), read directly from the shard database."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """select a.id, a.balance, (select count(*) from entries e where e.account_id = a.id) as n
               from accounts a"""
        )
    finally:
        await conn.close()
    return {r["id"]: (r["balance"], r["n"]) for r in rows}


async def assert_shard_conserved(dsn: str) -> None:
    """Money is conserved in the shard (DESIGN D4), checked in SQL over every account:

    per currency, all accounts (customer and settlement) sum to zero; every balance equals the sum of its
    entries (and its newest entry's balance_after); every transfer's entries sum to zero and every transfer
    has entries (but a hold: it moves nothing until captured); every account's `held` is the sum of its open
    holds.
    """
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            unbalanced = await conn.fetch(
                "select currency, sum(balance) as total from accounts group by currency having sum(balance) <> 0"
            )
            drifted = await conn.fetch(
                """select a.id, a.balance, coalesce(sum(e.amount), 0) as journal
                   from accounts a left join entries e on e.account_id = a.id
                   group by a.id, a.balance having a.balance <> coalesce(sum(e.amount), 0)"""
            )
            stale_after = await conn.fetch(
                """select a.id, a.balance, last.balance_after
                   from accounts a
                   join lateral (select balance_after from entries e where e.account_id = a.id
                                 order by e.id desc limit 1) last on true
                   where last.balance_after <> a.balance"""
            )
            lopsided = await conn.fetch(
                """select t.id, coalesce(sum(e.amount), 0) as total, count(e.id) as n
                   from transfers t left join entries e on e.transfer_id = t.id
                   group by t.id
                   having coalesce(sum(e.amount), 0) <> 0
                       or (count(e.id) = 0 and bool_and(t.debit_shard is null and t.moved_from is null)
                           and bool_and(t.state not in ('held', 'voided', 'expired')))"""
            )
            held_drifted = await conn.fetch(
                """select a.id, a.held, coalesce(sum(t.amount), 0) as open
                   from accounts a left join transfers t on t.debit_account = a.id and t.state = 'held'
                   group by a.id, a.held having a.held <> coalesce(sum(t.amount), 0)"""
            )
            below_limit = await conn.fetch(
                "select id, balance, overdraft_limit from accounts "
                "where kind = 'customer' and balance < -overdraft_limit"
            )
    finally:
        await conn.close()
    problems = {
        "every currency to sum to zero over all accounts": unbalanced,
        "every balance to equal the sum of its entries": drifted,
        "each newest balance_after to equal the balance": stale_after,
        "every transfer's entries to sum to zero (and a local transfer to have entries)": lopsided,
        "no customer balance below its limit": below_limit,
        "every account's held to equal the sum of its open holds": held_drifted,
    }
    for expected, rows in problems.items():
        assert not rows, f"expected {expected}, got {[dict(r) for r in rows][:10]}"
