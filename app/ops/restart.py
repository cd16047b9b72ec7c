"""`txroute ops restart <service>`: start a local-stack service or database again.

    region-<name>     the region's service process (stopped first if it still runs)
    router            the local router
    postgres-<name>   the region's PostgreSQL cluster, when it is stopped

In AWS, ECS replaces failed tasks by itself and RDS fails over by itself; against a deployed stack this
command prints the AWS commands that do the same by hand and changes nothing.
"""

from __future__ import annotations

from app.local import stack as local_stack
from app.ops.target import OpsError, Target, confirm


def restart(target: Target, service: str, *, yes: bool) -> bool:
    if target.stack is None:
        _print_aws(service)
        return True
    stack = target.stack
    if service.startswith("postgres-"):
        region = service.removeprefix("postgres-")
        cluster = stack.clusters.get(region)
        if cluster is None:
            raise OpsError(f"no region {region!r}; known: {sorted(stack.clusters)}")
        if cluster.is_running():
            print(f"{service} is already running; nothing to do")
            return True
        if not confirm([f"start the PostgreSQL cluster of {region} (port {cluster.port}); the region's service "
                        "reconnects by itself"], yes):
            return True
        cluster.start()
        print(f"started {service}")
        return True
    names = {s.name for s in stack.services}
    if service not in names:
        raise OpsError(f"no service {service!r}; known: {sorted(names)} and postgres-<region>")
    if not confirm([f"stop {service} if it runs, start it again with the stack's current settings and keys, "
                    "and wait until it is ready (its requests get 503 + Retry-After meanwhile)"], yes):
        return True
    local_stack.restart_services(stack, [service])
    print(f"restarted {service}: ready")
    return True


def _print_aws(service: str) -> None:
    print("a deployed stack: ECS and RDS recover on their own; to force it by hand (prints, changes nothing):")
    if service.startswith("postgres-"):
        region = service.removeprefix("postgres-")
        print(f"  aws rds failover-db-cluster --region {region} --db-cluster-identifier txroute-<env>-{region}")
    elif service == "router":
        print("  aws ecs update-service --region <region> --cluster txroute-<env> --service router "
              "--force-new-deployment")
    else:
        region = service.removeprefix("region-")
        print(f"  aws ecs update-service --region {region} --cluster txroute-<env> --service region-service "
              "--force-new-deployment")
