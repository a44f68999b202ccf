"""The parser on packets crafted with scapy, and on garbage: it must never raise."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.layers.ipsec import AH

from nfacct.packet import Malformed, Parsed, parse

A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "fd00::1", "fd00::2"


def p(pkt) -> Parsed | Malformed:
    return parse(bytes(pkt))


def test_ipv4_tcp_ports_and_length():
    r = p(IP(src=A4, dst=B4) / TCP(sport=1234, dport=80) / (b"x" * 100))
    assert (r.version, r.proto, r.sport, r.dport, r.length) == (4, 6, 1234, 80, 140)
    assert r.src == bytes([10, 0, 0, 1]) and r.dst == bytes([10, 0, 0, 2])
    assert r.frag_id == -1


def test_ipv4_options_are_skipped():
    pkt = (
        IP(src=A4, dst=B4, options=[IPOption_RR(routers=["1.1.1.1"] * 4)]) / UDP(sport=53, dport=5353) / b"q"
    )
    r = p(pkt)
    assert (r.proto, r.sport, r.dport) == (17, 53, 5353)
    assert r.length == len(bytes(pkt)) > 20 + 8 + 1


def test_ipv4_icmp_has_no_ports():
    r = p(IP(src=A4, dst=B4) / ICMP())
    assert (r.proto, r.sport, r.dport, r.length) == (1, 0, 0, 28)


def test_ipv6_extension_headers_are_walked():
    pkt = (
        IPv6(src=A6, dst=B6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting()
        / IPv6ExtHdrDestOpt()
        / TCP(sport=5, dport=6)
    )
    r = p(pkt)
    assert (r.version, r.proto, r.sport, r.dport) == (6, 6, 5, 6)
    assert r.length == len(bytes(pkt))


def test_ipv6_authentication_header_uses_its_own_length_unit():
    r = p(IPv6(src=A6, dst=B6) / AH(nh=17, payloadlen=4, icv=b"\0" * 12) / UDP(sport=7, dport=8))
    assert (r.proto, r.sport, r.dport) == (17, 7, 8)


def test_icmpv6():
    r = p(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())
    assert (r.proto, r.sport, r.dport) == (58, 0, 0)


def test_ipv4_fragments_share_an_id_and_only_the_first_has_ports():
    frags = fragment(IP(src=A4, dst=B4, id=77) / UDP(sport=9, dport=10) / (b"x" * 3000), 1000)
    parsed = [p(f) for f in frags]
    assert parsed[0].first_fragment and (parsed[0].sport, parsed[0].dport) == (9, 10)
    assert all(r.frag_id == 77 for r in parsed)
    assert not any(r.first_fragment for r in parsed[1:])
    assert sum(r.length for r in parsed) == sum(len(bytes(f)) for f in frags)


def test_ipv6_fragments():
    frags = fragment6(
        IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=99) / UDP(sport=9, dport=10) / (b"x" * 3000), 1280
    )
    parsed = [p(f) for f in frags]
    assert parsed[0].first_fragment and parsed[0].sport == 9
    assert all(r.frag_id == 99 for r in parsed)
    assert [r.length for r in parsed] == [len(bytes(f)) for f in frags]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x45" + b"\0" * 10, "truncated-ip"),
        (b"\x75" + b"\0" * 40, "bad-version"),
        (bytes(IP(src=A4, dst=B4, ihl=15) / TCP())[:40], "bad-ihl"),
        (b"\x44" + bytes(IP(src=A4, dst=B4) / TCP())[1:], "bad-ihl"),
        (bytes(IP(src=A4, dst=B4, proto=6, len=22)) + b"\0\1", "truncated-transport"),
        (bytes(IPv6(src=A6, dst=B6, plen=0) / TCP()), "jumbo"),
        (bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop())[:41], "truncated-ext"),
        (
            bytes(IPv6(src=A6, dst=B6, nh=0, plen=17 * 8) / (bytes([0, 0, 0, 0, 0, 0, 0, 0]) * 17)),
            "too-many-ext",
        ),
    ],
)
def test_malformed_packets_get_a_reason(data, reason):
    r = parse(data)
    assert isinstance(r, Malformed)
    assert r.reason == reason


def test_random_and_truncated_input_never_raises():
    rng = random.Random(1234)
    samples = [
        bytes(IP(src=A4, dst=B4, options=[IPOption_RR()]) / TCP() / b"data"),
        bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP()),
    ]
    for sample in samples:
        for cut in range(len(sample) + 1):
            assert isinstance(parse(sample[:cut]), Parsed | Malformed)
    for _ in range(20000):
        data = bytearray(rng.randbytes(rng.randrange(0, 140)))
        if data and rng.random() < 0.8:
            data[0] = (rng.choice((4, 6)) << 4) | (data[0] & 0x0F)
        assert isinstance(parse(bytes(data)), Parsed | Malformed)


def test_a_super_packet_counts_with_the_length_the_queue_reports():
    """GSO on loopback: IPv4 total length 0, IPv6 payload length 0; the queue says how long."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    v4 = bytearray(bytes(IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=1, dport=2)))
    v4[2:4] = b"\0\0"
    assert parse(bytes(v4)).reason == "bad-length"  # alone, the header cannot say
    assert parse(bytes(v4), length=130_000).length == 130_000
    assert parse(bytes(v4), length=130_000)[4:6] == (1, 2)
    v6 = bytearray(bytes(IPv6(src="::1", dst="::1") / TCP(sport=3, dport=4)))
    v6[4:6] = b"\0\0"
    assert parse(bytes(v6)).reason == "jumbo"
    assert parse(bytes(v6), length=200_000).length == 200_000
    assert parse(bytes(v6), length=60).reason == "jumbo"  # a zero payload length it cannot explain
