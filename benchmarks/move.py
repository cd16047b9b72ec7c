"""`txroute bench move` (or `python -m benchmarks.move`): an online slot move (DESIGN D13, app/placement/mover.py)
of a range holding many accounts, while clients keep writing through the router.

Everything is started here, as in the other benchmarks: a fresh durable cluster per region involved (fsync and
synchronous_commit on), its regional service and one router (granian, one worker each; the router reaches the
regions over verified TLS). The source shard (eu-west-1's last) is seeded in set-based SQL as `bench audit`
seeds (benchmarks/audit.py: balanced double entry, running `balance_after`, stored answers, valid for every
audit check): `--accounts` accounts spread over the moving range (MOVING_SLOTS slots) with `--entries` entries
between them, and OTHER_ACCOUNTS accounts on the shard's next MOVING_SLOTS slots, which do not move.

C clients (half on the moving range, half on the other slots; each a loop of one transfer of 1 minor unit at a
time between two accounts of its group) write through the router for a warm-up and `--seconds` (the baseline),
while the mover moves the range (to eu-west-1's first shard, or with `--across-regions` to us-east-1's first),
and AFTER_S more on the new owner. The load comes from this process (aiohttp), not wrk: each request's start and
end times are needed to tell the requests that met the freeze, and wrk reports a whole run's histogram. The mover
runs in a process of its own, as `txroute slots move` does, so its work never stalls the clients' event loop
(its step times are `time.monotonic()`, one clock for every process of the machine).

Printed: each step's duration, copy rows/s, the change-log lag the catch-up met, the freeze (the mover's recorded
wall time, and the latency of the moving range's requests that overlapped it, held by the router), the
throughput of the unaffected slots during the move over before it (one run, so the ratio compares like with
like), client-visible errors by code, the audit of every shard after the move, that money was conserved and
every acknowledged transfer posted once, and the services' memory. All share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.local.processes import ServiceProcess
from app.ops.audit import AuditReport, audit
from app.ops.target import Target
from app.placement.mover import Mover, MoveStats
from app.topology.loader import load_topology
from app.topology.model import Shard
from benchmarks.audit import DEPOSIT_MINOR, seed
from benchmarks.client import Routed
from benchmarks.common import (
    REQUEST_TIMEOUT_S,
    WARM_UP_S,
    bench_tls,
    client_tls,
    fresh_cluster,
    pairs_within,
    post_json,
    print_json,
    region_service,
)
from benchmarks.ledger import _rss_mib
from benchmarks.router import router_for

SOURCE_REGION = "eu-west-1"
ACROSS_REGION = "us-east-1"
MOVING_SLOTS = 64  # the moved range: the first slots of the source shard
OTHER_ACCOUNTS = 1_000  # on the source shard's next MOVING_SLOTS slots, which stay
AFTER_S = 2.0  # the clients go on writing this long after the move, on the new owner
PROGRESS_EVERY_S = 5.0  # the copy's progress lines, at most this often
ACCOUNTS_MAX = 1_000_000
ENTRIES_MAX = 20_000_000
REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "txroute-mover-result "  # the mover process's last line: its outcome and MoveStats as JSON


@dataclass(frozen=True, slots=True)
class Answer:
    moving: bool  # the request's accounts are in the moving range
    started: float  # time.monotonic()
    ended: float
    code: str | None  # None: posted (201); else the problem's code, `http_<status>`, or the client's exception


@dataclass(frozen=True)
class Plan:
    source: Shard
    target: Shard
    moving: tuple[int, int]
    other: tuple[int, int]


def plan(*, across_regions: bool) -> Plan:
    topology = load_topology()
    shards = topology.region(SOURCE_REGION).shards
    source = shards[-1]
    target = topology.region(ACROSS_REGION).shards[0] if across_regions else shards[0]
    assert source.name != target.name
    lo = source.slots[0].lo
    assert source.slots[0].hi >= lo + 2 * MOVING_SLOTS - 1, "the source's first range holds both groups"
    return Plan(source, target, (lo, lo + MOVING_SLOTS - 1), (lo + MOVING_SLOTS, lo + 2 * MOVING_SLOTS - 1))


def run(*, accounts: int, entries: int, clients: int, seconds: float, across_regions: bool = False,
        as_json: bool = False) -> int:
    try:
        figures = measure(accounts=accounts, entries=entries, clients=clients, seconds=seconds,
                          across_regions=across_regions)
    except Exception as exc:  # still one JSON object as the last line, naming the failure (a benchmark's report)
        error = (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:300]
        print(f"txroute bench move failed: {error}", flush=True)
        if as_json:
            print_json({"phase": "failed", "error": error, "accounts": accounts, "entries": entries,
                        "clients": clients, "across_regions": across_regions})
        return 1
    if as_json:
        print_json(figures)
    clean = figures["audit_clean"] and figures["money_conserved"] and figures["acknowledged_posted_once"]
    return 0 if clean and figures["errors"] == 0 and figures["phase"] == "done" else 1


def measure(*, accounts: int, entries: int, clients: int, seconds: float, across_regions: bool) -> dict[str, Any]:
    """Seed, start, write, move, audit; print the figures and return them (the `--json` object)."""
    assert 2 <= accounts <= ACCOUNTS_MAX and 2 * accounts <= entries <= ENTRIES_MAX
    assert 2 <= clients <= 256 and 1 <= seconds <= 600
    p = plan(across_regions=across_regions)
    regions = [SOURCE_REGION, *([ACROSS_REGION] if across_regions else [])]
    print(f"txroute bench move: {accounts} accounts, {entries} entries in slots {p.moving[0]}-{p.moving[1]} of "
          f"{p.source.name} ({p.source.region}) -> {p.target.name} ({p.target.region}); {clients} clients through "
          f"the router ({clients // 2} on the moving range, {clients - clients // 2} on slots {p.other[0]}-"
          f"{p.other[1]} of {p.source.name}, which stay); baseline {seconds:.0f} s")
    print("load generator: python (aiohttp): each request's start and end times tell which met the freeze "
          "(wrk reports a whole run's histogram)", flush=True)
    clusters = {r: fresh_cluster(f"bench-move-{r}") for r in regions}
    services = {r: region_service(r, c, c.folder / "region.log") for r, c in clusters.items()}
    client_id = "bench-" + uuid.uuid4().hex[:8]
    started = time.monotonic()
    asyncio.run(_seed(clusters[p.source.region].dsn(p.source.database), p, client_id, accounts, entries))
    print(f"seeded {accounts + OTHER_ACCOUNTS} accounts and {entries + 2 * OTHER_ACCOUNTS} entries on "
          f"{p.source.name} in {time.monotonic() - started:.1f} s (set-based SQL)", flush=True)
    urls = json.dumps({r: s.url for r, s in services.items()})
    for service in services.values():
        service.env["TXROUTE_REGION_URLS"] = urls
    router = router_for(services[SOURCE_REGION], clusters[SOURCE_REGION].folder / "router.log",
                        others={r: s.url for r, s in services.items()})
    running: list[ServiceProcess] = []
    try:
        for service in [*services.values(), router]:
            running.append(service)
            service.start()
        for service in running:
            service.wait_ready()
        dsns = {s.name: clusters[s.region].dsn(s.database) for r in regions for s in load_topology().region(r).shards}
        target = Target(topology=load_topology(), shard_dsns=dsns, router_urls=[router.url],
                        region_urls={r: s.url for r, s in services.items()}, ca_file=bench_tls().ca_file)
        result = asyncio.run(_move_under_writes(target, router.url, p, client_id, clients=clients, seconds=seconds))
        rss = {f"region {r}": _rss_mib(s) for r, s in services.items()} | {"router": _rss_mib(router)}
    finally:
        for service in reversed(running):
            service.stop()
        for cluster in clusters.values():
            cluster.stop()
    return _report(result, rss, accounts=accounts, entries=entries, clients=clients, across_regions=across_regions)


async def _seed(dsn: str, p: Plan, client_id: str, accounts: int, entries: int) -> None:
    await seed(dsn, p.source.name, slot_lo=p.moving[0], slots=MOVING_SLOTS, accounts=accounts, first=1,
               last=entries // 2, client=client_id)
    await seed(dsn, p.source.name, slot_lo=p.other[0], slots=MOVING_SLOTS, accounts=OTHER_ACCOUNTS, first=1,
               last=OTHER_ACCOUNTS, client=client_id, entry_base=2 * (entries // 2))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("checkpoint")  # the seed's writes are not flushed during the measurement
    finally:
        await conn.close()


@dataclass
class MoveRun:
    plan: Plan
    move_id: str
    phase: str
    error: str | None
    stats: MoveStats
    recorded_freeze_s: float | None
    answers: list[Answer]
    times: dict[str, float]  # baseline, move, done, stop (time.monotonic())
    report: AuditReport
    balances: int
    expected_balances: int
    acknowledged: int
    posted_once: int


async def _move_under_writes(target: Target, router_url: str, p: Plan, client_id: str, *, clients: int,
                             seconds: float) -> MoveRun:
    source_dsn = target.shard_dsns[p.source.name]
    moving = await _ids(source_dsn, client_id, p.moving)
    other = await _ids(source_dsn, client_id, p.other)
    answers: list[Answer] = []
    posted: list[str] = []
    stop = asyncio.Event()
    writers = asyncio.create_task(_write(router_url, Routed(client_id), moving, other, answers, posted, stop,
                                         clients=clients))
    times = {"start": time.monotonic()}
    await asyncio.sleep(WARM_UP_S)
    times["baseline"] = time.monotonic()
    await asyncio.sleep(seconds)
    times["move"] = time.monotonic()
    try:
        move_id, phase, error, stats = await _run_mover(target, p)
        times["done"] = time.monotonic()
        await asyncio.sleep(AFTER_S)
    finally:
        stop.set()
        await writers
    times["stop"] = time.monotonic()
    recorded = next(m for m in await Mover(target).moves() if m["id"] == move_id)
    report = await audit(target.shard_dsns, full=True)
    balances = await _customer_balances(target.shard_dsns, client_id)
    return MoveRun(p, move_id, phase, error, stats, recorded.get("freeze_s"), answers, times, report, balances,
                   (len(moving) + len(other)) * DEPOSIT_MINOR, len(posted),
                   await _posted_once(target.shard_dsns, posted))


async def _ids(dsn: str, client_id: str, slots: tuple[int, int]) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("""select id from accounts where owner_client = $1 and kind = 'customer'
                                   and slot between $2 and $3 order by id""", client_id, *slots)
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def _write(url: str, auth: Routed, moving: list[str], other: list[str], answers: list[Answer],
                 posted: list[str], stop: asyncio.Event, *, clients: int) -> None:
    """`clients` closed loops until `stop`: the first half transfer within the moving range, the others within
    the slots that stay. Every answer is kept with its times; the ids of the posted transfers too."""
    connector = aiohttp.TCPConnector(limit=clients + 4, ssl=client_tls())
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:

        async def client(n: int) -> None:
            on_moving = n < clients // 2
            pick = pairs_within(moving if on_moving else other)
            i = n
            while not stop.is_set():
                a, b = pick(i)
                i += clients
                began = time.monotonic()
                code: str | None
                try:
                    status, body = await post_json(http, "/v1/transfers", auth, {
                        "debit_account": a, "credit_account": b, "amount": 1, "currency": "EUR"})
                    code = None if status == 201 else _problem_code(status, body)
                    if code is None:
                        posted.append(json.loads(body)["id"])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    code = "client_" + type(exc).__name__
                answers.append(Answer(on_moving, began, time.monotonic(), code))

        await asyncio.gather(*(client(n) for n in range(clients)))


def _problem_code(status: int, body: bytes) -> str:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        code = None
    return f"{status} {code}" if isinstance(code, str) else f"http_{status}"


async def _run_mover(target: Target, p: Plan) -> tuple[str, str, str | None, MoveStats]:
    """Move the range in a mover process (`_mover_process`; the DSNs reach it on stdin, never in argv or the
    environment), showing its progress with the time since it began (the copy's at most every few seconds).
    (the move's id, its final phase or `failed`, the failure, what the mover measured). A failed move is
    cancelled here (if it had not switched), so the range is unfrozen before the audit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.move", "--mover-process", cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps({
        "dsns": target.shard_dsns, "slots": list(p.moving), "to": p.target.name, "router_urls": target.router_urls,
        "region_urls": target.region_urls, "ca_file": str(target.ca_file)}).encode())
    await process.stdin.drain()
    process.stdin.close()
    since, shown, result = time.monotonic(), 0.0, None
    async for raw in process.stdout:
        line, now = raw.decode().rstrip(), time.monotonic()
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        elif ": copy " not in line or now - shown >= PROGRESS_EVERY_S:
            shown = now if ": copy " in line else shown
            print(f"  [{now - since:7.2f} s] {line}", flush=True)
    await process.wait()
    if result is None or result["id"] is None:
        raise RuntimeError(f"the mover process could not start the move (exit {process.returncode}): see above")
    if result["phase"] == "failed":  # unfreeze the range, so the clients and the audit see a settled ledger
        mover = Mover(target, progress=lambda line: print(f"  {line}", flush=True))
        await mover.cancel(await mover.find(result["id"]), phase="aborted", reason="bench: " + result["error"])
    return result["id"], result["phase"], result["error"], MoveStats(**result["stats"])


