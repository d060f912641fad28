"""Adapters: one module per external program or kernel interface nbd-pool drives."""

from oma_common.privileges import Needs, needs

#: What each adapter needs from the system; nbd-pool.service grants exactly the union (tests/packaging).
NEEDS: dict[str, Needs] = {
    "qemu_nbd": needs("qemu-nbd exports of images in repositories and of vouched volume devices",
                      caps=("CAP_DAC_OVERRIDE",),  # images on NFS shares may belong to other users
                      devices=("block devices of attached CloudStack volumes",)),
    "images": needs("images.py opens each layer by descriptor for qemu: omad's 0600 images, read-write for "
                    "backup exports", caps=("CAP_DAC_OVERRIDE",)),
    "kernel_nbd": needs("qemu-nbd --connect: NBD_SET_SOCK, NBD_DO_IT", caps=("CAP_SYS_ADMIN",),
                        devices=("/dev/nbd*",)),
    "fuse_loop": needs("qemu-storage-daemon mounts its FUSE export itself; a read-only loop device on it",
                       caps=("CAP_SYS_ADMIN",), syscalls=("@mount",), devices=("/dev/fuse", "/dev/loop*")),
    "fuse_mounts": needs("unmounting FUSE exports left behind", caps=("CAP_SYS_ADMIN",), syscalls=("@mount",)),
    "loopdev": needs("losetup of read-only loop devices", caps=("CAP_SYS_ADMIN",),
                     devices=("/dev/loop-control", "/dev/loop*")),
    "partx": needs("partx adds and removes partitions (BLKPG)", caps=("CAP_SYS_ADMIN",)),
    "partitions": needs("partition tables read in user space from devices root owns"),
    "attach": needs("the attachment protocol shared by the backends (no system access of its own)"),
    "orphans": needs("finds and ends leftovers: its own children run as root, so no CAP_KILL"),
    "nbd_probe": needs("an NBD handshake to a loopback port"),
    "ports": needs("a bind test of a pool port above 1024"),
    "listen_fd": needs("binds an export's listener (TCP_NODELAY) and execs qemu-nbd with it socket-activated"),
    "listen_fd_launcher": needs("run as a file between spawn and exec: the listener at fd 3, LISTEN_FDS/LISTEN_PID"),
    "tcp_diag": needs("the exports' clients: a sock_diag dump (netlink; /proc/net/tcp* where the unit allows no "
                      "AF_NETLINK) and /proc/<pid>/fd of its own children"),
    "blockinfo": needs("sysfs and /proc (mountinfo, swaps) about a block device before it is exported"),
}
