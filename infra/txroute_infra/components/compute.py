"""A region's compute: its ECR repository, an ECS cluster, and two Fargate services built from the same
image: the regional service (behind an internal, HTTPS-only load balancer, reached by routers and saga relays
of every region over the peering mesh) and the router (behind a public, HTTPS-only load balancer that Global
Accelerator sends clients to).

Internal TLS: the internal load balancer serves a public ACM certificate for `*.internal.<apiDomain>`
(free, DNS-validated) under the name `<region>.internal.<apiDomain>`; routers and relays call
`https://<region>.internal.<apiDomain>` and verify it with the system trust store (no
TXROUTE_INTERNAL_CA_FILE). The load balancer forwards to its tasks in plain HTTP inside the region's app
subnets (the tasks' group admits only the load balancer's); infra/README.md says why.

Each service has its own execution role (pull the image, write its logs, inject its own secrets) and its own
task role (read its own secrets, nothing else). Health checks everywhere probe liveness (`layout.HEALTH_PATH`),
never readiness: see `layout` for why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_aws.acm as acm
import pulumi_aws.ecr as ecr
import pulumi_aws.ecs as ecs
import pulumi_aws.iam as iam
import pulumi_aws.lb as lb
import pulumi_aws.secretsmanager as secretsmanager

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent, tags
from txroute_infra.topology import Region

ECR_REPOSITORY = "txroute"
# Untagged layers older than this are expired; tagged releases are kept (rollbacks need them).
ECR_UNTAGGED_EXPIRY_DAYS = 14
# Container health check (the image has Python, not curl).
CONTAINER_HEALTH_CMD = [
    "CMD", "python", "-c",
    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{layout.CONTAINER_PORT}"
    f"{layout.HEALTH_PATH}', timeout={layout.HEALTH_TIMEOUT_S - 1})",
]
# Days a deleted secret can still be restored (the maximum).
SECRET_RECOVERY_WINDOW_DAYS = 30
# The JSON keys of each service's secret (what an operator puts; infra/README.md) and the variable each one
# is injected as. The router's holds no saga key: tests/infra proves it.
REGION_SECRET_KEYS = {
    "hop_public_key": "PEM(s) verifying the routers' hop tokens",
    "saga_public_key": "PEM(s) verifying other regions' saga tokens",
    "saga_private_key": "PEM signing this region's saga calls",
    # The same value as the router secret's (public keys only): a region verifies the client token the router
    # forwards, so a router's hop key alone can act as no client.
    "client_issuers": 'JSON {iss: {"keys": {kid: PEM}, "client_prefix": str}}, as the router secret\'s',
}
REGION_SECRET_ENV = {"hop_public_key": "TXROUTE_HOP_PUBLIC_KEY", "saga_public_key": "TXROUTE_SAGA_PUBLIC_KEY",
                     "saga_private_key": "TXROUTE_SAGA_PRIVATE_KEY", "client_issuers": "TXROUTE_CLIENT_ISSUERS"}
ROUTER_SECRET_KEYS = {
    "client_issuers": 'JSON {iss: {"keys": {kid: PEM}, "client_prefix": str}}',
    "hop_private_key": "PEM signing hop tokens",
}
ROUTER_SECRET_ENV = {"client_issuers": "TXROUTE_CLIENT_ISSUERS", "hop_private_key": "TXROUTE_HOP_PRIVATE_KEY"}
EXECUTION_POLICY_ARN = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"


def ecr_repository_name(environment: str) -> str:
    return f"{ECR_REPOSITORY}-{environment}"


class Compute(RegionalComponent):
    """Built in two steps: the constructor makes everything a region needs by itself; `add_router` runs
    once every region's internal endpoint is known (the router forwards to all of them)."""

    def __init__(self, region: Region, *, environment: str, image_tag: str, api_domain: str,
                 vpc_id: pulumi.Input[str], public_subnet_ids: Sequence[pulumi.Input[str]],
                 app_subnet_ids: Sequence[pulumi.Input[str]], public_lb_sg: pulumi.Input[str],
                 internal_lb_sg: pulumi.Input[str], router_sg: pulumi.Input[str], region_sg: pulumi.Input[str],
                 kms_key_arn: pulumi.Input[str], log_groups: Mapping[str, pulumi.Input[str]],
                 database_endpoint: pulumi.Input[str], database_secret_arn: pulumi.Input[str],
                 database_username: str, provider: pulumi.ProviderResource,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:Compute", region.name, provider, opts)
        self.spec = region
        self.environment = environment
        self._tags = tags(environment, region.name)
        self._kms_key_arn = kms_key_arn
        self._vpc_id = vpc_id
        self._public_subnet_ids = list(public_subnet_ids)
        self._app_subnet_ids = list(app_subnet_ids)
        self._public_lb_sg = public_lb_sg
        self._router_sg = router_sg
        self._region_sg = region_sg
        self._log_groups = log_groups

        self.repository = ecr.Repository(
            self.name("ecr"), name=ecr_repository_name(environment), image_tag_mutability="IMMUTABLE",
            image_scanning_configuration={"scan_on_push": True},
            encryption_configurations=[{"encryption_type": "KMS", "kms_key": kms_key_arn}],
            force_delete=False, tags=self._tags, opts=self.child())
        ecr.LifecyclePolicy(self.name("ecr-lifecycle"), repository=self.repository.name, policy=json.dumps({
            "rules": [{"rulePriority": 1, "description": "expire untagged layers",
                       "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed",
                                     "countUnit": "days", "countNumber": ECR_UNTAGGED_EXPIRY_DAYS},
                       "action": {"type": "expire"}}]}), opts=self.child())
        self.image = pulumi.Output.concat(self.repository.repository_url, ":", image_tag)
        self.cluster = ecs.Cluster(self.name("ecs"), name=f"txroute-{environment}",
                                   settings=[{"name": "containerInsights", "value": "enabled"}],
                                   tags=self._tags, opts=self.child())

        # Secrets the services read; their values are put by an operator (infra/README.md), never by code.
        # One trust domain each (DESIGN D8): the saga key pair is in the region secret only, so no router
        # (the internet-facing task) can ever sign a saga call.
        self.region_secret = self._secret("region-secret", f"txroute/{environment}/region-service",
                                          " ".join(f"{k}: {why};" for k, why in REGION_SECRET_KEYS.items()))
        self.router_secret = self._secret("router-secret", f"txroute/{environment}/router",
                                          " ".join(f"{k}: {why};" for k, why in ROUTER_SECRET_KEYS.items()))

        # Regional service behind the internal load balancer.
        self.internal_lb = lb.LoadBalancer(
            self.name("internal"), internal=True, load_balancer_type="application",
            subnets=self._app_subnet_ids, security_groups=[internal_lb_sg], drop_invalid_header_fields=True,
            enable_deletion_protection=True, idle_timeout=layout.ALB_IDLE_TIMEOUT_S, tags=self._tags,
            opts=self.child())
        self.region_tg = self._target_group("reg-tg", "HTTP")
        # Issued once its DNS validation record exists (the program creates it in the stack's zone); the
        # validation and the HTTPS listener wait for that record (`add_router`).
        self.internal_certificate = acm.Certificate(
            self.name("internal-cert"), domain_name=layout.internal_certificate_domain(api_domain),
            validation_method="DNS", key_algorithm="EC_prime256v1", tags=self._tags, opts=self.child())
        self._database = (database_secret_arn, database_username, database_endpoint)
        self.internal_name = layout.internal_api_name(region.name, api_domain)
        self.internal_url = pulumi.Output.from_input(f"https://{self.internal_name}")

        # The router's certificate; validated once DNS is ready (`add_router`).
        self.certificate = acm.Certificate(self.name("cert"), domain_name=api_domain, validation_method="DNS",
                                           key_algorithm="EC_prime256v1", tags=self._tags, opts=self.child())

    def add_router(self, *, region_urls: pulumi.Input[Mapping[str, str]],
                   validation_record_fqdns: Sequence[pulumi.Input[str]],
                   internal_validation_record_fqdns: Sequence[pulumi.Input[str]]) -> None:
        """The services that need every region's internal URL: the regional service (its saga relay calls
        the other regions) and the router; and the listeners whose certificates wait for DNS records the
        program creates after this component."""
        internal_validation = acm.CertificateValidation(
            self.name("internal-cert-validation"), certificate_arn=self.internal_certificate.arn,
            validation_record_fqdns=list(internal_validation_record_fqdns), opts=self.child())
        self.internal_listener = lb.Listener(
            self.name("internal-api"), load_balancer_arn=self.internal_lb.arn, port=layout.INTERNAL_API_PORT,
            protocol="HTTPS", ssl_policy=layout.TLS_POLICY, certificate_arn=internal_validation.certificate_arn,
            default_actions=[{"type": "forward", "target_group_arn": self.region_tg.arn}],
            tags=self._tags, opts=self.child())
        database_secret_arn, database_username, database_endpoint = self._database
        self.region_service = self._service(
            "region-service", layout.REGION_FACTORY, self.spec.capacity.region_service_tasks, self._region_sg,
            self.region_tg, self.internal_listener,
            env={"TXROUTE_REGION": self.spec.name,
                 "TXROUTE_REGION_URLS": pulumi.Output.json_dumps(region_urls),
                 # The least-privilege service role; its password is read from its secret at run time (and
                 # again after a refused login: a rotation needs no restart), TLS verified (RDS CA bundle).
                 "TXROUTE_DATABASE_URL": pulumi.Output.concat(
                     "postgresql://", database_username, "@", database_endpoint, ":",
                     str(layout.POSTGRES_PORT)),
                 "TXROUTE_DATABASE_SECRET_ID": database_secret_arn,
                 "TXROUTE_DATABASE_SSLMODE": "verify-full"},
            secrets={
                **{env_name: pulumi.Output.concat(self.region_secret, f":{key}::")
                   for key, env_name in REGION_SECRET_ENV.items()},
            },
            readable_secret_arns=[database_secret_arn, self.region_secret])
        validation = acm.CertificateValidation(
            self.name("cert-validation"), certificate_arn=self.certificate.arn,
            validation_record_fqdns=list(validation_record_fqdns), opts=self.child())
        self.public_lb = lb.LoadBalancer(
            self.name("public"), internal=False, load_balancer_type="application",
            subnets=self._public_subnet_ids, security_groups=[self._public_lb_sg],
            drop_invalid_header_fields=True, enable_deletion_protection=True,
            idle_timeout=layout.ALB_IDLE_TIMEOUT_S, tags=self._tags, opts=self.child())
        self.router_tg = self._target_group("rtr-tg", "HTTP")
        # HTTPS only: there is no port-80 listener to redirect from, so nothing ever speaks plain HTTP.
        self.public_listener = lb.Listener(
            self.name("public-https"), load_balancer_arn=self.public_lb.arn, port=layout.HTTPS_PORT,
            protocol="HTTPS", ssl_policy=layout.TLS_POLICY, certificate_arn=validation.certificate_arn,
            default_actions=[{"type": "forward", "target_group_arn": self.router_tg.arn}],
            tags=self._tags, opts=self.child())
        # Metrics and internal routes are for the VPC (Prometheus scrapes tasks directly), never the internet.
        # The body is problem+json, but ELB fixed responses accept only a few content types
        # (`layout.FIXED_RESPONSE_CONTENT_TYPES`), so it is labelled application/json.
        lb.ListenerRule(
            self.name("public-private-paths"), listener_arn=self.public_listener.arn, priority=1,
            conditions=[{"path_pattern": {"values": list(layout.PRIVATE_PATHS)}}],
            actions=[{"type": "fixed-response", "fixed_response": {
                "content_type": "application/json", "status_code": "404",
                "message_body": '{"type":"https://docs.txroute.dev/problems/not_found","title":"No such route",'
                                '"status":404,"detail":"No such route","code":"not_found"}'}}],
            tags=self._tags, opts=self.child())
        self.router_service = self._service(
            "router", layout.ROUTER_FACTORY, self.spec.capacity.router_tasks, self._router_sg,
            self.router_tg, self.public_listener,
            env={"TXROUTE_REGION": self.spec.name,
                 "TXROUTE_REGION_URLS": pulumi.Output.json_dumps(region_urls)},
            secrets={
                **{env_name: pulumi.Output.concat(self.router_secret, f":{key}::")
                   for key, env_name in ROUTER_SECRET_ENV.items()},
            },
            readable_secret_arns=[self.router_secret])

    # --- pieces -------------------------------------------------------------------------------------

    def _secret(self, key: str, name: str, description: str) -> pulumi.Output[str]:
        secret = secretsmanager.Secret(
            self.name(key), name=name, description=description, kms_key_id=self._kms_key_arn,
            recovery_window_in_days=SECRET_RECOVERY_WINDOW_DAYS, tags=self._tags, opts=self.child())
        return secret.arn

    def _target_group(self, key: str, protocol: str) -> lb.TargetGroup:
        return lb.TargetGroup(
            self.name(key), port=layout.CONTAINER_PORT, protocol=protocol, target_type="ip",
            vpc_id=self._vpc_id, deregistration_delay=layout.DEREGISTRATION_DELAY_S,
            health_check={"enabled": True, "path": layout.HEALTH_PATH, "protocol": "HTTP", "matcher": "200",
                          "interval": layout.HEALTH_INTERVAL_S, "timeout": layout.HEALTH_TIMEOUT_S,
                          "healthy_threshold": layout.HEALTHY_THRESHOLD,
                          "unhealthy_threshold": layout.UNHEALTHY_THRESHOLD},
            tags=self._tags, opts=self.child())

    def _roles(self, service: str, secret_arns: Sequence[pulumi.Input[str]]) -> tuple[iam.Role, iam.Role]:
        assume = json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
        read_own = pulumi.Output.all(self._kms_key_arn, *secret_arns).apply(lambda a: json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": list(a[1:])},
                {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": a[0],
                 "Condition": {"StringEquals": {"kms:ViaService": f"secretsmanager.{self.region}.amazonaws.com"}}},
            ]}))
        execution = iam.Role(self.name(f"{service}-exec"), assume_role_policy=assume, tags=self._tags,
                             opts=self.child())
        iam.RolePolicyAttachment(self.name(f"{service}-exec"), role=execution.name,
                                 policy_arn=EXECUTION_POLICY_ARN, opts=self.child())
        iam.RolePolicy(self.name(f"{service}-exec-secrets"), role=execution.id, policy=read_own,
                       opts=self.child())
        task = iam.Role(self.name(f"{service}-task"), assume_role_policy=assume, tags=self._tags,
                        opts=self.child())
        iam.RolePolicy(self.name(f"{service}-task-secrets"), role=task.id, policy=read_own, opts=self.child())
        return execution, task

    def _service(self, service: str, factory: str, desired_count: int, security_group: pulumi.Input[str],
                 target_group: lb.TargetGroup, listener: lb.Listener, *,
                 env: Mapping[str, pulumi.Input[str]], secrets: Mapping[str, pulumi.Input[str]],
                 readable_secret_arns: Sequence[pulumi.Input[str]]) -> ecs.Service:
        execution, task = self._roles(service, readable_secret_arns)
        capacity = self.spec.capacity
        container: dict[str, Any] = {
            "name": service,
            "image": self.image,
            "essential": True,
            "command": ["python", "-m", "granian", "--interface", "asgi", "--factory", "--host", "0.0.0.0",  # noqa: S104
                        "--port", str(layout.CONTAINER_PORT), "--workers", "1", "--loop", "uvloop", factory],
            "portMappings": [{"containerPort": layout.CONTAINER_PORT, "protocol": "tcp"}],
            "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "secrets": [{"name": k, "valueFrom": v} for k, v in sorted(secrets.items())],
            "healthCheck": {"command": CONTAINER_HEALTH_CMD, "interval": layout.HEALTH_INTERVAL_S,
                            "timeout": layout.HEALTH_TIMEOUT_S, "retries": layout.UNHEALTHY_THRESHOLD,
                            "startPeriod": layout.HEALTH_GRACE_PERIOD_S},
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": self._log_groups[service], "awslogs-region": self.region,
                "awslogs-stream-prefix": service}},
        }
        definition = ecs.TaskDefinition(
            self.name(service), family=f"txroute-{self.environment}-{service}", cpu=str(capacity.task_cpu),
            memory=str(capacity.task_memory_mib), network_mode="awsvpc", requires_compatibilities=["FARGATE"],
            runtime_platform={"operating_system_family": "LINUX", "cpu_architecture": "ARM64"},
            execution_role_arn=execution.arn, task_role_arn=task.arn,
            container_definitions=pulumi.Output.json_dumps([container]), tags=self._tags, opts=self.child())
        return ecs.Service(
            self.name(service), name=service, cluster=self.cluster.arn, task_definition=definition.arn,
            desired_count=desired_count, launch_type="FARGATE", platform_version="LATEST",
            network_configuration={"subnets": self._app_subnet_ids, "security_groups": [security_group],
                                   "assign_public_ip": False},
            load_balancers=[{"target_group_arn": target_group.arn, "container_name": service,
                             "container_port": layout.CONTAINER_PORT}],
            health_check_grace_period_seconds=layout.HEALTH_GRACE_PERIOD_S,
            deployment_circuit_breaker={"enable": True, "rollback": True},
            deployment_minimum_healthy_percent=100, deployment_maximum_percent=200,
            propagate_tags="SERVICE", enable_execute_command=False, wait_for_steady_state=False,
            tags=self._tags, opts=self.child(depends_on=[listener]))
