"""Service processes on loopback: the command that runs each deployable, start, readiness and stop.

Used by `txroute up` and by the tests, so both run the services exactly as they ship.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from app import limits


def asgi_command(factory: str, port: int, *, host: str = "127.0.0.1") -> list[str]:
    """One granian worker running `factory` (a module:function building the Litestar app)."""
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi", "--factory",
        "--host", host, "--port", str(port),
        "--workers", "1", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning",
        factory,
    ]


REGION_FACTORY = "app.region.app:app_from_env"

ROUTER_FACTORY = "app.router.app:app_from_env"


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} already running"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: signals reach its workers too
            )

    def wait_ready(self, *, path: str = "/readyz", timeout_s: float = limits.PROCESS_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_file}")
            if http_ok(self.url + path):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready on {self.url}{path} after {timeout_s}s; see {self.log_file}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (granian's workers included)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=limits.PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=limits.PROCESS_STOP_TIMEOUT_S)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def http_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback http
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def region_process(region: str, database_port: int, port: int, log_file: Path, **env: str) -> ServiceProcess:
    """A regional service on loopback against the region's PostgreSQL on `database_port` (the stack, the
    tests and the benchmarks all start it this way; each adds its keys and the database password)."""
    return ServiceProcess(
        name=f"region-{region}",
        argv=asgi_command(REGION_FACTORY, port),
        env={
            "TXROUTE_REGION": region,
            "TXROUTE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{database_port}",
            **env,
        },
        port=port,
        log_file=log_file,
    )
