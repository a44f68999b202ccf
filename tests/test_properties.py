"""Property-based tests: every parser of outside input is total.

Packets come from anyone on the network or from a local raw socket; netlink answers and /proc come
from the kernel, but one exception in the daemon's loop stops the accounting of the whole host.
Each parser is fed arbitrary bytes, and input built here with a known layout, whole, truncated at
every length and mutated. Nothing here needs root.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import socket
import struct
from collections import Counter
from dataclasses import dataclass

import pytest
from conftest import PROFILE
from hypothesis import given
from hypothesis import strategies as st

from nfacct.control import MAX_DEPTH, MAX_REQUEST, BadRequest, json_depth, parse_request
from nfacct.engine import Engine
from nfacct.events import (
    CN_IDX_PROC,
    CN_VAL_PROC,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    ProcEvent,
    parse_events,
)
from nfacct.netlink import NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR
from nfacct.netlink import messages as netlink_messages
from nfacct.packet import ICMP, ICMPV6, TCP, UDP, Malformed, Parsed, parse
from nfacct.queue import KernelQueueStats, Queue, QueuedPacket, before, parse_packet
from nfacct.sockdiag import (
    INET_DIAG_CGROUP_ID,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
    SockEntry,
    decode_message,
    parse_answer,
    parse_destroy,
)
from nfacct.tables import GcConfig

# ---- netlink ------------------------------------------------------------------------------------

NLMSG_HDRLEN = 16
_nlmsghdr = struct.Struct("=IHHII")
U32 = st.integers(0, 2**32 - 1)


def nlmsg(msg_type: int, payload: bytes, seq: int = 0, flags: int = 0) -> bytes:
    """One netlink message, padded to 4 bytes as the kernel lays out a batch (NLMSG_ALIGN)."""
    msg = _nlmsghdr.pack(NLMSG_HDRLEN + len(payload), msg_type, flags, seq, 0) + payload
    return msg + bytes(-len(msg) % 4)


def raw_nlmsgs(types: list[int], seqs: list[int]) -> st.SearchStrategy[bytes]:
    """Netlink-shaped garbage: headers with any length (below the header, past the buffer),
    chosen types and sequence numbers, random payloads."""
    msg = st.builds(
        lambda length, msg_type, flags, seq, payload: (
            _nlmsghdr.pack(length, msg_type, flags, seq, 0) + payload
        ),
        st.one_of(st.integers(0, 200), U32),
        st.one_of(st.sampled_from(types), st.integers(0, 0xFFFF)),
        st.integers(0, 0xFFFF),
        st.one_of(st.sampled_from(seqs), U32),
        st.binary(max_size=120),
    )
    return st.lists(msg, max_size=6).map(b"".join)


def message_ends(msgs: list[bytes]) -> list[int]:
    """Where each message of a batch ends by its own length field (before its padding)."""
    ends, off = [], 0
    for m in msgs:
        ends.append(off + struct.unpack_from("=I", m)[0])
        off += len(m)
    return ends


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A well-formed input with a few bytes overwritten, then cut anywhere."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


# ---- packets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A packet built here, with what parse must make of it when captured up to any length."""

    data: bytes
    # (captured length below which parse gives up, the reason it gives), in the order parse checks
    needs: tuple[tuple[int, str], ...]
    whole: Parsed | Malformed  # the answer once every need is met

    def expected(self, cut: int) -> Parsed | Malformed:
        for need, reason in self.needs:
            if cut < need:
                # truncated-ip and empty report the captured length; the others the header's
                return Malformed(reason, cut if reason in ("truncated-ip", "empty") else self.whole.length)
        if type(self.whole) is Malformed and self.whole.reason == "jumbo":
            return Malformed("jumbo", cut)
        return self.whole


EXT_NUMBERS = (0, 43, 44, 60, 51, 135, 139, 140)  # the IPv6 extension headers parse walks
ADDR4 = st.one_of(
    st.sampled_from([bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])]), st.binary(min_size=4, max_size=4)
)
ADDR6 = st.one_of(
    st.sampled_from([bytes(15) + b"\1", bytes(15) + b"\2"]), st.binary(min_size=16, max_size=16)
)
FRAG_ID = st.one_of(st.integers(0, 3), U32)  # small ids: fragments that match
PORT = st.one_of(st.sampled_from([53, 80, 40000]), st.integers(0, 65535))


@st.composite
def transport(draw: st.DrawFn, proto: int) -> bytes:
    """The transport header and payload: mostly a header with ports (TCP: and the flags that
    make a SYN or not), else random bytes, as short as none."""
    if proto not in (TCP, UDP) or draw(st.integers(0, 3)) == 3:
        return draw(st.binary(max_size=40))
    ports = struct.pack("!HH", draw(PORT), draw(PORT))
    if proto == TCP:  # sequence and ack numbers, data offset, flags: SYN, SYN-ACK, ACK, FIN-ACK or any
        flags = draw(st.one_of(st.sampled_from([0x02, 0x12, 0x10, 0x11]), st.integers(0, 255)))
        ports += struct.pack("!IIBB", draw(U32), draw(U32), 0x50, flags)
    return ports + draw(st.binary(max_size=26))


