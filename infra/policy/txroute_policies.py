"""The txroute safety rules as plain validators, so `__main__.py` can pack them for `pulumi up
--policy-pack infra/policy` and the tests can call each one directly (building a `PolicyPack` outside the
engine starts a gRPC server and blocks).

Each validator takes `(args, report_violation)`: `args` has `resource_type` and `props` (engine inputs,
camelCase), and for stack rules `resources`, each with `property_dependencies`. Values still unknown in a
preview are skipped, never reported.
"""

from __future__ import annotations

import json
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
LISTENER_RULE = "aws:lb/listenerRule:ListenerRule"
TARGET_GROUP = "aws:lb/targetGroup:TargetGroup"
TASK_DEFINITION = "aws:ecs/taskDefinition:TaskDefinition"
ENDPOINT_GROUP = "aws:globalaccelerator/endpointGroup:EndpointGroup"
VPC = "aws:ec2/vpc:Vpc"
VPC_ENDPOINT = "aws:ec2/vpcEndpoint:VpcEndpoint"
CERTIFICATE_VALIDATION = "aws:acm/certificateValidation:CertificateValidation"
ROUTE53_RECORD = "aws:route53/record:Record"

# The pack is installed on its own (PulumiPolicy.yaml), so these facts are restated here rather than imported;
# tests/infra/test_policy.py keeps each equal to its source in the program or the topology loader.
# Elastic Load Balancing API Reference, FixedResponseActionConfig.ContentType.
FIXED_RESPONSE_CONTENT_TYPES = frozenset(
    {"text/plain", "text/css", "text/html", "application/javascript", "application/json"})
# Amazon RDS User Guide, "Instance class availability for Multi-AZ DB clusters" (app/topology/loader.py).
MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES = frozenset(
    {"m5d", "m6gd", "m6id", "m6idn", "r5d", "r6gd", "r6id", "r6idn", "x2iedn", "c6gd"})
MULTI_AZ_DB_CLUSTER_STORAGE_TYPES = frozenset({"io1", "io2", "gp3"})
# RDS for PostgreSQL takes explicit gp3 IOPS only from 400 GiB; IOPS are 0.5..50 per GiB (CreateDBCluster).
GP3_EXPLICIT_IOPS_STORAGE_GB_MIN = 400
IOPS_PER_GB_MIN, IOPS_PER_GB_MAX = 0.5, 50
# A Multi-AZ DB cluster fails over in typically under 35 s; a probe that can replace a task outlasts it.
DB_FAILOVER_S = 35
READINESS_PATH = "/readyz"


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


# --- what AWS itself would refuse or silently ignore ------------------------------------------------------------

def _actions(args: Any) -> list[Mapping[str, Any]]:
    if args.resource_type == LISTENER:
        return list(args.props.get("defaultActions") or [])
    if args.resource_type == LISTENER_RULE:
        return list(args.props.get("actions") or [])
    return []


def fixed_responses_use_allowed_content_types(args: Any, report_violation: Report) -> None:
    """ELB fixed-response actions accept only five content types; anything else fails the create."""
    for action in _actions(args):
        content_type = (action.get("fixedResponse") or {}).get("contentType")
        if content_type is not None and _known(content_type) and content_type not in FIXED_RESPONSE_CONTENT_TYPES:
            report_violation(f"fixed-response contentType {content_type!r} is not one ELB accepts "
                             f"({', '.join(sorted(FIXED_RESPONSE_CONTENT_TYPES))})")


def multi_az_db_cluster_is_orderable(args: Any, report_violation: Report) -> None:
    """A Multi-AZ DB cluster (non-Aurora, `dbClusterInstanceClass` set) uses a class RDS offers for it, and a
    storage type with explicit IOPS that CreateDBCluster accepts (gp3 with IOPS from 400 GiB for PostgreSQL)."""
    if args.resource_type != RDS_CLUSTER:
        return
    p = args.props
    instance_class = p.get("dbClusterInstanceClass")
    if not instance_class or not _known(instance_class) or str(p.get("engine", "")).startswith("aurora"):
        return
    parts = str(instance_class).split(".")
    if len(parts) != 3 or parts[0] != "db" or parts[1] not in MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES:
        report_violation(f"dbClusterInstanceClass {instance_class!r} is not offered for Multi-AZ DB clusters")
    storage_type, iops, storage = p.get("storageType"), p.get("iops"), p.get("allocatedStorage")
    if storage_type not in MULTI_AZ_DB_CLUSTER_STORAGE_TYPES:
        report_violation(f"storageType {storage_type!r}: a Multi-AZ DB cluster takes io1, io2 or gp3")
    if not isinstance(iops, int | float) or iops <= 0:
        report_violation("iops is required for a Multi-AZ DB cluster (CreateDBCluster)")
    if not isinstance(storage, int | float):
        report_violation("allocatedStorage is required for a Multi-AZ DB cluster")
        return
    if storage_type == "gp3" and p.get("engine") == "postgres" and storage < GP3_EXPLICIT_IOPS_STORAGE_GB_MIN:
        report_violation(f"gp3 with explicit iops needs allocatedStorage >= {GP3_EXPLICIT_IOPS_STORAGE_GB_MIN} GiB "
                         f"for PostgreSQL, got {storage}")
    if isinstance(iops, int | float) and iops > 0 and not IOPS_PER_GB_MIN <= iops / storage <= IOPS_PER_GB_MAX:
        report_violation(f"iops {iops} must be {IOPS_PER_GB_MIN}..{IOPS_PER_GB_MAX} times allocatedStorage {storage}")


