"""`python -m tests.sim.cloudstack --port 8080 --data-dir DIR --device-dir DIR`: the CloudStack simulator in the
foreground (attaching to the appliance VM makes loop devices, so run it as root for that)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import tempfile
from pathlib import Path

from .server import DEFAULT_APPLIANCE_MAC, DEFAULT_KEY, DEFAULT_SECRET, CloudStackSim


async def serve(args: argparse.Namespace) -> None:
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="cloudstack-sim-"))
    sim = CloudStackSim(data, Path(args.device_dir or data / "by-id"), api_key=args.api_key,
                        secret_key=args.secret_key, appliance_mac=args.appliance_mac, host=args.host, port=args.port)
    await sim.start()
    print(json.dumps({"endpoint": sim.endpoint, "api_key": sim.api_key, "secret_key": sim.secret_key,
                      "appliance_vm_id": sim.appliance_vm_id, "device_dir": str(sim.devices.device_dir)}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.sim.cloudstack", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free one (printed)")
    p.add_argument("--data-dir", default="", help="volumes' and snapshots' data (default: a temp dir)")
    p.add_argument("--device-dir", default="", help="where virtio-<serial> links appear (default: <data-dir>/by-id)")
    p.add_argument("--api-key", default=DEFAULT_KEY)
    p.add_argument("--secret-key", default=DEFAULT_SECRET)
    p.add_argument("--appliance-mac", default=DEFAULT_APPLIANCE_MAC, help="MAC of the appliance VM's NIC")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
