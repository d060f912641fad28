"""restore-mounter: read-only restore mounts and the file access inside them (root agent)."""
