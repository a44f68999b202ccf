"""What `nfacct sockets` shows, from what the kernel and the daemon said: pure, no I/O.

One record per socket (`record`), the JSON object `--json` prints; `table` lays records out as
knetstat does (netstat's columns, then Diag and Options), with the owner and, when a daemon
answered, the socket's counters.

Options come from getsockopt on a duplicate of the owner's descriptor (nfacct.sockopts) when
that was possible; otherwise the few that sock_diag also tells are taken from it and marked
(`option_sources`, and `*` in the table). IP_TOS, IPV6_TCLASS, TCP_CONGESTION and the IP-level
bits of INET_DIAG_SOCKOPT come from sock_diag only.

Counters: each of the daemon's sockinfos keeps its flow's own count (packets it queued and its
flow sets' readings, since the daemon started or took the flow over). `flows_answer` is the
daemon's side, `match_counters` gives each socket its flows' counts (a listening TCP socket has
none: its connections are sockets of their own; an unconnected UDP socket has every flow to its
port and address).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from . import text
from .packet import TCP, UDP
from .sockdiag import TCP_ESTABLISHED, TCP_LISTEN, TIMER_NAMES, SockDetail
from .sockopts import OPTIONS, Value, applies
from .tables import FlowKey

STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
UDP_STATES = {1: "ESTABLISHED", 7: "UNCONN"}  # a UDP socket is connected or not
PROTO_NAMES = {TCP: "tcp", UDP: "udp"}

# knetstat's Diag column, from tcp_info: (its name in JSON, its symbol)
DIAG = (
    ("zero_send_window", ">|"),  # the peer advertises no room: nothing can be sent
    ("zero_receive_window", "|<"),  # we advertise no room: nothing can be received
    ("unacked_over_1s", ">#"),  # data in flight, and the last ACK came over a second ago
)

# INET_DIAG_SOCKOPT's bits (struct inet_diag_sockopt), by bit number: the IPv4-level flags
# (inet_sock), for IPv6 sockets too, but the multicast ones, which only IPv4 UDP sockets use
# (IPv6 has IPV6_MULTICAST_* of its own). is_icsk, hdrincl and defer_connect are no options.
SOCKOPT_BITS = {
    0: "IP_RECVERR",
    2: "IP_FREEBIND",
    4: "IP_MULTICAST_LOOP",
    5: "IP_TRANSPARENT",
    6: "IP_MULTICAST_ALL",
    7: "IP_NODEFRAG",
    8: "IP_BIND_ADDRESS_NO_PORT",
    9: "IP_RECVERR_RFC4884",
}
MULTICAST = {"IP_MULTICAST_LOOP", "IP_MULTICAST_ALL"}  # on by default
SOCK_DIAG_ONLY = {"IP_TOS", "IPV6_TCLASS", "TCP_CONGESTION", *SOCKOPT_BITS.values()}

# Shown in the table whatever their value (as knetstat does); the others when they are not the
# default (on for keepalive's parameters: they matter only then). `--json` has them all.
ALWAYS = {"SO_REUSEADDR", "SO_REUSEPORT", "SO_KEEPALIVE", "TCP_NODELAY", "SO_BROADCAST", "IPV6_V6ONLY"}
KEEPALIVE_PARAMETERS = {"TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"}
GETSOCKOPT, SOCK_DIAG = "getsockopt", "sock_diag"
MARK = "*"  # in the table: a value sock_diag gave because getsockopt could not be used


def flows_answer(flows: dict[FlowKey, list[int]]) -> dict:
    """The daemon's answer to `sockets`: each flow's key and its count (out packets, out bytes,
    in packets, in bytes), addresses in hex."""
    return {
        "flows": [
            [proto, local.hex(), lport, remote.hex(), rport, *reading]
            for (proto, local, lport, remote, rport, _netns), reading in flows.items()
        ]
    }


def _wildcard(addr: bytes) -> bool:
    return not any(addr)


def match_counters(details: list[SockDetail], flows: list[list]) -> tuple[list[dict], int]:
    """Each socket's counters from the daemon's flows (`flows_answer`), and how many
    flows could not be told apart between sockets sharing a UDP port (credited to none)."""
    counters = [
        {"flows": 0, "out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0} for _ in details
    ]
    exact: dict[FlowKey, int] = {}
    unconnected: dict[int, list[int]] = {}  # UDP local port → sockets that take any remote
    for i, d in enumerate(details):
        e = d.entry
        if not e.inode or (d.proto == TCP and e.state == TCP_LISTEN):
            continue
        if d.proto == UDP and e.rport == 0:
            unconnected.setdefault(e.lport, []).append(i)
        else:
            exact[(d.proto, e.local, e.lport, e.remote, e.rport)] = i
    ambiguous = 0
    for proto, local_hex, lport, remote_hex, rport, *reading in flows:
        local, remote = bytes.fromhex(local_hex), bytes.fromhex(remote_hex)
        i = exact.get((proto, local, lport, remote, rport))
        if i is None and proto == UDP:
            candidates = [j for j in unconnected.get(lport, ()) if _takes(details[j], local)]
            bound = [j for j in candidates if details[j].entry.local == local]
            found = bound or candidates
            if len(found) > 1:
                ambiguous += 1
                continue
            i = found[0] if found else None
        if i is not None:
            c = counters[i]
            c["flows"] += 1
            for name, value in zip(
                ("out_packets", "out_bytes", "in_packets", "in_bytes"), reading, strict=True
            ):
                c[name] += value
    return counters, ambiguous


def _takes(d: SockDetail, local: bytes) -> bool:
    """Whether an unconnected UDP socket receives datagrams addressed to `local`."""
    own = d.entry.local
    if len(own) == len(local):
        return own == local or _wildcard(own)
    # A flow to an IPv4 address reaches an IPv6 socket bound to `::` unless it is IPV6_V6ONLY.
    return len(local) == 4 and _wildcard(own) and d.entry.family == socket.AF_INET6 and not d.v6only


def state_name(d: SockDetail) -> str:
    state = d.entry.state
    names = UDP_STATES if d.proto == UDP else STATE_NAMES
    return names.get(state, str(state))


def diag(d: SockDetail) -> list[str]:
    """knetstat's diagnostics of an established TCP connection, by name (see DIAG)."""
    ti = d.tcp_info
    if d.proto != TCP or d.entry.state != TCP_ESTABLISHED or not ti:
        return []
    found = []
    if ti.get("snd_wnd") == 0:
        found.append("zero_send_window")
    if ti.get("rcv_wnd") == 0:  # tcp_info has it from Linux 6.2
        found.append("zero_receive_window")
    if ti.get("unacked") and ti.get("last_ack_recv", 0) > 1000:
        found.append("unacked_over_1s")
    return found