def expected_transport(proto: int, body: bytes) -> tuple[int, int]:
    return struct.unpack_from("!HH", body) if proto in (TCP, UDP) and len(body) >= 4 else (0, 0)


@st.composite
def ipv4(draw: st.DrawFn) -> Built:
    ihl = draw(st.integers(5, 15)) * 4
    options = draw(st.binary(min_size=ihl - 20, max_size=ihl - 20))
    proto = draw(st.one_of(st.just(TCP), st.sampled_from([UDP, ICMP]), st.integers(0, 255)))
    frag = draw(st.one_of(st.sampled_from([0, 0x4000, 0x2000]), st.integers(0, 0xFFFF)))  # DF, MF, any
    ident = draw(st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)))
    src, dst = draw(ADDR4), draw(ADDR4)
    body = draw(transport(proto))
    total = ihl + len(body)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, total, ident, frag, 64, proto, 0, src, dst)
    data = header + options + body
    offset, more = frag & 0x1FFF, frag & 0x2000
    frag_id = ident if offset or more else -1
    needs = [(1, "empty"), (20, "truncated-ip"), (ihl, "bad-ihl")]
    whole: Parsed | Malformed
    if offset:
        whole = Parsed(4, proto, src, dst, 0, 0, total, frag_id, False)
    elif proto in (TCP, UDP) and len(body) < 4:
        whole = Malformed("truncated-transport", total)
    else:
        if proto in (TCP, UDP):
            needs.append((ihl + 4, "truncated-transport"))
        whole = Parsed(4, proto, src, dst, *expected_transport(proto, body), total, frag_id, True)
    return Built(data, tuple(needs), whole)


@st.composite
def ext_header(draw: st.DrawFn, kind: int, nxt: int) -> bytes:
    """One extension header announcing `nxt`, sized in its own unit (AH: 4 bytes, others: 8)."""
    if kind == 44:  # fragment: offset in 8-byte units, M flag, identification
        frag = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 0xFFFF)))
        return struct.pack("!BxHI", nxt, frag, draw(FRAG_ID))
    if kind == 51:  # authentication header: (length + 2) 4-byte words, at least 12 bytes
        words = draw(st.integers(1, 6))
        return bytes([nxt, words]) + draw(
            st.binary(min_size=(words + 2) * 4 - 2, max_size=(words + 2) * 4 - 2)
        )
    units = draw(st.integers(0, 3))
    return bytes([nxt, units]) + draw(st.binary(min_size=(units + 1) * 8 - 2, max_size=(units + 1) * 8 - 2))


@st.composite
def ipv6(draw: st.DrawFn) -> Built:
    kinds = draw(st.lists(st.sampled_from(EXT_NUMBERS), max_size=18))
    proto = draw(st.one_of(st.just(TCP), st.sampled_from([UDP, ICMPV6, 50, 59]), st.integers(0, 255)))
    if proto in EXT_NUMBERS:
        proto = UDP
    chain = [*kinds, proto]
    src, dst = draw(ADDR6), draw(ADDR6)
    needs = [(1, "empty"), (40, "truncated-ip")]
    whole: Parsed | Malformed | None = None
    exts, off, frag_id = [], 40, -1
    for i, kind in enumerate(kinds):
        ext = draw(ext_header(kind, chain[i + 1]))
        if whole is None and i < 16:  # parse walks at most 16 extension headers
            needs.append((off + (8 if kind == 44 else 2), "truncated-ext"))
            if kind == 44:
                frag, ident = struct.unpack_from("!2xHI", ext)
                frag_id = ident
                if frag & 0xFFF8:
                    whole = Parsed(6, chain[i + 1], src, dst, 0, 0, 0, frag_id, False)
        exts.append(ext)
        off += len(ext)
    body = draw(transport(proto))
    payload = off - 40 + len(body)
    total = 40 + payload
    data = struct.pack("!IHBB16s16s", 6 << 28, payload, chain[0], 64, src, dst) + b"".join(exts) + body
    if whole is not None:
        whole = whole._replace(length=total)
    elif payload == 0:
        whole = Malformed("jumbo", 40)
    elif len(kinds) >= 16:
        whole = Malformed("too-many-ext", total)
    elif proto in (TCP, UDP) and len(body) < 4:
        whole = Malformed("truncated-transport", total)
    else:
        if proto in (TCP, UDP):
            needs.append((off + 4, "truncated-transport"))
        whole = Parsed(6, proto, src, dst, *expected_transport(proto, body), total, frag_id, True)
    return Built(data, tuple(needs), whole)


