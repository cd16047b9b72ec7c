"""Standard Webhooks signatures (standardwebhooks.com): a `whsec_` secret is base64 of random bytes, the key is
those bytes, and a signature is `v1,` + base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}"). While a secret is
rotated both sign: the header holds one signature per secret, space-separated."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from app import limits

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(limits.WEBHOOK_SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    assert secret.startswith(SECRET_PREFIX), "a webhook secret starts with whsec_"
    return base64.b64decode(secret[len(SECRET_PREFIX):])


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets_),
        "content-type": "application/json",
    }