def engine_version_drift_is_ignored(args: Any, report_violation: Report) -> None:
    """With automatic minor upgrades on, RDS moves the engine past the pinned version; the program must ignore
    that drift, or the next `up` asks RDS for a downgrade, which it refuses."""
    if args.resource_type not in (RDS_CLUSTER, RDS_INSTANCE):
        return
    p = args.props
    if not p.get("engineVersion") or p.get("autoMinorVersionUpgrade") is False:
        return
    opts = getattr(args, "opts", None)
    ignored = set(getattr(opts, "ignore_changes", None) or [])
    if not ignored & {"engineVersion", "engine_version"}:
        report_violation("engineVersion is pinned while autoMinorVersionUpgrade is on: add engineVersion to "
                         "ignore_changes (or turn automatic minor upgrades off and manage them)")


_STATEMENT_LOGGING = {  # parameter -> predicate on its value saying "statements are logged"
    "log_min_duration_statement": lambda v: v.lstrip("-").isdigit() and int(v) >= 0,
    "log_min_duration_sample": lambda v: v.lstrip("-").isdigit() and int(v) >= 0,
    "log_statement": lambda v: v.lower() in ("mod", "all"),
    "log_duration": lambda v: v.lower() in ("1", "on", "true"),
}


def database_logs_no_bind_values(args: Any, report_violation: Report) -> None:
    """A PostgreSQL parameter group that logs statements also sets `log_parameter_max_length = 0`: by default
    PostgreSQL logs every bind value with the statement (account ids, amounts) into CloudWatch; and none logs
    bind values of failed statements (`log_parameter_max_length_on_error`)."""
    if args.resource_type not in PARAMETER_GROUPS or "postgres" not in str(args.props.get("family") or ""):
        return
    values = {str(p.get("name")): str(p.get("value")) for p in args.props.get("parameters") or []}
    logging_on = [name for name, logs in _STATEMENT_LOGGING.items() if name in values and logs(values[name])]
    if logging_on and values.get("log_parameter_max_length") != "0":
        report_violation(f"{', '.join(logging_on)} logs statements with their bind values: set "
                         "log_parameter_max_length = 0")
    if values.get("log_parameter_max_length_on_error", "0") != "0":
        report_violation("log_parameter_max_length_on_error must stay 0 (bind values of failed statements)")


