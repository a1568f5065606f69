"""Token verification (labbus.events.tokens) against keys made here, published by a real HTTP
server on loopback (discovery document and JWKS), which counts the fetches."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest

from labbus.events import config
from labbus.events.tokens import (
    BadSignature,
    IssuerUnavailable,
    KeySet,
    MalformedToken,
    MissingToken,
    NoRoles,
    TokenExpired,
    TokenNotYetValid,
    TokenVerifier,
    UnknownKey,
    WrongAudience,
    WrongIssuer,
    bearer_token,
    claim_at,
    parse_jwks,
    www_authenticate,
)
from tests.support.idp import Keys, Provider

AUD = "labbus"


@pytest.fixture
def idp():
    server = Provider()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claims(idp: Provider, **over) -> dict:
    now = int(time.time())
    base = {"iss": idp.url, "aud": AUD, "sub": "user-1", "iat": now, "exp": now + 900,
            "jti": str(uuid.uuid4()), "roles": ["researcher"], "email": "ada@lab.example"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def verifier(idp: Provider, clock=None, **options) -> TokenVerifier:
    keys = KeySet(idp.url, options.pop("jwks_url", ""), cache_s=options.pop("cache_s", 300),
                  min_refresh_s=options.pop("min_refresh_s", 10), clock=clock or time.monotonic)
    return TokenVerifier(idp.url, AUD, keys, **options)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_a_valid_token_names_the_caller_and_their_labbus_roles(idp, alg):
    key = Keys(alg)
    idp.publish(key)
    v = verifier(idp)
    c = claims(idp, roles=["researcher", "offline_access", "viewer"])
    principal = await v.verify(key.sign(c))
    assert principal.user_id == "user-1" and principal.token_id == c["jti"]
    assert principal.roles == ("researcher", "viewer")  # an IdP's own roles grant nothing
    assert principal.email == "ada@lab.example" and principal.issuer == idp.url
    assert int(principal.expires_at.timestamp()) == c["exp"]
    assert principal.may("read:all") and not principal.may("command:send")
    await v.aclose()


async def test_expired_beyond_the_leeway_is_refused_within_it_accepted(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp, leeway_s=30)
    now = int(time.time())
    with pytest.raises(TokenExpired) as info:
        await v.verify(key.sign(claims(idp, iat=now - 1000, exp=now - 60)))
    assert info.value.status == 401
    assert (await v.verify(key.sign(claims(idp, iat=now - 1000, exp=now - 10)))).user_id
    with pytest.raises(TokenNotYetValid):
        await v.verify(key.sign(claims(idp, nbf=now + 600)))
    await v.aclose()


async def test_a_signature_by_another_key_under_the_same_kid_is_refused(idp):
    key = Keys()
    idp.publish(key)
    forger = Keys(kid=key.kid)
    v = verifier(idp)
    with pytest.raises(BadSignature):
        await v.verify(forger.sign(claims(idp)))
    # and a genuine token with its payload changed
    header, payload, signature = key.sign(claims(idp)).split(".")
    changed = jwt.utils.base64url_encode(json.dumps(
        claims(idp, roles=["admin"])).encode()).decode()
    with pytest.raises(BadSignature):
        await v.verify(f"{header}.{changed}.{signature}")
    await v.aclose()


async def test_wrong_audience_and_wrong_issuer_are_refused(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp)
    with pytest.raises(WrongAudience):
        await v.verify(key.sign(claims(idp, aud="another-service")))
    with pytest.raises(WrongIssuer):
        await v.verify(key.sign(claims(idp, iss="https://evil.example")))
    with pytest.raises(MalformedToken):  # a required claim missing
        await v.verify(key.sign(claims(idp, sub=None)))
    await v.aclose()


async def test_a_token_without_a_labbus_role_is_authenticated_but_forbidden(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp)
    for roles in (None, [], ["offline_access"], "not-a-list-of-roles", [1, 2]):
        with pytest.raises(NoRoles) as info:
            await v.verify(key.sign(claims(idp, roles=roles)))
        assert info.value.status == 403 and info.value.error == "insufficient_scope"
    await v.aclose()


async def test_the_roles_claim_path_is_configurable(idp):
    """Keycloak puts realm roles in realm_access.roles."""
    key = Keys()
    idp.publish(key)
    v = verifier(idp, roles_claim="realm_access.roles")
    token = key.sign(claims(idp, roles=None, realm_access={"roles": ["operator", "uma"]}))
    assert (await v.verify(token)).roles == ("operator",)
    with pytest.raises(NoRoles):
        await v.verify(key.sign(claims(idp)))  # roles at the top level do not count here
    await v.aclose()


async def test_none_and_hmac_algorithms_are_never_accepted(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp)
    unsigned = jwt.encode(claims(idp), None, algorithm="none")
    with pytest.raises(MalformedToken):
        await v.verify(unsigned)
    # HS256 keyed with the public JWK's text: the classic algorithm-confusion forgery (made by
    # hand: PyJWT itself refuses to sign HMAC with a public key)
    def b64(data: dict) -> str:
        return jwt.utils.base64url_encode(json.dumps(data).encode()).decode()

    signing_input = f"{b64({'alg': 'HS256', 'kid': key.kid})}.{b64(claims(idp))}"
    mac = hmac.new(json.dumps(key.jwk).encode(), signing_input.encode(), hashlib.sha256)
    forged = f"{signing_input}.{jwt.utils.base64url_encode(mac.digest()).decode()}"
    with pytest.raises(MalformedToken, match="HS256"):
        await v.verify(forged)
    with pytest.raises(MalformedToken):
        await v.verify("not.a.jwt")
    await v.aclose()


async def test_a_key_declared_for_another_algorithm_is_refused(idp):
    es = Keys("ES256")
    idp.publish(es)
    ed = Keys("EdDSA", kid=es.kid)  # signs EdDSA under the kid of an ES256 key
    v = verifier(idp)
    with pytest.raises(BadSignature):
        await v.verify(ed.sign(claims(idp)))
    await v.aclose()


async def test_an_unknown_kid_refetches_the_keys_at_most_once_per_interval(idp):
    old, new = Keys(), Keys()
    idp.publish(old)
    clock = Clock()
    v = verifier(idp, clock=clock, min_refresh_s=10, cache_s=300)
    await v.verify(old.sign(claims(idp)))
    assert idp.jwks_fetches == 1
    await v.verify(old.sign(claims(idp)))
    assert idp.jwks_fetches == 1  # cached
    # the issuer rotates: a token signed with the new key makes the verifier fetch again
    idp.publish(old, new)
    clock.now += 11
    assert (await v.verify(new.sign(claims(idp)))).user_id == "user-1"
    assert idp.jwks_fetches == 2
    # made-up key ids: one refetch per interval at most, however many tokens
    clock.now += 11
    for i in range(20):
        with pytest.raises(UnknownKey):
            await v.verify(new.sign(claims(idp), kid=f"made-up-{i}"))
    assert idp.jwks_fetches == 3
    clock.now += 11
    with pytest.raises(UnknownKey):
        await v.verify(new.sign(claims(idp), kid="made-up-again"))
    assert idp.jwks_fetches == 4
    # a rotation within the interval: the new key is taken once the interval has passed
    newest = Keys()
    idp.publish(new, newest)
    with pytest.raises(UnknownKey):
        await v.verify(newest.sign(claims(idp)))
    clock.now += 11
    assert (await v.verify(newest.sign(claims(idp)))).user_id == "user-1"
    await v.aclose()


async def test_keys_are_fetched_again_when_the_cache_expires(idp):
    key = Keys()
    idp.publish(key)
    clock = Clock()
    v = verifier(idp, clock=clock, cache_s=60)
    await v.verify(key.sign(claims(idp)))
    clock.now += 61
    await v.verify(key.sign(claims(idp)))
    assert idp.jwks_fetches == 2
    # the issuer is gone (404): the cached keys are kept and still verify
    idp.docs.clear()
    clock.now += 61
    await v.verify(key.sign(claims(idp)))
    assert idp.jwks_fetches == 3 and idp.hits["/.well-known/openid-configuration"] == 1
    await v.aclose()


async def test_a_token_that_verified_is_remembered_until_it_expires(idp):
    """The same token again is answered from memory (no signature check), the same caller;
    past its exp it is refused like any expired token, memory or not."""
    key = Keys()
    idp.publish(key)
    v = verifier(idp, leeway_s=0)
    token = key.sign(claims(idp, exp=int(time.time()) + 2))
    first = await v.verify(token)
    for _ in range(100):
        assert await v.verify(token) is first
    assert v.signature_checks == 1
    other = key.sign(claims(idp, sub="user-2"))
    assert (await v.verify(other)).user_id == "user-2" and v.signature_checks == 2
    time.sleep(max(0.0, first.claims["exp"] - time.time()) + 0.1)
    with pytest.raises(TokenExpired):
        await v.verify(token)
    # refused tokens are not remembered: each is checked again
    forged = Keys(kid=key.kid).sign(claims(idp))
    for _ in range(3):
        with pytest.raises(BadSignature):
            await v.verify(forged)
    assert v.signature_checks == 2 + 1 + 3
    await v.aclose()


async def test_a_remembered_token_is_checked_again_with_keys_fetched_again(idp):
    """What a token was verified with does not outlive the keys: when they are fetched again
    (cache period over, or an unknown key id), the token is checked against the new ones; a key
    the issuer no longer publishes no longer lets its tokens in."""
    old, new = Keys(), Keys()
    idp.publish(old)
    clock = Clock()
    v = verifier(idp, clock=clock, cache_s=60, min_refresh_s=10)
    token = old.sign(claims(idp))
    await v.verify(token)
    await v.verify(token)
    assert v.signature_checks == 1
    # an unknown key id makes the keys be fetched again: the remembered token is checked again
    idp.publish(old, new)
    clock.now += 11
    await v.verify(new.sign(claims(idp)))
    await v.verify(token)
    assert v.signature_checks == 3 and idp.jwks_fetches == 2
    # the issuer drops the old key; once the keys are fetched again, its token is refused
    idp.publish(new)
    await v.verify(token)
    assert v.signature_checks == 3  # the cache period is not over: the keys are as they were
    clock.now += 61
    with pytest.raises(UnknownKey):
        await v.verify(token)
    assert idp.jwks_fetches == 3
    await v.aclose()


async def test_no_keys_at_all_is_issuer_unavailable(idp):
    key = Keys()
    idp.publish(key, issuer="https://another.example")  # discovery names another issuer
    v = verifier(idp)
    with pytest.raises(IssuerUnavailable) as info:
        await v.verify(key.sign(claims(idp)))
    assert info.value.status == 503
    assert idp.jwks_fetches == 0
    await v.aclose()


async def test_a_jwks_url_set_directly_skips_discovery(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp, jwks_url=idp.url + "/jwks")
    await v.verify(key.sign(claims(idp)))
    assert "/.well-known/openid-configuration" not in idp.hits
    await v.aclose()


async def test_a_token_without_kid_uses_the_only_key(idp):
    key = Keys()
    idp.publish(key)
    v = verifier(idp)
    assert (await v.verify(key.sign(claims(idp), kid=None))).user_id == "user-1"
    idp.publish(key, Keys())
    v2 = verifier(idp)
    with pytest.raises(UnknownKey):
        await v2.verify(key.sign(claims(idp), kid=None))
    await v.aclose()
    await v2.aclose()


def test_from_config_takes_every_setting():
    cfg = config.load({"LABBUS_AUTH_ISSUER": "https://kc.example/realms/lab",
                       "LABBUS_AUTH_AUDIENCE": "lab-api",
                       "LABBUS_AUTH_ROLES_CLAIM": "realm_access.roles",
                       "LABBUS_AUTH_ALGORITHMS": "RS256", "LABBUS_AUTH_LEEWAY_S": "5",
                       "LABBUS_AUTH_JWKS_URL": "https://kc.example/certs",
                       "LABBUS_AUTH_JWKS_CACHE_S": "60", "LABBUS_AUTH_JWKS_MIN_REFRESH_S": "2"})
    v = TokenVerifier.from_config(cfg)
    assert (v.issuer, v.audience, v.roles_claim, v.algorithms, v.leeway_s) == (
        "https://kc.example/realms/lab", "lab-api", "realm_access.roles", ("RS256",), 5.0)
    assert (v.keys.jwks_url, v.keys.cache_s, v.keys.min_refresh_s) == (
        "https://kc.example/certs", 60.0, 2.0)


def test_parse_jwks_keeps_public_signing_keys_only():
    es, ed = Keys("ES256"), Keys("EdDSA")
    doc = {"keys": [es.jwk, ed.jwk, {**Keys("ES256").jwk, "use": "enc"},
                    {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                    {"kty": "EC", "crv": "P-256", "kid": "broken"}]}
    assert set(parse_jwks(doc)) == {es.kid, ed.kid}
    with pytest.raises(ValueError):
        parse_jwks({"no": "keys"})


def test_bearer_header_parsing_and_www_authenticate():
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   xyz ") == "xyz"
    for bad in (None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer "):
        with pytest.raises(MissingToken):
            bearer_token(bad)
    assert www_authenticate(MissingToken("x")) == 'Bearer realm="labbus"'
    assert www_authenticate(TokenExpired('the "token" expired')) == (
        'Bearer realm="labbus", error="invalid_token", '
        "error_description=\"the 'token' expired\"")


def test_claim_at_follows_dotted_paths():
    c = {"roles": ["a"], "resource_access": {"labbus": {"roles": ["b"]}}}
    assert claim_at(c, "roles") == ["a"]
    assert claim_at(c, "resource_access.labbus.roles") == ["b"]
    assert claim_at(c, "resource_access.other.roles") is None
    assert claim_at(c, "roles.deeper") is None
