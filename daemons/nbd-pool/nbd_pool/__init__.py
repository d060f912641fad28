"""nbd-pool: NBD port pool, qemu-nbd exports and read-only image attach (root agent)."""
