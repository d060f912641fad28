"""One module per external program or kernel interface restore-mounter drives."""

from oma_common.privileges import Needs, needs

#: What each adapter (and the file access inside mounts) needs; restore-mounter.service grants exactly the
#: union (tests/packaging).
NEEDS: dict[str, Needs] = {
    "mounter": needs("read-only mounts (ro,noload / ro,norecovery), ntfs-3g and fusefat FUSE mounts",
                     caps=("CAP_SYS_ADMIN",), syscalls=("@mount",), devices=("/dev/fuse",)),
    "loop": needs("loop devices and partx (BLKPG) for the partitions of an attached image",
                  caps=("CAP_SYS_ADMIN",), devices=("/dev/loop-control", "/dev/loop*")),
    "blkid": needs("blkid on the attached devices and partitions root owns"),
    "files": needs("list and read every file of a guest file system, whoever owns it (read only: "
                   "not CAP_DAC_OVERRIDE)", caps=("CAP_DAC_READ_SEARCH",)),
}
