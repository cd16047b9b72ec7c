"""Embedded PostgreSQL clusters for the local stack and the tests.

Uses the machine's server binaries when present (>= 14), otherwise the ones the `pgserver` wheel ships
(installed by `ci/bootstrap.sh` when needed). PostgreSQL refuses to run as root, so when we are root the
server runs as an unprivileged system user that this module creates. Clusters listen on 127.0.0.1 only,
with password (SCRAM) authentication; the passwords live in the cluster's folder, mode 0600: the owner's
(the `postgres` superuser: provisioning, migrations, `txroute ops`) and the service role's (the regional
services, DESIGN D8), which `provision` creates or updates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import hashlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app import limits
from app.store.access import DatabaseEndpoint, PasswordSource
from app.store.provision import SERVICE_ROLE_DEFAULT, provision_region
from app.topology.model import Shard

PG_USER_DEFAULT = "txroute-pg"
PG_MAJOR_MIN = 14
SUPERUSER = "postgres"
SERVICE_ROLE = SERVICE_ROLE_DEFAULT


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be found, initialised, started or stopped."""


def find_pg_bin() -> Path:
    """The folder holding `initdb`, `pg_ctl`, `postgres` and `pgbench`."""
    override = os.environ.get("TXROUTE_PG_BIN")
    if override:
        return _runnable(_checked_bin(Path(override)))
    candidates = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    best: tuple[int, Path] | None = None
    for text in candidates:
        major = _major(Path(text))
        if major is not None and major >= PG_MAJOR_MIN and (best is None or major > best[0]):
            best = (major, Path(text))
    if best is not None:
        return best[1]
    # The optional extra embedded-pg (installed by ci/bootstrap.sh). Found, not imported: importing pgserver
    # runs its own server manager's setup, which warns on every command where XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(
            "no PostgreSQL server binaries (>= 14) found: run `bash ci/bootstrap.sh`, which installs the "
            "embedded-pg extra, or set TXROUTE_PG_BIN"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    return _runnable(_checked_bin(package / "pginstall" / "bin"))


