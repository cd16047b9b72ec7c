"""How a process reaches PostgreSQL: host, port, user, where the password comes from, and TLS (DESIGN D8).

Credentials go to asyncpg as separate arguments, never inside a URL: a generated password holds `#`, `?`,
`%`, `[`, `@`, `:` or `/`, which a URL parser splits on. The password is a `PasswordSource` that asyncpg
calls for every new connection: a fixed value, a file, or an AWS Secrets Manager secret. A secret rotated
while the process runs is noticed on the first authentication failure: the caller marks the source stale
(`PasswordSource.stale`) and the next connection reads it again, at most once per
`DB_PASSWORD_REREAD_INTERVAL_S` so a wrong secret cannot turn every connection attempt into a secret read.

TLS: `disable` (loopback only: the local stack), `require` (encrypted, unverified) or `verify-full` (the
server's certificate chains to `ssl_root_cert`, the RDS CA bundle in the image, and names the host).
Deployed stacks use `verify-full`; it is the default for any host that is not loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from app import limits

log = logging.getLogger("txroute.store")

SSL_MODES = ("disable", "require", "verify-full")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# asyncpg's classes for "the server refused these credentials" (a wrong password is the first one).
AUTH_FAILURES = (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)


class AccessError(ValueError):
    """The database settings are missing or malformed; the message names the environment variable."""


class PasswordSource:
    """The database password, read once and again only after `stale()` (a failed login)."""

    def __init__(self, read: Callable[[], str], *, what: str,
                 reread_interval_s: float = limits.DB_PASSWORD_REREAD_INTERVAL_S) -> None:
        self._read = read
        self.what = what  # where it comes from, for logs (never the value)
        self._reread_interval_s = reread_interval_s
        self._value: str | None = None
        # The last read after a refused login (the first read does not count: a rotation soon after the start
        # is read at once).
        self._reread_at: float | None = None
        self._stale = False
        self._lock = asyncio.Lock()
        self.reads = 0

    def __repr__(self) -> str:
        return f"PasswordSource({self.what})"

    @classmethod
    def fixed(cls, value: str) -> PasswordSource:
        return cls(lambda: value, what="a fixed value")

    async def __call__(self) -> str:
        """asyncpg calls this for each new connection."""
        async with self._lock:
            now = time.monotonic()
            due = self._stale and (self._reread_at is None or now - self._reread_at >= self._reread_interval_s)
            if self._value is None or due:
                # A file or a Secrets Manager call blocks: keep it off the event loop.
                self._value = await asyncio.to_thread(self._read)
                if self._stale:
                    self._reread_at = now
                self._stale = False
                self.reads += 1
            return self._value

    def stale(self) -> None:
        """A login with the current value failed: read it again before the next connection."""
        if not self._stale:
            log.warning("database_password_stale", extra={"source": self.what})
        self._stale = True


def file_reader(path: Path) -> Callable[[], str]:
    def read() -> str:
        return path.read_text().strip()

    return read


def secrets_manager_reader(secret_id: str) -> Callable[[], str]:
    """Reads a Secrets Manager secret: a JSON object's `password` (what RDS and the infra store), or the
    whole string. boto3 finds the region and credentials itself (in ECS: the task role)."""
    client: Any = None

    def read() -> str:
        nonlocal client
        if client is None:
            import boto3  # the `aws` extra: only deployments that read secrets need it
            from botocore.config import Config

            client = boto3.client("secretsmanager", config=Config(
                connect_timeout=limits.SECRETS_TIMEOUT_S, read_timeout=limits.SECRETS_TIMEOUT_S,
                retries={"max_attempts": limits.SECRETS_ATTEMPTS_MAX},
            ))
        value = str(client.get_secret_value(SecretId=secret_id)["SecretString"])
        try:
            doc = json.loads(value)
        except ValueError:
            return value
        if isinstance(doc, dict):
            if not isinstance(doc.get("password"), str):
                raise AccessError(f"secret {secret_id} holds a JSON object without a `password` string")
            return str(doc["password"])
        return value

    return read


@dataclass(frozen=True)
class DatabaseEndpoint:
    """A PostgreSQL server and the role this process logs in as; each shard is a database on it."""

    host: str
    port: int
    user: str
    password: PasswordSource | None = field(default=None, repr=False)
    sslmode: str = "disable"
    ssl_root_cert: Path | None = None

    def __post_init__(self) -> None:
        assert self.sslmode in SSL_MODES, self.sslmode
        assert self.sslmode != "verify-full" or self.ssl_root_cert is not None, "verify-full needs a root cert"

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.sslmode == "disable":
            return False
        if self.sslmode == "require":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        context = ssl.create_default_context(cafile=str(self.ssl_root_cert))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def connect_args(self, database: str) -> dict[str, Any]:
        """Keyword arguments for asyncpg.connect / create_pool."""
        return {
            "host": self.host, "port": self.port, "user": self.user, "password": self.password,
            "database": database, "ssl": self.ssl_context(),
        }

    async def connect(self, database: str, *, timeout_s: float = limits.DB_CONNECT_TIMEOUT_S,
                      **kwargs: Any) -> asyncpg.Connection:
        """One connection; after a refused login the password is read again and the login tried once more."""
        for attempt in (1, 2):
            try:
                conn: asyncpg.Connection = await asyncpg.connect(
                    **self.connect_args(database), timeout=timeout_s, **kwargs
                )
                return conn
            except AUTH_FAILURES:
                if self.password is None or attempt == 2:
                    raise
                self.password.stale()
        raise AssertionError("unreachable")

    def with_user(self, user: str, password: PasswordSource) -> DatabaseEndpoint:
        return DatabaseEndpoint(self.host, self.port, user, password, self.sslmode, self.ssl_root_cert)


def endpoint_from_env(env: Mapping[str, str], *, prefix: str = "TXROUTE_DATABASE") -> DatabaseEndpoint:
    """`{prefix}_URL` (postgresql://user@host:port, no password), the password from `{prefix}_PASSWORD`,
    `{prefix}_PASSWORD_FILE` or `{prefix}_SECRET_ID` (Secrets Manager), `{prefix}_SSLMODE` and
    `{prefix}_SSL_ROOT_CERT`."""
    url_name = f"{prefix}_URL"
    url = env.get(url_name, "")
    if not url:
        raise AccessError(f"{url_name} is required")
    host, port, user = parse_server_url(url, what=url_name)
    return DatabaseEndpoint(host, port, user, password_from_env(env, prefix=prefix),
                            *ssl_from_env(env, host, prefix=prefix))


def parse_server_url(url: str, *, what: str) -> tuple[str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 5432
    except ValueError:
        raise AccessError(f"{what} must look like postgresql://user@host:port") from None
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.username:
        raise AccessError(f"{what} must look like postgresql://user@host:port")
    if parts.password is not None:
        raise AccessError(f"{what} must not hold a password: set it apart (PASSWORD, PASSWORD_FILE or SECRET_ID)")
    if parts.path.strip("/") or parts.query:
        raise AccessError(f"{what} names the server only: no database and no options")
    return parts.hostname, port, urllib.parse.unquote(parts.username)


def password_from_env(env: Mapping[str, str], *, prefix: str) -> PasswordSource | None:
    given = {
        suffix: env[f"{prefix}_{suffix}"]
        for suffix in ("PASSWORD", "PASSWORD_FILE", "SECRET_ID") if env.get(f"{prefix}_{suffix}")
    }
    if len(given) > 1:
        raise AccessError(f"set one of {prefix}_PASSWORD, {prefix}_PASSWORD_FILE, {prefix}_SECRET_ID")
    if "PASSWORD" in given:
        return PasswordSource.fixed(given["PASSWORD"])
    if "PASSWORD_FILE" in given:
        path = Path(given["PASSWORD_FILE"])
        return PasswordSource(file_reader(path), what=f"file {path}")
    if "SECRET_ID" in given:
        return PasswordSource(secrets_manager_reader(given["SECRET_ID"]), what="Secrets Manager")
    return None


def ssl_from_env(env: Mapping[str, str], host: str, *, prefix: str) -> tuple[str, Path | None]:
    mode_name, cert_name = f"{prefix}_SSLMODE", f"{prefix}_SSL_ROOT_CERT"
    mode = env.get(mode_name) or ("disable" if host in LOOPBACK_HOSTS else "verify-full")
    if mode not in SSL_MODES:
        raise AccessError(f"{mode_name} must be one of {', '.join(SSL_MODES)}")
    cert = Path(env[cert_name]) if env.get(cert_name) else None
    if mode == "verify-full":
        if cert is None:
            raise AccessError(f"{mode_name}=verify-full (the default off loopback) needs {cert_name}: the CA bundle")
        if not cert.is_file():
            raise AccessError(f"{cert_name}: {cert} is not a file")
    return mode, cert
