"""`txroute up --detach`, `status`, `down`, `up` again and `audit`, run as a user runs them: as subprocesses.

Every stack here lets `up` choose its ports (`--ports auto`); the later commands take no port flag and must
find the ports `up` recorded in stack.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from app.local import stack as local_stack
from app.local.ports import ephemeral_lo, reserve
from app.security.tls import client_context

CLI_TIMEOUT_S = 180


def _txroute(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "TXROUTE_STATE_DIR": str(state)}


def _recorded_ports(state: Path) -> dict[str, int]:
    ports: dict[str, int] = json.loads((state / "stack.json").read_text())["config"]["ports"]
    return ports


def _status_ports(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The port of every part, as `status --json` shows it."""
    shown = {row["name"]: int(row["url"].rsplit(":", 1)[1]) for row in rows}
    shown |= {f"postgres-{row['region']}": int(row["postgres"]["port"]) for row in rows if "postgres" in row}
    return shown


def test_up_status_down_up_again_keeps_data_and_a_second_up_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    tmp_path.chmod(0o755)
    env = _env(state)
    up = _txroute(env, "up", "--detach", "--ports", "auto")
    try:
        assert up.returncode == 0, f"expected `up --detach --ports auto` to succeed: {up.stdout}\n{up.stderr}"
        ports = _recorded_ports(state)
        assert set(ports) == {"router"} | {f"{kind}-{r}" for r in ("eu-north-1", "eu-west-1", "us-east-1")
                                           for kind in ("region", "postgres")}, ports
        assert len(set(ports.values())) == len(ports), f"expected distinct ports: {ports}"
        assert all(port < ephemeral_lo() for port in ports.values()), f"expected no ephemeral port: {ports}"

        status = _txroute(env, "status", "--json")
        rows = json.loads(status.stdout)
        assert all(row["ready"] for row in rows), f"expected every part ready: {rows}"
        assert _status_ports(rows) == ports, f"expected `status` to show the recorded ports {ports}: {rows}"
        text = _txroute(env, "status").stdout
        assert all(f":{port}" in text for port in ports.values()), f"expected every port in `status`: {text}"
        # Internal TLS: the stack's own CA in .state/tls, regions on https verified with it (`curl --cacert`).
        tls = state / "tls"
        assert {p.name: p.stat().st_mode & 0o777 for p in tls.glob("*.key")} == {"ca.key": 0o600, "server.key": 0o600}
        regions = [row for row in rows if row.get("region")]
        assert all(row["url"].startswith("https://127.0.0.1:") for row in regions), regions
        health = httpx.get(regions[0]["url"] + "/healthz", verify=client_context(tls / "ca.pem"), timeout=10)
        assert health.status_code == 200, health.text

        again = _txroute(env, "up", "--detach", "--ports", "auto")
        assert again.returncode != 0 and "already running" in again.stderr, again.stderr

        token = _txroute(env, "token", "--client", "cli-test").stdout.strip()
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['router']}", timeout=30, headers=headers) as http:
            account = http.post("/v1/accounts", json={"currency": "EUR", "region": "us-east-1"},
                                headers={"idempotency-key": uuid.uuid4().hex}).json()["id"]
            deposit = http.post("/v1/deposits", json={"account": account, "amount": 4200, "currency": "EUR"},
                                headers={"idempotency-key": uuid.uuid4().hex})
            assert deposit.status_code == 201, deposit.text

        down = _txroute(env, "down")
        assert down.returncode == 0 and "router" in down.stdout, down.stdout
        stopped = json.loads(_txroute(env, "status", "--json").stdout)
        assert _status_ports(stopped) == ports, f"expected `status` after `down` to show the last ports: {stopped}"
        assert not any(row["ready"] or row["pid"] for row in stopped), f"expected nothing running: {stopped}"

        up = _txroute(env, "up", "--detach", "--ports", "auto")
        assert up.returncode == 0, f"expected a second start to succeed: {up.stderr}"
        router_url = f"http://127.0.0.1:{_recorded_ports(state)['router']}"
        with httpx.Client(base_url=router_url, timeout=30, headers=headers) as http:
            read = http.get(f"/v1/accounts/{account}")
            assert read.status_code == 200 and read.json()["balance"] == 4200, f"expected data kept: {read.text}"
        audit = _txroute(env, "audit")
        assert audit.returncode == 0 and "OK: no violation" in audit.stdout, audit.stdout + audit.stderr
    finally:
        purge = _txroute(env, "down", "--purge")
        assert purge.returncode == 0, purge.stderr
    assert not state.exists(), "expected --purge to delete the state folder"


def test_status_shows_the_ports_up_was_given_not_the_defaults(tmp_path: Path):
    # What `up --region-port-base ... --pg-port-base ... --router-port ...` records, without starting it
    # (nothing listens there, so nothing may collide): `status` and `down` without flags must use these.
    tmp_path.chmod(0o755)
    with reserve(1) as base:
        config = local_stack.StackConfig(state=tmp_path / "state", region_port_base=base.ports[0] + 10,
                                         pg_port_base=base.ports[0] + 20, router_port=base.ports[0])
        stack = local_stack.plan(config)
        stack.record_file.parent.mkdir(parents=True, exist_ok=True)
        local_stack._write_record(stack, running=False)
    rows = json.loads(_txroute(_env(config.state), "status", "--json").stdout)
    regions = [r.name for r in stack.topology.regions]
    expected = {"router": config.router_port}
    expected |= {f"region-{r}": config.region_port_base + i for i, r in enumerate(regions)}
    expected |= {f"postgres-{r}": config.pg_port_base + i for i, r in enumerate(regions)}
    assert _status_ports(rows) == expected, f"expected the recorded ports {expected}: {rows}"
    assert local_stack.ROUTER_PORT_DEFAULT not in _status_ports(rows).values()


def test_two_stacks_started_at_once_with_auto_ports_both_come_up(tmp_path: Path):
    tmp_path.chmod(0o755)
    states = [tmp_path / "a", tmp_path / "b"]
    starts = [
        subprocess.Popen([sys.executable, "-m", "app.cli.main", "up", "--detach", "--ports", "auto"],
                         env=_env(state), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for state in states
    ]
    try:
        outputs = [start.communicate(timeout=CLI_TIMEOUT_S) for start in starts]
        for start, (out, err) in zip(starts, outputs, strict=True):
            assert start.returncode == 0, f"expected both stacks to start: {out}\n{err}"
        ports = [_recorded_ports(state) for state in states]
        assert not set(ports[0].values()) & set(ports[1].values()), f"expected disjoint ports: {ports}"
        for state, chosen in zip(states, ports, strict=True):
            rows = json.loads(_txroute(_env(state), "status", "--json").stdout)
            assert all(row["ready"] for row in rows), f"expected every part of {state.name} ready: {rows}"
            ready = httpx.get(f"http://127.0.0.1:{chosen['router']}/readyz", timeout=10)
            assert ready.status_code == 200 and all(ready.json()["regions"].values()), ready.text
    finally:
        for start in starts:
            if start.poll() is None:
                start.kill()
        for state in states:
            _txroute(_env(state), "down", "--purge")
