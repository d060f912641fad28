-- Backups: repositories (local, NFS, CIFS), VM-level backups and their per-disk QCOW2 images.

CREATE TABLE backup_repositories (
    id               TEXT PRIMARY KEY,          -- repo-<12 hex>
    name             TEXT NOT NULL UNIQUE,
    type             TEXT NOT NULL CHECK (type IN ('local', 'nfs', 'cifs')),
    enabled          INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    config           TEXT NOT NULL,             -- JSON: the type's settings, never a password
    secret_sealed    TEXT,                      -- CIFS password as SecretBox text (omad/crypto.py), else NULL
    root_path        TEXT NOT NULL UNIQUE,      -- where the images live: disk_path, or the mount point
    is_immutable     INTEGER NOT NULL DEFAULT 0 CHECK (is_immutable IN (0, 1)),
    min_retention_days INTEGER NOT NULL DEFAULT 0 CHECK (min_retention_days >= 0),
    description      TEXT NOT NULL DEFAULT '',
    created_by       TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    -- The last storage check (statvfs of root_path).
    total_bytes      INTEGER,
    used_bytes       INTEGER,
    available_bytes  INTEGER,
    last_check_at    TEXT,
    last_check_error TEXT
);

-- One row per VM-level backup (all disks of the VM at one snapshot). The id is also the id of its row in
-- `jobs` (job_type 'backup'), which carries the steps; the VMA uses it as its job id.
CREATE TABLE backup_jobs (
    backup_id          TEXT PRIMARY KEY,        -- backup-<vm>-<unix seconds>[-n]
    vm_context_id      TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE RESTRICT,
    vm_name            TEXT NOT NULL,           -- the VM's name when the backup was taken
    repository_id      TEXT NOT NULL REFERENCES backup_repositories(id) ON DELETE RESTRICT,
    backup_type        TEXT NOT NULL CHECK (backup_type IN ('full', 'incremental')),
    -- The backup this one continues (incrementals); its images are the backing files of ours. A failed
    -- backup keeps no files, so it never holds its parent: deleting the parent just forgets the link.
    parent_backup_id   TEXT REFERENCES backup_jobs(backup_id) ON DELETE SET NULL,
    chain_id           TEXT NOT NULL,           -- backup_id of the chain's full backup
    status             TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    policy_id          TEXT,
    tags               TEXT NOT NULL DEFAULT '{}',   -- JSON object
    bytes_transferred  INTEGER NOT NULL DEFAULT 0,
    total_bytes        INTEGER NOT NULL DEFAULT 0,
    size_bytes         INTEGER NOT NULL DEFAULT 0,   -- bytes its images take in the repository
    current_phase      TEXT,
    progress_percent   REAL NOT NULL DEFAULT 0,
    transfer_speed_bps INTEGER NOT NULL DEFAULT 0,
    eta_seconds        INTEGER,
    error_message      TEXT,
    last_activity_at   TEXT,                    -- telemetry, a completion, or a client on an export
    created_by         TEXT NOT NULL DEFAULT '',
    created_at         TEXT NOT NULL,
    started_at         TEXT,
    completed_at       TEXT,
    updated_at         TEXT NOT NULL
);
-- One active backup per VM: the database enforces what the API answers with 409.
CREATE UNIQUE INDEX backup_jobs_one_active ON backup_jobs(vm_context_id) WHERE status IN ('pending', 'running');
CREATE INDEX backup_jobs_vm ON backup_jobs(vm_context_id, repository_id, status, created_at);
CREATE INDEX backup_jobs_parent ON backup_jobs(parent_backup_id);
CREATE INDEX backup_jobs_chain ON backup_jobs(chain_id);

-- One QCOW2 per disk of a backup; an incremental's image is backed by the same disk's image of the parent.
CREATE TABLE backup_disks (
    backup_id          TEXT NOT NULL REFERENCES backup_jobs(backup_id) ON DELETE CASCADE,
    disk_index         INTEGER NOT NULL CHECK (disk_index >= 0),  -- what the VMA calls disk_id (0, 1, ...)
    disk_id            TEXT NOT NULL,           -- the VM's disk: disk-<VMware key>
    capacity_bytes     INTEGER NOT NULL,
    qcow2_path         TEXT NOT NULL,           -- relative to the repository's root
    backing_file       TEXT,                    -- as written into the image: relative to its directory
    nbd_port           INTEGER,
    nbd_export_name    TEXT,
    qemu_nbd_pid       INTEGER,
    status             TEXT NOT NULL CHECK (status IN ('pending', 'exporting', 'completed', 'failed')),
    change_id          TEXT,                    -- the VMware CBT change id this image is current to
    previous_change_id TEXT,                    -- the parent's change id of this disk
    bytes_transferred  INTEGER NOT NULL DEFAULT 0,
    total_bytes        INTEGER NOT NULL DEFAULT 0,
    progress_percent   REAL NOT NULL DEFAULT 0,
    size_bytes         INTEGER,                 -- the image's own allocation (qemu-img info actual-size)
    completed_at       TEXT,
    PRIMARY KEY (backup_id, disk_index)
);
