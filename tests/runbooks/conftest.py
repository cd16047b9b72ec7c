"""One local stack for every game day, started as a user starts it (`txroute up --detach --ports auto` with
its own TXROUTE_STATE_DIR), and the faults the game days inject into it. Each game day leaves it healthy;
`stack` repairs what a failed one left behind before the next."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.local import stack as local_stack
from app.security.tls import client_context
from tests.runbooks import gameday

UP_TIMEOUT_S = 180
HTTP_TIMEOUT_S = 30.0
POLL_TIMEOUT_S = 30.0


@dataclass
class GameDayStack:
    state: Path
    router_url: str

    def txroute(self, *args: str) -> gameday.Result:
        return gameday.run(" ".join(["txroute", *args]), self.state)

    def plan(self) -> local_stack.Stack:
        config = local_stack.recorded_config(self.state)
        assert config is not None, "expected `txroute up` to record its configuration in stack.json"
        return local_stack.plan(config)

    def pid(self, service: str) -> int:
        record = json.loads((self.state / "stack.json").read_text())
        return next(int(s["pid"]) for s in record["services"] if s["name"] == service)

    def kill(self, service: str) -> None:
        """SIGKILL a service's whole process group, as a crash would."""
        pid = self.pid(service)
        os.killpg(pid, signal.SIGKILL)
        process = next(s for s in self.plan().services if s.name == service)
        assert poll(lambda: not process.answers("/healthz", timeout_s=0.5)), f"expected {service} to be gone"

    def stop_postgres(self, region: str) -> None:
        self.plan().clusters[region].stop(mode="immediate")

    def shard_dsn(self, shard: str) -> str:
        return local_stack.shard_dsns(self.plan())[shard]

    def token(self, client: str) -> str:
        result = self.txroute("token", "--client", client)
        assert result.returncode == 0, str(result)
        return result.stdout.strip()

    def client(self, client: str, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.router_url, timeout=HTTP_TIMEOUT_S,
                            headers={"authorization": f"Bearer {token or self.token(client)}"})

    def metric(self, url: str, name: str, **labels: str) -> float:
        return metric(url, name, verify=client_context(self.plan().tls.ca_file), **labels)

    def repair(self) -> list[str]:
        """Whatever a failed game day left broken, started again (the next game day must start healthy)."""
        repaired = []
        plan = self.plan()
        for region, cluster in plan.clusters.items():
            if not cluster.is_running():
                cluster.start()
                repaired.append(f"postgres-{region}")
        for service in plan.services:
            if not service.answers("/readyz"):
                local_stack.restart_services(plan, [service.name])
                repaired.append(service.name)
        for region in httpx.get(self.router_url + "/readyz", timeout=5.0).json().get("draining", []):
            self.txroute("ops", "undrain", region, "--yes")
            repaired.append(f"drain of {region}")
        return repaired


def poll(predicate: Any, *, timeout_s: float = POLL_TIMEOUT_S, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def new_key() -> str:
    return uuid.uuid4().hex


def open_account(http: httpx.Client, region: str, deposit: int = 0) -> str:
    opened = http.post("/v1/accounts", json={"currency": "EUR", "region": region},
                       headers={"idempotency-key": new_key()})
    assert opened.status_code == 201, f"expected the account opened in {region}: {opened.text}"
    account: str = opened.json()["id"]
    if deposit:
        paid = http.post("/v1/deposits", json={"account": account, "amount": deposit, "currency": "EUR"},
                         headers={"idempotency-key": new_key()})
        assert paid.status_code == 201, f"expected the deposit to post: {paid.text}"
    return account


def transfer(http: httpx.Client, debit: str, credit: str, amount: int, *, key: str | None = None) -> httpx.Response:
    return http.post("/v1/transfers", json={"debit_account": debit, "credit_account": credit, "amount": amount,
                                            "currency": "EUR"}, headers={"idempotency-key": key or new_key()})


def metric(url: str, name: str, *, verify: ssl.SSLContext | bool = True, **labels: str) -> float:
    """The sum of a Prometheus metric's samples at `url`/metrics that carry `labels` (0 when none); a region's
    URL is https, verified with the stack's CA (`GameDayStack.metric`)."""
    text = httpx.get(url + "/metrics", timeout=5.0, verify=verify).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def gameday_stack() -> Iterator[GameDayStack]:
    folder = Path(tempfile.mkdtemp(prefix="txroute-gameday-"))
    folder.chmod(0o755)  # the PostgreSQL user must traverse it
    state = folder / "state"
    env = {**os.environ, "TXROUTE_STATE_DIR": str(state)}
    # `up` chooses every port itself and records them; every later command (and `plan`) reads them back.
    up = subprocess.run([sys.executable, "-m", "app.cli.main", "up", "--detach", "--ports", "auto"], env=env,
                        capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    try:
        assert up.returncode == 0, f"expected `txroute up --detach` to start the stack:\n{up.stdout}{up.stderr}"
        config = local_stack.recorded_config(state)
        assert config is not None, "expected `txroute up` to record its configuration in stack.json"
        yield GameDayStack(state, f"http://127.0.0.1:{config.ports[local_stack.ROUTER_NAME]}")
    finally:
        subprocess.run([sys.executable, "-m", "app.cli.main", "down", "--purge"], env=env,
                       capture_output=True, text=True, timeout=UP_TIMEOUT_S)
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture
def stack(gameday_stack: GameDayStack) -> GameDayStack:
    # A game day that failed may have left its fault behind; the next one starts healthy regardless.
    gameday_stack.repair()
    return gameday_stack
