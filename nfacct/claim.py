"""One daemon per network namespace: a lock file that says which daemon accounts it.

Two daemons in one namespace take the queue rules from each other: the second moves them to its
own queue and the first reports the packets it no longer sees as lost. So a daemon claims the
namespace before it changes anything, and a second one is refused with the first one's pid and
control socket, unless it comes to take over (it then waits for the predecessor to let go).

The lock is flock(2) on /run/nfacct/netns-<dev>-<inode>.lock, keyed by the namespace's identity
(two names for one namespace are one claim). The kernel releases it when the holder dies, even
by SIGKILL, so a crash never leaves a stale claim. Only root can create files there, so no
user can claim a namespace first to keep the daemon out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from . import netns
from .files import make_dirs

CLAIM_DIR = "/run/nfacct"


class ClaimError(Exception):
    """The namespace is accounted by another daemon; the message says which and what to do."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


def claim_path(netns_name: str | None, directory: str = CLAIM_DIR) -> str:
    st = os.stat(netns.netns_path(netns_name) if netns_name else "/proc/self/ns/net")
    return os.path.join(directory, f"netns-{st.st_dev}-{st.st_ino}.lock")


def _read_holder(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data else {}
        return holder if isinstance(holder, dict) else {}
    return {}


class Claim:
    """This daemon's claim on a namespace; `release()` (or exit) gives it up."""

    def __init__(
        self, netns_name: str | None, control_path: str, wait: float = 0.0, directory: str = CLAIM_DIR
    ):
        self.path = claim_path(netns_name, directory)
        self.created_dirs = make_dirs(directory, 0o755)
        where = f"network namespace {netns_name!r}" if netns_name else "this network namespace"
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                other = holder.get("control", "?")
                raise ClaimError(
                    f"{where} is already accounted by nfacct pid {holder.get('pid', '?')} (control socket"
                    f" {other}); stop it first, or replace it without a gap: nfacct run --takeover"
                    f" --control {other}",
                    holder,
                ) from None
            # A releasing holder unlinks the file before it unlocks it: if we locked a file that
            # is no longer at the path, another daemon may lock the new one; start again.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        self._fd: int | None = fd
        info = {"pid": os.getpid(), "control": os.path.abspath(control_path), "netns": netns_name}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def holder(netns_name: str | None, directory: str = CLAIM_DIR) -> dict | None:
    """Who holds the claim on a namespace (pid, control, netns), or None if nobody does."""
    try:
        fd = os.open(claim_path(netns_name, directory), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None
