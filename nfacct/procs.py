"""Processes: which thread group holds a socket inode, and the facts we record about it.

The socket→process map is an index of /proc/<pid>/fd links, refreshed on a miss. sock_diag
tells the socket's uid, so processes of that uid are scanned first; that is cheap on a host
where most processes belong to other users. File descriptor tables are shared by the threads of
a group, so the index is per thread group (the /proc/<pid> entries), as netatop's taskinfo is.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import text

PROC = "/proc"
# Descriptors a whole read of /proc/PID/fd takes between pauses (SocketIndex): 4-14 ms of readlink.
PAUSE_EVERY = 1024


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    btime: float  # process start, epoch seconds (with the pid, identifies the process)
    # Bytes any user chooses, kept exact as 'surrogateescape' str (see `text`).
    comm: str
    cmdline: str  # arguments joined by spaces
    uid: int
    cgroup: str  # cgroup v2 path ("" if unknown)


def _pids_newest_first() -> list[int]:
    # Newer processes are likelier owners of a socket we have not seen yet.
    return sorted((int(name) for name in os.listdir(PROC) if name.isdigit()), reverse=True)


def _socket_links(pid: int, pause: Callable[[], None] = lambda: None) -> list[tuple[str, int]]:
    """(fd, inode) of the sockets process `pid` has open; OSError if its fd directory cannot be
    listed (gone, or another user's without CAP_SYS_PTRACE: PermissionError). `pause` is called
    every PAUSE_EVERY descriptors read (see SocketIndex)."""
    fd_dir = f"{PROC}/{pid}/fd"
    found = []
    for n, name in enumerate(os.listdir(fd_dir), 1):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.append((name, int(target[8:-1])))
        if n % PAUSE_EVERY == 0:
            pause()
    return found


def socket_holders(pids: list[int] | None = None) -> tuple[dict[int, list[tuple[int, int]]], int]:
    """socket inode → [(pid, fd)] of every process in `pids` (None: all) that holds it, and how
    many of those processes' descriptors we may not read (another user's, without root)."""
    holders: dict[int, list[tuple[int, int]]] = {}
    denied = 0
    for pid in _pids_newest_first() if pids is None else pids:
        try:
            links = _socket_links(pid)
        except PermissionError:
            denied += 1
            continue
        except OSError:  # gone meanwhile
            continue
        for fd, inode in links:
            holders.setdefault(inode, []).append((pid, int(fd)))
    return holders, denied


def _comm(pid: int) -> bytes:
    """The process's name: /proc adds one newline, and the name itself may end with one."""
    raw = _read(pid, "comm")
    return raw[:-1] if raw.endswith(b"\n") else raw


def process_name(pid: int) -> str | None:
    """The process's name (comm) as `text.decode` keeps it, or None if it is gone."""
    try:
        return text.decode(_comm(pid))
    except OSError:
        return None


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"{PROC}/{pid}").st_uid
    except OSError:
        return None


def process_facts(pid: int, known: ProcessFacts | None = None) -> ProcessFacts | None:
    """Facts of a live process, or None if it is gone.

    `known` are facts read earlier for this pid: if the process is still that one (same start
    time) they are returned as they are, for one read of /proc/PID/stat instead of four reads.
    Whoever keeps them must drop them when the process execs (its name and arguments change).
    """
    try:
        comm, _state, btime = _stat(pid)
        if known is not None and known.pid == pid and abs(known.btime - btime) < 0.01:
            return known
        uid = _real_uid(pid)
        cgroup = read_cgroup(pid)
        cmdline = _read(pid, "cmdline")
    except (OSError, ValueError, IndexError):
        return None
    # cmdline is read as bytes, not through psutil, which decodes with the locale's encoding:
    # a daemon started under a Latin-1 locale would store other bytes.
    return ProcessFacts(pid, btime, text.decode(comm), _joined(cmdline), uid, cgroup)


