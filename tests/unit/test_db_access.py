"""Database settings (app/store/access.py): the URL carries no password, TLS defaults and verification, and a
password source that reads again after a refused login, at a bounded rate."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from app.config import RegionSettings, SettingsError
from app.store.access import AccessError, PasswordSource, endpoint_from_env
from app.store.provision import scram_verifier

CA_BUNDLE = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def region_env(**extra: str) -> dict[str, str]:
    return {"TXROUTE_REGION": "eu-west-1", "TXROUTE_HOP_PUBLIC_KEY": "unused", "TXROUTE_SAGA_PUBLIC_KEY": "unused",
            "TXROUTE_CLIENT_ISSUERS": '{"iss": {"keys": {"k": "x"}, "client_prefix": ""}}', **extra}


def test_the_url_names_the_server_and_role_and_the_password_travels_apart() -> None:
    endpoint = endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://txroute_service@127.0.0.1:5433",
                                  "TXROUTE_DATABASE_PASSWORD": "a#b?c%d[e]f@g:h/i j"})
    args = endpoint.connect_args("shard_euw1_a")
    assert (args["host"], args["port"], args["user"], args["database"]) == (
        "127.0.0.1", 5433, "txroute_service", "shard_euw1_a")
    assert args["password"] is endpoint.password and "a#b" not in repr(endpoint), "expected the password apart"


@pytest.mark.parametrize("url", [
    "postgresql://txroute:secret@db.internal:5432",  # a password in the URL
    "postgresql://db.internal:5432",  # no role
    "mysql://txroute@db.internal:5432",
    "postgresql://txroute@db.internal:5432/shard",  # a database: the shards name their own
    "postgresql://txroute@db.internal:notaport",
])
def test_a_malformed_database_url_is_refused_by_name(url: str) -> None:
    with pytest.raises(SettingsError, match="TXROUTE_DATABASE_URL"):
        RegionSettings.from_env(region_env(TXROUTE_DATABASE_URL=url, TXROUTE_DATABASE_SSLMODE="disable"))


def test_two_password_sources_at_once_are_refused() -> None:
    with pytest.raises(AccessError, match="one of"):
        endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@127.0.0.1:5432",
                           "TXROUTE_DATABASE_PASSWORD": "x", "TXROUTE_DATABASE_SECRET_ID": "arn:y"})


def test_loopback_defaults_to_plaintext_and_any_other_host_to_verify_full_which_needs_the_ca_bundle() -> None:
    assert endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@127.0.0.1:5432"}).ssl_context() is False
    with pytest.raises(AccessError, match="TXROUTE_DATABASE_SSL_ROOT_CERT"):
        endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@db.abc.eu-west-1.rds.amazonaws.com:5432"})
    with pytest.raises(AccessError, match="is not a file"):
        endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@db.example:5432",
                           "TXROUTE_DATABASE_SSL_ROOT_CERT": "/nonexistent/global-bundle.pem"})
    with pytest.raises(AccessError, match="SSLMODE"):
        endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@db.example:5432",
                           "TXROUTE_DATABASE_SSLMODE": "prefer"})


def test_verify_full_builds_a_context_that_requires_a_certificate_chaining_to_the_bundle_and_naming_the_host() -> (
    None
):
    settings = RegionSettings.from_env(region_env(
        TXROUTE_DATABASE_URL="postgresql://txroute_service@db.abc.eu-west-1.rds.amazonaws.com:5432",
        TXROUTE_DATABASE_SSL_ROOT_CERT=str(CA_BUNDLE),
    ))
    assert settings.database.sslmode == "verify-full"
    context = settings.database.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0, "expected the CA bundle loaded"
    assert settings.database.connect_args("shard_euw1_a")["ssl"] is not False


def test_require_encrypts_without_verifying() -> None:
    endpoint = endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@db.example:5432",
                                  "TXROUTE_DATABASE_SSLMODE": "require"})
    context = endpoint.ssl_context()
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_NONE


async def test_a_password_file_is_read_once_then_again_only_after_a_refused_login_at_a_bounded_rate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "password"
    path.write_text("first\n")
    source = endpoint_from_env({"TXROUTE_DATABASE_URL": "postgresql://u@127.0.0.1:5432",
                                "TXROUTE_DATABASE_PASSWORD_FILE": str(path)}).password
    assert source is not None
    assert await source() == "first"
    path.write_text("second\n")
    assert await source() == "first", "expected no re-read while logins succeed"
    source.stale()
    assert await source() == "second", "expected a re-read after a refused login"
    path.write_text("third\n")
    source.stale()
    assert await source() == "second", "expected at most one re-read per DB_PASSWORD_REREAD_INTERVAL_S"
    assert source.reads == 2


async def test_a_fixed_password_source_never_changes() -> None:
    source = PasswordSource.fixed("pw")
    source.stale()
    assert await source() == "pw"


def test_the_scram_verifier_has_postgresqls_stored_form_and_refuses_what_saslprep_would_change() -> None:
    verifier = scram_verifier("p#w?d%[x]@y:z/ q")
    mechanism, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    assert mechanism == "SCRAM-SHA-256" and iterations_salt.startswith("4096:") and keys.count(":") == 1
    assert scram_verifier("same") != scram_verifier("same"), "expected a fresh salt each time"
    with pytest.raises(ValueError, match="printable ASCII"):
        scram_verifier("pässword")
