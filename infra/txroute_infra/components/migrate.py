"""A region's migrate task: the one-off ECS task that provisions the region's shard databases as their owner
(create, migrate, grant the service role; `python -m app.store.provision`). `ci/github/deploy.sh` runs it in
every region before the services roll and once more after `pulumi up` (the first deploy has no cluster to
run it in before). It is the only task that can read the database's master secret (RDS's, rotated by RDS); the
regional services log in as the least-privilege service role, whose password lives in a secret of its own.

The service role's secret is created empty (components/database.py); the first migrate run fills it with a
generated password (Secrets Manager's GetRandomPassword), so nobody ever sees or types it and it never enters
Pulumi's state.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws.ecs as ecs
import pulumi_aws.iam as iam

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent, tags
from txroute_infra.components.database import SERVICE_USERNAME
from txroute_infra.topology import Region

CONTAINER = "migrate"
TASK_CPU = 256
TASK_MEMORY_MIB = 512
EXECUTION_POLICY_ARN = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"


def migrate_family(environment: str) -> str:
    return f"txroute-{environment}-migrate"


class MigrateTask(RegionalComponent):
    def __init__(self, region: Region, *, environment: str, image: pulumi.Input[str],
                 log_group_name: pulumi.Input[str], kms_key_arn: pulumi.Input[str],
                 database_endpoint: pulumi.Input[str], owner_username: str,
                 master_secret_arn: pulumi.Input[str], service_secret_arn: pulumi.Input[str],
                 provider: pulumi.ProviderResource, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:MigrateTask", region.name, provider, opts)
        t = tags(environment, region.name)
        assume = json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
        execution = iam.Role(self.name("migrate-exec"), assume_role_policy=assume, tags=t, opts=self.child())
        iam.RolePolicyAttachment(self.name("migrate-exec"), role=execution.name, policy_arn=EXECUTION_POLICY_ARN,
                                 opts=self.child())
        task = iam.Role(self.name("migrate-task"), assume_role_policy=assume, tags=t, opts=self.child())
        policy = pulumi.Output.all(kms_key_arn, master_secret_arn, service_secret_arn).apply(
            lambda a: json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": [a[1], a[2]]},
                # Fills the service role's secret on the first run (app/store/provision.py: ensure_secret_value).
                {"Effect": "Allow", "Action": "secretsmanager:PutSecretValue", "Resource": a[2]},
                {"Effect": "Allow", "Action": "secretsmanager:GetRandomPassword", "Resource": "*"},
                {"Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": a[0],
                 "Condition": {"StringEquals": {"kms:ViaService": f"secretsmanager.{self.region}.amazonaws.com"}}},
            ]}))
        iam.RolePolicy(self.name("migrate-task-secrets"), role=task.id, policy=policy, opts=self.child())
        container: dict[str, Any] = {
            "name": CONTAINER,
            "image": image,
            "essential": True,
            "command": ["python", "-m", "app.store.provision"],
            "environment": [{"name": k, "value": v} for k, v in sorted({
                "TXROUTE_REGION": region.name,
                "TXROUTE_DATABASE_URL": pulumi.Output.concat(
                    "postgresql://", owner_username, "@", database_endpoint, ":", str(layout.POSTGRES_PORT)),
                "TXROUTE_DATABASE_SECRET_ID": master_secret_arn,
                "TXROUTE_DATABASE_SSLMODE": "verify-full",
                "TXROUTE_SERVICE_DATABASE_USER": SERVICE_USERNAME,
                "TXROUTE_SERVICE_DATABASE_SECRET_ID": service_secret_arn,
            }.items())],
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": log_group_name, "awslogs-region": self.region, "awslogs-stream-prefix": CONTAINER}},
        }
        self.task_definition = ecs.TaskDefinition(
            self.name("migrate"), family=migrate_family(environment), cpu=str(TASK_CPU),
            memory=str(TASK_MEMORY_MIB), network_mode="awsvpc", requires_compatibilities=["FARGATE"],
            runtime_platform={"operating_system_family": "LINUX", "cpu_architecture": "ARM64"},
            execution_role_arn=execution.arn, task_role_arn=task.arn,
            container_definitions=pulumi.Output.json_dumps([container]), tags=t, opts=self.child())
        self.register_outputs({"family": self.task_definition.family})
