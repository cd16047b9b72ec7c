"""Provisioning, as the owner role: a region's shard databases are created and migrated, their first slot
claim recorded (DESIGN D2), and the least-privilege service role the regional services log in as is created
and granted what it may do (DESIGN D8).

It runs before the services start, never inside them, so the owner's password never reaches a service:
`txroute up` and the tests call it (app/local/postgres.py), a deployment runs it as a one-off task
(`python -m app.store.provision`, infra/README.md). Every step is idempotent, so it runs on every deploy.

What the service role may do: connect, read every table, execute the functions. It owns nothing, so it
cannot alter a table or disable a trigger, and it is granted no INSERT, UPDATE, DELETE or TRUNCATE: every
write goes through a ledger function. Those that write are SECURITY DEFINER: they run as the owner that
defined them, with `search_path` pinned, so a caller cannot slip its own objects in ahead of the tables.
The grants are made here, after every migration, so functions that later migrations add are covered by the
same rule without each migration repeating it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from app.store.access import AccessError, DatabaseEndpoint, endpoint_from_env, password_from_env
from app.store.migrate import FUNCTION_SECURITY_SQL, LOCK_ID, migrate
from app.topology.loader import load_topology
from app.topology.model import Shard

log = logging.getLogger("txroute.provision")

SERVICE_ROLE_DEFAULT = "txroute_service"
# Length of the service role's generated password (Secrets Manager's GetRandomPassword, printable ASCII).
_GENERATED_PASSWORD_CHARS = 40
# SCRAM iterations of the stored verifier: PostgreSQL's default (scram_iterations).
_SCRAM_ITERATIONS = 4096

# Run as the owner in each shard database, after the migrations; idempotent. `{role}` is quoted by format().
_GRANTS = (
    # Only the owner and the service role may connect; nobody else may create objects or temporary tables.
    "revoke all on database {database} from public",
    "grant connect on database {database} to {role}",
    "revoke create on schema public from public",
    "grant usage on schema public to {role}",
    "grant select on all tables in schema public to {role}",
    "alter default privileges in schema public grant select on tables to {role}",
    FUNCTION_SECURITY_SQL,  # app/store/migrate.py: also applied inside each migration's own transaction
    "revoke execute on all functions in schema public from public",
    "grant execute on all functions in schema public to {role}",
    "alter default privileges in schema public revoke execute on functions from public",
    "alter default privileges in schema public grant execute on functions to {role}",
)


async def provision_region(
    owner: DatabaseEndpoint, shards: Sequence[Shard], *, service_role: str, service_password: str
) -> None:
    """Create or update the service role (its password too), then provision every shard."""
    await ensure_service_role(owner, service_role, service_password)
    for shard in shards:
        await provision_shard(owner, shard, service_role=service_role)


async def ensure_service_role(owner: DatabaseEndpoint, role: str, password: str) -> None:
    """The role exists, may log in with `password` and holds no other attribute. Only a SCRAM verifier of the
    password is sent, so the password itself never reaches the server's statement log."""
    verifier = scram_verifier(password)
    attributes = "login nosuperuser nocreatedb nocreaterole noinherit noreplication nobypassrls"
    conn = await owner.connect("postgres")
    try:
        exists = await conn.fetchval("select 1 from pg_roles where rolname = $1", role)
        if not exists:
            statement = await conn.fetchval("select format('create role %I', $1::text)", role)
            try:
                await conn.execute(statement)
            except asyncpg.DuplicateObjectError:
                pass  # created by a concurrent provisioning run
        statement = await conn.fetchval(
            f"select format('alter role %I {attributes} password %L', $1::text, $2::text)", role, verifier
        )
        await conn.execute(statement)
    finally:
        await conn.close()


