"""The command gateway's command routes: a caller whose token is verified (the kernel's
`TokenVerifier`, as every entry point) and whose roles hold the permission publishes one command
event through the idempotent acks=all producer, and gets `202 Accepted` with the event's id and
a `Location` on the query API.

- 401 without a token or with a bad one (`WWW-Authenticate` says why, RFC 6750), 403 when the
  roles lack the permission (`SEND`, the kernel's `http_auth.Guard`, as on every route that
  needs a token); the token's subject is the command's `issued_by`.
- `Idempotency-Key`: the command id derives from (device, caller, key), so a retried POST is the
  same command. Within this process's memory (the last 10,000 keys) a retry publishes nothing
  and gets the first answer again (409 if the body differs); after a restart it publishes the
  same event id again, which every consumer drops (the device processor dispatches a command id
  once, and refuses the key with another payload as `idempotency_conflict`).
"""

from __future__ import annotations

import collections
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from pydantic import BaseModel, Field

from labbus.events import kafka
from labbus.events.config import Config
from labbus.events.http_auth import Guard
from labbus.events.identity import Principal
from labbus.events.model import issue_command
from labbus.events.runtime import Deliveries, Step

PROCESS = "gateway-http"
REMEMBERED_KEYS = 10_000
SEND = Guard("command:send")


class DeviceCommand(BaseModel):
    device_id: str = Field(min_length=1, max_length=200, description="The device to command.")
    command_type: str = Field(min_length=1, max_length=200,
                              description="A command its device type knows (JSON Schema per "
                                          "type, schemas/commands/).")
    payload: dict[str, Any] = Field(default_factory=dict, description="The command's arguments.")
    timeout_s: float = Field(30.0, gt=0, le=86400,
                             description="Without a final state by then it is timed out.")


class Accepted(BaseModel):
    event_id: str = Field(description="The id of the event published.")
    command_id: str = Field(description="The command's id (follow it at `Location`).")
    location: str = Field(description="Where the query API shows the command.")


class Problem(BaseModel):
    detail: str


class Publisher:
    """One idempotent acks=all producer for the process's lifetime."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = Step(cfg, PROCESS)
        self.producer = kafka.producer(cfg)

    async def start(self) -> None:
        await kafka.ensure_topics(self.cfg)
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def publish(self, event: Any) -> None:
        sent = Deliveries(self.producer, PROCESS)
        await sent.send(self.step.encode(event))
        await sent.acked()


def add_routes(app: FastAPI, cfg: Config) -> None:
    answered: collections.OrderedDict[tuple, tuple[dict, dict]] = collections.OrderedDict()
    # 401, 403 and 503 are documented from the guard (labbus.events.http_auth.document)
    refusals: dict[int | str, dict[str, Any]] = {
        400: {"model": Problem, "description": "A body that cannot be parsed (not UTF-8 JSON)."},
        409: {"model": Problem, "description": "The Idempotency-Key was used for another "
                                               "request."}}

    @app.post("/commands", status_code=202, response_model=Accepted, responses=refusals,
              summary="Send a command to a device (publishes CommandIssued)",
              operation_id="send_command", tags=["commands"])
    async def send_command(body: DeviceCommand, request: Request, response: Response,
                           principal: Annotated[Principal, Depends(SEND)],
                           idempotency_key: Annotated[str | None, Header(
                               alias="Idempotency-Key", min_length=1, max_length=200)] = None
                           ) -> dict:
        memo = (principal.user_id, body.device_id, idempotency_key)
        asked = body.model_dump()
        if idempotency_key is not None and memo in answered:
            first_asked, answer = answered[memo]
            if first_asked != asked:
                raise HTTPException(409, "this Idempotency-Key was used for another request "
                                         "to this device; use a new key for a new command")
        else:
            key = f"{principal.user_id}/{idempotency_key}" if idempotency_key else None
            event = issue_command(body.device_id, body.command_type, body.payload,
                                  body.timeout_s, key, principal.user_id, source=PROCESS)
            await request.app.state.publisher.publish(event)
            answer = {"event_id": str(event.event_id), "command_id": event.command_id,
                      "location": f"{cfg.query_api_url}/commands/{event.command_id}"}
            if idempotency_key is not None:
                answered[memo] = (asked, answer)
                while len(answered) > REMEMBERED_KEYS:
                    answered.popitem(last=False)
        response.headers["Location"] = answer["location"]
        return answer
