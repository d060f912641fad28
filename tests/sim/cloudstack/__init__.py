"""A CloudStack management server for tests: the signed API, async jobs, and real devices for attached volumes.

    async with CloudStackSim(tmp / "cs-data", tmp / "by-id") as sim:      # in the test's loop
        cs = AIOCloudStack(sim.endpoint, sim.api_key, sim.secret_key)
    with running(tmp / "cs-data", tmp / "by-id") as sim: ...             # on its own thread

Attaching a volume to the appliance VM (`sim.appliance_vm_id`, NIC MAC `appliance_mac`) binds the volume's
sparse file to a loop device and links `virtio-<serial>` to it in the device directory.
"""

from .commands import Faults
from .devices import serial_of
from .server import DEFAULT_APPLIANCE_MAC, CloudStackSim, ThreadedSim, running
from .state import CloudStackError

__all__ = ["DEFAULT_APPLIANCE_MAC", "CloudStackError", "CloudStackSim", "Faults", "ThreadedSim", "running",
           "serial_of"]
