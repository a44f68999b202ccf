"""`nfacct sockets`: every TCP and UDP socket of a network namespace, gathered from where each
fact lives: sock_diag's detailed dump (nfacct.sockdiag), the owners' descriptors in /proc
(nfacct.procs), the options through a duplicate of each owner's descriptor (nfacct.sockopts),
and, when a daemon accounts the namespace, its counters (the control command `sockets`). What is
shown, and how, is nfacct.sockview.

Run as another user than root, it shows what that user may see: every socket (sock_diag asks no
privilege), owners and getsockopt values for the user's own processes only. `notes` says so.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

from . import claim, control, netns, procs, sockopts, sockview
from .packet import TCP, UDP
from .sockdiag import SockDetail, SockDiag, SockDiagError

PROTOCOLS = {"tcp": TCP, "udp": UDP}


class SocketsError(Exception):
    """`nfacct sockets` cannot answer; one line for the user."""


@dataclass
class Listing:
    records: list[dict]  # sockview.record of each socket, in sockview.sort_key order
    counters: bool  # a daemon answered: every record has its counters
    notes: list[str] = field(default_factory=list)  # what the listing lacks, and why


def collect(
    netns_name: str | None = None,
    pid: int | None = None,
    protocols: tuple[str, ...] = ("tcp", "udp"),
    control_path: str | None = None,
) -> Listing:
    """The sockets of namespace `netns_name` (None: ours), only those process `pid` holds if
    given. Counters come from the daemon at `control_path` (an error if it does not answer), or
    without it from the daemon that accounts the namespace, if one does."""
    notes: list[str] = []
    details = _dump(netns_name, protocols)
    if pid is not None:
        if not os.path.exists(f"/proc/{pid}"):
            raise SocketsError(f"no process with pid {pid}")
        holders, denied = procs.socket_holders([pid])
        if denied:
            raise SocketsError(
                f"cannot read the descriptors of process {pid} as uid {os.geteuid()}: "
                "that needs root, CAP_SYS_PTRACE or the process's own uid"
            )
        details = [d for d in details if d.entry.inode in holders]
    else:
        holders, denied = procs.socket_holders()
        if denied:
            notes.append(
                f"running as uid {os.geteuid()}, the descriptors of {denied} processes of other users are"
                " out of reach (root or CAP_SYS_PTRACE reaches them): their sockets show no owner, and"
                " sock_diag's values only"
            )
    flows, note = _daemon_flows(netns_name, control_path)
    if note:
        notes.append(note)
    counters: list[dict | None] = [None] * len(details)
    if flows is not None:
        matched, ambiguous = sockview.match_counters(details, flows)
        counters = list(matched)
        if ambiguous:
            notes.append(f"{ambiguous} flows reach a UDP port several sockets share: counted for none")
    ifnames = _ifnames(netns_name, {d.ifindex for d in details if d.ifindex})
    names: dict[int, str | None] = {}
    records = []
    for d, c in zip(details, counters, strict=True):
        held = holders.get(d.entry.inode, []) if d.entry.inode else []
        for owner, _fd in held:
            if owner not in names:
                names[owner] = procs.process_name(owner)
        options, error = _options(d, held, denied)
        records.append(sockview.record(d, held, names, options, error, ifnames.get(d.ifindex), c))
    records.sort(key=sockview.sort_key)
    return Listing(records, flows is not None, notes)


def _dump(netns_name: str | None, protocols: tuple[str, ...]) -> list[SockDetail]:
    try:
        diag = SockDiag(netns_name)
    except netns.NetnsError:
        if os.geteuid() == 0:
            raise
        netns.netns_path(netns_name or "")  # a name that is no namespace is said to be none
        raise SocketsError(
            f"cannot enter network namespace {netns_name!r} as uid {os.geteuid()}: that needs root"
            " (CAP_SYS_ADMIN); without --netns, nfacct sockets lists the namespace it runs in"
        ) from None
    try:
        return [
            d
            for name in protocols
            for family in (socket.AF_INET, socket.AF_INET6)
            for d in diag.dump_details(family, PROTOCOLS[name])
        ]
    except (SockDiagError, OSError) as e:
        raise SocketsError(f"sock_diag dump failed: {e}") from None
    finally:
        diag.close()


def _options(d: SockDetail, held: list[tuple[int, int]], denied: int) -> tuple[dict | None, str | None]:
    """(getsockopt's values, None), or (None, why not) when sock_diag's must do."""
    if not held:
        return None, "owner out of reach" if denied else "no process holds it"
    pid, fd = min(held)
    try:
        return sockopts.read(pid, fd, d.cookie, sockview.PROTO_NAMES[d.proto], d.entry.family), None
    except sockopts.OptionsError as e:
        return None, str(e)


def _ifnames(netns_name: str | None, indexes: set[int]) -> dict[int, str]:
    """Names of the devices sockets are bound to, as the namespace knows them."""
    names = {}
    with netns.entered(netns_name if indexes else None):
        for index in indexes:
            with contextlib.suppress(OSError):  # gone since the dump: the index is shown
                names[index] = socket.if_indextoname(index)
    return names


def _daemon_flows(netns_name: str | None, control_path: str | None) -> tuple[list[list] | None, str | None]:
    """The daemon's flows with their counts (None if no daemon answered), and a note
    when one exists but could not be asked."""
    # A daemon may account several namespaces: it is asked for this one's flows only.
    ask = f"sockets {netns_name}" if netns_name else "sockets"
    if control_path is None:
        try:
            holder = claim.holder(netns_name)
        except PermissionError:
            return None, "no counters: whether a daemon accounts the namespace is for root to know"
        if holder is None or "control" not in holder:
            return None, None
        try:
            return control.request(holder["control"], ask)["flows"], None
        except control.ControlError as e:
            return None, f"no counters: {e}"
    return control.request(control_path, ask)["flows"], None
