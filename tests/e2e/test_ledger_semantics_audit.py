"""An audit after everything issue 12 added (DESIGN D14, D15): through the global endpoint and the real regional
services, holds of every fate (captured whole, captured in part, captured across regions, voided, expired),
atomic batches (posted, refused), a non-atomic batch across the three regions, a reused batch key, unique
references and a closed account; then `txroute audit --full` over every shard of every region (the same
`app.ops.audit.audit` the command runs) is clean, and the client's money is what its deposits minus its
withdrawals put there."""

from __future__ import annotations

from typing import Any

from app.local.stack import cluster_shard_dsns
from app.ops.audit import audit
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi
from tests.helpers import accounts_in_one_shard, new_key, poll_until


def funds(kind: str, account: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "account": account, "amount": amount, "currency": "EUR", **extra}


def transfer(debit: str, credit: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"type": "transfer", "debit_account": debit, "credit_account": credit, "amount": amount,
            "currency": "EUR", **extra}


async def test_the_full_audit_is_clean_and_money_conserved_after_holds_batches_closing_and_unique_references(
    client_api: RouterApi, topology: Topology, pg_clusters
) -> None:
    api = client_api
    flows = {"in": 0, "out": 0}  # what deposits put in and withdrawals took out, as acknowledged
    accounts: list[str] = []

    async def deposit(account: str, amount: int) -> None:
        await api.funded(account, amount)
        flows["in"] += amount

    async def state(transfer_id: str) -> str:
        return str((await api.get(f"/v1/transfers/{transfer_id}")).json()["state"])

    _, (a, b, c) = await accounts_in_one_shard(api, topology, 3)
    accounts += [a, b, c]
    remote = {}
    for region in topology.regions:
        opened = await api.open_account(region=region.name)
        assert opened.status_code == 201, opened.text
        remote[region.name] = opened.json()["id"]
    accounts += list(remote.values())
    far = next(account for region, account in remote.items() if region != ROUTER_REGION)
    await deposit(a, 10_000)

    # Holds: captured whole, captured in part (the rest released), captured to another region (a saga),
    # voided, and left to expire; a second resolution of each is refused.
    whole = (await api.hold(a, b, 100)).json()["id"]
    assert (await api.capture(whole)).status_code == 201
    part = (await api.hold(a, c, 80)).json()["id"]
    assert (await api.capture(part, 30)).json()["amount"] == 30
    saga = (await api.hold(a, far, 70)).json()["id"]
    assert (await api.capture(saga, 60)).status_code in (201, 202)
    voided = (await api.hold(a, b, 50)).json()["id"]
    assert (await api.void(voided)).json()["state"] == "voided"
    expiring = (await api.hold(a, b, 20, expires_in_s=1)).json()["id"]
    open_hold = (await api.hold(a, c, 40)).json()["id"]
    for resolved in (whole, part, voided):
        refused = await api.capture(resolved)
        assert refused.status_code == 409 and refused.json()["code"] == "transfer_not_held", refused.text

    # Batches: an atomic one posted, an atomic one refused (nothing posted), a non-atomic one across the
    # three regions with a withdrawal, its exact replay, and its key reused with another body (refused).
    posted = await api.post("/v1/batches", {"atomic": True, "items": [
        transfer(a, b, 300), funds("deposit", c, 25), funds("withdrawal", b, 10)]}, key=new_key())
    assert posted.status_code == 201, posted.text
    flows["in"] += 25
    flows["out"] += 10
    refused = await api.post("/v1/batches", {"atomic": True, "items": [
        transfer(b, c, 5), funds("withdrawal", c, 1_000_000)]}, key=new_key())
    assert refused.status_code == 422 and refused.json()["code"] == "batch_refused", refused.text
    spread = [funds("deposit", account, 7) for account in remote.values()] + [
        transfer(a, remote[ROUTER_REGION], 11), funds("withdrawal", a, 9)]
    key = new_key()
    loose = await api.post("/v1/batches", {"atomic": False, "items": spread}, key=key)
    assert loose.status_code == 200 and all(i["status"] == 201 for i in loose.json()["items"]), loose.text
    flows["in"] += 7 * len(remote)
    flows["out"] += 9
    replay = await api.post("/v1/batches", {"atomic": False, "items": spread}, key=key)
    assert replay.status_code == 200 and all(i.get("replayed") for i in replay.json()["items"]), replay.text
    reused = await api.post("/v1/batches", {"atomic": False, "items": spread[:-1]}, key=key)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused", reused.text

    # Unique references: the first use posts, a second transfer with it from the same account is refused.
    unique = {"debit_account": a, "credit_account": c, "amount": 3, "currency": "EUR", "reference": "inv-12",
              "unique_reference": True}
    assert (await api.post("/v1/transfers", unique, key=new_key())).status_code == 201
    taken = await api.post("/v1/transfers", {**unique, "amount": 4}, key=new_key())
    assert taken.status_code == 409 and taken.json()["code"] == "reference_in_use", taken.text

    # Closing: refused while money is there, done once it is gone; a closed account refuses postings.
    z = await api.new_account()
    accounts.append(z)
    await deposit(z, 15)
    busy = await api.close(z)
    assert busy.status_code == 409 and busy.json()["code"] == "account_not_empty", busy.text
    assert (await api.withdraw(z, 15)).status_code == 201
    flows["out"] += 15
    closed = await api.close(z)
    assert closed.status_code == 200 and closed.json()["status"] == "closed", closed.text
    after = await api.deposit(z, 1)
    assert after.status_code == 422 and after.json()["code"] == "account_closed", after.text

    async def settled() -> bool:
        return [await state(t) for t in (saga, expiring, open_hold)] == ["posted", "expired", "held"]

    await poll_until(settled, timeout_s=30, what="the captured saga to post and the short hold to expire")
    expected_held = {a: 40}
    for account in accounts:
        body = (await api.account(account)).json()
        assert body["held"] == expected_held.get(account, 0), body
        assert body["available"] >= 0, body
    total = sum([await api.balance(account) for account in accounts])
    assert total == flows["in"] - flows["out"], (
        f"expected the client's accounts to hold deposits minus withdrawals, {flows}, got {total}")

    dsns = cluster_shard_dsns(topology, pg_clusters)

    async def audited() -> bool:  # a saga younger than the watermark waits for a later run
        report = await audit(dsns, full=True)
        assert report.clean, f"expected a clean full audit:\n{report.text()}"
        return report.counts.get("sagas_after_watermark", 0) == 0

    await poll_until(audited, timeout_s=60, what="a full audit that judged every saga")
