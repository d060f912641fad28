-- Schedules (cron in an IANA time zone), their executions and each execution's VMs and jobs; machine groups
-- point at a schedule; a VM context shows when it is next scheduled and the last job the scheduler made.

CREATE TABLE schedules (
    id                  TEXT PRIMARY KEY,           -- UUID
    name                TEXT NOT NULL UNIQUE,
    description         TEXT NOT NULL DEFAULT '',
    cron_expression     TEXT NOT NULL,              -- 6 fields (seconds first) or 5; omad/schedule/cron.py
    timezone            TEXT NOT NULL DEFAULT 'UTC',-- IANA name
    enabled             INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    skip_if_running     INTEGER NOT NULL DEFAULT 1 CHECK (skip_if_running IN (0, 1)),
    max_concurrent_jobs INTEGER NOT NULL DEFAULT 10 CHECK (max_concurrent_jobs BETWEEN 1 AND 1000),
    retry_attempts      INTEGER NOT NULL DEFAULT 3 CHECK (retry_attempts BETWEEN 0 AND 10),
    retry_delay_minutes INTEGER NOT NULL DEFAULT 10 CHECK (retry_delay_minutes BETWEEN 0 AND 1440),
    action              TEXT NOT NULL DEFAULT 'backup' CHECK (action IN ('backup')),  -- replication joins later
    backup_type         TEXT NOT NULL DEFAULT 'auto' CHECK (backup_type IN ('full', 'incremental', 'auto')),
    replication_type    TEXT CHECK (replication_type IN ('full', 'incremental', 'auto')),
    repository_id       TEXT,                       -- where backups go (or the policy's primary repository)
    policy_id           TEXT,
    next_run_at         TEXT,                       -- UTC; NULL while disabled
    last_run_at         TEXT,
    created_by          TEXT NOT NULL DEFAULT '',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    CHECK (action != 'backup' OR repository_id IS NOT NULL OR policy_id IS NOT NULL)
);
CREATE INDEX schedules_due ON schedules(next_run_at) WHERE enabled = 1;

-- One row per run of a schedule: on time, late (after downtime), skipped, or started by hand.
CREATE TABLE schedule_executions (
    id             INTEGER PRIMARY KEY,
    schedule_id    TEXT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
    scheduled_at   TEXT NOT NULL,                   -- the due time (UTC); the request time for a manual run
    started_at     TEXT,
    completed_at   TEXT,
    status         TEXT NOT NULL CHECK (status IN ('scheduled', 'running', 'completed', 'failed', 'skipped',
                                                   'cancelled')),
    triggered_by   TEXT NOT NULL,                   -- "scheduler" or "manual:<user>"
    late           INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1)),
    missed_runs    INTEGER NOT NULL DEFAULT 0,      -- later due times that passed in the same downtime
    vms_eligible   INTEGER NOT NULL DEFAULT 0,
    jobs_created   INTEGER NOT NULL DEFAULT 0,
    jobs_completed INTEGER NOT NULL DEFAULT 0,
    jobs_failed    INTEGER NOT NULL DEFAULT 0,
    jobs_skipped   INTEGER NOT NULL DEFAULT 0,      -- VMs that got no job in this run
    start_failures INTEGER NOT NULL DEFAULT 0,      -- starts refused (no job row was created)
    message        TEXT
);
CREATE INDEX schedule_executions_schedule ON schedule_executions(schedule_id, id);
CREATE INDEX schedule_executions_running ON schedule_executions(schedule_id) WHERE status = 'running';

-- The VMs of one execution, in the order they are started (group priority, then VM priority).
-- No foreign key to the VM or the group: the history outlives both.
CREATE TABLE schedule_execution_vms (
    execution_id   INTEGER NOT NULL REFERENCES schedule_executions(id) ON DELETE CASCADE,
    vm_context_id  TEXT NOT NULL,
    group_id       TEXT NOT NULL,
    position       INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'running', 'retry_wait', 'completed', 'failed',
                                                   'skipped')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    start_failures INTEGER NOT NULL DEFAULT 0,
    job_id         TEXT,                            -- the latest attempt's job
    retry_at       TEXT,
    reason         TEXT,
    started_at     TEXT,
    completed_at   TEXT,
    PRIMARY KEY (execution_id, vm_context_id)
);
CREATE INDEX schedule_execution_vms_open ON schedule_execution_vms(execution_id)
    WHERE status IN ('pending', 'running', 'retry_wait');

-- Every job an execution created (one per attempt), with its outcome as last seen in `jobs`.
CREATE TABLE schedule_execution_jobs (
    job_id        TEXT PRIMARY KEY,
    execution_id  INTEGER NOT NULL REFERENCES schedule_executions(id) ON DELETE CASCADE,
    vm_context_id TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    created_at    TEXT NOT NULL,
    finished_at   TEXT
);
CREATE INDEX schedule_execution_jobs_execution ON schedule_execution_jobs(execution_id);

-- vm_machine_groups.schedule_id predates this table (0002), so SQLite cannot give it a foreign key without
-- rebuilding the table (which would cascade into the memberships): triggers keep it honest instead.
CREATE INDEX vm_machine_groups_schedule ON vm_machine_groups(schedule_id);
CREATE TRIGGER vm_machine_groups_schedule_insert BEFORE INSERT ON vm_machine_groups
WHEN NEW.schedule_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM schedules WHERE id = NEW.schedule_id) BEGIN
    SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: vm_machine_groups.schedule_id');
END;
CREATE TRIGGER vm_machine_groups_schedule_update BEFORE UPDATE OF schedule_id ON vm_machine_groups
WHEN NEW.schedule_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM schedules WHERE id = NEW.schedule_id) BEGIN
    SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: vm_machine_groups.schedule_id');
END;
CREATE TRIGGER schedules_delete_unlinks_groups AFTER DELETE ON schedules BEGIN
    UPDATE vm_machine_groups SET schedule_id = NULL WHERE schedule_id = OLD.id;
END;

ALTER TABLE vm_replication_contexts ADD COLUMN next_scheduled_at TEXT;      -- UTC; NULL when no schedule
ALTER TABLE vm_replication_contexts ADD COLUMN last_scheduled_job_id TEXT;
