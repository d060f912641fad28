-- Replication: a volume omad is about to have volume-agent create for a disk, recorded before it asks (and
-- removed in the transaction that records the volume in replication_volumes). An omad that dies in between
-- leaves this row: the disk's next sync takes the volume volume-agent made under that name instead of asking
-- for it again (volume-agent would refuse: the name exists); a row whose context is gone has its volume deleted
-- at start-up. No foreign key on the context: the row must outlive it to clean its volume up.

CREATE TABLE replication_volume_creates (
    vm_context_id TEXT NOT NULL,
    disk_id       TEXT NOT NULL,
    volume_name   TEXT NOT NULL,   -- migration-<vm>-disk-<unit>: the name volume-agent records it under
    job_id        TEXT NOT NULL,   -- the sync that asked for it (no foreign key either: it may be removed)
    size_bytes    INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (vm_context_id, disk_id)
);
