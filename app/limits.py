"""Every bound of the system, named in one place, units last (STYLE: TigerBeetle habits).

Settings (`app.config`) may override some of these per deployment; these are the defaults and the hard caps.
"""

from __future__ import annotations

# Money (DESIGN D3): every JSON client reads integers up to 2^53-1 exactly.
AMOUNT_MINOR_MAX = 2**53 - 1
# Settlement and transit accounts (one row per shard and currency) stay within +-this (half of bigint, so no
# posting of at most AMOUNT_MINOR_MAX can overflow); migration 0006 holds the same bound.
SYSTEM_ACCOUNT_BALANCE_ABS_MAX = 2**62
OVERDRAFT_LIMIT_MINOR_MAX = 2**53 - 1

# Request bodies and fields.
REQUEST_BODY_BYTES_MAX = 16 * 1024
REFERENCE_CHARS_MAX = 140
IDEMPOTENCY_KEY_CHARS_MAX = 128
CLIENT_ID_CHARS_MAX = 64
# Metadata on accounts and transfers (issue 12): a few labels, not a document store. Migration 0009 holds the
# same bounds (txr_metadata_ok).
METADATA_KEYS_MAX = 20
METADATA_KEY_CHARS_MAX = 40
METADATA_VALUE_CHARS_MAX = 500

# Holds (DESIGN D14): a hold lives at most a week (card authorisations last days, not months).
HOLD_EXPIRES_IN_S_MAX = 604_800
# The sweeper records `expired` for holds whose time has come (their expiry has taken effect already): per shard,
# at most this many per transaction, looking again after this pause when a round found fewer.
HOLD_SWEEP_BATCH_MAX = 500
HOLD_SWEEP_INTERVAL_MS = 1_000

# Pagination.
ENTRIES_PAGE_SIZE_DEFAULT = 50
ENTRIES_PAGE_SIZE_MAX = 200
# An account's transfers (GET /v1/accounts/{id}/transfers) and a reference lookup (GET /v1/transfers?reference=).
TRANSFERS_PAGE_SIZE_DEFAULT = 50
TRANSFERS_PAGE_SIZE_MAX = 100

# Batches (POST /v1/batches, DESIGN D15). A batch body may be larger than any other request's: about 350
# bytes per item at most (two ids, an amount, a 140-character reference, an item key), for 1,000 items.
BATCH_ITEMS_MAX = 1_000
BATCH_BODY_BYTES_MAX = 512 * 1024
# A non-atomic batch's items of one region are posted through the shard's group-commit queue, at most this
# many at once (well inside one client's share of a shard queue, TENANT_QUEUE_POSTINGS_MAX).
BATCH_ITEMS_IN_FLIGHT_MAX = 64
# An atomic batch (or a posting with a unique reference) locks its accounts in its own transaction, waiting at
# most this long for each; an account still locked answers 409 account_busy (nothing posted, nothing stored).
BATCH_LOCK_WAIT_MS = 1_000
# An atomic batch is one statement, allowed this long instead of DB_STATEMENT_TIMEOUT_MS. Measured in SQL alone
# on the shared 2-core machine: 100 postings 1-2 s; 1,000 postings 8-12 s at load average ~7, 17-31 s at ~15-20
# (then 503 shard_unavailable, nothing posted). Below UPSTREAM_READ_TIMEOUT_S, so the region answers first.
BATCH_STATEMENT_TIMEOUT_MS = 14_000
# The router's fan-out of a reference lookup to every region: each region's answer waited for this long; a
# region that does not answer in time is named in the answer's `unavailable_regions`.
LOOKUP_FANOUT_TIMEOUT_S = 2.0

# Database pools, per shard, per regional process.
DB_POOL_SIZE_MAX = 8
DB_CONNECT_TIMEOUT_S = 5.0
DB_COMMAND_TIMEOUT_S = 10.0
DB_STATEMENT_TIMEOUT_MS = 5_000
DB_LOCK_TIMEOUT_MS = 2_000

