"""nbd-pool's persisted state: the agents' shared atomically replaced JSON documents (oma_common.statefile)."""

from oma_common.statefile import VERSION, StateFile, rfc3339, write_atomically

__all__ = ["VERSION", "StateFile", "rfc3339", "write_atomically"]
