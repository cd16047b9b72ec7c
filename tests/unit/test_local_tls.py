"""The local CA (app/local/tls.py) and the internal-TLS settings (app/security/tls.py, app/config.py): files,
modes, names, renewal, and the refusal of plaintext internal URLs. No processes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from app import limits
from app.config import RegionSettings, RouterSettings, SettingsError
from app.local.tls import ensure_local_tls
from app.security.tls import TlsConfigError, client_context


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_local_ca_signs_a_loopback_server_certificate_and_keeps_its_keys_private(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path / "tls")
    assert (tls.folder.stat().st_mode & 0o777) == 0o700
    assert (tls.ca_key_file.stat().st_mode & 0o777) == 0o600
    assert (tls.key_file.stat().st_mode & 0o777) == 0o600
    assert b"BEGIN PRIVATE KEY" in tls.key_file.read_bytes(), "expected PKCS#8 (granian reads only that)"
    ca, server = _cert(tls.ca_file), _cert(tls.cert_file)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    # What a client builds from it verifies the server's name and chain.
    context = client_context(tls.ca_file)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_valid_files_are_kept_and_due_ones_are_made_again(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    ca_before, server_before = tls.ca_file.read_bytes(), tls.cert_file.read_bytes()
    ensure_local_tls(tmp_path)
    assert (tls.ca_file.read_bytes(), tls.cert_file.read_bytes()) == (ca_before, server_before)

    # The server certificate close to its end: a new one from the same CA.
    server_due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        days=limits.LOCAL_SERVER_CERT_VALIDITY_DAYS - limits.LOCAL_CERT_RENEW_BEFORE_DAYS + 1)
    ensure_local_tls(tmp_path, now=server_due)
    assert tls.ca_file.read_bytes() == ca_before and tls.cert_file.read_bytes() != server_before
    _cert(tls.cert_file).verify_directly_issued_by(_cert(tls.ca_file))

    # The CA expired: a new CA and a new server certificate signed by it.
    ca_expired = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=limits.LOCAL_CA_VALIDITY_DAYS + 1)
    ensure_local_tls(tmp_path, now=ca_expired)
    assert tls.ca_file.read_bytes() != ca_before
    _cert(tls.cert_file).verify_directly_issued_by(_cert(tls.ca_file))

    # A damaged key: both made again, still consistent.
    tls.ca_key_file.write_bytes(b"not a key")
    ensure_local_tls(tmp_path)
    _cert(tls.cert_file).verify_directly_issued_by(_cert(tls.ca_file))


def _router_env(urls: dict[str, str], **extra: str) -> dict[str, str]:
    return {"TXROUTE_REGION": "eu-west-1", "TXROUTE_REGION_URLS": json.dumps(urls),
            "TXROUTE_CLIENT_ISSUERS": json.dumps({"iss": {"keys": {"k": "x"}, "client_prefix": ""}}),
            "TXROUTE_HOP_PRIVATE_KEY": "x", **extra}


def _region_env(urls: dict[str, str], **extra: str) -> dict[str, str]:
    return {"TXROUTE_REGION": "eu-west-1", "TXROUTE_DATABASE_URL": "postgresql://u@127.0.0.1:5432",
            "TXROUTE_HOP_PUBLIC_KEY": "x", "TXROUTE_SAGA_PUBLIC_KEY": "x", "TXROUTE_REGION_URLS": json.dumps(urls),
            "TXROUTE_CLIENT_ISSUERS": json.dumps({"iss": {"keys": {"k": "x"}, "client_prefix": ""}}), **extra}


def test_settings_refuse_plaintext_or_schemeless_internal_urls_unless_the_benchmark_knob_is_set(
    tmp_path: Path,
) -> None:
    plain = {"eu-west-1": "https://127.0.0.1:1", "us-east-1": "http://127.0.0.1:2"}
    for read, env in ((RouterSettings.from_env, _router_env), (RegionSettings.from_env, _region_env)):
        with pytest.raises(SettingsError, match="us-east-1 must be an https:// URL"):
            read(env(plain))
        with pytest.raises(SettingsError, match="https://"):
            read(env({"us-east-1": "127.0.0.1:2"}))
        with pytest.raises(SettingsError, match="TXROUTE_INTERNAL_CA_FILE"):
            read(env({"us-east-1": "https://127.0.0.1:2"}, TXROUTE_INTERNAL_CA_FILE=str(tmp_path / "missing.pem")))
        assert read(env(plain, TXROUTE_INTERNAL_PLAINTEXT="1")).internal_plaintext
        secure = read(env({"us-east-1": "https://127.0.0.1:2"}))
        assert not secure.internal_plaintext and secure.internal_ca_file is None  # the system trust store


def test_an_unreadable_ca_bundle_is_a_configuration_error_that_names_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="TXROUTE_INTERNAL_CA_FILE"):
        client_context(bad)