# Group commit (DESIGN D11): postings queued for one shard are sent together, at most this many per call.
POSTING_BATCH_SIZE_MAX = 64
# Tasks per shard that each take whatever is queued and post it in one call. Fewer workers than clients is
# what lets batches form under load; the rest of the pool serves reads.
POSTING_WORKERS = 4
POSTING_QUEUE_DEPTH_MAX = 4_096
# One client's postings queued or being committed on one shard (per regional process): beyond it that client
# is answered 429 `rate_limited` (limit `shard_queue`) and every other client still finds room in the queue.
# Settable per deployment (TXROUTE_TENANT_QUEUE_POSTINGS_MAX) up to the whole queue.
TENANT_QUEUE_POSTINGS_MAX = POSTING_QUEUE_DEPTH_MAX // 8
TENANT_QUEUE_RETRY_AFTER_S = 1
# Serialization failures and deadlocks are retried by the server, never surfaced to a client.
POSTING_RETRIES_MAX = 5
POSTING_RETRY_BACKOFF_MS = 5
# Fault isolation (issue 10). A batch's lock pass (accounts in id order) waits this long for one row while
# holding the rows before it; a row still locked then is waited for holding nothing (the pass lets go and
# starts again) for at most the batch's patience; past it the account is busy: the postings that need it
# leave the batch and the rest commits. So one stuck account holds up no other account for long.
POSTING_LOCK_WAIT_MS = 20
POSTING_BATCH_LOCK_PATIENCE_MS = 250
# A posting that left its batch is retried alone with more patience, then answered 409 account_busy with
# Retry-After. At most this many per shard are retried at once (each holds a connection while it waits).
POSTING_ALONE_LOCK_PATIENCE_MS = 1_000
POSTING_ALONE_CONCURRENCY_MAX = 2
# A posting waits at most this long for a free retry slot (below POSTING_ANSWER_TIMEOUT_S less its patience).
POSTING_ALONE_QUEUE_WAIT_MS = 5_000
# An account found still busy by a retry alone is known busy for this long: further postings that leave
# their batch for it are answered account_busy at once, and do not take the retry slots others need.
ACCOUNT_BUSY_REMEMBERED_MS = 1_000
ACCOUNTS_BUSY_REMEMBERED_MAX = 1_024
ACCOUNT_BUSY_RETRY_AFTER_S = 1
# Every request waits at most this long for its posting's outcome (queue, batch, lone retry); then it is
# answered 503 shard_unavailable (outcome unknown: retry with the same Idempotency-Key). Above a batch's
# statement timeout plus a lone retry, below the router's UPSTREAM_READ_TIMEOUT_S so the region answers first.
POSTING_ANSWER_TIMEOUT_S = 12.0

# Local stack.
PROCESS_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0
PG_READY_TIMEOUT_S = 30.0
# `txroute up --ports auto` (app/local/ports.py): ports one call may reserve, and candidates it may try.
PORTS_AUTO_COUNT_MAX = 64
PORTS_AUTO_CANDIDATES_MAX = 2_000

# Client tokens (DESIGN D8), checked by the router.
CLIENT_TOKEN_LEEWAY_S = 5  # clock skew tolerated on `exp` and on an `iat` in the future
CLIENT_TOKEN_CHARS_MAX = 4_096
CLIENT_KEYS_MAX = 16  # configured client key ids, all issuers together
# Longest lifetime (exp - iat) of a client token: the default of TXROUTE_CLIENT_TOKEN_LIFETIME_MAX_S, and the
# most that setting may allow (a leaked token is good for at most this long).
CLIENT_TOKEN_LIFETIME_MAX_S = 24 * 3600
CLIENT_TOKEN_LIFETIME_CAP_S = 7 * 24 * 3600
# Verifying an Ed25519 JWT costs ~250 us here; a verified client token is remembered (its `exp` still checked
# on every use). Bounded, least recently used out first (one OrderedDict move per hit), so a full cache does not
# send every active client through the signature check at once. Revocation bound: an entry lives until its
# token's `exp` (+ CLIENT_TOKEN_LEEWAY_S, as an uncached check allows) and never past its process, whose keys
# are read at start; a key is retired by restarting the process without it (`txroute ops rotate-keys`), so a
# cached verdict outlives a retired key by 0 s (no per-token revocation list: docs/architecture.md, Trust domains).
TOKEN_CACHE_ENTRIES_MAX = 10_000

