"""Process events from the proc connector: exit, fork and exec as they happen.

NETLINK_CONNECTOR, CN_IDX_PROC, PROC_CN_MCAST_LISTEN: a netlink multicast group that the
kernel only serves in the initial network namespace (elsewhere the subscription is refused
with ECONNREFUSED), which is why the daemon stays in the root namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from typing import NamedTuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

_nlmsghdr = struct.Struct("=IHHII")
_cn_msg = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_event_head = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_two = struct.Struct("=ii")
_four = struct.Struct("=iiii")


class EventsUnavailable(Exception):
    pass


class ProcEvent(NamedTuple):
    kind: str  # "fork", "exec", "exit"
    pid: int  # the thread
    tgid: int  # its thread group (the process)
    parent_tgid: int = 0


def subscribe_message(op: int = PROC_CN_MCAST_LISTEN) -> bytes:
    payload = struct.pack("=I", op)
    cn = _cn_msg.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _nlmsghdr.pack(_nlmsghdr.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def parse_events(buf: bytes) -> list[ProcEvent]:
    events = []
    off = 0
    while off + _nlmsghdr.size <= len(buf):
        length = _nlmsghdr.unpack_from(buf, off)[0]
        end = off + length
        # A message cut off by the end of the datagram is dropped, and each event is read only
        # if its message holds it: struct.error out of here would stop the daemon's loop.
        if length < _nlmsghdr.size or end > len(buf):
            break
        body = off + _nlmsghdr.size + _cn_msg.size
        if body + _event_head.size <= end:
            what = _event_head.unpack_from(buf, body)[0]
            data = body + _event_head.size
            if what == PROC_EVENT_EXIT and data + _two.size <= end:
                pid, tgid = _two.unpack_from(buf, data)
                events.append(ProcEvent("exit", pid, tgid))
            elif what == PROC_EVENT_FORK and data + _four.size <= end:
                _ppid, ptgid, pid, tgid = _four.unpack_from(buf, data)
                events.append(ProcEvent("fork", pid, tgid, ptgid))
            elif what == PROC_EVENT_EXEC and data + _two.size <= end:
                pid, tgid = _two.unpack_from(buf, data)
                events.append(ProcEvent("exec", pid, tgid))
        off += (length + 3) & ~3
    return events


class ProcConnector:
    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            raise EventsUnavailable(f"no proc connector: {e.strerror}") from e
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._sock.bind((0, CN_IDX_PROC))
            self._sock.send(subscribe_message())
        except OSError as e:
            self._sock.close()
            raise EventsUnavailable(f"proc connector refused the subscription: {e.strerror}") from e
        self._sock.setblocking(False)
        self.overruns = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[ProcEvent]:
        """Events waiting on the socket. An overrun (ENOBUFS) is counted: events were lost."""
        events: list[ProcEvent] = []
        while True:
            try:
                buf = self._sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            events += parse_events(buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.send(subscribe_message(PROC_CN_MCAST_IGNORE))
        self._sock.close()
