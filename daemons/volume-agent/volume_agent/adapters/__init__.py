"""volume-agent's adapters: one module per external program or kernel interface."""

from oma_common.privileges import Needs, needs

#: What each adapter needs from the system; volume-agent.service grants exactly the union (tests/packaging).
NEEDS: dict[str, Needs] = {
    "mount": needs("mount(8)/umount(8) of NFS and CIFS repository shares below the mount root",
                   caps=("CAP_SYS_ADMIN",  # mount(2), umount(2)
                         "CAP_NET_BIND_SERVICE"),  # mount.nfs speaks NFSv3's mount protocol from a reserved port
                   syscalls=("@mount",)),
    "fsflags": needs("the immutable attribute (FS_IOC_SETFLAGS) of backup images omad owns (0600, user oma)",
                    caps=("CAP_LINUX_IMMUTABLE",  # set or clear the immutable attribute
                          "CAP_FOWNER",  # FS_IOC_SETFLAGS on a file the caller does not own
                          "CAP_DAC_READ_SEARCH")),  # open and reach another user's 0600 files and 0700 dirs
    "cloudstack": needs("the CloudStack management server's API over HTTP(S), through cs's asyncio client"),
    "devdir": needs("looks up virtio-<serial> links in the device directory and stat()s the devices they lead to",
                    devices=("block devices of attached CloudStack volumes (stat only)",)),
    "stamp": needs("reads and writes the sync stamp in the last 4 KiB of an attached CloudStack volume's device "
                   "(O_DIRECT): root owns the device node, no capability beyond the uid is needed",
                   devices=("block devices of attached CloudStack volumes (read and write their last 4 KiB)",)),
    "netif": needs("this machine's MAC addresses from /sys/class/net (which CloudStack VM this appliance is)"),
    "openers": needs("reads /proc/locks (QEMU's locks on a device) and the /proc/<pid>/fd links it may read, to "
                     "see whether a volume's device is in use before a detach; no CAP_SYS_PTRACE: QEMU's locks "
                     "answer for qemu-nbd, whose fd links a process with fewer capabilities cannot read"),
}
