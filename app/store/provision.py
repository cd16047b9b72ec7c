"""Creates a shard's database, migrates it and records its first slot claim (DESIGN D2).

Run by `txroute up`, by the tests and by each regional service at start. The claim is written only when
the shard has none: after that the shard's own table, not `regions/`, says which slots it owns.
"""

from __future__ import annotations

import asyncpg

from app import limits
from app.store.migrate import migrate
from app.topology.model import Shard


async def provision_shard(server_dsn: str, shard: Shard) -> None:
    """`server_dsn` names the PostgreSQL server without a database (postgresql://user:pw@host:port)."""
    admin = await asyncpg.connect(server_dsn.rstrip("/") + "/postgres", timeout=limits.DB_CONNECT_TIMEOUT_S)
    try:
        exists = await admin.fetchval("select 1 from pg_database where datname = $1", shard.database)
        if not exists:
            try:
                await admin.execute(f'create database "{shard.database}"')  # name from the validated topology
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it first
    finally:
        await admin.close()
    conn = await asyncpg.connect(shard_dsn(server_dsn, shard), timeout=limits.DB_CONNECT_TIMEOUT_S)
    try:
        await migrate(conn)
        async with conn.transaction():
            claimed = await conn.fetchval("select count(*) from shard_info")
            if claimed == 0:
                await conn.execute(
                    "insert into shard_info (shard, region) values ($1, $2)", shard.name, shard.region
                )
                await conn.executemany(
                    "insert into slot_ownership (slot_lo, slot_hi, epoch, state) values ($1, $2, 1, 'owned')",
                    [(r.lo, r.hi) for r in shard.slots],
                )
            else:
                row = await conn.fetchrow("select shard, region from shard_info")
                assert row is not None
                if row["shard"] != shard.name:
                    raise RuntimeError(f"database {shard.database} holds shard {row['shard']}, not {shard.name}")
    finally:
        await conn.close()


def shard_dsn(server_dsn: str, shard: Shard) -> str:
    return server_dsn.rstrip("/") + "/" + shard.database