PACKETS = st.one_of(ipv4(), ipv6())


@PROFILE
@given(PACKETS)
def test_parse_built_packets_at_every_captured_length(b: Built) -> None:
    # NFQUEUE copies only the first COPY_RANGE bytes: every prefix is a capture parse can get.
    for cut in range(len(b.data) + 1):
        assert parse(b.data[:cut]) == b.expected(cut), cut


def check_parse_invariants(data: bytes) -> Parsed | Malformed:
    """What holds for any input: parse answers; a Parsed is consistent with the bytes it came from."""
    p = parse(data)
    assert type(p) in (Parsed, Malformed)
    if type(p) is Malformed:
        assert 0 <= p.length <= max(len(data), 65535 + 40)
        return p
    alen = 4 if p.version == 4 else 16
    assert p.version == data[0] >> 4 and len(p.src) == len(p.dst) == alen
    assert (p.src, p.dst) == ((data[12:16], data[16:20]) if p.version == 4 else (data[8:24], data[24:40]))
    # the length counted is the IP header's total length, not the captured length
    if p.version == 4:
        assert p.length == struct.unpack_from("!H", data, 2)[0]
    else:
        assert p.length == 40 + struct.unpack_from("!H", data, 4)[0]
    if p.proto not in (TCP, UDP) or not p.first_fragment:
        assert p.sport == p.dport == 0
    if not p.first_fragment:
        assert p.frag_id >= 0
    if p.version == 4:
        ihl = (data[0] & 0x0F) * 4
        if p.proto in (TCP, UDP) and p.first_fragment:
            assert (p.sport, p.dport) == struct.unpack_from("!HH", data, ihl)
    elif data[6] in (TCP, UDP):  # no extension header: the ports follow the fixed header
        assert (p.sport, p.dport) == struct.unpack_from("!HH", data, 40)
    return p


@st.composite
def ip_like(draw: st.DrawFn) -> bytes:
    """Random bytes, mostly behind a version nibble of 4 or 6 so they get past the first check."""
    data = bytearray(draw(st.binary(max_size=160)))
    if data and draw(st.integers(0, 9)):
        data[0] = draw(st.sampled_from([4, 6])) << 4 | data[0] & 0x0F
        if data[0] >> 4 == 6 and len(data) > 6 and draw(st.booleans()):
            data[6] = draw(st.sampled_from([*EXT_NUMBERS, TCP, UDP]))
    return bytes(data)


ANY_PACKET = st.one_of(st.binary(max_size=160), ip_like(), mutated(PACKETS.map(lambda b: b.data)))


@PROFILE
@given(ANY_PACKET)
def test_parse_never_raises(data: bytes) -> None:
    check_parse_invariants(data)


# ---- engine -------------------------------------------------------------------------------------

CAPTURED = st.one_of(
    PACKETS.map(lambda b: b.data[:128]),  # what COPY_RANGE hands over
    ANY_PACKET,
)


@st.composite
def fragments(draw: st.DrawFn) -> list[bytes]:
    """One UDP or TCP datagram in fragments: the first carries the ports, the others only its id."""
    version, proto = draw(st.sampled_from([4, 6])), draw(st.sampled_from([TCP, UDP]))
    src, dst = draw(ADDR4 if version == 4 else ADDR6), draw(ADDR4 if version == 4 else ADDR6)
    ident = draw(st.integers(0, 3))
    n = draw(st.integers(2, 4))
    out = []
    for i in range(n):
        body = struct.pack("!HH", draw(PORT), draw(PORT)) + bytes(4) if i == 0 else bytes(8)
        more = i < n - 1
        if version == 4:
            frag = (0x2000 if more else 0) | i
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, proto, 0, src, dst)
        else:
            ext = struct.pack("!BxHI", proto, i << 3 | more, ident)
            hdr = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(body), 44, 64, src, dst) + ext
        out.append(hdr + body)
    return out


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    """Packets and fragment trains, in order or shuffled (a later fragment may beat its first),
    each with a direction."""
    packets: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        packets += draw(st.one_of(CAPTURED.map(lambda data: [data]), fragments()))
    if draw(st.booleans()):
        packets = draw(st.permutations(packets))
    return [(data, draw(st.booleans())) for data in packets]


