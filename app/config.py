"""Typed settings, one dataclass per deployable, read from the environment in one place.

Secrets (signing keys) come from the environment (in AWS: injected from Secrets Manager by ECS); the database
password from the environment, a file or Secrets Manager itself, so a rotated one is read again
(app/store/access.py). None is ever logged: `__repr__` hides them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from app import limits
from app.security.tls import TlsConfigError, require_https
from app.store.access import AccessError, DatabaseEndpoint, endpoint_from_env

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """A required setting is missing or malformed; the message names the environment variable."""


@dataclass(frozen=True)
class RegionSettings:
    # Which region this process serves: it hosts every shard of this region in `regions/`.
    region: str
    # The region's PostgreSQL server (each shard is a database on it) and the least-privilege service role
    # this process logs in as (DESIGN D8): TXROUTE_DATABASE_URL (postgresql://user@host:port, no password),
    # the password apart (TXROUTE_DATABASE_PASSWORD, _PASSWORD_FILE or _SECRET_ID), TXROUTE_DATABASE_SSLMODE
    # and TXROUTE_DATABASE_SSL_ROOT_CERT. The service never creates or migrates its databases: provisioning
    # runs before it, as the owner (`python -m app.store.provision`).
    database: DatabaseEndpoint = field(repr=False)
    regions_dir: Path | None = None
    # Per shard: connections in this process's pool, and group-commit workers drawing from it.
    db_pool_size_max: int = limits.DB_POOL_SIZE_MAX
    # Public key(s) (PEM text or a file; several while one is rotated) that verify the routers' hop tokens
    # (DESIGN D8). Without them every public API call is refused with 401; `from_env` requires them.
    hop_public_key: str | None = field(default=None, repr=False)
    # Public key(s) that verify other regions' saga tokens: without them the saga routes refuse every call
    # with 401; `from_env` requires them. Routers never hold the saga key pair.
    saga_public_key: str | None = field(default=None, repr=False)
    # The client issuers the routers trust, configured the same way (TXROUTE_CLIENT_ISSUERS: public keys only):
    # every public API call also carries the client's own token, which the region verifies and serves. Without
    # them every public API call is refused with 401; `from_env` requires them.
    client_issuers: dict[str, ClientIssuerSettings] | None = field(default=None, repr=False)
    client_token_lifetime_max_s: int = limits.CLIENT_TOKEN_LIFETIME_MAX_S
    # Saga relay (DESIGN D6): the other regions' service URLs, and the saga private key that signs this
    # region's calls to them. Without them, transfers to shards of other regions wait in the outbox.
    region_urls: dict[str, str] = field(default_factory=dict)
    saga_private_key: str | None = field(default=None, repr=False)
    # Internal TLS (app/security/tls.py): the CA bundle that verifies the other regions' certificates
    # (TXROUTE_INTERNAL_CA_FILE; the local stack's `.state/tls/ca.pem`); None: the system trust store, as in
    # deployed stacks whose internal load balancers serve public ACM certificates. The service's own
    # certificate and key are the server's options (granian --ssl-certificate/--ssl-keyfile, or
    # GRANIAN_SSL_CERTIFICATE/GRANIAN_SSL_KEYFILE), not the app's: app/local/processes.asgi_command sets them.
    internal_ca_file: str | None = None
    # TXROUTE_INTERNAL_PLAINTEXT=1 lets region URLs be http:// (the router benchmark's TLS-off comparison
    # only; never set in a deployment, infra tests check). Without it an http:// URL stops the start.
    internal_plaintext: bool = False
    # Simulated WAN round-trip time added to every call to another region (local stack only; 0 = off).
    wan_latency_ms: int = 0
    # One client's postings queued or in commit on one shard; beyond it that client gets 429 rate_limited
    # while the others keep posting (app/store/shard.py).
    tenant_queue_postings_max: int = limits.TENANT_QUEUE_POSTINGS_MAX
    # Events are deleted this many days after they were written (TXROUTE_EVENTS_RETENTION_DAYS, 1..365).
    events_retention_days: int = limits.EVENTS_RETENTION_DAYS_DEFAULT
    # TXROUTE_WEBHOOK_ALLOW_LOOPBACK=1 (the local stack only; never deployed, infra tests check): webhook urls
    # may be http:// and loopback, so a developer receives on 127.0.0.1. Otherwise https and public addresses.
    webhook_allow_loopback: bool = False
    # Seconds between a failed webhook attempt and the next (TXROUTE_WEBHOOK_RETRY_SCHEDULE_S, comma-separated;
    # tests shorten it); once it is over the endpoint is disabled.
    webhook_retry_schedule_s: tuple[float, ...] = limits.WEBHOOK_RETRY_SCHEDULE_S
    faults: FaultSettings = field(default_factory=lambda: FaultSettings())

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RegionSettings:
        e = os.environ if env is None else env
        pool = int(e.get("TXROUTE_DB_POOL_SIZE_MAX", limits.DB_POOL_SIZE_MAX))
        if not 1 <= pool <= 64:
            raise SettingsError("TXROUTE_DB_POOL_SIZE_MAX must be in 1..64")
        tenant_queue = _integer(e, "TXROUTE_TENANT_QUEUE_POSTINGS_MAX", limits.TENANT_QUEUE_POSTINGS_MAX)
        if not 1 <= tenant_queue <= limits.POSTING_QUEUE_DEPTH_MAX:
            raise SettingsError(f"TXROUTE_TENANT_QUEUE_POSTINGS_MAX must be in 1..{limits.POSTING_QUEUE_DEPTH_MAX}")
        region_urls = _json_object(e, "TXROUTE_REGION_URLS") if e.get("TXROUTE_REGION_URLS") else {}
        plaintext = _internal_tls(e, region_urls)
        try:
            database = endpoint_from_env(e)
        except AccessError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            region=_required(e, "TXROUTE_REGION"),
            database=database,
            regions_dir=Path(e["TXROUTE_REGIONS_DIR"]) if e.get("TXROUTE_REGIONS_DIR") else None,
            db_pool_size_max=pool,
            hop_public_key=_required(e, "TXROUTE_HOP_PUBLIC_KEY"),
            saga_public_key=_required(e, "TXROUTE_SAGA_PUBLIC_KEY"),
            client_issuers=ClientIssuerSettings.parse(_required(e, "TXROUTE_CLIENT_ISSUERS")),
            client_token_lifetime_max_s=_client_token_lifetime_max_s(e),
            region_urls=region_urls,
            saga_private_key=e.get("TXROUTE_SAGA_PRIVATE_KEY") or None,
            internal_ca_file=e.get("TXROUTE_INTERNAL_CA_FILE") or None,
            internal_plaintext=plaintext,
            wan_latency_ms=_wan_latency_ms(e),
            tenant_queue_postings_max=tenant_queue,
            events_retention_days=_events_retention_days(e),
            webhook_allow_loopback=e.get("TXROUTE_WEBHOOK_ALLOW_LOOPBACK", "") == "1",
            webhook_retry_schedule_s=_retry_schedule_s(e),
            faults=FaultSettings.from_env(e),
        )


def _events_retention_days(e: os._Environ[str] | dict[str, str]) -> int:
    days = _integer(e, "TXROUTE_EVENTS_RETENTION_DAYS", limits.EVENTS_RETENTION_DAYS_DEFAULT)
    if not 1 <= days <= limits.EVENTS_RETENTION_DAYS_MAX:
        raise SettingsError(f"TXROUTE_EVENTS_RETENTION_DAYS must be in 1..{limits.EVENTS_RETENTION_DAYS_MAX}")
    return days


def _retry_schedule_s(e: os._Environ[str] | dict[str, str]) -> tuple[float, ...]:
    text = e.get("TXROUTE_WEBHOOK_RETRY_SCHEDULE_S")
    if not text:
        return limits.WEBHOOK_RETRY_SCHEDULE_S
    try:
        schedule = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SettingsError("TXROUTE_WEBHOOK_RETRY_SCHEDULE_S is a comma-separated list of seconds") from None
    if not 1 <= len(schedule) <= 32 or not all(0 <= s <= 7 * 86_400 for s in schedule):
        raise SettingsError("TXROUTE_WEBHOOK_RETRY_SCHEDULE_S: 1..32 delays of 0..604800 s")
    return schedule


@dataclass(frozen=True)
class FaultSettings:
    """Fault injection for the fault tests (TXROUTE_FAULT_*); every one is off unless set."""

    # The fast path does not push saga messages: only the relay delivers them.
    skip_fast_path: bool = False
    # The relay does not run: messages stay in the outbox (as if the process died after its commit).
    relay_paused: bool = False
    # Per delivery attempt: probability (0..1) that the request is lost, that the answer is lost, that it is
    # sent twice; and whether each claimed batch is delivered in random order.
    drop_request: float = 0.0
    drop_answer: float = 0.0
    duplicate: float = 0.0
    reorder: bool = False

    @classmethod
    def from_env(cls, e: os._Environ[str] | dict[str, str]) -> FaultSettings:
        def probability(name: str) -> float:
            value = float(e.get(name, "0"))
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name} must be a probability in [0, 1]")
            return value

        return cls(
            skip_fast_path=e.get("TXROUTE_FAULT_SKIP_FAST_PATH") == "1",
            relay_paused=e.get("TXROUTE_FAULT_RELAY_PAUSED") == "1",
            drop_request=probability("TXROUTE_FAULT_DROP_REQUEST"),
            drop_answer=probability("TXROUTE_FAULT_DROP_ANSWER"),
            duplicate=probability("TXROUTE_FAULT_DUPLICATE"),
            reorder=e.get("TXROUTE_FAULT_REORDER") == "1",
        )


def _internal_tls(e: os._Environ[str] | dict[str, str], region_urls: dict[str, str]) -> bool:
    """Whether TXROUTE_INTERNAL_PLAINTEXT is set; every region URL is https:// unless it is."""
    plaintext = e.get("TXROUTE_INTERNAL_PLAINTEXT", "0") == "1"
    try:
        require_https(region_urls, what="TXROUTE_REGION_URLS", plaintext_allowed=plaintext)
    except TlsConfigError as exc:
        raise SettingsError(str(exc)) from None
    ca_file = e.get("TXROUTE_INTERNAL_CA_FILE")
    if ca_file and not Path(ca_file).is_file():
        raise SettingsError(f"TXROUTE_INTERNAL_CA_FILE: no such file {ca_file}")
    return plaintext


