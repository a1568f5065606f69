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
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from pydantic import BaseModel, Field

from labbus.events import kafka
from labbus.events.config import Config
from labbus.events.http_auth import Guard
from labbus.events.identity import Principal
from labbus.events.model import AccessDenied, Actor, issue_command
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


def actor_of(principal: Principal, request: Request) -> Actor:
    """Who asks, as the command event carries it (the audit log reads it)."""
    return Actor(principal.user_id, principal.roles,
                 request.client.host if request.client else None,
                 request.headers.get("user-agent"), principal.token_id)


class Answered:
    """The answers to the last REMEMBERED_KEYS requests that carried an Idempotency-Key: a
    retry gets the first answer again and publishes nothing; the same key with another body is
    a 409."""

    def __init__(self) -> None:
        self._answers: collections.OrderedDict[tuple, tuple[dict, dict]] = \
            collections.OrderedDict()

    async def once(self, memo: tuple, asked: dict, key: str | None,
                   publish: Callable[[], Awaitable[dict]], response: Response) -> dict:
        """`publish()`'s answer, or for a retry (same `key` in `memo`, same body `asked`) the
        first answer again without publishing; 409 for the key with another body. The answer's
        `location` is also the `Location` header."""
        if key is not None and memo in self._answers:
            first_asked, answer = self._answers[memo]
            if first_asked != asked:
                raise HTTPException(409, "this Idempotency-Key was used for another request; "
                                         "use a new key for a new request")
        else:
            answer = await publish()
            if key is not None:
                self._answers[memo] = (asked, answer)
                while len(self._answers) > REMEMBERED_KEYS:
                    self._answers.popitem(last=False)
        response.headers["Location"] = answer["location"]
        return answer


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=200)]
# 401, 403 and 503 are documented from the guards (labbus.events.http_auth.document)
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A body that cannot be parsed (not UTF-8 JSON)."},
    409: {"model": Problem, "description": "The Idempotency-Key was used for another request."}}


async def publish_denied(request: Request, principal: Principal,
                         permissions: tuple[str, ...], reason: str) -> None:
    """The gateway's `app.state.on_denied` (http_auth.Guard awaits it before each 403): the
    refusal as an AccessDenied event, for the audit log."""
    await request.app.state.publisher.publish(AccessDenied.create(
        source=PROCESS, subject=principal.user_id, sequence=0,
        actor=actor_of(principal, request), user_id=principal.user_id,
        permission=" or ".join(permissions), request=f"{request.method} {request.url.path}",
        reason=reason))


async def deny(principal: Principal, permission: str, request: Request, reason: str) -> None:
    """A refusal a route decides itself (beyond its guard): published, then 403."""
    await publish_denied(request, principal, (permission,), reason)
    raise HTTPException(403, reason)


def add_routes(app: FastAPI, cfg: Config) -> None:
    answered = Answered()

    @app.post("/commands", status_code=202, response_model=Accepted, responses=REFUSALS,
              summary="Send a command to a device (publishes CommandIssued)",
              operation_id="send_command", tags=["commands"])
    async def send_command(body: DeviceCommand, request: Request, response: Response,
                           principal: Annotated[Principal, Depends(SEND)],
                           idempotency_key: IdempotencyKey = None) -> dict:
        async def publish() -> dict:
            key = f"{principal.user_id}/{idempotency_key}" if idempotency_key else None
            event = issue_command(body.device_id, body.command_type, body.payload,
                                  body.timeout_s, key, principal.user_id, source=PROCESS,
                                  actor=actor_of(principal, request))
            await request.app.state.publisher.publish(event)
            return {"event_id": str(event.event_id), "command_id": event.command_id,
                    "location": f"{cfg.query_api_url}/commands/{event.command_id}"}

        return await answered.once(("command", principal.user_id, body.device_id,
                                    idempotency_key), body.model_dump(), idempotency_key,
                                   publish, response)
