"""The netlink core: the message and attribute walks are total and find exactly what was packed,
and a multicast reader drains its socket and counts the kernel's overruns.

The walks' properties need no kernel; the reader is checked against the kernel's own netlink
multicast (NETLINK_USERSOCK) inside a throwaway network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from conftest import PROFILE
from hypothesis import given
from hypothesis import strategies as st

from nfacct import netlink
from nfacct.netlink import NLMSG_HDRLEN, Message, NetlinkError, SubscribeError

U16, U32 = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
# (type, flags, seq, pid, payload) of one message
FIELDS = st.tuples(U16, U16, U32, U32, st.binary(max_size=40))


def batch(msgs: list[tuple[int, int, int, int, bytes]]) -> bytes:
    """Messages laid out as the kernel does in one datagram: each padded to 4 bytes."""
    out = b""
    for msg_type, flags, seq, pid, payload in msgs:
        m = netlink.pack_message(msg_type, payload, flags, seq, pid)
        out += m + bytes(netlink.align(len(m)) - len(m))
    return out


def walked(buf: bytes, **kw: bool) -> list[tuple[int, int, int, int, bytes]]:
    return [(m.type, m.flags, m.seq, m.pid, buf[m.start : m.end]) for m in netlink.messages(buf, **kw)]


@PROFILE
@given(st.lists(FIELDS, max_size=6))
def test_messages_finds_exactly_what_was_packed(msgs: list[tuple[int, int, int, int, bytes]]) -> None:
    buf = batch(msgs)
    assert walked(buf) == walked(buf, partial=True) == walked(buf, strict=True) == msgs


@PROFILE
@given(st.lists(FIELDS, max_size=5))
def test_messages_of_a_batch_cut_anywhere(msgs: list[tuple[int, int, int, int, bytes]]) -> None:
    buf = batch(msgs)
    ends, off = [], 0
    for *_, payload in msgs:
        ends.append(off + NLMSG_HDRLEN + len(payload))
        off = netlink.align(ends[-1])
    starts = [end - len(m[4]) for m, end in zip(msgs, ends, strict=True)]
    for cut in range(len(buf) + 1):
        whole = [m for m, end in zip(msgs, ends, strict=True) if end <= cut]
        assert walked(buf[:cut]) == whole, cut
        # partial: also the one message whose header made it, with what there is of its payload
        cut_short = [
            (*m[:4], buf[s:cut]) for m, s, end in zip(msgs, starts, ends, strict=True) if s <= cut < end
        ]
        assert walked(buf[:cut], partial=True) == whole + cut_short, cut


@PROFILE
@given(st.lists(FIELDS, max_size=3), st.integers(0, NLMSG_HDRLEN - 1), st.lists(FIELDS, max_size=3))
def test_a_length_below_the_header_ends_the_walk(
    before: list[tuple[int, int, int, int, bytes]], length: int, after: list[tuple[int, int, int, int, bytes]]
) -> None:
    buf = batch(before) + struct.pack("=IHHII", length, 0, 0, 0, 0) + batch(after)
    assert walked(buf) == walked(buf, partial=True) == before
    found = []
    with pytest.raises(NetlinkError):
        for m in netlink.messages(buf, strict=True):
            found.append(m)  # the messages before it are still yielded, in order
    assert len(found) == len(before)


def check_walk(buf: bytes, partial: bool) -> list[Message]:
    """What holds for any bytes: messages in order, 4-byte aligned, inside the buffer unless partial
    (and then only the last one may reach past it)."""
    msgs = list(netlink.messages(buf, partial=partial))
    next_start = NLMSG_HDRLEN
    for i, m in enumerate(msgs):
        assert m.start == next_start and m.start <= m.end and m.start <= len(buf)
        if m.end > len(buf):
            assert partial and i == len(msgs) - 1
        next_start = netlink.align(m.end) + NLMSG_HDRLEN
    return msgs


@PROFILE
@given(st.one_of(st.binary(max_size=200), st.lists(FIELDS, max_size=4).map(batch).map(lambda b: b[:-1])))
def test_messages_walks_any_bytes(buf: bytes) -> None:
    whole = check_walk(buf, partial=False)
    partial = check_walk(buf, partial=True)
    assert partial[: len(whole)] == whole and len(partial) - len(whole) in (0, 1)


# One attribute: (type with flag bits, payload)
ATTR = st.tuples(U16, st.binary(max_size=20))


@PROFILE
@given(st.lists(ATTR, max_size=6), st.binary(max_size=8), st.binary(max_size=12))
def test_attributes_finds_exactly_what_was_packed(
    attrs: list[tuple[int, bytes]], head: bytes, tail: bytes
) -> None:
    packed = b"".join(netlink.pack_attr(t, p) for t, p in attrs)
    buf = head + packed + tail
    got = [(t, buf[s:e]) for t, s, e in netlink.attributes(buf, len(head), len(head) + len(packed))]
    # flag bits (nested, byte order) are not part of the type; what follows the range is not read
    assert got == [(t & netlink.NLA_TYPE_MASK, p) for t, p in attrs]


@PROFILE
@given(st.binary(max_size=120), st.data())
def test_attributes_walks_any_bytes_within_its_range(buf: bytes, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(start, len(buf)))
    pos = start
    for attr_type, s, e in netlink.attributes(buf, start, end):
        assert attr_type <= netlink.NLA_TYPE_MASK
        assert s == pos + netlink.NLA_HDRLEN and s <= e <= end  # never past the range
        pos = netlink.align(e)


def error_message(payload: bytes) -> tuple[bytes, Message]:
    buf = netlink.pack_message(netlink.NLMSG_ERROR, payload)
    return buf, next(netlink.messages(buf))


@PROFILE
@given(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=16))
def test_error_code_is_an_errno_or_a_malformed_answer(err: int, rest: bytes) -> None:
    buf, m = error_message(struct.pack("=i", err) + rest)
    if -4096 < err <= 0:
        assert netlink.error_code(buf, m) == -err
    else:
        with pytest.raises(NetlinkError, match="malformed error code"):
            netlink.error_code(buf, m)


@pytest.mark.parametrize("payload", [b"", b"\0\0\0"])
def test_error_code_of_a_message_too_short_for_one(payload: bytes) -> None:
    buf, m = error_message(payload)
    with pytest.raises(NetlinkError, match="malformed answer"):
        netlink.error_code(buf, m)
    # and of an answer cut short before its code: the length field promises one that is not there
    full = netlink.pack_message(netlink.NLMSG_ERROR, bytes(20))
    cut = full[: NLMSG_HDRLEN + len(payload)]
    with pytest.raises(NetlinkError, match="malformed answer"):
        netlink.error_code(cut, next(netlink.messages(cut, partial=True)))


# ---- the multicast reader, against the kernel -----------------------------------------------------

NETLINK_USERSOCK = 2  # plain netlink between sockets: any socket may multicast to its groups
GROUP = 3


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace, so no other netlink socket of the host sees our multicast."""
    name = f"nfacct-netlink-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


