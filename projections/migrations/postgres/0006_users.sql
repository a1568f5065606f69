-- Users of the built-in token issuer (issue 10).
--
-- `users` is the read model projected from lab.users (the issuer reads a user's roles and
-- whether they are disabled from it at each token request). `last_offset` orders the events of
-- one user (one user's events share a partition): an event at or below it was applied already.
CREATE TABLE users (
    user_id              text PRIMARY KEY,
    email                text NOT NULL,
    roles                text[] NOT NULL DEFAULT '{}',
    disabled             boolean NOT NULL DEFAULT false,
    disabled_reason      text,
    disabled_at          timestamptz,
    quota_granted_wells  bigint NOT NULL DEFAULT 0,
    registered_at        timestamptz NOT NULL,
    registered_by        text NOT NULL,
    updated_at           timestamptz NOT NULL,
    last_event_id        uuid NOT NULL,
    last_offset          bigint NOT NULL
);
CREATE INDEX users_by_email ON users (email);

-- Password hashes (Argon2id) never enter the event log. They live in a schema of their own:
-- the query API's SELECT-only role is granted SELECT on the tables of `public` only (and by
-- default privileges on the tables the writer creates there), never USAGE on `auth`, so it
-- cannot read them.
CREATE SCHEMA auth;
REVOKE ALL ON SCHEMA auth FROM PUBLIC;
CREATE TABLE auth.credentials (
    user_id        text PRIMARY KEY,
    email          text NOT NULL UNIQUE,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON auth.credentials FROM PUBLIC;
