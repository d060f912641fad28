-- oma: foreign_keys=off
-- Schedules run replications too: `action` may be 'replication', whose `replication_type` (full | incremental |
-- auto) is then required. SQLite cannot alter a CHECK, so `schedules` is rebuilt by its 12-step procedure
-- (https://sqlite.org/lang_altertable.html#otheralter), with foreign keys off (the first line; store/db.py) so
-- that dropping the old table does not cascade into its executions. Ids are copied unchanged: every reference
-- (schedule_executions, vm_machine_groups.schedule_id) stays valid, which the runner checks before committing.

-- The triggers of vm_machine_groups name `schedules`: the rename below refuses while they point at no table.
DROP TRIGGER vm_machine_groups_schedule_insert;
DROP TRIGGER vm_machine_groups_schedule_update;

CREATE TABLE schedules_new (
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
    action              TEXT NOT NULL DEFAULT 'backup' CHECK (action IN ('backup', 'replication')),
    backup_type         TEXT NOT NULL DEFAULT 'auto' CHECK (backup_type IN ('full', 'incremental', 'auto')),
    replication_type    TEXT CHECK (replication_type IN ('full', 'incremental', 'auto')),
    repository_id       TEXT,                       -- where backups go (or the policy's primary repository)
    policy_id           TEXT,
    next_run_at         TEXT,                       -- UTC; NULL while disabled
    last_run_at         TEXT,
    created_by          TEXT NOT NULL DEFAULT '',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    CHECK (action != 'backup' OR repository_id IS NOT NULL OR policy_id IS NOT NULL),
    CHECK (action != 'replication' OR replication_type IS NOT NULL)
);
INSERT INTO schedules_new (id, name, description, cron_expression, timezone, enabled, skip_if_running,
                           max_concurrent_jobs, retry_attempts, retry_delay_minutes, action, backup_type,
                           replication_type, repository_id, policy_id, next_run_at, last_run_at, created_by,
                           created_at, updated_at)
SELECT id, name, description, cron_expression, timezone, enabled, skip_if_running, max_concurrent_jobs,
       retry_attempts, retry_delay_minutes, action, backup_type, replication_type, repository_id, policy_id,
       next_run_at, last_run_at, created_by, created_at, updated_at
FROM schedules;
DROP TABLE schedules;
ALTER TABLE schedules_new RENAME TO schedules;

-- What 0005 made on and around the old table.
CREATE INDEX schedules_due ON schedules(next_run_at) WHERE enabled = 1;
CREATE TRIGGER schedules_delete_unlinks_groups AFTER DELETE ON schedules BEGIN
    UPDATE vm_machine_groups SET schedule_id = NULL WHERE schedule_id = OLD.id;
END;
CREATE TRIGGER vm_machine_groups_schedule_insert BEFORE INSERT ON vm_machine_groups
WHEN NEW.schedule_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM schedules WHERE id = NEW.schedule_id) BEGIN
    SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: vm_machine_groups.schedule_id');
END;
CREATE TRIGGER vm_machine_groups_schedule_update BEFORE UPDATE OF schedule_id ON vm_machine_groups
WHEN NEW.schedule_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM schedules WHERE id = NEW.schedule_id) BEGIN
    SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: vm_machine_groups.schedule_id');
END;
