"""Game days: for each runbook, its fault injected into a local stack started as a user starts it, the
runbook's own marked commands run as written (runbooks/README.md: game days), and recovery checked: the
alert's signal was there, traffic is served again and `txroute ops audit` is clean (except where the
runbook says to escalate, and then it names what is wrong)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import httpx

from app.security.keys import load_private_key
from app.security.scopes import PUBLIC_SCOPES
from app.security.tls import client_context
from app.security.tokens import CLIENT_TOKEN_HEADER, BoundRequest, HopTokenMinter
from app.topology.ids import parse_account_id
from app.topology.loader import load_topology
from tests.runbooks import gameday
from tests.runbooks.conftest import GameDayStack, new_key, open_account, poll, transfer

INCIDENT_RUNBOOKS = [
    "region-unavailable.md", "saga-backlog.md", "database-failover.md", "high-latency-or-errors.md",
    "reconciliation-mismatch.md", "idempotency-conflict-spike.md", "move-slots.md",
]
PROCEDURE_RUNBOOKS = ["key-rotation.md", "deploy-and-rollback.md"]
TOPOLOGY = load_topology()


def shard_of(account: str) -> str:
    return TOPOLOGY.shard_for_slot(parse_account_id(account).slot).name


def region_url(stack: GameDayStack, region: str) -> str:
    return next(s.url for s in stack.plan().services if s.name == f"region-{region}")


def state_of(http: httpx.Client, transfer_id: str) -> str:
    answer = http.get(f"/v1/transfers/{transfer_id}")
    return str(answer.json().get("state")) if answer.status_code == 200 else f"http {answer.status_code}"


def sql(dsn: str, statement: str, *args: object) -> str:
    async def go() -> str:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return str(await conn.execute(statement, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def test_every_runbook_has_its_parts_and_game_day_blocks_and_the_index_lists_it() -> None:
    index = (gameday.RUNBOOKS / "README.md").read_text()
    for runbook in INCIDENT_RUNBOOKS + PROCEDURE_RUNBOOKS:
        text = (gameday.RUNBOOKS / runbook).read_text()
        assert f"]({runbook})" in index, f"expected runbooks/README.md to link {runbook}"
        assert gameday.blocks(runbook), f"expected {runbook} to mark the commands a game day runs"
        if runbook in INCIDENT_RUNBOOKS:
            for part in ("## Symptoms and alert", "## Impact on clients", "## Confirm", "## Mitigate",
                         "## Verify recovery", "## Escalate"):
                assert part in text, f"expected {runbook} to have a section {part!r}"


def test_region_unavailable_the_runbook_restarts_the_region_and_delivers_what_waited(stack: GameDayStack) -> None:
    region = "us-east-1"
    with stack.client("gd-region") as http:
        payer = open_account(http, "eu-west-1", deposit=1_000)
        payee = open_account(http, region, deposit=10)
        stack.kill(f"region-{region}")
        refused = http.post("/v1/deposits", json={"account": payee, "amount": 5, "currency": "EUR"},
                            headers={"idempotency-key": new_key()})
        assert refused.status_code == 503 and refused.json()["code"] == "region_unavailable", refused.text
        assert refused.headers.get("retry-after"), "expected Retry-After on region_unavailable"
        waiting = transfer(http, payer, payee, 300)
        assert waiting.status_code == 202, f"expected the transfer to wait for its destination: {waiting.text}"
        assert stack.metric(stack.router_url, "txroute_http_problems_total", code="region_unavailable") > 0, \
            "expected the router's region_unavailable count (TxrouteRegionUnavailable) to rise"

        results = gameday.run_blocks("region-unavailable.md", stack.state, {"region": region})

        assert "OK: no violation" in results[-1].stdout, str(results[-1])
        served = http.post("/v1/deposits", json={"account": payee, "amount": 5, "currency": "EUR"},
                           headers={"idempotency-key": new_key()})
        assert served.status_code == 201, f"expected the region to take writes again: {served.text}"
        transfer_id = waiting.json()["id"]
        assert poll(lambda: state_of(http, transfer_id) == "posted"), \
            f"expected the waiting transfer posted, it is {state_of(http, transfer_id)}"
        assert http.get(f"/v1/accounts/{payee}").json()["balance"] == 315


def test_saga_backlog_the_runbook_names_the_stuck_transfers_and_they_post(stack: GameDayStack) -> None:
    destination = "eu-west-1"
    with stack.client("gd-saga") as http:
        payer = open_account(http, "eu-north-1", deposit=1_000)
        payee = open_account(http, destination)
        stack.kill(f"region-{destination}")
        waiting = [transfer(http, payer, payee, 100) for _ in range(3)]
        assert all(w.status_code == 202 for w in waiting), [w.text for w in waiting]
        ids = [w.json()["id"] for w in waiting]
        source_url = region_url(stack, "eu-north-1")
        assert stack.metric(source_url, "txroute_saga_backlog") >= 3, \
            "expected the source region's backlog gauge (TxrouteSagaBacklogOld) to count the waiting messages"

        confirm, mitigate, verify = [b for b in gameday.blocks("saga-backlog.md") if b.language == "sh"]
        values = {"region": destination, "transfer_id": ids[0]}
        looked = [gameday.run(c, stack.state) for c in confirm.commands(values)]
        assert all(r.returncode == 0 for r in looked), "\n".join(map(str, looked))
        assert all(i in looked[0].stdout for i in ids), f"expected the list to name every stuck transfer:\n{looked[0]}"
        assert "state=pending" in looked[1].stdout, f"expected inspect to show the transfer pending:\n{looked[1]}"
        for block in (mitigate, verify):
            for command in block.commands(values):
                result = gameday.run(command, stack.state)
                assert result.returncode == 0, str(result)

        assert "OK: no violation" in result.stdout, str(result)
        assert poll(lambda: all(state_of(http, i) == "posted" for i in ids)), \
            f"expected every stuck transfer posted: {[state_of(http, i) for i in ids]}"
        assert http.get(f"/v1/accounts/{payee}").json()["balance"] == 300
        assert poll(lambda: stack.metric(source_url, "txroute_saga_backlog") == 0), "expected the backlog to drain"


def test_database_failover_the_runbook_brings_the_shards_back(stack: GameDayStack) -> None:
    region = "eu-west-1"
    with stack.client("gd-db") as http:
        account = open_account(http, region, deposit=100)
        stack.stop_postgres(region)
        key = new_key()
        body = {"account": account, "amount": 7, "currency": "EUR"}
        refused = http.post("/v1/deposits", json=body, headers={"idempotency-key": key})
        assert refused.status_code == 503 and refused.json()["code"] == "shard_unavailable", refused.text
        assert stack.metric(region_url(stack, region), "txroute_http_problems_total", code="shard_unavailable") > 0, \
            "expected the region's shard_unavailable count (TxrouteShardUnavailable) to rise"

        results = gameday.run_blocks("database-failover.md", stack.state, {"region": region})

        assert "UNREACHABLE" in results[0].stdout, f"expected status to name the unreachable shards:\n{results[0]}"
        assert "OK: no violation" in results[-1].stdout, str(results[-1])
        # The client retries with the same key, as Retry-After tells it to: one deposit, once.
        assert poll(lambda: http.post("/v1/deposits", json=body, headers={"idempotency-key": key}).status_code
                    == 201), "expected the deposit to go through once the database is back"
        assert http.get(f"/v1/accounts/{account}").json()["balance"] == 107


@contextmanager
def held_lock(dsn: str) -> Iterator[dict[str, int]]:
    """A session that locks `accounts` and then sits idle in its transaction (an analyst's open psql)."""
    ready = threading.Event()
    release = threading.Event()
    info: dict[str, int] = {}

    async def hold() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            info["pid"] = conn.get_server_pid()
            await conn.execute("begin; lock table accounts in access exclusive mode")
            ready.set()
            # The lock is held until the test releases it (or the runbook ends the session).
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        finally:
            await conn.close(timeout=2)

    def main() -> None:
        try:
            asyncio.run(hold())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # terminated by the runbook: that is the point
        finally:
            ready.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10), "expected the lock to be taken"
    try:
        yield info
    finally:
        release.set()
        thread.join(10)


