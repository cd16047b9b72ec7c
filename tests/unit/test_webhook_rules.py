"""Pure parts of issue 13: URL rules (with the system resolver), signatures against an independent
implementation, the retry schedule, and the feed's merge never skipping or repeating."""

from __future__ import annotations

import random

import pytest

from app import limits
from app.errors import Problem
from app.events import feed, signing
from app.events.urls import GuardedResolver, UrlPolicy, UrlRefused, check_url
from app.events.webhooks import retry_delay_s
from tests.events_support import verify_signature

DEPLOYED = UrlPolicy(allow_loopback=False)
LOCAL = UrlPolicy(allow_loopback=True)


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/", "https://10.0.0.1/", "https://172.16.3.4/", "https://192.168.1.1/",
    "https://169.254.169.254/latest/meta-data/", "https://[::1]/", "https://[fd00:ec2::254]/",
    "https://[::ffff:127.0.0.1]/", "https://100.64.0.1/", "https://0.0.0.0/", "https://localhost/",
    "http://93.184.215.14/", "ftp://example.com/", "https://user:pw@93.184.215.14/", "not a url",
])
async def test_deployed_rules_refuse_private_loopback_link_local_and_metadata_addresses(url: str) -> None:
    with pytest.raises(UrlRefused):
        await check_url(url, DEPLOYED)


async def test_deployed_rules_accept_https_to_a_public_address_and_the_local_stack_adds_loopback_only() -> None:
    await check_url("https://93.184.215.14/hook", DEPLOYED)
    await check_url("http://127.0.0.1:8080/hook", LOCAL)
    with pytest.raises(UrlRefused):
        await check_url("http://10.0.0.1/hook", LOCAL)


async def test_the_connection_resolver_refuses_a_name_resolving_to_loopback() -> None:
    resolver = GuardedResolver(DEPLOYED)
    try:
        with pytest.raises(OSError, match="not public"):
            await resolver.resolve("localhost", 443)
        assert await GuardedResolver(LOCAL).resolve("localhost", 443)
    finally:
        await resolver.close()


def test_signatures_verify_with_an_independent_implementation_and_rotation_signs_twice() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = b'{"id":"evt_000","type":"account.opened"}'
    headers = signing.headers([new, old], "evt_000", 1_700_000_000, body)
    assert headers["webhook-id"] == "evt_000" and headers["webhook-timestamp"] == "1700000000"
    assert verify_signature(new, headers, body) and verify_signature(old, headers, body)
    assert not verify_signature(signing.new_secret(), headers, body)
    assert not verify_signature(new, headers, body + b" ")


def test_the_retry_schedule_backs_off_with_bounded_jitter_then_ends() -> None:
    rng = random.Random(7)
    schedule = limits.WEBHOOK_RETRY_SCHEDULE_S
    for attempt, base in enumerate(schedule, start=1):
        delay = retry_delay_s(attempt, rng=rng)
        assert delay is not None and abs(delay - base) <= base * limits.WEBHOOK_RETRY_JITTER_RATIO
    assert retry_delay_s(len(schedule) + 1) is None
    assert sum(schedule) <= 4 * 86_400, "expected the schedule to end within about three days"


def test_a_cursor_round_trips_and_anything_else_is_invalid_cursor() -> None:
    positions = {"euw1-a": "812.44", "use1-b": "0.0"}
    assert feed.decode_cursor(feed.encode_cursor(positions)) == positions
    for bad in ("%%%", "e30x", feed.encode_cursor({"euw1-a": "1"}), "W10"):
        with pytest.raises(Problem) as caught:
            feed.decode_cursor(bad)
        assert caught.value.code == "invalid_cursor"


def test_merging_shard_pages_consumes_each_shard_in_order_and_moves_only_past_what_it_took() -> None:
    def ev(shard: str, n: int, at: str) -> tuple[str, dict[str, str]]:
        return f"{n}.{n}", {"id": f"evt_{shard}{n}", "created_at": at}

    a = feed.ShardPage("a", [ev("a", 1, "2026-01-01T00:00:03Z"), ev("a", 2, "2026-01-01T00:00:01Z")], True)
    b = feed.ShardPage("b", [ev("b", 5, "2026-01-01T00:00:02Z")], False)
    items, positions, more = feed.merge({"c": "9.9"}, [a, b], 2)
    assert [e["id"] for e in items] == ["evt_b5", "evt_a1"], "expected heads merged by created_at"
    assert positions == {"a": "1.1", "b": "5.5", "c": "9.9"} and more


def test_a_shard_moves_to_where_it_read_only_once_every_item_it_gave_is_taken() -> None:
    def ev(shard: str, n: int, at: str) -> tuple[str, dict[str, str]]:
        return f"{n}.{n}", {"id": f"evt_{shard}{n}", "created_at": at}

    a = feed.ShardPage("a", [ev("a", 1, "2026-01-01T00:00:01Z"), ev("a", 2, "2026-01-01T00:00:03Z")], False, "8.8")
    b = feed.ShardPage("b", [], True, "7.7")  # read 1,000 events of other types, none matched
    items, positions, more = feed.merge({}, [a, b], 1)
    assert [e["id"] for e in items] == ["evt_a1"]
    assert positions == {"a": "1.1", "b": "7.7"}, "expected a only past what was taken, b to where it read"
    assert more
    items, positions, more = feed.merge({}, [a, b], 5)
    assert [e["id"] for e in items] == ["evt_a1", "evt_a2"] and positions == {"a": "8.8", "b": "7.7"}


@pytest.mark.parametrize("host", [
    "[::ffff:10.0.0.1]", "[::ffff:a9fe:a9fe]", "[::a00:1]", "[::169.254.169.254]", "[64:ff9b::a00:1]",
    "[64:ff9b::a9fe:a9fe]", "[64:ff9b::7f00:1]", "[2002:a00:1::1]", "[2002:a9fe:a9fe::]", "[2002:7f00:1::]",
    "192.0.0.9", "192.0.0.170", "192.88.99.1", "198.18.0.1", "203.0.113.7", "240.0.0.1",
    "[2001:0:4136:e378:8000:63bf:f5ff:fffe]", "[fec0::1]", "[64:ff9b:1::808:808]", "[2001:db8::1]",
])
async def test_deployed_rules_refuse_ipv4_wrapped_in_ipv6_and_special_purpose_ranges(host: str) -> None:
    with pytest.raises(UrlRefused):
        await check_url(f"https://{host}/hook", DEPLOYED)


async def test_an_ipv6_address_wrapping_a_public_ipv4_address_is_judged_by_that_address() -> None:
    for host in ("[::ffff:93.184.215.14]", "[64:ff9b::5db8:d70e]", "[2002:5db8:d70e::1]"):
        await check_url(f"https://{host}/hook", DEPLOYED)


def _stub_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    """getaddrinfo answering `answers` for those names (the system resolver for any other)."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def fake(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        if host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in answers[host]]
        return await real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", fake)


async def test_registration_refuses_a_hostname_resolving_to_a_private_address(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_dns(monkeypatch, {"hooks.private.test": ["10.1.2.3"], "mixed.test": ["93.184.215.14", "10.1.2.3"],
                            "wrapped.test": ["64:ff9b::a00:1"], "public.test": ["93.184.215.14"]})
    for host in ("hooks.private.test", "mixed.test", "wrapped.test"):
        with pytest.raises(UrlRefused, match="not public"):
            await check_url(f"https://{host}/hook", DEPLOYED)
    await check_url("https://public.test/hook", DEPLOYED)
