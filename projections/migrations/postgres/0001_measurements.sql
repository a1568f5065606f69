-- Devices and measurements read models, and the projectors' tracking positions.
CREATE TABLE devices (
    device_id      text PRIMARY KEY,
    device_type    text NOT NULL,
    model          text NOT NULL,
    location       text NOT NULL,
    metrics        text[] NOT NULL,
    attributes     jsonb NOT NULL DEFAULT '{}',
    registered_at  timestamptz NOT NULL,
    last_event_id  uuid NOT NULL
);

CREATE TABLE measurements (
    measurement_id      uuid PRIMARY KEY,
    device_id           text NOT NULL,
    metric              text NOT NULL,
    value               double precision NOT NULL,
    unit                text NOT NULL,
    measured_at         timestamptz NOT NULL,
    validated_event_id  uuid NOT NULL,
    source_partition    integer NOT NULL,
    source_offset       bigint NOT NULL,
    projected_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX measurements_by_device_time ON measurements (device_id, measured_at, measurement_id);
CREATE INDEX measurements_by_device_metric_time
    ON measurements (device_id, metric, measured_at, measurement_id);

-- Next offset to read per projection and partition, written in the same transaction as the rows.
CREATE TABLE projection_positions (
    projection   text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

CREATE VIEW device_overview AS
SELECT d.device_id, d.device_type, d.model, d.location, d.metrics, d.attributes, d.registered_at
FROM devices d;
