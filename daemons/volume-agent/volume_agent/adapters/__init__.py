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
}