# Read directly rather than through psutil.Process (create_time, uids), which took 59 µs of the
# 98 µs process_facts cost (2026-11-25), rereading /proc/stat's boot time on every call: in the
# connections benchmark that was 17% of the daemon's CPU. psutil computes create_time the same
# way (boot time + starttime / clock ticks), so the values match its own.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@functools.cache
def boot_time() -> float:
    """The kernel's boot time, epoch seconds; read once, so every start time of this process is
    computed against the same one even if the wall clock is stepped."""
    with open(f"{PROC}/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError(f"{PROC}/stat has no btime line")


def _stat(pid: int) -> tuple[bytes, bytes, float]:
    """(comm, state, start time in epoch seconds) from /proc/PID/stat. The name sits between
    the first '(' and the last ')': it may contain either, and spaces."""
    raw = _read(pid, "stat")
    close = raw.rindex(b")")
    fields = raw[close + 2 :].split(b" ", 20)
    return raw[raw.index(b"(") + 1 : close], fields[0], boot_time() + int(fields[19]) / CLOCK_TICKS


def _real_uid(pid: int) -> int:
    for line in _read(pid, "status").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no Uid line")


def _read(pid: int, name: str) -> bytes:
    # os.open and os.read, not open(): no buffered file object for a file read once. 4 µs less
    # a file (7.7 against 12.0 µs for /proc/PID/stat, 2026-11-25), and a new process's facts
    # read four files.
    fd = os.open(f"{PROC}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 8192):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _joined(cmdline: bytes) -> str:
    """/proc/PID/cmdline (NUL-terminated arguments) as one line, arguments separated by spaces."""
    if cmdline.endswith(b"\0"):
        cmdline = cmdline[:-1]
    return text.decode(cmdline.replace(b"\0", b" "))


def read_cgroup(pid: int) -> str:
    """The process's cgroup v2 path; a user may name a cgroup with any bytes but a newline."""
    for line in _read(pid, "cgroup").splitlines():
        if line.startswith(b"0::"):
            return text.decode(line[3:])
    return ""


def is_alive(pid: int, btime: float) -> bool:
    """Whether process (pid, btime) still runs: not gone, not a zombie, pid not reused."""
    try:
        _comm, state, started = _stat(pid)
    except (OSError, ValueError, IndexError):
        return False
    return state != b"Z" and abs(started - btime) < 0.01


FACTS_KEPT = 4096  # owners whose facts are kept; exit events keep the dict far smaller


class SocketIndex:
    """What /proc told us of processes: socket inode → (pid, fd), learned and refreshed on a
    miss, and the facts of the owners found (`facts`). One for every accounted namespace: socket
    inodes and pids are the host's.

    A miss is searched in order of likelihood: processes that recently owned new sockets (a
    client opening connection after connection), then processes of the socket's uid, then all,
    newest first; so a busy client costs one small fd directory read per new flow.

    A recent process read before is first probed rather than read again: only the descriptors
    above the highest socket found in it, where a process that keeps opening sockets puts the
    next ones. Reading a whole directory of 18,000 sockets took 73 ms (9.5 ms to list it, then
    a readlink each); at 3,000 new flows a second from such processes the daemon fell seconds
    behind and the kernel passed 3% of the flows unseen (bench/modes.py, 100,000 flows). A
    probe that misses (a descriptor number reused) falls back to the whole read.

    A whole read calls `pause` every PAUSE_EVERY descriptors: the daemon serves its queues
    there. Reading the first time one of six processes holding 18,000 sockets each took the
    loop 520-600 ms with the machine busy, and the guard, seeing the queue unread for a whole
    GUARD_CHECK, passed 3,300 packets unseen (bench/modes.py, 100,000 flows, 2026-11-25).
    """

    RECENT = 16
    PROBE_GAP = 4  # absent descriptor numbers in a row that end a probe

    def __init__(self, pause: Callable[[], None] = lambda: None) -> None:
        self.pause = pause
        # inode → pid << 32 | fd: one int per socket, not a (pid, "fd") tuple. At 100,000 sockets
        # the index took 226 bytes a socket with tuples, 116 with one int (tracemalloc, 2026-11-25).
        self._owner: dict[int, int] = {}
        self._recent: deque[int] = deque(maxlen=self.RECENT)
        self._highest: dict[int, int] = {}  # pid → its highest socket descriptor when last read
        # Facts of owners found before, by pid: a long-lived client's next connection costs one
        # read of /proc/PID/stat (13 µs) instead of four reads (58 µs). Dropped on exec and exit.
        self._facts: dict[int, ProcessFacts] = {}
        self.scans = 0
        self.probes = 0
        self.full_scans = 0

    def _scan(self, pid: int, index: dict[int, int]) -> None:
        self.scans += 1
        try:
            links = _socket_links(pid, self.pause)
        except OSError:  # gone, or another user's without the capability
            return
        highest = -1
        for name, inode in links:
            fd = int(name)
            index[inode] = pid << 32 | fd
            highest = max(highest, fd)
        self._highest[pid] = highest

    def _probe(self, pid: int, highest: int) -> None:
        """Read `pid`'s descriptors above `highest` until PROBE_GAP numbers in a row are absent."""
        self.probes += 1
        fd, absent = highest + 1, 0
        while absent < self.PROBE_GAP:
            try:
                target = os.readlink(f"{PROC}/{pid}/fd/{fd}")
            except FileNotFoundError:
                absent += 1
            except OSError:  # another user's, without the capability: the whole read says so
                return
            else:
                absent = 0
                if target.startswith("socket:["):
                    self._owner[int(target[8:-1])] = pid << 32 | fd
                    highest = fd
            fd += 1
        self._highest[pid] = highest

    def _known(self, inode: int) -> int | None:
        hit = self._owner.get(inode)
        if hit is None:
            return None
        pid, fd = hit >> 32, hit & 0xFFFFFFFF
        try:
            if os.readlink(f"{PROC}/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return pid
        except OSError:
            pass
        del self._owner[inode]
        return None

    def owner(self, inode: int, uid: int | None = None) -> int | None:
        """The pid holding `inode`, or None if no live process has it open."""
        pid = self._known(inode)
        if pid is not None:
            return pid
        for pid in reversed(self._recent):  # newest first: a fork just seen is the likeliest owner
            highest = self._highest.get(pid)
            if highest is None:
                self._scan(pid, self._owner)
            else:
                self._probe(pid, highest)
            if inode in self._owner:
                return self._found(inode)
        scanned = set()
        for pid in reversed(self._recent):  # the probes missed: read the probed ones whole
            scanned.add(pid)
            if pid in self._highest:
                self._scan(pid, self._owner)
                if inode in self._owner:
                    return self._found(inode)
        pids = _pids_newest_first()
        if uid is not None:
            for pid in pids:
                if pid not in scanned and process_uid(pid) == uid:
                    scanned.add(pid)
                    self._scan(pid, self._owner)
                    if inode in self._owner:
                        return self._found(inode)
        # A full scan rebuilds the index, so sockets closed since the last one are forgotten.
        self.full_scans += 1
        fresh: dict[int, int] = {}
        self._highest = {}
        for pid in pids:
            self._scan(pid, fresh)
        self._owner = fresh
        return self._found(inode) if inode in fresh else None

    def facts(self, pid: int) -> ProcessFacts | None:
        """The facts of process `pid` (None: it is gone), kept until `forget`."""
        facts = process_facts(pid, self._facts.get(pid))
        if facts is None:
            self._facts.pop(pid, None)
        else:
            if len(self._facts) >= FACTS_KEPT:
                del self._facts[next(iter(self._facts))]  # the oldest entry
            self._facts[pid] = facts
        return facts

    def forget(self, pid: int | None = None) -> None:
        """Process `pid` execed or exited (None: any may have, events were lost): its facts are
        read anew next time, and its descriptors read whole (an exec closes some)."""
        if pid is None:
            self._facts.clear()
            self._highest.clear()
        else:
            self._facts.pop(pid, None)
            self._highest.pop(pid, None)

    def note_new_process(self, pid: int) -> None:
        """A fork: the child shares its parent's sockets and may soon open its own."""
        if pid not in self._recent:
            self._recent.append(pid)

    def _found(self, inode: int) -> int:
        pid = self._owner[inode] >> 32
        if pid not in self._recent:
            self._recent.append(pid)
        return pid

    def __len__(self) -> int:
        return len(self._owner)
