"""A stand-in OpenID provider for tests: a real HTTP server on loopback that publishes a
discovery document and a JWKS (keys made by the test) and counts the requests it gets; and
`Tokens`, such a provider with one key that mints the tokens tests send to the APIs."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


class Keys:
    """A signing key of each kind the verifier accepts by default."""

    def __init__(self, alg: str = "ES256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or f"{alg}-{uuid.uuid4().hex[:8]}"
        if alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": alg}

    def sign(self, claims: dict, kid: str | None = "same", **headers) -> str:
        header = {**headers}
        if kid is not None:
            header["kid"] = self.kid if kid == "same" else kid
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=header)


class Provider:
    """A real HTTP server on loopback publishing discovery and a JWKS; counts requests."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.hits: dict[str, int] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                doc = issuer.docs.get(self.path)
                body = json.dumps(doc).encode() if doc is not None else b"{}"
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.publish()

    def publish(self, *keys, issuer: str | None = None) -> None:
        self.docs["/.well-known/openid-configuration"] = {
            "issuer": issuer or self.url, "jwks_uri": self.url + "/jwks"}
        self.docs["/jwks"] = {"keys": [k if isinstance(k, dict) else k.jwk for k in keys]}

    @property
    def jwks_fetches(self) -> int:
        return self.hits.get("/jwks", 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Tokens:
    """A stand-in issuer with one ES256 key: valid tokens for any subject and roles, and each
    kind of bad one. `config(cfg)` / `env` make an entry point trust it (LABBUS_AUTH_ISSUER)."""

    def __init__(self, audience: str = "labbus", ttl_s: int = 86400) -> None:
        self.provider = Provider()
        self.url = self.provider.url
        self.key = Keys("ES256")
        self.provider.publish(self.key)
        self.audience = audience
        self.ttl_s = ttl_s  # long: a module's client keeps its token for the module's tests

    def close(self) -> None:
        self.provider.close()

    def config(self, cfg):
        return replace(cfg, auth_issuer=self.url, auth_jwks_url="")

    @property
    def env(self) -> dict[str, str]:
        return {"LABBUS_AUTH_ISSUER": self.url, "LABBUS_AUTH_JWKS_URL": ""}

    def claims(self, user: str, roles, **over) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": self.audience, "sub": user, "iat": now,
                  "exp": now + self.ttl_s, "jti": str(uuid.uuid4()), "roles": list(roles)}
        claims.update(over)
        return claims

    def token(self, user: str = "tester", roles=("viewer",), **over) -> str:
        return self.key.sign(self.claims(user, roles, **over))

    def headers(self, user: str = "tester", roles=("viewer",), **over) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, roles, **over)}"}

    def bad(self, kind: str, user: str = "tester", roles=("admin",)) -> str:
        """A token of an admin that must be refused: `expired` (an hour ago), `bad-signature`
        (another key, same key id), `wrong-audience`, `wrong-issuer`."""
        now = int(time.time())
        if kind == "expired":
            return self.token(user, roles, iat=now - 7200, exp=now - 3600)
        if kind == "bad-signature":
            return Keys("ES256", kid=self.key.kid).sign(self.claims(user, roles))
        if kind == "wrong-audience":
            return self.token(user, roles, aud="another-service")
        if kind == "wrong-issuer":
            return self.token(user, roles, iss="https://issuer.elsewhere.example")
        raise ValueError(kind)


BAD_TOKENS = ("expired", "bad-signature", "wrong-audience", "wrong-issuer")
