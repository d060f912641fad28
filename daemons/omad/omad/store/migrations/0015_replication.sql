-- Replication into CloudStack volumes: a row per replication job (beside its `jobs` row), a row per disk of a
-- job (its volume, NBD export and the change ids the VMA reported), and each replicated disk's volume, kept
-- across syncs until the context goes.

CREATE TABLE replication_jobs (
    job_id                TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    vm_context_id         TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    vm_name               TEXT NOT NULL,
    vm_path               TEXT NOT NULL,
    replication_type      TEXT NOT NULL CHECK (replication_type IN ('initial', 'incremental')),
    status                TEXT NOT NULL CHECK (status IN ('replicating', 'completed', 'failed', 'cancelled')),
    ossea_config_id       INTEGER NOT NULL,
    target_network        TEXT NOT NULL DEFAULT '',
    schedule_execution_id TEXT,
    vm_group_id           TEXT,
    scheduled_by          TEXT,
    created_by            TEXT NOT NULL DEFAULT '',
    progress_percent      REAL NOT NULL DEFAULT 0,
    bytes_transferred     INTEGER NOT NULL DEFAULT 0,
    total_bytes           INTEGER NOT NULL DEFAULT 0,
    current_operation     TEXT NOT NULL DEFAULT '',
    vma_status            TEXT NOT NULL DEFAULT '',   -- the VMA's own (capitalised) status, as last seen
    vma_sync_type         TEXT NOT NULL DEFAULT '',
    vma_eta_seconds       INTEGER,
    vma_progress          TEXT NOT NULL DEFAULT '{}', -- the VMA's latest progress body (JSON)
    error_message         TEXT,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL,
    started_at            TEXT,
    completed_at          TEXT,
    last_activity_at      TEXT NOT NULL              -- the VMA's last sign of life (progress moved, a change id)
);
-- One active replication per VM, whatever the code above it does.
CREATE UNIQUE INDEX replication_jobs_active ON replication_jobs(vm_context_id) WHERE status = 'replicating';
CREATE INDEX replication_jobs_context ON replication_jobs(vm_context_id, created_at);

-- The CloudStack volume each replicated disk is written into; created by the first sync that needs it.
CREATE TABLE replication_volumes (
    vm_context_id  TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    disk_id        TEXT NOT NULL,
    volume_id      TEXT NOT NULL UNIQUE,
    volume_name    TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    device_path    TEXT,
    link_path      TEXT,
    created_by_job TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (vm_context_id, disk_id)
);

CREATE TABLE replication_disks (
    job_id             TEXT NOT NULL REFERENCES replication_jobs(job_id) ON DELETE CASCADE,
    disk_id            TEXT NOT NULL,               -- disk-<VMware key>
    disk_key           INTEGER NOT NULL,            -- the VMware key the VMA's target names
    unit_number        INTEGER NOT NULL DEFAULT 0,
    capacity_bytes     INTEGER NOT NULL,
    volume_id          TEXT,
    nbd_port           INTEGER,
    export_name        TEXT NOT NULL,
    base_change_id     TEXT NOT NULL DEFAULT '',    -- what this sync was offered ('' = a full copy)
    change_id          TEXT,                        -- what the VMA reported for it
    previous_change_id TEXT,
    change_id_mismatch INTEGER NOT NULL DEFAULT 0 CHECK (change_id_mismatch IN (0, 1)),
    PRIMARY KEY (job_id, disk_id)
);
