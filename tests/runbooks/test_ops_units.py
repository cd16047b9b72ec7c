"""The pieces of `txroute ops` that need no stack: targets, redaction, key overlap, game-day parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.ops.target import OpsError, deployed_target, redact
from app.security.keys import KeyConfigError, load_public_keys, public_pem
from app.security.tokens import BoundRequest, HopTokenMinter, HopTokenVerifier, TokenRefused
from tests.runbooks import gameday


def test_a_deployed_target_takes_endpoints_and_dsns_and_never_shows_a_password(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsns"
    dsn_file.write_text("# shard=dsn\neuw1-b=postgresql://txroute:s3cret@db-b:5432/shard_euw1_b\n")
    target = deployed_target(
        endpoints=["router=https://api.example/", "eu-west-1=https://eu-west-1.internal.api.example"],
        dsns=["euw1-a=postgresql://txroute:s3cret@db:5432/shard_euw1_a"], dsn_file=dsn_file, regions_dir=None,
    )
    assert target.router_urls == ["https://api.example"]
    assert target.region_urls == {"eu-west-1": "https://eu-west-1.internal.api.example"}
    assert target.shards_of("eu-west-1") == ["euw1-a", "euw1-b"] and not target.local
    assert "s3cret" not in repr(target)
    assert redact(target.shard_dsns["euw1-a"]) == "postgresql://txroute:***@db:5432/shard_euw1_a"


@pytest.mark.parametrize("endpoint", ["eu-west-1=http://10.20.1.5:8000", "router=http://api.example"])
def test_a_deployed_target_refuses_plaintext_endpoints(endpoint: str) -> None:
    with pytest.raises(OpsError, match="must be an https:// URL"):
        deployed_target(endpoints=[endpoint], dsns=["euw1-a=postgresql://x@db/shard_euw1_a"], dsn_file=None,
                        regions_dir=None)


def test_a_local_target_without_its_ca_yet_says_to_start_the_stack(tmp_path: Path) -> None:
    from app.ops.target import Target
    from app.topology.loader import load_topology

    target = Target(load_topology(), {}, [], {}, None, ca_file=tmp_path / "tls" / "ca.pem")
    with pytest.raises(OpsError, match="no CA yet"):
        target.tls()


@pytest.mark.parametrize("dsns", [[], ["nope=postgresql://x@y/z"], ["euw1-a"]])
def test_a_deployed_target_refuses_missing_or_unknown_shards(dsns: list[str]) -> None:
    with pytest.raises((OpsError, KeyError, ValueError)):
        deployed_target(endpoints=["router=https://api.example"], dsns=dsns, dsn_file=None, regions_dir=None)


def test_during_a_rotation_tokens_signed_by_the_old_or_the_new_key_verify_and_no_other(tmp_path: Path) -> None:
    old, new, stranger = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
    both = tmp_path / "internal.public.pem"
    both.write_text(public_pem(new.public_key()) + public_pem(old.public_key()))
    verifier = HopTokenVerifier(load_public_keys(str(both), what="test"))
    request = BoundRequest("GET", "/v1/accounts/x", b"")
    for key in (old, new):
        assert verifier.verify(HopTokenMinter(key).token("c", {"accounts:read"}, request), request).client == "c"
    with pytest.raises(TokenRefused, match="signature"):
        verifier.verify(HopTokenMinter(stranger).token("c", {"accounts:read"}, request), request)
    too_many = tmp_path / "many.pem"
    too_many.write_text(public_pem(old.public_key()) * 4)
    with pytest.raises(KeyConfigError, match=r"1\.\.3"):
        load_public_keys(str(too_many), what="test")


def test_game_day_blocks_fill_only_documented_placeholders() -> None:
    block = gameday.Block("x.md", "sh", "txroute ops restart region-<region> \\\n  --yes\ntxroute ops status\n")
    assert [c.split() for c in block.commands({"region": "eu-west-1"})] == [
        ["txroute", "ops", "restart", "region-eu-west-1", "--yes"], ["txroute", "ops", "status"]]
    with pytest.raises(AssertionError, match="left unfilled"):
        block.commands({})
    with pytest.raises(AssertionError, match="not a documented placeholder"):
        block.commands({"env": "prod"})