# Hop tokens (router -> region): one per request, bound to it (method, target, body digest, Idempotency-Key),
# never cached. A token must not expire while its router still waits for the answer (an overloaded region
# would otherwise answer a valid request with 401), so it lives as long as the router's read timeout:
# seconds, and a replay within them can only repeat the identical, idempotent request.
HOP_TOKEN_LIFETIME_S = 15
HOP_TOKEN_LEEWAY_S = 2
# Saga tokens (region -> region): one per delivery attempt, bound to it the same way.
SAGA_TOKEN_LIFETIME_S = 10
SAGA_TOKEN_LEEWAY_S = 2

# Per-client rate limits at the router (app/router/ratelimit.py), per router process: a token bucket per
# verified client id. The defaults are far above what a well-behaved client sends; deployments set their own
# (TXROUTE_CLIENT_RATE_PER_S, TXROUTE_CLIENT_BURST) within the caps.
CLIENT_RATE_PER_S_DEFAULT = 1_000.0
CLIENT_BURST_DEFAULT = 2_000
CLIENT_RATE_PER_S_MAX = 1_000_000.0
CLIENT_BURST_MAX = 1_000_000
# Buckets tracked per router process (about 200 bytes each); the least recently used goes first.
RATE_LIMIT_CLIENTS_MAX = 100_000
# A throttled client is logged (by id) at most this often per process, not once per refusal.
RATE_LIMIT_LOG_INTERVAL_S = 10.0
# A region remembers when it last logged this many throttled clients (then forgets them all at once).
RATE_LIMIT_LOGGED_CLIENTS_MAX = 1_024

# Router -> region forwarding: one pooled client per region.
UPSTREAM_CONNECTIONS_MAX = 256  # per region, per router process
UPSTREAM_KEEPALIVE_S = 15.0  # idle pooled connections are closed after this
UPSTREAM_CONNECT_TIMEOUT_S = 1.0  # includes waiting for a free pooled connection
# An answer from a region (app/api/http1.py): its head, and the whole (a batch of 1,000 items' outcomes, an
# events page and a transfers page are all far below it).
UPSTREAM_RESPONSE_HEAD_BYTES_MAX = 64 * 1024
UPSTREAM_RESPONSE_BYTES_MAX = 32 * 1024 * 1024
UPSTREAM_READ_TIMEOUT_S = 15.0  # above the region's own database timeouts, so the region answers first
assert HOP_TOKEN_LIFETIME_S >= UPSTREAM_READ_TIMEOUT_S, "a hop token outlives its router's wait"
assert BATCH_STATEMENT_TIMEOUT_MS < UPSTREAM_READ_TIMEOUT_S * 1000, "a region answers its atomic batch first"
REGION_UNAVAILABLE_RETRY_AFTER_S = 2
# Shard map refreshes (on 421): at most one in flight, at most one per interval, each call bounded.
SHARDMAP_REFRESH_INTERVAL_S_MIN = 0.5
SHARDMAP_FETCH_TIMEOUT_S = 2.0
READYZ_PROBE_TIMEOUT_S = 0.5
# Draining a region (`txroute ops drain`): routers re-read every region's claims (and drain flag) this
# often, regions re-read their own flag this often, and clients are told to come back after this long.
SHARDMAP_REFRESH_PERIOD_S = 2.0
REGION_DRAIN_POLL_S = 1.0
REGION_DRAINING_RETRY_AFTER_S = 30
# Slot moves (DESIGN D13). While a slot range is frozen for its switch, its region answers 503 slot_moving
# (writing nothing); a router holds such a request and sends it again after a backoff (doubling from MIN to
# MAX) and on every shard map refresh, for at most the hold (settable per router, TXROUTE_SLOT_MOVING_HOLD_S,
# up to the cap), then answers 503 slot_moving with SLOT_MOVING_RETRY_AFTER_S (below) as Retry-After. The cap
# stays well below the hop token's lifetime, and every attempt of a held request carries a token minted for
# it. At most this many requests are held at once per router process (each keeps its body, up to
# REQUEST_BODY_BYTES_MAX); the next is answered 503 slot_moving at once.
SLOT_MOVING_HOLD_S_DEFAULT = 2.0
SLOT_MOVING_HOLD_S_MAX = 10.0
SLOT_MOVING_BACKOFF_MS_MIN = 20
SLOT_MOVING_BACKOFF_MS_MAX = 250
SLOT_MOVING_HELD_REQUESTS_MAX = 4_096
assert SLOT_MOVING_HOLD_S_MAX < HOP_TOKEN_LIFETIME_S, "a held request's token outlives its hold"
# A request the router forwards is retried at most this often, and only when safe (see app.api.upstreams).
UPSTREAM_RETRIES_MAX = 1
QUERY_STRING_BYTES_MAX = 1_024

