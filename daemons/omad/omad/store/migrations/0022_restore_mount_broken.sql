-- oma: foreign_keys=off
-- A restore mount may be `broken`: what served it died (restore-mounter says so, with the cause in
-- error_message); it is kept until DELETE or idle expiry. SQLite cannot alter a CHECK, so `restore_mounts` is
-- rebuilt by its 12-step procedure (https://sqlite.org/lang_altertable.html#otheralter). Nothing references the
-- table and it has no triggers, but foreign keys are off all the same (the first line; store/db.py), so the
-- runner's foreign_key_check vouches for the rebuild like any other. Every column, default and index stays.

CREATE TABLE restore_mounts_new (
    id              TEXT PRIMARY KEY,            -- also restore-mounter's mount_id
    backup_id       TEXT NOT NULL,
    disk_index      INTEGER NOT NULL DEFAULT 0,
    image_path      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('mounting', 'mounted', 'broken', 'unmounted', 'expired',
                                                    'failed')),
    mount_path      TEXT,
    device          TEXT,
    filesystem_type TEXT,
    filesystems     TEXT NOT NULL DEFAULT '[]',  -- JSON, as restore-mounter reported them
    error_message   TEXT,                        -- why it failed, or why it is broken
    created_by      TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    expires_at      TEXT,
    ended_at        TEXT
);
INSERT INTO restore_mounts_new (id, backup_id, disk_index, image_path, status, mount_path, device, filesystem_type,
                                filesystems, error_message, created_by, created_at, expires_at, ended_at)
SELECT id, backup_id, disk_index, image_path, status, mount_path, device, filesystem_type, filesystems,
       error_message, created_by, created_at, expires_at, ended_at
FROM restore_mounts;
DROP TABLE restore_mounts;
ALTER TABLE restore_mounts_new RENAME TO restore_mounts;

-- What 0006 made on the old table.
CREATE INDEX restore_mounts_backup ON restore_mounts(backup_id);
CREATE INDEX restore_mounts_status ON restore_mounts(status);
