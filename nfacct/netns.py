"""Network namespaces: enter one around socket creation, run commands inside one.

Python 3.11 has no os.setns, so setns(2) comes from libc. A socket keeps the namespace it was
created in, so the daemon stays in the root namespace (where the proc connector works) and only
its queue and sock_diag sockets live in the accounted namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
from collections.abc import Iterable, Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A named network namespace is missing or cannot be entered."""


class NoSuchNetns(NetnsError):
    """The name names no namespace: a mistake on the command line (exit status 2)."""


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise NoSuchNetns(f"invalid network namespace name: {name!r}")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise NoSuchNetns(f"network namespace {name!r} does not exist (no {path}; see `ip netns list`)")
    return path


def is_pattern(name: str) -> bool:
    """`--netns 'ct-*'`: a shell pattern naming every namespace it matches, now and later."""
    return any(c in name for c in "*?[")


def names() -> list[str]:
    """The named namespaces (`ip netns list`), sorted."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def matching(patterns: Iterable[str]) -> list[str]:
    """The named namespaces that one of `patterns` matches (a plain name matches itself)."""
    patterns = list(patterns)
    return [n for n in names() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


class Held:
    """A named namespace kept open: it says when its name is gone (`ip netns del`, or the name
    given to another namespace), and `path` still enters it then (/proc/PID/fd/N: the kernel
    keeps a namespace alive while a file or a socket refers to it)."""

    def __init__(self, name: str):
        self.name = name
        self._fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._id = (st.st_dev, st.st_ino)

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def gone(self) -> bool:
        try:
            st = os.stat(os.path.join(NETNS_RUN_DIR, self.name))
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._id

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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


def command(argv: list[str], netns: str | None, path: str | None = None) -> list[str]:
    """Prefix argv so that it runs inside `netns`, entered through the file `path` if given
    (a `Held` namespace, whose name may be gone)."""
    if path is not None:
        return ["nsenter", f"--net={path}", *argv]
    if netns is None:
        return argv
    netns_path(netns)
    return ["ip", "netns", "exec", netns, *argv]
