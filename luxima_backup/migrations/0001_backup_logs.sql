-- internal.backup_logs: one row per backup or restore run, readable only by backup_admin.
-- Idempotent: safe to apply to a database that already has any part of it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'backup_admin') THEN
        CREATE ROLE backup_admin NOLOGIN;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS internal;

CREATE TABLE IF NOT EXISTS internal.backup_logs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
    component       text        NOT NULL CHECK (component IN ('db', 'files', 'configs', 'vm')),
    target          text        NOT NULL,
    status          text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'success', 'failed')),
    backup_id       text,
    object_key      text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    duration_ms     bigint,
    size_raw        bigint,
    size_compressed bigint,
    size_encrypted  bigint,
    sha256_raw      text,
    sha256_encrypted text,
    key_id          text,
    flow_run_id     uuid,
    error           text,
    details         jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX IF NOT EXISTS backup_logs_component_started_idx ON internal.backup_logs (component, target, started_at DESC);
CREATE INDEX IF NOT EXISTS backup_logs_flow_run_idx ON internal.backup_logs (flow_run_id);

ALTER TABLE internal.backup_logs OWNER TO backup_admin;
-- Only backup_admin (its owner) reaches the log: nobody else, not even through PUBLIC grants,
-- and row-level security with no policy as a second lock should a grant slip in later.
REVOKE ALL ON internal.backup_logs FROM PUBLIC;
ALTER TABLE internal.backup_logs ENABLE ROW LEVEL SECURITY;
GRANT USAGE ON SCHEMA internal TO backup_admin;
