"""The router's per-client token buckets (app/router/ratelimit.py) against an injected clock: burst, refill,
Retry-After, independence of clients and the bounded, least-recently-used table."""

from __future__ import annotations

import pytest

from app.config import RouterSettings, SettingsError
from app.errors import Problem
from app.router.ratelimit import ClientRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def limiter(*, rate_per_s: float = 2.0, burst: int = 4, clients_max: int = 100) -> tuple[ClientRateLimiter, Clock]:
    clock = Clock()
    return ClientRateLimiter(rate_per_s=rate_per_s, burst=burst, clients_max=clients_max, clock=clock), clock


def test_a_new_client_gets_its_burst_at_once_then_is_told_when_the_next_token_comes() -> None:
    bucket, _ = limiter(rate_per_s=2.0, burst=4)
    assert [bucket.retry_after_s("a") for _ in range(4)] == [None] * 4, "expected the burst of 4 to pass"
    # Empty: the next token comes in 1/2 s, announced as a whole second, never 0.
    assert bucket.retry_after_s("a") == 1


def test_tokens_refill_at_the_rate_and_never_beyond_the_burst() -> None:
    bucket, clock = limiter(rate_per_s=2.0, burst=4)
    for _ in range(4):
        assert bucket.retry_after_s("a") is None
    clock.now_s += 0.5  # one token back
    assert bucket.retry_after_s("a") is None
    assert bucket.retry_after_s("a") == 1
    clock.now_s += 3_600  # an hour idle refills to the burst, not to 7,200
    assert [bucket.retry_after_s("a") for _ in range(5)] == [None] * 4 + [1]


def test_retry_after_is_the_whole_seconds_until_one_token_is_back() -> None:
    bucket, clock = limiter(rate_per_s=0.1, burst=1)  # one token per 10 s
    assert bucket.retry_after_s("a") is None
    assert bucket.retry_after_s("a") == 10
    clock.now_s += 2.5
    assert bucket.retry_after_s("a") == 8, "expected ceil(7.5) seconds left"
    clock.now_s += 7.5
    assert bucket.retry_after_s("a") is None, "expected the client that waited as told to pass"


def test_refused_requests_take_no_token() -> None:
    bucket, clock = limiter(rate_per_s=1.0, burst=1)
    assert bucket.retry_after_s("a") is None
    for _ in range(100):
        assert bucket.retry_after_s("a") == 1
    clock.now_s += 1.0
    assert bucket.retry_after_s("a") is None, "expected hammering while refused not to push the next token away"


def test_one_client_emptying_its_bucket_leaves_the_others_untouched() -> None:
    bucket, _ = limiter(rate_per_s=1.0, burst=2)
    for _ in range(50):
        bucket.retry_after_s("noisy")
    assert [bucket.retry_after_s("quiet") for _ in range(2)] == [None, None]


def test_check_raises_429_rate_limited_with_retry_after() -> None:
    bucket, _ = limiter(rate_per_s=0.5, burst=1)
    bucket.check("a")
    with pytest.raises(Problem) as refused:
        bucket.check("a")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers == {"retry-after": "2"} and refused.value.extra == {"limit": "client_rate"}


def test_the_table_is_bounded_and_forgets_the_least_recently_used_client() -> None:
    bucket, clock = limiter(rate_per_s=1.0, burst=1, clients_max=3)
    for client in ("a", "b", "c"):
        assert bucket.retry_after_s(client) is None
    assert bucket.retry_after_s("a") == 1  # a is now the most recently used
    assert bucket.retry_after_s("d") is None  # full: b (least recently used) is dropped
    assert len(bucket) == 3
    assert bucket.retry_after_s("a") == 1, "expected a's empty bucket to be kept"
    assert bucket.retry_after_s("c") == 1, "expected c's empty bucket to be kept"
    clock.now_s += 1.0
    assert bucket.retry_after_s("b") is None  # b starts over with a full bucket, as it would have by now


def test_rate_and_burst_come_from_the_environment_with_defaults_no_normal_client_meets() -> None:
    base = {"TXROUTE_REGION": "eu-west-1", "TXROUTE_REGION_URLS": '{"eu-west-1": "https://x"}',
            "TXROUTE_CLIENT_ISSUERS": '{"iss": {"keys": {"k": "pem"}, "client_prefix": ""}}',
            "TXROUTE_HOP_PRIVATE_KEY": "pem"}
    defaults = RouterSettings.from_env(base)
    assert defaults.client_rate_per_s >= 100 and defaults.client_burst >= 100
    tuned = RouterSettings.from_env({**base, "TXROUTE_CLIENT_RATE_PER_S": "2.5", "TXROUTE_CLIENT_BURST": "3"})
    assert (tuned.client_rate_per_s, tuned.client_burst) == (2.5, 3)
    for name, value in (("TXROUTE_CLIENT_RATE_PER_S", "0"), ("TXROUTE_CLIENT_RATE_PER_S", "nan"),
                        ("TXROUTE_CLIENT_BURST", "0"), ("TXROUTE_CLIENT_BURST", "1.5")):
        with pytest.raises(SettingsError, match=name):
            RouterSettings.from_env({**base, name: value})


def test_a_regions_per_client_queue_share_comes_from_the_environment_within_the_queue() -> None:
    from app import limits
    from app.config import RegionSettings

    base = {"TXROUTE_REGION": "eu-west-1", "TXROUTE_DATABASE_URL": "postgresql://u@127.0.0.1:5432",
            "TXROUTE_HOP_PUBLIC_KEY": "pem", "TXROUTE_SAGA_PUBLIC_KEY": "pem",
            "TXROUTE_CLIENT_ISSUERS": '{"iss": {"keys": {"k": "x"}, "client_prefix": ""}}'}
    assert RegionSettings.from_env(base).tenant_queue_postings_max == limits.TENANT_QUEUE_POSTINGS_MAX
    assert 1 <= limits.TENANT_QUEUE_POSTINGS_MAX < limits.POSTING_QUEUE_DEPTH_MAX, "expected a share, not the queue"
    assert RegionSettings.from_env({**base, "TXROUTE_TENANT_QUEUE_POSTINGS_MAX": "3"}).tenant_queue_postings_max == 3
    for value in ("0", str(limits.POSTING_QUEUE_DEPTH_MAX + 1), "many"):
        with pytest.raises(SettingsError, match="TXROUTE_TENANT_QUEUE_POSTINGS_MAX"):
            RegionSettings.from_env({**base, "TXROUTE_TENANT_QUEUE_POSTINGS_MAX": value})
