"""One error body for every error answer of the query API, declared in its OpenAPI.

- 422: a parameter does not match its declared schema (type, range, format), as FastAPI
  validates it; `errors` lists each offending parameter.
- 400: the parameters match the schema but cannot be answered: a cursor that this route did not
  issue, `from` after `to`, a bucketed series without its metric/from/to or over its bucket cap,
  `type` and `device_type` that differ.
  (An OpenAPI schema cannot say which strings are cursors.)
- 404: no such device, command, experiment, robot run, service request or protocol; a report
  not generated yet.
- 503: PostgreSQL or MongoDB does not answer.

All are `Error`: `{"detail": "<message>", "errors": [...]}`.
"""

from __future__ import annotations

import logging

import asyncpg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

from labbus.api.cursor import InvalidCursor

log = logging.getLogger(__name__)


class ParameterError(BaseModel):
    loc: list[str | int] = Field(description="Where, e.g. [\"query\", \"limit\"].")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="The kind of error, e.g. \"greater_than_equal\".")


class Error(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="What went wrong, for a human.")
    errors: list[ParameterError] = Field(
        default_factory=list, description="For 422: each parameter that does not match its "
                                          "schema. Empty otherwise.")


_DESCRIPTIONS = {
    400: "Parameters that match the schema but cannot be answered: a cursor this route did not "
         "issue, `from` after `to`, `bucket` without `metric`, `from` and `to` (or with "
         "`cursor`), `agg` without `bucket`, more buckets than a request may have, `type` and "
         "`device_type` that differ.",
    404: "No such resource.",
    422: "A parameter does not match its schema.",
    503: "PostgreSQL or MongoDB does not answer.",
}


def responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` for the given error statuses, all with the `Error` body."""
    return {status: {"model": Error, "description": _DESCRIPTIONS[status]} for status in statuses}


def error(status: int, detail: str, errors: list | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body = Error(detail=detail, errors=errors or [])
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


# The database failures that mean "not available now", as opposed to a bad value.
_PG_UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                   asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                   asyncpg.AdminShutdownError, TimeoutError)


def install(app: FastAPI) -> None:
    """Answer every error with an `Error` body."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        items = [ParameterError(loc=[str(p) if not isinstance(p, int) else p
                                     for p in e.get("loc", ())],
                                msg=str(e.get("msg", "")), type=str(e.get("type", "")))
                 for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in i.loc[1:]) or i.loc}: {i.msg}"
                           for i in items)
        return error(422, f"invalid parameters: {detail}",
                     [jsonable_encoder(i) for i in items])

    @app.exception_handler(InvalidCursor)
    async def bad_cursor(request: Request, exc: InvalidCursor) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(asyncpg.DataError)
    async def bad_value(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        # a value of the declared type that PostgreSQL cannot take (the routes screen the known
        # ones: NUL in text, dates beyond the calendar); a 400 names it rather than a 500
        return error(400, f"invalid parameter: {exc}")

    @app.exception_handler(PyMongoError)
    async def mongo_down(request: Request, exc: PyMongoError) -> JSONResponse:
        log.warning("MongoDB error", extra={"error": repr(exc)})
        return error(503, "MongoDB does not answer; try again later")

    for kind in _PG_UNAVAILABLE:
        @app.exception_handler(kind)
        async def pg_down(request: Request, exc: Exception) -> JSONResponse:
            log.warning("PostgreSQL error", extra={"error": repr(exc)})
            return error(503, "PostgreSQL does not answer; try again later")
