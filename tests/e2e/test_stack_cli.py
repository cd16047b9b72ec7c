"""`txroute up --detach`, `status`, `down`, `up` again and `audit`, run as a user runs them: as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from app.local.processes import free_port
from app.security.tls import client_context

CLI_TIMEOUT_S = 180


def _txroute(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )


def _ports() -> list[str]:
    # Consecutive free ports cannot be promised; a base well away from the defaults, varied per run, is enough.
    base = 20_000 + (os.getpid() % 2_000) * 10
    return ["--region-port-base", str(base), "--pg-port-base", str(base + 5), "--router-port", str(free_port())]


def test_up_status_down_up_again_keeps_data_and_a_second_up_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    tmp_path.chmod(0o755)
    env = {**os.environ, "TXROUTE_STATE_DIR": str(state)}
    ports = _ports()
    router_port = ports[-1]
    up = _txroute(env, "up", "--detach", *ports)
    try:
        assert up.returncode == 0, f"expected `up --detach` to succeed: {up.stdout}\n{up.stderr}"
        status = _txroute(env, "status", "--json", *ports)
        rows = json.loads(status.stdout)
        assert all(row["ready"] for row in rows), f"expected every part ready: {rows}"
        assert {row.get("region") for row in rows} >= {"eu-north-1", "eu-west-1", "us-east-1"}
        # Internal TLS: the stack's own CA in .state/tls, regions on https verified with it (`curl --cacert`).
        tls = state / "tls"
        assert {p.name: p.stat().st_mode & 0o777 for p in tls.glob("*.key")} == {"ca.key": 0o600, "server.key": 0o600}
        regions = [row for row in rows if row.get("region")]
        assert all(row["url"].startswith("https://127.0.0.1:") for row in regions), regions
        health = httpx.get(regions[0]["url"] + "/healthz", verify=client_context(tls / "ca.pem"), timeout=10)
        assert health.status_code == 200, health.text

        again = _txroute(env, "up", "--detach", *ports)
        assert again.returncode != 0 and "already running" in again.stderr, again.stderr

        token = _txroute(env, "token", "--client", "cli-test").stdout.strip()
        url = f"http://127.0.0.1:{router_port}"
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            account = http.post("/v1/accounts", json={"currency": "EUR", "region": "us-east-1"},
                                headers={"idempotency-key": uuid.uuid4().hex}).json()["id"]
            deposit = http.post("/v1/deposits", json={"account": account, "amount": 4200, "currency": "EUR"},
                                headers={"idempotency-key": uuid.uuid4().hex})
            assert deposit.status_code == 201, deposit.text

        down = _txroute(env, "down", *ports)
        assert down.returncode == 0 and "router" in down.stdout, down.stdout
        assert not any(row["ready"] for row in json.loads(_txroute(env, "status", "--json", *ports).stdout))

        up = _txroute(env, "up", "--detach", *ports)
        assert up.returncode == 0, f"expected a second start to succeed: {up.stderr}"
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            read = http.get(f"/v1/accounts/{account}")
            assert read.status_code == 200 and read.json()["balance"] == 4200, f"expected data kept: {read.text}"
        audit = _txroute(env, "audit", *ports)
        assert audit.returncode == 0 and "OK: no violation" in audit.stdout, audit.stdout + audit.stderr
    finally:
        purge = _txroute(env, "down", "--purge", *ports)
        assert purge.returncode == 0, purge.stderr
    assert not state.exists(), "expected --purge to delete the state folder"
