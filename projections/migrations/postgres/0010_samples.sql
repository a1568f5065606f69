-- Test protocols, inbound (issue 11): samples as the lab's LIMS registered them
-- (lab.testing.samples, keyed by sample id), and the abort requests of executions
-- (lab.testing.executions); the SQL each event becomes is projections/postgres_testing.py.

-- One row per sample: its latest registration (by the time it was registered, then event id),
-- as the testing processor judges requests against the latest. Upserts keyed by sample id: a
-- replay changes nothing.
CREATE TABLE samples (
    sample_id          text PRIMARY KEY,
    lims_ref           text NOT NULL,
    customer           text NOT NULL,
    module_type        text NOT NULL,
    module_area_m2     double precision NOT NULL,
    serial_number      text NOT NULL,
    received_at        timestamptz NOT NULL,
    registered_by      text NOT NULL,
    registered_at      timestamptz NOT NULL,
    registrations      integer NOT NULL DEFAULT 1,  -- how many distinct registrations (events)
    event_id           uuid NOT NULL
);
CREATE INDEX samples_by_customer ON samples (customer, sample_id);
CREATE INDEX samples_by_lims_ref ON samples (lims_ref);
-- the requests naming a sample (GET /samples/{id})
CREATE INDEX service_requests_by_sample ON service_requests USING gin (sample_ids);
CREATE INDEX executions_by_sample ON executions (sample_id, request_id);

-- The first abort request of an execution (who, why, when); whether it ended it is the
-- execution's own end: reason_code 'aborted', or how it had ended already.
ALTER TABLE executions
    ADD COLUMN abort_requested_by  text,
    ADD COLUMN abort_reason        text,
    ADD COLUMN abort_requested_at  timestamptz;
