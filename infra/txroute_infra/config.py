"""The stack's configuration, read in one place into one typed, validated value.

Every key lives in the `txroute:` namespace of `Pulumi.<stack>.yaml` (see `infra/README.md`, which lists each
one). Defaults are the production-safe value; a stack may only loosen what is listed here, never the safety
rules (encryption, privacy, deletion protection), which are not configuration at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS_ALLOWED = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653}
)
# RDS keeps automated backups 1..35 days; a ledger keeps at least a week so a bad deploy found on Monday
# can still be restored to Friday.
BACKUP_RETENTION_DAYS_MIN = 7
BACKUP_RETENTION_DAYS_MAX = 35
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ZONE_ID = re.compile(r"^Z[A-Z0-9]{1,31}$")
# The AWS services `txroute:interfaceEndpoints` may name (network.INTERFACE_ENDPOINT_SERVICES maps them).
INTERFACE_ENDPOINTS_ALLOWED = frozenset({"ecr", "logs", "secretsmanager"})


class ConfigError(ValueError):
    """A stack config value is missing or out of bounds; the message names the `txroute:` key."""


@dataclass(frozen=True, slots=True)
class InfraConfig:
    # The environment's name, used in resource names and tags (the stack name: `staging`, `prod`).
    environment: str
    # The public API name clients call (the router's ACM certificate is issued for it).
    api_domain: str
    # The image tag every service runs, pushed to each region's ECR repository before `pulumi up`.
    image_tag: str
    # Route 53 hosted zone for `api_domain` (required): the certificate validation record and the alias to
    # the accelerator are created in it, so the first `up` never waits on a DNS step done by hand.
    hosted_zone_id: str
    # Where alarms are mailed (an SNS email subscription, confirmed by the recipient); empty: topic only.
    alarm_email: str = ""
    # Application log retention.
    log_retention_days: int = 365
    # Automated database backups (point-in-time recovery window).
    backup_retention_days: int = 14
    # PostgreSQL major.minor on every regional cluster; the parameter group family follows the major.
    db_engine_version: str = "16.4"
    # One NAT gateway per availability zone (survives an AZ outage) or one per region (cheaper, staging).
    nat_gateway_per_az: bool = True
    # Interface VPC endpoints to add in every region, by name (ecr, logs, secretsmanager): each costs about
    # $22 a month per region and pays for itself only above ~626 GB a month through it (infra/README.md).
    interface_endpoints: tuple[str, ...] = ()
    # Alarm thresholds, each named with its unit last.
    error_ratio_max: float = 0.01
    latency_p99_ms_max: int = 500
    db_cpu_percent_max: int = 80
    db_free_storage_percent_min: int = 15
    db_connections_percent_max: int = 80
    db_replica_lag_s_max: int = 30
    outbox_age_s_max: int = 60

    def __post_init__(self) -> None:
        _check(re.fullmatch(r"[a-z][a-z0-9-]{1,15}", self.environment) is not None, "environment",
               f"{self.environment!r} must be 2-16 lowercase letters, digits or dashes")
        _check(_DOMAIN.match(self.api_domain) is not None, "apiDomain",
               f"{self.api_domain!r} is not a lowercase DNS name like api.example.com")
        _check(_IMAGE_TAG.match(self.image_tag) is not None, "imageTag",
               f"{self.image_tag!r} is not a valid image tag")
        _check(_ZONE_ID.match(self.hosted_zone_id) is not None, "hostedZoneId",
               f"{self.hosted_zone_id!r} is not a Route 53 zone id like Z0123456789ABC (required: certificates are "
               "validated through it)")
        _check(not self.alarm_email or "@" in self.alarm_email, "alarmEmail", "must be an email address")
        _check(self.log_retention_days in LOG_RETENTION_DAYS_ALLOWED, "logRetentionDays",
               f"{self.log_retention_days} is not one of CloudWatch's {sorted(LOG_RETENTION_DAYS_ALLOWED)}")
        _check(BACKUP_RETENTION_DAYS_MIN <= self.backup_retention_days <= BACKUP_RETENTION_DAYS_MAX,
               "backupRetentionDays", f"must be in {BACKUP_RETENTION_DAYS_MIN}..{BACKUP_RETENTION_DAYS_MAX}")
        _check(re.fullmatch(r"1[4-9]\.[0-9]+", self.db_engine_version) is not None, "dbEngineVersion",
               f"{self.db_engine_version!r} must be a PostgreSQL version >= 14 like 16.4")
        unknown = sorted(set(self.interface_endpoints) - INTERFACE_ENDPOINTS_ALLOWED)
        _check(not unknown and len(set(self.interface_endpoints)) == len(self.interface_endpoints),
               "interfaceEndpoints", f"{list(self.interface_endpoints)} must be distinct names from "
               f"{sorted(INTERFACE_ENDPOINTS_ALLOWED)}")
        _check(0 < self.error_ratio_max < 1, "errorRatioMax", "must be in (0, 1)")
        _check(1 <= self.latency_p99_ms_max <= 60_000, "latencyP99MsMax", "must be in 1..60000")
        _check(1 <= self.db_cpu_percent_max <= 100, "dbCpuPercentMax", "must be in 1..100")
        _check(1 <= self.db_free_storage_percent_min <= 90, "dbFreeStoragePercentMin", "must be in 1..90")
        _check(1 <= self.db_connections_percent_max <= 100, "dbConnectionsPercentMax", "must be in 1..100")
        _check(1 <= self.db_replica_lag_s_max <= 3600, "dbReplicaLagSMax", "must be in 1..3600")
        _check(1 <= self.outbox_age_s_max <= 86_400, "outboxAgeSMax", "must be in 1..86400")

    @property
    def db_engine_major(self) -> str:
        return self.db_engine_version.split(".", 1)[0]

    @classmethod
    def from_stack(cls) -> InfraConfig:
        """Reads `txroute:*` of the current stack (only valid inside a Pulumi program). A key left out
        takes the field's default; a key set to an out-of-range value is refused, never replaced."""
        import pulumi

        c = pulumi.Config("txroute")
        readers: dict[str, Callable[[str], Any]] = {
            "str": c.get, "int": c.get_int, "float": c.get_float, "bool": c.get_bool}
        optional: dict[str, Any] = {}
        for field_name, (key, kind) in _OPTIONAL_KEYS.items():
            value = readers[kind](key)
            if value is not None:
                optional[field_name] = value
        if "interface_endpoints" in optional:  # a comma-separated list: "ecr,logs"
            optional["interface_endpoints"] = tuple(
                n.strip() for n in str(optional["interface_endpoints"]).split(",") if n.strip())
        return cls(environment=pulumi.get_stack(), api_domain=c.require("apiDomain"),
                   image_tag=c.require("imageTag"), hosted_zone_id=c.require("hostedZoneId"), **optional)


