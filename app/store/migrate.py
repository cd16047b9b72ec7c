"""Applies the plain SQL migrations in `app/store/migrations/` to one shard database, in order, once.

Each file runs in its own transaction together with its row in `schema_migrations`, under an advisory lock,
so two processes starting at once apply it once. A file edited after it was applied is refused (its checksum
no longer matches): migrations are append-only, like the ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
LOCK_ID = 0x7478_726F  # "txro"


class MigrationError(RuntimeError):
    """A migration file changed after it was applied, or the files are misnamed."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        number, _, rest = path.stem.partition("_")
        if not number.isdigit() or not rest:
            raise MigrationError(f"{path}: migration files are named NNNN_description.sql")
        found.append(Migration(int(number), path.stem, path.read_text()))
    versions = [m.version for m in found]
    # Numbers are handed out ahead of time to changes made in parallel, so one may land before a lower one:
    # a gap is allowed, a duplicate number is not (each applies once, in number order, whenever it arrives).
    if len(set(versions)) != len(versions) or any(v < 1 for v in versions):
        raise MigrationError(f"{MIGRATIONS_DIR}: versions must be distinct numbers from 1, got {versions}")
    return found


# Every ledger function that may write runs as its owner with a pinned search_path; the rest (stable
# readers such as txr_owns) run as the caller, who may read. Trigger functions run as the caller too: the
# service role writes no table itself, so a trigger fires only inside those functions, as their owner and
# under their search_path, and the wrapping (a save and restore of every setting per row) only cost time.
# Applied after each migration inside its transaction (a migration's `create or replace` resets a function to
# run as its caller: a service still running would meet a writing function without its owner's rights until
# grants ran apart), and again with the grants (app/store/provision.py). It alters only functions not yet
# as they should be.
FUNCTION_SECURITY_SQL = """do $$
       declare f regprocedure;
       begin
           for f in select p.oid::regprocedure from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                    where n.nspname = 'public' and p.proname like 'txr\\_%' and p.prokind = 'f'
                      and p.provolatile = 'v' and p.prorettype <> 'trigger'::regtype
                      and not (p.prosecdef and p.proconfig = array['search_path=public, pg_temp'])
           loop
               execute format('alter function %s security definer set search_path = public, pg_temp', f);
           end loop;
           for f in select p.oid::regprocedure from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                    where n.nspname = 'public' and p.prorettype = 'trigger'::regtype
                      and (p.prosecdef or p.proconfig is not null)
           loop
               execute format('alter function %s security invoker reset all', f);
           end loop;
       end $$"""


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the names applied now."""
    applied_now: list[str] = []
    await conn.execute(
        """create table if not exists schema_migrations (
               version integer primary key, name text not null, checksum text not null,
               applied_at timestamptz not null default now())"""
    )
    await conn.execute("select pg_advisory_lock($1)", LOCK_ID)
    try:
        rows = await conn.fetch("select version, checksum from schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for m in migrations():
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(f"migration {m.name} changed after it was applied; add a new one")
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(FUNCTION_SECURITY_SQL)
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    m.version, m.name, m.checksum,
                )
            applied_now.append(m.name)
    finally:
        await conn.execute("select pg_advisory_unlock($1)", LOCK_ID)
    return applied_now


async def is_migrated(conn: asyncpg.Connection) -> bool:
    """The database holds at least every migration this code knows. A newer one counts too: a deploy
    migrates before its new tasks start (migrations only add), and the old tasks keep serving meanwhile."""
    if await conn.fetchval("select to_regclass('schema_migrations')") is None:
        return False
    applied = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
    return applied >= {m.version for m in migrations()}
