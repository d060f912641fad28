-- VMware: saved vCenter credentials, VM contexts with their disks and NICs, the VM inventory, machine-group
-- membership (the groups' own features arrive later), the generic jobs table and the CBT history.

CREATE TABLE vmware_credentials (
    id               INTEGER PRIMARY KEY,
    credential_name  TEXT NOT NULL UNIQUE,
    vcenter_host     TEXT NOT NULL,
    username         TEXT NOT NULL,
    password_sealed  TEXT NOT NULL,              -- SecretBox text (omad/crypto.py), never the password
    datacenter       TEXT NOT NULL DEFAULT '',
    is_active        INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    is_default       INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_by       TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    last_used        TEXT,
    usage_count      INTEGER NOT NULL DEFAULT 0,
    CHECK (is_default = 0 OR is_active = 1)
);
-- At most one default credential.
CREATE UNIQUE INDEX vmware_credentials_default ON vmware_credentials(is_default) WHERE is_default = 1;

-- One row per protected VM: the GUI's VM table and the anchor of every job about that VM.
CREATE TABLE vm_replication_contexts (
    context_id             TEXT PRIMARY KEY,    -- ctx-<vm>-YYYYMMDD-HHMMSS
    vm_name                TEXT NOT NULL,
    vmware_vm_id           TEXT NOT NULL,       -- VMware instance UUID
    vm_path                TEXT NOT NULL,
    vcenter_host           TEXT NOT NULL,
    datacenter             TEXT NOT NULL DEFAULT '',
    current_status         TEXT NOT NULL DEFAULT 'discovered' CHECK (current_status IN (
                               'discovered', 'replicating', 'ready_for_failover', 'failed_over_test',
                               'failed_over_live', 'completed', 'failed', 'cleanup_required')),
    current_job_id         TEXT,
    total_jobs_run         INTEGER NOT NULL DEFAULT 0,
    successful_jobs        INTEGER NOT NULL DEFAULT 0,
    failed_jobs            INTEGER NOT NULL DEFAULT 0,
    last_successful_job_id TEXT,
    cpu_count              INTEGER NOT NULL DEFAULT 0,
    memory_mb              INTEGER NOT NULL DEFAULT 0,
    os_type                TEXT NOT NULL DEFAULT '',
    power_state            TEXT NOT NULL DEFAULT '',
    vm_tools_version       TEXT NOT NULL DEFAULT '',
    guest_os               TEXT NOT NULL DEFAULT '',
    display_name           TEXT NOT NULL DEFAULT '',
    folder_path            TEXT NOT NULL DEFAULT '',
    vmx_version            TEXT NOT NULL DEFAULT '',
    annotation             TEXT NOT NULL DEFAULT '',
    vmware_tools_status    TEXT NOT NULL DEFAULT '',
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL,
    first_job_at           TEXT,
    last_job_at            TEXT,
    auto_added             INTEGER NOT NULL DEFAULT 0 CHECK (auto_added IN (0, 1)),
    scheduler_enabled      INTEGER NOT NULL DEFAULT 1 CHECK (scheduler_enabled IN (0, 1)),
    credential_id          INTEGER REFERENCES vmware_credentials(id) ON DELETE RESTRICT,
    ossea_config_id        INTEGER,             -- the CloudStack config (its table comes with that feature)
    last_operation_summary TEXT                 -- JSON object, or NULL
);
-- Clients address a context by VM name (GET /vm-contexts/{vm_name}, POST /backups {vm_name}): names are unique.
CREATE UNIQUE INDEX vm_contexts_name ON vm_replication_contexts(vm_name);
CREATE UNIQUE INDEX vm_contexts_vmware ON vm_replication_contexts(vcenter_host, vmware_vm_id);

-- Disks are stored once per context and disk id, not per job.
CREATE TABLE vm_disks (
    id                INTEGER PRIMARY KEY,
    vm_context_id     TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    disk_id           TEXT NOT NULL,            -- disk-<VMware device key>, keys start at 2000
    label             TEXT NOT NULL DEFAULT '',
    path              TEXT NOT NULL DEFAULT '',
    vmdk_path         TEXT NOT NULL DEFAULT '',
    size_gb           INTEGER NOT NULL DEFAULT 0,
    capacity_bytes    INTEGER NOT NULL DEFAULT 0,
    datastore         TEXT NOT NULL DEFAULT '',
    unit_number       INTEGER,
    provisioning_type TEXT NOT NULL DEFAULT '',
    disk_change_id    TEXT,                     -- the last CBT change id replicated into this disk's volume
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    UNIQUE (vm_context_id, disk_id)
);

CREATE TABLE vm_networks (
    id            INTEGER PRIMARY KEY,
    vm_context_id TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,             -- the NIC's order in the VM
    label         TEXT NOT NULL DEFAULT '',
    network_name  TEXT NOT NULL DEFAULT '',
    adapter_type  TEXT NOT NULL DEFAULT '',
    mac_address   TEXT NOT NULL DEFAULT '',
    connected     INTEGER NOT NULL DEFAULT 1 CHECK (connected IN (0, 1)),
    type          TEXT NOT NULL DEFAULT '',
    UNIQUE (vm_context_id, position)
);

-- What vCenter last said about every VM seen (a discovery or the VMA's inventory push), managed or not.
CREATE TABLE vm_inventory (
    id              INTEGER PRIMARY KEY,
    vmware_vm_id    TEXT NOT NULL,
    vcenter_host    TEXT NOT NULL,
    datacenter      TEXT NOT NULL DEFAULT '',
    name            TEXT NOT NULL,
    path            TEXT NOT NULL DEFAULT '',
    power_state     TEXT NOT NULL DEFAULT '',
    vm              TEXT NOT NULL,              -- the VM's discovery object as JSON (disks and NICs inside)
    source          TEXT NOT NULL CHECK (source IN ('discovery', 'vma_push')),
    first_seen_at   TEXT NOT NULL,
    last_seen_at    TEXT NOT NULL,
    UNIQUE (vcenter_host, vmware_vm_id)
);
CREATE INDEX vm_inventory_vmware_id ON vm_inventory(vmware_vm_id);
CREATE INDEX vm_inventory_name ON vm_inventory(name);

-- Machine groups: only what the VM list joins today; schedules and the groups' API arrive later.
CREATE TABLE vm_machine_groups (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    description        TEXT NOT NULL DEFAULT '',
    schedule_id        TEXT,                    -- the schedule's table comes with the scheduler
    max_concurrent_vms INTEGER NOT NULL DEFAULT 10 CHECK (max_concurrent_vms BETWEEN 1 AND 100),
    priority           INTEGER NOT NULL DEFAULT 50 CHECK (priority BETWEEN 0 AND 100),
    created_by         TEXT NOT NULL DEFAULT '',
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);

-- A VM may be in several groups.
CREATE TABLE vm_group_memberships (
    id            INTEGER PRIMARY KEY,
    group_id      TEXT NOT NULL REFERENCES vm_machine_groups(id) ON DELETE CASCADE,
    vm_context_id TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    priority      INTEGER NOT NULL DEFAULT 50 CHECK (priority BETWEEN 0 AND 100),
    enabled       INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    added_by      TEXT NOT NULL DEFAULT '',
    added_at      TEXT NOT NULL,
    UNIQUE (group_id, vm_context_id)
);
CREATE INDEX vm_group_memberships_vm ON vm_group_memberships(vm_context_id);

-- Every long operation of any type (replication, backup, test_failover, live_failover, rollback, ...).
-- Deliberately minimal: the job engine adds its steps and columns in a later migration.
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    job_type      TEXT NOT NULL,
    status        TEXT NOT NULL,
    progress      REAL NOT NULL DEFAULT 0,
    context_id    TEXT,                         -- the VM context the job is about, if any
    display_name  TEXT NOT NULL DEFAULT '',
    current_step  TEXT,
    error_message TEXT,
    started_at    TEXT,
    completed_at  TEXT,
    created_at    TEXT NOT NULL
);
CREATE INDEX jobs_context ON jobs(context_id, created_at);
CREATE INDEX jobs_status ON jobs(status);

-- Change ids recorded per disk and job (replication appends one row per stored change id).
CREATE TABLE cbt_history (
    id                 INTEGER PRIMARY KEY,
    vm_context_id      TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    job_id             TEXT,
    disk_id            TEXT NOT NULL,
    change_id          TEXT NOT NULL,
    previous_change_id TEXT,
    sync_type          TEXT,                    -- full | incremental
    bytes_transferred  INTEGER,
    sync_success       INTEGER NOT NULL DEFAULT 1 CHECK (sync_success IN (0, 1)),
    created_at         TEXT NOT NULL
);
CREATE INDEX cbt_history_context ON cbt_history(vm_context_id, created_at);

-- A generation number per cached view: triggers bump it on every change of the rows the view shows, from any
-- connection (omad, omactl, an operator's sqlite3), so a cache keyed on it is never served stale.
CREATE TABLE change_counters (
    name       TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0
);
INSERT INTO change_counters (name, generation) VALUES ('vm_contexts', 0);

CREATE TRIGGER vm_contexts_changed_insert AFTER INSERT ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_contexts_changed_update AFTER UPDATE ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_contexts_changed_delete AFTER DELETE ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_memberships_changed_insert AFTER INSERT ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_memberships_changed_update AFTER UPDATE ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_memberships_changed_delete AFTER DELETE ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_groups_changed_update AFTER UPDATE ON vm_machine_groups BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
CREATE TRIGGER vm_groups_changed_delete AFTER DELETE ON vm_machine_groups BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
END;
