"""Adding a region (issue 11, item 4), as a user does it with the command line: a fourth region file whose
shards own no slots yet starts with the local stack, takes no new accounts, and shows no drift; giving it slots
in its file makes `txroute slots plan` print the move that would give them to it."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import httpx

from app.topology.loader import DEFAULT_REGIONS_DIR
from tests.e2e.test_stack_cli import _env, _recorded_ports, _txroute

NEW_REGION = """\
name = "ap-southeast-2"
vpc_cidr = "10.40.0.0/16"

[capacity]
db_instance_class = "db.r6gd.large"
db_allocated_storage_gb = 400
db_max_connections = 400
region_service_tasks = 2
router_tasks = 2
task_cpu = 1024
task_memory_mib = 2048

[[shards]]
name = "apse2-a"
slots = []
"""


def test_a_region_with_no_slots_starts_takes_no_accounts_and_the_plan_moves_slots_its_file_gives_it(tmp_path: Path):
    tmp_path.chmod(0o755)
    regions = tmp_path / "regions"
    shutil.copytree(DEFAULT_REGIONS_DIR, regions)
    (regions / "ap-southeast-2.toml").write_text(NEW_REGION)
    state = tmp_path / "state"
    env = _env(state)
    up = _txroute(env, "up", "--detach", "--ports", "auto", "--regions-dir", str(regions))
    try:
        assert up.returncode == 0, f"expected the stack with an empty region to start: {up.stdout}\n{up.stderr}"
        rows = json.loads(_txroute(env, "status", "--json").stdout)
        new = next(row for row in rows if row.get("region") == "ap-southeast-2")
        assert new["ready"], f"expected the new region's service ready: {new}"
        assert new["shards"] == [{"shard": "apse2-a", "database": "shard_apse2_a", "slots": [], "recorded": []}]
        status = _txroute(env, "status").stdout
        assert "no drift" in status, f"expected `status` to show no drift: {status}"
        plan = _txroute(env, "slots", "plan")
        assert plan.returncode == 0 and "no drift" in plan.stdout, plan.stdout + plan.stderr

        token = _txroute(env, "token", "--client", "add-region").stdout.strip()
        router = f"http://127.0.0.1:{_recorded_ports(state)['router']}"
        with httpx.Client(base_url=router, timeout=30, headers={"authorization": f"Bearer {token}"}) as http:
            named = http.post("/v1/accounts", json={"currency": "EUR", "region": "ap-southeast-2"},
                              headers={"idempotency-key": uuid.uuid4().hex})
            assert named.status_code == 400 and "owns no slots" in named.json()["detail"], named.text
            for _ in range(12):  # default placements never choose a region that owns no slots
                opened = http.post("/v1/accounts", json={"currency": "EUR"},
                                   headers={"idempotency-key": uuid.uuid4().hex})
                assert opened.status_code == 201 and opened.json()["region"] != "ap-southeast-2", opened.text

        # The files now give the new region part of us-east-1's second shard: the plan names that move.
        use1 = regions / "us-east-1.toml"
        use1.write_text(use1.read_text().replace('slots = ["3414-4095"]', 'slots = ["3500-4095"]'))
        (regions / "ap-southeast-2.toml").write_text(NEW_REGION.replace("slots = []", 'slots = ["3414-3499"]'))
        plan = _txroute(env, "slots", "plan")
        assert plan.returncode == 0, plan.stderr
        assert "txroute slots move 3414-3499 --to apse2-a" in plan.stdout and "from use1-b" in plan.stdout, (
            f"expected the plan to move 3414-3499 from use1-b to apse2-a: {plan.stdout}")
        drift = json.loads(_txroute(env, "slots", "plan", "--json").stdout)
        assert drift["moves"] == [{"slots": "3414-3499", "from": "use1-b", "to": "apse2-a",
                                   "command": "txroute slots move 3414-3499 --to apse2-a"}], drift
        assert "txroute slots move 3414-3499 --to apse2-a" in _txroute(env, "status").stdout
    finally:
        purge = _txroute(env, "down", "--purge")
        assert purge.returncode == 0, purge.stderr