@PROFILE
@given(traffic(), st.one_of(st.none(), st.integers(1, 8)))
def test_engine_account_never_raises_and_every_packet_is_counted_once(
    calls: list[tuple[bytes, bool]], max_sockinfo: int | None
) -> None:
    submitted: list[tuple] = []
    config = GcConfig() if max_sockinfo is None else GcConfig(max_sockinfo=max_sockinfo)
    engine = Engine(lambda key, ifindex: submitted.append(key), config)
    parsed = [parse(data) for data, _ in calls]
    for data, outgoing in calls:
        before = len(submitted)
        # True exactly when the packet started a lookup (the service then holds it until the answer)
        assert engine.account(data, outgoing, now=0.0) is (len(submitted) > before)
    assert engine.packets == len(calls)
    protos = [counts for d in engine.by_proto.values() for counts in d.values()]
    # Exact: each packet is either malformed or counted under one protocol and direction. The
    # unattributed fragments are not a third term: they are TCP/UDP packets already counted there.
    assert sum(engine.malformed.values()) + sum(c[0] for c in protos) == engine.packets
    assert engine.malformed == Counter(p.reason for p in parsed if type(p) is Malformed)
    assert sum(c[1] for c in protos) == sum(p.length for p in parsed if type(p) is Parsed)
    # And each TCP/UDP packet is an unattributed fragment, or on a flow's (still own, as no
    # answer was applied) counters, or on the unidentified totals when the table was full.
    tables = engine.tables
    flows = [si.counters for si in tables.socks.values()] + [tables.unidentified]
    tcp_udp = sum(d[p][0] for d in engine.by_proto.values() for p in ("tcp", "udp"))
    assert tcp_udp == engine.unattributed_fragments + sum(c[i] for c in flows for i in (0, 2, 4, 6))
    assert len(tables.socks) <= config.max_sockinfo
    assert sorted(submitted) == sorted(tables.socks)  # every new flow is looked up, once
    # A later fragment is unattributed exactly when no first fragment of its datagram came before
    # (a few dozen packets: far below FRAGMENT_MEMORY, nothing is forgotten).
    firsts, unmatched = set(), 0
    for p in parsed:
        if type(p) is Parsed and p.proto in (TCP, UDP) and p.frag_id >= 0:
            datagram = (p.src, p.dst, p.frag_id, p.proto)
            if p.first_fragment:
                firsts.add(datagram)
            else:
                unmatched += datagram not in firsts
    assert engine.unattributed_fragments == unmatched


# ---- proc connector -----------------------------------------------------------------------------

_PROC_OTHER = (0, 0x4, 0x40, 0x80, 0x100, 0x200, 0x40000000)  # none, uid, gid, sid, ptrace, comm, coredump
PID = st.one_of(st.integers(1, 4 << 20), st.integers(-(2**31), 2**31 - 1))


@st.composite
def proc_event(draw: st.DrawFn) -> tuple[bytes, ProcEvent | None]:
    """One proc connector message and the event parse_events must read from it."""
    kind = draw(st.sampled_from(["exit", "fork", "exec", "other"]))
    pid, tgid, ptgid = draw(PID), draw(PID), draw(PID)
    if kind == "exit":
        what, data, ev = PROC_EVENT_EXIT, struct.pack("=ii", pid, tgid), ProcEvent("exit", pid, tgid)
    elif kind == "fork":
        data = struct.pack("=iiii", draw(PID), ptgid, pid, tgid)
        what, ev = PROC_EVENT_FORK, ProcEvent("fork", pid, tgid, ptgid)
    elif kind == "exec":
        what, data, ev = PROC_EVENT_EXEC, struct.pack("=ii", pid, tgid), ProcEvent("exec", pid, tgid)
    else:
        what, data, ev = draw(st.sampled_from(_PROC_OTHER)), b"", None
    # The union is 24 bytes in current kernels; any size that holds the member read is valid.
    data += draw(st.binary(max_size=max(0, 24 - len(data))))
    body = struct.pack("=IIQ", what, draw(st.integers(0, 255)), draw(st.integers(0, 2**64 - 1))) + data
    cn = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
    return nlmsg(NLMSG_DONE, cn), ev


PROC_BATCH = st.lists(proc_event(), max_size=5)


@PROFILE
@given(PROC_BATCH)
def test_parse_events_reads_the_whole_messages_of_a_batch_cut_anywhere(
    batch: list[tuple[bytes, ProcEvent | None]],
) -> None:
    buf = b"".join(m for m, _ in batch)
    ends = message_ends([m for m, _ in batch])
    for cut in range(len(buf) + 1):
        # A message cut short (a truncated datagram) is dropped, even where the fields read are there.
        whole = [ev for (_, ev), end in zip(batch, ends, strict=True) if ev is not None and end <= cut]
        assert parse_events(buf[:cut]) == whole, cut


@PROFILE
@given(
    st.one_of(
        st.binary(max_size=200),
        raw_nlmsgs([NLMSG_DONE], [0]),
        mutated(PROC_BATCH.map(lambda b: b"".join(m for m, _ in b))),
    )
)
def test_parse_events_never_raises(buf: bytes) -> None:
    assert all(type(ev) is ProcEvent for ev in parse_events(buf))


