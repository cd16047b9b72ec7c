"""The local multi-region stack: for every region of `regions/`, its PostgreSQL cluster and its regional
service, all on loopback, with their state in `.state/` (git-ignored) so data survives `down`/`up`.

`txroute up|down|status` (app/cli) drive this module. What runs is recorded in `.state/stack.json`, so a
second `up` sees the first, and `down`, `status`, `audit` or `txroute ops` from another shell find the
processes and every port (fixed by flags, or chosen by `up --ports auto`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import REPO_ROOT, ClientIssuerSettings
from app.local import ports
from app.local.postgres import Cluster, clusters_root, ensure_pg_user, find_pg_bin
from app.local.processes import ROUTER_FACTORY, ServiceProcess, asgi_command, region_process
from app.local.tls import LocalTls, ensure_local_tls
from app.security.keys import DevKeys, ensure_dev_keys
from app.topology.loader import load_topology
from app.topology.model import Topology

REGION_PORT_BASE_DEFAULT = 8101
ROUTER_PORT_DEFAULT = 8080
ROUTER_NAME = "router"
DEV_CLIENT_KID = "dev"
# The local dev client issuer (`txroute token`): the only issuer of the local router, so its namespace is
# every client id (prefix "").
DEV_CLIENT_ISSUER = "txroute-dev"
PG_PORT_BASE_DEFAULT = 15431


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message says why and what to do."""


def state_dir() -> Path:
    return Path(os.environ.get("TXROUTE_STATE_DIR") or REPO_ROOT / ".state")


@dataclass
class StackConfig:
    state: Path = field(default_factory=state_dir)
    regions_dir: Path | None = None
    region_port_base: int = REGION_PORT_BASE_DEFAULT
    pg_port_base: int = PG_PORT_BASE_DEFAULT
    router_port: int = ROUTER_PORT_DEFAULT
    # The region the local router says it runs in (accounts opened without a region land there).
    router_region: str | None = None
    # SIMULATED WAN round trip between regions (router to a remote region, region to region); 0 = off.
    wan_latency_ms: int = 0
    # Ports chosen per part ("router", "region-<r>", "postgres-<r>"), over the bases above: set by
    # `reserve_auto_ports` (`txroute up --ports auto`) and read back from stack.json.
    ports: dict[str, int] = field(default_factory=dict)


@dataclass
class Stack:
    config: StackConfig
    topology: Topology
    clusters: dict[str, Cluster]
    services: list[ServiceProcess]

    @property
    def record_file(self) -> Path:
        return self.config.state / "stack.json"

    @property
    def keys(self) -> DevKeys:
        """Dev signing keys (made by `up`): the dev client issuer's, the hop key and the saga key."""
        return DevKeys(self.config.state / "keys")

    @property
    def tls(self) -> LocalTls:
        """The stack's own CA and the certificate its regions serve (made by `up`, app/local/tls.py)."""
        return LocalTls(self.config.state / "tls")


def plan(config: StackConfig) -> Stack:
    """What the stack is made of; pure apart from finding the PostgreSQL binaries and user."""
    topology = load_topology(config.regions_dir)
    run_as = ensure_pg_user()
    bin_dir = find_pg_bin()
    root = clusters_root(config.state, run_as)
    clusters: dict[str, Cluster] = {}
    services: list[ServiceProcess] = []
    keys = DevKeys(config.state / "keys")
    tls = LocalTls(config.state / "tls")
    for i, region in enumerate(topology.regions):
        pg_port = config.ports.get(f"postgres-{region.name}", config.pg_port_base + i)
        cluster = Cluster(root / region.name, pg_port, run_as, bin_dir)
        clusters[region.name] = cluster
        # The service role's password file: re-read by the service after a refused login (a rotation).
        env = {
            "TXROUTE_HOP_PUBLIC_KEY": str(keys.hop_public),
            "TXROUTE_SAGA_PUBLIC_KEY": str(keys.saga_public),
            # The router's client issuers (public keys): a region serves the client token, not the hop's say-so.
            "TXROUTE_CLIENT_ISSUERS": _client_issuers(keys),
            "TXROUTE_DATABASE_PASSWORD_FILE": str(cluster.service_password_file),
            # A developer receives webhooks on http://127.0.0.1 (deployed: https and public addresses only).
            "TXROUTE_WEBHOOK_ALLOW_LOOPBACK": "1",
        }
        if config.regions_dir is not None:
            env["TXROUTE_REGIONS_DIR"] = str(config.regions_dir)
        log_file = config.state / "logs" / f"region-{region.name}.log"
        port = config.ports.get(f"region-{region.name}", config.region_port_base + i)
        services.append(region_process(region.name, cluster.port, port, log_file, tls=tls, **env))
    # Regions send saga messages to each other, signed with the saga key (which the router never gets).
    urls = json.dumps({s.env["TXROUTE_REGION"]: s.url for s in services})
    for service in services:
        service.env.update(
            TXROUTE_REGION_URLS=urls,
            TXROUTE_SAGA_PRIVATE_KEY=str(keys.saga_private),
            TXROUTE_WAN_LATENCY_MS=str(config.wan_latency_ms),
        )
    services.append(_router(config, topology, services, keys, tls))
    return Stack(config, topology, clusters, services)


