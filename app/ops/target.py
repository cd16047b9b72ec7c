"""What `txroute ops` acts on: the local stack (its `.state/`) by default, or a deployed stack given its
endpoints and credentials.

    local      shard DSNs from the stack's clusters, the router and region URLs it runs, its dev key files
    deployed   --endpoint NAME=URL (router=..., or a region name) and --dsn SHARD=DSN (or --dsn-file with
               one SHARD=DSN a line). The drain flag, sagas and audits live in the shard databases, so the
               commands need no API credentials; `rotate-keys` prints the Secrets Manager steps instead.

A DSN carries a password; it is never printed: `redact` shows a DSN without it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from app import limits
from app.local import stack as local_stack
from app.security.tls import TlsConfigError, client_context, require_https
from app.topology.loader import load_topology
from app.topology.model import Topology

T = TypeVar("T")
OPS_DB_TIMEOUT_S = 5.0  # connect and each statement of an ops command, per shard
_PASSWORD = re.compile(r"(://[^:/@]+):[^@]*@")


class OpsError(RuntimeError):
    """An ops command cannot do what was asked; the message says why and what to do."""


@dataclass
class Target:
    topology: Topology
    shard_dsns: dict[str, str] = field(repr=False)
    router_urls: list[str]
    region_urls: dict[str, str]
    stack: local_stack.Stack | None = None
    # The CA that verifies the regions' (internal) certificates: the local stack's own; None for a deployed
    # stack, whose internal load balancers serve public ACM certificates (the system trust store).
    ca_file: Path | None = None

    @property
    def local(self) -> bool:
        return self.stack is not None

    def region_of(self, shard: str) -> str:
        return self.topology.shard(shard).region

    def shards_of(self, region: str) -> list[str]:
        return [s.name for s in self.topology.region(region).shards if s.name in self.shard_dsns]

    def tls(self) -> ssl.SSLContext:
        """What an ops command verifies the regions (and routers) it calls with."""
        if self.ca_file is not None and not self.ca_file.is_file():
            raise OpsError(f"the local stack has no CA yet ({self.ca_file}): start it with `txroute up`")
        return client_context(self.ca_file)

    def state_dir(self) -> Path | None:
        return self.stack.config.state if self.stack is not None else None


def redact(dsn: str) -> str:
    return _PASSWORD.sub(r"\1:***@", dsn)


def local_target(stack: local_stack.Stack) -> Target:
    router = next(s for s in stack.services if s.name == local_stack.ROUTER_NAME)
    regions = {s.env["TXROUTE_REGION"]: s.url for s in stack.services if s.name != local_stack.ROUTER_NAME}
    return Target(
        topology=stack.topology,
        shard_dsns=local_stack.shard_dsns(stack),
        router_urls=[router.url],
        region_urls=regions,
        stack=stack,
        ca_file=stack.tls.ca_file,
    )


def deployed_target(
    *, endpoints: list[str], dsns: list[str], dsn_file: Path | None, regions_dir: Path | None
) -> Target:
    topology = load_topology(regions_dir)
    routers: list[str] = []
    regions: dict[str, str] = {}
    for item in endpoints:
        name, url = _pair(item, "--endpoint NAME=URL")
        if name == "router":
            routers.append(url.rstrip("/"))
        else:
            topology.region(name)  # an unknown region fails here
            regions[name] = url.rstrip("/")
    pairs = list(dsns)
    if dsn_file is not None:
        try:
            lines = dsn_file.read_text().splitlines()
        except OSError as exc:
            raise OpsError(f"cannot read --dsn-file {dsn_file}: {type(exc).__name__}") from None
        pairs += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    try:  # a deployed stack's regions and routers are reached over TLS only, as the routers reach them
        require_https({**regions, **{f"router {u}": u for u in routers}}, what="--endpoint")
    except TlsConfigError as exc:
        raise OpsError(str(exc)) from None
    shard_dsns = {}
    for item in pairs:
        shard, dsn = _pair(item, "--dsn SHARD=DSN")
        topology.shard(shard)  # an unknown shard fails here
        shard_dsns[shard] = dsn
    if not shard_dsns:
        raise OpsError("a deployed stack needs its shard databases: --dsn SHARD=DSN (repeat) or --dsn-file")
    return Target(topology, shard_dsns, routers, regions, None)


def _pair(item: str, form: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise OpsError(f"expected {form}, got {item.split('=')[0]!r}=...")
    return name.strip(), value.strip()


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=min(OPS_DB_TIMEOUT_S, limits.DB_CONNECT_TIMEOUT_S),
                                 command_timeout=OPS_DB_TIMEOUT_S)


@dataclass
class ShardResult:
    shard: str
    value: Any = None
    error: str | None = None  # the shard could not be read: why, without the DSN


async def each_shard(
    target: Target, work: Callable[[asyncpg.Connection, str], Awaitable[T]], shards: list[str] | None = None
) -> list[ShardResult]:
    """Run `work(conn, shard)` on every shard (or `shards`) at once; an unreachable shard is reported, not
    raised, because the commands that read many shards are the ones a responder runs while one is down."""

    async def one(shard: str) -> ShardResult:
        try:
            conn = await connect(target.shard_dsns[shard])
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return ShardResult(shard, error=f"unreachable ({type(exc).__name__})")
        try:
            return ShardResult(shard, await work(conn, shard))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return ShardResult(shard, error=f"failed ({type(exc).__name__})")
        finally:
            await conn.close()

    names = sorted(target.shard_dsns) if shards is None else shards
    return list(await asyncio.gather(*(one(s) for s in names)))


def confirm(plan: list[str], yes: bool) -> bool:
    """Print what a mutating command will do; it goes ahead only with --yes."""
    print("plan:")
    for step in plan:
        print(f"  - {step}")
    if not yes:
        print("dry run: nothing changed (add --yes to do this)")
    return yes