# ---- sock_diag ----------------------------------------------------------------------------------

_V4MAPPED = bytes(10) + b"\xff\xff"
OUR_SEQ = 7


@st.composite
def attrs(draw: st.DrawFn) -> tuple[bytes, int]:
    """Well-formed attributes after an inet_diag_msg, and the cgroup id they carry (0: none)."""
    out, cgroup = [], 0
    for _ in range(draw(st.integers(0, 3))):
        payload = draw(st.binary(max_size=12))
        nla_type = draw(st.integers(0, 0xFFFF).filter(lambda t: t & 0x3FFF != INET_DIAG_CGROUP_ID))
        out.append(struct.pack("=HH", 4 + len(payload), nla_type) + payload + bytes(-len(payload) % 4))
    if draw(st.booleans()):
        cgroup = draw(st.integers(0, 2**64 - 1))
        out.insert(draw(st.integers(0, len(out))), struct.pack("=HHQ", 12, INET_DIAG_CGROUP_ID, cgroup))
    return b"".join(out), cgroup


@st.composite
def diag_msg(draw: st.DrawFn) -> tuple[bytes, SockEntry]:
    """An inet_diag_msg with attributes, and the entry decode_message must make of it."""
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    if family == socket.AF_INET:
        local, remote = draw(ADDR4), draw(ADDR4)
        src, dst = local + bytes(12), remote + bytes(12)
    elif draw(st.booleans()):  # a dual-stack socket on IPv4: keyed like IPv4 packets
        local, remote = draw(ADDR4), draw(st.one_of(ADDR4, st.just(bytes(4))))
        src, dst = _V4MAPPED + local, (_V4MAPPED if any(remote) else bytes(12)) + remote
    else:
        src, dst = draw(ADDR6), draw(ADDR6)
        local, remote = src, dst
        if src[:12] == _V4MAPPED and dst[:12] in (_V4MAPPED, bytes(12)):
            local, remote = src[12:], dst[12:]
    state, lport, rport = draw(st.integers(0, 255)), draw(PORT), draw(PORT)
    uid, inode = draw(U32), draw(U32)
    attributes, cgroup = draw(attrs())
    msg = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH16s16s", lport, rport, src, dst)
    msg += bytes(24) + struct.pack("=II", uid, inode) + attributes  # if, cookie, expires, queues
    return msg, SockEntry(family, state, local, lport, remote, rport, uid, inode, cgroup)


@PROFILE
@given(diag_msg(), st.binary(max_size=40))
def test_decode_message_reads_its_fields_whatever_follows(msg: tuple[bytes, SockEntry], tail: bytes) -> None:
    body, entry = msg
    assert decode_message(b"\0" * 16 + body + tail, 16, len(body)) == entry


# Attributes with any length (below the attribute header, past the message), often the cgroup's type.
BAD_ATTRS = st.lists(
    st.builds(
        lambda nla_len, nla_type, payload: struct.pack("=HH", nla_len, nla_type) + payload,
        st.one_of(st.integers(0, 16), st.integers(0, 0xFFFF)),
        st.one_of(
            st.sampled_from([INET_DIAG_CGROUP_ID, INET_DIAG_CGROUP_ID | 0x8000]), st.integers(0, 0xFFFF)
        ),
        st.binary(max_size=12),
    ),
    max_size=4,
).map(b"".join)


@PROFILE
@given(diag_msg(), st.one_of(st.binary(max_size=40), BAD_ATTRS))
def test_decode_message_survives_garbage_attributes(msg: tuple[bytes, SockEntry], garbage: bytes) -> None:
    body, entry = msg
    fixed = body[:72]
    got = decode_message(fixed + garbage, 0, 72 + len(garbage))
    # Attribute garbage may yield any cgroup id, never other fields or an exception...
    assert got == SockEntry(**{**vars(entry), "cgroup_id": got.cgroup_id})
    # ...and nothing is read past the message's end: what follows it in the datagram is not its.
    assert decode_message(fixed + garbage + b"\xff" * 16, 0, 72 + len(garbage)) == got


@PROFILE
@given(st.binary(max_size=160), st.data())
def test_decode_message_takes_any_offset_and_length(buf: bytes, data: st.DataObject) -> None:
    off = data.draw(st.integers(0, len(buf) + 8))
    length = data.draw(st.one_of(st.integers(0, len(buf) + 8), U32))
    try:
        entry = decode_message(buf, off, length)
    except SockDiagError:
        assert length < 72 or off + length > len(buf)  # only a message that is not all there
    else:
        assert type(entry) is SockEntry


