"""The typed stack config: bounds refused with the key named, stack files and README in step with it."""

from __future__ import annotations

import pytest
import yaml

from tests.infra.conftest import REPO

VALID = {"environment": "prod", "api_domain": "api.txroute.example", "image_tag": "abc123",
         "hosted_zone_id": "Z0123456789ABC"}


def test_defaults_are_the_production_safe_values() -> None:
    from txroute_infra.config import InfraConfig

    c = InfraConfig(**VALID)
    assert c.backup_retention_days >= 7 and c.log_retention_days == 365 and c.nat_gateway_per_az


@pytest.mark.parametrize(("field", "value", "key"), [
    ("backup_retention_days", 3, "backupRetentionDays"),
    ("log_retention_days", 42, "logRetentionDays"),
    ("api_domain", "Not a domain", "apiDomain"),
    ("image_tag", "", "imageTag"),
    ("db_engine_version", "9.6", "dbEngineVersion"),
    ("error_ratio_max", 1.5, "errorRatioMax"),
    ("hosted_zone_id", "zone", "hostedZoneId"),
    ("hosted_zone_id", "", "hostedZoneId"),
    ("interface_endpoints", ("ecr", "s3"), "interfaceEndpoints"),
    ("interface_endpoints", ("logs", "logs"), "interfaceEndpoints"),
])
def test_out_of_bounds_values_are_refused_naming_the_key(field: str, value: object, key: str) -> None:
    from txroute_infra.config import ConfigError, InfraConfig

    with pytest.raises(ConfigError, match=f"txroute:{key}"):
        InfraConfig(**{**VALID, field: value})


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_stack_files_use_only_known_keys_and_valid_values(stack: str) -> None:
    from txroute_infra.config import CONFIG_KEYS, REQUIRED_KEYS, InfraConfig

    config = yaml.safe_load((REPO / "infra" / f"Pulumi.{stack}.yaml").read_text())["config"]
    keys = {k.split(":", 1)[1] for k in config}
    assert keys <= set(CONFIG_KEYS), keys - set(CONFIG_KEYS)
    # A required key the committed file leaves out is the account's own (the hosted zone): the README lists
    # it under what a platform engineer sets before the first `up`, and `pulumi up` stops without it.
    readme = (REPO / "infra" / "README.md").read_text()
    before_first_up = readme[readme.index("## Before the first `up`"):].split("\n## ", 1)[0]
    for key in set(REQUIRED_KEYS) - keys:
        assert f"txroute:{key}" in before_first_up, f"txroute:{key} is neither in the stack file nor in the README"
    InfraConfig(environment=stack, api_domain=config["txroute:apiDomain"], image_tag=config["txroute:imageTag"],
                hosted_zone_id=config.get("txroute:hostedZoneId", "Z0123456789ABC"),
                log_retention_days=int(config["txroute:logRetentionDays"]),
                backup_retention_days=int(config["txroute:backupRetentionDays"]))


def test_readme_documents_every_config_key() -> None:
    from txroute_infra.config import CONFIG_KEYS

    readme = (REPO / "infra" / "README.md").read_text()
    missing = [k for k in CONFIG_KEYS if f"`txroute:{k}`" not in readme]
    assert missing == []


def test_from_stack_reads_the_stack_config_and_refuses_bad_values() -> None:
    import pulumi
    from pulumi.runtime.config import set_all_config
    from txroute_infra.config import ConfigError, InfraConfig

    class NoResources(pulumi.runtime.Mocks):
        def new_resource(self, args: object) -> tuple[str, dict[str, object]]:
            raise AssertionError("reading config creates nothing")

        def call(self, args: object) -> tuple[dict[str, object], list[tuple[str, str]]]:
            raise AssertionError("reading config invokes nothing")

    pulumi.runtime.set_mocks(NoResources(), project="txroute", stack="staging")
    base = {"txroute:apiDomain": "api.txroute.example", "txroute:imageTag": "abc",
            "txroute:hostedZoneId": "Z0123456789ABC", "txroute:interfaceEndpoints": "ecr, logs",
            "txroute:natGatewayPerAz": "false", "txroute:latencyP99MsMax": "900"}
    try:
        set_all_config(base)
        c = InfraConfig.from_stack()
        assert (c.environment, c.nat_gateway_per_az, c.latency_p99_ms_max, c.backup_retention_days) == (
            "staging", False, 900, 14)
        assert c.interface_endpoints == ("ecr", "logs")
        set_all_config({**base, "txroute:errorRatioMax": "0"})
        with pytest.raises(ConfigError, match="txroute:errorRatioMax"):
            InfraConfig.from_stack()
    finally:
        set_all_config({})
