"""A simulator of the VMA (the source-side appliance) speaking its real HTTP API, for tests."""

from .app import make_app
from .cbt import BLOCK_SIZE, BlockMap, DiskTracker
from .faults import EndpointFault, Faults, JobFault
from .inventory import GiB, MiB, Inventory, InventoryError, VirtualDisk, VirtualMachine, VirtualNic, demo_inventory
from .jobs import FAILED, FINALIZING, PREPARING, QUEUED, SNAPSHOTTING, STREAMING, SUCCEEDED, Job
from .runner import VMASim
from .state import OutboundCall, RecordedRequest, SimState

__all__ = [
    "BLOCK_SIZE", "BlockMap", "DiskTracker", "EndpointFault", "FAILED", "FINALIZING", "Faults", "GiB",
    "Inventory", "InventoryError", "Job", "JobFault", "MiB", "OutboundCall", "PREPARING", "QUEUED",
    "RecordedRequest", "SNAPSHOTTING", "STREAMING", "SUCCEEDED", "SimState", "VMASim", "VirtualDisk",
    "VirtualMachine", "VirtualNic", "demo_inventory", "make_app",
]
