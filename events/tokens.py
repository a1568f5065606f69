"""Token verification, the one way every entry point checks a caller's JWT.

`TokenVerifier.verify(token)` checks the signature against the issuer's published keys (JWKS),
the expiry (with a small leeway), the issuer, the audience and the roles claim, and returns the
caller as a `Principal` (labbus.events.identity). Every failure is a `TokenError` subclass that
says which check failed and the HTTP status an entry point answers with (401, or 403 for a valid
token without a labbus role, 503 when the issuer's keys cannot be had).

Keys come from a configurable OIDC issuer: its discovery document
(`<issuer>/.well-known/openid-configuration` -> `jwks_uri`) or a JWKS URL set directly. They are
cached (LABBUS_AUTH_JWKS_CACHE_S); a token signed with a key id (`kid`) not in the cache makes
them be fetched again, at most once per LABBUS_AUTH_JWKS_MIN_REFRESH_S, so a key rotation is
picked up at once and a flood of made-up key ids cannot flood the issuer. Only asymmetric
algorithms are accepted (LABBUS_AUTH_ALGORITHMS), never `none` or HMAC.

A token that verified is remembered (the last VERIFIED_KEPT of them) until it expires or the
keys it was verified with are fetched again, whichever comes first: a client sends the same token
with every request for its lifetime, and checking its signature again each time cost about a
third of a cheap query's CPU (tests/bench/bench_auth.py). Nothing is answered differently: the
signature, issuer, audience and roles of the same token string cannot change, `nbf`/`iat` only
get further in the past, `exp` (with the leeway) is checked at every use, and the keys it was
checked with are the ones the verifier would use (refetched after LABBUS_AUTH_JWKS_CACHE_S or on
an unknown key id, which forgets what they verified). Refused tokens are not remembered.

The JOSE work (JWK parsing, signature and registered-claim checks) is PyJWT's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt

from labbus.events.config import Config
from labbus.events.identity import Principal, known_roles

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
VERIFIED_KEPT = 10_000  # tokens that verified, remembered (see the module's docstring)


class TokenError(Exception):
    """A token that does not let its bearer in. `status` is the HTTP answer, `error` the
    RFC 6750 error code for the WWW-Authenticate header."""

    status = 401
    error = "invalid_token"


class MissingToken(TokenError):
    """No bearer token in the request."""


class MalformedToken(TokenError):
    """Not a JWT, or one lacking a required claim or using a refused algorithm."""


class TokenExpired(TokenError):
    """Past its `exp` (beyond the leeway)."""


class TokenNotYetValid(TokenError):
    """Its `nbf` or `iat` lies in the future (beyond the leeway)."""


class BadSignature(TokenError):
    """The signature does not verify with the issuer's key."""


class UnknownKey(TokenError):
    """Signed with a key id the issuer does not publish (even after fetching its keys again)."""


class WrongIssuer(TokenError):
    """Issued by someone else."""


class WrongAudience(TokenError):
    """Issued for another service."""


class NoRoles(TokenError):
    """A valid token whose roles claim holds no labbus role: authenticated, not authorised."""

    status = 403
    error = "insufficient_scope"


class IssuerUnavailable(TokenError):
    """The issuer's keys cannot be fetched and none are cached."""

    status = 503
    error = "temporarily_unavailable"


def www_authenticate(exc: TokenError) -> str:
    """The WWW-Authenticate header of a refusal (RFC 6750 section 3)."""
    if isinstance(exc, MissingToken):
        return 'Bearer realm="labbus"'
    description = str(exc).replace('"', "'")
    return f'Bearer realm="labbus", error="{exc.error}", error_description="{description}"'


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        raise MissingToken("no bearer token (Authorization: Bearer <token>)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingToken("the Authorization header is not `Bearer <token>`")
    return token.strip()


def claim_at(claims: dict, path: str) -> Any:
    """The value at a dotted path (`realm_access.roles`), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class KeySet:
    """The issuer's signing keys: fetched, cached, fetched again on an unknown key id (rate
    limited)."""

    def __init__(self, issuer: str, jwks_url: str = "", cache_s: float = 300.0,
                 min_refresh_s: float = 10.0, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.cache_s = cache_s
        self.min_refresh_s = min_refresh_s
        self.clock = clock
        self._client = client
        self._own_client = client is None
        self.keys: dict[str | None, PublicKey] = {}
        self.fetched_at: float | None = None  # when the keys were last fetched (or tried)
        self.fetches = 0  # JWKS requests made, for tests and metrics
        self._lock = asyncio.Lock()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def key(self, kid: str | None) -> PublicKey:
        now = self.clock()
        stale = self.fetched_at is None or now - self.fetched_at >= self.cache_s
        if stale or (self._find(kid) is None and self._may_refresh(now)):
            async with self._lock:  # one fetch for all the callers that wait for it
                now = self.clock()
                if (self.fetched_at is None or now - self.fetched_at >= self.cache_s
                        or (self._find(kid) is None and self._may_refresh(now))):
                    await self._refresh()
        found = self._find(kid)
        if found is None:
            if not self.keys:
                raise IssuerUnavailable(f"no signing keys from the issuer {self.issuer}")
            raise UnknownKey(f"the issuer publishes no key {kid!r}" if kid else
                             "the token names no key (kid) and the issuer has several")
        return found

    def _find(self, kid: str | None) -> PublicKey | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    def _may_refresh(self, now: float) -> bool:
        return self.fetched_at is None or now - self.fetched_at >= self.min_refresh_s

    def fresh(self) -> bool:
        """The keys were fetched within the cache period (key() would not fetch them again)."""
        return self.fetched_at is not None and self.clock() - self.fetched_at < self.cache_s

    async def _refresh(self) -> None:
        self.fetched_at = self.clock()
        try:
            url = self.jwks_url or await self._discover()
            self.fetches += 1
            response = await self.client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document = response.json()
            keys = parse_jwks(document)
        except (httpx.HTTPError, ValueError, TokenError) as exc:
            log.warning("cannot fetch the issuer's keys; keeping the cached ones",
                        extra={"issuer": self.issuer, "error": str(exc),
                               "cached": len(self.keys)})
            return
        self.keys = keys

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + DISCOVERY_PATH
        response = await self.client.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        document = response.json()
        if document.get("issuer") != self.issuer:
            raise ValueError(f"{url} names the issuer {document.get('issuer')!r}, "
                             f"not {self.issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError(f"{url} has no jwks_uri")
        self.jwks_url = jwks_uri
        return jwks_uri


@dataclass(frozen=True)
class PublicKey:
    jwk: jwt.PyJWK
    alg: str | None  # the algorithm the JWK declares (`alg`), if it does


def parse_jwks(document: dict) -> dict[str | None, PublicKey]:
    """{kid: key} of a JWKS document's public signing keys; symmetric keys and keys PyJWT cannot
    use are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no `keys` list)")
    keys: dict[str | None, PublicKey] = {}
    for entry in document["keys"]:
        if (not isinstance(entry, dict) or entry.get("use", "sig") != "sig"
                or entry.get("kty") not in ("EC", "RSA", "OKP")):
            continue
        try:
            keys[entry.get("kid")] = PublicKey(jwt.PyJWK(entry), entry.get("alg"))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.info("skipping an unusable JWKS key",
                     extra={"kid": entry.get("kid"), "error": str(exc)})
    return keys


