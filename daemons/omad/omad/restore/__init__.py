"""File-level restore: mount a backup's disk read-only through restore-mounter, browse, download, unmount."""
