"""The built-in issuer without services: its signing key file, password hashes, and tokens it
mints verified by the kernel's verifier through its published JWKS (a real HTTP server)."""

from __future__ import annotations

import os
import stat
import threading
import time

import jwt
import pytest

from labbus.events.tokens import KeySet, TokenExpired, TokenVerifier
from labbus.producers.http_gateway import keys, passwords
from labbus.producers.http_gateway.issuer import Issuer
from tests.support.idp import Provider


def test_the_signing_key_is_made_once_private_and_named_by_its_thumbprint(tmp_path):
    directory = tmp_path / "auth"
    first = keys.load_or_create(directory)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    again = keys.load_or_create(directory)
    assert again.kid == first.kid == keys.thumbprint(first.private.public_key())
    assert [p.name for p in directory.iterdir()] == [keys.KEY_FILE]  # no temporary files left
    jwk = first.public_jwk
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256"
    assert "d" not in jwk  # the public half only
    os.chmod(first.path, 0o644)
    with pytest.raises(keys.SigningKeyError, match="chmod 600"):
        keys.load_or_create(directory)


def test_processes_starting_at_once_share_one_key(tmp_path):
    found, errors = [], []

    def load():
        try:
            found.append(keys.load_or_create(tmp_path / "auth").kid)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(found)) == 1


def test_rfc7638_thumbprint_example():
    """The RSA example of RFC 7638 section 3.1 checks the method (our keys are EC, same rule)."""
    import base64
    import hashlib
    import json

    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJ"
         "ECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FD"
         "W2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4v"
         "MQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
    canonical = json.dumps({"e": "AQAB", "kty": "RSA", "n": n}, separators=(",", ":"),
                           sort_keys=True)
    digest = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    assert digest.decode() == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_passwords_hash_with_argon2id_and_verify():
    hashed = passwords.hash_password("correct horse")
    assert hashed.startswith("$argon2id$") and "correct horse" not in hashed
    assert passwords.verify(hashed, "correct horse")
    assert not passwords.verify(hashed, "correct horse!")
    assert not passwords.verify(hashed, "x" * 5000)
    assert not passwords.verify("not a hash", "correct horse")
    assert not passwords.verify(None, "labbus: no such user")  # the dummy never matches
    assert not passwords.needs_rehash(hashed)
    from argon2 import PasswordHasher

    assert passwords.needs_rehash(PasswordHasher(time_cost=1, memory_cost=8192).hash("x" * 8))
    for bad in ("short", "x" * 2000):
        with pytest.raises(ValueError):
            passwords.check_new(bad)


def test_an_unknown_user_takes_as_long_to_refuse_as_a_wrong_password():
    hashed = passwords.hash_password("correct horse")
    passwords.verify(None, "warm up the dummy hash")

    spent = {"wrong": 0.0, "unknown": 0.0}
    for _ in range(4):  # interleaved, so that other work on the machine weighs on both alike
        for kind, h in (("wrong", hashed), ("unknown", None)):
            started = time.perf_counter()
            passwords.verify(h, "wrong password")
            spent[kind] += time.perf_counter() - started
    assert 0.4 < spent["unknown"] / spent["wrong"] < 2.5, spent


@pytest.fixture
def provider():
    server = Provider()
    yield server
    server.close()


async def test_minted_tokens_verify_through_the_published_jwks(tmp_path, provider):
    key = keys.load_or_create(tmp_path / "auth")
    issuer = Issuer(provider.url, "labbus", 900, key)
    provider.docs["/.well-known/openid-configuration"] = issuer.discovery()
    provider.docs["/.well-known/jwks.json"] = issuer.jwks()
    verifier = TokenVerifier(provider.url, "labbus", KeySet(provider.url))
    token, claims = issuer.mint("user-7", ("student",), "sam@lab.example")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    assert claims["exp"] - claims["iat"] == 900 and claims["jti"]
    principal = await verifier.verify(token)
    assert (principal.user_id, principal.roles, principal.email, principal.token_id) == (
        "user-7", ("student",), "sam@lab.example", claims["jti"])
    assert provider.hits["/.well-known/jwks.json"] == 1
    # a token minted an hour ago with a 15 min lifetime is refused
    old = Issuer(provider.url, "labbus", 900, key, clock=lambda: time.time() - 3600)
    with pytest.raises(TokenExpired):
        await verifier.verify(old.mint("user-7", ("student",))[0])
    await verifier.aclose()


def test_discovery_names_the_token_endpoint_and_keys(tmp_path):
    issuer = Issuer("https://lab.example/", "labbus", 900, keys.load_or_create(tmp_path))
    doc = issuer.discovery()
    assert doc["issuer"] == "https://lab.example/"  # exactly the `iss` of its tokens
    assert doc["jwks_uri"] == "https://lab.example/.well-known/jwks.json"
    assert doc["token_endpoint"] == "https://lab.example/auth/token"