def _mover_process() -> int:
    """The mover's side of `_run_mover`: one move, its progress on stdout, then RESULT_PREFIX and the outcome."""
    job = json.loads(sys.stdin.read())
    target = Target(topology=load_topology(), shard_dsns=job["dsns"], router_urls=job["router_urls"],
                    region_urls=job["region_urls"], ca_file=Path(job["ca_file"]))
    mover = Mover(target, progress=lambda line: print(line, flush=True))
    began: list[str] = []

    async def move() -> str:
        lo, hi = job["slots"]
        spec = await mover.spec(lo, hi, job["to"])
        began.append(spec.id)
        await mover.begin(spec)
        return await mover.run(spec)

    error = None
    try:
        phase = asyncio.run(move())
    except Exception as exc:  # reported to the benchmark, which cancels the move (a benchmark, not the money path)
        phase, error = "failed", (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:300]
        print(f"the mover failed: {error}", flush=True)
    print(RESULT_PREFIX + json.dumps({"id": began[0] if began else None, "phase": phase, "error": error,
                                      "stats": dataclasses.asdict(mover.stats)}), flush=True)
    return 0 if phase == "done" else 1


async def _customer_balances(dsns: dict[str, str], client_id: str) -> int:
    """The sum of the client's customer balances over every shard: the accounts a move booked out read 0 on
    their old shard, so each account counts once."""
    total = 0
    for dsn in dsns.values():
        conn = await asyncpg.connect(dsn)
        try:
            total += int(await conn.fetchval(
                "select coalesce(sum(balance), 0) from accounts where owner_client = $1 and kind = 'customer'",
                client_id))
        finally:
            await conn.close()
    return total