def _wan_latency_ms(e: os._Environ[str] | dict[str, str]) -> int:
    value = int(e.get("TXROUTE_WAN_LATENCY_MS", "0"))
    if not 0 <= value <= limits.WAN_LATENCY_MS_MAX:
        raise SettingsError(f"TXROUTE_WAN_LATENCY_MS must be in 0..{limits.WAN_LATENCY_MS_MAX}")
    return value


@dataclass(frozen=True)
class RouterSettings:
    # The region this router runs in: `POST /v1/accounts` without a region opens the account here.
    region: str
    # Base URL of each region's service (the router's upstreams), https:// always, e.g.
    # {"eu-west-1": "https://eu-west-1.internal.api.txroute.example"}.
    region_urls: dict[str, str]
    # The client issuers this router trusts (DESIGN D8), by their `iss`: each one's public keys by key id
    # (PEM text or a file path each) and the client-id prefix it may assert (see ClientIssuers).
    client_issuers: dict[str, ClientIssuerSettings] = field(repr=False)
    # The private key that signs hop tokens (router -> region): PEM text or a file path. The router holds no
    # other private key: it can never sign a saga token.
    hop_private_key: str = field(repr=False)
    # Longest lifetime (exp - iat) of a client token accepted.
    client_token_lifetime_max_s: int = limits.CLIENT_TOKEN_LIFETIME_MAX_S
    regions_dir: Path | None = None
    upstream_connections_max: int = limits.UPSTREAM_CONNECTIONS_MAX
    upstream_connect_timeout_s: float = limits.UPSTREAM_CONNECT_TIMEOUT_S
    upstream_read_timeout_s: float = limits.UPSTREAM_READ_TIMEOUT_S
    # Internal TLS, as RegionSettings: the CA bundle that verifies the regions (None: system trust store),
    # and the benchmark-only knob that allows http:// region URLs.
    internal_ca_file: str | None = None
    internal_plaintext: bool = False
    # Simulated WAN round-trip time added to every call to another region (local stack only; 0 = off).
    wan_latency_ms: int = 0
    # How often the router re-reads every region's claims and drain flag (`txroute ops drain`), and once at
    # start. 0 turns both off: the map then changes only on a 421 or a region's own 503 region_draining.
    shardmap_refresh_period_s: float = limits.SHARDMAP_REFRESH_PERIOD_S
    # Per-client token bucket (app/router/ratelimit.py), per router process: sustained requests per second
    # and the burst above it that a client may send at once. Over it: 429 rate_limited with Retry-After.
    client_rate_per_s: float = limits.CLIENT_RATE_PER_S_DEFAULT
    client_burst: int = limits.CLIENT_BURST_DEFAULT
    # How long a request whose slot is moving (503 slot_moving from its region) is held and retried before
    # the client is answered 503 slot_moving with Retry-After (app/router/hold.py). 0: never held.
    slot_moving_hold_s: float = limits.SLOT_MOVING_HOLD_S_DEFAULT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RouterSettings:
        """TXROUTE_REGION, TXROUTE_REGION_URLS (JSON object region -> URL), TXROUTE_CLIENT_ISSUERS (JSON
        object iss -> {"keys": {kid: PEM or path}, "client_prefix": str}), TXROUTE_HOP_PRIVATE_KEY (PEM or
        path), optional TXROUTE_CLIENT_TOKEN_LIFETIME_MAX_S, TXROUTE_REGIONS_DIR, TXROUTE_INTERNAL_CA_FILE and
        TXROUTE_UPSTREAM_{CONNECTIONS_MAX,CONNECT_TIMEOUT_S,READ_TIMEOUT_S}, TXROUTE_CLIENT_RATE_PER_S and
        TXROUTE_CLIENT_BURST, TXROUTE_SLOT_MOVING_HOLD_S."""
        e = os.environ if env is None else env
        connections = int(e.get("TXROUTE_UPSTREAM_CONNECTIONS_MAX", limits.UPSTREAM_CONNECTIONS_MAX))
        connect_s = float(e.get("TXROUTE_UPSTREAM_CONNECT_TIMEOUT_S", limits.UPSTREAM_CONNECT_TIMEOUT_S))
        read_s = float(e.get("TXROUTE_UPSTREAM_READ_TIMEOUT_S", limits.UPSTREAM_READ_TIMEOUT_S))
        if not 1 <= connections <= 4096:
            raise SettingsError("TXROUTE_UPSTREAM_CONNECTIONS_MAX must be in 1..4096")
        if not 0 < connect_s <= 30 or not 0 < read_s <= 120:
            raise SettingsError("TXROUTE_UPSTREAM_CONNECT_TIMEOUT_S must be in (0, 30], READ_TIMEOUT_S in (0, 120]")
        refresh_s = float(e.get("TXROUTE_SHARDMAP_REFRESH_PERIOD_S", limits.SHARDMAP_REFRESH_PERIOD_S))
        if not 0 <= refresh_s <= 60:
            raise SettingsError("TXROUTE_SHARDMAP_REFRESH_PERIOD_S must be in [0, 60] (0 = off)")
        rate_per_s = _number(e, "TXROUTE_CLIENT_RATE_PER_S", limits.CLIENT_RATE_PER_S_DEFAULT)
        if not 0 < rate_per_s <= limits.CLIENT_RATE_PER_S_MAX:
            raise SettingsError(f"TXROUTE_CLIENT_RATE_PER_S must be in (0, {limits.CLIENT_RATE_PER_S_MAX:g}]")
        burst = _integer(e, "TXROUTE_CLIENT_BURST", limits.CLIENT_BURST_DEFAULT)
        if not 1 <= burst <= limits.CLIENT_BURST_MAX:
            raise SettingsError(f"TXROUTE_CLIENT_BURST must be in 1..{limits.CLIENT_BURST_MAX}")
        hold_s = _number(e, "TXROUTE_SLOT_MOVING_HOLD_S", limits.SLOT_MOVING_HOLD_S_DEFAULT)
        if not 0 <= hold_s <= limits.SLOT_MOVING_HOLD_S_MAX:
            raise SettingsError(f"TXROUTE_SLOT_MOVING_HOLD_S must be in [0, {limits.SLOT_MOVING_HOLD_S_MAX:g}]")
        region_urls = _json_object(e, "TXROUTE_REGION_URLS")
        plaintext = _internal_tls(e, region_urls)
        lifetime_max_s = _client_token_lifetime_max_s(e)
        return cls(
            region=_required(e, "TXROUTE_REGION"),
            region_urls=region_urls,
            client_issuers=ClientIssuerSettings.parse(_required(e, "TXROUTE_CLIENT_ISSUERS")),
            hop_private_key=_required(e, "TXROUTE_HOP_PRIVATE_KEY"),
            client_token_lifetime_max_s=lifetime_max_s,
            regions_dir=Path(e["TXROUTE_REGIONS_DIR"]) if e.get("TXROUTE_REGIONS_DIR") else None,
            upstream_connections_max=connections,
            upstream_connect_timeout_s=connect_s,
            upstream_read_timeout_s=read_s,
            internal_ca_file=e.get("TXROUTE_INTERNAL_CA_FILE") or None,
            internal_plaintext=plaintext,
            wan_latency_ms=_wan_latency_ms(e),
            shardmap_refresh_period_s=refresh_s,
            client_rate_per_s=rate_per_s,
            client_burst=burst,
            slot_moving_hold_s=hold_s,
        )