def _client_issuers(keys: DevKeys) -> str:
    """The dev client issuer, which routers and regions both trust (its public key only)."""
    return ClientIssuerSettings.dumps(
        {DEV_CLIENT_ISSUER: ClientIssuerSettings(keys={DEV_CLIENT_KID: str(keys.client_public)}, client_prefix="")}
    )


def _router(
    config: StackConfig, topology: Topology, regions: list[ServiceProcess], keys: DevKeys, tls: LocalTls
) -> ServiceProcess:
    """The local router in front of every region; clients authenticate with `txroute token`. Its public
    listener is plain HTTP on loopback (in AWS the public load balancer ends the clients' TLS); its calls to
    the regions are HTTPS, verified with the stack's CA."""
    region = config.router_region or topology.regions[0].name
    topology.region(region)  # an unknown region fails here, not in the router's log
    env = {
        "TXROUTE_REGION": region,
        "TXROUTE_REGION_URLS": json.dumps({s.env["TXROUTE_REGION"]: s.url for s in regions}),
        "TXROUTE_CLIENT_ISSUERS": _client_issuers(keys),
        "TXROUTE_HOP_PRIVATE_KEY": str(keys.hop_private),
        "TXROUTE_INTERNAL_CA_FILE": str(tls.ca_file),
        "TXROUTE_WAN_LATENCY_MS": str(config.wan_latency_ms),
    }
    if config.regions_dir is not None:
        env["TXROUTE_REGIONS_DIR"] = str(config.regions_dir)
    port = config.ports.get(ROUTER_NAME, config.router_port)
    return ServiceProcess(
        name=ROUTER_NAME,
        argv=asgi_command(ROUTER_FACTORY, port),
        env=env,
        port=port,
        log_file=config.state / "logs" / "router.log",
    )


def reserve_auto_ports(config: StackConfig) -> ports.Reservation:
    """Choose a free port for every part of the stack (`txroute up --ports auto`) and set `config.ports`.

    The ports are reserved against other choosers (app/local/ports.py) until the caller releases the
    reservation, which it does once `up` has returned: by then every part listens on its port."""
    topology = load_topology(config.regions_dir)
    names = [ROUTER_NAME] + [f"{kind}-{r.name}" for r in topology.regions for kind in ("region", "postgres")]
    try:
        reservation = ports.reserve(len(names))
    except ports.NoFreePort as exc:
        raise StackError(str(exc)) from None
    config.ports = dict(zip(names, reservation.ports, strict=True))
    return reservation


def running_record(stack: Stack) -> dict[str, Any] | None:
    """The record of a stack started earlier whose processes still run, else None."""
    try:
        record: dict[str, Any] = json.loads(stack.record_file.read_text())
    except (OSError, ValueError):
        return None
    alive = [s for s in record.get("services", []) if _alive(int(s["pid"]))]
    return record if alive else None


def up(stack: Stack) -> None:
    """Start every cluster and service and wait until each is ready; record what runs."""
    if running_record(stack) is not None:
        raise StackError(f"the local stack is already running (see `txroute status`; {stack.record_file})")
    stack.config.state.mkdir(parents=True, exist_ok=True)
    ensure_dev_keys(stack.keys.folder)
    ensure_local_tls(stack.tls.folder)  # a missing or expiring CA or certificate is made again here
    for region, cluster in stack.clusters.items():
        cluster.init()
        cluster.start()
        # As the owner, before any service starts: the services log in as the service role only.
        cluster.provision(stack.topology.region(region).shards)
    for service in stack.services:
        service.start()
    try:
        for service in stack.services:
            service.wait_ready()
    except (RuntimeError, TimeoutError):
        down(stack)
        raise
    _write_record(stack)


def down(stack: Stack, *, purge: bool = False) -> list[str]:
    """Stop what runs (recorded or planned); with `purge` delete the local data too."""
    stopped: list[str] = []
    record = running_record(stack) or {"services": []}
    for entry in record["services"]:
        pid = int(entry["pid"])
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
                stopped.append(entry["name"])
            except ProcessLookupError:
                pass
    for service in stack.services:
        if service.process is not None and service.process.poll() is None:
            service.stop()
            stopped.append(service.name)
    for entry in record["services"]:
        _wait_gone(int(entry["pid"]))
    for name, cluster in stack.clusters.items():
        if cluster.is_running():
            cluster.stop()
            stopped.append(f"postgres-{name}")
    if stack.record_file.exists():  # nothing runs; the ports stay recorded for `status` and the next `ops`
        _write_record(stack, running=False)
    if purge:
        for cluster in stack.clusters.values():
            shutil.rmtree(cluster.folder, ignore_errors=True)
        shutil.rmtree(stack.config.state, ignore_errors=True)
    return stopped


