"""TLS on the internal hops (router -> region, region -> region): the client side, one way for every caller.

A client verifies the region it calls: certificate chain up to a trusted CA, the name or IP address of the
URL in the certificate, TLS 1.2 at least. What it trusts is one setting, TXROUTE_INTERNAL_CA_FILE:

    a file      a PEM bundle of CA certificates: the local stack's own CA (`.state/tls/ca.pem`,
                app/local/tls.py), or a private CA's bundle
    unset       the system trust store: deployed stacks, whose internal load balancers serve public ACM
                certificates for names under the stack's DNS zone (infra/README.md)

Internal URLs are https://. A plaintext URL is refused when settings are read (`require_https`), so a
forgotten scheme fails at start instead of sending tokens in clear; the only exception is the router
benchmark's plaintext comparison, which says so in TXROUTE_INTERNAL_PLAINTEXT (never set in a deployment).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path


class TlsConfigError(ValueError):
    """A TLS setting is unusable; the message names the setting and never holds key material."""


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A context that verifies servers (CERT_REQUIRED, hostname or IP checked) against `ca_file`, or the
    system trust store when it is None."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TXROUTE_INTERNAL_CA_FILE: cannot load {ca_file}: {type(exc).__name__}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def require_https(urls: Mapping[str, str], *, what: str, plaintext_allowed: bool = False) -> None:
    """Every internal URL is https:// (unless the plaintext benchmark knob is set)."""
    for name, url in urls.items():
        scheme = url.partition("://")[0].lower()
        if scheme == "https" or (plaintext_allowed and scheme == "http"):
            continue
        raise TlsConfigError(
            f"{what}: {name} must be an https:// URL (internal hops are TLS only), got {scheme or 'no'} scheme"
        )
