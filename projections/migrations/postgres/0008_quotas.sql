-- Quotas of wells (issue 10): the quota processor's reservations and refunds (QuotaReserved,
-- QuotaRefunded on lab.experiments, keyed by experiment id) and each user's balance.
--
-- One user's reservations and refunds are spread over the experiments' partitions, so they are
-- applied as deltas, which add up in any order: `quota_ledger` holds each event once (keyed by
-- event id: a re-emitted event changes nothing) and `users.quota_spent_wells` the sum of its
-- `spent_delta` (+wells for a charged reservation, -wells for a charged refund, 0 for a user
-- without a quota). A ledger row may come before its user's registration (another topic): the
-- registration then starts from the ledger's sum (projections/postgres_users.py).
CREATE TABLE quota_ledger (
    event_id       uuid PRIMARY KEY,
    user_id        text NOT NULL,
    experiment_id  text NOT NULL,
    kind           text NOT NULL,     -- reserved | refunded
    wells          integer NOT NULL,  -- reserved, or given back
    charged        boolean NOT NULL,
    spent_delta    integer NOT NULL,
    remaining      bigint,            -- the balance after it, as the quota processor decided
    occurred_at    timestamptz NOT NULL
);
CREATE INDEX quota_ledger_by_user ON quota_ledger (user_id, occurred_at);

ALTER TABLE users ADD COLUMN quota_spent_wells bigint NOT NULL DEFAULT 0;
-- NULL for a user who is not limited: neither a student nor ever granted a quota (README
-- "Quotas", the rule of processors/quota.py `limited`).
ALTER TABLE users ADD COLUMN quota_remaining bigint GENERATED ALWAYS AS (
    CASE WHEN quota_granted_wells > 0 OR 'student' = ANY (roles)
         THEN quota_granted_wells - quota_spent_wells END) STORED;

-- experiments.status (0002) takes one more value: cancelled (ExperimentCancelled).
