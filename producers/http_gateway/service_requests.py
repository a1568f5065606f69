"""The command gateway's test-protocol routes, each publishing one event with the caller as actor:

- `POST /service-requests` (`service-request:submit`) submits a service request
  (ServiceRequestSubmitted, submitted by the token's subject);
- `POST /service-requests/{id}/inspections` (`result:record`) records the visual inspection of
  one of its samples (InspectionRecorded, the token's subject as inspector);
- `POST /executions/{id}/abort` (`execution:abort`) asks the testing processor to abort a
  running execution (ExecutionAbortRequested; it ends as ExecutionFailed `aborted`).

The last two are judged against the read models (the gateway's PostgreSQL, as
`POST /experiments/{id}/cancel`): a request or execution it does not hold is a 404 (one just
submitted shows within a second), a sample not of the request a 400, a rejected request or an
execution that already ended a 409 saying how it ended (an abort of it would change nothing:
the processor leaves an ended execution as it is, also when the read model lagged).

The gateway judges the request against the protocol catalog it ships (unknown protocols, inputs
out of a template's range, repeated samples: a 400 listing every problem, the same reasons the
testing processor would reject it with); the testing processor runs it. `Idempotency-Key`: the
request id derives from (caller, key), so a retried POST is the same request.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field

from labbus.events.config import Config
from labbus.events.http_auth import Guard
from labbus.events.identity import Principal
from labbus.events.model import (
    InspectionRecorded,
    derived_id,
    request_abort,
    submit_service_request,
)
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
RECORD = Guard("result:record")
ABORT = Guard("execution:abort")
ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
URI = r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$"
Text = Annotated[str, Field(min_length=1, max_length=500)]


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


class Inspection(BaseModel):
    sample_id: str = Field(pattern=ID, description="One of the request's samples.")
    findings: list[Text] = Field(default_factory=list, max_length=50,
                                 description="What the inspector saw, e.g. 'frame intact'.")
    defects: list[Text] = Field(default_factory=list, max_length=50,
                                description="Defects found (IEC 61215-1 clause 8 major visual "
                                            "defects, e.g. 'cracked cell'); empty: none.")
    photo_refs: list[Annotated[str, Field(max_length=2000, pattern=URI)]] = Field(
        default_factory=list, max_length=50, description="Where the photos are (URIs).")


class InspectionAccepted(BaseModel):
    event_id: str = Field(description="The id of the InspectionRecorded published.")
    request_id: str
    location: str = Field(description="Where the query API shows the request and its "
                                      "inspections.")


class Abort(BaseModel):
    reason: str = Field(min_length=1, max_length=500,
                        description="Why; the execution's failure reason carries it.")


class AbortAccepted(BaseModel):
    event_id: str = Field(description="The id of the ExecutionAbortRequested published.")
    execution_id: str
    request_id: str
    location: str = Field(description="Where the query API shows the execution (in its "
                                      "service request).")


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

    inspect_refusals: dict[int | str, dict[str, Any]] = {
        **REFUSALS,
        400: {"model": Problem, "description": "A body that cannot be parsed, or a sample that "
                                               "is not one of the request's."},
        404: {"model": Problem, "description": "No such service request (yet)."},
        409: {"model": Problem, "description": "The request was rejected (nothing of it is "
                                               "tested), or the Idempotency-Key was used for "
                                               "another request."}}

    @app.post("/service-requests/{request_id}/inspections", status_code=202,
              response_model=InspectionAccepted, responses=inspect_refusals,
              summary="Record a sample's visual inspection (publishes InspectionRecorded)",
              operation_id="record_inspection", tags=["testing"])
    async def inspect(request_id: Annotated[str, Path(max_length=200)], body: Inspection,
                      request: Request, response: Response,
                      principal: Annotated[Principal, Depends(RECORD)],
                      idempotency_key: IdempotencyKey = None) -> dict:
        asked = body.model_dump()

        async def publish() -> dict:
            row = await request.app.state.db.fetchrow(
                "SELECT status, sample_ids FROM service_requests WHERE request_id = $1 "
                "AND submitted_at IS NOT NULL", request_id)
            if row is None:
                raise HTTPException(404, f"no service request {request_id!r} (a request just "
                                         "submitted shows within a second)")
            if row["status"] == "rejected":
                raise HTTPException(409, f"service request {request_id} was rejected: none of "
                                         "its samples is tested under it")
            if body.sample_id not in row["sample_ids"]:
                raise HTTPException(400, f"sample {body.sample_id} is not one of service request "
                                         f"{request_id}'s samples: "
                                         f"{', '.join(row['sample_ids'])}")
            event_id = uuid.uuid4() if idempotency_key is None else uuid.UUID(derived_id(
                f"service-request/{request_id}",
                f"inspection/{principal.user_id}/{idempotency_key}"))
            event = InspectionRecorded.create(
                source=PROCESS, subject=request_id, sequence=0, event_id=event_id,
                actor=actor_of(principal, request), request_id=request_id,
                sample_id=body.sample_id, inspector=principal.user_id,
                findings=list(body.findings), defects=list(body.defects),
                photo_refs=list(body.photo_refs))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "request_id": request_id,
                    "location": f"{cfg.query_api_url}/service-requests/{request_id}"}

        return await answered.once(("inspection", principal.user_id, request_id,
                                    idempotency_key), asked, idempotency_key, publish, response)

    abort_refusals: dict[int | str, dict[str, Any]] = {
        **REFUSALS,
        404: {"model": Problem, "description": "No such execution (yet)."},
        409: {"model": Problem, "description": "The execution already ended (passed or "
                                               "failed, said how): an abort changes nothing; "
                                               "or the Idempotency-Key was used for another "
                                               "request."}}

    @app.post("/executions/{execution_id}/abort", status_code=202,
              response_model=AbortAccepted, responses=abort_refusals,
              summary="Abort a running test execution (publishes ExecutionAbortRequested)",
              operation_id="abort_execution", tags=["testing"])
    async def abort(execution_id: Annotated[str, Path(max_length=200)], body: Abort,
                    request: Request, response: Response,
                    principal: Annotated[Principal, Depends(ABORT)],
                    idempotency_key: IdempotencyKey = None) -> dict:
        asked = body.model_dump()

        async def publish() -> dict:
            row = await request.app.state.db.fetchrow(
                "SELECT request_id, status, reason_code, finished_at FROM executions "
                "WHERE execution_id = $1", execution_id)
            if row is None:
                raise HTTPException(404, f"no execution {execution_id!r} (one just assigned "
                                         "shows within a second)")
            if row["status"] in ("passed", "failed"):
                how = row["status"] + (f" ({row['reason_code']})" if row["reason_code"] else "")
                raise HTTPException(409, f"execution {execution_id} already ended: {how} at "
                                         f"{row['finished_at'].isoformat()}; an abort changes "
                                         "nothing")
            event = request_abort(execution_id, body.reason, principal.user_id, source=PROCESS,
                                  actor=actor_of(principal, request))
            if idempotency_key is not None:
                event = event.with_envelope(event_id=uuid.UUID(derived_id(
                    execution_id, f"abort/{principal.user_id}/{idempotency_key}")))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "execution_id": execution_id,
                    "request_id": row["request_id"],
                    "location": f"{cfg.query_api_url}/service-requests/{row['request_id']}"}

        return await answered.once(("abort", principal.user_id, execution_id, idempotency_key),
                                   asked, idempotency_key, publish, response)
