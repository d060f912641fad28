-- Backup policies: 3-2-1 copy rules, backup copies, immutability locks, retention runs and verification.

CREATE TABLE backup_policies (
    id                    TEXT PRIMARY KEY,          -- pol-<12 hex>
    name                  TEXT NOT NULL UNIQUE,
    enabled               INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    primary_repository_id TEXT NOT NULL REFERENCES backup_repositories(id) ON DELETE RESTRICT,
    retention_days        INTEGER NOT NULL CHECK (retention_days >= 0),   -- 0: keep forever
    description           TEXT NOT NULL DEFAULT '',
    created_by            TEXT NOT NULL DEFAULT '',
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL
);

CREATE TABLE backup_copy_rules (
    id                        TEXT PRIMARY KEY,      -- rule-<12 hex>
    policy_id                 TEXT NOT NULL REFERENCES backup_policies(id) ON DELETE CASCADE,
    destination_repository_id TEXT NOT NULL REFERENCES backup_repositories(id) ON DELETE RESTRICT,
    copy_mode                 TEXT NOT NULL CHECK (copy_mode IN ('immediate', 'scheduled')),
    priority                  INTEGER NOT NULL DEFAULT 0,
    enabled                   INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    verify_after_copy         INTEGER NOT NULL DEFAULT 1 CHECK (verify_after_copy IN (0, 1)),
    created_at                TEXT NOT NULL,
    UNIQUE (policy_id, destination_repository_id)
);

-- A copy of a backup into another repository. The copy itself is a backup there (copy_backup_id, a row of
-- backup_jobs with its backup_disks), so it is listed, restored and chained like any other.
CREATE TABLE backup_copies (
    id                        TEXT PRIMARY KEY,      -- copy-<12 hex>; also its row in `jobs`
    source_backup_id          TEXT NOT NULL REFERENCES backup_jobs(backup_id) ON DELETE CASCADE,
    destination_repository_id TEXT NOT NULL REFERENCES backup_repositories(id) ON DELETE CASCADE,
    copy_backup_id            TEXT REFERENCES backup_jobs(backup_id) ON DELETE SET NULL,
    rule_id                   TEXT REFERENCES backup_copy_rules(id) ON DELETE SET NULL,
    status                    TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    verify_after_copy         INTEGER NOT NULL DEFAULT 1,
    verified                  INTEGER NOT NULL DEFAULT 0,
    attempts                  INTEGER NOT NULL DEFAULT 0,
    bytes_copied              INTEGER NOT NULL DEFAULT 0,
    progress_percent          REAL NOT NULL DEFAULT 0,
    error_message             TEXT,
    created_by                TEXT NOT NULL DEFAULT '',
    created_at                TEXT NOT NULL,
    started_at                TEXT,
    completed_at              TEXT,
    updated_at                TEXT NOT NULL
);
CREATE INDEX backup_copies_source ON backup_copies(source_backup_id, destination_repository_id);
-- One live copy of a backup per destination; failed attempts stay as history.
CREATE UNIQUE INDEX backup_copies_one ON backup_copies(source_backup_id, destination_repository_id)
    WHERE status != 'failed';

-- Immutability (held until locked_until; `files_locked`: the filesystem enforces it too) and verification.
ALTER TABLE backup_jobs ADD COLUMN copied_from TEXT;           -- the backup this one is a copy of
ALTER TABLE backup_jobs ADD COLUMN locked_until TEXT;
ALTER TABLE backup_jobs ADD COLUMN files_locked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_jobs ADD COLUMN verify_status TEXT;         -- ok | failed
ALTER TABLE backup_jobs ADD COLUMN verified_at TEXT;
ALTER TABLE backup_jobs ADD COLUMN verify_errors TEXT;         -- JSON [{file, problem}]
ALTER TABLE backup_disks ADD COLUMN sha256 TEXT;               -- of the image file as completed or copied

CREATE TABLE prune_runs (
    id           TEXT PRIMARY KEY,                   -- prune-<12 hex>
    policy_id    TEXT NOT NULL REFERENCES backup_policies(id) ON DELETE CASCADE,
    dry_run      INTEGER NOT NULL CHECK (dry_run IN (0, 1)),
    triggered_by TEXT NOT NULL,                      -- schedule, or the user
    as_of        TEXT NOT NULL,                      -- the time retention was measured from
    status       TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    removed      TEXT NOT NULL DEFAULT '[]',         -- JSON [backup_id]
    kept         TEXT NOT NULL DEFAULT '[]',         -- JSON [{backup_id, reason}]
    errors       TEXT NOT NULL DEFAULT '[]',         -- JSON [{backup_id, error}]
    started_at   TEXT NOT NULL,
    finished_at  TEXT
);
CREATE INDEX prune_runs_policy ON prune_runs(policy_id, started_at);