# Sagas (DESIGN D6). The fast path waits this long for the credit side before answering 202.
SAGA_FAST_PATH_WAIT_MS = 1_000
# The relay leaves a fresh message to the fast path for this long after the commit (wait plus a margin).
SAGA_RELAY_FIRST_DELAY_MS = 1_500
# The relay delivers a credit shard's messages in batches (issue 14): at most this many per call, applied
# there in one transaction and settled here in one; a batch whose encoded body would pass
# SAGA_RELAY_BATCH_BODY_BYTES_MAX is split (a message is at most ~1 KiB: ids, a 140-character reference).
SAGA_RELAY_BATCH_MESSAGES_MAX = 200
SAGA_RELAY_BATCH_BODY_BYTES_MAX = 512 * 1024
# The relay claims and sends per destination region, at most this many messages in flight to each (per
# shard), so one slow region holds up only its own messages (issue 10): two full batches, so one batch is
# applied and settled while the next crosses the WAN.
SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX = 2 * SAGA_RELAY_BATCH_MESSAGES_MAX
# Single saga messages (the fast path's) that arrive at their credit shard while its previous apply is in the
# database are applied together, at most this many per transaction
# (app/store/grouped.py); at most SAGA_GROUPED_WAITING_MAX wait per shard (then 503, or 202 on the fast path).
SAGA_GROUPED_MESSAGES_MAX = 64
SAGA_GROUPED_WAITING_MAX = 4_096
# A message whose delivery fails this many times in a way waiting cannot heal (the credit side refuses it as
# malformed or fails on it, or its answer cannot be settled) is dead-lettered instead of retried forever.
SAGA_POISON_FAILURES_MAX = 5
# A claimed message is not claimed again for this long (another replica, or a crashed delivery).
SAGA_RELAY_LEASE_MS = 10_000
SAGA_RELAY_IDLE_POLL_MS = 100
SAGA_RELAY_BACKOFF_BASE_MS = 100
SAGA_RELAY_BACKOFF_MAX_MS = 10_000
# One delivery's HTTP call to the destination region (a batch's too: its apply is one short transaction).
SAGA_DELIVERY_TIMEOUT_S = 5.0
# Simulated WAN (local stack only).
WAN_LATENCY_MS_MAX = 2_000

# Observability (app/telemetry.py)
# A scrape observes at most this many ended freezes of slot moves per shard (each once per region process,
# which remembers at most MOVE_FREEZES_REMEMBERED_MAX of them, then forgets them all at once).
MOVE_FREEZES_OBSERVED_MAX = 100
MOVE_FREEZES_REMEMBERED_MAX = 10_000
METRICS_DB_TIMEOUT_S = 1.0  # a scrape's outbox and audit read, per shard; a slow shard leaves its gauges stale
SPAN_ATTRIBUTE_CHARS_MAX = 128  # no span attribute value is longer (they carry names and codes, nothing else)
EMF_INTERVAL_S = 60.0  # how often a region or router writes its CloudWatch metrics (embedded metric format)

