"""What every benchmark shares: a fresh durable cluster, a regional service process, the transfer workload
(C concurrent clients, each a loop of one request at a time) and the figures it prints.

Regional services serve HTTPS as everywhere else (app/local/tls.py), with a CA of the benchmarks' own under
the state folder (`bench-tls/`), so a running local stack's certificates are never touched."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import shutil
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app.local.ports import free_port
from app.local.postgres import Cluster, clusters_root, ensure_pg_user, find_pg_bin
from app.local.processes import ServiceProcess, region_process
from app.local.stack import state_dir
from app.local.tls import LocalTls, ensure_local_tls
from app.security.tls import client_context
from app.topology.ids import parse_account_id
from app.topology.loader import load_topology
from benchmarks import wrk
from benchmarks.client import Auth, Direct, region_env

# A durable cluster, as a ledger runs: fsync and synchronous_commit stay on (PostgreSQL's defaults).
BENCH_PG_SETTINGS = {"shared_buffers": "256MB", "max_connections": "200"}
REQUEST_TIMEOUT_S = 10.0
WARM_UP_S = 1.0


GENERATORS = ("auto", "wrk", "python")
# The load generator of this process's benchmark: the path of wrk, or None for the Python one (`use_generator`).
_wrk: list[str | None] = [None]


def use_generator(choice: str = "auto", *, install: bool = True) -> str:
    """Choose the load generator for this run and say which: wrk when present (or installed now, when allowed
    and root), else the Python generator with a warning; `python` forces the Python one, `wrk` requires wrk."""
    assert choice in GENERATORS, choice
    found = wrk.available(install=install) if choice != "python" else None
    if choice == "wrk" and found is None:
        raise SystemExit("--generator wrk: wrk is not installed and could not be (apt-get install -y wrk)")
    _wrk[0] = found
    if found:
        name = f"wrk ({wrk.version(found)}, Lua script {wrk.SCRIPT.name})"
    else:
        name = "python (aiohttp)"
        if choice == "auto":
            print("WARNING: wrk is not available: the Python load generator is used; it takes CPU from the "
                  "measured services (about a fifth of the machine), so the figures are lower than with wrk")
    print(f"load generator: {name}", flush=True)
    return "wrk" if found else "python"


def generator() -> str:
    return "wrk" if _wrk[0] else "python"


@dataclass
class Figures:
    name: str
    ops: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    # CPU seconds by part of the stack over the run (CpuMeter), where measured.
    cpu_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def merged(cls, name: str, parts: list[Figures]) -> Figures:
        """One figure from several runs of the same workload (interleaved rounds)."""
        cpu: dict[str, float] = {}
        for part in parts:
            for what, seconds in part.cpu_s.items():
                cpu[what] = cpu.get(what, 0.0) + seconds
        return cls(name, sum(p.ops for p in parts), sum(p.errors for p in parts), sum(p.seconds for p in parts),
                   [ms for p in parts for ms in p.latencies_ms], cpu)

    def cpu_us_per_op(self) -> dict[str, float]:
        """CPU microseconds per operation by part of the stack, and their total."""
        if not self.cpu_s or not self.ops:
            return {}
        split = {what: round(seconds / self.ops * 1e6) for what, seconds in self.cpu_s.items()}
        return {**split, "total": sum(split.values())}

    def cpu_line(self) -> str:
        """Where each operation's CPU went, and the rate those parts alone would allow on this machine's cores:
        what the ratio of two stacks comes down to when both keep the cores busy."""
        split = self.cpu_us_per_op()
        if not split:
            return ""
        parts = " + ".join(f"{what} {us:,.0f}" for what, us in split.items() if what != "total")
        cores = os.cpu_count() or 1
        return (f"  CPU per op: {parts} = {split['total']:,.0f} us; on {cores} cores at most "
                f"{cores * 1e6 / split['total']:,.0f}/s")

    @property
    def calls(self) -> int:
        return self.ops + self.errors

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else float("nan")

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def line(self) -> str:
        return (
            f"{self.name:<30} {self.per_second:>9.0f}/s  p50 {self.percentile(0.50):>7.2f} ms  "
            f"p99 {self.percentile(0.99):>7.2f} ms  ops {self.ops}  errors {self.errors}"
        )


def _processes() -> Iterator[tuple[int, list[str]]]:
    """Every live process: its pid and the fields of /proc/<pid>/stat after its name, state(0) ppid(1)
    pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14), in clock ticks."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile


def cpu_s(process: ServiceProcess) -> float:
    """CPU seconds (user + system) used so far by a service's process group (granian's main process and its
    worker): unlike latency, CPU per request hardly moves when other work shares the machine."""
    assert process.process is not None
    group = process.process.pid
    total_ticks = sum(int(f[11]) + int(f[12]) for _, f in _processes() if int(f[2]) == group)
    return total_ticks / os.sysconf("SC_CLK_TCK")


def cluster_cpu_s(cluster: Cluster) -> float:
    """CPU seconds used so far by a PostgreSQL cluster: its postmaster, every live process it started, and
    (by the postmaster's counters of reaped children) every backend that has ended: a backend that ends
    between two readings moves from the live processes' sum to the postmaster's reaped counters."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    total_ticks = 0
    for pid, fields in _processes():
        if pid == postmaster:
            total_ticks += sum(int(f) for f in fields[11:15])
        elif int(fields[1]) == postmaster:
            total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """This process's CPU (the Python load generator runs here) and its ended children's (wrk, pgbench)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU seconds by part of the stack over one run: the regional service (when there is one), PostgreSQL,
    and the load generator (this process and the children it waited for: wrk, pgbench)."""

    def __init__(self, cluster: Cluster, service: ServiceProcess | None, generator_name: str) -> None:
        self._cluster, self._service, self._generator = cluster, service, generator_name
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        reading = {"PostgreSQL": cluster_cpu_s(self._cluster), self._generator: _own_cpu_s()}
        if self._service is not None:
            reading = {"service": cpu_s(self._service), **reading}
        return reading

    def stop(self) -> dict[str, float]:
        now = self._read()
        return {what: now[what] - self._start[what] for what in now}


def fresh_cluster(name: str) -> Cluster:
    """A new, started, durable cluster under the state folder (any earlier one of that name is deleted)."""
    run_as = ensure_pg_user()
    folder = clusters_root(state_dir(), run_as) / name
    shutil.rmtree(folder, ignore_errors=True)
    cluster = Cluster(folder, free_port(), run_as, find_pg_bin())
    cluster.init()
    cluster.start(settings=BENCH_PG_SETTINGS)
    return cluster


@functools.cache
def bench_tls() -> LocalTls:
    return ensure_local_tls(state_dir() / "bench-tls")


@functools.cache
def client_tls() -> ssl.SSLContext:
    """What the load generator verifies regional services with (plain-HTTP URLs ignore it)."""
    return client_context(bench_tls().ca_file)


def region_service(region: str, cluster: Cluster, log_file: Path, **env: str) -> ServiceProcess:
    """A regional service serving HTTPS (the router benchmark's plaintext comparison uses `plain_region_service`),
    as deployed: provisioned as the owner first, logging in as the service role."""
    cluster.provision(load_topology(Path(env["TXROUTE_REGIONS_DIR"]) if "TXROUTE_REGIONS_DIR" in env else None)
                      .region(region).shards)
    return region_process(
        region, cluster.port, free_port(), log_file, tls=bench_tls(),
        TXROUTE_DATABASE_PASSWORD_FILE=str(cluster.service_password_file), **region_env(), **env,
    )


def plain_region_service(region: str, cluster: Cluster, log_file: Path) -> ServiceProcess:
    """The same service over plain HTTP: only to measure what internal TLS costs (`bench router --internal-tls`)."""
    cluster.provision(load_topology().region(region).shards)
    return region_process(
        region, cluster.port, free_port(), log_file, tls=None,
        TXROUTE_DATABASE_PASSWORD_FILE=str(cluster.service_password_file), **region_env(),
    )


async def post(http: aiohttp.ClientSession, path: str, auth: Auth, body: dict[str, object]) -> int:
    status, _ = await post_json(http, path, auth, body)
    return status


async def post_json(http: aiohttp.ClientSession, path: str, auth: Auth, body: dict[str, object]) -> tuple[int, bytes]:
    """POST `body` as JSON with a fresh Idempotency-Key; (status, answer body)."""
    data, key = json.dumps(body).encode(), uuid.uuid4().hex
    headers = {**auth.headers("POST", path, data, key), "idempotency-key": key, "content-type": "application/json"}
    async with http.post(path, data=data, headers=headers) as r:
        return r.status, await r.read()


async def open_accounts(
    url: str, client_id: str, count: int, *, shard: str | None = None, funded_minor: int = 10**12
) -> list[str]:
    """Open `count` funded accounts in one shard of the region at `url` (`shard`, or the first one hit)."""
    topology = load_topology()
    ids: list[str] = []
    auth = Direct(client_id)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=aiohttp.TCPConnector(ssl=client_tls())) as http:
        for _ in range(count * 8):
            status, answer = await post_json(http, "/v1/accounts", auth, {"currency": "EUR"})
            assert status == 201, answer
            account = json.loads(answer)["id"]
            name = topology.shard_for_slot(parse_account_id(account).slot).name
            shard = shard or name
            if name == shard:
                ids.append(account)
                status = await post(http, "/v1/deposits", auth,
                                    {"account": account, "amount": funded_minor, "currency": "EUR"})
                assert status == 201, status
            if len(ids) == count:
                return ids
    raise RuntimeError(f"could not open {count} accounts in one shard")


def pairs_within(ids: list[str]) -> Callable[[int], tuple[str, str]]:
    """Transfers among `ids`, spread so concurrent clients rarely share an account."""
    def pick(i: int) -> tuple[str, str]:
        a, b = ids[i % len(ids)], ids[(i * 7 + 3) % len(ids)]
        return (a, ids[(i + 1) % len(ids)]) if a == b else (a, b)
    return pick


async def transfer_workload(
    name: str,
    url: str,
    auth: Auth,
    pick: Callable[[int], tuple[str, str]],
    *,
    clients: int,
    seconds: float,
    ok: Iterable[int] = (201,),
) -> Figures:
    """C clients, each sending one transfer of 1 minor unit at a time for `seconds`."""
    if _wrk[0]:
        # wrk counts any 2xx/3xx as done: the expected status is the Python generator's check alone.
        return await asyncio.to_thread(_with_wrk, name, url, auth, clients=clients, seconds=seconds, pick=pick)

    async def transfer(http: aiohttp.ClientSession, i: int) -> int:
        a, b = pick(i)
        return await post(http, "/v1/transfers", auth,
                          {"debit_account": a, "credit_account": b, "amount": 1, "currency": "EUR"})

    return await _closed_loop(name, url, transfer, clients=clients, seconds=seconds, ok=ok)


async def read_workload(
    name: str, url: str, auth: Auth, ids: list[str], *, clients: int, seconds: float
) -> Figures:
    """C clients, each reading one account at a time for `seconds`: no commit, so the figures are the HTTP
    path's (forwarding, TLS) more than the database's."""
    if _wrk[0]:
        return await asyncio.to_thread(_with_wrk, name, url, auth, clients=clients, seconds=seconds, reads=ids)

    async def read(http: aiohttp.ClientSession, i: int) -> int:
        path = f"/v1/accounts/{ids[i % len(ids)]}"
        async with http.get(path, headers=auth.headers("GET", path, b"", None)) as r:
            await r.read()
            return r.status

    return await _closed_loop(name, url, read, clients=clients, seconds=seconds, ok=(200,))


def print_json(figures: dict[str, object]) -> None:
    """The `--json` output: one JSON object, the last line the benchmark prints."""
    print(json.dumps({**figures, "generator": generator()}, sort_keys=True), flush=True)


def _with_wrk(name: str, url: str, auth: Auth, *, clients: int, seconds: float,
              pick: Callable[[int], tuple[str, str]] | None = None, reads: list[str] | None = None) -> Figures:
    assert _wrk[0] is not None
    ok, errors, elapsed, latencies = wrk.run(_wrk[0], url, auth, clients=clients, seconds=seconds, pick=pick,
                                             reads=reads or (), timeout_s=REQUEST_TIMEOUT_S)
    return Figures(name, ok, errors, elapsed, latencies)


async def _closed_loop(
    name: str,
    url: str,
    request: Callable[[aiohttp.ClientSession, int], Awaitable[int]],
    *,
    clients: int,
    seconds: float,
    ok: Iterable[int],
) -> Figures:
    """C clients, each a loop of one `request(http, i)` at a time for `seconds`; latencies of every one."""
    accepted = frozenset(ok)
    latencies: list[float] = []
    counters = {"ok": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=clients + 4, ssl=client_tls())
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        deadline = time.monotonic() + seconds

        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status = await request(http, i)
                i += clients
                latencies.append((time.perf_counter() - started) * 1000)
                counters["ok" if status in accepted else "errors"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        elapsed = time.monotonic() - started
    return Figures(name, counters["ok"], counters["errors"], elapsed, latencies)