def _runnable(folder: Path) -> Path:
    """`folder`, or a copy of its installation that the server user can run.

    When we are root the server runs as PG_USER_DEFAULT, which must traverse every parent of the binaries.
    The `pgserver` wheel's binaries live in the virtualenv, and a checkout under a private home folder (/root
    is mode 0700) hides them from that user. Rather than loosen the user's folders (what pgserver's own
    manager does), the installation is copied once to a folder of its own under /var/tmp, keyed by its path
    and version, in the same layout: the binaries find lib/ and share/ relative to themselves, and the
    wheel's shared libraries (libpq) in `<package>.libs` beside the package (their RPATH).
    """
    run_as = PG_USER_DEFAULT if os.geteuid() == 0 else None
    if first_untraversable_parent(folder / "postgres", run_as) is None:
        return folder
    install = folder.resolve().parent  # .../site-packages/pgserver/pginstall
    package = install.parent
    version = subprocess.run([str(folder / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    digest = hashlib.sha256(f"{install}\0{version}".encode()).hexdigest()[:12]
    target = Path("/var/tmp") / f"txroute-pgbin-{digest}"  # noqa: S108 - ownership checked below
    copied = target / package.name / install.name / "bin" / "postgres"
    if not copied.is_file():
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            tree = staging / "install"
            shutil.copytree(install, tree / package.name / install.name, symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, tree / libs.name, symlinks=True)
            _readable_by_all(tree)
            try:
                (staging / "install").rename(target)  # atomic: a concurrent copy that lost leaves no trace
            except OSError:
                if not copied.is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if target.is_symlink() or target.stat().st_uid != os.geteuid():
        raise PostgresError(f"{target} exists and is not ours: remove it or set TXROUTE_PG_BIN")
    return target / package.name / install.name / "bin"


def _readable_by_all(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        runnable = path.is_dir() or mode & 0o100
        path.chmod(mode | 0o044 | (0o011 if runnable else 0))


def _checked_bin(folder: Path) -> Path:
    major = _major(folder)
    if major is None or major < PG_MAJOR_MIN:
        raise PostgresError(f"{folder}: no PostgreSQL >= {PG_MAJOR_MIN} server binaries there")
    return folder


def _major(folder: Path) -> int | None:
    postgres = folder / "postgres"
    if not postgres.is_file():
        return None
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"(\d+)", out)
    return int(m.group(1)) if m else None


def ensure_pg_user(name: str = PG_USER_DEFAULT) -> str | None:
    """The system user the server runs as: None when we are not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return name


@dataclass(frozen=True)
class Cluster:
    """One PostgreSQL cluster: a data folder and a TCP port on 127.0.0.1."""

    folder: Path
    port: int
    run_as: str | None
    bin_dir: Path

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    @property
    def service_password_file(self) -> Path:
        return self.folder / "service-password"

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def service_password(self) -> str:
        """The service role's password, made on first use (kept out of the server user's reach)."""
        if not self.service_password_file.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.service_password_file.touch(mode=0o600)
            self.service_password_file.write_text(secrets.token_urlsafe(24))
        return self.service_password_file.read_text().strip()

    def dsn(self, database: str) -> str:
        """The owner's DSN (tests, `txroute ops`); the password is URL-safe by construction."""
        return f"postgresql://{SUPERUSER}:{self.password()}@127.0.0.1:{self.port}/{database}"

    def owner_endpoint(self) -> DatabaseEndpoint:
        return DatabaseEndpoint("127.0.0.1", self.port, SUPERUSER, PasswordSource.fixed(self.password()))

    def service_url(self) -> str:
        """TXROUTE_DATABASE_URL of a regional service on this cluster (its password goes apart)."""
        return f"postgresql://{SERVICE_ROLE}@127.0.0.1:{self.port}"

    def provision(self, shards: Sequence[Shard]) -> None:
        """Create, migrate and grant `shards` as the owner, and the service role with `service_password()`.
        Runs in a thread of its own, so that it can be called from inside an event loop (the tests)."""
        coroutine = provision_region(
            self.owner_endpoint(), shards, service_role=SERVICE_ROLE, service_password=self.service_password()
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, coroutine).result(timeout=limits.PROVISION_TIMEOUT_S)

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self, *, fsync: bool = True) -> None:
        """Create the cluster once; later calls keep its data."""
        if self.initialised():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_traversable()
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24))
            self.password_file.chmod(0o600)
        # initdb reads the password from a file that the server user can read; we remove it afterwards.
        pwfile = self.folder / ".initpw"
        shutil.copyfile(self.password_file, pwfile)
        self._chown(self.folder, pwfile)
        args = [
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "--pwfile", str(pwfile),
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "-E", "UTF8",
            "--locale=C",
        ]
        if not fsync:
            args.append("--no-sync")
        try:
            self._run(args, timeout_s=120)
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, *, settings: dict[str, str] | None = None) -> None:
        if self.is_running():
            return
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        options.update(settings or {})
        opts = " ".join(f"-c {k}={v}" if v else f"-c {k}=''" for k, v in options.items())
        self._chown(self.folder)
        self._run(
            [
                str(self.bin_dir / "pg_ctl"), "start", "-w",
                "-t", str(int(limits.PG_READY_TIMEOUT_S)),
                "-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts,
            ],
            timeout_s=limits.PG_READY_TIMEOUT_S + 10,
        )

    def stop(self, *, mode: str = "fast") -> None:
        if not self.is_running():
            return
        self._run(
            [str(self.bin_dir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data_dir)],
            timeout_s=limits.PROCESS_STOP_TIMEOUT_S + 30,
        )

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return False
        return True

    def _run(self, args: list[str], *, timeout_s: float) -> None:
        if self.run_as is not None:
            args = ["runuser", "-u", self.run_as, "--", *args]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd="/")
        if proc.returncode != 0:
            tail = _tail(self.log_file)
            raise PostgresError(
                f"{Path(args[0] if self.run_as is None else args[4]).name} failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n{tail}"
            )

    def _chown(self, *paths: Path) -> None:
        if self.run_as is None:
            return
        entry = pwd.getpwnam(self.run_as)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
            if path.is_dir():
                for sub in path.rglob("*"):
                    if sub.name not in ("password", "service-password"):
                        os.lchown(sub, entry.pw_uid, entry.pw_gid)

    def _check_traversable(self) -> None:
        """The server user must be able to reach its folder; say which parent blocks it."""
        blocker = first_untraversable_parent(self.folder, self.run_as)
        if blocker is not None:
            raise PostgresError(
                f"{blocker} is not traversable by user {self.run_as!r}: PostgreSQL cannot run under it. "
                f"Set TXROUTE_PG_DIR to a folder it can reach."
            )


def first_untraversable_parent(folder: Path, run_as: str | None) -> Path | None:
    if run_as is None:
        return None
    for parent in reversed(folder.resolve().parents):
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def clusters_root(state_dir: Path, run_as: str | None) -> Path:
    """Where the clusters live: `<state>/pg`, unless the server user cannot reach it.

    A checkout under a private home folder (/root is mode 0700) cannot hold a cluster that an unprivileged
    user runs. Rather than loosen the permissions of the user's folders, the clusters then live in a folder
    of their own under /var/tmp, keyed by the checkout, and `<state>/pg` is a symlink to it.
    """
    override = os.environ.get("TXROUTE_PG_DIR")
    if override:
        return Path(override)
    state_dir.mkdir(parents=True, exist_ok=True)
    link = state_dir / "pg"
    if link.is_symlink():
        return link.resolve()
    if first_untraversable_parent(link, run_as) is None:
        return link
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    target = Path("/var/tmp") / f"txroute-pg-{digest}"  # noqa: S108 - ownership checked below
    target.mkdir(mode=0o755, exist_ok=True)
    if target.stat().st_uid != os.geteuid() or target.is_symlink():
        raise PostgresError(f"{target} exists and is not ours: remove it or set TXROUTE_PG_DIR")
    link.symlink_to(target)
    return target


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(predicate: object, *, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate()` until true or the bound passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