# Placement of new accounts (app/topology/placement.py): probes of a key's slot sequence before rendezvous
# over the region's owned slots decides. A region owning a third of the slots misses all 64 with
# probability (2/3)^64, about 5e-12; one owning 1/64 of them falls back for about 36% of its keys.
PLACEMENT_PROBES_MAX = 64
# A retried open whose key's probe sequence a slot move touched (issue 11, app/region/service.py) looks for the
# key's first answer along the sequence before it opens: in this region's shards, and in the regions its slots
# moved to. A slot that moved on again is followed at most OPEN_REPLAY_HOPS_MAX times, then the open is answered
# 503 slot_moving (views of a just-switched slot disagree for a moment; routers hold it); each region asked answers
# within OPEN_REPLAY_PEER_TIMEOUT_S, else the open is refused 503 region_unavailable (nothing written, the
# client retries with its key); one call names at most OPEN_REPLAY_SLOTS_PER_CALL_MAX slots (its body stays
# under REQUEST_BODY_BYTES_MAX).
OPEN_REPLAY_HOPS_MAX = 4
OPEN_REPLAY_PEER_TIMEOUT_S = 2.0
OPEN_REPLAY_SLOTS_PER_CALL_MAX = 1_024
# An open whose slot its database says moved after the region placed it (the region's view was a moment
# behind) is placed again, after re-reading ownership, at most this many times in all.
OPEN_PLACEMENT_ATTEMPTS_MAX = 3

# Internal TLS (router -> region, region -> region). The local stack's own CA (app/local/tls.py) and the
# certificate its services serve; both are made again when missing or within the renewal window.
LOCAL_CA_VALIDITY_DAYS = 365
LOCAL_SERVER_CERT_VALIDITY_DAYS = 90
LOCAL_CERT_RENEW_BEFORE_DAYS = 7  # a certificate this close to its end is replaced at the next `txroute up`

# `txroute audit` (app/ops/audit.py). It judges only saga steps older than its watermark, the earliest
# shard clock at its reads minus this margin. The margin must exceed the longest ledger transaction (one
# statement, DB_STATEMENT_TIMEOUT_MS) and the clock skew between shard databases (NTP-synchronised hosts
# stay within milliseconds; the local stack shares one clock), or a saga can be judged half-seen.
AUDIT_WATERMARK_MARGIN_S = 10.0
AUDIT_QUERY_TIMEOUT_S = 900.0  # one shard's reads; a full run over millions of entries takes seconds to minutes
AUDIT_VIOLATIONS_PER_CHECK_MAX = 100  # per shard and check: the report names these, the count says the rest
# Database credentials (app/store/access.py). After a refused login the password is read again (file or
# Secrets Manager), at most this often; each Secrets Manager call is bounded.
DB_PASSWORD_REREAD_INTERVAL_S = 5.0
SECRETS_TIMEOUT_S = 5.0
SECRETS_ATTEMPTS_MAX = 3

# Readiness (`/readyz`, app/region/health.py): each shard is checked on a connection of its own, outside the
# pool (a busy pool never fails it), this often and within this bound; the cached result older than
# READINESS_RESULT_AGE_S_MAX counts as not ready. `/healthz` (liveness) touches no database.
READINESS_CHECK_PERIOD_S = 1.0
READINESS_CHECK_TIMEOUT_S = 2.0
READINESS_RESULT_AGE_S_MAX = 10.0
# Provisioning one region's shards (create, migrate, grant) from the local stack or the tests.
PROVISION_TIMEOUT_S = 120.0

