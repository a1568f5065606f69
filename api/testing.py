"""The query API's routes of the testing lab (issue 11): samples as the LIMS registered them,
service requests with their samples' registrations, executions, verdicts, per-criterion results,
non-conformances and reports (PostgreSQL, migrations 0009 and 0010), the reports' files (the
artifact store), and the shipped protocol templates.

Every route needs `read:all` (`READ_ALL`: admins, viewers, engineers, operators): a service
request is a customer's order to the lab and its results are the lab's records, not one user's,
so like devices and their readings they are for the roles that read everything. Researchers and
students (`read:own`) get 403: nothing of the testing lab is theirs.

The reports' files are read from the artifact store (`events.artifacts`) the `reports` row
names: `gridfs://<db>/<bucket>/<sha256>` (`gridfs:<sha256>`: the API's database, bucket
`artifacts`) in the Mongo server the API reads, or `file:///...` (a `FileStore` directory). The
stores are synchronous (pymongo's GridFS), so the API reads them in a worker thread, with a
synchronous client of its own (`app.state.mongo_sync`) beside its asyncio one; the bytes are
verified against their sha256 as they are read.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from labbus.api import cursor, errors, models
from labbus.api.app import _EARLIEST, Cursor, Limit, ReadsAll, _links, _page, _unstorable
from labbus.events import artifacts
from labbus.events.config import Config
from labbus.events.protocols import shipped_catalog

SERVICE_REQUESTS_KEY = cursor.Key.of(request_id=str)
SAMPLES_KEY = cursor.Key.of(sample_id=str)
NON_CONFORMANCES_KEY = cursor.Key.of(raised_at=datetime, nc_id=str)

RequestId = Annotated[str, PathParam(description="A service request id.")]
SampleId = Annotated[str, PathParam(description="A sample id.")]
ProtocolId = Annotated[str, PathParam(description="A protocol template id, e.g. PVTP-003.")]

# the media type each report format is served with
MEDIA_TYPES = {"pdf": "application/pdf",
               "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
               "csv": "text/csv"}

_FIRST_REQUEST = {"request_id": "items/0/request_id"}

_REQUEST_COLUMNS = """r.request_id, r.status, r.customer, r.module_type, r.module_area_m2,
    r.sample_ids, r.protocols, r.submitted_by, r.submitted_at, r.rejection_reasons, r.verdict,
    r.finished_at, r.updated_at, c.total, c.running, c.passed, c.failed"""
_COUNTS = """LEFT JOIN LATERAL (
    SELECT count(*)::int AS total,
           count(*) FILTER (WHERE x.status_rank < 2)::int AS running,
           count(*) FILTER (WHERE x.status = 'passed')::int AS passed,
           count(*) FILTER (WHERE x.status = 'failed')::int AS failed
    FROM executions x WHERE x.request_id = r.request_id) c ON true"""
_EXECUTION_COLUMNS = """execution_id, sample_id, protocol_id, template_version, template_sha256,
    inputs, status, verdict, qc_verdict, reason_code, reason, steps, results, units, problems,
    criteria, entered, assigned_at, started_at, analysed_at, finished_at, abort_requested_by,
    abort_reason, abort_requested_at"""
_SAMPLE_COLUMNS = """sample_id, lims_ref, customer, module_type, module_area_m2, serial_number,
    received_at, registered_by, registered_at, registrations"""
_NC_COLUMNS = """nc_id, request_id, execution_id, sample_id, protocol_id, template_version,
    criteria, description, raised_at"""


def _request(row) -> dict:
    body = {k: row[k] for k in row.keys() if k not in ("total", "running", "passed", "failed")}
    body["counts"] = {k: row[k] for k in ("total", "running", "passed", "failed")}
    return body


def _report(row) -> dict:
    body = dict(row)
    del body["location"]
    body["url"] = f"/service-requests/{row['request_id']}/report.{row['format']}"
    del body["request_id"]
    return body


def store_for(location: str, mongo_sync, default_db: str) -> artifacts.ArtifactStore:
    """The artifact store a report's `location` names (see the module's docstring); ValueError
    for one it does not know."""
    if location.startswith("gridfs:") and not location.startswith("gridfs://"):
        return artifacts.GridFSStore(mongo_sync[default_db])
    parts = urlsplit(location)
    if parts.scheme == "gridfs":
        path = [p for p in parts.path.split("/") if p]
        if not parts.netloc or len(path) != 2:
            raise ValueError(f"not a gridfs://<db>/<bucket>/<sha256> location: {location!r}")
        return artifacts.GridFSStore(mongo_sync[parts.netloc], bucket=path[0])
    if parts.scheme == "file":
        # <root>/ab/cd/<sha256> (FileStore.path)
        return artifacts.FileStore(Path(unquote(parts.path)).parent.parent.parent)
    raise ValueError(f"an artifact location of no known store: {location!r}")


def register(app: FastAPI, cfg: Config) -> None:
    """Add the testing lab's routes to the query API."""

    @app.get("/samples", summary="List the samples the LIMS registered",
             description="Ordered by sample id; cursor-paginated. Each with its latest "
                         "registration.",
             operation_id="list_samples", response_model=models.SamplePage,
             responses=_links("list_samples", get_sample={"sample_id": "items/0/sample_id"})
             | errors.responses(400, 422, 503))
    async def list_samples(
        request: Request,
        _: ReadsAll,
        customer: Annotated[str | None, Query(
            description="Only this customer's samples (exact).")] = None,
        lims_ref: Annotated[str | None, Query(
            description="Only the sample of this LIMS reference (exact).")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after = SAMPLES_KEY.decode(cursor_)[0] if cursor_ else ""
        if _unstorable(customer) or _unstorable(lims_ref):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_SAMPLE_COLUMNS} FROM samples
                WHERE sample_id > $1 AND ($2::text IS NULL OR customer = $2)
                  AND ($3::text IS NULL OR lims_ref = $3)
                ORDER BY sample_id LIMIT $4""", after, customer, lims_ref, limit + 1)
        return _page(rows, limit, SAMPLES_KEY)

    @app.get("/samples/{sample_id}",
             summary="One sample: its registration, the service requests naming it and its "
                     "executions",
             operation_id="get_sample", response_model=models.SampleDetail,
             responses=errors.responses(404, 422, 503))
    async def get_sample(request: Request, sample_id: SampleId, _: ReadsAll) -> dict:
        pg = request.app.state.pg
        row = None if _unstorable(sample_id) else await pg.fetchrow(
            f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE sample_id = $1", sample_id)
        if row is None:
            raise HTTPException(404, f"no sample {sample_id!r} (a sample just registered shows "
                                     "within a second)")
        body = dict(row)
        body["service_requests"] = [dict(r) for r in await pg.fetch(
            """SELECT request_id, status, customer, verdict, rejection_reasons, submitted_at
               FROM service_requests
               WHERE sample_ids @> ARRAY[$1::text] AND submitted_at IS NOT NULL
               ORDER BY submitted_at, request_id""", sample_id)]
        body["executions"] = [dict(r) for r in await pg.fetch(
            """SELECT execution_id, request_id, protocol_id, template_version, status, verdict,
                      reason_code, finished_at
               FROM executions WHERE sample_id = $1
               ORDER BY request_id, protocol_id, template_version, execution_id""", sample_id)]
        return body

    @app.get("/service-requests", summary="List test service requests",
             description="Ordered by request id; cursor-paginated. `counts` are those of its "
                         "executions as projected now.",
             operation_id="list_service_requests", response_model=models.ServiceRequestPage,
             responses=_links("list_service_requests", get_service_request=_FIRST_REQUEST,
                              list_non_conformances={"request": "items/0/request_id"})
             | errors.responses(400, 422, 503))
    async def list_service_requests(
        request: Request,
        _: ReadsAll,
        status: Annotated[models.ServiceRequestStatus | None, Query(
            description="Only requests whose current status is this one.")] = None,
        customer: Annotated[str | None, Query(
            description="Only this customer's requests (exact).")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after = SERVICE_REQUESTS_KEY.decode(cursor_)[0] if cursor_ else ""
        if _unstorable(customer):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_REQUEST_COLUMNS} FROM service_requests r {_COUNTS}
                WHERE r.submitted_at IS NOT NULL AND r.request_id > $1
                  AND ($2::text IS NULL OR r.status = $2)
                  AND ($3::text IS NULL OR r.customer = $3)
                ORDER BY r.request_id LIMIT $4""", after, status, customer, limit + 1)
        return _page(rows, limit, SERVICE_REQUESTS_KEY, _request)

    @app.get("/service-requests/{request_id}",
             summary="One service request: its executions with their verdicts and criteria, "
                     "non-conformances and reports",
             operation_id="get_service_request", response_model=models.ServiceRequestDetail,
             responses=_links("get_service_request",
                              **{f"service_request_report_{f}": {"request_id": "request_id"}
                                 for f in MEDIA_TYPES})
             | errors.responses(404, 422, 503))
    async def get_service_request(request: Request, request_id: RequestId, _: ReadsAll) -> dict:
        pg = request.app.state.pg
        row = None if _unstorable(request_id) else await pg.fetchrow(
            f"""SELECT {_REQUEST_COLUMNS}, r.inspections FROM service_requests r {_COUNTS}
                WHERE r.request_id = $1 AND r.submitted_at IS NOT NULL""", request_id)
        if row is None:
            raise HTTPException(404, f"no service request {request_id!r}")
        body = _request(row)
        registered = {r["sample_id"]: dict(r) for r in await pg.fetch(
            f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE sample_id = ANY($1::text[])",
            body["sample_ids"])}
        body["samples"] = [{"sample_id": sid, "registration": registered.get(sid)}
                           for sid in body["sample_ids"]]
        body["inspections"] = sorted(body.pop("inspections").values(),
                                     key=lambda i: (i["at"], i["sample_id"]))
        body["executions"] = [dict(r) for r in await pg.fetch(
            f"""SELECT {_EXECUTION_COLUMNS} FROM executions WHERE request_id = $1
                ORDER BY sample_id, protocol_id, template_version, execution_id""", request_id)]
        body["non_conformances"] = [dict(r) for r in await pg.fetch(
            f"""SELECT {_NC_COLUMNS} FROM non_conformances WHERE request_id = $1
                ORDER BY raised_at, nc_id""", request_id)]
        body["reports"] = [_report(r) for r in await pg.fetch(
            """SELECT * FROM reports WHERE request_id = $1
               ORDER BY array_position(ARRAY['pdf', 'xlsx', 'csv'], format)""", request_id)]
        return body

    def report_route(fmt: str) -> None:
        media = MEDIA_TYPES[fmt]

        @app.get(f"/service-requests/{{request_id}}/report.{fmt}",
                 summary=f"The request's {fmt.upper()} report",
                 description="The latest generated, as stored (404 until it is generated).",
                 operation_id=f"service_request_report_{fmt}", response_class=Response,
                 responses={200: {"description": f"The {fmt.upper()} file.",
                                  "content": {media: {"schema": {"type": "string",
                                                                 "format": "binary"}}}}}
                 | errors.responses(404, 422, 503))
        async def report(request: Request, request_id: RequestId, _: ReadsAll) -> Response:
            row = None if _unstorable(request_id) else await request.app.state.pg.fetchrow(
                "SELECT name, sha256, location FROM reports WHERE request_id = $1 "
                "AND format = $2", request_id, fmt)
            if row is None:
                raise HTTPException(404, f"no {fmt} report of service request {request_id!r} "
                                         "(none generated yet, or no such request)")
            try:
                store = store_for(row["location"], request.app.state.mongo_sync, cfg.mongo_db)
                data = await asyncio.to_thread(store.get, row["sha256"])
            except (ValueError, artifacts.ArtifactNotFound) as exc:
                raise HTTPException(404, f"the {fmt} report of {request_id!r} is not in the "
                                         f"artifact store: {exc}") from None
            except artifacts.ArtifactCorrupt as exc:
                raise HTTPException(503, f"the stored {fmt} report is corrupt: {exc}") from None
            filename = row["name"].replace('"', "")
            return Response(data, media_type=media, headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "ETag": f'"{row["sha256"]}"'})

    for fmt in MEDIA_TYPES:
        report_route(fmt)

    @app.get("/non-conformances", summary="Non-conformances raised by failed executions",
             description="Ordered by the time they were raised, then id, oldest first; "
                         "cursor-paginated.",
             operation_id="list_non_conformances", response_model=models.NonConformancePage,
             responses=_links("list_non_conformances",
                              get_service_request={"request_id": "items/0/request_id"})
             | errors.responses(400, 422, 503))
    async def list_non_conformances(
        request: Request,
        _: ReadsAll,
        request_: Annotated[str | None, Query(
            alias="request", description="Only this service request's.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after_t, after_id = NON_CONFORMANCES_KEY.decode(cursor_) if cursor_ else (_EARLIEST, "")
        if _unstorable(request_):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_NC_COLUMNS} FROM non_conformances
                WHERE ($1::text IS NULL OR request_id = $1) AND (raised_at, nc_id) > ($2, $3)
                ORDER BY raised_at, nc_id LIMIT $4""", request_, after_t, after_id, limit + 1)
        return _page(rows, limit, NON_CONFORMANCES_KEY)

    @app.get("/protocols", summary="The test protocol templates and their versions",
             description="The templates this labbus ships (schemas/protocols), each with every "
                         "version and its content hash.",
             operation_id="list_protocols", response_model=models.ProtocolList,
             responses=_links("list_protocols",
                              get_protocol={"protocol_id": "items/0/protocol_id"}))
    async def list_protocols(_: ReadsAll) -> dict:
        catalog = shipped_catalog()
        items = []
        for pid in catalog.ids():
            latest = catalog.latest(pid)
            items.append({
                "protocol_id": pid, "title": latest.title, "latest_version": latest.version,
                "standard": dict(latest.document.get("standard") or {}),
                "versions": [{"version": t.version, "title": t.title, "sha256": t.sha256}
                             for t in (catalog.get(pid, v) for v in catalog.versions(pid))]})
        return {"items": items}

    @app.get("/protocols/{protocol_id}", summary="One protocol template, every version in full",
             operation_id="get_protocol", response_model=models.ProtocolDetail,
             responses=errors.responses(404, 422))
    async def get_protocol(protocol_id: ProtocolId, _: ReadsAll) -> dict:
        catalog = shipped_catalog()
        versions = catalog.versions(protocol_id)
        if not versions:
            raise HTTPException(404, f"no protocol {protocol_id!r}")
        return {"protocol_id": protocol_id, "latest_version": versions[-1],
                "versions": [{"version": t.version, "title": t.title, "sha256": t.sha256,
                              "template": dict(t.document)}
                             for t in (catalog.get(protocol_id, v) for v in versions)]}
