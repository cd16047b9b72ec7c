"""Every bound of the system, named in one place, units last (STYLE: TigerBeetle habits).

Settings (`app.config`) may override some of these per deployment; these are the defaults and the hard caps.
"""

from __future__ import annotations

# Money (DESIGN D3): every JSON client reads integers up to 2^53-1 exactly.
AMOUNT_MINOR_MAX = 2**53 - 1
OVERDRAFT_LIMIT_MINOR_MAX = 2**53 - 1

# Request bodies and fields.
REQUEST_BODY_BYTES_MAX = 16 * 1024
REFERENCE_CHARS_MAX = 140
IDEMPOTENCY_KEY_CHARS_MAX = 128
CLIENT_ID_CHARS_MAX = 64

# Pagination.
ENTRIES_PAGE_SIZE_DEFAULT = 50
ENTRIES_PAGE_SIZE_MAX = 200

# Database pools, per shard, per regional process.
DB_POOL_SIZE_MIN = 2
DB_POOL_SIZE_MAX = 8
DB_CONNECT_TIMEOUT_S = 5.0
DB_COMMAND_TIMEOUT_S = 10.0
DB_STATEMENT_TIMEOUT_MS = 5_000
DB_LOCK_TIMEOUT_MS = 2_000

# Group commit (DESIGN D11): postings queued for one shard are sent together, at most this many per call.
POSTING_BATCH_SIZE_MAX = 64
POSTING_QUEUE_DEPTH_MAX = 4_096
# Serialization failures and deadlocks are retried by the server, never surfaced to a client.
POSTING_RETRIES_MAX = 5
POSTING_RETRY_BACKOFF_MS = 5

# Local stack.
PROCESS_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0
PG_READY_TIMEOUT_S = 30.0