def status(stack: Stack) -> list[dict[str, Any]]:
    """One row per region: its cluster, its service and their health, and its shards with their slots."""
    record = running_record(stack) or {"services": []}
    pids = {s["name"]: int(s["pid"]) for s in record["services"]}
    rows = []
    for service in stack.services:
        region = service.env.get("TXROUTE_REGION") if service.name != ROUTER_NAME else None
        pid = pids.get(service.name)
        row: dict[str, Any] = {
            "name": service.name,
            "url": service.url,
            "pid": pid if pid and _alive(pid) else None,
            "ready": service.answers("/readyz"),
        }
        if region is not None:
            cluster = stack.clusters[region]
            row["region"] = region
            row["postgres"] = {"port": cluster.port, "running": cluster.is_running(), "data": str(cluster.data_dir)}
            row["shards"] = [
                {"shard": s.name, "database": s.database, "slots": [str(r) for r in s.slots]}
                for s in stack.topology.region(region).shards
            ]
        rows.append(row)
    return rows


def restart_services(stack: Stack, names: list[str]) -> list[str]:
    """Stop the named services (if they run) and start them again with the stack's current settings and key
    files, all at once, then wait until each is ready; the record follows. Returns what was restarted.
    `txroute ops restart` and `txroute ops rotate-keys` use it; the other services keep running."""
    try:
        record: dict[str, Any] = json.loads(stack.record_file.read_text())
    except (OSError, ValueError):
        raise StackError("the local stack is not running (no stack.json): start it with `txroute up`") from None
    if not record.get("services"):
        raise StackError("the local stack is stopped (`txroute down`): start it with `txroute up`")
    by_name = {s.name: s for s in stack.services}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise StackError(f"no service named {unknown}; known: {sorted(by_name)}")
    pids = {e["name"]: int(e["pid"]) for e in record["services"]}
    for name in names:
        pid = pids.get(name)
        if pid is not None and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for name in names:
        if name in pids:
            _wait_gone(pids[name])
    for name in names:
        by_name[name].start()
    for name in names:
        by_name[name].wait_ready()
    for name in names:
        process = by_name[name].process
        assert process is not None
        entry = {"name": name, "pid": process.pid, "url": by_name[name].url, "log": str(by_name[name].log_file)}
        record["services"] = [e for e in record["services"] if e["name"] != name] + [entry]
    stack.record_file.write_text(json.dumps(record, indent=2))
    return names


def shard_dsns(stack: Stack) -> dict[str, str]:
    """Every shard's database DSN in the local stack (for `txroute audit`)."""
    return cluster_shard_dsns(stack.topology, stack.clusters)


def cluster_shard_dsns(topology: Topology, clusters: dict[str, Cluster]) -> dict[str, str]:
    """Every shard's database DSN, given each region's cluster (the stack's, or a test's own)."""
    return {shard.name: clusters[shard.region].dsn(shard.database) for shard in topology.shards}


def _write_record(stack: Stack, *, running: bool = True) -> None:
    services = [
        {"name": s.name, "pid": s.process.pid, "url": s.url, "log": str(s.log_file)}
        for s in stack.services
        if s.process is not None and running
    ]
    c = stack.config
    # Every port in use, by part: what `status`, `down`, `audit` and `txroute ops` use later, whatever flags
    # (or `--ports auto`) `up` was given.
    used = {s.name: s.port for s in stack.services} | {f"postgres-{r}": k.port for r, k in stack.clusters.items()}
    config = {
        "regions_dir": str(c.regions_dir) if c.regions_dir else None, "region_port_base": c.region_port_base,
        "pg_port_base": c.pg_port_base, "router_port": c.router_port, "router_region": c.router_region,
        "wan_latency_ms": c.wan_latency_ms, "ports": used,
    }
    stack.record_file.write_text(json.dumps({"services": services, "config": config}, indent=2))


def recorded_config(state: Path) -> StackConfig | None:
    """The configuration the stack in `state` was started with (None if it never recorded one)."""
    try:
        config = json.loads((state / "stack.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
    return StackConfig(
        state=state,
        regions_dir=Path(config["regions_dir"]) if config["regions_dir"] else None,
        region_port_base=int(config["region_port_base"]),
        pg_port_base=int(config["pg_port_base"]),
        router_port=int(config["router_port"]),
        router_region=config["router_region"],
        wan_latency_ms=int(config["wan_latency_ms"]),
        ports={str(name): int(port) for name, port in config.get("ports", {}).items()},
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int) -> None:
    from app import limits
    from app.local.postgres import wait_until

    if not wait_until(lambda: not _alive(pid), timeout_s=limits.PROCESS_STOP_TIMEOUT_S):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