async def provision_shard(owner: DatabaseEndpoint, shard: Shard, *, service_role: str) -> None:
    admin = await owner.connect("postgres")
    try:
        exists = await admin.fetchval("select 1 from pg_database where datname = $1", shard.database)
        if not exists:
            try:
                await admin.execute(f'create database "{shard.database}"')  # name from the validated topology
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it first
    finally:
        await admin.close()
    conn = await owner.connect(shard.database)
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
        await grant_service_role(conn, service_role, shard.database)
    finally:
        await conn.close()


async def grant_service_role(conn: asyncpg.Connection, role: str, database: str) -> None:
    """Apply `_GRANTS` in one transaction, serialised with the migrations of other provisioning runs."""
    quoted_role = await conn.fetchval("select quote_ident($1::text)", role)
    quoted_database = await conn.fetchval("select quote_ident($1::text)", database)
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", LOCK_ID)
        for statement in _GRANTS:
            await conn.execute(statement.format(role=quoted_role, database=quoted_database))


def scram_verifier(password: str, *, iterations: int = _SCRAM_ITERATIONS) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (RFC 5802/7677, as `ALTER ROLE ... PASSWORD`
    accepts it). Printable ASCII only: for it SASLprep, which clients and server apply, changes nothing."""
    if not password or not all(" " <= c <= "~" for c in password):
        raise ValueError("database passwords must be non-empty printable ASCII")
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def ensure_secret_value(secret_id: str, role: str) -> None:
    """A deployment's first migrate step fills the service role's secret (created empty by infra/) with a
    generated password, so no person ever sees it; later runs leave it as it is (a rotation is a new value
    put into the secret, then a migrate step, which sets it on the role: infra/README.md)."""
    import boto3  # the `aws` extra
    from botocore.exceptions import ClientError

    client = boto3.client("secretsmanager")
    try:
        client.get_secret_value(SecretId=secret_id)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
    password = client.get_random_password(PasswordLength=_GENERATED_PASSWORD_CHARS)["RandomPassword"]
    client.put_secret_value(SecretId=secret_id, SecretString=json.dumps({"username": role, "password": password}))
    print(f"generated the service role's password into its secret ({role})")


async def _main() -> None:
    """The migrate step of a deployment: TXROUTE_REGION, the owner's TXROUTE_DATABASE_URL and its password
    (TXROUTE_DATABASE_PASSWORD, _PASSWORD_FILE or _SECRET_ID, SSLMODE, SSL_ROOT_CERT as for the service),
    and the service role's TXROUTE_SERVICE_DATABASE_USER (default txroute_service) and password
    (TXROUTE_SERVICE_DATABASE_PASSWORD, _PASSWORD_FILE or _SECRET_ID)."""
    env = os.environ
    region_name = env.get("TXROUTE_REGION", "")
    if not region_name:
        raise AccessError("TXROUTE_REGION is required")
    owner = endpoint_from_env(env)
    role = env.get("TXROUTE_SERVICE_DATABASE_USER") or SERVICE_ROLE_DEFAULT
    if env.get("TXROUTE_SERVICE_DATABASE_SECRET_ID"):
        await asyncio.to_thread(ensure_secret_value, env["TXROUTE_SERVICE_DATABASE_SECRET_ID"], role)
    service_password = password_from_env(env, prefix="TXROUTE_SERVICE_DATABASE")
    if service_password is None:
        raise AccessError("the service role's password is required: TXROUTE_SERVICE_DATABASE_SECRET_ID (or "
                          "_PASSWORD, _PASSWORD_FILE)")
    regions_dir = Path(env["TXROUTE_REGIONS_DIR"]) if env.get("TXROUTE_REGIONS_DIR") else None
    region = load_topology(regions_dir).region(region_name)
    await provision_region(owner, region.shards, service_role=role, service_password=await service_password())
    print(f"provisioned region {region.name}: shards {', '.join(s.name for s in region.shards)}; "
          f"service role {role}")


if __name__ == "__main__":
    try:
        asyncio.run(_main())
    except AccessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
