"""`labbus demo` reads the query API with a viewer's token it signs with the built-in issuer's
key: the token verifies as the API verifies it (keys fetched from a real HTTP JWKS)."""

from __future__ import annotations

from dataclasses import replace

from labbus.deploy.demo import _viewer_token
from labbus.events import config
from labbus.events.tokens import TokenVerifier
from labbus.producers.http_gateway import keys
from tests.support.idp import Provider


async def test_the_demos_token_is_a_viewers_that_the_api_accepts(tmp_path):
    provider = Provider()
    try:
        cfg = replace(config.load({}), auth_issuer=provider.url, auth_keys_dir=tmp_path)
        token = _viewer_token(cfg)
        provider.publish(keys.load_or_create(tmp_path).public_jwk)
        verifier = TokenVerifier.from_config(cfg)
        try:
            principal = await verifier.verify(token)
        finally:
            await verifier.aclose()
        assert principal.roles == ("viewer",) and principal.user_id == "demo"
        assert _viewer_token(replace(cfg, auth_built_in=False)) is None
    finally:
        provider.close()
