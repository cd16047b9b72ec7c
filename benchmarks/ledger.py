"""`txroute bench ledger`: transfers/s and p50/p99 latency against one regional service on one shard, beside
PostgreSQL's own pgbench tpcb-like on the same cluster with the same client count, in one run.

Everything is started here: a fresh durable cluster (fsync and synchronous_commit on, as a real ledger runs),
one regional service process (granian, one worker), and the load from this process (aiohttp, C concurrent
clients, each a loop of one request at a time). All share this machine's cores: the figures say what the
stack does on it, not what it would do on separate hosts.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from app.local.postgres import Cluster, clusters_root, ensure_pg_user, find_pg_bin
from app.local.processes import REGION_FACTORY, ServiceProcess, asgi_command, free_port
from app.local.stack import state_dir
from app.topology.ids import parse_account_id
from app.topology.loader import load_topology
from benchmarks.client import auth_headers, region_env

REGION = "eu-west-1"
BENCH_PG_SETTINGS = {"shared_buffers": "256MB", "max_connections": "200"}
REQUEST_TIMEOUT_S = 10.0


@dataclass
class Figures:
    name: str
    ops: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def line(self) -> str:
        return (
            f"{self.name:<28} {self.per_second:>9.0f}/s  p50 {self.percentile(0.50):>6.2f} ms  "
            f"p99 {self.percentile(0.99):>6.2f} ms  ops {self.ops}  errors {self.errors}"
        )


def run(*, clients: int, seconds: float, accounts: int) -> int:
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    folder = clusters_root(state_dir(), ensure_pg_user()) / "bench-ledger"
    shutil.rmtree(folder, ignore_errors=True)
    cluster = Cluster(folder, free_port(), ensure_pg_user(), find_pg_bin())
    cluster.init()
    cluster.start(settings=BENCH_PG_SETTINGS)
    port = free_port()
    service = ServiceProcess(
        name="bench-region",
        argv=asgi_command(REGION_FACTORY, port),
        env={
            "TXROUTE_REGION": REGION,
            "TXROUTE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{cluster.port}",
            "TXROUTE_DATABASE_PASSWORD": cluster.password(),
            **region_env(),
        },
        port=port,
        log_file=folder / "region.log",
    )
    try:
        service.start()
        service.wait_ready()
        print(f"txroute bench ledger: {clients} clients, {seconds:.0f} s each, {accounts} accounts, one shard")
        print(f"PostgreSQL {cluster.bin_dir}, fsync on, synchronous_commit on, shared_buffers 256MB")
        ours = asyncio.run(_http_workload(service.url, clients=clients, seconds=seconds, accounts=accounts))
        rss_mib = _rss_mib(service)
        pgbench = _pgbench(cluster, clients=clients, seconds=seconds)
    finally:
        service.stop()
        cluster.stop()
    print(ours.line() + f"  service RSS {rss_mib:.0f} MiB")
    print(pgbench.line())
    print(f"ratio: txroute transfers/s = {ours.per_second / pgbench.per_second:.2f} x pgbench tpcb-like TPS")
    return 0 if ours.errors == 0 else 1


async def _http_workload(url: str, *, clients: int, seconds: float, accounts: int) -> Figures:
    client_id = "bench-" + uuid.uuid4().hex[:8]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        ids = await _open_accounts_in_one_shard(http, client_id, accounts)
        for account in ids:
            await _post(http, client_id, "/v1/deposits", {"account": account, "amount": 10**9, "currency": "EUR"})
        latencies: list[float] = []
        counters = {"ok": 0, "errors": 0}
        deadline = time.monotonic() + seconds

        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                a, b = ids[i % len(ids)], ids[(i * 7 + 3) % len(ids)]
                i += clients
                if a == b:
                    continue
                started = time.perf_counter()
                status = await _post(
                    http, client_id, "/v1/transfers",
                    {"debit_account": a, "credit_account": b, "amount": 1, "currency": "EUR"},
                )
                latencies.append((time.perf_counter() - started) * 1000)
                counters["ok" if status == 201 else "errors"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        elapsed = time.monotonic() - started
    return Figures("txroute transfers (HTTP)", counters["ok"], counters["errors"], elapsed, latencies)


async def _open_accounts_in_one_shard(http: aiohttp.ClientSession, client_id: str, count: int) -> list[str]:
    topology = load_topology()
    ids: list[str] = []
    shard: str | None = None
    for _ in range(count * 4):
        async with http.post(
            "/v1/accounts", json={"currency": "EUR"},
            headers={**auth_headers(client_id), "idempotency-key": uuid.uuid4().hex},
        ) as r:
            assert r.status == 201, await r.text()
            account = (await r.json())["id"]
        name = topology.shard_for_slot(parse_account_id(account).slot).name
        shard = shard or name
        if name == shard:
            ids.append(account)
        if len(ids) == count:
            return ids
    raise RuntimeError("could not open enough accounts in one shard")


async def _post(http: aiohttp.ClientSession, client_id: str, path: str, body: dict[str, object]) -> int:
    headers = {**auth_headers(client_id), "idempotency-key": uuid.uuid4().hex}
    async with http.post(path, json=body, headers=headers) as r:
        await r.read()
        return r.status


def _pgbench(cluster: Cluster, *, clients: int, seconds: float) -> Figures:
    env = {**os.environ, "PGPASSWORD": cluster.password()}
    base = [str(cluster.bin_dir / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
    subprocess.run([str(cluster.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(cluster.port),
                    "-U", "postgres", "pgbench"], env=env, check=True, capture_output=True, timeout=60)
    subprocess.run([*base, "-i", "-s", "10", "-q", "pgbench"], env=env, check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [*base, "-b", "tpcb-like", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(int(seconds)),
         "-r", "--log", "--log-prefix", str(Path(cluster.folder) / "pgbench"), "pgbench"],
        env=env, check=True, capture_output=True, text=True, timeout=seconds + 120, cwd=str(cluster.folder),
    ).stdout
    tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    latencies = _pgbench_latencies(Path(cluster.folder))
    return Figures("pgbench tpcb-like (built-in)", int(tps * seconds), 0, seconds, latencies)


def _pgbench_latencies(folder: Path) -> list[float]:
    """Per-transaction latencies from pgbench's --log files (third field, microseconds)."""
    values: list[float] = []
    for path in folder.glob("pgbench.*"):  # pgbench writes <prefix>.<pid>[.<thread>]
        try:
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]) / 1000)
        except (OSError, UnicodeDecodeError):
            continue
    return values


def _rss_mib(service: ServiceProcess) -> float:
    """Resident memory of the service's process tree (granian's main process and its worker)."""
    assert service.process is not None
    total_kib = 0
    for pid in [service.process.pid, *_children(service.process.pid)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []

