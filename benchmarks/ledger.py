"""`txroute bench ledger`: transfers/s and p50/p99 latency against one regional service on one shard, beside
PostgreSQL's own pgbench tpcb-like on the same cluster with the same client count, in one run.

Everything is started here: a fresh durable cluster (fsync and synchronous_commit on, as a real ledger runs),
one regional service process (granian, one worker), and the load: wrk (benchmarks/wrk.py, compiled, as
pgbench's client is) or, where wrk is missing, this process (aiohttp); C concurrent clients either way, each a
loop of one request at a time. The two alternate in ROUNDS interleaved rounds, so load from elsewhere falls
on both alike. All share this machine's cores: the figures say what the stack does on it, not what it would
do on separate hosts.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from benchmarks.client import Direct
from benchmarks.common import (
    WARM_UP_S,
    CpuMeter,
    Figures,
    fresh_cluster,
    open_accounts,
    pairs_within,
    print_json,
    region_service,
    transfer_workload,
    use_generator,
)
from benchmarks.profile import Profiler

REGION = "eu-west-1"
ROUNDS = 5  # txroute and pgbench alternate, each measurement split into this many rounds


def run(*, clients: int, seconds: float, accounts: int, generator: str = "auto", as_json: bool = False,
        profile: Path | None = None) -> int:
    print(f"txroute bench ledger: {clients} clients, {seconds:.0f} s each, {accounts} accounts, one shard")
    use_generator(generator)
    profiler = Profiler(profile) if profile else None
    ours, pgbench, rss_mib = measure(clients=clients, seconds=seconds, accounts=accounts, with_pgbench=True,
                                     profiler=profiler)
    assert pgbench is not None
    if profiler:
        print(f"(profiled by py-spy, collapsed stacks in {profile}: the sampler's CPU lowers these figures)")
    print(ours.line() + f"  service RSS {rss_mib:.0f} MiB")
    print(ours.cpu_line())
    print(pgbench.line())
    print(pgbench.cpu_line())
    ratio = ours.per_second / pgbench.per_second
    print(f"ratio: txroute transfers/s = {ratio:.2f} x pgbench tpcb-like TPS")
    if as_json:
        print_json({"ratio": round(ratio, 3), "per_second": round(ours.per_second, 1),
                    "pgbench_tps": round(pgbench.per_second, 1), "p50_ms": round(ours.percentile(0.50), 2),
                    "p99_ms": round(ours.percentile(0.99), 2), "rss_mib": round(rss_mib, 1),
                    "clients": clients, "errors": ours.errors,
                    "cpu_us_per_transfer": ours.cpu_us_per_op(), "cpu_us_per_pgbench_tx": pgbench.cpu_us_per_op()})
    return 0 if ours.errors == 0 else 1


def measure(
    *, clients: int, seconds: float, accounts: int, with_pgbench: bool, profiler: Profiler | None = None
) -> tuple[Figures, Figures | None, float]:
    """(txroute's figures, pgbench's on the same cluster or None, the service's RSS in MiB). The two run in
    ROUNDS interleaved rounds, so load from elsewhere on the machine falls on both alike. With `profiler`,
    the service is sampled during the measured rounds and the top functions printed."""
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    cluster = fresh_cluster("bench-ledger")
    service = region_service(REGION, cluster, cluster.folder / "region.log")
    rounds = ROUNDS if seconds >= ROUNDS else 1
    step_s = max(1, round(seconds / rounds))  # pgbench and wrk take whole seconds
    try:
        service.start()
        service.wait_ready()
        print(f"PostgreSQL {cluster.bin_dir}, fsync on, synchronous_commit on, shared_buffers 256MB; "
              f"{rounds} interleaved rounds of {step_s} s each")
        url, pick, auth = asyncio.run(_prepared(service.url, clients=clients, accounts=accounts))
        pgbench = _PgBench(cluster, clients=clients) if with_pgbench else None
        if profiler:
            assert service.process is not None
            profiler.start(service.process.pid, (step_s + (step_s if pgbench else 0)) * rounds)
        ours: list[Figures] = []
        theirs: list[Figures] = []
        for _ in range(rounds):
            meter = CpuMeter(cluster, service, "load generator")
            ours.append(asyncio.run(transfer_workload("", url, auth, pick, clients=clients, seconds=step_s)))
            ours[-1].cpu_s = meter.stop()
            if pgbench:
                meter = CpuMeter(cluster, None, "pgbench client")
                theirs.append(pgbench.run(step_s))
                theirs[-1].cpu_s = meter.stop()
        if profiler:
            print(profiler.report())
        rss_mib = _rss_mib(service)
    finally:
        service.stop()
        cluster.stop()
    merged_pgbench = None
    if pgbench:
        merged_pgbench = Figures.merged("pgbench tpcb-like (built-in)", theirs)
        merged_pgbench.latencies_ms = _pgbench_latencies(Path(cluster.folder))
    return Figures.merged("txroute transfers (HTTP)", ours), merged_pgbench, rss_mib


async def _prepared(url: str, *, clients: int, accounts: int) -> tuple[str, Callable[[int], tuple[str, str]], Direct]:
    """Accounts opened and funded, and a warm-up run: (url, pairs to transfer between, credentials)."""
    client_id = "bench-" + uuid.uuid4().hex[:8]
    ids = await open_accounts(url, client_id, accounts)
    auth = Direct(client_id)
    await transfer_workload("warm-up", url, auth, pairs_within(ids), clients=clients, seconds=WARM_UP_S)
    return url, pairs_within(ids), auth


class _PgBench:
    """pgbench tpcb-like (scale 10) on the benchmark's cluster, initialised once, then run for a few seconds
    at a time (its per-transaction log files are read at the end)."""

    def __init__(self, cluster: Cluster, *, clients: int) -> None:
        self._cluster, self._clients = cluster, clients
        self._env = {**os.environ, "PGPASSWORD": cluster.password()}
        self._base = [str(cluster.bin_dir / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
        subprocess.run([str(cluster.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(cluster.port),
                        "-U", "postgres", "pgbench"], env=self._env, check=True, capture_output=True, timeout=60)
        subprocess.run([*self._base, "-i", "-s", "10", "-q", "pgbench"], env=self._env, check=True,
                       capture_output=True, timeout=300)

    def run(self, seconds: int) -> Figures:
        out = subprocess.run(
            [*self._base, "-b", "tpcb-like", "-c", str(self._clients), "-j", str(min(self._clients, 2)),
             "-T", str(seconds), "-r", "--log", "--log-prefix", str(Path(self._cluster.folder) / "pgbench"),
             "pgbench"],
            env=self._env, check=True, capture_output=True, text=True, timeout=seconds + 120,
            cwd=str(self._cluster.folder),
        ).stdout
        tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
        return Figures("", int(tps * seconds), 0, seconds, [])


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

