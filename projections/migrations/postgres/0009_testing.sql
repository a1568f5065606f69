-- Test protocols, the read side (issue 11): service requests, their executions (sample x
-- protocol x template version), non-conformances and generated reports, from lab.testing.requests
-- (keyed by request id) and lab.testing.executions (keyed by execution id); the SQL each event
-- becomes is projections/postgres_testing.py.
--
-- Every write is an upsert keyed by ids, so a replay changes nothing. One execution's events
-- share a partition (log order); one request's lie on two topics, so an execution's events may
-- be projected before the request's submission: its row is then made by them (status
-- 'running', the submission's columns NULL until it arrives; listings show submitted rows only).
-- Statuses only move up a rank (`status_rank`), whatever the order.

CREATE TABLE service_requests (
    request_id         text PRIMARY KEY,
    -- submitted (0) < running (1: an execution was assigned) < rejected | completed (2)
    status             text NOT NULL,
    status_rank        smallint NOT NULL,
    customer           text,
    module_type        text,
    module_area_m2     double precision,
    sample_ids         text[],
    protocols          jsonb,             -- as requested: [{protocol_id, version, inputs}]
    submitted_by       text,
    submitted_at       timestamptz,
    submit_event_id    uuid,
    rejection_reasons  text[],
    inspections        jsonb NOT NULL DEFAULT '{}',  -- sample id -> its latest inspection
    verdict            text,              -- pass | fail, from ServiceRequestCompleted
    executions         integer,           -- ServiceRequestCompleted's counts
    passed             integer,
    failed             integer,
    finished_at        timestamptz,       -- rejected or completed
    updated_at         timestamptz NOT NULL
);
CREATE INDEX service_requests_by_status ON service_requests (status, request_id)
    WHERE submitted_at IS NOT NULL;
CREATE INDEX service_requests_by_customer ON service_requests (customer, request_id)
    WHERE submitted_at IS NOT NULL;

CREATE TABLE executions (
    execution_id       text PRIMARY KEY,
    request_id         text NOT NULL,
    sample_id          text NOT NULL,
    protocol_id        text NOT NULL,
    template_version   integer NOT NULL,
    template_sha256    text,              -- from ProtocolAssigned
    inputs             jsonb,
    -- assigned (0) < running (1) < passed | failed (2); the first end stands
    status             text NOT NULL,
    status_rank        smallint NOT NULL,
    verdict            text,              -- pass | fail: the execution's end
    qc_verdict         text,              -- QcEvaluated's verdict
    reason_code        text,              -- ExecutionFailed's
    reason             text,
    steps              text[],
    results            jsonb,             -- ExecutionAnalysed: name -> value
    units              jsonb,             -- name -> unit
    problems           text[],
    criteria           jsonb,             -- QcEvaluated: [{id, value, limit, verdict, ...}]
    entered            jsonb NOT NULL DEFAULT '{}',  -- TestResultRecorded: name -> {value, ...}
    assigned_at        timestamptz,
    started_at         timestamptz,
    analysed_at        timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX executions_by_request ON executions (request_id, sample_id, protocol_id,
                                                  template_version);

CREATE TABLE non_conformances (
    nc_id              text PRIMARY KEY,
    execution_id       text NOT NULL,
    request_id         text NOT NULL,
    sample_id          text NOT NULL,
    protocol_id        text NOT NULL,
    template_version   integer NOT NULL,
    criteria           text[] NOT NULL,
    description        text NOT NULL,
    raised_at          timestamptz NOT NULL,
    event_id           uuid NOT NULL
);
CREATE INDEX non_conformances_by_time ON non_conformances (raised_at, nc_id);
CREATE INDEX non_conformances_by_request ON non_conformances (request_id, raised_at, nc_id);

-- One per request and format; a regenerated report replaces it (the latest by time, then id).
CREATE TABLE reports (
    request_id         text NOT NULL,
    format             text NOT NULL,     -- pdf | xlsx | csv
    name               text NOT NULL,
    content_type       text NOT NULL,
    sha256             text NOT NULL,
    size               bigint NOT NULL,
    location           text NOT NULL,     -- where the artifact store keeps it
    certificate        boolean NOT NULL,
    generated_at       timestamptz NOT NULL,
    event_id           uuid NOT NULL,
    PRIMARY KEY (request_id, format)
);
