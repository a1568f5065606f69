"""The built-in issuer's signing key: ES256 (ECDSA on P-256), made on first use.

The private key is a PKCS#8 PEM file, `<LABBUS_AUTH_KEYS_DIR>/signing-key.pem`, mode 0600 in a
0700 directory; a key file that others may read is refused. Its key id (`kid`) is the RFC 7638
thumbprint of the public key, so it needs no file of its own and every process that loads the
key names it the same. Two processes starting at once make one key between them (the file is
linked into place only if none exists).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ALGORITHM = "ES256"
KEY_FILE = "signing-key.pem"


class SigningKeyError(RuntimeError):
    """The signing key cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class SigningKey:
    private: ec.EllipticCurvePrivateKey
    kid: str
    path: Path

    @property
    def public_jwk(self) -> dict:
        jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


def thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638: base64url(SHA-256 of the JWK's required members in lexicographic order)."""
    jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")},
                           separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_or_create(directory: Path) -> SigningKey:
    path = directory / KEY_FILE
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"{path} is readable by others (mode {mode:o}): `chmod 600 {path}`")
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or \
            not isinstance(private.curve, ec.SECP256R1):
        raise SigningKeyError(f"{path} is not a P-256 (ES256) key")
    return SigningKey(private, thumbprint(private.public_key()), path)


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process put its key there first: use that
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
