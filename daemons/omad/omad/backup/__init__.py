"""VM backups: repositories, VM-level backups into per-disk QCOW2 chains, completion, chains, the watchdog."""