@st.composite
def answer(draw: st.DrawFn) -> tuple[list[bytes], list[SockEntry], bool]:
    """The messages of one datagram of an answer to request OUR_SEQ: sockets, answers to other
    requests, maybe an end; with the entries parse_answer must collect and whether it ends there."""
    multi = draw(st.booleans())
    msgs, entries = [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 3)) == 0:  # a stale answer to an earlier request: skipped
            body, _ = draw(diag_msg())
            msgs.append(nlmsg(SOCK_DIAG_BY_FAMILY, body, seq=OUR_SEQ - 1, flags=NLM_F_MULTI))
            continue
        body, entry = draw(diag_msg())
        msgs.append(nlmsg(SOCK_DIAG_BY_FAMILY, body, seq=OUR_SEQ, flags=NLM_F_MULTI if multi else 0))
        entries.append(entry)
        if not multi:  # an exact lookup answers once
            return msgs, entries, True
    end = draw(st.sampled_from(["none", "done", "ok", "enoent"]))
    if end == "done":
        msgs.append(nlmsg(NLMSG_DONE, struct.pack("=i", 0), seq=OUR_SEQ, flags=NLM_F_MULTI))
    elif end != "none":
        err = 0 if end == "ok" else -errno.ENOENT
        msgs.append(nlmsg(NLMSG_ERROR, struct.pack("=i", err) + bytes(16), seq=OUR_SEQ))
    return msgs, entries, end != "none"


@PROFILE
@given(answer())
def test_parse_answer_collects_its_sockets_and_sees_the_end(
    a: tuple[list[bytes], list[SockEntry], bool],
) -> None:
    msgs, expected, done = a
    entries: list[SockEntry] = []
    assert parse_answer(b"".join(msgs), OUR_SEQ, entries) is done
    assert entries == expected


@PROFILE
@given(
    st.one_of(
        st.sampled_from([-errno.EPERM, -errno.EINVAL, -errno.ENOMEM, -4095]),
        st.integers(-(2**31), 2**31 - 1).filter(lambda e: e not in (0, -errno.ENOENT)),  # not an errno
    )
)
def test_parse_answer_reports_an_error_answer(err: int) -> None:
    buf = nlmsg(NLMSG_ERROR, struct.pack("=i", err) + bytes(16), seq=OUR_SEQ)
    with pytest.raises(SockDiagError):
        parse_answer(buf, OUR_SEQ, [])


@PROFILE
@given(answer())
def test_parse_answer_cut_anywhere_keeps_a_prefix_or_reports_an_error(
    a: tuple[list[bytes], list[SockEntry], bool],
) -> None:
    msgs, expected, _ = a
    buf = b"".join(msgs)
    for cut in range(len(buf) + 1):
        entries: list[SockEntry] = []
        # A message cut short is a malformed answer: SockDiagError, which the caller handles.
        with contextlib.suppress(SockDiagError):
            parse_answer(buf[:cut], OUR_SEQ, entries)
        assert entries == expected[: len(entries)], cut


@PROFILE
@given(
    st.one_of(
        st.binary(max_size=200),
        raw_nlmsgs([NLMSG_ERROR, NLMSG_DONE, SOCK_DIAG_BY_FAMILY], [OUR_SEQ]),
        mutated(answer().map(lambda a: b"".join(a[0]))),
    )
)
def test_parse_answer_raises_nothing_but_sockdiagerror(buf: bytes) -> None:
    entries: list[SockEntry] = []
    with contextlib.suppress(SockDiagError):  # the resolver counts it (errors) and retries
        assert type(parse_answer(buf, OUR_SEQ, entries)) is bool
    assert all(type(e) is SockEntry for e in entries)


DESTROY_GROUPS = st.integers(0, 15)  # bits of SKNLGRP_INET{,6}_{TCP,UDP}_DESTROY


def destroy_proto(groups: int) -> int:
    return TCP if groups & 0b0101 else UDP  # the TCP groups are 1 and 3


@PROFILE
@given(st.lists(diag_msg(), max_size=4), DESTROY_GROUPS)
def test_parse_destroy_reads_the_whole_events_of_a_batch_cut_anywhere(
    msgs: list[tuple[bytes, SockEntry]], groups: int
) -> None:
    wire = [nlmsg(SOCK_DIAG_BY_FAMILY, body) for body, _ in msgs]
    buf = b"".join(wire)
    proto = destroy_proto(groups)
    for cut in range(len(buf) + 1):
        expected = [(proto, e) for (_, e), end in zip(msgs, message_ends(wire), strict=True) if end <= cut]
        assert parse_destroy(buf[:cut], groups) == expected, cut


