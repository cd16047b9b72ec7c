"""`txroute bench batch`: transfers/s through the global endpoint in batches of BATCH_ITEMS transfers
(`POST /v1/batches`), atomic and non-atomic, beside PostgreSQL's own pgbench tpcb-like on the same cluster with
the same client count, in one run; p50 and p99 are per batch.

Everything is started here, as in `bench ledger` and `bench router`: a fresh durable cluster (fsync and
synchronous_commit on), one regional service and one router (granian, one worker each; the router reaches the
region over verified TLS), and the load from this process (aiohttp; C concurrent clients, each one batch at a
time). Each client moves money among accounts of its own (a disjoint share of `--accounts`, all on one shard),
as payroll or payouts from separate sources would, so the figures are the batch path's, not lock waits
between clients. An atomic batch is one transaction (one call of txr_post_atomic); a non-atomic batch's items
are posted through the shard's group commit, each on its own. The three workloads alternate in ROUNDS
interleaved rounds, so load from elsewhere on the machine falls on each alike.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp

from benchmarks.client import Routed
from benchmarks.common import (
    REQUEST_TIMEOUT_S,
    WARM_UP_S,
    Figures,
    client_tls,
    fresh_cluster,
    open_accounts,
    print_json,
    region_service,
)
from benchmarks.ledger import _PgBench, _pgbench_latencies
from benchmarks.router import router_for

REGION = "eu-west-1"
ROUNDS = 5
BATCH_ITEMS = 100
BATCH_TIMEOUT_S = 30.0  # one batch's answer, on a loaded machine (a region answers within its own bounds)


def run(*, clients: int, seconds: float, accounts: int, as_json: bool = False) -> int:
    assert 1 <= clients <= 64 and 1 <= seconds <= 600 and 2 * clients <= accounts <= 10_000
    print(f"txroute bench batch: {clients} clients, batches of {BATCH_ITEMS} transfers, {seconds:.0f} s each, "
          f"{accounts} accounts ({accounts // clients} per client), one shard, through the router")
    cluster = fresh_cluster("bench-batch")
    region = region_service(REGION, cluster, cluster.folder / "region.log")
    router = router_for(region, cluster.folder / "router.log")
    rounds = ROUNDS if seconds >= ROUNDS else 1
    step_s = max(1, round(seconds / rounds))
    try:
        region.start()
        region.wait_ready()
        router.start()
        router.wait_ready()
        print(f"PostgreSQL {cluster.bin_dir}, fsync on, synchronous_commit on, shared_buffers 256MB; "
              f"{rounds} interleaved rounds of {step_s} s each")
        client_id = "bench-" + uuid.uuid4().hex[:8]
        ids = asyncio.run(open_accounts(region.url, client_id, accounts))
        share = len(ids) // clients
        owned = [ids[c * share:(c + 1) * share] for c in range(clients)]
        auth = Routed(client_id)
        for warm_atomic in (True, False):
            asyncio.run(_batches("warm-up", router.url, auth, owned, atomic=warm_atomic, seconds=WARM_UP_S))
        pgbench = _PgBench(cluster, clients=clients)
        atomic_rounds: list[Figures] = []
        loose_rounds: list[Figures] = []
        pgbench_rounds: list[Figures] = []
        for _ in range(rounds):
            atomic_rounds.append(asyncio.run(_batches("", router.url, auth, owned, atomic=True, seconds=step_s)))
            loose_rounds.append(asyncio.run(_batches("", router.url, auth, owned, atomic=False, seconds=step_s)))
            pgbench_rounds.append(pgbench.run(step_s))
    finally:
        router.stop()
        region.stop()
        cluster.stop()
    atomic = Figures.merged(f"atomic batches of {BATCH_ITEMS}", atomic_rounds)
    loose = Figures.merged(f"non-atomic batches of {BATCH_ITEMS}", loose_rounds)
    theirs = Figures.merged("pgbench tpcb-like (built-in)", pgbench_rounds)
    theirs.latencies_ms = _pgbench_latencies(cluster.folder)
    for figures in (atomic, loose):
        print(f"{figures.name:<30} {figures.per_second * BATCH_ITEMS:>9.0f} transfers/s  "
              f"{figures.per_second:>7.1f} batches/s  per batch p50 {figures.percentile(0.50):>7.1f} ms  "
              f"p99 {figures.percentile(0.99):>7.1f} ms  batches {figures.ops}  errors {figures.errors}")
    print(theirs.line())
    ratio = atomic.per_second * BATCH_ITEMS / theirs.per_second
    loose_ratio = loose.per_second * BATCH_ITEMS / theirs.per_second
    print(f"ratio: atomic-batch transfers/s = {ratio:.2f} x pgbench tpcb-like TPS "
          f"(non-atomic: {loose_ratio:.2f} x)")
    if as_json:
        print_json({
            "ratio": round(ratio, 3), "per_second": round(atomic.per_second * BATCH_ITEMS, 1),
            "batch_p50_ms": round(atomic.percentile(0.50), 1), "batch_p99_ms": round(atomic.percentile(0.99), 1),
            "non_atomic_ratio": round(loose_ratio, 3),
            "non_atomic_per_second": round(loose.per_second * BATCH_ITEMS, 1),
            "non_atomic_batch_p50_ms": round(loose.percentile(0.50), 1),
            "non_atomic_batch_p99_ms": round(loose.percentile(0.99), 1),
            "pgbench_tps": round(theirs.per_second, 1), "batch_items": BATCH_ITEMS, "clients": clients,
            "errors": atomic.errors + loose.errors,
        })
    return 0 if atomic.errors + loose.errors == 0 else 1


def _items(accounts: list[str], start: int) -> list[dict[str, object]]:
    """BATCH_ITEMS transfers of one minor unit, each from one of the client's accounts to the next (funded with
    far more than a run moves)."""
    n = len(accounts)
    return [{"type": "transfer", "debit_account": accounts[i % n], "credit_account": accounts[(i + 1) % n],
             "amount": 1, "currency": "EUR"} for i in range(start, start + BATCH_ITEMS)]


async def _batches(
    name: str, url: str, auth: Routed, owned: list[list[str]], *, atomic: bool, seconds: float
) -> Figures:
    """Each client a loop of one batch at a time for `seconds`; one latency per batch. A batch counts as an
    error unless every item posted."""
    latencies: list[float] = []
    counters = {"ok": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=len(owned) + 4, ssl=client_tls())
    timeout = aiohttp.ClientTimeout(total=BATCH_TIMEOUT_S)
    expected = 201 if atomic else 200
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        deadline = time.monotonic() + seconds

        async def worker(accounts: list[str]) -> None:
            i = 0
            while time.monotonic() < deadline:
                body = json.dumps({"atomic": atomic, "items": _items(accounts, i)}).encode()
                i += BATCH_ITEMS
                headers = {**auth.headers("POST", "/v1/batches", body, None), "idempotency-key": uuid.uuid4().hex,
                           "content-type": "application/json"}
                started = time.perf_counter()
                async with http.post("/v1/batches", data=body, headers=headers) as response:
                    answer = await response.read()
                latencies.append((time.perf_counter() - started) * 1000)
                posted = response.status == expected and all(
                    item["status"] == 201 for item in json.loads(answer)["items"])
                counters["ok" if posted else "errors"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(accounts) for accounts in owned))
        elapsed = time.monotonic() - started
    return Figures(name, counters["ok"], counters["errors"], elapsed, latencies)


assert REQUEST_TIMEOUT_S <= BATCH_TIMEOUT_S
