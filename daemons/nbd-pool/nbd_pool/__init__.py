"""nbd-pool: NBD ports, qemu-nbd exports and read-only image attach."""