class TokenVerifier:
    def __init__(self, issuer: str, audience: str, keys: KeySet, *,
                 roles_claim: str = "roles",
                 algorithms: tuple[str, ...] = ("ES256", "EdDSA", "RS256"),
                 leeway_s: float = 30.0) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.roles_claim = roles_claim
        self.algorithms = algorithms
        self.leeway_s = leeway_s
        # token -> (caller, until (wall clock: exp + leeway), fetched_at of the keys it used)
        self._verified: OrderedDict[str, tuple[Principal, float, float | None]] = OrderedDict()
        self.signature_checks = 0  # full verifications made (not answered from memory)

    @classmethod
    def from_config(cls, cfg: Config, client: httpx.AsyncClient | None = None) -> TokenVerifier:
        keys = KeySet(cfg.auth_issuer, cfg.auth_jwks_url, cfg.auth_jwks_cache_s,
                      cfg.auth_jwks_min_refresh_s, client)
        return cls(cfg.auth_issuer, cfg.auth_audience, keys, roles_claim=cfg.auth_roles_claim,
                   algorithms=cfg.auth_algorithms, leeway_s=cfg.auth_leeway_s)

    async def aclose(self) -> None:
        await self.keys.aclose()

    async def verify(self, token: str) -> Principal:
        """The caller of a valid token, or a TokenError saying what is wrong with it."""
        kept = self._verified.get(token)
        if kept is not None:
            principal, until, keys_at = kept
            if time.time() < until and keys_at == self.keys.fetched_at and self.keys.fresh():
                return principal
            del self._verified[token]
        principal = await self._verify(token)
        self._verified[token] = (principal, principal.claims["exp"] + self.leeway_s,
                                 self.keys.fetched_at)
        while len(self._verified) > VERIFIED_KEPT:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> Principal:
        self.signature_checks += 1
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise MalformedToken(f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise MalformedToken(f"algorithm {alg!r} is not accepted "
                                 f"({', '.join(self.algorithms)})")
        key = await self.keys.key(header.get("kid"))
        if key.alg is not None and key.alg != alg:
            raise BadSignature(f"the key {header.get('kid')!r} is for {key.alg}, "
                               f"the token says {alg}")
        claims = self._decode(token, key.jwk, alg)
        roles = claim_at(claims, self.roles_claim)
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise NoRoles(f"no roles claim {self.roles_claim!r} in the token")
        labbus_roles = known_roles(roles)
        if not labbus_roles:
            raise NoRoles(f"none of the token's roles {roles!r} is a labbus role")
        email = claims.get("email")
        return Principal(
            user_id=str(claims["sub"]), roles=labbus_roles,
            token_id=str(claims["jti"]) if claims.get("jti") is not None else None,
            issuer=claims["iss"], expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            email=email if isinstance(email, str) else None, claims=claims)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict:
        try:
            return jwt.decode(
                token, key.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_iat": True})
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the token has expired") from None
        except jwt.ImmatureSignatureError as exc:
            raise TokenNotYetValid(f"the token is not valid yet: {exc}") from None
        except jwt.InvalidSignatureError:
            raise BadSignature("the signature does not verify with the issuer's key") from None
        except jwt.InvalidAudienceError:
            raise WrongAudience(f"the token is not for the audience {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise WrongIssuer(f"the token is not issued by {self.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise MalformedToken(str(exc)) from None
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError, TypeError) as exc:
            raise BadSignature(f"the issuer's key does not fit the token: {exc}") from None
        except jwt.InvalidTokenError as exc:  # DecodeError and the other claim checks
            raise MalformedToken(str(exc)) from None