# Slot moves (issue 11, DESIGN D13; app/placement/mover.py).
# A request for a frozen slot is answered 503 slot_moving with this Retry-After (the freeze lasts about a second).
SLOT_MOVING_RETRY_AFTER_S = 1
# Regions re-read their shards' ownership this often (a same-region move is learnt within it; a request that
# meets the database's fence first is refused 421/503 by the database itself, never misapplied).
SLOT_OWNERSHIP_POLL_S = 1.0
# Rows of one per-slot table copied per round trip, during the copy and each catch-up pass.
MOVE_COPY_BATCH_ROWS = 2_000
# The catch-up freezes once the change log holds at most this many unapplied changes, or after this many passes.
MOVE_CATCH_UP_LAG_ROWS_MAX = 500
MOVE_CATCH_UP_PASSES_MAX = 50
# The freeze's UPDATE waits at most this long for the postings already past the ownership fence, then lets go
# and tries again, at most this many times before the move gives up (nothing frozen). Short on purpose: while
# it waits, new postings for the range queue behind it, and a batch that already holds account locks may be among
# them while a posting it blocks holds the row (a cycle PostgreSQL would only break after deadlock_timeout, 1 s,
# with other postings answered account_busy meanwhile). 50 ms breaks any such cycle first.
MOVE_FREEZE_LOCK_TIMEOUT_MS = 50
MOVE_FREEZE_ATTEMPTS_MAX = 200
# Under the freeze, sagas debited from the range must settle before the switch: the mover waits this long for
# them (polling every MOVE_PENDING_SAGAS_POLL_MS), then aborts the move and unfreezes. Their outbox messages are
# made due again every MOVE_PENDING_SAGAS_NUDGE_MS meanwhile: a message that failed a few times waits up to
# SAGA_RELAY_BACKOFF_MAX_MS for its next attempt, as long as the whole wait (seen in a test run at load 10: the
# move aborted with one saga whose credit side had long been reachable again).
MOVE_PENDING_SAGAS_WAIT_S = 10.0
MOVE_PENDING_SAGAS_POLL_MS = 50
MOVE_PENDING_SAGAS_NUDGE_MS = 1_000
# When they do not settle in time, the mover names at most this many of them with their outbox state.
MOVE_PENDING_SAGAS_SHOWN_MAX = 5
# Every statement of the mover, per database.
MOVE_STATEMENT_TIMEOUT_S = 60.0
# A mover's server sessions look this often whether the mover is still there, so a killed mover's statement is
# cancelled and its session (and the move's advisory lock) released within it, even in the middle of a statement.
MOVE_CLIENT_CHECK_INTERVAL_MS = 1_000
# Under the freeze: the last catch-up and the verify of the rows it copied are repeated while the change log is
# not empty after the verify (a write that reached the frozen range), at most this many times, then the move
# aborts (and unfreezes).
MOVE_VERIFY_ROUNDS_MAX = 3
# Before the freeze: the target pre-books the range's balances (migration 0031), then again the differences while
# more than this many accounts changed during a round, at most this many rounds; what changed after the last round
# is booked under the freeze.
MOVE_PREBOOK_CHANGED_TARGET = 250
MOVE_PREBOOK_ROUNDS_MAX = 3
# Accounts per transaction of a move's bookings (the pre-booking, the cleanup's booking out, a cancel's booking
# back: migrations 0032, 0034): a transaction over a whole large range would outlast what the audit's horizon
# assumes of any ledger transaction (migration 0007: two margins, 20 s).
MOVE_BOOKING_CHUNK_ACCOUNTS = 5_000
# Before the freeze, while writes go on: the rows the verify would compare under the freeze (those that differed
# at the pre-verify, and every key the catch-up copied since) are compared again one by one and only those that
# still differ kept, the catch-up's set starting over, while there are more than this many and at most this
# many rounds (Mover._narrow).
MOVE_NARROW_ROWS_TARGET = 250
MOVE_NARROW_ROUNDS_MAX = 3
# Test-only fault injection (app/placement/mover.py FaultPause): the longest a mover waits at a test's pause
# point, and how often it looks whether the test let it go on.
MOVE_FAULT_PAUSE_S_MAX = 600.0
MOVE_FAULT_PAUSE_POLL_MS = 20
# A region asked for a slot it does not know as its own re-reads its shards' ownership at most this often.
SLOT_OWNERSHIP_REFRESH_ON_MISS_MS = 100

