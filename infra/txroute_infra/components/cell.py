"""One region's cell: its network, key, database, compute and alarms, all under the region's own
`aws.Provider`. One cell per file in `regions/`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pulumi
import pulumi_aws

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent
from txroute_infra.components.compute import Compute
from txroute_infra.components.database import MASTER_USERNAME, SERVICE_USERNAME, Database
from txroute_infra.components.keys import RegionKey
from txroute_infra.components.migrate import MigrateTask
from txroute_infra.components.network import Network
from txroute_infra.components.observability import PERIOD_S, Observability
from txroute_infra.config import InfraConfig
from txroute_infra.topology import Region

GIB = 1024**3


def region_provider(region: str, environment: str) -> pulumi_aws.Provider:
    """The explicit provider every resource of a region uses; nothing relies on an ambient region."""
    return pulumi_aws.Provider(
        f"{region}-aws", region=region,
        default_tags={"tags": {"app": "txroute", "environment": environment, "managed-by": "pulumi"}})


class RegionalCell(RegionalComponent):
    def __init__(self, region: Region, *, peers: Sequence[Region], config: InfraConfig,
                 provider: pulumi_aws.Provider, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:RegionalCell", region.name, provider, opts)
        self.spec = region
        self.config = config
        env = config.environment
        sub = pulumi.ResourceOptions(parent=self)
        self.key = RegionKey(region.name, environment=env, provider=provider, opts=sub)
        self.network = Network(region.name, region.vpc_cidr, peer_cidrs=[p.vpc_cidr for p in peers],
                               nat_per_az=config.nat_gateway_per_az, environment=env, provider=provider,
                               interface_endpoints=config.interface_endpoints, opts=sub)
        self.observability = Observability(region.name, environment=env, kms_key_arn=self.key.arn,
                                           log_retention_days=config.log_retention_days,
                                           alarm_email=config.alarm_email, provider=provider, opts=sub)
        self.database = Database(region, subnet_ids=[s.id for s in self.network.data_subnets],
                                 security_group_id=self.network.db_sg.id, kms_key_arn=self.key.arn,
                                 config=config, provider=provider, opts=sub)
        n = self.network
        self.compute = Compute(
            region, environment=env, image_tag=config.image_tag, api_domain=config.api_domain,
            vpc_id=n.vpc.id, public_subnet_ids=[s.id for s in n.public_subnets],
            app_subnet_ids=[s.id for s in n.app_subnets], public_lb_sg=n.public_lb_sg.id,
            internal_lb_sg=n.internal_lb_sg.id, router_sg=n.router_sg.id, region_sg=n.region_sg.id,
            kms_key_arn=self.key.arn,
            log_groups={k: g.name for k, g in self.observability.log_groups.items()},
            database_endpoint=self.database.endpoint, database_secret_arn=self.database.service_secret_arn,
            database_username=SERVICE_USERNAME, provider=provider, opts=sub)
        # Provisioning as the owner, apart from the services (ci/github/deploy.sh runs it).
        self.migrate = MigrateTask(
            region, environment=env, image=self.compute.image,
            log_group_name=self.observability.log_groups["region-service"].name, kms_key_arn=self.key.arn,
            database_endpoint=self.database.endpoint, owner_username=MASTER_USERNAME,
            master_secret_arn=self.database.master_secret_arn,
            service_secret_arn=self.database.service_secret_arn, provider=provider, opts=sub)
        self._region_alarms()
        self._database_alarms()

    def add_router(self, *, region_urls: pulumi.Input[Mapping[str, str]],
                   validation_record_fqdns: Sequence[pulumi.Input[str]],
                   internal_validation_record_fqdns: Sequence[pulumi.Input[str]]) -> None:
        assert validation_record_fqdns and internal_validation_record_fqdns, \
            "a certificate validation without its DNS records waits forever"
        self.compute.add_router(region_urls=region_urls, validation_record_fqdns=validation_record_fqdns,
                                internal_validation_record_fqdns=internal_validation_record_fqdns)
        c = self.compute
        self._load_balancer_alarms("router", c.public_lb.arn_suffix, c.router_tg.arn_suffix)
        self.register_outputs({"router_lb": c.public_lb.arn, "internal_url": c.internal_url})

    # --- alarms -------------------------------------------------------------------------------------

    def _region_alarms(self) -> None:
        c = self.compute
        self._load_balancer_alarms("region-api", c.internal_lb.arn_suffix, c.region_tg.arn_suffix)
        self.observability.alarm(
            "saga-outbox-age", runbook=layout.RUNBOOK_SAGA_BACKLOG, comparison="GreaterThanThreshold",
            summary=f"The oldest undelivered saga message in {self.region} is older than "
                    f"{self.config.outbox_age_s_max} s: cross-shard transfers are stuck pending.",
            threshold=self.config.outbox_age_s_max,
            metric={"namespace": layout.OUTBOX_METRIC_NAMESPACE, "metric_name": layout.OUTBOX_METRIC_NAME,
                    "dimensions": {"Region": self.region}, "statistic": "Maximum"})
        self._ledger_alarms()

    def _ledger_alarms(self) -> None:
        """Alarms on the region's own metrics (layout: embedded metric format in its log)."""
        o, ns, dims = self.observability, layout.OUTBOX_METRIC_NAMESPACE, {"Region": self.region}
        o.alarm(
            "reconciliation-mismatch", runbook=layout.RUNBOOK_RECONCILIATION_MISMATCH,
            comparison="LessThanThreshold", threshold=1, treat_missing_data="notBreaching",
            summary=f"The last txroute audit recorded in {self.region}'s shards found violations: balances, "
                    "transit or money conservation do not reconcile.",
            metric={"namespace": ns, "metric_name": layout.AUDIT_CLEAN_METRIC_NAME, "dimensions": dims,
                    "statistic": "Minimum"})

        def metric(query_id: str, name: str) -> dict[str, object]:
            return {"id": query_id, "return_data": False, "metric": {
                "namespace": ns, "metric_name": name, "dimensions": dims, "stat": "Sum", "period": 60}}

        ratio = layout.IDEMPOTENCY_CONFLICT_RATIO_MAX
        o.alarm(
            "idempotency-conflict-ratio", runbook=layout.RUNBOOK_IDEMPOTENCY_CONFLICTS,
            comparison="GreaterThanThreshold", threshold=ratio, treat_missing_data="notBreaching",
            summary=f"More than {ratio:.0%} of writes in {self.region} are refused (409/422) for a reused or "
                    "in-flight Idempotency-Key.",
            queries=[
                metric("conflicts", layout.IDEMPOTENCY_CONFLICTS_METRIC_NAME),
                metric("writes", layout.WRITES_METRIC_NAME),
                {"id": "ratio", "label": "idempotency conflict ratio", "return_data": True,
                 "expression": "IF(writes > 0, FILL(conflicts, 0) / writes, 0)"},
            ])
        stuck = layout.SLOT_MOVE_PHASE_AGE_S_MAX
        o.alarm(
            "slot-move-stuck", runbook=layout.RUNBOOK_MOVE_SLOTS,
            comparison="GreaterThanThreshold", threshold=stuck, treat_missing_data="notBreaching",
            summary=f"A slot move leaving a shard of {self.region} has been in one phase for more than {stuck} s.",
            metric={"namespace": ns, "metric_name": layout.SLOT_MOVE_PHASE_AGE_METRIC_NAME, "dimensions": dims,
                    "statistic": "Maximum"})
        limited = layout.RATE_LIMITED_PER_MIN_MAX
        o.alarm(
            "tenant-throttled", runbook=layout.RUNBOOK_TENANT_THROTTLED,
            comparison="GreaterThanThreshold", threshold=limited, treat_missing_data="notBreaching",
            summary=f"More than {limited} requests a minute in {self.region} are refused 429 rate_limited: a client "
                    "is over its rate at the routers or its share of a shard's posting queue.",
            metric={"namespace": ns, "metric_name": layout.RATE_LIMITED_METRIC_NAME, "dimensions": dims,
                    "statistic": "Sum"})
        o.alarm(
            "webhook-endpoint-disabled", runbook=layout.RUNBOOK_WEBHOOK_FAILURES,
            comparison="GreaterThanThreshold", threshold=0, treat_missing_data="notBreaching",
            summary=f"The webhook worker of {self.region} disabled an endpoint: it answered 410, or its deliveries "
                    "failed for the whole retry schedule; its client receives nothing until it is re-enabled.",
            metric={"namespace": ns, "metric_name": layout.WEBHOOK_DISABLED_METRIC_NAME, "dimensions": dims,
                    "statistic": "Sum"})

    def _load_balancer_alarms(self, tier: str, lb_suffix: pulumi.Output[str],
                              tg_suffix: pulumi.Output[str]) -> None:
        cfg, o = self.config, self.observability

        def alb(metric_name: str, stat: str, *, target_group: bool = False) -> dict[str, object]:
            dims: dict[str, object] = {"LoadBalancer": lb_suffix}
            if target_group:
                dims["TargetGroup"] = tg_suffix
            return {"metric": {"namespace": "AWS/ApplicationELB", "metric_name": metric_name,
                               "dimensions": dims, "stat": stat, "period": 60}}

        o.alarm(
            f"{tier}-5xx-ratio", runbook=layout.RUNBOOK_LATENCY_OR_ERRORS, comparison="GreaterThanThreshold",
            summary=f"More than {cfg.error_ratio_max:.1%} of {tier} requests in {self.region} end in a 5xx.",
            threshold=cfg.error_ratio_max, treat_missing_data="notBreaching",
            queries=[
                {"id": "target5xx", **alb("HTTPCode_Target_5XX_Count", "Sum"), "return_data": False},
                {"id": "lb5xx", **alb("HTTPCode_ELB_5XX_Count", "Sum"), "return_data": False},
                {"id": "requests", **alb("RequestCount", "Sum"), "return_data": False},
                {"id": "ratio", "label": "5xx ratio", "return_data": True,
                 "expression": "IF(requests > 0, (FILL(target5xx, 0) + FILL(lb5xx, 0)) / requests, 0)"},
            ])
        o.alarm(
            f"{tier}-p99-latency", runbook=layout.RUNBOOK_LATENCY_OR_ERRORS, comparison="GreaterThanThreshold",
            summary=f"p99 {tier} response time in {self.region} is above {cfg.latency_p99_ms_max} ms.",
            threshold=cfg.latency_p99_ms_max / 1000, treat_missing_data="notBreaching",
            metric={"namespace": "AWS/ApplicationELB", "metric_name": "TargetResponseTime",
                    "dimensions": {"LoadBalancer": lb_suffix}, "extended_statistic": "p99"})
        o.alarm(
            f"{tier}-no-healthy-targets", runbook=layout.RUNBOOK_REGION_UNAVAILABLE,
            comparison="LessThanThreshold", threshold=1, treat_missing_data="breaching",
            summary=f"No healthy {tier} task behind its load balancer in {self.region}.",
            metric={"namespace": "AWS/ApplicationELB", "metric_name": "HealthyHostCount",
                    "dimensions": {"LoadBalancer": lb_suffix, "TargetGroup": tg_suffix},
                    "statistic": "Minimum"})

    def _database_alarms(self) -> None:
        """Alarms over the cluster's member DB instances: a Multi-AZ DB cluster (unlike Aurora) publishes
        no `DBClusterIdentifier` metrics, so each alarm is metric math over the writer and both readers.

        Missing data is decided per alarm: for the capacity alarms a member without datapoints (being replaced,
        or the whole cluster silent) is not a capacity problem (`notBreaching`); the replica-lag alarm treats
        silence as breaching, so a cluster that stops reporting at all pages the failover runbook."""
        cfg, o, cap = self.config, self.observability, self.spec.capacity
        members = self.database.member_identifiers

        def over_members(metric_name: str, stat: str, combine: str) -> pulumi.Output[list[dict[str, object]]]:
            return members.apply(lambda ids: member_queries(ids, metric_name, stat, combine))

        free_bytes_min = cap.db_allocated_storage_gb * GIB * cfg.db_free_storage_percent_min // 100
        connections_max = cap.db_max_connections * cfg.db_connections_percent_max // 100
        o.alarm("db-cpu", runbook=layout.RUNBOOK_DATABASE_CAPACITY, comparison="GreaterThanThreshold",
                summary=f"Database CPU in {self.region} is above {cfg.db_cpu_percent_max}% on a member instance.",
                threshold=cfg.db_cpu_percent_max, treat_missing_data="notBreaching",
                queries=over_members("CPUUtilization", "Maximum", "MAX"))
        o.alarm("db-free-storage", runbook=layout.RUNBOOK_DATABASE_CAPACITY, comparison="LessThanThreshold",
                summary=f"Database free storage in {self.region} is below {cfg.db_free_storage_percent_min}% "
                        f"of {cap.db_allocated_storage_gb} GiB on a member instance.",
                threshold=free_bytes_min, treat_missing_data="notBreaching",
                queries=over_members("FreeStorageSpace", "Minimum", "MIN"))
        o.alarm("db-connections", runbook=layout.RUNBOOK_DATABASE_CAPACITY, comparison="GreaterThanThreshold",
                summary=f"Database connections in {self.region} are above {connections_max} "
                        f"({cfg.db_connections_percent_max}% of max_connections {cap.db_max_connections}).",
                threshold=connections_max, treat_missing_data="notBreaching",
                queries=over_members("DatabaseConnections", "Maximum", "MAX"))
        o.alarm("db-replica-lag", runbook=layout.RUNBOOK_DATABASE_FAILOVER, comparison="GreaterThanThreshold",
                summary=f"A database standby in {self.region} lags the writer by more than "
                        f"{cfg.db_replica_lag_s_max} s (or no member reports lag at all): a failover now would "
                        "be slow or impossible.",
                threshold=cfg.db_replica_lag_s_max, treat_missing_data="breaching",
                queries=over_members("ReplicaLag", "Maximum", "MAX"))


def member_queries(instance_ids: Sequence[str], metric_name: str, stat: str,
                   combine: str) -> list[dict[str, object]]:
    """Metric math over one AWS/RDS metric of each member instance: `combine` (MAX or MIN) of all of them."""
    assert instance_ids, "a Multi-AZ DB cluster has a writer and two readers"
    assert combine in ("MAX", "MIN"), combine
    queries: list[dict[str, object]] = [
        {"id": f"m{i}", "return_data": False, "metric": {
            "namespace": "AWS/RDS", "metric_name": metric_name, "dimensions": {"DBInstanceIdentifier": instance},
            "stat": stat, "period": PERIOD_S}}
        for i, instance in enumerate(instance_ids)]
    ids = ", ".join(str(q["id"]) for q in queries)
    queries.append({"id": "members", "label": f"{combine} {metric_name} over member instances",
                    "return_data": True, "expression": f"{combine}([{ids}])"})
    return queries
