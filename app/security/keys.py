"""Signing keys: loading them from PEM text or files, the algorithm each one implies, and a dev generator.

The algorithm a key verifies is decided by the key's type, never by a token's header: an Ed25519 key
verifies EdDSA only and a P-256 key ES256 only, so `alg: none` or HS256-with-the-public-key are refused
whatever a token claims.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

_PEM_MARK = "-----BEGIN "
# Keys one setting may hold at once: the current one and the one being rotated out (and a spare).
KEYS_PER_SETTING_MAX = 3


class KeyConfigError(ValueError):
    """A key is missing, unreadable or of an unsupported type; the message never holds key material."""


def algorithm_for(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise KeyConfigError(f"unsupported key type {type(key).__name__}: use Ed25519 or EC P-256")


def pem_text(value: str, *, what: str) -> bytes:
    """`value` is PEM text, or the path of a file holding it."""
    if value.lstrip().startswith(_PEM_MARK):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"{what}: cannot read key file {value!r}: {type(exc).__name__}") from None


def load_public_key(value: str, *, what: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem_text(value, what=what))
    except ValueError:
        raise KeyConfigError(f"{what}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise KeyConfigError(f"{what}: unsupported key type {type(key).__name__}: use Ed25519 or EC P-256")
    algorithm_for(key)
    return key


def load_public_keys(value: str, *, what: str) -> list[PublicKey]:
    """One or several PEM public keys (text or a file), all accepted: while a key is rotated the setting
    holds the new key and the old one (`txroute ops rotate-keys`), so tokens signed by either verify."""
    text = pem_text(value, what=what).decode("ascii", errors="replace")
    blocks = [_PEM_MARK + part for part in text.split(_PEM_MARK)[1:]]
    if not 1 <= len(blocks) <= KEYS_PER_SETTING_MAX:
        raise KeyConfigError(f"{what}: expected 1..{KEYS_PER_SETTING_MAX} PEM public keys, found {len(blocks)}")
    return [load_public_key(block, what=f"{what} (key {i + 1})") for i, block in enumerate(blocks)]


def load_private_key(value: str, *, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem_text(value, what=what), password=None)
    except (ValueError, TypeError):
        raise KeyConfigError(f"{what}: not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyConfigError(f"{what}: unsupported key type {type(key).__name__}: use Ed25519 or EC P-256")
    algorithm_for(key)
    return key


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pem(key: PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class DevKeys:
    """The files of a development key set (`txroute up`, tests, benchmarks); never for production. Three
    pairs, one per trust domain (DESIGN D8): the dev client issuer's, the hop key (routers sign, regions
    verify) and the saga key (regions sign and verify; routers never get it)."""

    folder: Path

    @property
    def client_private(self) -> Path:
        return self.folder / "client-dev.private.pem"

    @property
    def client_public(self) -> Path:
        return self.folder / "client-dev.public.pem"

    @property
    def hop_private(self) -> Path:
        return self.folder / "hop.private.pem"

    @property
    def hop_public(self) -> Path:
        return self.folder / "hop.public.pem"

    @property
    def saga_private(self) -> Path:
        return self.folder / "saga.private.pem"

    @property
    def saga_public(self) -> Path:
        return self.folder / "saga.public.pem"

    def pairs(self) -> list[tuple[Path, Path, str]]:
        """(private file, public file, what) of every pair."""
        return [(self.hop_private, self.hop_public, "hop"), (self.saga_private, self.saga_public, "saga"),
                (self.client_private, self.client_public, "dev client issuer")]


def ensure_dev_keys(folder: Path) -> DevKeys:
    """Ed25519 key pairs for the dev client issuer, hop tokens and saga tokens, created once (private keys
    0600)."""
    keys = DevKeys(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for private, public, _ in keys.pairs():
        if private.exists() and public.exists():
            continue
        key = ed25519.Ed25519PrivateKey.generate()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private_pem(key))
        public.write_text(public_pem(key.public_key()))
    return keys