def test_high_latency_or_errors_the_runbook_finds_and_ends_the_blocking_session(stack: GameDayStack) -> None:
    region = "eu-west-1"
    with stack.client("gd-latency") as http:
        account = open_account(http, region, deposit=100)
        with held_lock(stack.shard_dsn(shard_of(account))) as locker:
            import time

            taken = time.monotonic()
            body = {"account": account, "amount": 3, "currency": "EUR"}
            slow = http.post("/v1/deposits", json=body, headers={"idempotency-key": new_key()})
            assert slow.status_code == 503 and slow.json()["code"] == "shard_unavailable", slow.text
            assert stack.metric(region_url(stack, region), "txroute_http_problems_total", code="shard_unavailable") > 0
            # The runbook looks for transactions open longer than 5 s.
            assert poll(lambda: time.monotonic() - taken > 5.5, timeout_s=10)

            confirm, mitigate, verify = [b for b in gameday.blocks("high-latency-or-errors.md")]
            looked = [gameday.run(c, stack.state) for c in confirm.commands({})]
            assert all(r.returncode == 0 for r in looked), "\n".join(map(str, looked))
            assert f"pid={locker['pid']}" in looked[1].stdout, f"expected the session named:\n{looked[1]}"
            ended = [gameday.run(c, stack.state) for c in mitigate.commands({})]
            assert ended[0].returncode == 0 and "terminated 1 session" in ended[0].stdout, str(ended[0])
        checked = [gameday.run(c, stack.state) for c in verify.commands({})]
        assert all(r.returncode == 0 for r in checked), "\n".join(map(str, checked))
        assert f"pid={locker['pid']}" not in checked[0].stdout, str(checked[0])
        assert "OK: no violation" in checked[-1].stdout, str(checked[-1])
        served = http.post("/v1/deposits", json=body, headers={"idempotency-key": new_key()})
        assert served.status_code == 201, f"expected writes served again: {served.text}"


