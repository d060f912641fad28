"""`python -m tests.sim.vma --port 9081 --inventory FILE.json`: run the VMA simulator in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Optional, Sequence

from .inventory import Inventory, demo_inventory
from .runner import VMASim
from .state import OFF, SCAN, SimState

EXAMPLE = """inventory file (JSON):
  {"vcenter": {"host": "vcenter.sim.local", "datacenter": "DC1",
               "username": "administrator@vsphere.local", "password": "VMware1!"},
   "vms": [{"name": "web 01", "disks": 2, "nics": 2, "disk_bytes": 67108864, "folder": "Production"},
           {"name": "db", "power_state": "poweredOff", "memory_mb": 8192, "num_cpu": 4,
            "disks": [{"capacity_bytes": 33554432, "datastore": "ssd", "source": "/srv/db-0.raw"},
                      {"size_gb": 2, "provisioning_type": "thick"}],
            "nics": [{"network_name": "LAN", "adapter_type": "e1000e"}, "DMZ"]}]}
  A disk with "source" uses that raw file (its size becomes the capacity); others get a sparse
  zero image in the workdir. Without --inventory a three-VM demo inventory with odd names is served.
"""


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.sim.vma", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9081, help="port (default 9081; 0 picks one)")
    p.add_argument("--inventory", help="inventory JSON file (see below)")
    p.add_argument("--oma-url", default=None,
                   help="where jobs call back (default: the replicate request's oma_url, else http://127.0.0.1:8082)")
    p.add_argument("--workdir", default=None, help="where generated disk images live (default: a temp dir)")
    p.add_argument("--auth-failure-status", type=int, default=500, help="status of a wrong vCenter login (500 or 401)")
    p.add_argument("--telemetry-interval", type=float, default=1.0, help="seconds between progress telemetry posts")
    # Another process cannot note its writes to the sources (SimState.changed), so the command line finds
    # the changes by reading the sources (SCAN) rather than from notes (MAP).
    p.add_argument("--change-tracking", choices=(SCAN, OFF), default=SCAN,
                   help="scan: an incremental reads the whole source to find what changed (default); "
                        "off: every copy is full")
    p.add_argument("--no-change-tracking", dest="change_tracking", action="store_const", const=OFF,
                   help="the same as --change-tracking off")
    p.add_argument("--show-inventory", action="store_true", help="print the discovery body and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def _serve(state: SimState, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with VMASim(state=state, host=host, port=port) as sim:
        print(f"VMA simulator listening on {sim.api_url} ({len(state.inventory.vms)} VMs)", file=sys.stderr, flush=True)
        await stop.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sources: list[tuple[str, int, str]] = []
    if args.inventory:
        with open(args.inventory, encoding="utf-8") as f:
            inventory, sources = Inventory.from_dict_with_sources(json.load(f))
    else:
        inventory = demo_inventory()
    if args.show_inventory:
        json.dump(inventory.discovery(), sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    state = SimState(inventory, workdir=args.workdir, oma_url=args.oma_url,
                     auth_failure_status=args.auth_failure_status, telemetry_interval=args.telemetry_interval,
                     change_tracking=args.change_tracking)
    for vm_id, index, path in sources:
        state.set_source(vm_id, index, path)
    try:
        asyncio.run(_serve(state, args.host, args.port))
    finally:
        state.remove_workdir()  # only a temporary one it made itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
