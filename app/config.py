"""Typed settings, one dataclass per deployable, read from the environment in one place.

Secrets (the database password, signing keys) come from the environment (in AWS: injected from Secrets
Manager by ECS) and are never logged: `__repr__` hides them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app import limits

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """A required setting is missing or malformed; the message names the environment variable."""


@dataclass(frozen=True)
class RegionSettings:
    # Which region this process serves: it hosts every shard of this region in `regions/`.
    region: str
    # postgresql://user@host:port of the region's PostgreSQL server; each shard is a database on it.
    database_url: str = field(repr=False)
    # Kept apart from the URL so it can come from a secret store and never be printed with it.
    database_password: str | None = field(default=None, repr=False)
    regions_dir: Path | None = None
    # Per shard: connections in this process's pool, and group-commit workers drawing from it.
    db_pool_size_max: int = limits.DB_POOL_SIZE_MAX
    # Create and migrate the shard databases at start (safe to run from every replica at once).
    provision_on_start: bool = True

    def server_dsn(self) -> str:
        url = self.database_url.rstrip("/")
        if self.database_password is None:
            return url
        scheme, _, rest = url.partition("://")
        user, _, host = rest.rpartition("@")
        assert user and ":" not in user, "put the password in TXROUTE_DATABASE_PASSWORD, not the URL"
        return f"{scheme}://{user}:{self.database_password}@{host}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RegionSettings:
        e = os.environ if env is None else env
        pool = int(e.get("TXROUTE_DB_POOL_SIZE_MAX", limits.DB_POOL_SIZE_MAX))
        if not 1 <= pool <= 64:
            raise SettingsError("TXROUTE_DB_POOL_SIZE_MAX must be in 1..64")
        return cls(
            region=_required(e, "TXROUTE_REGION"),
            database_url=_required(e, "TXROUTE_DATABASE_URL"),
            database_password=e.get("TXROUTE_DATABASE_PASSWORD") or None,
            regions_dir=Path(e["TXROUTE_REGIONS_DIR"]) if e.get("TXROUTE_REGIONS_DIR") else None,
            db_pool_size_max=pool,
            provision_on_start=e.get("TXROUTE_PROVISION_ON_START", "1") != "0",
        )


def _required(env: os._Environ[str] | dict[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise SettingsError(f"{name} is required")
    return value
