"""This machine's NIC MAC addresses, from sysfs (/sys/class/net/<if>/address): which CloudStack VM we are."""

from __future__ import annotations

from pathlib import Path

SYS_CLASS_NET = Path("/sys/class/net")


def mac_addresses(sys_class_net: Path = SYS_CLASS_NET) -> set[str]:
    """Every non-zero MAC of a network interface, lower case."""
    out = set()
    for iface in sys_class_net.iterdir() if sys_class_net.is_dir() else []:
        try:
            mac = (iface / "address").read_text().strip().lower()
        except OSError:
            continue
        if mac and mac != "00:00:00:00:00:00":
            out.add(mac)
    return out
