"""volume-agent: CloudStack volume life cycle and the volume-to-device map (root agent)."""
