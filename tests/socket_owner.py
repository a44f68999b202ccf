"""A process that opens sockets, sets options on them and says what its own getsockopt reads:
the independent side of tests/test_sockets.py. The standard library only (it may run as any user
with any python3).

    python3 socket_owner.py SPEC

SPEC is a JSON list, one object per socket, in order: {"name", "proto": "tcp"|"udp", "ip": 4|6,
"bind": [address, port], "set": {C name: value}, "listen": bool, "connect": [address, port],
"send": bytes to send once connected, "accept": name of a listener of ours to accept one
connection from, once connected}. Values: an int; seconds for SO_RCVTIMEO/SO_SNDTIMEO; [onoff,
seconds] for SO_LINGER; a name for SO_BINDTODEVICE and TCP_CONGESTION. COMM in the environment (bytes) names
the process. One JSON line then reports each socket (name, fd, ports, and `got`: every option
of REPORTED that applies, as getsockopt reads it here; `also`: IP_TOS or IPV6_TCLASS, and
TCP_CONGESTION, which nfacct takes from sock_diag), and the process holds its sockets until its
stdin closes.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

SOL, TCP, V6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IPV6
# C name → (level, option, which sockets: any, tcp, udp, ipv6)
REPORTED = {
    "SO_REUSEADDR": (SOL, socket.SO_REUSEADDR, "any"),
    "SO_REUSEPORT": (SOL, socket.SO_REUSEPORT, "any"),
    "SO_KEEPALIVE": (SOL, socket.SO_KEEPALIVE, "tcp"),
    "TCP_KEEPIDLE": (TCP, socket.TCP_KEEPIDLE, "tcp"),
    "TCP_KEEPINTVL": (TCP, socket.TCP_KEEPINTVL, "tcp"),
    "TCP_KEEPCNT": (TCP, socket.TCP_KEEPCNT, "tcp"),
    "TCP_USER_TIMEOUT": (TCP, socket.TCP_USER_TIMEOUT, "tcp"),
    "TCP_NODELAY": (TCP, socket.TCP_NODELAY, "tcp"),
    "SO_LINGER": (SOL, socket.SO_LINGER, "any"),
    "SO_RCVBUF": (SOL, socket.SO_RCVBUF, "any"),
    "SO_SNDBUF": (SOL, socket.SO_SNDBUF, "any"),
    "SO_RCVTIMEO": (SOL, socket.SO_RCVTIMEO, "any"),
    "SO_SNDTIMEO": (SOL, socket.SO_SNDTIMEO, "any"),
    "TCP_FASTOPEN": (TCP, socket.TCP_FASTOPEN, "tcp"),
    "TCP_DEFER_ACCEPT": (TCP, socket.TCP_DEFER_ACCEPT, "tcp"),
    "SO_BROADCAST": (SOL, socket.SO_BROADCAST, "udp"),
    "IPV6_V6ONLY": (V6, socket.IPV6_V6ONLY, "ipv6"),
    "SO_BINDTODEVICE": (SOL, socket.SO_BINDTODEVICE, "any"),
    "SO_MARK": (SOL, socket.SO_MARK, "any"),
}
SET_ONLY = {
    "IP_TOS": (socket.IPPROTO_IP, socket.IP_TOS),
    "IPV6_TCLASS": (V6, socket.IPV6_TCLASS),
    "TCP_CONGESTION": (TCP, socket.TCP_CONGESTION),
}


def set_option(s: socket.socket, name: str, value) -> None:
    level, option = REPORTED[name][:2] if name in REPORTED else SET_ONLY[name]
    if name in ("SO_RCVTIMEO", "SO_SNDTIMEO"):
        sec = int(value)
        s.setsockopt(level, option, struct.pack("=qq", sec, round((value - sec) * 1e6)))
    elif name == "SO_LINGER":
        s.setsockopt(level, option, struct.pack("=ii", *value))
    elif isinstance(value, str):  # SO_BINDTODEVICE, TCP_CONGESTION
        s.setsockopt(level, option, value.encode())
    else:
        s.setsockopt(level, option, value)


def get_option(s: socket.socket, name: str):
    level, option, _which = REPORTED[name]
    if name in ("SO_RCVTIMEO", "SO_SNDTIMEO"):
        sec, usec = struct.unpack("=qq", s.getsockopt(level, option, 16))
        return sec + usec / 1e6
    if name == "SO_LINGER":
        onoff, seconds = struct.unpack("=ii", s.getsockopt(level, option, 8))
        return seconds if onoff else None
    if name == "SO_BINDTODEVICE":
        return s.getsockopt(level, option, 16).split(b"\0", 1)[0].decode()
    return s.getsockopt(level, option)


def report(name: str, s: socket.socket, proto: str) -> dict:
    which = {"any", proto} | ({"ipv6"} if s.family == socket.AF_INET6 else set())
    peer = s.getpeername()[1] if _connected(s) else 0
    tos = "IP_TOS" if s.family == socket.AF_INET else "IPV6_TCLASS"
    also = {tos: s.getsockopt(*SET_ONLY[tos])}
    if proto == "tcp":
        also["TCP_CONGESTION"] = s.getsockopt(*SET_ONLY["TCP_CONGESTION"], 16).split(b"\0", 1)[0].decode()
    return {
        "name": name,
        "fd": s.fileno(),
        "local_port": s.getsockname()[1],
        "remote_port": peer,
        "got": {n: get_option(s, n) for n, (_l, _o, w) in REPORTED.items() if w in which},
        "also": also,
    }


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
    except OSError:
        return False
    return True


def main() -> None:
    comm = os.environb.get(b"COMM")
    if comm:
        with open("/proc/self/comm", "wb") as f:
            f.write(comm)
    socks: dict[str, tuple[socket.socket, str]] = {}
    for spec in json.loads(sys.argv[1]):
        family = socket.AF_INET if spec["ip"] == 4 else socket.AF_INET6
        kind = socket.SOCK_STREAM if spec["proto"] == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(family, kind)
        for name, value in spec.get("set", {}).items():
            set_option(s, name, value)
        if "bind" in spec:
            s.bind(tuple(spec["bind"]))
        if spec.get("listen"):
            s.listen(8)
        if "connect" in spec:
            s.connect(tuple(spec["connect"]))
        if "send" in spec:
            s.sendall(b"x" * spec["send"])
        socks[spec["name"]] = (s, spec["proto"])
        if "accept" in spec:
            conn, _ = socks[spec["accept"]][0].accept()
            socks[spec["name"] + "-accepted"] = (conn, spec["proto"])
    print(
        json.dumps({"pid": os.getpid(), "sockets": [report(n, s, p) for n, (s, p) in socks.items()]}),
        flush=True,
    )
    sys.stdin.read()


if __name__ == "__main__":
    main()
