"""Business refusals and reads: funds and overdraft limits, currencies, ownership (another client's account
reads as 404), placement (421 for another region's slot), entries pagination, readiness and the OpenAPI
document."""

from __future__ import annotations

import asyncio

import httpx

from app.api.schemas import AccountId
from app.region.api import PUBLIC_ROUTES, REQUEST_BODIES
from app.topology.ids import new_account_id, parse_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, account_in_shard, accounts_in_one_shard, shard_of
from tests.integration.conftest import HOME_REGION


def assert_code(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, f"expected {status} {code}, got {response.status_code} {response.text}"
    assert response.json()["code"] == code, f"expected code {code}, got {response.json()['code']}"


async def test_a_withdrawal_beyond_the_balance_is_insufficient_funds(api: ApiClient) -> None:
    account = await api.new_account()
    await api.funded(account, 100)
    assert_code(await api.withdraw(account, 101), 422, "insufficient_funds")
    assert (await api.withdraw(account, 100)).status_code == 201, "expected the whole balance to be withdrawable"
    assert_code(await api.withdraw(account, 1), 422, "insufficient_funds")
    assert await api.balance(account) == 0


async def test_an_overdraft_limit_is_honoured_to_the_unit(api: ApiClient) -> None:
    account = await api.new_account(overdraft_limit=50)
    await api.funded(account, 100)
    opened = (await api.account(account)).json()
    assert (opened["overdraft_limit"], opened["available"]) == (50, 150), opened
    assert_code(await api.withdraw(account, 151), 422, "insufficient_funds")
    assert (await api.withdraw(account, 150)).status_code == 201, "expected the overdraft to be usable"
    body = (await api.account(account)).json()
    assert (body["balance"], body["available"]) == (-50, 0), body
    assert_code(await api.withdraw(account, 1), 422, "insufficient_funds")


async def test_a_transfer_beyond_the_debit_balance_is_insufficient_funds(api: ApiClient, topology: Topology) -> None:
    _, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 10)
    assert_code(await api.transfer(a, b, 11), 422, "insufficient_funds")
    assert_code(await api.transfer(a, a, 1), 422, "same_account")
    assert (await api.balance(a), await api.balance(b)) == (10, 0)


async def test_a_currency_other_than_the_accounts_is_currency_mismatch(api: ApiClient, topology: Topology) -> None:
    _, (eur, eur2) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(eur, 100)
    assert_code(await api.deposit(eur, 5, "USD"), 422, "currency_mismatch")
    assert_code(await api.withdraw(eur, 5, "GBP"), 422, "currency_mismatch")
    assert_code(await api.transfer(eur, eur2, 5, "USD"), 422, "currency_mismatch")
    assert await api.balance(eur) == 100


async def test_another_clients_account_reads_as_not_found(
    api: ApiClient, other_api: ApiClient, topology: Topology
) -> None:
    mine = await api.new_account()
    theirs = await account_in_shard(other_api, topology, shard_of(topology, mine))
    await other_api.funded(theirs, 500)
    await api.funded(mine, 500)
    assert_code(await api.account(theirs), 404, "account_not_found")
    assert_code(await api.entries(theirs), 404, "account_not_found")
    assert_code(await api.deposit(theirs, 1), 404, "account_not_found")
    assert_code(await api.withdraw(theirs, 1), 404, "account_not_found")
    assert_code(await api.transfer(mine, theirs, 1), 404, "account_not_found")
    assert_code(await api.transfer(theirs, mine, 1), 404, "account_not_found")
    their_deposit = (await other_api.all_entries(theirs))[0]["transfer_id"]
    assert_code(await api.get(f"/v1/transfers/{their_deposit}"), 404, "transfer_not_found")
    assert (await other_api.balance(theirs), await api.balance(mine)) == (500, 500), "expected nothing moved"


async def test_a_slot_of_another_region_is_misdirected_naming_its_owner(api: ApiClient, topology: Topology) -> None:
    home = topology.region(HOME_REGION)
    for region in topology.regions:
        if region.name == home.name:
            continue
        slot = region.shards[0].slots[0].lo
        foreign = new_account_id(slot)
        for response in (await api.account(foreign), await api.entries(foreign), await api.deposit(foreign, 1)):
            assert_code(response, 421, "misdirected")
            assert response.json()["owner_region"] == region.name, response.text
    assert_code(await api.open_account(region="us-east-1"), 421, "misdirected")


