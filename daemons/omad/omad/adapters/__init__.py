"""omad's adapters: the local programs omad runs itself, unprivileged."""

from oma_common.privileges import Needs, needs

#: omad.service grants no capability and no device: an adapter that needs one belongs in an agent.
NEEDS: dict[str, Needs] = {
    "localfs": needs("its own repository directories and images, as user oma"),
    "qemu_img": needs("qemu-img on its own images, as user oma"),
    "logread": needs("the daemons' log files (make run), or the journal through journalctl (user oma needs the "
                     "systemd-journal group for other units' lines)"),
    "netlinks": needs("this appliance's MAC addresses over rtnetlink (pyroute2), read only: AF_NETLINK"),
    "memfile": needs("anonymous in-memory files (memfd_create) holding the rendered VM list that requests send with "
                     "sendfile; in @system-service, no capability"),
    "socktable": needs("the owner uid of a loopback TCP peer (the VMA tunnel's user) over sock_diag, AF_NETLINK; "
                       "other users' uids must stay visible, so omad.service has no PrivateUsers="),
}
