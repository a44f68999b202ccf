"""Process events from the proc connector: exit, fork and exec as they happen.

NETLINK_CONNECTOR, CN_IDX_PROC, PROC_CN_MCAST_LISTEN: a netlink multicast group that the
kernel only serves in the initial network namespace (elsewhere the subscription is refused
with ECONNREFUSED), which is why the daemon stays in the root namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import NamedTuple

from . import netlink
from .netlink import NLMSG_DONE, SubscribeError

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
RCVBUF = 4 << 20

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

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
    return netlink.pack_message(NLMSG_DONE, cn, pid=os.getpid())


def parse_events(buf: bytes) -> list[ProcEvent]:
    events = []
    # Whole messages only: one cut off by the end of the datagram is dropped, and each event is
    # read only if its message holds it: struct.error out of here would stop the daemon's loop.
    for m in netlink.messages(buf):
        body = m.start + _cn_msg.size
        if body + _event_head.size <= m.end:
            what = _event_head.unpack_from(buf, body)[0]
            data = body + _event_head.size
            if what == PROC_EVENT_EXIT and data + _two.size <= m.end:
                pid, tgid = _two.unpack_from(buf, data)
                events.append(ProcEvent("exit", pid, tgid))
            elif what == PROC_EVENT_FORK and data + _four.size <= m.end:
                _ppid, ptgid, pid, tgid = _four.unpack_from(buf, data)
                events.append(ProcEvent("fork", pid, tgid, ptgid))
            elif what == PROC_EVENT_EXEC and data + _two.size <= m.end:
                pid, tgid = _two.unpack_from(buf, data)
                events.append(ProcEvent("exec", pid, tgid))
    return events


class ProcConnector(netlink.MulticastReader[ProcEvent]):
    """Exit, fork and exec events of every process; `read()` gives those waiting, and an overrun
    (events lost) is counted in `overruns`."""

    def __init__(self) -> None:
        try:
            super().__init__(NETLINK_CONNECTOR, RCVBUF, kind=socket.SOCK_DGRAM)
        except SubscribeError as e:
            raise EventsUnavailable(f"proc connector refused the subscription: {e.strerror}") from e
        except OSError as e:
            raise EventsUnavailable(f"no proc connector: {e.strerror}") from e

    def _subscribe(self) -> None:
        self._sock.bind((0, CN_IDX_PROC))
        self._sock.send(subscribe_message())

    def _parse(self, buf: bytes, groups: int) -> list[ProcEvent]:
        return parse_events(buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.send(subscribe_message(PROC_CN_MCAST_IGNORE))
        super().close()
