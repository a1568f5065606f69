"""Bearer tokens on HTTP routes: the one way the query API and the command gateway turn an
`Authorization: Bearer <token>` header into a verified caller, or into a refusal.

A route declares what it needs once, with a `Guard` dependency that carries the permission:

    READ_ALL = Guard("read:all")

    @app.get("/devices")
    async def list_devices(principal: Annotated[Principal, Depends(READ_ALL)]) -> dict: ...

- No token, or one that does not verify (expired, bad signature, another issuer or audience,
  ...): 401 with `WWW-Authenticate: Bearer realm="labbus", error="invalid_token",
  error_description="..."` (RFC 6750 section 3; no `error` when there was no token at all).
- A valid token whose roles grant none of the guard's permissions (or no labbus role at all):
  403 with `error="insufficient_scope"`. What a role may do is `labbus.events.identity.ROLES`;
  no role name appears here or in the routes.
- The issuer's keys cannot be had (none cached): 503.

The refusals are `HTTPException`s, so each app answers them with its own error body. An app that
records refusals (the command gateway publishes them for the audit log) sets
`app.state.on_denied`, an async callable `(request, principal, permissions, reason)` awaited
before a 403 for missing permissions is raised.

`document(app, error_schema)` writes the guards into the app's OpenAPI document: the bearer
security scheme and each guarded operation's `security` come from the dependency (FastAPI), and
this adds each guarded operation's 401 and 403 answers (503 unless the route documents its own)
and its permissions as `x-labbus-permissions`: a client, and the auth matrix test, read from the
document what each route needs.

The verifier is `app.state.verifier` (a `TokenVerifier`, which caches the issuer's keys). An app
whose `app.state.verifier` is None checks nothing: every caller is `UNCHECKED`. Only code that
builds an app itself does that (the query API's `create_app(cfg, auth=False)`, for the benchmark
of what the check costs); no setting of a running process turns the check off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from labbus.events.identity import PERMISSIONS, ROLES, Principal, permissions_of
from labbus.events.tokens import TokenError, TokenVerifier, bearer_token, www_authenticate

SCHEME = HTTPBearer(
    scheme_name="bearer", bearerFormat="JWT", auto_error=False,
    description="A JWT of the lab's OpenID Connect issuer (LABBUS_AUTH_ISSUER) or of the "
                "built-in one (`POST /auth/token` on `labbus gateway http`), sent as "
                "`Authorization: Bearer <token>`.")

# What a caller of an app built without the check may do: everything (every role's permissions).
UNCHECKED = Principal(user_id="", roles=tuple(ROLES))

PERMISSIONS_KEY = "x-labbus-permissions"


class Guard:
    """A FastAPI dependency: the verified caller, if their roles grant any of `permissions`.

    The permissions are the route's declaration (readable from the app, `route_guards`, and
    from its OpenAPI document, `x-labbus-permissions`)."""

    def __init__(self, *permissions: str) -> None:
        unknown = set(permissions) - set(PERMISSIONS)
        if not permissions or unknown:
            raise ValueError(f"a guard needs known permissions, not {permissions!r}")
        self.permissions = permissions

    def __repr__(self) -> str:
        return f"Guard{self.permissions!r}"

    async def __call__(self, request: Request, credentials: HTTPAuthorizationCredentials | None
                       = Security(SCHEME)) -> Principal:
        verifier: TokenVerifier | None = request.app.state.verifier
        if verifier is None:
            return UNCHECKED
        try:
            token = (credentials.credentials if credentials is not None
                     else bearer_token(request.headers.get("authorization")))
            principal = await verifier.verify(token)
        except TokenError as exc:
            raise refusal(exc.status, str(exc), www_authenticate(exc)) from None
        if not principal.permissions.intersection(self.permissions):
            detail = (f"the roles {list(principal.roles)} do not grant "
                      f"{' or '.join(repr(p) for p in self.permissions)}")
            on_denied = getattr(request.app.state, "on_denied", None)
            if on_denied is not None:
                await on_denied(request, principal, self.permissions, detail)
            raise refusal(403, detail, _insufficient(detail))
        return principal


def refusal(status: int, detail: str, challenge: str) -> HTTPException:
    headers = {"WWW-Authenticate": challenge}
    if status == 503:
        headers["Retry-After"] = "5"
    return HTTPException(status, detail, headers=headers)


def _insufficient(detail: str) -> str:
    description = detail.replace('"', "'")
    return f'Bearer realm="labbus", error="insufficient_scope", error_description="{description}"'


def _guards(dependant) -> Iterator[Guard]:
    for dep in dependant.dependencies:
        if isinstance(dep.call, Guard):
            yield dep.call
        yield from _guards(dep)


def route_guards(app: FastAPI) -> list[tuple[str, str, Guard | None]]:
    """(method, path, its guard or None) of every documented route, in the app's order."""
    out = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        guard = next(_guards(route.dependant), None)
        out.extend((method, route.path_format, guard) for method in sorted(route.methods))
    return out


_ANSWERS = {
    401: "No token, or a token that does not verify (expired, not yet valid, bad signature, "
         "unknown key, another issuer or audience, malformed); `WWW-Authenticate` says why.",
    403: "A valid token whose roles do not grant the route's permission "
         f"(`{PERMISSIONS_KEY}`).",
    503: "The issuer's signing keys cannot be fetched and none are cached.",
}


def document(app: FastAPI, error_schema: str) -> None:
    """Declare each guarded route's permissions and its 401/403 (and 503) answers, with the
    body `#/components/schemas/<error_schema>`, in the app's OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        assert error_schema in schema["components"]["schemas"], error_schema
        body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}}
        challenge = {"WWW-Authenticate": {
            "description": "The RFC 6750 challenge: `Bearer realm=\"labbus\"`, with `error` and "
                           "`error_description` when a token was sent.",
            "schema": {"type": "string"}}}
        for method, path, guard in route_guards(app):
            if guard is None:
                continue
            operation = schema["paths"][path][method.lower()]
            operation[PERMISSIONS_KEY] = list(guard.permissions)
            answers = operation.setdefault("responses", {})
            for status, description in _ANSWERS.items():
                answer = {"description": description, "content": body}
                if status in (401, 403):
                    answer["headers"] = challenge
                answers.setdefault(str(status), answer)
        return schema

    app.openapi = openapi


def admitted(roles: tuple[str, ...] | list[str], permissions: list[str] | tuple[str, ...]
             | None) -> bool:
    """Would a caller with `roles` get past a route needing any of `permissions` (None: a public
    route)?"""
    return permissions is None or bool(permissions_of(roles).intersection(permissions))


def routes_markdown(*documents: tuple[str, dict]) -> str:
    """The README's table of which route needs which permission, from (app name, OpenAPI
    document) pairs."""
    lines = ["| app | route | permission (any of) | roles admitted |", "|---|---|---|---|"]
    for name, document in documents:
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                needed = operation.get(PERMISSIONS_KEY)
                route = f"| {name} | `{method.upper()} {path}` |"
                if needed is None:
                    lines.append(f"{route} none (public) | anyone |")
                    continue
                roles = ", ".join(r for r in ROLES if admitted((r,), needed))
                perms = " or ".join(f"`{p}`" for p in needed)
                lines.append(f"{route} {perms} | {roles} |")
    return "\n".join(lines)