# field -> (`txroute:` key, type) for every optional key `from_stack` reads.
_OPTIONAL_KEYS: dict[str, tuple[str, str]] = {
    "alarm_email": ("alarmEmail", "str"),
    "log_retention_days": ("logRetentionDays", "int"),
    "backup_retention_days": ("backupRetentionDays", "int"),
    "db_engine_version": ("dbEngineVersion", "str"),
    "nat_gateway_per_az": ("natGatewayPerAz", "bool"),
    "interface_endpoints": ("interfaceEndpoints", "str"),
    "error_ratio_max": ("errorRatioMax", "float"),
    "latency_p99_ms_max": ("latencyP99MsMax", "int"),
    "db_cpu_percent_max": ("dbCpuPercentMax", "int"),
    "db_free_storage_percent_min": ("dbFreeStoragePercentMin", "int"),
    "db_connections_percent_max": ("dbConnectionsPercentMax", "int"),
    "db_replica_lag_s_max": ("dbReplicaLagSMax", "int"),
    "outbox_age_s_max": ("outboxAgeSMax", "int"),
}
# Every `txroute:` key, for the README and for a test that keeps both in step.
REQUIRED_KEYS = ("apiDomain", "imageTag", "hostedZoneId")
CONFIG_KEYS = (*REQUIRED_KEYS, *(key for key, _ in _OPTIONAL_KEYS.values()))


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"txroute:{key}: {why}")