@PROFILE
@given(
    st.one_of(
        st.binary(max_size=200),
        raw_nlmsgs([SOCK_DIAG_BY_FAMILY], [0]),
        mutated(st.lists(diag_msg(), max_size=3).map(lambda m: b"".join(nlmsg(20, b) for b, _ in m))),
    ),
    DESTROY_GROUPS,
)
def test_parse_destroy_never_raises(buf: bytes, groups: int) -> None:
    assert all(p == destroy_proto(groups) and type(e) is SockEntry for p, e in parse_destroy(buf, groups))


# ---- NFQUEUE ------------------------------------------------------------------------------------


def proc_line(fields: tuple[int, ...]) -> str:
    """A line of /proc/net/netfilter/nfnetlink_queue, in the kernel's format."""
    return "%5u %6u %5u %1u %5u %5u %5u %8u %2d" % (*fields, 1)  # noqa: UP031 (the kernel's printf)


@PROFILE
@given(st.tuples(*[U32] * 8))
def test_kernel_queue_stats_reads_the_kernel_format(fields: tuple[int, ...]) -> None:
    assert KernelQueueStats.parse(proc_line(fields)) == KernelQueueStats(*fields)


@PROFILE
@given(
    st.one_of(
        st.text(max_size=80),
        st.lists(st.one_of(st.from_regex(r"-?\d{1,5}", fullmatch=True), st.text(max_size=3))).map(" ".join),
    )
)
def test_kernel_queue_stats_parse_skips_what_is_not_a_stats_line(line: str) -> None:
    def integer(field: str) -> int | None:
        try:
            return int(field)
        except ValueError:
            return None

    fields = [integer(f) for f in line.split()[:8]]
    if len(fields) == 8 and None not in fields:
        assert KernelQueueStats.parse(line) == KernelQueueStats(*fields)
    else:
        assert KernelQueueStats.parse(line) is None


@PROFILE
@given(st.lists(st.one_of(st.tuples(*[st.integers(0, 3)] + [U32] * 7).map(proc_line), st.text(max_size=40))))
def test_all_kernel_stats_skips_malformed_lines(lines: list[str]) -> None:
    text = "\n".join(lines)
    q = Queue.__new__(Queue)  # no bind (root, a queue): all_kernel_stats only reads the file
    q._proc_stats = io.StringIO(text)
    good = [s for s in map(KernelQueueStats.parse, text.splitlines()) if s is not None]
    assert q.all_kernel_stats() == {s.queue: s for s in good}


PACKET_TYPE = (3 << 8) | 0  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET


def attr(attr_type: int, payload: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(payload), attr_type) + payload
    return a + bytes(-len(a) % 4)


@st.composite
def queued_packets(draw: st.DrawFn) -> tuple[bytes, tuple]:
    """A packet message as the kernel sends it (attributes in any order, some optional, others
    we do not read), and what parse_packet must make of it."""
    packet_id, hook = draw(U32), draw(st.integers(0, 4))
    payload = draw(st.binary(max_size=128))
    cap_len = draw(st.one_of(st.none(), st.integers(len(payload) + 1, 2**32 - 1)))
    indev, outdev = draw(st.one_of(st.just(0), U32)), draw(st.one_of(st.just(0), U32))
    attrs = [attr(1, struct.pack("!IHB", packet_id, 0x0800, hook)), attr(10, payload)]
    attrs += [attr(13, struct.pack("!I", cap_len))] if cap_len is not None else []
    attrs += [attr(5, struct.pack("!I", indev))] if indev else []  # NFQA_IFINDEX_INDEV
    attrs += [attr(6, struct.pack("!I", outdev))] if outdev else []  # NFQA_IFINDEX_OUTDEV
    # Attributes we do not read: mark, timestamp, physical devices, hardware address, conntrack...
    others = st.sampled_from([3, 4, 7, 8, 9, 11, 12, 14, 15, *range(17, 41)])
    attrs += draw(st.lists(st.builds(attr, others, st.binary(max_size=16)), max_size=3))
    uid = draw(st.one_of(st.none(), U32))
    attrs += [attr(16, struct.pack("!I", uid))] if uid is not None else []  # NFQA_UID
    attrs = draw(st.permutations(attrs))
    message = nlmsg(PACKET_TYPE, struct.pack("!BBH", 2, 0, 5) + b"".join(attrs))
    expected = (packet_id, hook, payload, cap_len if cap_len is not None else len(payload), indev, outdev)
    expected += (uid if uid is not None else -1,)
    return message, expected


@PROFILE
@given(st.lists(queued_packets(), min_size=1, max_size=5))
def test_parse_packet_reads_what_the_kernel_sent(batch: list[tuple[bytes, tuple]]) -> None:
    buf = b"".join(message for message, _ in batch)
    got = [parse_packet(buf, m.start, m.end) for m in netlink_messages(buf)]
    assert got == [expected for _, expected in batch]


