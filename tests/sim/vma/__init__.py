"""A simulator of the VMA (the source-side appliance) speaking its real HTTP API, for tests.

    inv = Inventory(host="vcenter.sim.local", username="administrator@vsphere.local", password="VMware1!")
    vm = inv.add_vm("web 01", disks=[32 * MiB, 64 * MiB], nics=2)
    async with VMASim(inv, workdir=tmp_path) as sim:      # sim.url = http://127.0.0.1:<port>
        sim.state.oma_url = fake_oma_url                    # where jobs call back
        src = sim.state.source_path(vm, 0)                  # the disk's content: a raw file
        sim.state.write_source(vm, 0, offset, data)         # a guest write, noted like VMware's CBT does
        sim.state.changed(vm, 0, (offset, length))          # or: tell it what you wrote into src yourself
        sim.state.faults.error("discover", status=503)      # or delay / malformed / drop
        sim.state.faults.fail_job(after_bytes=MiB)          # or hang_job / disconnect_job / refuse_job
        ...
        await sim.state.wait_job("backup-1")
        sim.state.requests_to("backup/start"); sim.state.calls_to("/complete")

Command line: `python -m tests.sim.vma --port 9081 --inventory FILE.json` (see --help).
"""

from .app import make_app
from .cbt import BLOCK_SIZE, BlockMap, DiskTracker
from .faults import EndpointFault, Faults, JobFault
from .inventory import GiB, MiB, Inventory, InventoryError, VirtualDisk, VirtualMachine, VirtualNic, demo_inventory
from .jobs import FAILED, FINALIZING, PREPARING, QUEUED, SNAPSHOTTING, STREAMING, SUCCEEDED, Job
from .runner import VMASim
from .state import MAP, OFF, SCAN, OutboundCall, RecordedRequest, SimState

__all__ = [
    "BLOCK_SIZE", "BlockMap", "DiskTracker", "EndpointFault", "FAILED", "FINALIZING", "Faults", "GiB",
    "Inventory", "InventoryError", "Job", "JobFault", "MAP", "MiB", "OFF", "OutboundCall", "PREPARING", "QUEUED",
    "RecordedRequest", "SCAN", "SNAPSHOTTING", "STREAMING", "SUCCEEDED", "SimState", "VMASim", "VirtualDisk",
    "VirtualMachine", "VirtualNic", "demo_inventory", "make_app",
]
