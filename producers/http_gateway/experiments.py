"""The command gateway's campaign routes: `POST /experiments` starts a colour campaign (publishes
ExperimentRequested, requested by the token's subject, with the caller as its actor);
`POST /experiments/{id}/cancel` stops one (ExperimentCancelRequested): one's own campaign with
`experiment:cancel`, anyone's with `read:all` as well (identity.may_act_on), judged against the
experiments read model (404 for an experiment it does not hold yet).

What the gateway checks is what it can judge alone: the permission, the body's shape (422) and
the target colour (a target that does not parse is a 400 here, not a rejection later). Everything
that depends on the log (the user's quota, the dye stocks on the deck, a duplicate id) is judged
by the processors, which answer with ExperimentRejected and a reason, visible at the Location.

`Idempotency-Key`: the experiment id derives from (caller, key) and the event id from what is
asked, so a retried POST is the same request (after a restart as well: consumers drop the repeated
event id); within this process's memory a retry publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field

from labbus.events.colour_target import TargetError, request_experiment
from labbus.events.config import Config
from labbus.events.http_auth import Guard
from labbus.events.identity import Principal, may_act_on
from labbus.events.model import ExperimentCancelRequested, derived_id
from labbus.producers.http_gateway.commands import (
    PROCESS,
    REFUSALS,
    Answered,
    IdempotencyKey,
    Problem,
    actor_of,
    deny,
)

_NUMBER = r"\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*"
# the forms colour_target.parse_target reads (it reads a little more: any float() in rgb()/lab())
TARGET_PATTERN = (r"^(#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})|([lL][aA][bB]|[rR][gG][bB])\("
                  + ",".join([_NUMBER] * 3) + r"\))$")


class CampaignRequest(BaseModel):
    target: str = Field(min_length=1, max_length=100, pattern=TARGET_PATTERN,
                        description="The colour to mix: '#rrggbb' (or '#rgb'), 'rgb(r, g, b)' "
                                    "(0-255) or 'lab(L, a, b)' (L 0-100).")
    dyes: list[str] = Field(min_length=1, max_length=8,
                            description="Dye stocks to mix, in reservoir order.")
    budget_wells: int = Field(24, ge=1, le=96, description="Most wells the campaign may use "
                                                           "(reserved from the caller's quota).")
    batch_size: int = Field(8, ge=1, le=96, description="Wells per robot run.")
    tolerance_de: float = Field(2.0, gt=0, le=100,
                                description="Success when a confirmed ΔE00 is below this.")


class CancelRequest(BaseModel):
    reason: str = Field("cancelled by its requester", min_length=1, max_length=500,
                        description="Why; shown on the experiment.")


class CancelAccepted(BaseModel):
    event_id: str = Field(description="The id of the ExperimentCancelRequested published.")
    experiment_id: str
    location: str = Field(description="Where the query API shows the campaign.")


class CampaignAccepted(BaseModel):
    event_id: str = Field(description="The id of the ExperimentRequested published.")
    experiment_id: str = Field(description="The campaign's id (follow it at `Location`).")
    location: str = Field(description="Where the query API shows the campaign.")


START = Guard("experiment:start")
CANCEL = Guard("experiment:cancel")


def experiment_id_for(user_id: str, idempotency_key: str | None) -> str:
    """A retried request (same caller, same key) names the same experiment."""
    if idempotency_key is None:
        return f"exp-{uuid.uuid4().hex[:12]}"
    return "exp-" + derived_id(f"user/{user_id}", f"experiment/{idempotency_key}")[:13]


def _digest(asked: dict) -> str:
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:32]


def add_routes(app: FastAPI, cfg: Config) -> None:
    answered = Answered()

    @app.post("/experiments", status_code=202, response_model=CampaignAccepted,
              responses={**REFUSALS, 400: {
                  "model": Problem, "description": "A body that cannot be parsed (not UTF-8 "
                                                   "JSON), or a target colour out of range."}},
              summary="Start a colour campaign (publishes ExperimentRequested)",
              operation_id="start_experiment", tags=["experiments"])
    async def start_experiment(body: CampaignRequest, request: Request, response: Response,
                               principal: Annotated[Principal, Depends(START)],
                               idempotency_key: IdempotencyKey = None) -> dict:
        asked = body.model_dump()

        async def publish() -> dict:
            xid = experiment_id_for(principal.user_id, idempotency_key)
            try:
                event = request_experiment(
                    body.target, body.budget_wells, body.batch_size, body.dyes,
                    principal.user_id, body.tolerance_de, xid,
                    actor=actor_of(principal, request), source=PROCESS)
            except TargetError as exc:
                raise HTTPException(400, str(exc)) from None
            event = event.with_envelope(event_id=uuid.UUID(
                derived_id(xid, f"requested/{_digest(asked)}")))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "experiment_id": xid,
                    "location": f"{cfg.query_api_url}/experiments/{xid}"}

        return await answered.once(("experiment", principal.user_id, idempotency_key), asked,
                                   idempotency_key, publish, response)

    cancel_refusals = {**REFUSALS, 404: {"model": Problem,
                                         "description": "No such experiment (yet)."}}

    @app.post("/experiments/{experiment_id}/cancel", status_code=202,
              response_model=CancelAccepted, responses=cancel_refusals,
              summary="Cancel a colour campaign (publishes ExperimentCancelRequested)",
              operation_id="cancel_experiment", tags=["experiments"])
    async def cancel_experiment(experiment_id: Annotated[str, Path(max_length=200)],
                                request: Request, response: Response,
                                principal: Annotated[Principal, Depends(CANCEL)],
                                body: CancelRequest | None = None) -> dict:
        owner = await request.app.state.db.fetchval(
            "SELECT requested_by FROM experiments WHERE experiment_id = $1", experiment_id)
        if owner is None:
            raise HTTPException(404, f"no experiment {experiment_id!r} (a campaign just "
                                     "requested shows within a second)")
        if not may_act_on(principal.roles, "experiment:cancel", principal.user_id, owner):
            await deny(principal, "experiment:cancel", request,
                       f"{experiment_id} was started by someone else; without read:all a "
                       "user may cancel only their own campaigns")
        reason = (body or CancelRequest()).reason
        event = ExperimentCancelRequested.create(
            source=PROCESS, subject=experiment_id, sequence=0, experiment_id=experiment_id,
            reason=reason, requested_by=principal.user_id, actor=actor_of(principal, request))
        await request.app.state.publisher.publish(event)
        location = f"{cfg.query_api_url}/experiments/{experiment_id}"
        response.headers["Location"] = location
        return {"event_id": str(event.event_id), "experiment_id": experiment_id,
                "location": location}