def diag_symbol(names: list[str]) -> str:
    """knetstat's symbol: both windows closed `>|<`, one of them `>|` or `|<`, else `>#`."""
    if "zero_send_window" in names and "zero_receive_window" in names:
        return ">|<"
    for name, symbol in DIAG:
        if name in names:
            return symbol
    return ""


def diag_options(d: SockDetail, ifname: str | None) -> tuple[dict[str, Value], dict[str, Value]]:
    """What sock_diag tells of the options: (values getsockopt would give too, used when it
    cannot be; values only sock_diag gives). `ifname`: the name of the bound device, if any."""
    e = d.entry
    instead: dict[str, Value] = {}
    if d.skmem:
        instead["SO_RCVBUF"], instead["SO_SNDBUF"] = d.skmem["rcvbuf"], d.skmem["sndbuf"]
    if d.v6only is not None:
        instead["IPV6_V6ONLY"] = d.v6only
    instead["SO_BINDTODEVICE"] = (ifname or str(d.ifindex)) if d.ifindex else ""
    if d.proto == TCP and e.state == TCP_ESTABLISHED and d.timer in (0, 2):
        # An established connection with SO_KEEPALIVE always has its keepalive timer running;
        # another timer (retransmission, zero-window probe) would hide it, so those say nothing.
        instead["SO_KEEPALIVE"] = 1 if d.timer == 2 else 0
    if d.mark is not None:  # the kernel sends it to CAP_NET_ADMIN only
        instead["SO_MARK"] = d.mark
    only: dict[str, Value] = {}
    if e.family == socket.AF_INET and d.tos is not None:
        only["IP_TOS"] = d.tos
    if e.family == socket.AF_INET6 and d.tclass is not None:
        only["IPV6_TCLASS"] = d.tclass
    if d.cong is not None:
        only["TCP_CONGESTION"] = d.cong
    if d.sockopt is not None:
        multicast = d.proto == UDP and e.family == socket.AF_INET
        for bit, name in SOCKOPT_BITS.items():
            if multicast or name not in MULTICAST:
                only[name] = d.sockopt >> bit & 1
    return instead, only


def record(
    d: SockDetail,
    holders: list[tuple[int, int]],
    names: dict[int, str | None],
    options: dict[str, Value] | None,
    options_error: str | None,
    ifname: str | None = None,
    counters: dict | None = None,
) -> dict:
    """The JSON object of one socket. `holders`: (pid, fd) of every process holding it;
    `options`: what getsockopt read (None with `options_error` saying why it could not)."""
    e = d.entry
    pids = sorted({pid for pid, _fd in holders})
    pid = pids[0] if pids else None
    instead, only = diag_options(d, ifname)
    values: dict[str, Value] = {}
    sources: dict[str, str] = {}
    if e.inode:  # a TIME_WAIT or SYN_RECV socket is no one's, and has no options
        if options is not None:
            values.update(options)
            sources.update(dict.fromkeys(options, GETSOCKOPT))
        else:
            values.update(instead)
            sources.update(dict.fromkeys(instead, SOCK_DIAG))
        values.update(only)
        sources.update(dict.fromkeys(only, SOCK_DIAG))
    found = diag(d)
    return {
        "proto": PROTO_NAMES[d.proto],
        "ip": 4 if e.family == socket.AF_INET else 6,
        "local_address": str(ipaddress.ip_address(d.src)),
        "local_port": e.lport,
        "remote_address": str(ipaddress.ip_address(d.dst)),
        "remote_port": e.rport,
        "state": state_name(d),
        "recv_q": d.rqueue,
        "send_q": d.wqueue,
        "pid": pid,
        "pids": pids,
        "command": names.get(pid) if pid is not None else None,
        "uid": e.uid,
        "inode": e.inode,
        "diag": found,
        "diag_symbol": diag_symbol(found),
        "options": values,
        "option_sources": sources,
        "options_error": None if options is not None or not e.inode else options_error,
        "timer": {
            "name": TIMER_NAMES.get(d.timer, str(d.timer)),
            "expires_ms": d.expires,
            "retrans": d.retrans,
        },
        "tcp_info": d.tcp_info,
        "memory": d.skmem,
        "cgroup_id": e.cgroup_id,
        "counters": counters,
    }


