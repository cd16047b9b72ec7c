"""Pure facts every component agrees on: ports, subnet plan, runbook paths, naming. No Pulumi here.

The subnet plan is a pure function of a region's `vpc_cidr`, so a cell can allow its peers' application
subnets in its security groups without waiting for their outputs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

AZ_COUNT = 3
HTTPS_PORT = 443
# The port every container listens on (granian), the regional API's internal listener and PostgreSQL.
CONTAINER_PORT = 8000
# The internal load balancers listen HTTPS on 443 (routers and saga relays verify their certificate).
INTERNAL_API_PORT = HTTPS_PORT
POSTGRES_PORT = 5432

# What the load balancers and ECS probe: liveness (`/healthz`: the process answers), never readiness
# (`/readyz`: every shard reachable). ECS replaces a task that fails either probe, so probing readiness would
# turn a database failover into the loss of every region task at once. Readiness stays for operators
# (`txroute ops status`); a region whose database is failing over answers 503 with Retry-After (DESIGN D7).
HEALTH_PATH = "/healthz"
READINESS_PATH = "/readyz"
HEALTH_INTERVAL_S = 10
HEALTH_TIMEOUT_S = 5
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 5
# A Multi-AZ DB cluster fails over in typically under 35 s (Amazon RDS User Guide, "Failover process for
# Multi-AZ DB clusters"). Every probe that can take a task out of service tolerates failures for longer than
# that (interval x unhealthy threshold = 50 s), so even a task stalled by the failover is not replaced for it.
# The policy pack holds both rules (infra/policy: health-checks-are-liveness).
DB_FAILOVER_S = 35
assert HEALTH_INTERVAL_S * UNHEALTHY_THRESHOLD > DB_FAILOVER_S
# Global Accelerator ignores its own health-check settings for load balancer endpoints and follows the
# load balancer's target health instead ("Health check options" in the Global Accelerator Developer Guide),
# so endpoint groups set none; the target groups above are the one place health is defined.
# Time ECS gives a new task before load balancer health checks count (migrations run at start).
HEALTH_GRACE_PERIOD_S = 60
# How long a draining target keeps in-flight requests (a transfer's fast path waits at most a few seconds).
DEREGISTRATION_DELAY_S = 30
ALB_IDLE_TIMEOUT_S = 60
# TLS 1.2 and 1.3 only, forward-secret ciphers.
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"

# Runbooks the alarms point at (paths relative to the repository root).
RUNBOOK_REGION_UNAVAILABLE = "runbooks/region-unavailable.md"
RUNBOOK_LATENCY_OR_ERRORS = "runbooks/high-latency-or-errors.md"
RUNBOOK_DATABASE_FAILOVER = "runbooks/database-failover.md"
RUNBOOK_DATABASE_CAPACITY = "runbooks/database-capacity.md"
RUNBOOK_SAGA_BACKLOG = "runbooks/saga-backlog.md"
RUNBOOK_RECONCILIATION_MISMATCH = "runbooks/reconciliation-mismatch.md"
RUNBOOK_IDEMPOTENCY_CONFLICTS = "runbooks/idempotency-conflict-spike.md"
RUNBOOK_TENANT_THROTTLED = "runbooks/tenant-throttled.md"
RUNBOOK_MOVE_SLOTS = "runbooks/move-slots.md"
RUNBOOK_WEBHOOK_FAILURES = "runbooks/webhook-failures.md"
RUNBOOKS = (
    RUNBOOK_REGION_UNAVAILABLE, RUNBOOK_LATENCY_OR_ERRORS, RUNBOOK_DATABASE_FAILOVER,
    RUNBOOK_DATABASE_CAPACITY, RUNBOOK_SAGA_BACKLOG, RUNBOOK_RECONCILIATION_MISMATCH,
    RUNBOOK_IDEMPOTENCY_CONFLICTS, RUNBOOK_TENANT_THROTTLED, RUNBOOK_MOVE_SLOTS, RUNBOOK_WEBHOOK_FAILURES,
)

# The custom metrics each region service publishes, per region (dimension `Region`), as CloudWatch embedded
# metric format lines in its log (app/telemetry.py: emf_line, every EMF_INTERVAL_S): the age of the oldest
# undelivered outbox message; 1 when the last recorded `txroute audit` was clean (0 when not); the longest time
# an unfinished slot move has spent in its phase; and, over the
# interval, public writes and those answered 409/422 for a reused or in-flight Idempotency-Key, and requests
# refused 429 rate_limited: by a region for a client's share of a shard's posting queue, and by the region's
# routers (which publish only this one) for a client's rate; and webhook endpoints disabled.
OUTBOX_METRIC_NAMESPACE = "txroute"
OUTBOX_METRIC_NAME = "OutboxOldestAgeSeconds"
AUDIT_CLEAN_METRIC_NAME = "LastAuditClean"
IDEMPOTENCY_CONFLICTS_METRIC_NAME = "IdempotencyConflicts"
WRITES_METRIC_NAME = "Writes"
RATE_LIMITED_METRIC_NAME = "RateLimited"
# The longest any unfinished slot move leaving the region's shards has been in its current phase (0 when none).
SLOT_MOVE_PHASE_AGE_METRIC_NAME = "SlotMoveOldestPhaseAgeSeconds"
# A move in one phase longer than this is stuck (a freeze is seconds, a copy of millions of rows minutes).
SLOT_MOVE_PHASE_AGE_S_MAX = 1800
# Webhook endpoints the region's delivery worker disabled over the interval (a 410, or the retry schedule over).
WEBHOOK_DISABLED_METRIC_NAME = "WebhookEndpointsDisabled"
# Requests per minute a region's routers and services may refuse 429 before someone looks (runbook).
RATE_LIMITED_PER_MIN_MAX = 60
# Above this share of writes refused for their Idempotency-Key a client (or our retries) misbehaves.
IDEMPOTENCY_CONFLICT_RATIO_MAX = 0.05

# The two deployables share one image (one Python package); each runs its own ASGI factory.
REGION_FACTORY = "app.region.app:app_from_env"
ROUTER_FACTORY = "app.router.app:app_from_env"


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    """Three tiers, one subnet per tier per availability zone, carved from the VPC CIDR in sixteenths.

    public: load balancers and NAT gateways; app: Fargate tasks; data: the database. Sixteenths leave seven
    unused blocks for later tiers (a /16 gives /20 subnets, a /20 gives /24).
    """

    public: tuple[str, ...]
    app: tuple[str, ...]
    data: tuple[str, ...]


def subnet_plan(vpc_cidr: str) -> SubnetPlan:
    net = ipaddress.IPv4Network(vpc_cidr)
    blocks = [str(b) for b in net.subnets(prefixlen_diff=4)]
    return SubnetPlan(
        public=tuple(blocks[0:AZ_COUNT]),
        app=tuple(blocks[4 : 4 + AZ_COUNT]),
        data=tuple(blocks[8 : 8 + AZ_COUNT]),
    )


def alarm_description(summary: str, runbook: str) -> str:
    """Every alarm's description ends with its runbook, in one format the tests and the policy pack read."""
    assert runbook in RUNBOOKS, runbook
    return f"{summary} Runbook: {runbook}"

def internal_api_name(region: str, api_domain: str) -> str:
    """The DNS name of a region's internal API (its internal load balancer): `<region>.internal.<apiDomain>`,
    covered by the wildcard certificate `internal_certificate_domain(api_domain)`."""
    return f"{region}.{internal_certificate_domain(api_domain).removeprefix('*.')}"


def internal_certificate_domain(api_domain: str) -> str:
    """One public ACM certificate name for every region's internal API: one DNS validation record serves
    every region (ACM gives the same record for the same name in every region of an account)."""
    return f"*.internal.{api_domain}"


# The only content types an ELB fixed-response action accepts (Elastic Load Balancing API Reference,
# "FixedResponseActionConfig": ContentType).
FIXED_RESPONSE_CONTENT_TYPES = frozenset(
    {"text/plain", "text/css", "text/html", "application/javascript", "application/json"})
# Paths the public load balancer answers 404 itself: metrics and internal routes never leave the VPC.
PRIVATE_PATHS = ("/metrics", "/metrics/*", "/internal/*")
