"""Least privilege in the database (DESIGN D8): the regional services log in as a role that may read and
call the ledger functions, and nothing else; provisioning (as the owner) grants it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.local.postgres import SERVICE_ROLE, Cluster
from app.local.processes import ServiceProcess
from app.store.migrate import migrate, migrations
from app.topology.model import Topology
from tests.helpers import ApiClient
from tests.integration.conftest import HOME_REGION

SHARD = "euw1-a"


@pytest.fixture
async def as_service(
    region_services: dict[str, ServiceProcess], pg_clusters: dict[str, Cluster], topology: Topology
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a shard of the home region as the service role (the running services use it too)."""
    cluster = pg_clusters[HOME_REGION]
    conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user=SERVICE_ROLE,
                                 password=cluster.service_password(), database=topology.shard(SHARD).database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("statement", [
    "update accounts set balance = balance + 1000",
    "insert into entries (transfer_id, account_id, amount, balance_after) values ('t', 'a', 1, 1)",
    "delete from idempotency",
    "truncate entries",
    "alter table entries disable trigger all",
    "alter table accounts drop constraint if exists accounts_balance_check",
    "update shard_info set draining_since = now()",
    "create table public.mine (x int)",
    "create temporary table mine (x int)",
])
async def test_the_service_role_cannot_write_tables_or_change_them(
    as_service: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute(statement)


async def test_the_service_role_reads_and_calls_the_ledger_functions(as_service: asyncpg.Connection) -> None:
    assert await as_service.fetchval("select count(*) from accounts") >= 0
    assert await as_service.fetchval("select txr_owns(0) is not null")
    # A write through a function: allowed, and changes nothing for an unknown transfer.
    assert await as_service.fetchval("select txr_outbox_failed('no-such-transfer', 10, 'test', false, 5)") is not True


async def test_the_running_services_post_transfers_as_the_service_role(
    api: ApiClient, pg_clusters: dict[str, Cluster]
) -> None:
    a, b = await api.new_account(), await api.new_account()
    await api.funded(a, 500)
    assert (await api.transfer(a, b, 200)).status_code == 201
    assert (await api.balance(a), await api.balance(b)) == (300, 200)
    owner = await asyncpg.connect(pg_clusters[HOME_REGION].dsn("postgres"))
    try:
        users = await owner.fetch(
            "select distinct usename from pg_stat_activity where application_name like 'txroute-region%'"
        )
    finally:
        await owner.close()
    assert [r["usename"] for r in users] == [SERVICE_ROLE], f"expected the services to log in as {SERVICE_ROLE}"


async def test_every_writing_function_runs_as_its_owner_with_a_pinned_search_path_and_public_may_run_none(
    pg_clusters: dict[str, Cluster], topology: Topology, region_services: dict[str, ServiceProcess]
) -> None:
    owner = await asyncpg.connect(pg_clusters[HOME_REGION].dsn(topology.shard(SHARD).database))
    try:
        writers = await owner.fetch(
            """select p.proname, p.prosecdef, p.proconfig from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname = 'public' and p.proname like 'txr\\_%' and p.provolatile = 'v'
                 and p.prorettype <> 'trigger'::regtype"""
        )
        # Trigger functions run as the caller: inside the writing functions, their owner. The service role may
        # write no table, so no trigger fires on its behalf outside them.
        triggers = await owner.fetch(
            """select p.proname, p.prosecdef, p.proconfig from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname = 'public' and p.prorettype = 'trigger'::regtype"""
        )
        service_writes = await owner.fetch(
            """select c.relname, x.privilege_type from pg_class c join pg_namespace n on n.oid = c.relnamespace
               cross join unnest(array['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) x(privilege_type)
               where n.nspname = 'public' and c.relkind in ('r', 'p')
                 and has_table_privilege($1, c.oid, x.privilege_type)""",
            SERVICE_ROLE,
        )
        public_may_run = await owner.fetch(
            """select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname = 'public' and has_function_privilege('public', p.oid, 'execute')"""
        )
    finally:
        await owner.close()
    assert {"txr_post", "txr_saga_apply", "txr_saga_settle", "txr_outbox_claim", "txr_outbox_failed"} <= {
        r["proname"] for r in writers
    }
    for r in writers:
        assert r["prosecdef"], f"expected {r['proname']} to be SECURITY DEFINER"
        assert "search_path=public, pg_temp" in (r["proconfig"] or []), f"expected {r['proname']}'s search_path pinned"
    assert public_may_run == [], f"expected PUBLIC to execute no function, got {[r['proname'] for r in public_may_run]}"
    assert {"txr_move_log", "txr_transfer_event", "txr_accounts_moved_fence"} <= {r["proname"] for r in triggers}
    for r in triggers:
        assert not r["prosecdef"] and not r["proconfig"], f"expected trigger {r['proname']} to run as the caller"
    assert service_writes == [], f"expected {SERVICE_ROLE} to write no table itself, got {service_writes}"


async def test_another_role_cannot_even_connect_to_a_shard(
    pg_clusters: dict[str, Cluster], topology: Topology, region_services: dict[str, ServiceProcess]
) -> None:
    cluster = pg_clusters[HOME_REGION]
    owner = await asyncpg.connect(cluster.dsn("postgres"))
    try:
        await owner.execute("drop role if exists txroute_stranger")
        await owner.execute("create role txroute_stranger login password 'stranger-pw'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="txroute_stranger",
                                  password="stranger-pw", database=topology.shard(SHARD).database)
    finally:
        await owner.execute("drop role if exists txroute_stranger")
        await owner.close()


async def test_migrations_alone_leave_every_writing_function_run_by_its_owner(
    pg_clusters: dict[str, Cluster], topology: Topology
) -> None:
    """Each migration applies the function security inside its own transaction, so no committed state has a
    writing function that a `create or replace` reset to run as its caller (a live service would meet it before
    the grants ran). Checked on a database migrated and never provisioned."""
    cluster = pg_clusters[HOME_REGION]
    database = f"migrated_only_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(cluster.dsn("postgres"))
    try:
        await admin.execute(f'create database "{database}"')
        conn = await asyncpg.connect(cluster.dsn(database))
        try:
            applied = await migrate(conn)
            wrong = await conn.fetch(
                """select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                   where n.nspname = 'public' and p.proname like 'txr\\_%' and p.prokind = 'f'
                     and (p.prorettype <> 'trigger'::regtype and p.provolatile = 'v'
                          and not (p.prosecdef and p.proconfig = array['search_path=public, pg_temp'])
                          or p.prorettype = 'trigger'::regtype and (p.prosecdef or p.proconfig is not null))""")
        finally:
            await conn.close()
    finally:
        await admin.execute(f'drop database if exists "{database}"')
        await admin.close()
    assert applied == [m.name for m in migrations()], applied
    assert wrong == [], f"expected migrations alone to leave every function's security right, got {wrong}"
