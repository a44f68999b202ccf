"""The guard: a frozen daemon must not hold the host's traffic.

The kernel never times out a queued packet, so a daemon that is stopped (SIGSTOP, a debugger)
or stuck (a hung disk write) but still bound would stall every sender behind its queue. The
guard is a small child process that shares the queue's netlink socket (the same portid, so the
kernel takes its verdicts). The daemon notes in shared memory each time it reads the queue; when
packets have waited a whole GUARD_CHECK without the daemon reading any, the guard accepts all
that are queued, unseen, and keeps doing so until the daemon reads again. Those packets pass
unattributed and are recorded as unaccounted (the counting rule counted them, the engine never
saw them), with their own reason.

The guard dies with the daemon (PR_SET_PDEATHSIG), so a killed daemon never leaves the queue
bound by a process that only accepts; the daemon stops it before it closes the queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import signal
import socket
import struct
import time

from . import netlink
from .queue import NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET, RECV_SIZE, parse_packet, verdict_message

GUARD_CHECK = 0.25  # seconds between looks: a stall lasts at most about two of them
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
# Two 8-byte slots, one writer each: reads by the daemon (offset 0), packets accepted by the
# guard (offset 8); neither process ever writes the other's.
_slot = struct.Struct("=Q")
_READS, _ACCEPTED = 0, 8


class Guard:
    def __init__(self, queue_fd: int, queue_number: int):
        self._mem = mmap.mmap(-1, 2 * _slot.size)  # anonymous and shared with the child
        self._reads = 0
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 0
            try:
                _watch(queue_fd, queue_number, self._mem, parent)
            except BaseException:
                code = 1
            os._exit(code)

    def beat(self) -> None:
        """The daemon reads the queue (called at each read; cheap: no system call)."""
        self._reads += 1
        _slot.pack_into(self._mem, _READS, self._reads)

    @property
    def accepted(self) -> int:
        """Packets the guard accepted unseen since it started."""
        return _slot.unpack_from(self._mem, _ACCEPTED)[0]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._mem.close()


def _watch(queue_fd: int, queue_number: int, mem: mmap.mmap, parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_NAME, b"nfacct-guard")  # in ps and top, not a second `nfacct run`
    if os.getppid() != parent:  # the daemon died before the line above took effect
        return
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the daemon's handlers are not ours
        signal.signal(s, signal.SIG_DFL)
    # The queue's socket only: a copy of anything else the daemon had open when it forked us
    # would outlive the daemon's own close. Another namespace's queue would stay bound after the
    # daemon dropped it, a control client would never see its answer end.
    os.closerange(3, queue_fd)
    os.closerange(queue_fd + 1, os.sysconf("SC_OPEN_MAX"))
    sock = socket.socket(fileno=os.dup(queue_fd))
    sock.setblocking(False)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    waited, last_reads, stalled = False, -1, False
    while True:
        if stalled:
            # Keep the queue moving, at once, until the daemon reads again.
            ready = select.select([sock], [], [], GUARD_CHECK / 10)[0]
            reads = _slot.unpack_from(mem, _READS)[0]
            if reads != last_reads:
                stalled, waited = False, False
            elif ready:
                _add_accepted(mem, _accept_all(sock, buf, view, queue_number))
            continue
        time.sleep(GUARD_CHECK)
        reads = _slot.unpack_from(mem, _READS)[0]
        waiting = bool(select.select([sock], [], [], 0)[0])
        # Packets waited a whole look without the daemon reading one: it is stopped or stuck.
        stalled = waiting and waited and reads == last_reads
        if stalled:
            _add_accepted(mem, _accept_all(sock, buf, view, queue_number))
        waited, last_reads = waiting, reads


def _add_accepted(mem: mmap.mmap, count: int) -> None:
    _slot.pack_into(mem, _ACCEPTED, _slot.unpack_from(mem, _ACCEPTED)[0] + count)


def _accept_all(sock: socket.socket, buf: bytearray, view: memoryview, queue_number: int) -> int:
    """Read every queued packet and accept them all with one batch verdict."""
    newest, count = -1, 0
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            break
        except OSError:  # ENOBUFS: some were lost to a full buffer; the ledger counts them
            continue
        for m in netlink.messages(view[:n]):
            if m.type == _PACKET:
                fields = parse_packet(view[:n], m.start, m.end)
                if fields is not None:  # read in the kernel's order: the last is the newest
                    newest, count = fields[0], count + 1
    if newest >= 0:
        # Every packet up to the newest, the daemon's held ones included: the daemon's own
        # verdicts for those later find them gone, which the kernel answers with an error
        # message the daemon ignores.
        sock.sendall(verdict_message(queue_number, newest, batch=True))
    return count