def _number(env: os._Environ[str] | dict[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name) or default)
    except ValueError:
        raise SettingsError(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number")
    return value


def _integer(env: os._Environ[str] | dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name) or default)
    except ValueError:
        raise SettingsError(f"{name} must be an integer") from None


def _client_token_lifetime_max_s(e: os._Environ[str] | dict[str, str]) -> int:
    lifetime_max_s = _integer(e, "TXROUTE_CLIENT_TOKEN_LIFETIME_MAX_S", limits.CLIENT_TOKEN_LIFETIME_MAX_S)
    if not 60 <= lifetime_max_s <= limits.CLIENT_TOKEN_LIFETIME_CAP_S:
        cap = limits.CLIENT_TOKEN_LIFETIME_CAP_S
        raise SettingsError(f"TXROUTE_CLIENT_TOKEN_LIFETIME_MAX_S must be in 60..{cap}")
    return lifetime_max_s


@dataclass(frozen=True)
class ClientIssuerSettings:
    # Public keys by key id (`kid`), PEM text or a file path each (a file may hold two while it is rotated).
    keys: dict[str, str] = field(repr=False)
    # The client ids this issuer may assert: those starting with this prefix ("" = any id no other issuer's
    # longer prefix claims; any other prefix ends with '.', '-' or '_'). Two issuers may not share a prefix.
    client_prefix: str

    @classmethod
    def parse(cls, text: str) -> dict[str, ClientIssuerSettings]:
        """TXROUTE_CLIENT_ISSUERS: {"<iss>": {"keys": {"<kid>": "<PEM or path>"}, "client_prefix": "<p>"}}."""
        name = "TXROUTE_CLIENT_ISSUERS"
        try:
            value = json.loads(text)
        except ValueError:
            raise SettingsError(f"{name} must be a JSON object") from None
        if not isinstance(value, dict) or not value:
            raise SettingsError(f"{name} must be a non-empty JSON object of issuers")
        issuers = {}
        for issuer, spec in value.items():
            keys = spec.get("keys") if isinstance(spec, dict) else None
            prefix = spec.get("client_prefix") if isinstance(spec, dict) else None
            if not isinstance(keys, dict) or not keys or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in keys.items()
            ) or not isinstance(prefix, str) or set(spec) != {"keys", "client_prefix"}:
                raise SettingsError(f'{name}: issuer {issuer!r} must be {{"keys": {{kid: PEM}}, "client_prefix": str}}')
            issuers[issuer] = cls(keys=keys, client_prefix=prefix)
        return issuers

    @staticmethod
    def dumps(issuers: dict[str, ClientIssuerSettings]) -> str:
        return json.dumps({name: {"keys": i.keys, "client_prefix": i.client_prefix} for name, i in issuers.items()})


def _json_object(env: os._Environ[str] | dict[str, str], name: str) -> dict[str, str]:
    try:
        value = json.loads(_required(env, name))
    except ValueError:
        raise SettingsError(f"{name} must be a JSON object of strings") from None
    if not isinstance(value, dict) or not value or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SettingsError(f"{name} must be a non-empty JSON object of strings")
    return value


def _required(env: os._Environ[str] | dict[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise SettingsError(f"{name} is required")
    return value