def test_reconciliation_mismatch_the_runbook_names_the_account_and_the_reviewed_repair_clears_it(
    stack: GameDayStack,
) -> None:
    with stack.client("gd-audit") as http:
        account = open_account(http, "us-east-1", deposit=500)
    shard = shard_of(account)
    dsn = stack.shard_dsn(shard)
    # The fault: a balance written outside the posting functions (the journal is untouched).
    assert sql(dsn, "update accounts set balance = balance + 777 where id = $1", account) == "UPDATE 1"

    confirm, repair, verify = gameday.blocks("reconciliation-mismatch.md")
    looked = [gameday.run(c, stack.state) for c in confirm.commands({})]
    assert looked[0].returncode == 1, f"expected the audit to fail:\n{looked[0]}"
    assert account in looked[0].stdout and "balance_equals_entries" in looked[0].stdout, str(looked[0])
    assert looked[1].returncode == 0 and "violation(s)" in looked[1].stdout, \
        f"expected status to show the last audit's violations:\n{looked[1]}"
    assert stack.metric(region_url(stack, "us-east-1"), "txroute_last_audit_clean", shard=shard) == 0, \
        "expected txroute_last_audit_clean 0 (TxrouteReconciliationMismatch)"

    # The ledger owner's reviewed repair, as the runbook gives it, in the account's shard.
    assert repair.language == "sql"
    assert sql(dsn, repair.sql({"account": account})) == "UPDATE 1"
    checked = [gameday.run(c, stack.state) for c in verify.commands({})]
    assert checked[0].returncode == 0 and "OK: no violation" in checked[0].stdout, str(checked[0])
    assert stack.metric(region_url(stack, "us-east-1"), "txroute_last_audit_clean", shard=shard) == 1


def test_idempotency_conflict_spike_the_runbook_shows_what_the_keys_were_first_used_for(
    stack: GameDayStack,
) -> None:
    client = "gd-idem"
    with stack.client(client) as http:
        account = open_account(http, "eu-north-1")
        key = "order-42"  # a client that reuses one key for every deposit
        first = http.post("/v1/deposits", json={"account": account, "amount": 10, "currency": "EUR"},
                          headers={"idempotency-key": key})
        assert first.status_code == 201, first.text
        for amount in range(11, 16):
            reused = http.post("/v1/deposits", json={"account": account, "amount": amount, "currency": "EUR"},
                               headers={"idempotency-key": key})
            assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused", reused.text
        assert stack.metric(region_url(stack, "eu-north-1"), "txroute_http_problems_total",
                      code="idempotency_key_reused") >= 5

        results = gameday.run_blocks("idempotency-conflict-spike.md", stack.state, {"client": client})

        assert f"key='{key}'" in results[0].stdout and first.json()["id"] in results[0].stdout, str(results[0])
        assert "OK: no violation" in results[-1].stdout, str(results[-1])
        assert http.get(f"/v1/accounts/{account}").json()["balance"] == 10, "expected conflicts to change nothing"


