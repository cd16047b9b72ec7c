"""One shard's database: its pool, the group-commit queue for postings, and the reads (visible SQL).

Every call returns an `Outcome`: the HTTP status and body the ledger decided, and whether it is an
idempotent replay. Database failures are translated here, by class, never by message text:
serialization failures and deadlocks are retried (bounded), a lost connection becomes `ShardUnavailable`.

Fault isolation (issue 10): a posting whose account stays locked leaves its batch (the batch function waits
at most POSTING_BATCH_LOCK_PATIENCE_MS for an account), is retried alone with more patience and, still
blocked, fails with `AccountBusy` alone. The posting workers outlive any failure of a batch and any waiter
that went away; every request waits for its outcome at most POSTING_ANSWER_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from opentelemetry.trace import SpanContext

from app import limits, telemetry
from app.ledger.postings import Posting
from app.store.access import AUTH_FAILURES, DatabaseEndpoint
from app.store.grouped import Grouped, GroupFull, isolated
from app.store.migrate import is_migrated

log = logging.getLogger("txroute.store")

_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
_SLOT_MOVED = "TXR02"  # raised by the accounts_moved_fence trigger (migration 0008)
# Failures of the shard's server, not of the request: each heals by waiting (a posting answers 503, a saga
# delivery is retried and never counts towards its dead letter). By SQLSTATE class where the whole class is:
# 08 connection, 53 insufficient resources (53300 too many connections: a pool opening a connection while other
# processes hold every slot; 53100 disk full; 53200 out of memory), 57 operator intervention (shutdown,
# cannot connect now, query canceled), and 25006 (a failover left the connection on a standby).
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.LockNotAvailableError,
)


class ShardUnavailable(Exception):
    """The shard's database could not be reached or did not answer in time; the outcome is unknown."""


class QueueFull(Exception):
    """More postings are queued for this shard than `POSTING_QUEUE_DEPTH_MAX`."""


class TenantQueueFull(Exception):
    """This client already has its share of the shard's queue (`TENANT_QUEUE_POSTINGS_MAX`) waiting or in
    commit; the other clients still have room. Nothing was queued: a retry with the same key is safe."""

    def __init__(self, shard: str, client: str, limit: int) -> None:
        self.shard = shard
        self.client = client
        self.limit = limit
        super().__init__(f"shard {shard}: client has {limit} postings queued")


class SlotMoved(Exception):
    """A posting met an account whose slot a move has just switched away (migration 0008, SQLSTATE TXR02), or
    waited out its patience for an account of a frozen range (the switch holds them while it books them out):
    nothing was written; the client retries (its router holds it) and is routed to the new owner."""


# A batch of saga messages or answers whose transaction failed with these is split to find the one at fault
# (`isolated`); anything else (a lost database) is the whole batch's.
_SPLIT_ON = (asyncpg.PostgresError, SlotMoved)


class AccountBusy(Exception):
    """An account of the posting stayed locked by another operation (alone, too); nothing was posted, and
    nothing was stored under its Idempotency-Key, so a retry can succeed."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: dict[str, Any]
    replayed: bool = False
    # The posting left its batch: one of its accounts was locked too long (never stored, never answered).
    busy: bool = False
    # A saga message just committed to the outbox, for the fast path to deliver (never part of a response).
    message: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Outcome:
        return cls(
            status=int(doc["status"]),
            body=doc["body"],
            replayed=bool(doc.get("replayed", False)),
            busy=bool(doc.get("busy", False)),
            message=doc.get("message"),
        )


def _accounts_of(items: list[dict[str, Any]]) -> list[str]:
    """The accounts a posting (or an atomic batch's postings) would lock: debit, and credit or transit."""
    return [str(a) for item in items for a in (item.get("debit"), item.get("credit"), item.get("transit")) if a]


_encode = msgspec.json.encode
_decode = msgspec.json.decode


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="text", encoder=lambda v: _encode(v).decode(), decoder=_decode
    )


