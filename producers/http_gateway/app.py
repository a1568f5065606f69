"""The command gateway's HTTP app (`labbus gateway http`, its own process).

It serves the built-in token issuer (`POST /auth/token`, the OAuth2 password flow in FastAPI's
`OAuth2PasswordRequestForm` convention; `/.well-known/jwks.json`;
`/.well-known/openid-configuration`), the command routes (`POST /commands`: see
producers/http_gateway/commands.py; campaigns: experiments.py; service requests, inspections
and aborts: service_requests.py; LIMS sample registrations: samples.py), `/health/live`,
`/health/ready` and `/metrics`.

Errors of `/auth/token` are RFC 6749 section 5.2 bodies (`{"error": ..., "error_description":
...}`), status 400: `invalid_grant` for a wrong email or password, a disabled user or one with no
role; `invalid_request` for a form that lacks a field; `unsupported_grant_type` for another
grant than `password`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import OAuth2PasswordRequestForm
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from labbus.events.config import Config
from labbus.events.db import connect_pool
from labbus.events.http_auth import document
from labbus.events.tokens import TokenVerifier
from labbus.producers.http_gateway import (
    commands,
    experiments,
    keys,
    samples,
    service_requests,
)
from labbus.producers.http_gateway.issuer import JWKS_PATH, TOKEN_PATH, InvalidGrant, Issuer

TOKEN_REQUESTS = Counter("labbus_gateway_token_requests_total",
                         "POST /auth/token answers by outcome", ["outcome"])
TOKEN_SECONDS = Histogram("labbus_gateway_token_seconds",
                          "Time to answer POST /auth/token (the password hash dominates)",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 section 5.1


class TokenResponse(BaseModel):
    access_token: str = Field(description="A signed JWT (ES256) to send as "
                                          "`Authorization: Bearer <token>`.")
    token_type: str = Field(description="Always `bearer`.")
    expires_in: int = Field(description="Seconds the token is valid for.")


class OAuthError(BaseModel):
    error: str = Field(description="invalid_grant, invalid_request or unsupported_grant_type "
                                   "(RFC 6749 section 5.2).")
    error_description: str


class Live(BaseModel):
    status: str


def _oauth_error(error: str, description: str) -> JSONResponse:
    TOKEN_REQUESTS.labels(error).inc()
    return JSONResponse({"error": error, "error_description": description}, status_code=400,
                        headers=NO_STORE)


def create_app(cfg: Config, dsn: str | None = None) -> FastAPI:
    """The app; `dsn` (default LABBUS_POSTGRES_DSN, the writer role: the credentials are out of
    the SELECT-only role's reach) holds the users read model and the credentials."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.db = await connect_pool(dsn or cfg.postgres_dsn, "LABBUS_POSTGRES_DSN")
        app.state.verifier = TokenVerifier.from_config(cfg)
        app.state.publisher = commands.Publisher(cfg)
        app.state.on_denied = commands.publish_denied  # 403s become AccessDenied events
        try:
            if cfg.auth_built_in:
                key = keys.load_or_create(cfg.auth_keys_dir)
                app.state.issuer = Issuer.from_config(cfg, key, app.state.db)
            await app.state.publisher.start()
            yield
        finally:
            await app.state.publisher.stop()
            await app.state.verifier.aclose()
            await app.state.db.close()

    app = FastAPI(title="labbus command gateway", lifespan=lifespan,
                  description="Commands in, events out; and, for a lab without an identity "
                              "provider, the built-in token issuer.")
    commands.add_routes(app, cfg)
    experiments.add_routes(app, cfg)
    service_requests.add_routes(app, cfg)
    samples.add_routes(app, cfg)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path == TOKEN_PATH:
            fields = sorted({str(e["loc"][-1]) for e in exc.errors()})
            if "grant_type" in fields:
                return _oauth_error("unsupported_grant_type", "grant_type must be `password`")
            return _oauth_error("invalid_request", "missing or malformed form field(s): "
                                + ", ".join(fields))
        return await request_validation_exception_handler(request, exc)

    if cfg.auth_built_in:
        @app.post(TOKEN_PATH, summary="A token for an email and a password (OAuth2 password "
                                      "flow)", operation_id="token", response_model=TokenResponse,
                  responses={400: {"model": OAuthError,
                                   "description": "Wrong credentials, a disabled user, a user "
                                                  "with no role, or a malformed request."}},
                  tags=["identity"])
        async def token(form: Annotated[OAuth2PasswordRequestForm, Depends()],
                        request: Request) -> JSONResponse:
            started = time.perf_counter()
            if form.grant_type not in (None, "password"):
                return _oauth_error("unsupported_grant_type", "grant_type must be `password`")
            try:
                body = await request.app.state.issuer.password_grant(form.username,
                                                                     form.password)
            except InvalidGrant as exc:
                return _oauth_error("invalid_grant", str(exc))
            except UNAVAILABLE:
                TOKEN_REQUESTS.labels("unavailable").inc()
                return JSONResponse({"error": "temporarily_unavailable",
                                     "error_description": "the users database does not answer"},
                                    status_code=503, headers={**NO_STORE, "Retry-After": "5"})
            finally:
                TOKEN_SECONDS.observe(time.perf_counter() - started)
            TOKEN_REQUESTS.labels("issued").inc()
            return JSONResponse(body, headers=NO_STORE)

        @app.get(JWKS_PATH, summary="The issuer's public signing keys (JWKS)",
                 operation_id="jwks", tags=["identity"])
        async def jwks(request: Request) -> JSONResponse:
            return JSONResponse(request.app.state.issuer.jwks(),
                                headers={"Cache-Control": "public, max-age=300"})

        @app.get("/.well-known/openid-configuration", summary="The issuer's metadata (OIDC "
                                                              "discovery)",
                 operation_id="openid_configuration", tags=["identity"])
        async def discovery(request: Request) -> JSONResponse:
            return JSONResponse(request.app.state.issuer.discovery(),
                                headers={"Cache-Control": "public, max-age=300"})

    @app.get("/health/live", summary="The process is up", operation_id="live",
             response_model=Live)
    async def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready", summary="PostgreSQL (users and credentials) answers",
             operation_id="ready", response_model=Live,
             responses={503: {"model": Live, "description": "PostgreSQL does not answer."}})
    async def ready(request: Request) -> JSONResponse:
        try:
            await asyncio.wait_for(request.app.state.db.fetchval("SELECT 1"), 2.0)
        except UNAVAILABLE:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    document(app, "Problem")
    return app
