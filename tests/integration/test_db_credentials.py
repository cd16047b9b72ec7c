"""Database credentials against real PostgreSQL (issue 15.8): passwords holding every character a URL splits
on work end to end (provisioned by the deploy's migrate step, used by a running region), and a password
rotated while a region runs (the secret in Secrets Manager, served by moto; the role's password changed
in PostgreSQL) is read again on the first refused login, while requests keep being served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from app.config import REPO_ROOT
from app.local.ports import free_port
from app.local.postgres import SERVICE_ROLE, Cluster
from app.local.processes import ServiceProcess
from app.local.processes import region_process as local_region_process
from app.store.provision import ensure_service_role
from tests.conftest import copy_cluster
from tests.helpers import ApiClient, new_client_id, poll_until
from tests.keys import region_env
from tests.tls import session_tls

REGION = "eu-west-1"
URL_SPECIAL = "p#w?d%25[x]@y:z/ q'\"\\&=+;"  # every character a URL (or a naive quoting) would trip on
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


def migrate_step(cluster: Cluster, **service_password_env: str) -> subprocess.CompletedProcess[str]:
    """`python -m app.store.provision` as a deployment's migrate task runs it: the owner's credentials and
    the service role's password, each apart from any URL."""
    env = {
        **os.environ,
        "TXROUTE_REGION": REGION,
        "TXROUTE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{cluster.port}",
        "TXROUTE_DATABASE_PASSWORD": cluster.password(),
        **service_password_env,
    }
    return subprocess.run([sys.executable, "-m", "app.store.provision"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def service(cluster: Cluster, log_dir: Path, **env: str) -> ServiceProcess:
    return local_region_process(REGION, cluster.port, free_port(), log_dir / "region.log", tls=session_tls(),
                                **region_env(), **env)


@pytest.fixture
def moto_secrets() -> Iterator[str]:
    """A Secrets Manager endpoint (moto's server, on loopback) that a region process can be pointed at."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


async def test_a_password_with_url_special_characters_works_from_the_migrate_step_to_postings(
    work_dir: Path, pg_template: Cluster
) -> None:
    folder = work_dir / "url-special"
    cluster = copy_cluster(pg_template, folder / "pg")
    region = None
    try:
        done = migrate_step(cluster, TXROUTE_SERVICE_DATABASE_PASSWORD=URL_SPECIAL)
        assert done.returncode == 0, f"expected the migrate step to succeed: {done.stderr[-2000:]}"
        assert URL_SPECIAL not in done.stdout + done.stderr, "expected the password never printed"
        region = service(cluster, folder / "logs", TXROUTE_DATABASE_PASSWORD=URL_SPECIAL)
        region.start()
        region.wait_ready()
        async with httpx.AsyncClient(base_url=region.url, timeout=10.0, verify=region.verify) as http:
            api = ApiClient(http, new_client_id())
            a, b = await api.new_account(), await api.new_account()
            await api.funded(a, 100)
            assert (await api.transfer(a, b, 40)).status_code == 201
            assert (await api.balance(a), await api.balance(b)) == (60, 40)
        assert URL_SPECIAL not in region.log_file.read_text(), "expected the password never logged"
    finally:
        if region is not None:
            region.stop()
        cluster.stop(mode="immediate")


async def test_a_password_rotated_in_secrets_manager_while_the_region_runs_is_read_again_on_a_refused_login(
    work_dir: Path, pg_template: Cluster, moto_secrets: str
) -> None:
    folder = work_dir / "rotation"
    cluster = copy_cluster(pg_template, folder / "pg")
    secrets = boto3.client("secretsmanager", endpoint_url=moto_secrets, **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": REGION})
    second = "second-" + URL_SPECIAL
    arn = secrets.create_secret(Name="txroute/service")["ARN"]  # empty, as infra/ creates it
    region = None
    try:
        aws = {**AWS_ENV, "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_secrets}
        first: str | None = None
        for _ in range(2):  # the first run generates the password, the second keeps it
            done = migrate_step(cluster, TXROUTE_SERVICE_DATABASE_SECRET_ID=arn, **aws)
            assert done.returncode == 0, f"expected the migrate step to succeed: {done.stderr[-2000:]}"
            stored = json.loads(secrets.get_secret_value(SecretId=arn)["SecretString"])
            assert stored["username"] == SERVICE_ROLE and len(stored["password"]) >= 32
            first = first or stored["password"]
            assert stored["password"] == first, "expected a later migrate step to keep the password"
        region = service(cluster, folder / "logs", TXROUTE_DATABASE_SECRET_ID=arn, **aws)
        region.start()
        region.wait_ready()
        async with httpx.AsyncClient(base_url=region.url, timeout=10.0, verify=region.verify) as http:
            api = ApiClient(http, new_client_id())
            a, b = await api.new_account(), await api.new_account()
            await api.funded(a, 1_000)

            # Rotation: the secret first, then the role (what a rotation step does; the migrate step too).
            secrets.put_secret_value(SecretId=arn, SecretString=json.dumps(
                {"username": SERVICE_ROLE, "password": second}))
            await ensure_service_role(cluster.owner_endpoint(), SERVICE_ROLE, second)
            # Connections already open keep serving.
            assert (await api.transfer(a, b, 10)).status_code == 201, "expected service during the rotation"

            # Every connection the service holds goes away (a failover, or connections recycled): new logins
            # are needed, and the first with the password read at start is refused.
            owner = await asyncpg.connect(cluster.dsn("postgres"))
            try:
                killed_at = await owner.fetchval("select now()")
                pids = [r["pid"] for r in await owner.fetch(
                    "select pid from pg_stat_activity where usename = $1", SERVICE_ROLE)]
                assert pids, "expected the service to hold connections"
                await owner.execute("select pg_terminate_backend(pid) from unnest($1::int[]) pid", pids)

                async def logged_in_again(application: str) -> bool:
                    return bool(await owner.fetchval(
                        """select count(*) from pg_stat_activity
                           where usename = $1 and application_name = $2 and backend_start > $3""",
                        SERVICE_ROLE, application, killed_at))

                # The readiness probe logs in again within READINESS_CHECK_PERIOD_S: the service has seen the
                # connections go (its event loop ran since), and read the secret again on the refusal.
                await poll_until(lambda: logged_in_again("txroute-region-probe"), timeout_s=15.0,
                                 what="the readiness probe logged in with the rotated password")
                transfer = await api.transfer(a, b, 20)
                assert transfer.status_code == 201, f"expected the transfer served on new connections: {transfer.text}"
                assert (await api.balance(a), await api.balance(b)) == (970, 30)
                assert await logged_in_again("txroute-region"), "expected the pool logged in with the rotated password"
            finally:
                await owner.close()
        log_text = region.log_file.read_text()
        assert "database_password_stale" in log_text, "expected the refused login to trigger a re-read"
        assert first and first not in log_text and second not in log_text, "expected no password in the log"
    finally:
        if region is not None:
            region.stop()
        cluster.stop(mode="immediate")