async def _posted_once(dsns: dict[str, str], ids: list[str]) -> int:
    """How many of the acknowledged transfers are in exactly one journal (a move's copy names its old shard,
    `moved_from`, and is not counted)."""
    seen: Counter[str] = Counter()
    for dsn in dsns.values():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "select id from transfers where id = any($1::text[]) and moved_from is null", ids)
        finally:
            await conn.close()
        seen.update(r["id"] for r in rows)
    return sum(1 for i in ids if seen[i] == 1)


@dataclass(frozen=True)
class Window:
    name: str
    answers: list[Answer]
    seconds: float

    @property
    def per_second(self) -> float:
        return sum(1 for a in self.answers if a.code is None) / self.seconds if self.seconds > 0 else float("nan")

    def percentile_ms(self, q: float) -> float:
        ordered = sorted((a.ended - a.started) * 1000 for a in self.answers)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def line(self) -> str:
        return (f"{self.name:<44} {self.per_second:>8.0f}/s  p50 {self.percentile_ms(0.5):>8.2f} ms  "
                f"p99 {self.percentile_ms(0.99):>8.2f} ms  max {self.percentile_ms(1.0):>8.2f} ms  "
                f"requests {len(self.answers)}")


def _window(name: str, answers: list[Answer], *, moving: bool, lo: float, hi: float) -> Window:
    """The group's answers that ended within [lo, hi)."""
    return Window(name, [a for a in answers if a.moving == moving and lo <= a.ended < hi], hi - lo)


