"""A region's PostgreSQL: one RDS for PostgreSQL **Multi-AZ DB cluster** holding every shard database of
the region (the region service hosts all of them on one server, `shard_<name>` each).

Why RDS Multi-AZ DB cluster rather than Aurora PostgreSQL or a single Multi-AZ instance:
- A transfer is a small, fsync-bound transaction (DESIGN D11). The Multi-AZ DB cluster acknowledges a commit
  once one of two standbys in other AZs has it (semi-synchronous), so a failover loses no acknowledged
  transfer, and it fails over in well under a minute, against one to two minutes for a Multi-AZ instance.
- Its two standbys are readable and report `ReplicaLag`, the signal the failover runbook watches; a Multi-AZ
  instance's standby is invisible.
- Storage is provisioned (`db_allocated_storage_gb` in `regions/`), priced flat; Aurora bills every I/O (or
  a surcharge for I/O-Optimized), which a write-heavy ledger pays on each posting. Aurora's faster storage
  failover does not pay for that at our size; the scale path is more shards and regions (DESIGN, Scale path).
- The API is plain PostgreSQL 16, the same engine the tests run.

Safety is not configuration here: storage encrypted with the region's own KMS key, never publicly
accessible, deletion protection on, a final snapshot on delete, at least 7 days of backups, TLS required
(`rds.force_ssl`; the services verify the server's certificate against the RDS CA bundle in the image), the
master password generated and kept by RDS in Secrets Manager (never in state or outputs) and read only by the
migrate task, Performance Insights on. The services log in as the least-privilege `txroute_service` role.
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_aws.cloudwatch as cloudwatch
import pulumi_aws.rds as rds
import pulumi_aws.secretsmanager as secretsmanager

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent, tags
from txroute_infra.config import InfraConfig
from txroute_infra.topology import Region

MASTER_USERNAME = "txroute"
# The least-privilege role the regional services log in as (DESIGN D8; app/store/provision.py grants it).
SERVICE_USERNAME = "txroute_service"
SECRET_RECOVERY_WINDOW_DAYS = 30
# Performance Insights: 7 days is the retention included at no cost; longer is a paid tier.
PERFORMANCE_INSIGHTS_RETENTION_DAYS = 7
BACKUP_WINDOW_UTC = "02:00-03:00"
MAINTENANCE_WINDOW_UTC = "sun:03:30-sun:04:30"
# CreateDBCluster requires IOPS with the storage type of a Multi-AZ DB cluster, and RDS for PostgreSQL takes
# explicit gp3 IOPS only from 400 GiB (the topology loader refuses less). 12,000 IOPS is what gp3 includes at
# 400 GiB and above, so asking for it explicitly costs nothing extra (io1 would bill every IOPS).
STORAGE_TYPE = "gp3"
STORAGE_IOPS = 12_000
# No statement logging (`log_min_duration_statement` stays at its default, -1): PostgreSQL logs a slow
# statement with its bind values (`log_parameter_max_length` defaults to -1, unlimited), which would put
# account ids and amounts into CloudWatch for the log retention. Whether RDS lets a parameter group set
# `log_parameter_max_length` could not be confirmed from its documentation (infra/README.md), so nothing that
# logs statements is turned on; slow statements are found in Performance Insights, which records statement
# text with placeholders only. The policy pack refuses statement logging without `log_parameter_max_length=0`.


class Database(RegionalComponent):
    def __init__(self, region: Region, *, subnet_ids: Sequence[pulumi.Input[str]],
                 security_group_id: pulumi.Input[str], kms_key_arn: pulumi.Input[str], config: InfraConfig,
                 provider: pulumi.ProviderResource, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:Database", region.name, provider, opts)
        t = tags(config.environment, region.name, shards=" ".join(s.name for s in region.shards))
        self.cluster_identifier = f"txroute-{config.environment}-{region.name}"
        params = rds.ClusterParameterGroup(
            self.name("db-params"), family=f"postgres{config.db_engine_major}",
            description="txroute: TLS only, bounded connections",
            parameters=[
                {"name": "rds.force_ssl", "value": "1", "apply_method": "immediate"},
                {"name": "ssl_min_protocol_version", "value": "TLSv1.2", "apply_method": "immediate"},
                {"name": "max_connections", "value": str(region.capacity.db_max_connections),
                 "apply_method": "pending-reboot"},
            ],
            tags=t, opts=self.child())
        subnets = rds.SubnetGroup(self.name("db-subnets"), subnet_ids=list(subnet_ids),
                                  description="txroute data subnets, one per AZ", tags=t, opts=self.child())
        # RDS would create this log group itself with no expiry; creating it first bounds its retention.
        self.log_group = cloudwatch.LogGroup(
            self.name("db-log"), name=f"/aws/rds/cluster/{self.cluster_identifier}/postgresql",
            retention_in_days=config.log_retention_days, kms_key_id=kms_key_arn, tags=t, opts=self.child())
        self.cluster = rds.Cluster(
            self.name("db"),
            cluster_identifier=self.cluster_identifier,
            engine="postgres",
            engine_version=config.db_engine_version,
            db_cluster_instance_class=region.capacity.db_instance_class,
            allocated_storage=region.capacity.db_allocated_storage_gb,
            storage_type=STORAGE_TYPE,
            iops=STORAGE_IOPS,
            storage_encrypted=True,
            kms_key_id=kms_key_arn,
            master_username=MASTER_USERNAME,
            manage_master_user_password=True,
            master_user_secret_kms_key_id=kms_key_arn,
            db_subnet_group_name=subnets.name,
            vpc_security_group_ids=[security_group_id],
            db_cluster_parameter_group_name=params.name,
            publicly_accessible=False,
            deletion_protection=True,
            skip_final_snapshot=False,
            final_snapshot_identifier=f"{self.cluster_identifier}-final",
            backup_retention_period=config.backup_retention_days,
            preferred_backup_window=BACKUP_WINDOW_UTC,
            preferred_maintenance_window=MAINTENANCE_WINDOW_UTC,
            copy_tags_to_snapshot=True,
            performance_insights_enabled=True,
            performance_insights_kms_key_id=kms_key_arn,
            performance_insights_retention_period=PERFORMANCE_INSIGHTS_RETENTION_DAYS,
            enabled_cloudwatch_logs_exports=["postgresql"],
            # RDS applies minor upgrades in the maintenance window; `engine_version` then names an older
            # version than the cluster runs and the next `up` would try a downgrade, which RDS refuses. The
            # pinned version is what a new cluster starts with; after that RDS owns the minor version, and
            # a major upgrade is a deliberate procedure (infra/README.md), not a config edit.
            auto_minor_version_upgrade=True,
            apply_immediately=False,
            port=layout.POSTGRES_PORT,
            tags=t,
            opts=self.child(depends_on=[self.log_group], ignore_changes=["engineVersion"]),
        )
        self.endpoint = self.cluster.endpoint
        # The writer and both readers by DB instance identifier (DescribeDBClusters' DBClusterMembers): a
        # Multi-AZ DB cluster publishes its CloudWatch metrics per instance, never per cluster.
        self.member_identifiers: pulumi.Output[list[str]] = self.cluster.cluster_members.apply(
            lambda members: sorted(members or []))
        # The secret RDS creates and rotates; only the migrate task (components/migrate.py) may read it.
        self.master_secret_arn: pulumi.Output[str] = self.cluster.master_user_secrets.apply(
            lambda s: str(s[0].secret_arn))
        # The service role's password (JSON username, password): created empty, filled by the first migrate
        # task with a generated password (never in Pulumi's state), read by the region service at run time.
        self.service_secret_arn: pulumi.Output[str] = secretsmanager.Secret(
            self.name("db-service-secret"), name=f"txroute/{config.environment}/{region.name}/db-service",
            description=f"database role {SERVICE_USERNAME}: JSON username, password (filled by the migrate task)",
            kms_key_id=kms_key_arn, recovery_window_in_days=SECRET_RECOVERY_WINDOW_DAYS, tags=t,
            opts=self.child()).arn
        self.register_outputs({"endpoint": self.endpoint})
