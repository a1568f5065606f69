"""The built-in token issuer, for a lab without an identity provider.

`password_grant` is the OAuth2 password flow (RFC 6749 section 4.3): an email and a password
become a short-lived ES256-signed access token (LABBUS_AUTH_TOKEN_TTL_S, 15 min by default) with
the claims iss, aud, sub (the user id), iat, exp, jti, roles and email. The password is checked
against its Argon2id hash (auth.credentials); the roles, and whether the user is disabled, are
read from the users read model at every token request, so a revoked role or a disabled user is
seen at the next request. A token already issued is not looked up again: it stays valid until it
expires (entry points verify it from its signature alone), which is why tokens are short-lived.

Tokens verify with labbus.events.tokens like those of any OIDC issuer: the keys are published at
/.well-known/jwks.json, found through /.well-known/openid-configuration.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import asyncpg
import jwt

from labbus.events.config import Config
from labbus.events.identity import known_roles, normalise_email
from labbus.producers.http_gateway import passwords, store
from labbus.producers.http_gateway.keys import ALGORITHM, SigningKey

log = logging.getLogger(__name__)

TOKEN_PATH = "/auth/token"
JWKS_PATH = "/.well-known/jwks.json"


class InvalidGrant(Exception):
    """The credentials do not get a token (RFC 6749 `invalid_grant`); the message says why."""


class Issuer:
    def __init__(self, issuer: str, audience: str, ttl_s: int, key: SigningKey,
                 db: asyncpg.Pool | None = None, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self.key = key
        self.db = db
        self.clock = clock

    @classmethod
    def from_config(cls, cfg: Config, key: SigningKey, db: asyncpg.Pool | None = None) -> Issuer:
        return cls(cfg.auth_issuer, cfg.auth_audience, cfg.auth_token_ttl_s, key, db)

    def mint(self, user_id: str, roles: list[str] | tuple[str, ...],
             email: str | None = None) -> tuple[str, dict]:
        """A signed access token and its claims."""
        now = int(self.clock())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": user_id, "iat": now,
                  "exp": now + self.ttl_s, "jti": str(uuid.uuid4()), "roles": list(roles)}
        if email:
            claims["email"] = email
        token = jwt.encode(claims, self.key.private, algorithm=ALGORITHM,
                           headers={"kid": self.key.kid, "typ": "JWT"})
        return token, claims

    async def password_grant(self, username: str, password: str) -> dict:
        """The token response (RFC 6749 section 5.1), or InvalidGrant."""
        try:
            email = normalise_email(username)
        except ValueError:
            email = None
        row = await store.credentials(self.db, email) if email else None
        hashed = row["password_hash"] if row else None
        if not await asyncio.to_thread(passwords.verify, hashed, password):
            raise InvalidGrant("wrong email or password")
        user = await store.user(self.db, row["user_id"])
        if user is None:
            raise InvalidGrant("the user is not in the users read model yet (the PostgreSQL "
                               "projector, `labbus project postgres`, writes it)")
        if user["disabled"]:
            raise InvalidGrant("the user is disabled")
        roles = known_roles(user["roles"])
        if not roles:
            raise InvalidGrant("the user holds no role")
        if passwords.needs_rehash(hashed):
            await store.set_hash(self.db, row["user_id"],
                                 await asyncio.to_thread(passwords.hash_password, password))
        token, claims = self.mint(row["user_id"], roles, email)
        log.info("token issued", extra={"user_id": row["user_id"], "roles": list(roles),
                                        "jti": claims["jti"]})
        return {"access_token": token, "token_type": "bearer", "expires_in": self.ttl_s}

    def jwks(self) -> dict:
        return {"keys": [self.key.public_jwk]}

    def discovery(self) -> dict:
        """The OpenID Provider Metadata verifiers need (OpenID Connect Discovery 1.0, section 3):
        where the keys and the token endpoint are."""
        base = self.issuer.rstrip("/")
        return {
            "issuer": self.issuer,
            "jwks_uri": base + JWKS_PATH,
            "token_endpoint": base + TOKEN_PATH,
            "grant_types_supported": ["password"],
            "token_endpoint_auth_methods_supported": ["none"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": ["iss", "aud", "sub", "iat", "exp", "jti", "roles", "email"],
        }
