"""sock_diag netlink: which socket owns a flow.

Hand-written rather than pyroute2: pyroute2's DiagSocket only dumps, and its marshal disables
NLMSG_ERROR (type 2 collides with AF_INET at the family offset), so an exact lookup's ENOENT
cannot be told apart from an answer. An exact lookup is one request and one reply.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass

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
INET_DIAG_CGROUP_ID = 21
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_TIME_WAIT, TCP_CLOSE, TCP_LISTEN = 1, 2, 3, 6, 7, 10
ALL_STATES = 0xFFFFFFFF

# inet_diag_msg: family, state, timer, retrans, sockid (48 B), expires, rqueue, wqueue, uid, inode
_msg = struct.Struct("=BBBB")
_sockid = struct.Struct("!HH16s16s")
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
) -> bytes:
    body = struct.pack("=BBBxI", family, proto, 0, states)
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


def parse_answer(buf: bytes, seq: int, entries: list[SockEntry]) -> bool:
    """Walk one datagram of the answer to request `seq`, appending the sockets it carries.

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
                entries.append(decode_message(buf, m.start, m.end - m.start))
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

    def _request(self, msg: bytes) -> list[SockEntry]:
        self.requests += 1
        self._sock.send(msg)
        entries: list[SockEntry] = []
        while True:
            if parse_answer(self._sock.recv(netlink.RECV_SIZE), self._seq, entries):
                return entries

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

    def dump(self, family: int, proto: int, states: int = ALL_STATES) -> list[SockEntry]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        msg = _encode_request(family, proto, 0, 0, b"", b"", 0, states, self._seq, NLM_F_REQUEST | NLM_F_DUMP)
        return self._request(msg)


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
