"""Service processes on loopback: the command that runs each deployable, start, readiness and stop.

Used by `txroute up` and by the tests, so both run the services exactly as they ship.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from app import limits
from app.local.postgres import SERVICE_ROLE
from app.local.tls import LocalTls
from app.security.tls import client_context


def asgi_command(factory: str, port: int, *, host: str = "127.0.0.1", tls: LocalTls | None = None) -> list[str]:
    """One granian worker running `factory` (a module:function building the Litestar app); with `tls`, it
    serves HTTPS only (TLS 1.3, granian's default minimum), with the local CA's server certificate."""
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi", "--factory",
        "--host", host, "--port", str(port),
        "--workers", "1", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning",
        *(["--ssl-certificate", str(tls.cert_file), "--ssl-keyfile", str(tls.key_file)] if tls else []),
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
    # Set when the process serves HTTPS (its argv came from `asgi_command(..., tls=...)`): its URL is https
    # and whoever calls it verifies it with the CA in `tls.ca_file`.
    tls: LocalTls | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client calling this process verifies it with (httpx's `verify`, aiohttp's `ssl`)."""
        return client_context(self.tls.ca_file) if self.tls else True

    def answers(self, path: str = "/readyz", *, timeout_s: float = 2.0) -> bool:
        """The process answers 200 on `path` (over verified TLS when it serves HTTPS)."""
        return http_ok(self.url + path, timeout_s=timeout_s, ca_file=self.tls.ca_file if self.tls else None)

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
            if self.answers(path):
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


def http_ok(url: str, *, timeout_s: float = 2.0, ca_file: Path | None = None) -> bool:
    """`url` answers 200; an https URL is verified against `ca_file` (the system trust store when None)."""
    try:
        # A stack that never started has no CA yet (TlsConfigError, a ValueError): nothing answers.
        context = client_context(ca_file) if url.startswith("https://") else None
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:  # noqa: S310 - http(s) only
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def region_process(
    region: str, database_port: int, port: int, log_file: Path, *, tls: LocalTls | None, **env: str
) -> ServiceProcess:
    """A regional service on loopback against the region's PostgreSQL on `database_port`, as the service role
    (the stack, the tests and the benchmarks all start it this way; each adds its keys and the service role's
    password, TXROUTE_DATABASE_PASSWORD_FILE, after provisioning the cluster as its owner).

    With `tls` (always, except the router benchmark's plaintext comparison) it serves HTTPS with the local
    CA's certificate and verifies the other regions it calls with that CA."""
    tls_env = {"TXROUTE_INTERNAL_CA_FILE": str(tls.ca_file)} if tls else {"TXROUTE_INTERNAL_PLAINTEXT": "1"}
    return ServiceProcess(
        name=f"region-{region}",
        argv=asgi_command(REGION_FACTORY, port, tls=tls),
        env={
            "TXROUTE_REGION": region,
            "TXROUTE_DATABASE_URL": f"postgresql://{SERVICE_ROLE}@127.0.0.1:{database_port}",
            **tls_env,
            **env,
        },
        port=port,
        log_file=log_file,
        tls=tls,
    )
