"""The txroute safety rules as plain validators, so `__main__.py` can pack them for `pulumi up
--policy-pack infra/policy` and the tests can call each one directly (building a `PolicyPack` outside the
engine starts a gRPC server and blocks).

Each validator takes `(args, report_violation)`: `args` has `resource_type` and `props` (engine inputs,
camelCase), and for stack rules `resources`, each with `property_dependencies`. Values still unknown in a
preview are skipped, never reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Report = Callable[..., None]

WORLD = frozenset({"0.0.0.0/0", "::/0"})
HTTPS_PORT = 443
BACKUP_RETENTION_DAYS_MIN = 7
REPO_ROOT = Path(__file__).resolve().parents[2]
RUNBOOK_PATTERN = re.compile(r"Runbook: (runbooks/[a-z0-9-]+\.md)\b")

RDS_CLUSTER = "aws:rds/cluster:Cluster"
RDS_INSTANCE = "aws:rds/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
STANDALONE_INGRESS = ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                      "aws:ec2/securityGroupRule:SecurityGroupRule")
LOAD_BALANCER = "aws:lb/loadBalancer:LoadBalancer"
LISTENER = "aws:lb/listener:Listener"
METRIC_ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
KMS_KEY = "aws:kms/key:Key"
PARAMETER_GROUPS = ("aws:rds/clusterParameterGroup:ClusterParameterGroup",
                    "aws:rds/parameterGroup:ParameterGroup")


def _known(value: Any) -> bool:
    """Unknown values in a preview arrive as None or as the engine's placeholder."""
    return value is not None and not (isinstance(value, str) and value.startswith("04da6b54-"))


# --- databases --------------------------------------------------------------------------------------------

def database_is_safe(args: Any, report_violation: Report) -> None:
    """PostgreSQL storage encrypted with a customer key, private, protected, backed up >= 7 days, final
    snapshot kept, password managed by RDS in Secrets Manager, Performance Insights on (Multi-AZ for
    single instances; a Multi-AZ DB cluster is Multi-AZ by construction)."""
    if args.resource_type not in (RDS_CLUSTER, RDS_INSTANCE):
        return
    p: Mapping[str, Any] = args.props
    problems = []
    if p.get("storageEncrypted") is not True:
        problems.append("storageEncrypted must be true")
    if not p.get("kmsKeyId") and _known(p.get("kmsKeyId", "")):
        problems.append("kmsKeyId must name the region's own KMS key")
    if p.get("publiclyAccessible") is True:
        problems.append("publiclyAccessible must be false")
    if p.get("deletionProtection") is not True:
        problems.append("deletionProtection must be true")
    if p.get("skipFinalSnapshot") is True:
        problems.append("skipFinalSnapshot must be false (keep a final snapshot)")
    retention = p.get("backupRetentionPeriod")
    if not isinstance(retention, int | float) or retention < BACKUP_RETENTION_DAYS_MIN:
        problems.append(f"backupRetentionPeriod must be >= {BACKUP_RETENTION_DAYS_MIN} days, got {retention!r}")
    if p.get("manageMasterUserPassword") is not True or p.get("masterPassword"):
        problems.append("the master password must be managed by RDS (manageMasterUserPassword, no masterPassword)")
    if p.get("performanceInsightsEnabled") is not True:
        problems.append("performanceInsightsEnabled must be true")
    if args.resource_type == RDS_INSTANCE and p.get("multiAz") is not True:
        problems.append("multiAz must be true")
    if args.resource_type == RDS_CLUSTER and p.get("engine") == "postgres" and not p.get("dbClusterInstanceClass"):
        problems.append("a non-Aurora cluster must be a Multi-AZ DB cluster (dbClusterInstanceClass)")
    for problem in problems:
        report_violation(problem)


def database_requires_tls(args: Any, report_violation: Report) -> None:
    """Every PostgreSQL parameter group forces TLS (`rds.force_ssl = 1`)."""
    if args.resource_type not in PARAMETER_GROUPS:
        return
    family = str(args.props.get("family") or "")
    if "postgres" not in family:
        return
    values = {p.get("name"): str(p.get("value")) for p in args.props.get("parameters") or []}
    if values.get("rds.force_ssl") != "1":
        report_violation("a PostgreSQL parameter group must set rds.force_ssl = 1")


# --- network ----------------------------------------------------------------------------------------------

def _open_rules(rules: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rules
            if WORLD & set((r.get("cidrBlocks") or []) + (r.get("ipv6CidrBlocks") or []))]


def _is_https_only(rule: Mapping[str, Any]) -> bool:
    return (str(rule.get("protocol")).lower() in ("tcp", "6")
            and rule.get("fromPort") == HTTPS_PORT and rule.get("toPort") == HTTPS_PORT)


def no_world_ingress_except_https(args: Any, report_violation: Report) -> None:
    """Ingress from 0.0.0.0/0 or ::/0 is only ever TCP 443 (the stack rule `world_ingress_only_on_public_lb`
    then checks that such a group belongs to an internet-facing load balancer). Standalone ingress rules
    may never open to the world: a group open to clients must say so in one place."""
    if args.resource_type in STANDALONE_INGRESS:
        p = args.props
        if args.resource_type.endswith("SecurityGroupRule") and p.get("type") != "ingress":
            return
        cidrs = {p.get("cidrIpv4"), p.get("cidrIpv6"), *(p.get("cidrBlocks") or []),
                 *(p.get("ipv6CidrBlocks") or [])}
        if WORLD & cidrs:
            report_violation("standalone ingress rules may not allow 0.0.0.0/0 or ::/0")
        return
    if args.resource_type != SECURITY_GROUP:
        return
    for rule in _open_rules(args.props.get("ingress") or []):
        if not _is_https_only(rule):
            report_violation(f"ingress from the world must be TCP 443 only, got {rule.get('protocol')} "
                             f"{rule.get('fromPort')}-{rule.get('toPort')}")