@PROFILE
@given(
    st.one_of(
        st.binary(max_size=300), mutated(queued_packets().map(lambda b: b[0])), raw_nlmsgs([PACKET_TYPE], [0])
    )
)
def test_a_queue_read_never_raises_and_every_packet_gets_to_the_callback(buf: bytes) -> None:
    """Whatever a read brings, `_handle` gives every packet with a header to the callback and
    answers an errno or nothing."""
    q = Queue.__new__(Queue)  # no socket: _handle only parses and calls back
    q.received, q._undecided, q._accepted, q._newest = 0, {}, [], None
    seen: list[QueuedPacket] = []
    q.callback = seen.append  # returns None: every packet is held
    result = q._handle(buf, 5)
    assert result is None or 0 <= result < 4096
    assert q.received == len(seen) and set(q._undecided) == {p.id for p in seen}
    for p in seen:
        assert isinstance(p.payload, bytes) and p.length >= 0


def packet_message(packet_id: int) -> bytes:
    return nlmsg(
        PACKET_TYPE, struct.pack("!BBH", 2, 0, 5) + attr(1, struct.pack("!IHB", packet_id, 0x0800, 3))
    )


@PROFILE
@given(U32, st.lists(st.integers(0, 5000), max_size=20, unique=True), st.data())
def test_verdicts_never_release_a_held_packet(first: int, offsets: list[int], data: st.DataObject) -> None:
    """A batch verdict accepts every queued id up to its own, in the kernel's serial order (ids
    wrap at 2**32): it must stop before the oldest packet still held and cover all the others,
    whether the callback accepted them as they were read or held them and accepted them later,
    in any order, and however the reads and flushes fall."""
    ids = [(first + k) & 0xFFFFFFFF for k in sorted(offsets)]  # delivery order
    fate = {i: data.draw(st.sampled_from(["now", "later", "held"])) for i in ids}
    sent: list[bytes] = []
    q = Queue.__new__(Queue)
    q.number, q.received, q.verdict_messages = 5, 0, 0
    q._undecided, q._accepted, q._newest = {}, [], None

    class Sock:
        def sendall(self, data: bytes) -> None:
            sent.append(data)

    q._sock = Sock()
    kept: list[QueuedPacket] = []

    def callback(pkt: QueuedPacket) -> bool:
        if fate[pkt.id] == "now":
            return True
        kept.append(pkt)
        return False

    q.callback = callback
    for i in ids:
        q._handle(packet_message(i))
        if data.draw(st.booleans()):
            q.flush()  # a read ends (or VERDICT_BATCH packets were read)
    for pkt in data.draw(st.permutations(kept)):
        if fate[pkt.id] == "later":
            pkt.accept()
            if data.draw(st.booleans()):
                q.flush()
    q.flush()
    accepted: set[int] = set()
    buf = b"".join(sent)
    for m in netlink_messages(buf):
        verdict, packet_id = struct.unpack_from("!II", buf, m.start + 8)
        assert verdict == 1
        if m.type & 0xFF == 3:  # a batch: every queued packet not after packet_id
            accepted |= {i for i in ids if i == packet_id or before(i, packet_id)}
        else:
            accepted.add(packet_id)
    assert accepted == {i for i in ids if fate[i] != "held"}


# ---- control requests ---------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def nested(depth: int) -> bytes:
    return b'{"cmd": "status", "x": ' + b"[" * depth + b"0" + b"]" * depth + b"}"


@PROFILE
@given(st.one_of(st.binary(max_size=600), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_parse_request_answers_a_command_or_a_bad_request(line: bytes) -> None:
    """Whatever a client sends, the daemon gets a command string or an error to answer with."""
    try:
        cmd = parse_request(line)
    except BadRequest as e:
        assert str(e).startswith("bad request: ")
        return
    message = json.loads(line)
    assert cmd == message["cmd"] and isinstance(cmd, str)


@PROFILE
@given(st.text(max_size=30), JSON_VALUES)
def test_parse_request_takes_every_well_formed_request(cmd: str, extra: object) -> None:
    line = json.dumps({"cmd": cmd, "x": extra}).encode()
    if len(line) <= MAX_REQUEST and json_depth(line) <= MAX_DEPTH:
        assert parse_request(line) == cmd


@PROFILE
@given(st.integers(0, 50_000))
def test_parse_request_bounds_nesting_without_recursing(depth: int) -> None:
    line = nested(depth)
    if len(line) > MAX_REQUEST:
        with pytest.raises(BadRequest, match="longer than"):
            parse_request(line)
    elif depth + 1 > MAX_DEPTH:
        with pytest.raises(BadRequest, match="nested deeper than"):
            parse_request(line)
    else:
        assert parse_request(line) == "status"


@PROFILE
@given(JSON_VALUES)
def test_depth_counts_json_nesting_and_ignores_brackets_in_strings(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    assert json_depth(json.dumps(value).encode()) == depth(value)