def _report(run: MoveRun, rss: dict[str, float], *, accounts: int, entries: int, clients: int,
            across_regions: bool) -> dict[str, Any]:
    stats, t, answers = run.stats, run.times, run.answers
    steps = stats.steps_s
    copy_s = steps.get("copy", float("nan"))
    copy_rate = stats.rows_copied / copy_s if copy_s > 0 else float("nan")
    freeze_steps = ("settle", "final_catch_up", "verify", "switch_out", "switch_in")
    move_s = t["done"] - t["move"]
    print(f"{run.move_id}: {run.phase} in {move_s:.2f} s" + (f" ({run.error}; cancelled)" if run.error else ""))
    print(f"  copy         {copy_s:8.2f} s  {stats.rows_copied} rows (accounts, transfers, stored answers, ...), "
          f"{copy_rate:.0f} rows/s")
    print(f"  catch up     {steps.get('catch_up', 0):8.2f} s  lag after the copy {stats.lag_before_catch_up} "
          f"changes, {stats.catch_up_passes} passes in all, {stats.changes_applied} changes applied, "
          f"{stats.lag_at_freeze} left for the freeze")
    compared = stats.rows_compared_in_freeze
    print(f"  pre-verify   {steps.get('pre_verify', 0):8.2f} s  (every row of the range hashed on both sides, before "
          "the freeze)")
    print(f"  freeze       {steps.get('freeze', 0):8.2f} s  (taking the range's lock)")
    print("  frozen       " + ", ".join(f"{name.replace('_', ' ')} {steps.get(name, 0):.2f} s" for name in freeze_steps)
          + (f"; the mover recorded {run.recorded_freeze_s:.3f} s frozen -> switched"
             if run.recorded_freeze_s is not None else "")
          + (f"; verify compared {compared} rows one by one" if compared is not None else "; verify: every row"))
    print(f"  cleanup      {steps.get('cleanup', 0):8.2f} s")
    frozen_at = stats.frozen_at if stats.frozen_at is not None else t["done"]
    switched_at = stats.switched_at if stats.switched_at is not None else t["done"]
    held = Window("moving range, requests overlapping the freeze",
                  [a for a in answers if a.moving and a.started < switched_at and a.ended > frozen_at],
                  switched_at - frozen_at)
    windows = [
        _window("moving range, before the move", answers, moving=True, lo=t["baseline"], hi=t["move"]),
        _window("moving range, during the move", answers, moving=True, lo=t["move"], hi=t["done"]),
        held,
        _window("moving range, after the move", answers, moving=True, lo=t["done"], hi=t["stop"]),
        _window("unaffected slots, before the move", answers, moving=False, lo=t["baseline"], hi=t["move"]),
        _window("unaffected slots, during the move", answers, moving=False, lo=t["move"], hi=t["done"]),
        _window("unaffected slots, during copy and catch-up", answers, moving=False, lo=t["move"], hi=frozen_at),
    ]
    for window in windows:
        print(window.line())
    before, during, copying = windows[4], windows[5], windows[6]
    ratio = during.per_second / before.per_second if before.per_second else float("nan")
    copy_ratio = copying.per_second / before.per_second if before.per_second else float("nan")
    # While the range is frozen its clients wait in the router's hold, which leaves the machine to the others:
    # the copy's window shows what the move's own work costs them.
    print(f"unaffected slots: {ratio:.2f} x their throughput before the move (same run); {copy_ratio:.2f} x "
          "during copy and catch-up, before the freeze idles the moving range's clients")
    errors = Counter(a.code for a in answers if a.code is not None)
    by_group = Counter(f"{'moving range' if a.moving else 'unaffected slots'}: {a.code}"
                       for a in answers if a.code is not None)
    print("client-visible errors: " + (", ".join(f"{code}: {n}" for code, n in by_group.most_common()) or "none"))
    print(f"audit after the move: {'clean' if run.report.clean else 'VIOLATIONS'} "
          f"({run.report.counts.get('transfers_checked', 0)} transfers checked)")
    if not run.report.clean:
        print(run.report.text())
    conserved = run.balances == run.expected_balances
    print(f"money: the client's balances sum to {run.balances} over every shard, {run.expected_balances} seeded: "
          f"{'conserved' if conserved else 'NOT CONSERVED'}; acknowledged transfers in exactly one journal: "
          f"{run.posted_once} of {run.acknowledged}")
    print("memory (RSS): " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss.items()))
    return {
        "freeze_ms": round(1000 * run.recorded_freeze_s, 1) if run.recorded_freeze_s is not None else None,
        "p50_moving_ms": _round(held.percentile_ms(0.5)),
        "p99_moving_ms": _round(held.percentile_ms(0.99)),
        "max_moving_ms": _round(held.percentile_ms(1.0)),
        "moving_requests_in_freeze": len(held.answers),
        "unaffected_ratio": round(ratio, 3),
        "unaffected_copy_ratio": round(copy_ratio, 3),
        "unaffected_before_per_s": round(before.per_second, 1),
        "unaffected_during_per_s": round(during.per_second, 1),
        "copy_rows_per_s": round(copy_rate, 1),
        "copy_rows": stats.rows_copied,
        "steps_s": {name: round(seconds, 3) for name, seconds in steps.items()},
        "move_s": round(move_s, 2),
        "catch_up_lag": stats.lag_before_catch_up,
        "rows_compared_in_freeze": compared,
        "lag_at_freeze": stats.lag_at_freeze,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "errors_by_group": dict(by_group),
        "phase": run.phase,
        "error": run.error,
        "audit_clean": run.report.clean,
        "money_conserved": conserved,
        "acknowledged": run.acknowledged,
        "acknowledged_posted_once": run.posted_once == run.acknowledged,
        "rss_mib": {name: round(mib, 1) for name, mib in rss.items()},
        "accounts": accounts,
        "entries": entries,
        "clients": clients,
        "across_regions": across_regions,
        "source_shard": run.plan.source.name,
        "target_shard": run.plan.target.name,
    }


def _round(value: float) -> float | None:
    return None if value != value else round(value, 2)  # NaN (no request met the freeze) as null


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.move", description=__doc__)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="the baseline before the move")
    parser.add_argument("--across-regions", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mover-process", action="store_true", help=argparse.SUPPRESS)  # see _run_mover
    args = parser.parse_args()
    if args.mover_process:
        return _mover_process()
    return run(accounts=args.accounts, entries=args.entries, clients=args.clients, seconds=args.seconds,
               across_regions=args.across_regions, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