def world_ingress_only_on_public_lb(args: Any, report_violation: Report) -> None:
    """A security group open to the world is used by internet-facing load balancers only, and every
    listener of an internet-facing load balancer speaks HTTPS with a certificate."""
    resources = list(args.resources)
    open_groups = {r.urn for r in resources
                   if r.resource_type == SECURITY_GROUP and _open_rules(r.props.get("ingress") or [])}
    for r in resources:
        if r.resource_type == SECURITY_GROUP:
            continue  # a group may name an open group as a source: that opens nothing
        uses = {d.urn for deps in (r.property_dependencies or {}).values() for d in deps} & open_groups
        if not uses:
            continue
        if r.resource_type != LOAD_BALANCER or r.props.get("internal") is True:
            report_violation(f"{r.resource_type} {r.name} uses a security group open to the world; only an "
                             "internet-facing load balancer may", r.urn)
    for r in resources:
        if r.resource_type != LISTENER:
            continue
        lbs = (r.property_dependencies or {}).get("loadBalancerArn") or []
        if any(lb.resource_type == LOAD_BALANCER and lb.props.get("internal") is not True for lb in lbs):
            if r.props.get("protocol") != "HTTPS" or not r.props.get("certificateArn"):
                report_violation(f"listener {r.name} of a public load balancer must be HTTPS with a "
                                 "certificate", r.urn)


def listeners_are_https(args: Any, report_violation: Report) -> None:
    """Every load balancer listener, internal ones included, speaks HTTPS with a certificate and a TLS
    policy: router -> region and region -> region calls cross the peering mesh and are encrypted too."""
    if args.resource_type != LISTENER:
        return
    p: Mapping[str, Any] = args.props
    problems = []
    if p.get("protocol") != "HTTPS" and _known(p.get("protocol")):
        problems.append(f"protocol must be HTTPS, got {p.get('protocol')}")
    if not p.get("certificateArn") and _known(p.get("certificateArn", "")):
        problems.append("certificateArn must name a certificate")
    if not p.get("sslPolicy") and _known(p.get("sslPolicy", "")):
        problems.append("sslPolicy must be set")
    for problem in problems:
        report_violation(f"listener: {problem}")


# --- observability, keys ------------------------------------------------------------------------------------

def alarm_names_runbook(args: Any, report_violation: Report) -> None:
    """Every alarm's description ends with `Runbook: runbooks/<file>.md`, that file exists, and the alarm
    notifies someone."""
    if args.resource_type != METRIC_ALARM:
        return
    description = str(args.props.get("alarmDescription") or "")
    match = RUNBOOK_PATTERN.search(description)
    if match is None:
        report_violation("alarmDescription must name its runbook: 'Runbook: runbooks/<name>.md'")
    elif not (REPO_ROOT / match.group(1)).is_file():
        report_violation(f"alarmDescription names {match.group(1)}, which does not exist")
    if not args.props.get("alarmActions"):
        report_violation("an alarm must have alarmActions (the region's SNS topic)")


def logs_have_retention(args: Any, report_violation: Report) -> None:
    if args.resource_type != LOG_GROUP:
        return
    days = args.props.get("retentionInDays")
    if not isinstance(days, int | float) or days <= 0:
        report_violation("log groups must set retentionInDays (logs never expire otherwise)")
    if not args.props.get("kmsKeyId") and _known(args.props.get("kmsKeyId", "")):
        report_violation("log groups must be encrypted with the region's KMS key")


def keys_rotate(args: Any, report_violation: Report) -> None:
    if args.resource_type == KMS_KEY and args.props.get("enableKeyRotation") is not True:
        report_violation("KMS keys must have enableKeyRotation")


def explicit_provider(args: Any, report_violation: Report) -> None:
    """Every AWS resource names its region's provider; the ambient default provider (whatever region the
    shell happens to have) is never used."""
    if not str(args.resource_type).startswith("aws:"):
        return
    provider = getattr(args, "provider", None)
    name = getattr(provider, "name", "") if provider is not None else ""
    if not name or name.startswith("default"):
        report_violation("AWS resources must use an explicit aws.Provider for their region")


RESOURCE_RULES: dict[str, tuple[str, Callable[[Any, Report], None]]] = {
    "database-is-safe": ("RDS PostgreSQL: encrypted, private, protected, backed up, managed password, PI on",
                         database_is_safe),
    "database-requires-tls": ("PostgreSQL parameter groups force TLS", database_requires_tls),
    "no-world-ingress-except-https": ("Only TCP 443 may be open to the world", no_world_ingress_except_https),
    "listeners-are-https": ("Every load balancer listener, internal too, is HTTPS with a certificate",
                            listeners_are_https),
    "alarm-names-runbook": ("Alarms name an existing runbook and notify", alarm_names_runbook),
    "logs-have-retention": ("Log groups expire and are encrypted", logs_have_retention),
    "kms-keys-rotate": ("KMS keys rotate", keys_rotate),
    "explicit-provider": ("AWS resources use an explicit regional provider", explicit_provider),
}
STACK_RULES: dict[str, tuple[str, Callable[[Any, Report], None]]] = {
    "world-ingress-only-on-public-lb": ("Open security groups belong to HTTPS-only public load balancers",
                                        world_ingress_only_on_public_lb),
}