async def test_an_account_opens_in_a_slot_its_region_owns(api: ApiClient, topology: Topology) -> None:
    response = await api.open_account("SEK")
    assert response.status_code == 201, response.text
    body = response.json()
    slot = parse_account_id(body["id"]).slot
    assert topology.shard_for_slot(slot).region == HOME_REGION == body["region"], body
    assert (body["balance"], body["currency"], body["status"]) == (0, "SEK", "open"), body
    assert response.headers["location"] == f"/v1/accounts/{body['id']}"
    assert (await api.account(body["id"])).json() == body


async def test_a_transfer_reads_back_as_it_was_answered(api: ApiClient, topology: Topology) -> None:
    _, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 40)
    posted = await api.transfer(a, b, 15, reference="invoice-9")
    assert posted.status_code == 201, posted.text
    read = await api.get(posted.headers["location"])
    assert read.status_code == 200, read.text
    body = read.json()
    for field in ("id", "kind", "amount", "currency", "reference", "debit_account", "credit_account", "state"):
        assert body[field] == posted.json()[field], f"expected {field} read back as posted"


async def test_entries_are_newest_first_and_the_cursor_walks_every_page_once(api: ApiClient) -> None:
    account = await api.new_account()
    amounts = list(range(1, 24))
    for amount in amounts:  # serially, so creation order is known
        await api.funded(account, amount)
    for amount in (3, 5):
        assert (await api.withdraw(account, amount)).status_code == 201
    expected_amounts = [*amounts, -3, -5][::-1]

    pages: list[list[dict[str, object]]] = []
    cursor = None
    for _ in range(20):
        response = await api.entries(account, limit=7, cursor=cursor)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert cursor is None, "expected the walk to end"
    assert [len(p) for p in pages][:4] == [7, 7, 7, 4], f"expected pages of 7,7,7,4, got {[len(p) for p in pages]}"
    items = [item for page in pages for item in page]
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)) == 25, f"expected each of 25 entries exactly once, got {len(ids)}"
    assert ids == sorted(ids, reverse=True), "expected entries newest first"
    assert [item["amount"] for item in items] == expected_amounts
    assert items[0]["balance_after"] == sum(amounts) - 8 == await api.balance(account)
    default_page = (await api.entries(account)).json()
    assert [i["id"] for i in default_page["items"]] == ids, "expected the default page to hold all 25"


async def test_readyz_reports_every_shard_ready(api: ApiClient, topology: Topology) -> None:
    response = await api.http.get("/readyz")
    assert response.status_code == 200, response.text
    shards = response.json()["shards"]
    assert shards == {s.name: True for s in topology.region(HOME_REGION).shards}, shards
    assert (await api.http.get("/healthz")).status_code == 200


async def test_openapi_documents_every_public_route_with_its_request_body(api: ApiClient) -> None:
    response = await api.http.get("/openapi.json")
    assert response.status_code == 200, response.text
    document = response.json()
    paths = document["paths"]
    for handler in PUBLIC_ROUTES:
        (path,) = handler.paths
        documented = path.replace("{account_id:str}", "{account_id}").replace("{transfer_id:str}", "{transfer_id}")
        for method in handler.http_methods:
            assert method.lower() in paths.get(documented, {}), f"expected {method} {documented} documented"
    schemas = document["components"]["schemas"]
    for path, struct in REQUEST_BODIES.items():
        operation = paths[path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert name == struct.__name__ and name in schemas, f"expected {path} to document body {struct.__name__}"
        assert set(schemas[name]["properties"]) == set(struct.__struct_fields__), f"expected {name}'s fields"
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        assert "Idempotency-Key" in headers, f"expected {path} to document its Idempotency-Key header"
    (meta,) = AccountId.__metadata__
    assert all(parse_account_id(example) for example in meta.examples)
    assert "insufficient_funds" in document["info"]["x-problem-codes"]
    assert document["info"]["x-problem-codes"]["as_of_before_move"]["status"] == 422
    assert "as_of_before_move" in paths["/v1/accounts/{account_id}"]["get"]["description"], (
        "expected the account read to document its refusal of a time before a slot move")


async def test_reads_run_concurrently_with_writes_without_errors(api: ApiClient) -> None:
    account = await api.new_account()
    writes = [api.deposit(account, 2) for _ in range(30)]
    reads = [api.account(account) for _ in range(30)]
    responses = await asyncio.gather(*writes, *reads)
    assert all(r.status_code in (200, 201) for r in responses), {r.status_code for r in responses}
    assert await api.balance(account) == 60
