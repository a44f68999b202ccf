"""Processes: which thread group holds a socket inode, and the facts we record about it.

The socket→process map is an index of /proc/<pid>/fd links, refreshed on a miss. sock_diag
tells the socket's uid, so processes of that uid are scanned first; that is cheap on a host
where most processes belong to other users. File descriptor tables are shared by the threads of
a group, so the index is per thread group (the /proc/<pid> entries), as netatop's taskinfo is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

PROC = "/proc"


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    btime: float  # process start, epoch seconds (with the pid, identifies the process)
    comm: str
    cmdline: str
    uid: int


def _pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def socket_inodes(pid: int) -> list[int]:
    """Inodes of the sockets process `pid` has open ([] if it is gone or inaccessible)."""
    fd_dir = f"{PROC}/{pid}/fd"
    inodes = []
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"{PROC}/{pid}").st_uid
    except OSError:
        return None


def process_facts(pid: int) -> ProcessFacts | None:
    """Facts of a live process, or None if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            btime = p.create_time()
            uid = p.uids().real
            cmdline = " ".join(p.cmdline())
        with open(f"{PROC}/{pid}/comm", "rb") as f:
            comm = f.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
    except (psutil.Error, OSError):
        return None
    return ProcessFacts(pid, btime, comm, cmdline, uid)


class SocketIndex:
    """socket inode → pid, learned from /proc and refreshed on a miss."""

    def __init__(self) -> None:
        self._owner: dict[int, int] = {}
        self.scans = 0

    def _scan(self, pids: list[int], index: dict[int, int]) -> None:
        self.scans += 1
        for pid in pids:
            for inode in socket_inodes(pid):
                index[inode] = pid

    def owner(self, inode: int, uid: int | None = None) -> int | None:
        """The pid holding `inode`, scanning /proc if the index does not know it (or is stale)."""
        pid = self._owner.get(inode)
        if pid is not None and inode in socket_inodes(pid):
            return pid
        self._owner.pop(inode, None)
        pids = _pids()
        if uid is not None:
            self._scan([p for p in pids if process_uid(p) == uid], self._owner)
            if inode in self._owner:
                return self._owner[inode]
        # A full scan rebuilds the index, so sockets closed since the last one are forgotten.
        self._owner = {}
        self._scan(pids, self._owner)
        return self._owner.get(inode)

    def __len__(self) -> int:
        return len(self._owner)