async def open_pool(
    endpoint: DatabaseEndpoint, database: str, *, size_max: int = limits.DB_POOL_SIZE_MAX
) -> asyncpg.Pool:
    """A pool that connects on demand: creating it does no I/O, so a region starts (and answers `/healthz`)
    while its database is unreachable, and becomes ready when it answers (app/region/health.py)."""
    pool = await asyncpg.create_pool(
        **endpoint.connect_args(database),
        min_size=0,
        max_size=size_max,
        timeout=limits.DB_CONNECT_TIMEOUT_S,
        command_timeout=limits.DB_COMMAND_TIMEOUT_S,
        init=_init_connection,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None
    return pool


SERVER_SETTINGS = {
    "statement_timeout": str(limits.DB_STATEMENT_TIMEOUT_MS),
    "lock_timeout": str(limits.DB_LOCK_TIMEOUT_MS),
    "idle_in_transaction_session_timeout": "30000",
    "jit": "off",
    "application_name": "txroute-region",
}


def utc_text(at: datetime.datetime) -> str:
    """A time as the API writes it (txr_ts in SQL): UTC, microseconds, Z."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def arrived_sql(account: str, slot: str) -> str:
    """When the account (the placeholder `account`) arrived on this shard by a slot move: the switch of the last move
    of its slot (`slot`) into this shard, if the account existed before it (one probe of slot_moves_arrivals, migration
    0041); null for an account whose whole history is here. Used by the balance as of a time and the transfer
    listing, which both know only this shard's rows. Only $n placeholders are joined in, never a value."""
    return f"""(select max(m.switched_at) from slot_moves m
            where m.role = 'target' and m.phase in ('switched', 'done') and {slot} between m.slot_lo and m.slot_hi
              and m.switched_at > (select a.created_at from accounts a where a.id = {account}))"""  # noqa: S608


# GET /v1/accounts/{id}?as_of=T (DESIGN D14): the balance is the account's last entry at or before T, one probe of
# entries_account_time (entries are stamped when written, so per account their times follow their ids); held is
# the sum of the holds open at T: created by T, not past their time, not resolved by T (the resolution's
# transfer_events row). A hold lives at most HOLD_EXPIRES_IN_S_MAX ($5), so only holds created in that window
# before T can be open at T: the range scan of transfers_holds_by_account is bounded by a week of holds, not by
# the account's history. (This replaces txr_account_as_of of migration 0009, which scans every hold created
# before T; a later migration may drop it.)
# Entries do not move with a slot (DESIGN D13): an account that arrived by a move has its journal here from the
# move's bookings on, and before the switch those are the pre-booking's, not the balance of the time. `arrived` is
# the switch of the last move that brought the slot here (slot_moves, role target; the switch-in records it after
# its last booking) when the account existed before it (else its whole journal is here); a T before it is refused
# (as_of_before_move), since this shard cannot answer it and the shard that could no longer serves the slot.
AS_OF_SQL = f"""
    select txr_owns($3) as owned, {arrived_sql('$1', '$3')} as arrived,
           (select txr_account_body(a) || jsonb_build_object(
                       'balance', coalesce(b.balance_after, 0), 'held', h.held,
                       'available', coalesce(b.balance_after, 0) - h.held + a.overdraft_limit, 'as_of', txr_ts($4))
            from accounts a
            left join lateral (
                select e.balance_after from entries e
                where e.account_id = a.id and e.created_at <= $4
                order by e.created_at desc, e.id desc limit 1) b on true
            cross join lateral (
                select coalesce(sum(t.hold_amount), 0) as held from transfers t
                where t.debit_account = a.id and t.hold_amount is not null
                  and t.created_at <= $4 and t.created_at > $4 - make_interval(secs => $5)
                  and t.hold_expires_at > $4
                  and not exists (select 1 from transfer_events ev
                                  where ev.transfer_id = t.id and ev.seq > 1 and ev.at <= $4)) h
            where a.id = $1 and a.owner_client = $2 and a.kind = 'customer') as body"""  # noqa: S608 - placeholders

# A queued posting: its JSON, the future its request awaits, and its request's span (None when untraced).
@dataclass(frozen=True, slots=True)
class TransfersQuery:
    """A page of an account's transfers: created in [from_at, to_at), in `state`, before the cursor."""

    limit: int
    from_at: datetime.datetime | None = None
    to_at: datetime.datetime | None = None
    state: str | None = None
    before_at: datetime.datetime | None = None  # the cursor: the last listed transfer's (created_at, id)
    before_id: str | None = None


START_POSITION = "0.0"  # a shard's event stream from its beginning (app/events/feed.py)


@dataclass(frozen=True, slots=True)
class EventsRead:
    """A page of one shard's event stream (`events_page`): the events, each with its position; `scanned`, a
    position the reader may move to once it has taken every item (None: only as far as the last item), no
    event of its filter lying between; `more`, whether the read stopped at a bound (there may be more)."""

    items: list[tuple[str, dict[str, Any]]]
    scanned: str | None
    more: bool


# One range of transfers_client_reference, in its order (no sort). A transfer is listed by the shard that owns (or
# has frozen) the slot its id carries, its debit account's: that shard holds its debit side, posted there or
# copied there by a move with its slot (whose `debit_shard` still names the shard it was debited on, and whose row
# may be the credit row a saga to the move's target had made, joined by the copy). A saga's credit-side row on
# another shard is of a slot that shard does not own, and a move's source keeps its rows archived under a `moved`
# slot: neither is listed, so each transfer is listed once.
REFERENCE_SQL = """select txr_transfer_body(t) as body, t.created_at, t.id from transfers t
                   where t.client = $1 and t.reference = $2
                     and exists (select 1 from slot_ownership o where txr_id_slot(t.id) between o.slot_lo
                                 and o.slot_hi and o.state in ('owned', 'moving'))
                   order by t.created_at desc, t.id desc limit $3"""


def account_transfers_sql(account_id: str, client: str, page: TransfersQuery) -> tuple[str, list[Any]]:
    """The listing's SQL with only the conditions the page uses (so each is an index condition of a plan made
    for it, not an `$n is null or ...` filter a generic plan keeps): each side of the account is one range scan
    of its index in (created_at desc, id desc) order, cut at the limit; the two are merged and cut again."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    conditions = [f"t.client = {arg(client)}"]
    if page.from_at is not None:
        conditions.append(f"t.created_at >= {arg(page.from_at)}")
    if page.to_at is not None:
        conditions.append(f"t.created_at < {arg(page.to_at)}")
    # A hold past its time reads as `expired` before the sweeper records it (txr_transfer_body, migration 0009),
    # and lists as it reads: under `expired`, not `held`.
    if page.state == "held":
        conditions.append("t.state = 'held' and t.hold_expires_at > clock_timestamp()")
    elif page.state == "expired":
        conditions.append("(t.state = 'expired' or (t.state = 'held' and t.hold_expires_at <= clock_timestamp()))")
    elif page.state is not None:
        conditions.append(f"t.state = {arg(page.state)}")
    if page.before_at is not None:
        conditions.append(f"(t.created_at, t.id) < ({arg(page.before_at)}, {arg(page.before_id)})")
    account, limit = arg(account_id), arg(page.limit)
    where = " and ".join(conditions)
    # Only constant text and $n placeholders are joined here; every value is a bound argument.
    side = ("(select t.id, t.created_at, txr_transfer_body(t) as body from transfers t where t.{col} = "  # noqa: S608
            + account + " and " + where + f" order by t.created_at desc, t.id desc limit {limit})")
    sql = (f"select id, created_at, body from ({side.format(col='debit_account')} union all "  # noqa: S608
           f"{side.format(col='credit_account')}) both_sides order by created_at desc, id desc limit {limit}")
    return sql, args


_Queued = tuple[dict[str, Any], "asyncio.Future[Outcome]", SpanContext | None]


class ShardStore:
    """The ledger of one shard, as this regional process sees it."""

    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        *,
        workers: int = limits.POSTING_WORKERS,
        client_postings_max: int = limits.TENANT_QUEUE_POSTINGS_MAX,
        endpoint: DatabaseEndpoint | None = None,
        database: str | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        # Each client's postings queued or in commit here, so one client cannot fill the queue for all
        # (DESIGN D8). Only clients with postings in the queue have an entry: bounded by the queue's depth.
        self.client_postings_max = client_postings_max
        self._queued_by_client: dict[str, int] = {}
        self._share_of: dict[asyncio.Future[Outcome], str] = {}  # each counted posting's client, until released
        self._throttle_logged_s: dict[str, float] = {}
        # Where the pool connects, for the readiness probe's own connection and for re-reading a rotated
        # password after a refused login (None: a pool handed in by a test or a benchmark).
        self._endpoint = endpoint
        self._database = database
        self._probe: asyncpg.Connection | None = None
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(
            maxsize=limits.POSTING_QUEUE_DEPTH_MAX
        )
        self._workers = [asyncio.create_task(self._work(), name=f"post-{name}-{i}") for i in range(workers)]
        # Postings retried alone after leaving their batch; each holds a connection while it waits for a lock.
        self._alone = asyncio.Semaphore(limits.POSTING_ALONE_CONCURRENCY_MAX)
        self._alone_tasks: set[asyncio.Task[None]] = set()
        self._alone_futures: set[asyncio.Future[Outcome]] = set()  # postings a retry-alone task answers
        self._busy_until: dict[str, float] = {}  # account -> monotonic time it is known busy until
        # The saga's single messages applied here (the fast path's, a lone redelivery), grouped (app/store/grouped.py).
        self._apply_grouped: Grouped[dict[str, Any], dict[str, Any]] = Grouped(
            f"saga-apply-{name}", self.saga_apply, self.saga_apply_isolated,
            batch_max=limits.SAGA_GROUPED_MESSAGES_MAX, waiting_max=limits.SAGA_GROUPED_WAITING_MAX,
        )

    async def close(self) -> None:
        tasks = [*self._workers, *self._alone_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._apply_grouped.close()
        if self._probe is not None:
            self._probe.terminate()
        await self.pool.close()

    # Writes -----------------------------------------------------------------------------------------

    async def post(self, posting: Posting) -> Outcome:
        """Queue a posting for the next group commit and wait for its own outcome. A client with
        `client_postings_max` postings already queued or in commit here is refused (TenantQueueFull)."""
        client = posting.client
        telemetry.annotate(shard=self.name)
        queued = self._queued_by_client.get(client, 0)
        if queued >= self.client_postings_max:
            self._log_throttled(client)
            raise TenantQueueFull(self.name, client, self.client_postings_max)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((posting.as_json(), future, telemetry.current_span_context()))
        except asyncio.QueueFull:
            raise QueueFull(self.name) from None
        self._queued_by_client[client] = queued + 1
        self._share_of[future] = client
        # Released when the posting's outcome is known, not when its request goes away: shielded, the
        # future lives on if the request is cancelled, so the count follows what really occupies the queue.
        # A future cancelled at its answer's deadline (`_outcome`) may still be in commit: the worker (or
        # the retry-alone task) releases it once the posting has left the queue and the database.
        future.add_done_callback(self._release_answered)
        return await self._outcome(future)

    def _release_answered(self, future: asyncio.Future[Outcome]) -> None:
        if not future.cancelled():
            self._release(future)

    def _release(self, future: asyncio.Future[Outcome]) -> None:
        """Give back the posting's place in its client's share; idempotent (several paths may end it)."""
        client = self._share_of.pop(future, None)
        if client is None:
            return
        left = self._queued_by_client[client] - 1
        if left:
            self._queued_by_client[client] = left
        else:
            del self._queued_by_client[client]

    def _log_throttled(self, client: str) -> None:
        """Name the throttled client in the log at most every RATE_LIMIT_LOG_INTERVAL_S (not per refusal)."""
        now = time.monotonic()
        last_s = self._throttle_logged_s.get(client)
        if last_s is not None and now - last_s < limits.RATE_LIMIT_LOG_INTERVAL_S:
            return
        if len(self._throttle_logged_s) >= limits.RATE_LIMIT_LOGGED_CLIENTS_MAX:
            self._throttle_logged_s.clear()  # bounded; at worst a client is logged again sooner
        self._throttle_logged_s[client] = now
        log.warning("client_throttled", extra={"shard": self.name, "client": client, "limit": "shard_queue"})

    async def post_exclusive(self, posting: Posting) -> Outcome:
        """Post one posting in a transaction of its own (not group commit): a posting whose reference is declared
        unique is checked and posted under its account's lock (migration 0010). An account locked longer than
        BATCH_LOCK_WAIT_MS answers `AccountBusy`, unless the key already has its outcome (then that, replayed)."""
        telemetry.annotate(shard=self.name)
        item = _with_trace(posting.as_json(), telemetry.current_span_context())
        results = await self._call(
            "post_exclusive", "select txr_post_together($1::jsonb, $2)", [item], limits.BATCH_LOCK_WAIT_MS
        )
        if isinstance(results, dict) and results.get("busy"):
            return await self._busy_outcome(item, _accounts_of([item]))
        return Outcome.from_json(results[0])

    async def post_atomic(self, client: str, key: str, fingerprint: str, items: list[Posting]) -> Outcome:
        """An atomic batch (DESIGN D15): every posting in one transaction or none, one idempotent outcome under
        the batch's key. An account locked longer than BATCH_LOCK_WAIT_MS answers `AccountBusy` (nothing posted,
        nothing stored) unless the batch's key already has its outcome."""
        telemetry.annotate(shard=self.name)
        postings = [p.as_json() for p in items]
        doc = await self._call_long(
            "post_atomic", "select txr_post_atomic($1, $2, $3, $4::jsonb, $5)",
            client, key, fingerprint, postings, limits.BATCH_LOCK_WAIT_MS,
            timeout_ms=limits.BATCH_STATEMENT_TIMEOUT_MS, batch_size=len(items), discard=_transient_refusal,
        )
        if doc.get("busy"):
            return await self._busy_outcome({"client": client, "key": key, "fingerprint": fingerprint},
                                            _accounts_of(postings))
        transient = _transient_refusal(doc)
        if transient is not None:
            # Rolled back, not stored: answered as the single posting would be (a retry can succeed).
            index, item = transient
            body = {"code": item["code"], "detail": f"item {index}: {item['detail']}", "index": index}
            if item["code"] == "misdirected":
                body["slot"] = items[index].slot
            return Outcome(int(item["status"]), body)
        return Outcome.from_json(doc)

    async def claim_batch(self, client: str, key: str, slot: int, fingerprint: str) -> Outcome:
        """Bind a batch's key to its body at the key's home slot (migration 0040): 200 when the key is new here
        or was claimed by the same body (replayed), `422 idempotency_key_reused` for another body, `409
        idempotency_key_in_flight`, or the slot's 421/503 when this shard does not own it (nothing written)."""
        telemetry.annotate(shard=self.name)
        return Outcome.from_json(await self._call(
            "batch_claim", "select txr_batch_claim($1, $2, $3, $4)", client, key, slot, fingerprint))

    async def _busy_outcome(self, item: dict[str, Any], accounts: list[str]) -> Outcome:
        """The stored outcome of a key whose posting found an account busy: never "nothing was posted" for a
        request that did post (its first answer lost, say to a timeout); a retry gets its stored answer,
        replayed, as any retry does. With none stored, `SlotMoved` when one of the posting's accounts is in a
        range a move has frozen (the switch holds the range's accounts while it books them out, issue 11: the
        client is held by its router and retried, as for any posting under the freeze), else `AccountBusy`.
        Either way nothing was posted and nothing stored, so a retry can succeed."""
        prior = await self._fetchval(
            "idempotency_check", "select txr_idempotency_check($1, $2, $3)",
            item["client"], item["key"], item["fingerprint"],
        )
        if prior is not None:
            return Outcome.from_json(prior)
        moving = await self._fetchval(
            "accounts_moving",
            """select exists (select 1 from accounts a join slot_ownership o on a.slot between o.slot_lo and o.slot_hi
                              where a.id = any($1::text[]) and a.kind = 'customer'
                                and o.state in ('moving', 'moved'))""",
            accounts,
        )
        raise SlotMoved(self.name) if moving else AccountBusy(self.name)

    async def open_account(self, request: dict[str, Any]) -> Outcome:
        doc = await self._call("open_account", "select txr_open_account($1::jsonb)", request)
        return Outcome.from_json(doc)

    # Holds and closing (DESIGN D14, issue 12) --------------------------------------------------------------
    # Not group-committed: each locks the hold's transfer row before its accounts (migration 0009), which the
    # batch's one ordered pass over accounts does not do. A lock still held past the pool's lock_timeout
    # answers 503 (ShardUnavailable): nothing was written, and a retry with the same key is safe.

    async def hold_of(self, transfer_id: str, client: str) -> asyncpg.Record | None:
        """The accounts of a hold, to find where its capture's credit lives (None: no such transfer)."""
        rows = await self._fetch(
            "hold_of", "select kind, credit_account, currency from transfers where id = $1 and client = $2",
            transfer_id, client,
        )
        return rows[0] if rows else None

    async def capture(self, request: dict[str, Any]) -> Outcome:
        return Outcome.from_json(await self._call("capture", "select txr_hold_capture($1::jsonb)", request))

    async def void(self, request: dict[str, Any]) -> Outcome:
        return Outcome.from_json(await self._call("void", "select txr_hold_void($1::jsonb)", request))

    async def close_account(self, request: dict[str, Any]) -> Outcome:
        return Outcome.from_json(await self._call("close_account", "select txr_close_account($1::jsonb)", request))

    async def expire_holds(self, *, limit: int) -> int:
        """Record `expired` for at most `limit` holds whose time has come; returns how many."""
        return int(await self._call("expire_holds", "select txr_holds_expire($1)", limit))

    # Saga (DESIGN D6) -------------------------------------------------------------------------------

    async def saga_apply(self, message: dict[str, Any], **span: Any) -> dict[str, Any]:
        """Apply a saga message addressed to this shard, once; a duplicate reads the first outcome."""
        return dict(await self._call("saga_apply", "select txr_saga_apply($1::jsonb)", message, **span))

    async def saga_apply_own(self, message: dict[str, Any]) -> dict[str, Any]:
        """Apply, once, a saga debited here whose credit slot has since moved here (migration 0008)."""
        return dict(await self._call("saga_apply_own", "select txr_saga_apply_own($1::jsonb)", message))

    async def saga_settle(self, transfer_id: str, outcome: str, reason: str | None) -> dict[str, Any]:
        """Post or return a pending transfer on the destination's answer; returns the transfer's body."""
        async with self._connection("saga_settle") as conn:
            body = await conn.fetchval("select txr_saga_settle($1, $2, $3)", transfer_id, outcome, reason)
        return dict(body)

    async def saga_apply_one(self, message: dict[str, Any]) -> dict[str, Any]:
        """`saga_apply`, in one transaction with the other messages applied here at the same time (the fast
        path's, one per cross-shard transfer): what `saga_apply` answers, or raises, for this message."""
        try:
            return await self._apply_grouped(message)
        except GroupFull as exc:
            raise ShardUnavailable(f"shard {self.name}: {exc}") from None

    async def saga_apply_isolated(
        self, messages: list[dict[str, Any]], **span: Any
    ) -> list[dict[str, Any] | Exception]:
        """`saga_apply_batch`, isolating any message that fails (`isolated`); a lost database is raised."""
        return await isolated(functools.partial(self.saga_apply_batch, **span), messages, split_on=_SPLIT_ON)

    async def saga_settle_isolated(self, answers: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """`saga_settle_batch`, isolating any answer that fails (`isolated`); a lost database is raised."""
        return await isolated(self.saga_settle_batch, answers, split_on=_SPLIT_ON)

    async def saga_apply_batch(self, messages: list[dict[str, Any]], **span: Any) -> list[dict[str, Any]]:
        """Apply many saga messages addressed to this shard in one transaction (migration 0017): one result
        per message, in order, each what `saga_apply` would answer. A message that fails (a bug) fails the
        whole call: the caller splits the batch to find it."""
        results = await self._call("saga_apply", "select txr_saga_apply_batch($1::jsonb)", messages,
                                   batch_size=len(messages), **span)
        assert len(results) == len(messages), (len(results), len(messages))
        return [dict(result) for result in results]

    async def saga_settle_batch(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Settle many sagas debited here in one transaction (migration 0017); `answers` are
        {"transfer_id", "outcome", "reason"}; returns each transfer's body, in order."""
        bodies = await self._call("saga_settle", "select txr_saga_settle_batch($1::jsonb)", answers,
                                  batch_size=len(answers))
        assert len(bodies) == len(answers), (len(bodies), len(answers))
        return [dict(body) for body in bodies]

    async def outbox_claim(self, room: dict[str, int], *, lease_ms: int) -> list[asyncpg.Record]:
        """Claim due messages, at most `room[region]` for each destination region (issue 10: fair relay)."""
        regions = sorted(room)
        return await self._fetch(
            "outbox_claim", "select * from txr_outbox_claim($1::text[], $2::integer[], $3)",
            regions, [room[r] for r in regions], lease_ms,
        )

    async def outbox_failed(self, transfer_id: str, *, delay_ms: int, error: str, poison: bool) -> bool:
        """Try a message again after `delay_ms`; a `poison` failure counts towards its dead letter (issue 10).
        Returns True when this failure dead-lettered it."""
        return bool(await self._fetchval(
            "outbox_failed", "select txr_outbox_failed($1, $2, $3, $4, $5)",
            transfer_id, delay_ms, error, poison, limits.SAGA_POISON_FAILURES_MAX,
        ))

    async def outbox_readdress(self, transfer_id: str, *, shard: str, region: str) -> None:
        """Send a message's later deliveries to the shard its credit slot moved to (issue 11)."""
        await self._fetchval("outbox_readdress", "select txr_outbox_readdress($1, $2, $3)", transfer_id, shard, region)

    async def outbox_backlog(self) -> dict[str, Any]:
        row = await self._fetchrow(
            "outbox_backlog",
            """select count(*) as pending,
                      coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0)::float as oldest_s
               from outbox where delivered_at is null and dead_lettered_at is null"""
        )
        return dict(row)

    # Events and webhooks (DESIGN D16, migration 0011) ----------------------------------------------

    async def events_page(
        self, client: str, position: str | None, types: list[str] | None, limit: int,
        *, since: datetime.datetime | None = None,
    ) -> EventsRead:
        """The client's events after `position` ("xid.seq"), in (xid, seq) order, at most `limit`: only those
        whose transaction ended before this statement's snapshot, so none can later appear before them.

        With `types`, at most EVENTS_FEED_SCAN_ROWS_MAX of the client's events are read past the position
        (index events_feed), and the answer says how far (`scanned`): the events skipped there are of other types
        and final, so a reader of this filter moves its position there even when none matched, and a rare type
        costs a bounded read per page instead of the client's whole retained history on every call.

        `position` None is a stream not read yet: from its beginning, or with `since` (a webhook endpoint's
        creation) from just before the first event created at or after it (`scanned` says where), so a new
        endpoint does not read the client's retained history."""
        started: str | None = None  # where a stream not read yet starts, when `since` placed it
        if position is None and since is not None:
            position = started = await self._events_start(client, since)
        elif position is None:
            position = START_POSITION
        xid, seq = position.split(".")
        scan_max = limit if types is None else max(limit, limits.EVENTS_FEED_SCAN_ROWS_MAX)
        rows = await self._fetch(
            "events_page",
            """with scanned as materialized (
                   select xid, seq, id, type, client, slot, data, created_at from events
                   where client = $1 and (xid, seq) > ($2::text::xid8, $3::bigint)
                     and xid < pg_snapshot_xmin(pg_current_snapshot())
                   order by xid, seq
                   limit $6)
               select * from (
                   select xid::text || '.' || seq as position, id, type, client, slot, data,
                          txr_ts(created_at) as created_at, null::bigint as scanned_rows
                   from scanned where $4::text[] is null or type = any($4::text[])
                   order by xid, seq limit $5) matched
               union all
               select * from (
                   select xid::text || '.' || seq, null::text, null::text, null::text, null::integer,
                          null::jsonb, null::text,
                          (select count(*) from scanned)
                   from scanned order by xid desc, seq desc limit 1) tail""",
            client, xid, int(seq), types, limit, scan_max,
        )
        items = sorted(
            ((r["position"], {"id": r["id"], "type": r["type"], "created_at": r["created_at"], "client": r["client"],
                              "slot": r["slot"], "data": r["data"]})
             for r in rows if r["scanned_rows"] is None),
            key=lambda item: tuple(int(part) for part in item[0].split(".")),
        )
        tail = next((r for r in rows if r["scanned_rows"] is not None), None)
        if len(items) == limit:
            return EventsRead(items, None, True)
        if tail is None:
            return EventsRead(items, started, False)
        return EventsRead(items, tail["position"], tail["scanned_rows"] == scan_max)

    async def _events_start(self, client: str, since: datetime.datetime) -> str:
        """Where a stream not read yet starts for events created at or after `since`: just before the first
        visible one, else at the snapshot's xmin (every later event's transaction id is at least that). Read by
        creation time (index events_created), so the cost is the shard's events since `since`, not the client's
        history. Events before `since` that still follow this position are left to the reader to drop."""
        position: str = await self._fetchval(
            "events_start",
            """with recent as materialized (
                   select xid, seq, client from events where created_at >= $2)
               select coalesce(
                   (select xid::text || '.' || (seq - 1) from recent
                    where client = $1 and xid < pg_snapshot_xmin(pg_current_snapshot())
                    order by xid, seq limit 1),
                   pg_snapshot_xmin(pg_current_snapshot())::text || '.0')""",
            client, since,
        )
        return position

    async def events_cleanup(self, before_s: float, *, limit: int) -> int:
        """Delete at most `limit` events older than `before_s` seconds (retention); returns how many."""
        return int(await self._fetchval(
            "events_cleanup",
            "select txr_events_cleanup(clock_timestamp() - make_interval(secs => $1), $2)", before_s, limit,
        ))

    async def webhook_observe(self) -> tuple[list[asyncpg.Record], int]:
        """Per enabled endpoint homed here, the age of its oldest undelivered event (0: none); and how many
        endpoints are disabled."""
        rows = await self._fetch(
            "webhook_observe",
            """select w.id, w.state,
                      coalesce(extract(epoch from clock_timestamp() - min(d.event_created_at)), 0)::float as age_s
               from webhook_endpoints w
               left join webhook_deliveries d on d.endpoint_id = w.id and d.state = 'pending'
               group by w.id, w.state""",
        )
        return [r for r in rows if r["state"] == "enabled"], sum(1 for r in rows if r["state"] == "disabled")

    async def webhook_call(self, op: str, sql: str, *args: Any) -> Any:
        """One webhook function's round trip (app/events/webhooks.py names the SQL)."""
        return await self._fetchval(op, sql, *args)

    async def webhook_rows(self, op: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._fetch(op, sql, *args)

    async def observe(self) -> dict[str, Any]:
        """One round trip for the metrics: the saga backlog and its oldest message's age (DESIGN D6), the
        dead letters, how close the fullest system account is to its bound (issue 10), and the last audit
        `txroute audit` recorded here (audit_clean is None when none was)."""
        row = await self._fetchrow(
            "observe",
            """select o.pending, o.oldest_s, d.dead_letters, s.system_abs_max,
                      a.clean as audit_clean, extract(epoch from a.finished_at)::float as audit_at
               from (select count(*) as pending,
                            coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0)::float as oldest_s
                     from outbox where delivered_at is null and dead_lettered_at is null) o
               cross join (select count(*) as dead_letters from outbox
                           where dead_lettered_at is not null and delivered_at is null) d
               cross join (select coalesce(max(abs(balance)), 0) as system_abs_max from accounts
                           where kind <> 'customer') s
               left join lateral (select clean, finished_at from audit_runs order by id desc limit 1) a on true""",
        )
        return dict(row)

    async def observe_moves(self, *, ended_since: datetime.datetime) -> dict[str, Any]:
        """One round trip for the slot-move metrics (DESIGN D13) of the moves leaving this shard (its
        `slot_moves` rows with role `source`, at most one unfinished by a unique index): the unfinished one's
        phase, how long it has been in it (since `frozen_at` while frozen or switching: the write freeze; else
        since its last recorded progress), rows copied and changes not yet applied to the target; and the
        freezes that ended since `ended_since` (at most MOVE_FREEZES_OBSERVED_MAX, newest first)."""
        async with self._connection("observe_moves") as conn:
            active = await conn.fetchrow(
                """select m.id, m.phase, m.rows_copied,
                          extract(epoch from clock_timestamp()
                                  - case when m.phase in ('frozen', 'switching') then m.frozen_at
                                         else m.updated_at end)::float as phase_age_s,
                          (select count(*) from slot_move_changes c
                           where c.move_id = m.id and c.id > m.log_cursor) as lag
                   from slot_moves m
                   where m.role = 'source' and m.phase in ('copying', 'catching_up', 'frozen', 'switching')
                   order by m.created_at limit 1""")
            freezes = await conn.fetch(
                """select id, extract(epoch from coalesce(switched_at, updated_at) - frozen_at)::float as freeze_s
                   from slot_moves
                   where role = 'source' and frozen_at is not null
                     and phase in ('switched', 'done', 'cancelled', 'aborted')
                     and coalesce(switched_at, updated_at) >= $1
                   order by coalesce(switched_at, updated_at) desc limit $2""",
                ended_since, limits.MOVE_FREEZES_OBSERVED_MAX)
        return {"active": dict(active) if active is not None else None,
                "freezes": [(r["id"], r["freeze_s"]) for r in freezes]}

    async def _outcome(self, future: asyncio.Future[Outcome]) -> Outcome:
        """Wait for a queued posting's outcome, at most POSTING_ANSWER_TIMEOUT_S. On timeout the future is
        cancelled: a worker that has not sent it yet drops it; one that has may still commit it, so the
        outcome is unknown and the client retries with the same key (it replays if the posting committed)."""
        # Its request may go away first (the future is shielded from that): its error is then read here, so
        # asyncio does not report it as never retrieved.
        future.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limits.POSTING_ANSWER_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise ShardUnavailable(
                f"shard {self.name}: no outcome within {limits.POSTING_ANSWER_TIMEOUT_S} s"
            ) from None

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < limits.POSTING_BATCH_SIZE_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # A waiter that went away (cancelled, or past its deadline) got no answer: its posting is not sent.
            for _, future, _ in batch:
                if future.cancelled():
                    self._release(future)
            batch = [queued for queued in batch if not queued[1].done()]
            if not batch:
                continue
            try:
                await self._post_batch(batch)
            except Exception as exc:  # a worker outlives any failure; each waiter still gets one
                log.error("posting_worker_error", extra={"shard": self.name, "error_type": type(exc).__name__})
                for _, future, _ in batch:
                    _fail(future, ShardUnavailable(f"shard {self.name}: {type(exc).__name__}"))
            finally:
                # Postings whose deadline passed while in commit leave the database only now.
                for _, future, _ in batch:
                    if future.cancelled() and future not in self._alone_futures:
                        self._release(future)

    async def _post_batch(self, batch: list[_Queued]) -> None:
        # The round trip belongs to the first request's trace; the others' spans are linked to it.
        spans = [span for _, _, span in batch if span is not None]
        try:
            results = await self._call(
                "post", "select txr_post($1::jsonb, $2, $3)", [_with_trace(item, span) for item, _, span in batch],
                limits.POSTING_LOCK_WAIT_MS, limits.POSTING_BATCH_LOCK_PATIENCE_MS,
                parent=spans[0] if spans else None, links=spans[1:], batch_size=len(batch),
            )
        except ShardUnavailable as exc:
            for _, future, _ in batch:
                _fail(future, ShardUnavailable(str(exc)))
            return
        except (SlotMoved, asyncpg.PostgresError) as exc:
            # The whole transaction was rolled back for one posting: it met the moved-account fence (a region's
            # map stale right after a switch: 503 slot_moving), or it broke an invariant (a bug). Post each
            # alone so only it fails.
            if len(batch) > 1:
                if isinstance(exc, SlotMoved):
                    log.warning("batch_fenced_splitting", extra={"shard": self.name, "batch_size": len(batch)})
                else:
                    log.error("batch_failed_splitting", extra={"shard": self.name, "sqlstate": exc.sqlstate})
                for one in batch:
                    await self._post_batch([one])
                return
            _fail(batch[0][1], exc)
            return
        assert len(results) == len(batch), (len(results), len(batch))
        for (item, future, span), result in zip(batch, results, strict=True):
            if future.done():
                continue
            outcome = Outcome.from_json(result)
            if outcome.busy:
                # Retried by a task of its own, so a stuck account never holds up a worker (or other batches).
                account = str(result.get("busy_account", ""))
                self._alone_futures.add(future)
                task = asyncio.create_task(
                    self._post_alone(item, future, span, account), name=f"post-alone-{self.name}"
                )
                self._alone_tasks.add(task)
                task.add_done_callback(self._alone_tasks.discard)
            else:
                future.set_result(outcome)

    async def _post_alone(
        self, item: dict[str, Any], future: asyncio.Future[Outcome], span: SpanContext | None, account: str
    ) -> None:
        """Retry a posting that left its batch, alone, waiting up to POSTING_ALONE_LOCK_PATIENCE_MS for its busy
        account (holding no other lock meanwhile). Still blocked, its waiter gets `AccountBusy`, and so do, at
        once, the next postings for that account for ACCOUNT_BUSY_REMEMBERED_MS: a stuck account then costs
        one retry slot, not all of them, and postings that only met a briefly held row keep their retry."""
        try:
            await self._post_alone_once(item, future, span, account)
        finally:
            self._alone_futures.discard(future)
            if future.cancelled():  # past its deadline while retried: it has left the database only now
                self._release(future)

    async def _post_alone_once(
        self, item: dict[str, Any], future: asyncio.Future[Outcome], span: SpanContext | None, account: str
    ) -> None:
        if self._known_busy(account):
            await self._answer_busy(item, future)
            return
        try:
            async with asyncio.timeout(limits.POSTING_ALONE_QUEUE_WAIT_MS / 1000):
                await self._alone.acquire()
        except TimeoutError:
            await self._answer_busy(item, future)
            return
        try:
            if future.done():
                return
            if self._known_busy(account):
                await self._answer_busy(item, future)
                return
            results = await self._call(
                "post_alone", "select txr_post($1::jsonb, $2, $3)", [_with_trace(item, span)],
                limits.POSTING_LOCK_WAIT_MS, limits.POSTING_ALONE_LOCK_PATIENCE_MS, parent=span, batch_size=1,
            )
            outcome = Outcome.from_json(results[0])
            if outcome.busy:
                self._remember_busy(str(results[0].get("busy_account", account)))
                await self._answer_busy(item, future)
            elif not future.done():
                future.set_result(outcome)
        except asyncpg.PostgresError as exc:
            _fail(future, SlotMoved(self.name) if exc.sqlstate == _SLOT_MOVED else exc)
        except Exception as exc:  # ShardUnavailable, or a bug: its waiter gets it, nobody else
            _fail(future, exc)
        finally:
            self._alone.release()

    async def _answer_busy(self, item: dict[str, Any], future: asyncio.Future[Outcome]) -> None:
        """Answer a posting that could not take its account's lock (`_busy_outcome`)."""
        if future.done():
            return
        try:
            outcome = await self._busy_outcome(item, _accounts_of([item]))
        except Exception as exc:  # AccountBusy, SlotMoved; ShardUnavailable or a bug: the outcome is unknown
            _fail(future, exc)
            return
        if not future.done():
            future.set_result(outcome)

    def _known_busy(self, account: str) -> bool:
        until = self._busy_until.get(account)
        return until is not None and time.monotonic() < until

    def _remember_busy(self, account: str) -> None:
        if len(self._busy_until) >= limits.ACCOUNTS_BUSY_REMEMBERED_MAX:
            self._busy_until.clear()  # bounded; at worst an account is retried alone once more
        self._busy_until[account] = time.monotonic() + limits.ACCOUNT_BUSY_REMEMBERED_MS / 1000

    async def _call(self, op: str, sql: str, *args: Any, **span: Any) -> Any:
        """One round trip, retried on serialization failure or deadlock (never surfaced to a client). The
        moved-account fence (SQLSTATE TXR02) is `SlotMoved` here as in group commit: a unique-reference posting,
        a capture or an atomic batch crediting an account whose slot was just switched away wrote nothing."""
        for attempt in range(1, limits.POSTING_RETRIES_MAX + 1):
            try:
                return await self._fetchval(op, sql, *args, **span)
            except _RETRYABLE:
                if attempt == limits.POSTING_RETRIES_MAX:
                    raise
                await asyncio.sleep(limits.POSTING_RETRY_BACKOFF_MS * attempt / 1000)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == _SLOT_MOVED:
                    raise SlotMoved(self.name) from None
                raise
        raise AssertionError("unreachable")

    async def _call_long(
        self, op: str, sql: str, *args: Any, timeout_ms: int, discard: Callable[[Any], object] | None = None,
        **span: Any,
    ) -> Any:
        """`_call` for one statement allowed `timeout_ms` instead of the pool's statement timeout (set for its
        own transaction only): an atomic batch of 1,000 postings is one statement. A result that `discard` finds
        truthy is returned, but its transaction rolled back (nothing it wrote is kept)."""
        for attempt in range(1, limits.POSTING_RETRIES_MAX + 1):
            try:
                async with self._connection(op, **span) as conn, conn.transaction():
                    await conn.execute(f"set local statement_timeout = {int(timeout_ms)}")
                    result = await conn.fetchval(sql, *args, timeout=timeout_ms / 1000 + 1)
                    if discard is not None and discard(result):
                        raise _Discarded(result)
                    return result
            except _Discarded as discarded:
                return discarded.result
            except _RETRYABLE:
                if attempt == limits.POSTING_RETRIES_MAX:
                    raise
                await asyncio.sleep(limits.POSTING_RETRY_BACKOFF_MS * attempt / 1000)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == _SLOT_MOVED:
                    raise SlotMoved(self.name) from None
                raise
        raise AssertionError("unreachable")

    # Reads ------------------------------------------------------------------------------------------

    async def owns(self, slot: int) -> bool:
        return bool(await self._fetchval("owns", "select txr_owns($1)", slot))

    async def get_account(self, account_id: str, client: str, slot: int) -> Outcome:
        row = await self._fetchrow(
            "get_account",
            """select o.owned, case when not o.owned then txr_misdirected($3) end as refusal,
                      (select txr_account_body(a) from accounts a
                       where a.id = $1 and a.owner_client = $2 and a.kind = 'customer') as body
               from (select txr_owns($3) as owned) o""",
            account_id, client, slot,
        )
        return self._read_outcome(row, slot, "account_not_found", f"account {account_id} was not found")

    async def get_transfer(self, transfer_id: str, client: str, slot: int) -> Outcome:
        row = await self._fetchrow(
            "get_transfer",
            """select o.owned, case when not o.owned then txr_misdirected($3) end as refusal,
                      (select txr_transfer_body(t) || jsonb_build_object('history', coalesce(
                                  (select jsonb_agg(jsonb_build_object('state', e.state, 'reason', e.reason,
                                                                       'at', txr_ts(e.at)) order by e.seq)
                                   from transfer_events e where e.transfer_id = t.id),
                                  jsonb_build_array(jsonb_build_object('state', t.state, 'reason', t.reason,
                                                                       'at', txr_ts(t.created_at)))))
                       from transfers t where t.id = $1 and t.client = $2) as body
               from (select txr_owns($3) as owned) o""",
            transfer_id, client, slot,
        )
        return self._read_outcome(row, slot, "transfer_not_found", f"transfer {transfer_id} was not found")

    async def get_account_as_of(self, account_id: str, client: str, slot: int, at: datetime.datetime) -> Outcome:
        """The account's balance and held amount at `at`, from its journal, in one statement (AS_OF_SQL)."""
        row = await self._fetchrow(
            "get_account_as_of", AS_OF_SQL, account_id, client, slot, at, limits.HOLD_EXPIRES_IN_S_MAX
        )
        if row["owned"] and row["body"] is not None and row["arrived"] is not None and at < row["arrived"]:
            earliest = utc_text(row["arrived"])
            return Outcome(422, {
                "code": "as_of_before_move", "earliest": earliest,
                "detail": f"account {account_id} arrived on its shard by a slot move at {earliest}; its balance is "
                          f"known here from then on, not before",
            })
        return self._read_outcome(row, slot, "account_not_found", f"account {account_id} was not found")

    async def list_entries(
        self, account_id: str, client: str, slot: int, *, before_id: int | None, limit: int
    ) -> tuple[Outcome, list[dict[str, Any]]]:
        """Entries of one account, newest first, keyset-paginated by entry id (`before_id`)."""
        assert 1 <= limit <= limits.ENTRIES_PAGE_SIZE_MAX
        account = await self.get_account(account_id, client, slot)
        if account.status != 200:
            return account, []
        rows = await self._fetch(
            "list_entries",
            """select id, transfer_id, amount, balance_after, txr_ts(created_at) as created_at
               from entries where account_id = $1 and ($2::bigint is null or id < $2)
               order by id desc limit $3""",
            account_id, before_id, limit,
        )
        return account, [dict(r) for r in rows]

    async def transfers_by_reference(self, client: str, reference: str, *, limit: int) -> list[dict[str, Any]]:
        """The client's transfers with this reference that this shard answers for, newest first: those of the
        slots it owns or has frozen (a transfer id embeds its debit slot, so the owner of that slot answers for the
        transfer and its state, REFERENCE_SQL). A saga's credit-side row (on the credit shard) is of a slot that
        shard does not own; a slot move (migration 0008) leaves the source's rows archived and the target's copies
        are not its own until the switch, and either would list a transfer twice, the archived one in a stale
        state."""
        rows = await self._fetch("transfers_by_reference", REFERENCE_SQL, client, reference, limit)
        return [dict(r) for r in rows]

    async def account_transfers(
        self, account_id: str, client: str, slot: int, page: TransfersQuery
    ) -> tuple[Outcome, list[dict[str, Any]], datetime.datetime | None]:
        """An account's transfers, newest first, keyset-paginated on (created_at, id): one index range scan per
        side (transfers_debit_account, transfers_credit_account), merged. And when the account arrived here by a
        slot move (`arrived_sql`; None if it did not): a transfer into it made before then from an account that did
        not move with it stayed on the shard it left, and is not among these rows."""
        assert 1 <= page.limit <= limits.TRANSFERS_PAGE_SIZE_MAX
        account = await self.get_account(account_id, client, slot)
        if account.status != 200:
            return account, [], None
        sql, args = account_transfers_sql(account_id, client, page)
        rows = await self._fetch("account_transfers", sql, *args)
        arrived = await self._fetch(
            "account_arrived", f"select {arrived_sql('$1', '$2')} as at", account_id, slot)
        return account, [dict(r) for r in rows], arrived[0]["at"]

    async def ready(self) -> bool:
        """Reachable and migrated, asked on a connection of its own (never the pool's, so a busy pool does not
        make a healthy shard look down), within READINESS_CHECK_TIMEOUT_S. The connection is kept between
        checks and opened again after a failure."""
        assert self._endpoint is not None and self._database is not None, "readiness needs the endpoint"
        try:
            async with asyncio.timeout(limits.READINESS_CHECK_TIMEOUT_S):
                if self._probe is None or self._probe.is_closed():
                    self._probe = await self._endpoint.connect(
                        self._database, timeout_s=limits.READINESS_CHECK_TIMEOUT_S,
                        server_settings={**SERVER_SETTINGS, "application_name": "txroute-region-probe"},
                    )
                return await is_migrated(self._probe)
        except (*_UNAVAILABLE, asyncpg.PostgresError):
            if self._probe is not None:
                self._probe.terminate()
                self._probe = None
            return False

    async def slot_claims(self) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "slot_claims",
            """select slot_lo, slot_hi, epoch, state, owner_shard, owner_region
               from slot_ownership order by slot_lo""",
        )
        return [dict(r) for r in rows]

    async def slot_arrivals(self) -> list[tuple[int, int, datetime.datetime]]:
        """The slot ranges that moves switched here from another region, and when (issue 11): this region has
        not owned them all along, so an account opened here earlier may sit at a slot that left meanwhile."""
        rows = await self._fetch(
            "slot_arrivals",
            """select slot_lo, slot_hi, switched_at from slot_moves
               where role = 'target' and phase in ('switched', 'done') and switched_at is not null
                 and source_region <> (select region from shard_info)""",
        )
        return [(int(r["slot_lo"]), int(r["slot_hi"]), r["switched_at"]) for r in rows]

    async def stored_answers(self, client: str, key: str, slots: list[int]) -> list[asyncpg.Record]:
        """For each slot: this shard's claim on it (state, and the owner it moved to) and the answer stored under
        (client, key) at that slot, read in one snapshot. A read: an answer once stored never changes, and a
        frozen slot still holds its records (and takes no new ones) until the switch marks it moved. `free` is
        false while a request with this key is being processed here (it holds the key's lock, as
        txr_idempotency_check takes it): its answer is not stored yet, and the asker answers in flight."""
        return await self._fetch(
            "stored_answers",
            """with k as (select pg_try_advisory_xact_lock(hashtextextended($1::text || chr(31) || $2::text, 7))
                          as free)
               select s.slot, k.free, o.state, o.owner_region, o.owner_shard, i.fingerprint, i.status_code, i.body
               from k, unnest($3::integer[]) as s(slot)
               left join slot_ownership o on s.slot between o.slot_lo and o.slot_hi
               left join idempotency i on i.client = $1 and i.key = $2 and i.slot = s.slot""",
            client, key, slots,
        )

    @staticmethod
    def _read_outcome(row: asyncpg.Record, slot: int, code: str, detail: str) -> Outcome:
        if not row["owned"]:  # 421 (naming the new owner once the slot moved) or 503 slot_moving while frozen
            return Outcome.from_json(row["refusal"])
        if row["body"] is None:
            return Outcome(404, {"code": code, "detail": detail})
        return Outcome(200, row["body"])

    @contextlib.asynccontextmanager
    async def _connection(
        self, op: str, *, parent: SpanContext | None = None, links: list[SpanContext] | None = None,
        batch_size: int | None = None,
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for one round trip named `op` (its span, when tracing: never its SQL)."""
        with telemetry.db_span(op, self.name, parent=parent, links=links or (), batch_size=batch_size):
            try:
                conn = await self._acquire()
                try:
                    yield conn
                finally:
                    await self.pool.release(conn)
            except _UNAVAILABLE as exc:
                raise ShardUnavailable(f"shard {self.name}: {type(exc).__name__}") from None

    async def _acquire(self) -> asyncpg.Connection:
        """A pooled connection. A refused login means the password was rotated: it is read again and the
        login tried once more (app/store/access.py); refused again, the shard is unavailable."""
        for attempt in (1, 2):
            try:
                conn: asyncpg.Connection = await self.pool.acquire(timeout=limits.DB_CONNECT_TIMEOUT_S)
                return conn
            except AUTH_FAILURES as exc:
                log.warning("database_login_refused", extra={"shard": self.name, "error_type": type(exc).__name__})
                password = self._endpoint.password if self._endpoint is not None else None
                if password is None or attempt == 2:
                    raise ShardUnavailable(f"shard {self.name}: login refused") from None
                password.stale()
        raise AssertionError("unreachable")

    async def _fetchval(self, op: str, sql: str, *args: Any, **span: Any) -> Any:
        async with self._connection(op, **span) as conn:
            return await conn.fetchval(sql, *args)

    async def _fetchrow(self, op: str, sql: str, *args: Any) -> asyncpg.Record:
        async with self._connection(op) as conn:
            row = await conn.fetchrow(sql, *args)
        assert row is not None
        return row

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection(op) as conn:
            return list(await conn.fetch(sql, *args))


class _Discarded(Exception):
    """Rolls back the transaction of a result that must not be kept (`_call_long`)."""

    def __init__(self, result: Any) -> None:
        self.result = result


# Item outcomes that are never an idempotent answer (the single-request path stores none of them): the slot is
# not (or no longer) this shard's, frozen by a move, a system account is at its bound, or the item's key is in
# flight in another request (its answer is that request's to store). An atomic batch with
# one of them is rolled back whole, its refusal included, and answered with it: a retry can succeed.
_TRANSIENT_ITEM_CODES = frozenset(
    {"misdirected", "slot_moving", "ledger_limit_reached", "idempotency_key_in_flight"}
)


def _transient_refusal(doc: Any) -> tuple[int, dict[str, Any]] | None:
    """(index, item) of the first transient item refusal of an atomic batch's refused outcome, or None."""
    if not isinstance(doc, dict) or doc.get("status") != 422 or doc.get("body", {}).get("code") != "batch_refused":
        return None
    for index, item in enumerate(doc["body"]["items"]):
        if item.get("code") in _TRANSIENT_ITEM_CODES:
            return index, item
    return None


def _retrieve(future: asyncio.Future[Outcome]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(future: asyncio.Future[Outcome], exc: BaseException) -> None:
    """Answer a waiter with an error unless it has its answer already or went away (cancelled)."""
    if not future.done():
        future.set_exception(exc)


def _with_trace(item: dict[str, Any], span: SpanContext | None) -> dict[str, Any]:
    """A saga posting carries its request's trace context into the outbox, so every later delivery of its
    message (the relay's, minutes later) links to the request's trace (issue 10)."""
    if span is None or "transit" not in item:
        return item
    return {**item, "traceparent": telemetry.traceparent(span)}
