-- File-level restore: omad's record of each restore mount (restore-mounter holds the mount itself).

CREATE TABLE restore_mounts (
    id              TEXT PRIMARY KEY,            -- also restore-mounter's mount_id
    backup_id       TEXT NOT NULL,
    disk_index      INTEGER NOT NULL DEFAULT 0,
    image_path      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('mounting', 'mounted', 'unmounted', 'expired', 'failed')),
    mount_path      TEXT,
    device          TEXT,
    filesystem_type TEXT,
    filesystems     TEXT NOT NULL DEFAULT '[]',  -- JSON, as restore-mounter reported them
    error_message   TEXT,
    created_by      TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    expires_at      TEXT,
    ended_at        TEXT
);
CREATE INDEX restore_mounts_backup ON restore_mounts(backup_id);
CREATE INDEX restore_mounts_status ON restore_mounts(status);
