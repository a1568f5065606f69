-- Colour-mixing campaigns: experiments, plate wells, OT-2 runs and their engine commands.
-- Every row is written by idempotent upserts that touch only the columns their event knows, so
-- events of different topics may arrive in any order.
CREATE TABLE experiments (
    experiment_id     text PRIMARY KEY,
    status            text NOT NULL,  -- running | completed | failed | rejected
    target_hex        text,
    target_lab        double precision[],
    dyes              text[],
    budget_wells      integer,
    batch_size        integer,
    tolerance_de      double precision,
    requested_by      text,
    requested_at      timestamptz,
    iterations        integer NOT NULL DEFAULT 0,
    wells_used        integer,
    best_well         text,
    best_volumes      jsonb,
    best_de           double precision,
    reason            text,
    finished_at       timestamptz,
    last_event_id     uuid NOT NULL
);
CREATE INDEX experiments_by_requested_at ON experiments (requested_at, experiment_id);

CREATE TABLE wells (
    experiment_id   text NOT NULL,
    well            text NOT NULL,
    iteration       integer,
    volumes         jsonb,             -- proposed: dye -> µL
    water_ul        double precision,
    run_id          text,
    dispensed       jsonb,             -- what the robot's commands put in: source -> µL
    rgb             integer[],
    lab             double precision[],
    instrument_id   text,
    delta_e         double precision,
    proposed_at     timestamptz,
    dispensed_at    timestamptz,
    measured_at     timestamptz,
    scored_at       timestamptz,
    PRIMARY KEY (experiment_id, well)
);

CREATE TABLE robot_runs (
    run_id          text PRIMARY KEY,
    experiment_id   text NOT NULL,
    iteration       integer NOT NULL,
    status          text NOT NULL,     -- requested | running | succeeded | failed
    protocol_hash   text,
    mode            text,
    commands        integer,
    wells           integer,
    error           text,
    requested_at    timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX robot_runs_by_experiment ON robot_runs (experiment_id, iteration);

CREATE TABLE robot_commands (
    run_id          text NOT NULL,
    index           integer NOT NULL,
    command_id      text NOT NULL,
    command_key     text,
    command_type    text NOT NULL,
    status          text NOT NULL,
    params          jsonb NOT NULL,
    result          jsonb,
    error           jsonb,
    created_at      text,
    started_at      text,
    completed_at    text,
    PRIMARY KEY (run_id, index)
);
