"""The launcher of listen_fd.py: FD -- PROGRAM ARGS... puts FD at fd 3, announces it and execs PROGRAM.

Run as a file, never imported by the daemon: `python3 -I -S <this file> FD -- qemu-nbd ...` (listen_fd.
launcher_argv). It sits between the spawn of an export and its first NBD handshake, so it imports `os` and
`sys` alone: no site (-S: the venv's .pth imports, dist-packages), no environment or user directory on
sys.path (-I), nothing of this package. That costs one bare interpreter start (~10 ms) instead of
`python3 -m nbd_pool.adapters.listen_fd` (~40 ms: site, the package's imports). Keep it that way: an import
added here is paid on every export start.
"""

import os
import sys

FIRST_FD = 3  # SD_LISTEN_FDS_START: where socket activation puts the first socket


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print("usage: python3 -I -S listen_fd_launcher.py FD -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    fd = int(args[0])
    if fd != FIRST_FD:
        try:
            taken = os.get_inheritable(FIRST_FD)  # only a descriptor passed to us is inheritable
        except OSError:
            taken = False
        if taken:
            print(f"listen_fd: fd {FIRST_FD} is passed to the program too; cannot put the listener there",
                  file=sys.stderr)
            return 2
        os.dup2(fd, FIRST_FD)  # inheritable
        os.close(fd)
    os.set_inheritable(FIRST_FD, True)
    os.environ.pop("LISTEN_FDNAMES", None)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    try:
        os.execvp(args[2], args[2:])
    except OSError as exc:
        print(f"listen_fd: cannot execute {args[2]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
