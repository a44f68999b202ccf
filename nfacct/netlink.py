"""The netlink core every family stands on: message header, message and attribute walks, error
answers, and the non-blocking reader of a multicast group.

In the spirit of pyroute2's core, which nfacct does not use (sockdiag.py says why). Families
(sock_diag, the proc connector, nfnetlink_queue) only lay out and read their own payloads here.

Everything that reads a buffer is total: the kernel does not send malformed messages, but one
exception in the daemon's loop stops the accounting of the whole host, so a bad length ends a walk
(as the kernel's own nlmsg_ok() and nla_ok() do) instead of raising struct.error.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from typing import Generic, NamedTuple, TypeVar

from . import netns

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_MULTI = 2
NLM_F_ACK = 4
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

RECV_SIZE = 1 << 16  # more than the kernel puts in one datagram (a dump fills at most 32 KiB)

_nlmsghdr = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_nlattr = struct.Struct("=HH")  # length, type
_error_code = struct.Struct("=i")
NLMSG_HDRLEN = _nlmsghdr.size
NLA_HDRLEN = _nlattr.size


class NetlinkError(Exception):
    """A malformed message where the caller needs an answer (an error code, a whole answer)."""


class SubscribeError(OSError):
    """The kernel refused to subscribe a reader: its socket exists, but no event will reach it."""


class Message(NamedTuple):
    """One message of a datagram: its header fields and where its payload lies in the buffer."""

    type: int
    flags: int
    seq: int
    pid: int
    start: int  # the payload's offset
    end: int  # where the payload ends by the length field: past the buffer for a partial message


def align(n: int) -> int:
    """NLMSG_ALIGN / NLA_ALIGN: messages and attributes start on 4-byte boundaries."""
    return (n + 3) & ~3


def pack_message(msg_type: int, payload: bytes, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    return _nlmsghdr.pack(NLMSG_HDRLEN + len(payload), msg_type, flags, seq, pid) + payload


def pack_attr(attr_type: int, payload: bytes) -> bytes:
    return _nlattr.pack(NLA_HDRLEN + len(payload), attr_type) + payload + bytes(-len(payload) % 4)


def messages(buf: bytes, *, partial: bool = False, strict: bool = False) -> Iterator[Message]:
    """The messages of one datagram, in order.

    A length below the header's own size ends the walk, since nothing after it can be found: quietly,
    or with NetlinkError if `strict` (a reader waiting for the end of an answer must not wait
    forever). A message that runs past the end of the buffer is the last one: dropped, or yielded
    if `partial` (its `end` is then past the buffer, and a reader must check what it reads).
    """
    off, size = 0, len(buf)
    while off + NLMSG_HDRLEN <= size:
        length, msg_type, flags, seq, pid = _nlmsghdr.unpack_from(buf, off)
        if length < NLMSG_HDRLEN:
            if strict:
                raise NetlinkError("malformed answer")
            return
        if off + length > size and not partial:
            return
        yield Message(msg_type, flags, seq, pid, off + NLMSG_HDRLEN, off + length)
        off += align(length)


def error_code(buf: bytes, msg: Message) -> int:
    """The errno an NLMSG_ERROR answers with: 0 for an acknowledgement.

    Raises NetlinkError when the message cannot hold a code or holds one that is no errno (the
    kernel sends 0 or a negative errno above -4096; os.strerror() raises OverflowError on INT_MIN).
    """
    if msg.end - msg.start < _error_code.size or msg.start + _error_code.size > len(buf):
        raise NetlinkError("malformed answer")
    (err,) = _error_code.unpack_from(buf, msg.start)
    if not -4096 < err <= 0:
        raise NetlinkError(f"malformed error code {err}")
    return -err


def attributes(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in buf[start:end].

    A malformed attribute ends the walk: the kernel's nla_ok() stops there too.
    """
    pos = start
    while pos + NLA_HDRLEN <= end:
        length, attr_type = _nlattr.unpack_from(buf, pos)
        if length < NLA_HDRLEN or pos + length > end:
            return
        yield attr_type & NLA_TYPE_MASK, pos + NLA_HDRLEN, pos + length
        pos += align(length)


def open_socket(protocol: int, netns_name: str | None = None, kind: int = socket.SOCK_RAW) -> socket.socket:
    """A netlink socket of `protocol`, in namespace `netns_name` (None: ours) for good: a socket
    keeps the namespace it was created in."""
    with netns.entered(netns_name):
        return socket.socket(socket.AF_NETLINK, kind, protocol)


T = TypeVar("T")


class MulticastReader(Generic[T]):
    """A non-blocking netlink socket the kernel multicasts events to, drained by `read()`.

    A subclass joins its groups in `_subscribe` and turns one datagram into items in `_parse`.
    """

    def __init__(
        self, protocol: int, rcvbuf: int, netns_name: str | None = None, kind: int = socket.SOCK_RAW
    ) -> None:
        """Socket creation errors propagate as they are (OSError, NetnsError); the rest are a
        SubscribeError."""
        self._sock = open_socket(protocol, netns_name, kind)
        try:
            # The kernel drops events beyond this (capped by net.core.rmem_max) while we are busy.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._subscribe()
        except OSError as e:
            self._sock.close()
            raise SubscribeError(e.errno, e.strerror) from e
        self._sock.setblocking(False)
        self.overruns = 0  # times the kernel dropped events for want of room: some were lost

    def _subscribe(self) -> None:
        raise NotImplementedError

    def _parse(self, buf: bytes, groups: int) -> list[T]:
        """The items of one datagram sent to the multicast `groups` (a bit mask)."""
        raise NotImplementedError

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[T]:
        """Everything waiting on the socket: reads until none is left, so one readiness empties the
        queue and the receive buffer has all its room for what comes while we work."""
        out: list[T] = []
        while True:
            try:
                buf, (_pid, groups) = self._sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # reported once per overrun; reading goes on
                    self.overruns += 1
                    continue
                raise
            out += self._parse(buf, groups)

    def close(self) -> None:
        self._sock.close()