def _rds_metric_dimensions(props: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = []
    if props.get("namespace") == "AWS/RDS":
        found.append(props.get("dimensions") or {})
    for query in props.get("metricQueries") or []:
        metric = query.get("metric") or {}
        if metric.get("namespace") == "AWS/RDS":
            found.append(metric.get("dimensions") or {})
    return found


def rds_alarms_watch_member_instances(args: Any, report_violation: Report) -> None:
    """RDS Multi-AZ DB clusters (this project has no Aurora) publish their metrics per DB instance: an alarm
    on the `DBClusterIdentifier` dimension never gets data and sits in INSUFFICIENT_DATA forever."""
    if args.resource_type != METRIC_ALARM:
        return
    if any("DBClusterIdentifier" in dims for dims in _rds_metric_dimensions(args.props)):
        report_violation("RDS alarms must watch the member DB instances (DBInstanceIdentifier, metric math over "
                         "them): Multi-AZ DB clusters publish no DBClusterIdentifier metrics")


def _probe_window_s(interval: Any, failures: Any) -> float | None:
    if isinstance(interval, int | float) and isinstance(failures, int | float):
        return float(interval * failures)
    return None


def health_checks_are_liveness(args: Any, report_violation: Report) -> None:
    """Target groups and container health checks (both make ECS replace a task) probe liveness, never
    `/readyz`, and tolerate failures for longer than a Multi-AZ DB cluster failover."""
    if args.resource_type == TARGET_GROUP:
        hc = args.props.get("healthCheck") or {}
        if hc.get("path") == READINESS_PATH:
            report_violation(f"target group health checks must not probe {READINESS_PATH}: a database failover "
                             "would make ECS replace every task")
        window = _probe_window_s(hc.get("interval"), hc.get("unhealthyThreshold"))
        if window is not None and window <= DB_FAILOVER_S:
            report_violation(f"target group: interval x unhealthyThreshold = {window:.0f} s must exceed the "
                             f"{DB_FAILOVER_S} s of a database failover")
    elif args.resource_type == TASK_DEFINITION:
        raw = args.props.get("containerDefinitions")
        if not isinstance(raw, str) or not _known(raw):
            return
        for container in json.loads(raw):
            hc = container.get("healthCheck")
            if not hc:
                continue
            if READINESS_PATH in " ".join(map(str, hc.get("command") or [])):
                report_violation(f"container {container.get('name')}: the health check must not probe "
                                 f"{READINESS_PATH}")
            window = _probe_window_s(hc.get("interval", 30), hc.get("retries", 3))
            if window is not None and window <= DB_FAILOVER_S:
                report_violation(f"container {container.get('name')}: interval x retries = {window:.0f} s must "
                                 f"exceed the {DB_FAILOVER_S} s of a database failover")


def _depends_on(resource: Any, resource_type: str, key: str | None = None) -> list[Any]:
    deps = resource.property_dependencies or {}
    groups = [deps.get(key) or []] if key is not None else list(deps.values())
    return [d for group in groups for d in group if d.resource_type == resource_type]


def endpoint_groups_leave_health_to_load_balancers(args: Any, report_violation: Report) -> None:
    """Global Accelerator ignores an endpoint group's HTTP(S) health-check settings for load balancer endpoints
    (it follows the load balancer's target health), so setting them only misleads the reader."""
    for r in args.resources:
        if r.resource_type != ENDPOINT_GROUP or not _depends_on(r, LOAD_BALANCER, "endpointConfigurations"):
            continue
        p = r.props
        if p.get("healthCheckPath") or str(p.get("healthCheckProtocol") or "TCP").upper() != "TCP":
            report_violation(f"endpoint group {r.name} fronts a load balancer: its health-check path and "
                             "protocol are ignored; configure the load balancer's target group instead", r.urn)


def every_vpc_has_an_s3_gateway_endpoint(args: Any, report_violation: Report) -> None:
    """Each VPC has an S3 gateway endpoint (free), so image layers (ECR serves them from S3) and other S3
    traffic never pay NAT processing."""
    resources = list(args.resources)
    served = {d.urn for r in resources if r.resource_type == VPC_ENDPOINT
              and str(r.props.get("vpcEndpointType") or "Gateway") == "Gateway"
              and str(r.props.get("serviceName") or "").endswith(".s3")
              for d in _depends_on(r, VPC, "vpcId")}
    for r in resources:
        if r.resource_type == VPC and r.urn not in served:
            report_violation(f"VPC {r.name} has no S3 gateway endpoint", r.urn)


def certificates_validate_through_dns_records(args: Any, report_violation: Report) -> None:
    """A certificate validation waits for DNS: it must name validation records the stack itself creates, or the
    first `up` waits for a record nobody has published yet until the provider's timeout."""
    for r in args.resources:
        if r.resource_type != CERTIFICATE_VALIDATION:
            continue
        if not r.props.get("validationRecordFqdns") or not _depends_on(r, ROUTE53_RECORD, "validationRecordFqdns"):
            report_violation(f"certificate validation {r.name} must name the Route 53 validation records the "
                             "stack creates (validationRecordFqdns)", r.urn)


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
    "fixed-responses-use-allowed-content-types": ("ELB fixed responses use a content type ELB accepts",
                                                  fixed_responses_use_allowed_content_types),
    "multi-az-db-cluster-is-orderable": ("Multi-AZ DB clusters: an offered class, storage with explicit IOPS",
                                         multi_az_db_cluster_is_orderable),
    "engine-version-drift-is-ignored": ("A pinned engine version tolerates automatic minor upgrades",
                                        engine_version_drift_is_ignored),
    "database-logs-no-bind-values": ("PostgreSQL never logs bind values", database_logs_no_bind_values),
    "rds-alarms-watch-member-instances": ("RDS alarms use per-instance metrics", rds_alarms_watch_member_instances),
    "health-checks-are-liveness": ("Probes that replace tasks check liveness and outlast a failover",
                                   health_checks_are_liveness),
}
STACK_RULES: dict[str, tuple[str, Callable[[Any, Report], None]]] = {
    "world-ingress-only-on-public-lb": ("Open security groups belong to HTTPS-only public load balancers",
                                        world_ingress_only_on_public_lb),
    "endpoint-groups-leave-health-to-load-balancers": ("No ignored health checks on ALB endpoint groups",
                                                       endpoint_groups_leave_health_to_load_balancers),
    "every-vpc-has-an-s3-gateway-endpoint": ("S3 traffic bypasses NAT", every_vpc_has_an_s3_gateway_endpoint),
    "certificates-validate-through-dns-records": ("Certificate validations name records the stack creates",
                                                  certificates_validate_through_dns_records),
}
