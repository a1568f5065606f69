-- The activity log (issue 10): one row per command event that carries an actor (who asked,
-- from which IP, with which token), and its outcome as the processors decided it. Rows are
-- keyed by the command event's id, so a replay writes nothing new. An outcome can be projected
-- before its request (they may lie on different partitions): such a row has no user yet and
-- the API shows only rows with one.
CREATE TABLE audit (
    event_id        uuid PRIMARY KEY,
    at              timestamptz,
    user_id         text,
    roles           text[],
    client_ip       text,
    user_agent      text,
    token_id        text,
    action          text,
    event_type      text,
    subject         text,
    outcome         text NOT NULL DEFAULT 'requested',
    reason          text,
    outcome_at      timestamptz,
    outcome_event   uuid
);
CREATE INDEX audit_by_time ON audit (at DESC, event_id) WHERE user_id IS NOT NULL;
CREATE INDEX audit_by_user ON audit (user_id, at DESC) WHERE user_id IS NOT NULL;
CREATE INDEX audit_by_action ON audit (action, at DESC) WHERE user_id IS NOT NULL;