def sort_key(r: dict) -> tuple:
    return (r["proto"], r["ip"], r["state"] != "LISTEN", r["local_port"], r["remote_port"], r["inode"])


# ---- the table --------------------------------------------------------------------------------


def _option_text(name: str, value: Value) -> str:
    if name in ("SO_RCVTIMEO", "SO_SNDTIMEO"):
        return f"{round(float(value) * 1000)}ms"
    if name == "SO_LINGER":
        return f"{value}s"
    if name in ("IP_TOS", "IPV6_TCLASS", "SO_MARK"):
        return f"{value:#x}"
    return text.escape(str(value))


def _shown(name: str, value: Value, values: dict[str, Value]) -> bool:
    if name in ALWAYS:
        return True
    if name in KEEPALIVE_PARAMETERS:
        return values.get("SO_KEEPALIVE") == 1
    if name in MULTICAST:
        return value != 1
    if name == "SO_LINGER":  # on with 0 seconds (a reset at close) is not off
        return value is not None
    return value not in (0, 0.0, "", None)


def options_text(r: dict) -> tuple[str, bool]:
    """The Options column: NAME=value,... in knetstat's order, `*` after a value sock_diag gave
    in place of getsockopt, `?` for an option always shown whose value is unknown; and whether
    it has either."""
    values, sources = r["options"], r["option_sources"]
    if not r["inode"]:
        return "", False
    names = [name for name, *_rest, which in OPTIONS if applies(which, r["proto"], _family(r))]
    names += [name for name in values if name not in names]
    parts = []
    marked = False
    for name in names:
        if name not in values:
            if name in ALWAYS and r["options_error"] is not None:
                parts.append(f"{name}=?")
                marked = True
            continue
        value = values[name]
        if _shown(name, value, values):
            mark = MARK if sources[name] == SOCK_DIAG and name not in SOCK_DIAG_ONLY else ""
            parts.append(f"{name}={_option_text(name, value)}{mark}")
            marked = marked or bool(mark)
    return ",".join(parts), marked


def _family(r: dict) -> int:
    return socket.AF_INET if r["ip"] == 4 else socket.AF_INET6


def _owner(r: dict) -> str:
    if r["pid"] is None:
        return "-"
    return f"{r['pid']}/{text.escape(r['command'] or '?')}"


def _figure(packets: int, nbytes: int) -> str:
    from .display import human_bytes  # here: the daemon imports this module, and needs no rich

    return f"{packets}/{human_bytes(nbytes)}"


def table(records: Iterable[dict], counters: bool) -> list[str]:
    """knetstat's layout, one line per socket, plus the owner and (`counters`: a daemon
    answered) what the socket's flows sent and received."""
    head = f"{'Proto':<5} {'Recv-Q':>6} {'Send-Q':>6} {'Local Address':<23} {'Foreign Address':<23} "
    head += f"{'State':<11} {'Diag':<4} {'PID/Program name':<20} "
    if counters:
        head += f"{'Sent':>12} {'Received':>12} "
    lines = [head + "Options"]
    marked = set()
    for r in records:
        proto = r["proto"] + ("6" if r["ip"] == 6 else "")
        line = f"{proto:<5} {r['recv_q']:>6} {r['send_q']:>6} "
        line += f"{address_of(r, 'local'):<23} {address_of(r, 'remote'):<23} "
        line += f"{r['state']:<11} {r['diag_symbol']:<4} {_owner(r):<20} "
        if counters:
            c = r["counters"]
            line += f"{_figure(c['out_packets'], c['out_bytes']):>12} "
            line += f"{_figure(c['in_packets'], c['in_bytes']):>12} "
        opts, unsure = options_text(r)
        if unsure:
            marked.add(r["options_error"])
        lines.append((line + opts).rstrip())
    if marked:
        why = "; ".join(sorted(text.escape(m) for m in marked))
        lines.append(f"{MARK} from sock_diag, ? unknown: getsockopt not possible ({why})")
    return lines


def address_of(r: dict, end: str) -> str:
    """knetstat's (and netstat's) form: 10.0.0.1:80, ::1:80, 0.0.0.0:* for port 0."""
    port = r[f"{end}_port"]
    return f"{r[f'{end}_address']}:{port if port else '*'}"
