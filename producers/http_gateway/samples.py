"""The command gateway's LIMS route: `POST /samples` registers a sample the lab received
(publishes SampleRegistered on lab.testing.samples, registered by the token's subject, with the
caller as actor). `service-request:submit` (engineer, operator): the LIMS integration runs with
such a user's token.

What the gateway judges is the body's shape (422). How a registration relates to service
requests is the testing processor's rule (processors/testing_logic.py `sample_problems`): a
request may name only registered samples, of its customer, module type and area; a request that
names another is rejected with the reason (ServiceRequestRejected). A sample registered again
(the LIMS correcting its record) replaces the registration for the requests submitted after.

`Idempotency-Key`: within this process's memory a retry publishes nothing and gets the first
answer (409 for the key with another body); the event id derives from the sample and what is
registered, so a retry after a restart publishes the same event id, which consumers drop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import AwareDatetime, BaseModel, Field, field_validator

from labbus.events.config import Config
from labbus.events.identity import Principal
from labbus.events.model import register_sample
from labbus.producers.http_gateway.commands import (
    PROCESS,
    REFUSALS,
    Answered,
    IdempotencyKey,
    actor_of,
)
from labbus.producers.http_gateway.service_requests import ID, SUBMIT


class SampleRegistration(BaseModel):
    sample_id: str = Field(pattern=ID, description="The lab's id of the sample: what service "
                                                   "requests and instruments name.")
    lims_ref: str = Field(min_length=1, max_length=200,
                          description="The LIMS's own reference of the sample.")
    customer: str = Field(min_length=1, max_length=200)
    module_type: str = Field(min_length=1, max_length=200,
                             description="The module model (a CEC database name for the "
                                         "simulated instruments).")
    module_area_m2: float = Field(gt=0, le=10, description="Module area, m².")
    serial_number: str = Field(min_length=1, max_length=200,
                               description="The module's serial number as labelled.")
    received_at: AwareDatetime = Field(description="When the lab received it (RFC 3339 with "
                                                   "its offset).")

    @field_validator("received_at", mode="before")
    @classmethod
    def _rfc3339_text(cls, value: Any) -> Any:
        # pydantic would take a number as Unix time, which the schema (a date-time string) does
        # not say
        if isinstance(value, int | float):
            raise ValueError("must be an RFC 3339 date-time string, not a number")
        return value


class SampleAccepted(BaseModel):
    event_id: str = Field(description="The id of the SampleRegistered published.")
    sample_id: str
    location: str = Field(description="Where the query API shows the sample.")


def add_routes(app: FastAPI, cfg: Config) -> None:
    answered = Answered()
    responses: dict[int | str, dict[str, Any]] = dict(REFUSALS)

    @app.post("/samples", status_code=202, response_model=SampleAccepted, responses=responses,
              summary="Register a sample the lab received (publishes SampleRegistered)",
              operation_id="register_sample", tags=["testing"])
    async def register(body: SampleRegistration, request: Request, response: Response,
                       principal: Annotated[Principal, Depends(SUBMIT)],
                       idempotency_key: IdempotencyKey = None) -> dict:
        asked = body.model_dump(mode="json")

        async def publish() -> dict:
            event = register_sample(
                body.sample_id, body.lims_ref, body.customer, body.module_type,
                body.module_area_m2, body.serial_number, body.received_at, principal.user_id,
                source=PROCESS, actor=actor_of(principal, request))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "sample_id": body.sample_id,
                    "location": f"{cfg.query_api_url}/samples/{body.sample_id}"}

        return await answered.once(("sample", principal.user_id, idempotency_key), asked,
                                   idempotency_key, publish, response)
