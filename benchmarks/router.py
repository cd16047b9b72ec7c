"""`txroute bench router` (or `python -m benchmarks.router`): the router's cost. The same transfer workload
is sent straight to a regional service (with a hop token bound to each request, minted by the load generator
as the router would mint it) and through the
router (with a client token), in one run, and both are printed with the router's cost as a throughput ratio
and as added milliseconds at p50 and p99.

The router reaches the region over TLS, verified with a CA (app/security/tls.py), as everywhere. Each
measurement runs as ROUNDS interleaved rounds of all the paths, so outside load falls on each alike. With
`--internal-tls both`, a second region process (same database, plain HTTP) and a second router (allowed
plaintext by TXROUTE_INTERNAL_PLAINTEXT, the benchmark-only knob) are started too, and the same workloads
run through both in the same run, plus account reads through each router (no commit, so the database's
noise does not hide the hop's cost): the difference of the routed p50s is what internal TLS adds per request
(`--internal-tls off` measures the plaintext pair alone).

Everything is started here: a fresh durable cluster, the regional service(s) and router(s) (granian, one
worker each), and the load (wrk, or this process's aiohttp where wrk is missing; C concurrent clients, one
request at a time each). All share this machine's cores, so the router's CPU is taken from the region's and
the load's: on separate hosts its cost would be the added latency only. `--pin` puts the router and the
region on different cores (taskset), the nearest this machine comes to separate hosts.

Account reads are measured too, straight and through the router: they commit nothing, so the database's
fsync (which dominates a transfer's latency on a busy disk) does not hide the hop's cost. The router's and the
region's CPU per request are printed too (and in `--json`): unlike throughput and latency
they hardly move when other work shares the machine, so they compare runs made under different outside load.
`--profile FILE` samples the router with py-spy during the measured rounds (benchmarks/profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.local.ports import free_port
from app.local.processes import ROUTER_FACTORY, ServiceProcess, asgi_command
from app.topology.loader import load_topology
from benchmarks.client import Direct, Routed, router_env
from benchmarks.common import (
    GENERATORS,
    WARM_UP_S,
    Figures,
    bench_tls,
    cpu_s,
    fresh_cluster,
    open_accounts,
    pairs_within,
    plain_region_service,
    print_json,
    read_workload,
    region_service,
    transfer_workload,
    use_generator,
)
from benchmarks.profile import Profiler

REGION = "eu-west-1"
ROUNDS = 5  # each measurement is split into this many interleaved rounds
MODES = ("on", "off", "both")
ROUTER_CPU, REGION_CPU = 0, 1  # `--pin`: the two cores of the machine this benchmark's figures come from


def run(*, clients: int, seconds: float, accounts: int, internal_tls: str = "on", pin: bool = False,
        generator: str = "auto", as_json: bool = False, profile: Path | None = None) -> int:
    assert internal_tls in MODES
    modes = ("on", "off") if internal_tls == "both" else (internal_tls,)
    print(f"txroute bench router: {clients} clients, {seconds:.0f} s each, {accounts} accounts, one shard, "
          f"internal TLS {' and '.join(modes)}"
          + (f", router pinned to CPU {ROUTER_CPU} and region to CPU {REGION_CPU} (taskset)" if pin else ""))
    use_generator(generator)
    profiler = Profiler(profile) if profile else None
    measured = measure_modes(modes, clients=clients, seconds=seconds, accounts=accounts, pin=pin, profiler=profiler)
    if profiler:
        print(f"(the router profiled by py-spy, collapsed stacks in {profile}: the sampler's CPU lowers these "
              "figures)")
    summary: dict[str, object] = {}
    for mode, paths in measured.items():
        direct, routed = paths.direct, paths.routed
        print(direct.line())
        print(routed.line())
        ratio = routed.per_second / direct.per_second if direct.per_second else float("nan")
        print(
            f"router cost (internal TLS {mode}): {ratio:.2f} x direct throughput ({(1 - ratio) * 100:.0f}% less); "
            f"+{routed.percentile(0.50) - direct.percentile(0.50):.2f} ms at p50, "
            f"+{routed.percentile(0.99) - direct.percentile(0.99):.2f} ms at p99"
        )
        assert paths.reads is not None and paths.direct_reads is not None
        reads, direct_reads = paths.reads, paths.direct_reads
        print(direct_reads.line())
        print(reads.line())
        reads_ratio = reads.per_second / direct_reads.per_second if direct_reads.per_second else float("nan")
        print(f"router cost on reads (internal TLS {mode}): {reads_ratio:.2f} x direct throughput; "
              f"+{reads.percentile(0.50) - direct_reads.percentile(0.50):.2f} ms at p50, "
              f"+{reads.percentile(0.99) - direct_reads.percentile(0.99):.2f} ms at p99")
        print(f"CPU per request (internal TLS {mode}): router {paths.router_cpu_ms:.3f} ms per forwarded call, "
              f"region {paths.region_cpu_ms:.3f} ms per call")
        summary = summary or {  # the first mode's (TLS on, as deployed, unless --internal-tls off)
            "ratio": round(ratio, 3), "internal_tls": mode,
            "p50_added_ms": round(routed.percentile(0.50) - direct.percentile(0.50), 2),
            "p99_added_ms": round(routed.percentile(0.99) - direct.percentile(0.99), 2),
            "direct_per_s": round(direct.per_second, 1), "routed_per_s": round(routed.per_second, 1),
            "router_cpu_ms": round(paths.router_cpu_ms, 3), "region_cpu_ms": round(paths.region_cpu_ms, 3),
            "reads_ratio": round(reads_ratio, 3),
            "reads_p50_added_ms": round(reads.percentile(0.50) - direct_reads.percentile(0.50), 2),
            "reads_p99_added_ms": round(reads.percentile(0.99) - direct_reads.percentile(0.99), 2),
        }
    if len(measured) == 2:
        on, off = measured["on"], measured["off"]
        for what, with_tls, without in (("transfers", on.routed, off.routed), ("reads", on.reads, off.reads)):
            assert with_tls is not None and without is not None
            print(
                f"internal TLS at the router, {what}: +{with_tls.percentile(0.50) - without.percentile(0.50):.2f} ms "
                f"at p50, +{with_tls.percentile(0.99) - without.percentile(0.99):.2f} ms at p99, "
                f"{with_tls.per_second / without.per_second if without.per_second else float('nan'):.2f} x "
                "throughput (on vs off)"
            )
        print(
            f"CPU per request, TLS on vs off: router {on.router_cpu_ms:.3f} vs {off.router_cpu_ms:.3f} ms per "
            f"forwarded call; region {on.region_cpu_ms:.3f} vs {off.region_cpu_ms:.3f} ms per call"
        )
    if as_json:
        print_json({**summary, "pinned": pin, "clients": clients})
    return 0 if all(f.errors == 0 for paths in measured.values() for f in paths.all()) else 1


@dataclass
class Paths:
    """One internal-TLS mode's figures: transfers and account reads (which commit nothing, so the hop and TLS
    are a larger share) straight to the region and through the router."""

    direct: Figures
    routed: Figures
    reads: Figures | None = None
    direct_reads: Figures | None = None
    # CPU per request over the measured rounds (ms): the router's per forwarded call, the region's per call.
    router_cpu_ms: float = float("nan")
    region_cpu_ms: float = float("nan")

    def all(self) -> list[Figures]:
        return [self.direct, self.routed, *(f for f in (self.reads, self.direct_reads) if f is not None)]


def measure(*, clients: int, seconds: float, accounts: int) -> tuple[Figures, Figures]:
    """(straight to the region, through the router) for the same workload, in one run, internal TLS on."""
    paths = measure_modes(("on",), clients=clients, seconds=seconds, accounts=accounts)["on"]
    return paths.direct, paths.routed


def measure_modes(
    modes: Sequence[str], *, clients: int, seconds: float, accounts: int, pin: bool = False,
    profiler: Profiler | None = None,
) -> dict[str, Paths]:
    """Per internal-TLS mode ("on", "off"): its paths' figures, all from one run. With `pin`, every router
    runs on ROUTER_CPU and every region on REGION_CPU (taskset), so they no longer take each other's core;
    PostgreSQL and the load generator still float over both. With `profiler`, the first mode's router is
    sampled during the measured rounds."""
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    assert modes and set(modes) <= {"on", "off"}
    cluster = fresh_cluster("bench-router")
    pairs: dict[str, tuple[ServiceProcess, ServiceProcess]] = {}
    for mode in modes:
        log_file = cluster.folder / f"region-tls-{mode}.log"
        region = (region_service if mode == "on" else plain_region_service)(REGION, cluster, log_file)
        router = router_for(region, cluster.folder / f"router-tls-{mode}.log")
        if pin:
            region.argv = ["taskset", "--cpu-list", str(REGION_CPU), *region.argv]
            router.argv = ["taskset", "--cpu-list", str(ROUTER_CPU), *router.argv]
        pairs[mode] = (region, router)
    started: list[ServiceProcess] = []
    try:
        # Regions one after the other: the first provisions the shard databases, the second finds them (two
        # provisioning at once race on CREATE DATABASE). Then the routers.
        for region, _ in pairs.values():
            started.append(region)
            region.start()
            region.wait_ready()
        for _, router in pairs.values():
            started.append(router)
            router.start()
        for _, router in pairs.values():
            router.wait_ready()
        return asyncio.run(_all(pairs, clients=clients, seconds=seconds, accounts=accounts, profiler=profiler))
    finally:
        for process in reversed(started):
            process.stop()
        cluster.stop()


def router_for(region: ServiceProcess, log_file: Path, *, others: dict[str, str] | None = None) -> ServiceProcess:
    """A router in front of `region` (every region of the topology points at it, but those `others` names with
    their own URLs; the workloads touch only the regions started), over TLS when the region serves it."""
    urls = {r.name: (others or {}).get(r.name, region.url) for r in load_topology().regions}
    tls_env = ({"TXROUTE_INTERNAL_CA_FILE": str(bench_tls().ca_file)} if region.tls
               else {"TXROUTE_INTERNAL_PLAINTEXT": "1"})
    port = free_port()
    return ServiceProcess(
        name=f"bench-router-tls-{'on' if region.tls else 'off'}",
        argv=asgi_command(ROUTER_FACTORY, port),
        env={"TXROUTE_REGION": REGION, "TXROUTE_REGION_URLS": json.dumps(urls), **tls_env, **router_env()},
        port=port,
        log_file=log_file,
    )


async def _all(
    processes: dict[str, tuple[ServiceProcess, ServiceProcess]], *, clients: int, seconds: float, accounts: int,
    profiler: Profiler | None = None,
) -> dict[str, Paths]:
    urls = {mode: (region.url, router.url) for mode, (region, router) in processes.items()}
    client_id = "bench-" + uuid.uuid4().hex[:8]
    first_region = next(iter(urls.values()))[0]
    ids = await open_accounts(first_region, client_id, accounts)
    pick = pairs_within(ids)
    direct_headers, routed_headers = Direct(client_id), Routed(client_id)
    # A warm-up for each path (connections, caches), then the measured runs.
    for region_url, router_url in urls.values():
        await transfer_workload("warm-up", region_url, direct_headers, pick, clients=clients, seconds=WARM_UP_S)
        await transfer_workload("warm-up", router_url, routed_headers, pick, clients=clients, seconds=WARM_UP_S)
    # Interleaved rounds (every path of every mode, then again): load from elsewhere on the machine falls on
    # every path alike instead of on whichever ran during a busy stretch.
    step_s = seconds / ROUNDS
    rounds: dict[str, tuple[list[Figures], ...]] = {m: ([], [], [], []) for m in urls}
    cpu_before = {m: (cpu_s(region), cpu_s(router)) for m, (region, router) in processes.items()}
    if profiler:
        profiled = next(iter(processes.values()))[1].process
        assert profiled is not None
        # Every round of every path: the router is idle during the direct rounds, which the profile counts apart.
        profiler.start(profiled.pid, seconds * len(urls) * 4)
    for _ in range(ROUNDS):
        for mode, (region_url, router_url) in urls.items():
            direct, routed, reads, direct_reads = rounds[mode]
            # Direct calls sign a hop token per request (Direct), as the router does.
            direct.append(await transfer_workload("", region_url, direct_headers, pick, clients=clients,
                                                  seconds=step_s))
            routed.append(await transfer_workload("", router_url, routed_headers, pick, clients=clients,
                                                  seconds=step_s))
            direct_reads.append(await read_workload("", region_url, direct_headers, ids, clients=clients,
                                                    seconds=step_s))
            reads.append(await read_workload("", router_url, routed_headers, ids, clients=clients, seconds=step_s))
    if profiler:
        print(profiler.report())
    figures = {}
    for mode, (direct, routed, reads, direct_reads) in rounds.items():
        suffix = f" (TLS {mode})" if len(urls) > 1 else ""
        paths = Paths(Figures.merged("direct to the region" + suffix, direct),
                      Figures.merged("through the router" + suffix, routed),
                      Figures.merged("reads via the router" + suffix, reads),
                      Figures.merged("reads direct" + suffix, direct_reads))
        region, router = processes[mode]
        # The router serves only the routed calls; the region serves every call of its mode.
        assert paths.reads is not None and paths.direct_reads is not None
        forwarded = paths.routed.calls + paths.reads.calls
        served = forwarded + paths.direct.calls + paths.direct_reads.calls
        paths.router_cpu_ms = (cpu_s(router) - cpu_before[mode][1]) * 1000 / max(forwarded, 1)
        paths.region_cpu_ms = (cpu_s(region) - cpu_before[mode][0]) * 1000 / max(served, 1)
        figures[mode] = paths
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router", description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--internal-tls", choices=MODES, default="on")
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--generator", choices=GENERATORS, default="auto")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE")
    args = parser.parse_args()
    return run(clients=args.clients, seconds=args.seconds, accounts=args.accounts, internal_tls=args.internal_tls,
               pin=args.pin, generator=args.generator, as_json=args.json, profile=args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
