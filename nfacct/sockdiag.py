"""sock_diag netlink: which socket owns a flow, and what the kernel says of every socket.

Hand-written rather than pyroute2: pyroute2's DiagSocket only dumps, and its marshal disables
NLMSG_ERROR (type 2 collides with AF_INET at the family offset), so an exact lookup's ENOENT
cannot be told apart from an answer. An exact lookup is one request and one reply.

`dump_details` (for `nfacct sockets`) asks for the extensions too: tcp_info, congestion control,
TOS/TCLASS, socket memory, shutdown, and reads what the kernel adds unasked (IPV6_V6ONLY of
listening and unconnected sockets, the mark for CAP_NET_ADMIN, INET_DIAG_SOCKOPT from 5.10).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from . import netlink
from .netlink import (
    NETLINK_ADD_MEMBERSHIP,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    NetlinkError,
    SubscribeError,
)
from .packet import TCP, UDP

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
# Datagrams of a dump read between pauses: up to 32 KiB each, some 300 sockets
DUMP_PAUSE_EVERY = 16
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
# Attributes of an inet_diag_msg (linux/inet_diag.h). Those up to SHUTDOWN come when asked for
# (bit n-1 of idiag_ext asks for attribute n); the others whenever they apply.
INET_DIAG_INFO = 2  # struct tcp_info
INET_DIAG_CONG = 4  # congestion control algorithm, NUL-terminated
INET_DIAG_TOS = 5
INET_DIAG_TCLASS = 6  # IPv6 sockets
INET_DIAG_SKMEMINFO = 7  # u32 array, SK_MEMINFO_*
INET_DIAG_SHUTDOWN = 8
INET_DIAG_SKV6ONLY = 11  # IPv6 sockets in LISTEN or CLOSE state
INET_DIAG_MARK = 15  # only to a requester with CAP_NET_ADMIN
INET_DIAG_CGROUP_ID = 21
INET_DIAG_SOCKOPT = 22  # struct inet_diag_sockopt, kernel >= 5.10
DETAIL_EXTENSIONS = sum(
    1 << (a - 1)
    for a in (
        INET_DIAG_INFO,
        INET_DIAG_CONG,
        INET_DIAG_TOS,
        INET_DIAG_TCLASS,
        INET_DIAG_SKMEMINFO,
        INET_DIAG_SHUTDOWN,
    )
)

TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_TIME_WAIT, TCP_CLOSE, TCP_LISTEN = 1, 2, 3, 6, 7, 10
ALL_STATES = 0xFFFFFFFF

# inet_diag_msg: family, state, timer, retrans, sockid (48 B), expires, rqueue, wqueue, uid, inode
_msg = struct.Struct("=BBBB")
_sockid = struct.Struct("!HH16s16s")
_tail = struct.Struct("=IIIIIIII")  # idiag_if, cookie (2), expires, rqueue, wqueue, uid, inode
_MSG_SIZE = 72
_V4MAPPED = bytes(10) + b"\xff\xff"


class SockDiagError(Exception):
    pass


@dataclass(frozen=True)
class SockEntry:
    family: int
    state: int
    local: bytes
    lport: int
    remote: bytes
    rport: int
    uid: int
    inode: int
    cgroup_id: int


# Timers (inet_diag_msg.idiag_timer), named as `netstat -o` names them.
TIMER_NAMES = {0: "off", 1: "on", 2: "keepalive", 3: "timewait", 4: "probe"}

# struct tcp_info (linux/tcp.h): (name, offset, struct format) of the fields `nfacct sockets`
# reports. The kernel sends as much of the struct as it knows, older kernels less: a field past
# the end of the attribute is left out (snd_wnd came in 5.4, rcv_wnd in 6.2).
TCP_INFO_FIELDS = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("probes", 3, "B"),
    ("backoff", 4, "B"),
    ("options", 5, "B"),
    ("rto", 8, "I"),
    ("ato", 12, "I"),
    ("snd_mss", 16, "I"),
    ("rcv_mss", 20, "I"),
    ("unacked", 24, "I"),
    ("sacked", 28, "I"),
    ("lost", 32, "I"),
    ("retrans", 36, "I"),
    ("last_data_sent", 44, "I"),
    ("last_data_recv", 52, "I"),
    ("last_ack_recv", 56, "I"),
    ("pmtu", 60, "I"),
    ("rcv_ssthresh", 64, "I"),
    ("rtt", 68, "I"),
    ("rttvar", 72, "I"),
    ("snd_ssthresh", 76, "I"),
    ("snd_cwnd", 80, "I"),
    ("advmss", 84, "I"),
    ("reordering", 88, "I"),
    ("rcv_rtt", 92, "I"),
    ("rcv_space", 96, "I"),
    ("total_retrans", 100, "I"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("segs_out", 136, "I"),
    ("segs_in", 140, "I"),
    ("notsent_bytes", 144, "I"),
    ("min_rtt", 148, "I"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
    ("snd_wnd", 228, "I"),
    ("rcv_wnd", 232, "I"),
)
_TCP_INFO = [(name, off, struct.Struct("=" + fmt)) for name, off, fmt in TCP_INFO_FIELDS]
SK_MEMINFO_FIELDS = (
    "rmem_alloc", "rcvbuf", "wmem_alloc", "sndbuf", "fwd_alloc", "wmem_queued", "optmem", "backlog", "drops",
)  # fmt: skip


@dataclass(frozen=True)
class SockDetail:
    """One socket of a detailed dump: `entry` as `dump` gives it, and what else the kernel said.

    An attribute the kernel did not send is None (an older kernel, a TIME_WAIT or SYN_RECV
    socket, which carry none, or a field that does not apply to the family or protocol).
    """

    entry: SockEntry
    proto: int
    src: bytes  # local and remote addresses as the kernel gives them (IPv4-mapped kept)
    dst: bytes
    ifindex: int  # the device the socket is bound to (SO_BINDTODEVICE), 0 if none
    cookie: int
    timer: int
    retrans: int
    expires: int  # milliseconds until the timer fires
    rqueue: int
    wqueue: int
    tcp_info: dict[str, int] | None = None
    cong: str | None = None
    tos: int | None = None
    tclass: int | None = None
    skmem: dict[str, int] | None = None
    shutdown: int | None = None
    v6only: int | None = None
    mark: int | None = None
    sockopt: int | None = None  # struct inet_diag_sockopt's 16 bits, little-endian order


def decode_tcp_info(buf: bytes, start: int, end: int) -> dict[str, int]:
    """The fields of a struct tcp_info in buf[start:end] that the kernel sent."""
    return {
        name: s.unpack_from(buf, start + off)[0] for name, off, s in _TCP_INFO if start + off + s.size <= end
    }


def _pad16(addr: bytes) -> bytes:
    return addr + bytes(16 - len(addr))


def _encode_request(
    family: int,
    proto: int,
    sport: int,
    dport: int,
    src: bytes,
    dst: bytes,
    ifindex: int,
    states: int,
    seq: int,
    flags: int,
    ext: int = 0,
) -> bytes:
    body = struct.pack("=BBBxI", family, proto, ext, states)
    body += _sockid.pack(sport, dport, _pad16(src), _pad16(dst))
    body += struct.pack("=III", ifindex, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    return netlink.pack_message(SOCK_DIAG_BY_FAMILY, body, flags, seq)


def decode_message(buf: bytes, off: int, length: int) -> SockEntry:
    """Decode one inet_diag_msg (with attributes) starting at the payload offset `off`.

    Raises SockDiagError if the message is shorter than an inet_diag_msg or not all in `buf`.
    """
    if length < _MSG_SIZE or off + length > len(buf):
        # The kernel never sends one, but a struct.error would escape the callers' handling.
        raise SockDiagError("sock_diag: truncated message")
    family, state, _timer, _retrans = _msg.unpack_from(buf, off)
    sport, dport, src, dst = _sockid.unpack_from(buf, off + 4)
    uid, inode = struct.unpack_from("=II", buf, off + 64)
    alen = 4 if family == socket.AF_INET else 16
    cgroup_id = 0
    for attr_type, start, end in netlink.attributes(buf, off + _MSG_SIZE, off + length):
        if attr_type == INET_DIAG_CGROUP_ID and end - start >= 8:
            (cgroup_id,) = struct.unpack_from("=Q", buf, start)
    local, remote = src[:alen], dst[:alen]
    if alen == 16 and local[:12] == _V4MAPPED and remote[:12] in (_V4MAPPED, bytes(12)):
        local, remote = local[12:], remote[12:]  # a dual-stack socket on IPv4: keyed like IPv4 packets
    return SockEntry(family, state, local, sport, remote, dport, uid, inode, cgroup_id)


def decode_detail(buf: bytes, off: int, length: int, proto: int) -> SockDetail:
    """Decode one inet_diag_msg of a detailed dump of `proto` sockets (see `decode_message`)."""
    entry = decode_message(buf, off, length)
    _family, _state, timer, retrans = _msg.unpack_from(buf, off)
    _sport, _dport, src, dst = _sockid.unpack_from(buf, off + 4)
    ifindex, cookie_lo, cookie_hi, expires, rqueue, wqueue, _uid, _inode = _tail.unpack_from(buf, off + 40)
    alen = 4 if entry.family == socket.AF_INET else 16
    found: dict[str, object] = {}
    for attr_type, start, end in netlink.attributes(buf, off + _MSG_SIZE, off + length):
        size = end - start
        if attr_type == INET_DIAG_INFO:
            found["tcp_info"] = decode_tcp_info(buf, start, end)
        elif attr_type == INET_DIAG_CONG and size:
            found["cong"] = buf[start:end].split(b"\0", 1)[0].decode("ascii", "backslashreplace")
        elif attr_type == INET_DIAG_SKMEMINFO:
            n = min(size // 4, len(SK_MEMINFO_FIELDS))
            found["skmem"] = dict(
                zip(SK_MEMINFO_FIELDS, struct.unpack_from(f"={n}I", buf, start), strict=False)
            )
        elif size >= 1 and attr_type in _BYTE_ATTRS:
            found[_BYTE_ATTRS[attr_type]] = buf[start]
        elif size >= 4 and attr_type == INET_DIAG_MARK:
            (found["mark"],) = struct.unpack_from("=I", buf, start)
        elif size >= 2 and attr_type == INET_DIAG_SOCKOPT:
            found["sockopt"] = buf[start] | buf[start + 1] << 8
    return SockDetail(
        entry,
        proto,
        src[:alen],
        dst[:alen],
        ifindex,
        cookie_lo | cookie_hi << 32,
        timer,
        retrans,
        expires,
        rqueue,
        wqueue,
        **found,
    )


_BYTE_ATTRS = {
    INET_DIAG_TOS: "tos",
    INET_DIAG_TCLASS: "tclass",
    INET_DIAG_SHUTDOWN: "shutdown",
    INET_DIAG_SKV6ONLY: "v6only",
}

T = TypeVar("T")


def parse_answer(
    buf: bytes, seq: int, entries: list[T], decode: Callable[[bytes, int, int], T] = decode_message
) -> bool:
    """Walk one datagram of the answer to request `seq`, appending the sockets it carries (each
    made by `decode(buf, offset, length)`).

    True once the answer is complete, False if more datagrams follow; messages answering other
    requests are skipped. Raises SockDiagError for an error answer or a malformed message.
    """
    try:
        # Partial messages too: one of ours cut short is a malformed answer, not one to wait on.
        for m in netlink.messages(buf, partial=True, strict=True):
            if m.seq != seq:
                continue
            if m.type == NLMSG_ERROR:
                err = netlink.error_code(buf, m)
                if err in (0, errno.ENOENT):
                    return True
                raise SockDiagError(f"sock_diag: {os.strerror(err)}")
            if m.type == NLMSG_DONE:
                return True
            if m.type == SOCK_DIAG_BY_FAMILY:
                entries.append(decode(buf, m.start, m.end - m.start))
                if not m.flags & NLM_F_MULTI:  # an exact lookup answers once
                    return True
    except NetlinkError as e:
        raise SockDiagError(f"sock_diag: {e}") from e
    return False


class SockDiag:
    """A sock_diag socket in one network namespace (None: ours)."""

    def __init__(self, netns_name: str | None = None):
        self._sock = netlink.open_socket(NETLINK_SOCK_DIAG, netns_name)
        self._sock.bind((0, 0))
        self._seq = 0
        self.requests = 0

    def close(self) -> None:
        self._sock.close()

    def _request(
        self,
        msg: bytes,
        decode: Callable[[bytes, int, int], T] = decode_message,
        pause: Callable[[], None] = lambda: None,
    ) -> list[T]:
        """Send `msg` and read its whole answer; `pause` is called every DUMP_PAUSE_EVERY
        datagrams of it (a dump of 100,000 sockets is hundreds)."""
        self.requests += 1
        self._sock.send(msg)
        entries: list[T] = []
        datagrams = 0
        while True:
            if parse_answer(self._sock.recv(netlink.RECV_SIZE), self._seq, entries, decode):
                return entries
            datagrams += 1
            if datagrams % DUMP_PAUSE_EVERY == 0:
                pause()

    def lookup(
        self, proto: int, local: bytes, lport: int, remote: bytes, rport: int, ifindex: int = 0
    ) -> SockEntry | None:
        """Exact lookup of the socket that owns a flow, as the kernel would deliver to it.

        TCP is keyed local→remote; UDP is looked up the way an incoming datagram is delivered
        (source = remote), which also finds unconnected and wildcard-bound receivers. Raises
        SockDiagError for an error answer (other than "no such socket") or a malformed one.
        """
        family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
        if proto == TCP:
            sport, dport, src, dst = lport, rport, local, remote
        elif proto == UDP:
            sport, dport, src, dst = rport, lport, remote, local
        else:
            return None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        msg = _encode_request(
            family, proto, sport, dport, src, dst, ifindex, ALL_STATES, self._seq, NLM_F_REQUEST
        )
        entries = self._request(msg)
        return entries[0] if entries else None

    def dump(
        self, family: int, proto: int, states: int = ALL_STATES, pause: Callable[[], None] = lambda: None
    ) -> list[SockEntry]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        msg = _encode_request(family, proto, 0, 0, b"", b"", 0, states, self._seq, NLM_F_REQUEST | NLM_F_DUMP)
        return self._request(msg, pause=pause)

    def dump_details(self, family: int, proto: int) -> list[SockDetail]:
        """Every socket of `family` and `proto` in every state, with the extensions (SockDetail)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        flags = NLM_F_REQUEST | NLM_F_DUMP
        msg = _encode_request(
            family, proto, 0, 0, b"", b"", 0, ALL_STATES, self._seq, flags, DETAIL_EXTENSIONS
        )
        return self._request(msg, lambda buf, off, length: decode_detail(buf, off, length, proto))


SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET_UDP_DESTROY = 2
SKNLGRP_INET6_TCP_DESTROY = 3
SKNLGRP_INET6_UDP_DESTROY = 4
DESTROY_RCVBUF = 8 << 20


def parse_destroy(buf: bytes, groups: int) -> list[tuple[int, SockEntry]]:
    """(protocol, socket) of every destroy event in one datagram sent to multicast `groups`."""
    # The message does not carry the protocol; the group it was sent to does.
    proto = (
        TCP if groups & (1 << (SKNLGRP_INET_TCP_DESTROY - 1) | 1 << (SKNLGRP_INET6_TCP_DESTROY - 1)) else UDP
    )
    out: list[tuple[int, SockEntry]] = []
    for m in netlink.messages(buf):
        if m.type == SOCK_DIAG_BY_FAMILY:
            with contextlib.suppress(SockDiagError):  # too short for a socket: nothing to mark closed
                out.append((proto, decode_message(buf, m.start, m.end - m.start)))
    return out


class DestroyEvents(netlink.MulticastReader[tuple[int, SockEntry]]):
    """sock_diag's destroy multicast groups: the kernel reports each TCP/UDP socket it frees.

    `read()` gives (protocol, socket) of every socket destroyed since the last read.
    """

    def __init__(self, netns_name: str | None = None):
        try:
            super().__init__(NETLINK_SOCK_DIAG, DESTROY_RCVBUF, netns_name)
        except SubscribeError as e:
            raise SockDiagError(f"sock_diag destroy events unavailable: {e.strerror}") from e

    def _subscribe(self) -> None:
        self._sock.bind((0, 0))
        for group in (
            SKNLGRP_INET_TCP_DESTROY,
            SKNLGRP_INET_UDP_DESTROY,
            SKNLGRP_INET6_TCP_DESTROY,
            SKNLGRP_INET6_UDP_DESTROY,
        ):
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def _parse(self, buf: bytes, groups: int) -> list[tuple[int, SockEntry]]:
        return parse_destroy(buf, groups)
