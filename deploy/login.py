"""`labbus login`, and the CLI's path through the command gateway with the stored token.

The token comes from the issuer's token endpoint (its discovery document says where: the built-in
issuer's is the command gateway's `/auth/token`), by the OAuth2 password flow, or is pasted
(`--token-stdin`) when a lab's own identity provider hands tokens out another way. It is kept in
LABBUS_TOKEN_FILE (mode 0600) with its expiry and the gateway it is for; an expired one is not
sent.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt

from labbus.events.config import Config
from labbus.events.tokens import DISCOVERY_PATH


class LoginError(Exception):
    """Login failed, or a stored token cannot be used; the message says why."""


@dataclass(frozen=True)
class StoredToken:
    access_token: str
    expires_at: float  # unix seconds
    subject: str
    gateway_url: str

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


def _token_endpoint(cfg: Config, client: httpx.Client) -> str:
    url = cfg.auth_issuer.rstrip("/") + DISCOVERY_PATH
    try:
        r = client.get(url)
        r.raise_for_status()
        return r.json()["token_endpoint"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise LoginError(f"no token endpoint in the issuer's discovery document {url}: {exc} "
                         "(is `labbus gateway http` running? LABBUS_AUTH_ISSUER)") from None


def login(cfg: Config, email: str, password: str) -> StoredToken:
    with httpx.Client(timeout=15) as client:
        endpoint = _token_endpoint(cfg, client)
        try:
            r = client.post(endpoint, data={"grant_type": "password", "username": email,
                                            "password": password})
        except httpx.HTTPError as exc:
            raise LoginError(f"{endpoint}: {exc}") from None
    if r.status_code != 200:
        try:
            why = r.json().get("error_description") or r.json().get("error")
        except ValueError:
            why = r.text[:200]
        raise LoginError(f"login refused ({r.status_code}): {why}")
    return store(cfg, r.json()["access_token"])


def store(cfg: Config, access_token: str) -> StoredToken:
    """Keep a token (the claims are read unverified: only to show who and until when; the
    gateway verifies it on every request)."""
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise LoginError(f"not a JWT: {exc}") from None
    token = StoredToken(access_token, float(claims.get("exp", 0)), str(claims.get("sub", "?")),
                        cfg.gateway_url)
    path: Path = cfg.token_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(token.__dict__, f)
    os.replace(tmp, path)
    return token


def stored(cfg: Config) -> StoredToken | None:
    """The token `labbus login` stored for this gateway, or None."""
    try:
        data = json.loads(cfg.token_file.read_text())
        token = StoredToken(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise LoginError(f"{cfg.token_file}: unreadable ({exc}); run `labbus login` again") \
            from None
    return token if token.gateway_url == cfg.gateway_url else None


def logout(cfg: Config) -> bool:
    try:
        cfg.token_file.unlink()
        return True
    except FileNotFoundError:
        return False


def post(cfg: Config, token: StoredToken, path: str, body: dict,
         idempotency_key: str | None = None) -> dict:
    """POST a command to the gateway with the token; the 202 answer, or LoginError saying why
    not. A retry after a lost answer reuses the Idempotency-Key, so it publishes nothing new."""
    if token.expired:
        raise LoginError("the stored token has expired; run `labbus login` again")
    headers = {"Authorization": f"Bearer {token.access_token}",
               "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
               "User-Agent": "labbus-cli"}
    url = f"{cfg.gateway_url}{path}"
    with httpx.Client(timeout=15) as client:
        for attempt in range(3):
            try:
                r = client.post(url, json=body, headers=headers)
                break
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise LoginError(f"{url}: {exc} (is `labbus gateway http` running?)") \
                        from None
                time.sleep(0.5 * 2 ** attempt)
    if r.status_code == 202:
        return r.json()
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text[:300]
    raise LoginError(f"the gateway refused ({r.status_code}): {detail}")
