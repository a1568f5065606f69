-- Device status, commands and alerts (issue 9). Every row is written by idempotent upserts that
-- touch only what their event knows, so the topics may be projected in any relative order.

-- A device's row may now be made by its status or heartbeats before its registration arrives
-- (another topic): the registration's columns are NULL until then, and device_overview (the
-- listing) shows registered devices only.
ALTER TABLE devices
    ALTER COLUMN device_type DROP NOT NULL,
    ALTER COLUMN model DROP NOT NULL,
    ALTER COLUMN location DROP NOT NULL,
    ALTER COLUMN metrics DROP NOT NULL,
    ALTER COLUMN registered_at DROP NOT NULL,
    ALTER COLUMN last_event_id DROP NOT NULL,
    -- DeviceRegistered v2: [{metric, unit, min, max, expected_interval_s}], version n
    ADD COLUMN specs jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN spec_version integer NOT NULL DEFAULT 1,
    -- the latest DeviceStatusChanged in log order (one device's are on one partition)
    ADD COLUMN status text,
    ADD COLUMN status_reason text,
    ADD COLUMN status_at timestamptz,
    ADD COLUMN status_event_id uuid,
    ADD COLUMN status_offset bigint,
    -- the latest DeviceHeartbeat's time; never moves backwards
    ADD COLUMN last_heartbeat_at timestamptz;

CREATE INDEX devices_by_status ON devices (status, device_id);
CREATE INDEX devices_by_type ON devices (device_type, device_id);

DROP VIEW device_overview;
CREATE VIEW device_overview AS
SELECT d.device_id, d.device_type, d.model, d.location, d.metrics, d.attributes, d.registered_at,
       d.specs, d.spec_version, d.status, d.status_reason, d.status_at, d.last_heartbeat_at
FROM devices d
WHERE d.registered_at IS NOT NULL;

-- Every DeviceStatusChanged, once (by event id).
CREATE TABLE device_status_history (
    event_id          uuid PRIMARY KEY,
    device_id         text NOT NULL,
    status            text NOT NULL,
    reason            text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    source            text NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint NOT NULL
);
CREATE INDEX device_status_history_by_device
    ON device_status_history (device_id, source_offset DESC, event_id);

-- One row per command. `status` is the highest-ranked status any of its events gave it
-- (projections/postgres_devices.py COMMAND_RANK), so the row is the same whatever order its
-- events are projected in.
CREATE TABLE commands (
    command_id        text PRIMARY KEY,
    device_id         text NOT NULL,
    idempotency_key   text,
    command_type      text,
    payload           jsonb,
    issued_by         text,
    issued_at         timestamptz,
    expires_at        timestamptz,
    status            text NOT NULL,
    status_rank       smallint NOT NULL,
    status_at         timestamptz NOT NULL,
    status_event_id   uuid NOT NULL,
    progress          double precision,
    result            jsonb,
    error             text,
    reason_code       text,
    reason            text,
    first_at          timestamptz NOT NULL,  -- the earliest event's time: issued_at when known
    updated_at        timestamptz NOT NULL   -- the latest event's time
);
CREATE INDEX commands_by_first ON commands (first_at DESC, command_id DESC);
CREATE INDEX commands_by_device ON commands (device_id, first_at DESC, command_id DESC);
CREATE INDEX commands_by_status ON commands (status, first_at DESC, command_id DESC);

-- Every event of every command, once (by event id): the full status history.
CREATE TABLE command_events (
    event_id          uuid PRIMARY KEY,
    command_id        text NOT NULL,
    device_id         text NOT NULL,
    status            text NOT NULL,
    status_rank       smallint NOT NULL,
    occurred_at       timestamptz NOT NULL,
    source            text NOT NULL,
    detail            jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX command_events_by_command ON command_events (command_id, occurred_at, status_rank);

-- One row per AnomalyDetected (by event id).
CREATE TABLE alerts (
    alert_id          uuid PRIMARY KEY,
    device_id         text NOT NULL,
    metric            text NOT NULL,
    value             double precision NOT NULL,
    unit              text NOT NULL,
    measured_at       timestamptz NOT NULL,
    measurement_id    uuid NOT NULL,
    rule              text NOT NULL,
    score             double precision NOT NULL,
    threshold         double precision NOT NULL,
    window_mean       double precision NOT NULL,
    window_stddev     double precision NOT NULL,
    window_count      bigint NOT NULL,
    detected_at       timestamptz NOT NULL,
    source            text NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (detected_at, alert_id);
CREATE INDEX alerts_by_device ON alerts (device_id, detected_at, alert_id);
