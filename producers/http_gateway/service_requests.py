"""The command gateway's test-protocol route: `POST /service-requests` submits a service request
(publishes ServiceRequestSubmitted, submitted by the token's subject, with the caller as actor).

The gateway judges the request against the protocol catalog it ships (unknown protocols, inputs
out of a template's range, repeated samples: a 400 listing every problem, the same reasons the
testing processor would reject it with); the testing processor runs it. `Idempotency-Key`: the
request id derives from (caller, key), so a retried POST is the same request.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field

from labbus.events.config import Config
from labbus.events.http_auth import Guard
from labbus.events.identity import Principal
from labbus.events.model import derived_id, submit_service_request
from labbus.events.protocols import RequestError, resolve_request, shipped_catalog
from labbus.producers.http_gateway.commands import (
    PROCESS,
    REFUSALS,
    Answered,
    IdempotencyKey,
    Problem,
    actor_of,
)

SUBMIT = Guard("service-request:submit")
ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class RequestedProtocol(BaseModel):
    protocol_id: str = Field(min_length=1, max_length=100, description="e.g. PVTP-015.")
    version: int | None = Field(None, ge=1, description="A template version (default: the "
                                                        "latest).")
    inputs: dict[str, float] = Field(default_factory=dict,
                                     description="The template's inputs by name (defaults "
                                                 "apply; module_area_m2 comes from the "
                                                 "request).")


class ServiceRequest(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    module_type: str = Field(min_length=1, max_length=200,
                             description="The module model (a CEC database name for the "
                                         "simulated instruments).")
    module_area_m2: float = Field(gt=0, le=10, description="Module area, m².")
    sample_ids: list[Annotated[str, Field(pattern=ID)]] = Field(min_length=1, max_length=100)
    protocols: list[RequestedProtocol] = Field(min_length=1, max_length=20)


class RequestAccepted(BaseModel):
    event_id: str = Field(description="The id of the ServiceRequestSubmitted published.")
    request_id: str = Field(description="The request's id (follow it at `Location`).")
    location: str = Field(description="Where the query API shows the request.")


def request_id_for(user_id: str, idempotency_key: str | None) -> str:
    """A retried request (same caller, same key) names the same service request."""
    if idempotency_key is None:
        return f"sr-{uuid.uuid4().hex[:12]}"
    return "sr-" + derived_id(f"user/{user_id}", f"service-request/{idempotency_key}")[:13]


def add_routes(app: FastAPI, cfg: Config) -> None:
    answered = Answered()
    responses: dict[int | str, dict[str, Any]] = {**REFUSALS, 400: {
        "model": Problem, "description": "A body that cannot be parsed, or a request the "
                                         "protocol catalog refuses (every reason listed)."}}

    @app.post("/service-requests", status_code=202, response_model=RequestAccepted,
              responses=responses, summary="Submit a test service request (publishes "
                                           "ServiceRequestSubmitted)",
              operation_id="submit_service_request", tags=["testing"])
    async def submit(body: ServiceRequest, request: Request, response: Response,
                     principal: Annotated[Principal, Depends(SUBMIT)],
                     idempotency_key: IdempotencyKey = None) -> dict:
        asked = body.model_dump()

        async def publish() -> dict:
            try:
                resolve_request(shipped_catalog(), body.sample_ids, asked["protocols"],
                                body.module_area_m2)
            except RequestError as exc:
                raise HTTPException(400, "; ".join(exc.problems)) from None
            rid = request_id_for(principal.user_id, idempotency_key)
            event = submit_service_request(
                rid, body.customer, body.module_type, body.module_area_m2, body.sample_ids,
                asked["protocols"], principal.user_id, source=PROCESS,
                actor=actor_of(principal, request))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "request_id": rid,
                    "location": f"{cfg.query_api_url}/service-requests/{rid}"}

        return await answered.once(("service-request", principal.user_id, idempotency_key),
                                   asked, idempotency_key, publish, response)