# Events and webhooks (DESIGN D16, issue 13).
EVENTS_PAGE_SIZE_DEFAULT = 50
EVENTS_PAGE_SIZE_MAX = 100
EVENT_TYPES_PER_QUERY_MAX = 16  # `types=a,b` of the feed, `event_types` of an endpoint
EVENTS_CURSOR_CHARS_MAX = 800  # an opaque cursor: per-shard positions, base64 JSON (the query string is 1 KiB)
# Events are kept this long (Stripe keeps 30 days); settable per deployment (TXROUTE_EVENTS_RETENTION_DAYS).
EVENTS_RETENTION_DAYS_DEFAULT = 30
EVENTS_RETENTION_DAYS_MAX = 365
EVENTS_CLEANUP_BATCH_MAX = 1_000  # rows one cleanup statement deletes; it runs again while it finds more
EVENTS_CLEANUP_BATCHES_PER_RUN_MAX = 20
EVENTS_CLEANUP_INTERVAL_S = 300.0
EVENTS_FEED_DB_TIMEOUT_S = 5.0  # one shard's page of the feed
# Events one shard's page reads past its position when filtering by type (the rest of the client's events are of
# other types): bounds a page's cost; the cursor moves past what was read even when nothing matched.
EVENTS_FEED_SCAN_ROWS_MAX = 1_000
WEBHOOK_ENDPOINTS_PER_CLIENT_MAX = 16
WEBHOOK_URL_CHARS_MAX = 2_048
WEBHOOK_DESCRIPTION_CHARS_MAX = 256
WEBHOOK_SECRET_BYTES = 32  # `whsec_` + base64 of this many random bytes (Standard Webhooks asks >= 24)
WEBHOOK_SECRET_OVERLAP_S = 24 * 3600  # after a rotation the previous secret signs too, this long
WEBHOOK_TIMEOUT_S = 10.0  # one delivery attempt, connect to last byte of the answer
WEBHOOK_RESPONSE_BYTES_MAX = 4_096  # of a receiver's answer body we read (and drop): a receiver cannot flood us
# Backoff after each failed attempt (then the endpoint is disabled: at most ~3 days of tries), +- jitter.
WEBHOOK_RETRY_SCHEDULE_S = (5, 300, 1_800, 7_200, 18_000, 36_000, 86_400, 86_400, 86_400)
WEBHOOK_RETRY_JITTER_RATIO = 0.1
# So one slow endpoint holds at most this many of the worker's sends (16 slow endpoints fill the worker, as 4 of
# 64 did); at 4 one endpoint's deliveries fell behind 33 transfers/s on the local stack (`txroute bench events`).
WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX = 16
WEBHOOK_IN_FLIGHT_MAX = 256  # per region worker, all endpoints
# Results of attempts written at once by one region worker (through the shards' pools, of DB_POOL_SIZE_MAX each,
# which postings share): a pass of sends ending together queues its writes here, not in front of postings.
WEBHOOK_RECORD_CONCURRENCY_MAX = 2
WEBHOOK_CLAIM_TIMEOUT_S = 5.0  # one shard's claim: a slow shard is skipped for this pass, the others claim on
WEBHOOK_CLAIM_LEASE_MS = 30_000  # a claimed delivery is due again after this (a crash mid-send), > the timeout
WEBHOOK_IDLE_POLL_MS = 200
WEBHOOK_INGEST_PAGE_MAX = 100  # events read from one shard's feed per endpoint per pass
WEBHOOK_PEER_TIMEOUT_S = 5.0  # reading another region's feed for an endpoint
WEBHOOK_DNS_TIMEOUT_S = 5.0
WEBHOOK_DELIVERIES_PAGE_MAX = 100  # GET /v1/webhook-endpoints/{id}/deliveries