class Reader(netlink.MulticastReader[bytes]):
    """Each datagram's messages' payloads."""

    def __init__(self, netns_name: str, rcvbuf: int):
        super().__init__(NETLINK_USERSOCK, rcvbuf, netns_name)

    def _subscribe(self) -> None:
        self._sock.bind((0, 0))
        self._sock.setsockopt(netlink.SOL_NETLINK, netlink.NETLINK_ADD_MEMBERSHIP, GROUP)

    def _parse(self, buf: bytes, groups: int) -> list[bytes]:
        assert groups == 1 << (GROUP - 1)  # the group it was sent to
        return [buf[m.start : m.end] for m in netlink.messages(buf)]


def multicast(netns_name: str, payloads: list[bytes]) -> None:
    with netlink.open_socket(NETLINK_USERSOCK, netns_name) as s:
        s.setblocking(False)
        for p in payloads:
            # Delivered to the group, then to port 0 (the kernel), which has no such socket.
            with contextlib.suppress(ConnectionRefusedError):
                s.sendto(netlink.pack_message(0x10, p), (0, 1 << (GROUP - 1)))


def test_reader_drains_every_datagram_in_one_read(netns: str) -> None:
    reader = Reader(netns, 1 << 20)
    try:
        assert reader.read() == []  # nothing waiting: returns at once
        payloads = [b"%4d" % i for i in range(100)]
        multicast(netns, payloads)
        assert reader.read() == payloads
        assert reader.overruns == 0 and reader.read() == []
    finally:
        reader.close()


def test_reader_counts_an_overrun_and_reads_on(netns: str) -> None:
    reader = Reader(netns, 1)  # the kernel's minimum receive buffer: a few datagrams
    try:
        payloads = [b"%4d" % i for i in range(200)]
        multicast(netns, payloads)
        got = reader.read()
        assert reader.overruns == 1  # the kernel reports ENOBUFS once per overrun
        assert 0 < len(got) < len(payloads) and set(got) <= set(payloads)
        multicast(netns, payloads[:2])  # after the overrun, events arrive again
        assert reader.read() == payloads[:2]
    finally:
        reader.close()


def test_a_refused_subscription_is_a_subscribe_error_and_closes_the_socket(netns: str) -> None:
    opened: list[socket.socket] = []

    class Refused(Reader):
        def _subscribe(self) -> None:
            opened.append(self._sock)
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    with pytest.raises(SubscribeError) as e:
        Refused(netns, 1 << 20)
    assert e.value.errno == errno.EPERM and opened[0].fileno() == -1
