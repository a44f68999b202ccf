"""Network namespaces: enter one around socket creation, run commands inside one.

Python 3.11 has no os.setns, so setns(2) comes from libc. A socket keeps the namespace it was
created in, so the daemon stays in the root namespace (where the proc connector works) and only
its queue and sock_diag sockets live in the accounted namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A named network namespace is missing or cannot be entered."""


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"invalid network namespace name: {name!r}")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise NetnsError(f"network namespace {name!r} does not exist (no {path}; see `ip netns list`)")
    return path


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def command(argv: list[str], netns: str | None) -> list[str]:
    """Prefix argv so that it runs inside `netns`."""
    if netns is None:
        return argv
    netns_path(netns)
    return ["ip", "netns", "exec", netns, *argv]
