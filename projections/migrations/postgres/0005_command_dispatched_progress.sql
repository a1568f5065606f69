-- CommandDispatched and CommandProgress in the commands read model (issue 9).

-- DISPATCHED ranks between ISSUED and ACCEPTED (projections/postgres_devices.py COMMAND_RANK):
-- the statuses from ACCEPTED on move up one. Set from the status names, so the ranks are those of
-- COMMAND_RANK whatever they were.
UPDATE commands SET status_rank = CASE status
    WHEN 'ISSUED' THEN 1 WHEN 'DISPATCHED' THEN 2 WHEN 'ACCEPTED' THEN 3 WHEN 'STARTED' THEN 4
    WHEN 'TIMED_OUT' THEN 5 WHEN 'REJECTED' THEN 6 WHEN 'COMPLETED' THEN 7 WHEN 'FAILED' THEN 8
    END;
UPDATE command_events SET status_rank = CASE status
    WHEN 'ISSUED' THEN 1 WHEN 'DISPATCHED' THEN 2 WHEN 'ACCEPTED' THEN 3 WHEN 'STARTED' THEN 4
    WHEN 'TIMED_OUT' THEN 5 WHEN 'REJECTED' THEN 6 WHEN 'COMPLETED' THEN 7 WHEN 'FAILED' THEN 8
    END;

-- Which event each history entry is: a CommandProgress is an entry of status STARTED (a command
-- that reports progress runs), told apart from the CommandStarted by its type. The rows written
-- before this migration each came from the one event type of their status.
ALTER TABLE command_events ADD COLUMN event_type text;
UPDATE command_events SET event_type = 'lab.command.Command' || CASE status
    WHEN 'ISSUED' THEN 'Issued' WHEN 'ACCEPTED' THEN 'Accepted' WHEN 'STARTED' THEN 'Started'
    WHEN 'TIMED_OUT' THEN 'TimedOut' WHEN 'REJECTED' THEN 'Rejected'
    WHEN 'COMPLETED' THEN 'Completed' WHEN 'FAILED' THEN 'Failed' END;
ALTER TABLE command_events ALTER COLUMN event_type SET NOT NULL;

-- The latest progress report of a command (a CommandStarted with a progress, or a
-- CommandProgress): the latest by (event time, event id), whatever order they are projected in.
-- `progress` was the highest a CommandStarted reported; it now follows the latest report.
ALTER TABLE commands
    ADD COLUMN remaining_s double precision,
    ADD COLUMN intermediate jsonb,
    ADD COLUMN progress_at timestamptz,
    ADD COLUMN progress_event_id uuid;
UPDATE commands c SET progress = e.progress, progress_at = e.occurred_at,
                      progress_event_id = e.event_id
FROM (SELECT DISTINCT ON (command_id) command_id, event_id, occurred_at,
             (detail->>'progress')::double precision AS progress
      FROM command_events WHERE event_type = 'lab.command.CommandStarted' AND detail ? 'progress'
      ORDER BY command_id, occurred_at DESC, event_id DESC) e
WHERE c.command_id = e.command_id;