def test_key_rotation_refuses_no_token_during_the_overlap_and_retires_the_old_key(stack: GameDayStack) -> None:
    old_token = stack.token("gd-keys")
    with stack.client("gd-keys", old_token) as http:
        account = open_account(http, "eu-west-1", deposit=100)
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:  # a client with a token signed by the old key, busy throughout the rotation
        with httpx.Client(base_url=stack.router_url, timeout=10,
                          headers={"authorization": f"Bearer {old_token}"}) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.get(f"/v1/accounts/{account}").status_code)
                except httpx.HTTPError:
                    statuses.append(0)  # the router restarting: no answer, not a refusal

    rotate, finish, verify = gameday.blocks("key-rotation.md")
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        results = [gameday.run(c, stack.state) for c in rotate.commands({})]
    finally:
        stop.set()
        thread.join(15)
    assert all(r.returncode == 0 for r in results), "\n".join(map(str, results))
    assert 401 not in statuses, f"expected no token refused during the rotation, got {sorted(set(statuses))}"
    assert statuses.count(200) > 0, "expected requests served during the rotation"
    new_token = stack.token("gd-keys")
    for token in (old_token, new_token):
        read = httpx.get(f"{stack.router_url}/v1/accounts/{account}", headers={"authorization": f"Bearer {token}"})
        assert read.status_code == 200, f"expected both keys accepted during the overlap: {read.text}"

    ended = [gameday.run(c, stack.state) for c in finish.commands({})]
    assert ended[0].returncode == 0, str(ended[0])
    old = httpx.get(f"{stack.router_url}/v1/accounts/{account}", headers={"authorization": f"Bearer {old_token}"})
    assert old.status_code == 401, f"expected the retired key refused: {old.text}"
    with stack.client("gd-keys", new_token) as http:
        paid = http.post("/v1/deposits", json={"account": account, "amount": 1, "currency": "EUR"},
                         headers={"idempotency-key": new_key()})
        assert paid.status_code == 201, f"expected the new key to write: {paid.text}"
    checked = gameday.run(verify.commands({})[0], stack.state)
    assert checked.returncode == 0 and "OK: no violation" in checked.stdout, str(checked)


def test_deploy_behind_a_drain_refuses_writes_for_the_region_only_and_lets_sagas_finish(
    stack: GameDayStack,
) -> None:
    region = "eu-north-1"
    deploy, verify = gameday.blocks("deploy-and-rollback.md")
    drain, restart, undrain, status = deploy.commands({"region": region})
    with stack.client("gd-deploy") as http:
        account = open_account(http, region, deposit=100)
        elsewhere = open_account(http, "us-east-1", deposit=100)

        dry = gameday.run(drain.replace(" --yes", ""), stack.state)
        assert dry.returncode == 0 and "dry run: nothing changed" in dry.stdout, str(dry)
        assert http.post("/v1/deposits", json={"account": account, "amount": 1, "currency": "EUR"},
                         headers={"idempotency-key": new_key()}).status_code == 201, "expected no drain without --yes"
        drained = gameday.run(drain, stack.state)
        assert drained.returncode == 0 and f"draining {region}" in drained.stdout, str(drained)
        refused = http.post("/v1/deposits", json={"account": account, "amount": 1, "currency": "EUR"},
                            headers={"idempotency-key": new_key()})
        assert refused.status_code == 503 and refused.json()["code"] == "region_draining", refused.text
        assert refused.headers.get("retry-after") == "30", refused.headers
        assert http.get(f"/v1/accounts/{account}").status_code == 200, "expected reads to continue"
        assert http.post("/v1/deposits", json={"account": elsewhere, "amount": 1, "currency": "EUR"},
                         headers={"idempotency-key": new_key()}).status_code == 201, "expected other regions served"
        # A saga towards the drained region still completes (internal messages are applied).
        incoming = transfer(http, elsewhere, account, 50)
        assert incoming.status_code == 201, f"expected the saga into the drained region to post: {incoming.text}"
        # A router that has not learnt the drain yet cannot write either: the region refuses by itself. The
        # router forwards the client's own token with its hop token: the region serves that client only.
        hop_key = load_private_key(str(stack.state / "keys" / "hop.private.pem"), what="hop key")
        body, key = json.dumps({"account": account, "amount": 1, "currency": "EUR"}).encode(), new_key()
        token = HopTokenMinter(hop_key).token(
            "gd-deploy", PUBLIC_SCOPES, BoundRequest("POST", "/v1/deposits", body, key))
        direct = httpx.post(region_url(stack, region) + "/v1/deposits", content=body,
                            headers={"authorization": f"Bearer {token}", "idempotency-key": key,
                                     CLIENT_TOKEN_HEADER: http.headers["authorization"],
                                     "content-type": "application/json"},
                            verify=client_context(stack.plan().tls.ca_file))  # the stack's own CA
        assert direct.status_code == 503 and direct.json()["code"] == "region_draining", direct.text

        for command in (restart, undrain, status):
            result = gameday.run(command, stack.state)
            assert result.returncode == 0, str(result)
        assert "DRAINING" not in result.stdout, f"expected no region draining:\n{result}"
        served = http.post("/v1/deposits", json={"account": account, "amount": 1, "currency": "EUR"},
                           headers={"idempotency-key": new_key()})
        assert served.status_code == 201, f"expected writes again after undrain: {served.text}"
        assert http.get(f"/v1/accounts/{account}").json()["balance"] == 152
    checked = gameday.run(verify.commands({})[0], stack.state)
    assert checked.returncode == 0 and "OK: no violation" in checked.stdout, str(checked)
