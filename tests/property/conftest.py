"""The property tests run against the same regional services as the integration tests."""

from tests.integration.conftest import api, home_region, http, other_api, shard_dsn  # noqa: F401
