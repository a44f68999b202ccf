"""Parse the headers of one IP packet as NFQUEUE hands it over (network header first).

Pure and total: any byte string yields either a Parsed or a Malformed, never an exception.
Only the first ~128 bytes are copied from the kernel, so lengths come from the IP header,
which the kernel has already validated and trimmed the packet to (ip_rcv, ipv6_rcv), and
which matches skb->len, the figure nft counters add up.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

# IPv6 extension headers that we skip to find the transport header.
_HOP_BY_HOP, _ROUTING, _FRAGMENT, _DEST_OPTS, _AH, _ESP, _NO_NEXT = 0, 43, 44, 60, 51, 50, 59
_MOBILITY, _HIP, _SHIM6 = 135, 139, 140
_GENERIC_EXT = frozenset((_HOP_BY_HOP, _ROUTING, _DEST_OPTS, _MOBILITY, _HIP, _SHIM6))
_MAX_EXT_HEADERS = 16

_ports = struct.Struct("!HH")
_u16 = struct.Struct("!H")
_ipv6_frag = struct.Struct("!BxHI")


class Parsed(NamedTuple):
    version: int  # 4 or 6
    proto: int  # transport protocol after IPv6 extension headers
    src: bytes  # 4 or 16 bytes
    dst: bytes
    sport: int  # 0 where the protocol has no ports or the header is not in this fragment
    dport: int
    length: int  # IP total length in bytes
    frag_id: int  # -1: not a fragment; else the fragment identification
    first_fragment: bool  # False only for fragments that do not carry the transport header


class Malformed(NamedTuple):
    reason: str
    length: int  # best known length (the captured length where the header lies)


def parse(data: bytes, length: int | None = None) -> Parsed | Malformed:
    """`length` is the packet's real length when the caller knows it (the queue says, for a
    packet longer than its copy). It counts where the header cannot say: a GSO super-packet over
    64 KiB (IPv4 total length 0, IPv6 payload length 0); measured, a 2 MB loopback send made 14
    such packets."""
    if not data:
        return Malformed("empty", 0)
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, length)
    if version == 6:
        return _parse_ipv6(data, length)
    return Malformed("bad-version", len(data))


def _parse_ipv4(data: bytes, length: int | None) -> Parsed | Malformed:
    n = len(data)
    if n < 20:
        return Malformed("truncated-ip", n)
    ihl = (data[0] & 0x0F) * 4
    total = (data[2] << 8) | data[3]
    if total == 0 and length is not None and length > 0xFFFF:
        total = length  # a TSO super-packet: too long for the header's 16 bits
    if ihl < 20 or ihl > n:
        return Malformed("bad-ihl", total or n)
    if total < ihl:
        return Malformed("bad-length", n)
    frag = (data[6] << 8) | data[7]
    offset = frag & 0x1FFF
    more = frag & 0x2000
    proto = data[9]
    frag_id = (data[4] << 8) | data[5] if (offset or more) else -1
    src, dst = data[12:16], data[16:20]
    if offset:
        return Parsed(4, proto, src, dst, 0, 0, total, frag_id, False)
    return _transport(4, proto, src, dst, data, ihl, total, frag_id)


def _parse_ipv6(data: bytes, length: int | None) -> Parsed | Malformed:
    n = len(data)
    if n < 40:
        return Malformed("truncated-ip", n)
    payload = (data[4] << 8) | data[5]
    if payload == 0 and (length is None or length <= 0xFFFF + 40):
        # Jumbogram or BIG TCP, and nobody told us the real length.
        return Malformed("jumbo", n)
    total = payload + 40 if payload else length
    src, dst = data[8:24], data[24:40]
    nxt = data[6]
    off = 40
    frag_id = -1
    for _ in range(_MAX_EXT_HEADERS):
        if nxt in _GENERIC_EXT:
            if off + 2 > n:
                return Malformed("truncated-ext", total)
            nxt, off = data[off], off + (data[off + 1] + 1) * 8
        elif nxt == _AH:
            if off + 2 > n:
                return Malformed("truncated-ext", total)
            nxt, off = data[off], off + (data[off + 1] + 2) * 4
        elif nxt == _FRAGMENT:
            if off + 8 > n:
                return Malformed("truncated-ext", total)
            nxt, frag, frag_id = _ipv6_frag.unpack_from(data, off)
            off += 8
            if frag & 0xFFF8:
                return Parsed(6, nxt, src, dst, 0, 0, total, frag_id, False)
        else:
            if off > total:
                return Malformed("bad-ext-length", total)
            return _transport(6, nxt, src, dst, data, off, total, frag_id)
    return Malformed("too-many-ext", total)


def _transport(
    version: int, proto: int, src: bytes, dst: bytes, data: bytes, off: int, total: int, frag_id: int
) -> Parsed | Malformed:
    if proto in (TCP, UDP):
        if off + 4 > len(data) or off + 4 > total:
            return Malformed("truncated-transport", total)
        sport, dport = _ports.unpack_from(data, off)
        return Parsed(version, proto, src, dst, sport, dport, total, frag_id, True)
    return Parsed(version, proto, src, dst, 0, 0, total, frag_id, True)
