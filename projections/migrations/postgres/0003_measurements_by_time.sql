-- Measurements partitioned by time: RANGE on measured_at, one partition per UTC day
-- (measurements_pYYYYMMDD) plus a DEFAULT partition, so that a reading outside the created days is
-- never refused. Partitions are created ahead and dropped after the retention by
-- projections/partitions.py (the PostgreSQL projector, hourly, and `labbus db partitions`).
--
-- A partitioned table's primary key must hold the partition key: (measurement_id, measured_at).
-- A measurement id always comes with the same measured_at (both derive from one recorded event),
-- so the projector's ON CONFLICT (measurement_id, measured_at) DO NOTHING still drops replays.
ALTER TABLE measurements RENAME TO measurements_unpartitioned;
ALTER TABLE measurements_unpartitioned
    RENAME CONSTRAINT measurements_pkey TO measurements_unpartitioned_pkey;
DROP INDEX measurements_by_device_time;
DROP INDEX measurements_by_device_metric_time;

CREATE TABLE measurements (
    measurement_id      uuid NOT NULL,
    device_id           text NOT NULL,
    metric              text NOT NULL,
    value               double precision NOT NULL,
    unit                text NOT NULL,
    measured_at         timestamptz NOT NULL,
    validated_event_id  uuid NOT NULL,
    source_partition    integer NOT NULL,
    source_offset       bigint NOT NULL,
    projected_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (measurement_id, measured_at)
) PARTITION BY RANGE (measured_at);

-- Raw pages of one device (all metrics), in (measured_at, measurement_id) order.
CREATE INDEX measurements_by_device_time ON measurements (device_id, measured_at, measurement_id);
-- Raw pages of one device and metric, and bucketed aggregates: `value` is included so that an
-- aggregate over a time range is an index-only scan of one partition's index.
CREATE INDEX measurements_by_device_metric_time
    ON measurements (device_id, metric, measured_at, measurement_id) INCLUDE (value);

CREATE TABLE measurements_default PARTITION OF measurements DEFAULT;

-- The partition of one UTC day, created when missing; rows of that day waiting in the default
-- partition are moved into it first (a partition cannot be attached while the default holds rows
-- of its range). Returns the partition's name and the rows moved; NULL name when it existed.
-- Inserts wait until the commit (quick while the default holds few rows): SHARE ROW EXCLUSIVE on
-- the table lets no insert start meanwhile, so none is routed by the partitions as they were
-- before (one routed to the default partition would violate its new constraint); reads go on,
-- except of the default partition, which ATTACH locks.
CREATE FUNCTION labbus_measurements_partition(day date, OUT created text, OUT moved bigint)
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'measurements_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    moved := 0;
    -- conflicts with itself (one maintainer at a time) and with inserts, not with reads
    LOCK TABLE measurements IN SHARE ROW EXCLUSIVE MODE;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN;
    END IF;
    LOCK TABLE measurements_default IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE %I (LIKE measurements INCLUDING DEFAULTS)', part);
    EXECUTE format('WITH m AS (DELETE FROM measurements_default '
                   'WHERE measured_at >= $1 AND measured_at < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM m', part) USING lo, hi;
    GET DIAGNOSTICS moved = ROW_COUNT;
    -- the constraint proves the range, so ATTACH does not scan the new table
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (measured_at >= %L AND measured_at < %L)',
                   part, part || '_range', lo, hi);
    EXECUTE format('ALTER TABLE measurements ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    created := part;
END
$$;
REVOKE ALL ON FUNCTION labbus_measurements_partition(date) FROM PUBLIC;

-- Existing rows: a partition for every day that holds some, then the rows (routed by PostgreSQL).
SELECT labbus_measurements_partition(d)
FROM (SELECT DISTINCT (measured_at AT TIME ZONE 'UTC')::date AS d
      FROM measurements_unpartitioned) AS days;
INSERT INTO measurements (measurement_id, device_id, metric, value, unit, measured_at,
                          validated_event_id, source_partition, source_offset, projected_at)
SELECT measurement_id, device_id, metric, value, unit, measured_at, validated_event_id,
       source_partition, source_offset, projected_at
FROM measurements_unpartitioned;
DROP TABLE measurements_unpartitioned;
