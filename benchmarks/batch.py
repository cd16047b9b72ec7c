"""`txroute bench batch`: transfers/s through the global endpoint in batches of BATCH_ITEMS transfers
(`POST /v1/batches`), atomic and non-atomic, beside PostgreSQL's own pgbench tpcb-like on the same cluster with
the same client count, in one run; p50 and p99 are per batch.

Everything is started here, as in `bench ledger` and `bench router`: a fresh durable cluster (fsync and
synchronous_commit on), one regional service and one router (granian, one worker each; the router reaches the
region over verified TLS), and the load from this process (aiohttp; C concurrent clients, each one batch at a
time). Each client moves money among accounts of its own (a disjoint share of `--accounts`, all on one shard),
as payroll or payouts from separate sources would, so the figures are the batch path's, not lock waits
between clients. An atomic batch is one transaction (one call of txr_post_atomic); a non-atomic batch's items
are posted through the shard's group commit, each on its own.

In the same rounds it measures what a hold and a capture cost beside a plain transfer (DESIGN D14), one request
at a time per client through the router, among the same accounts: plain transfers (`POST /v1/transfers`),
holds (the same transfer with `"hold": {"expires_in_s": 3600}`, 201 `held`) and captures (`POST
/v1/transfers/{id}/capture` of the holds that round made, each client its own, whole; the capture phase ends
when a client has no hold left or its time is up). Transfers/s and p50/p99 per request of each. The six
workloads alternate in ROUNDS interleaved rounds, so load from elsewhere on the machine falls on each alike.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp

from app.topology.loader import load_topology
from app.topology.placement import batch_home_slot
from benchmarks.client import Routed
from benchmarks.common import (
    REQUEST_TIMEOUT_S,
    WARM_UP_S,
    Figures,
    client_tls,
    fresh_cluster,
    open_accounts,
    post_json,
    print_json,
    region_service,
)
from benchmarks.ledger import _PgBench, _pgbench_latencies
from benchmarks.router import router_for

REGION = "eu-west-1"
ROUNDS = 5
BATCH_ITEMS = 100
# Each refused batch's problem codes (the batch's and its items'), printed after the figures.
ERROR_CODES: dict[str, int] = {}
HOLD_EXPIRES_IN_S = 3600  # far beyond a run: every hold made is still there to capture
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
        keys = _KeysAtHome(client_id)
        for warm_atomic in (True, False):
            asyncio.run(_batches("warm-up", router.url, auth, owned, atomic=warm_atomic, seconds=WARM_UP_S,
                                 keys=keys))
        _, warm_holds = asyncio.run(_singles("warm-up", router.url, auth, owned, hold=True, seconds=WARM_UP_S))
        asyncio.run(_captures("warm-up", router.url, auth, warm_holds, seconds=WARM_UP_S))
        pgbench = _PgBench(cluster, clients=clients)
        atomic_rounds: list[Figures] = []
        loose_rounds: list[Figures] = []
        pgbench_rounds: list[Figures] = []
        single_rounds: list[Figures] = []
        hold_rounds: list[Figures] = []
        capture_rounds: list[Figures] = []
        for _ in range(rounds):
            atomic_rounds.append(asyncio.run(_batches("", router.url, auth, owned, atomic=True, seconds=step_s,
                                                      keys=keys)))
            loose_rounds.append(asyncio.run(_batches("", router.url, auth, owned, atomic=False, seconds=step_s,
                                                     keys=keys)))
            pgbench_rounds.append(pgbench.run(step_s))
            single_rounds.append(asyncio.run(_singles("", router.url, auth, owned, hold=False, seconds=step_s))[0])
            held_figures, held = asyncio.run(_singles("", router.url, auth, owned, hold=True, seconds=step_s))
            hold_rounds.append(held_figures)
            capture_rounds.append(asyncio.run(_captures("", router.url, auth, held, seconds=step_s)))
    finally:
        router.stop()
        region.stop()
        cluster.stop()
    errors = sum(f.errors for f in (*atomic_rounds, *loose_rounds, *single_rounds, *hold_rounds, *capture_rounds))
    atomic = Figures.merged(f"atomic batches of {BATCH_ITEMS}", atomic_rounds)
    loose = Figures.merged(f"non-atomic batches of {BATCH_ITEMS}", loose_rounds)
    theirs = Figures.merged("pgbench tpcb-like (built-in)", pgbench_rounds)
    theirs.latencies_ms = _pgbench_latencies(cluster.folder)
    for figures in (atomic, loose):
        print(f"{figures.name:<30} {figures.per_second * BATCH_ITEMS:>9.0f} transfers/s  "
              f"{figures.per_second:>7.1f} batches/s  per batch p50 {figures.percentile(0.50):>7.1f} ms  "
              f"p99 {figures.percentile(0.99):>7.1f} ms  batches {figures.ops}  errors {figures.errors}")
    if ERROR_CODES:
        print("refused batches' codes: " + ", ".join(f"{code} x{n}" for code, n in sorted(ERROR_CODES.items())))
    print(theirs.line())
    ratio = atomic.per_second * BATCH_ITEMS / theirs.per_second
    loose_ratio = loose.per_second * BATCH_ITEMS / theirs.per_second
    print(f"ratio: atomic-batch transfers/s = {ratio:.2f} x pgbench tpcb-like TPS "
          f"(non-atomic: {loose_ratio:.2f} x)")
    single = Figures.merged("plain transfers, one a request", single_rounds)
    hold = Figures.merged("holds (transfer + hold)", hold_rounds)
    capture = Figures.merged("captures of those holds", capture_rounds)
    for figures in (single, hold, capture):
        print(f"{figures.line()}  ({figures.per_second / single.per_second:.2f} x plain transfers/s, "
              f"p50 {figures.percentile(0.50) / single.percentile(0.50):.2f} x)")
    if as_json:
        print_json({
            "ratio": round(ratio, 3), "per_second": round(atomic.per_second * BATCH_ITEMS, 1),
            "batch_p50_ms": round(atomic.percentile(0.50), 1), "batch_p99_ms": round(atomic.percentile(0.99), 1),
            "non_atomic_ratio": round(loose_ratio, 3),
            "non_atomic_per_second": round(loose.per_second * BATCH_ITEMS, 1),
            "non_atomic_batch_p50_ms": round(loose.percentile(0.50), 1),
            "non_atomic_batch_p99_ms": round(loose.percentile(0.99), 1),
            "pgbench_tps": round(theirs.per_second, 1), "batch_items": BATCH_ITEMS, "clients": clients,
            **{f"{name}_{figure}": value for name, figures in
               (("transfer", single), ("hold", hold), ("capture", capture))
               for figure, value in (("per_second", round(figures.per_second, 1)),
                                     ("p50_ms", round(figures.percentile(0.50), 1)),
                                     ("p99_ms", round(figures.percentile(0.99), 1)),
                                     ("errors", figures.errors))},
            "errors": errors,
        })
    return 0 if errors == 0 else 1


def _items(accounts: list[str], start: int) -> list[dict[str, object]]:
    """BATCH_ITEMS transfers of one minor unit, each from one of the client's accounts to the next (funded with
    far more than a run moves)."""
    n = len(accounts)
    return [{"type": "transfer", "debit_account": accounts[i % n], "credit_account": accounts[(i + 1) % n],
             "amount": 1, "currency": "EUR"} for i in range(start, start + BATCH_ITEMS)]


class _KeysAtHome:
    """Fresh Idempotency-Keys whose batch home (the slot where the router binds a batch's key to its body,
    app.topology.placement.batch_home_slot) is in REGION: only that region runs here, while deployed every
    region answers for its share of keys (one more round trip per batch, to the key's home region)."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.topology = load_topology()

    def __call__(self) -> str:
        while True:
            key = uuid.uuid4().hex
            if self.topology.shard_for_slot(batch_home_slot(self.client_id, key)).region == REGION:
                return key


async def _batches(
    name: str, url: str, auth: Routed, owned: list[list[str]], *, atomic: bool, seconds: float,
    keys: Callable[[], str],
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
                headers = {**auth.headers("POST", "/v1/batches", body, None), "idempotency-key": keys(),
                           "content-type": "application/json"}
                started = time.perf_counter()
                async with http.post("/v1/batches", data=body, headers=headers) as response:
                    answer = await response.read()
                latencies.append((time.perf_counter() - started) * 1000)
                doc = json.loads(answer)
                posted = response.status == expected and all(item["status"] == 201 for item in doc["items"])
                counters["ok" if posted else "errors"] += 1
                if not posted:
                    codes = {doc.get("code")} | {item.get("code") for item in doc.get("items", ())}
                    for code in sorted(str(c) for c in codes if c is not None):
                        ERROR_CODES[code] = ERROR_CODES.get(code, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(worker(accounts) for accounts in owned))
        elapsed = time.monotonic() - started
    return Figures(name, counters["ok"], counters["errors"], elapsed, latencies)


async def _singles(
    name: str, url: str, auth: Routed, owned: list[list[str]], *, hold: bool, seconds: float
) -> tuple[Figures, list[list[str]]]:
    """Each client a loop of one transfer (held, with `hold`) of one minor unit among its own accounts; the
    figures and each client's held transfer ids (to capture)."""
    held: list[list[str]] = [[] for _ in owned]

    async def one(http: aiohttp.ClientSession, client: int, i: int) -> bool:
        accounts = owned[client]
        body: dict[str, object] = {"debit_account": accounts[i % len(accounts)],
                                   "credit_account": accounts[(i + 1) % len(accounts)], "amount": 1,
                                   "currency": "EUR"}
        if hold:
            body["hold"] = {"expires_in_s": HOLD_EXPIRES_IN_S}
        status, answer = await post_json(http, "/v1/transfers", auth, body)
        if status != 201:
            return False
        transfer = json.loads(answer)
        if hold:
            if transfer["state"] != "held":
                return False
            held[client].append(transfer["id"])
        return True

    return await _each_client(name, url, len(owned), one, seconds=seconds), held


async def _captures(name: str, url: str, auth: Routed, held: list[list[str]], *, seconds: float) -> Figures:
    """Each client captures its own holds (whole), one at a time, until its time is up or it has none left."""
    left = [list(ids) for ids in held]

    async def one(http: aiohttp.ClientSession, client: int, i: int) -> bool | None:
        if not left[client]:
            return None  # no hold left: this phase ends for every client
        status, answer = await post_json(http, f"/v1/transfers/{left[client].pop(0)}/capture", auth, {})
        return status == 201 and json.loads(answer)["state"] == "posted"

    return await _each_client(name, url, len(held), one, seconds=seconds)


async def _each_client(
    name: str, url: str, clients: int,
    request: Callable[[aiohttp.ClientSession, int, int], Awaitable[bool | None]], *, seconds: float,
) -> Figures:
    """C clients, each a loop of one `request(http, client, i)` at a time for `seconds` or until one of them
    answers None (nothing left to do, which ends the phase for all: the time is then the time they all ran)."""
    latencies: list[float] = []
    counters = {"ok": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=clients + 4, ssl=client_tls())
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    done = asyncio.Event()
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        deadline = time.monotonic() + seconds

        async def worker(client: int) -> None:
            i = 0
            while time.monotonic() < deadline and not done.is_set():
                started = time.perf_counter()
                posted = await request(http, client, i)
                if posted is None:
                    done.set()
                    return
                i += 1
                latencies.append((time.perf_counter() - started) * 1000)
                counters["ok" if posted else "errors"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        elapsed = time.monotonic() - started
    return Figures(name, counters["ok"], counters["errors"], elapsed, latencies)


assert REQUEST_TIMEOUT_S <= BATCH_TIMEOUT_S
