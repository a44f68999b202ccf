"""NFQUEUE I/O: bind a queue (optionally inside another network namespace), set its flags,
hand packets to a callback and read the kernel's own figures for the queue.

netfilterqueue does the binding and verdicts; it does not expose queue flags, so after bind we
send one NFQNL_MSG_CONFIG on the queue's own netlink socket (the kernel only accepts config from
the portid that owns the queue) and wait for its acknowledgement.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from netfilterqueue import COPY_PACKET, NetfilterQueue, Packet

from . import netlink, netns
from .netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NetlinkError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4

HOOK_LOCAL_IN = 1
HOOK_LOCAL_OUT = 3

COPY_RANGE = 128  # enough for IPv4 options or IPv6 extension headers plus the ports
QUEUE_MAXLEN = 8192  # packets the kernel may hold for us; each pins an skb (up to 64 KiB with GSO)
RCVBUF = 8 << 20

_config_seq = 0x6E66


class QueueError(Exception):
    """The queue could not be bound or configured; one line for the user."""


@dataclass
class KernelQueueStats:
    """One line of /proc/net/netfilter/nfnetlink_queue (the kernel's own figures)."""

    queue: int
    portid: int
    waiting: int
    copy_mode: int
    copy_range: int
    queue_dropped: int
    user_dropped: int
    id_sequence: int

    @classmethod
    def parse(cls, line: str) -> KernelQueueStats | None:
        """None for a line that does not start with 8 integers (the kernel writes none; a
        stray one must not stop the daemon, which reads this file on every status and exit)."""
        fields = line.split()[:8]
        if len(fields) < 8:
            return None
        try:
            return cls(*map(int, fields))
        except ValueError:
            return None


def config_message(queue: int, flags: int, mask: int, seq: int = _config_seq) -> bytes:
    nfgen = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)
    attrs = netlink.pack_attr(NFQA_CFG_MASK, struct.pack("!I", mask))
    attrs += netlink.pack_attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    return netlink.pack_message(msg_type, nfgen + attrs, NLM_F_REQUEST | NLM_F_ACK, seq)


def strip_ack(buf: bytes, seq: int) -> tuple[bytes, int | None]:
    """Remove the NLMSG_ERROR answering `seq` from a batch of netlink messages.

    Returns the remaining bytes and the errno of the answer (0 for an ACK, None if absent).
    """
    kept: list[bytes] = []
    result, off = None, 0
    # Partial messages too: an answer cut short is still the answer, a malformed one.
    for m in netlink.messages(buf, partial=True):
        if m.type == NLMSG_ERROR and m.seq == seq:
            span = netlink.message_span(m)
            kept.append(buf[off : span.start])
            off = span.stop
            # A malformed answer (too short to hold an errno, or holding something else) is
            # EBADMSG, which _set_flags reports as a QueueError.
            try:
                result = netlink.error_code(buf, m)
            except NetlinkError:
                result = errno.EBADMSG
    return b"".join([*kept, buf[off:]]), result


class _AckCatcher:
    """A socket stand-in for NetfilterQueue.run_socket that filters out our config ACK."""

    def __init__(self, sock: socket.socket, seq: int):
        self.sock, self.seq, self.result = sock, seq, None

    def recv(self, size: int) -> bytes:
        if self.result is not None:
            raise BlockingIOError(errno.EAGAIN, "ack seen")
        buf, result = strip_ack(self.sock.recv(size, socket.MSG_DONTWAIT), self.seq)
        if result is not None:
            self.result = result
        return buf


class Queue:
    """One bound NFQUEUE. `callback(packet)` must give every packet a verdict."""

    def __init__(
        self,
        number: int,
        callback: Callable[[Packet], None],
        netns_name: str | None = None,
        maxlen: int = QUEUE_MAXLEN,
    ):
        self.number = number
        self.maxlen = maxlen
        self.received = 0
        try:
            with netns.entered(netns_name):
                nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                self._proc_stats = open("/proc/net/netfilter/nfnetlink_queue")  # noqa: SIM115
        except PermissionError as e:
            raise QueueError(f"cannot open netfilter netlink socket: {e.strerror} (needs root)") from e
        try:
            self._nfq = NetfilterQueue(sockfd=nl.fileno())
        finally:
            nl.close()  # NetfilterQueue keeps its own duplicate
        try:
            self._nfq.bind(
                number, callback, max_len=maxlen, mode=COPY_PACKET, range=COPY_RANGE, sock_len=RCVBUF
            )
        except OSError as e:
            raise QueueError(
                f"cannot bind NFQUEUE {number}: {e} (is another nfacct or NFQUEUE consumer bound to it?)"
            ) from e
        self._sock = socket.socket(fileno=os.dup(self._nfq.get_fd()))
        self.flags = self._set_flags(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN)

    def _set_flags(self, flags: int) -> int:
        self._sock.send(config_message(self.number, flags, flags))
        catcher = _AckCatcher(self._sock, _config_seq)
        # The kernel queues the ACK synchronously behind any packets already waiting; those are
        # handed to the callback on the way, so none is left without a verdict.
        deadline = time.monotonic() + 1.0
        while catcher.result is None and time.monotonic() < deadline:
            self._nfq.run_socket(catcher)
        if catcher.result is None:
            raise QueueError(f"the kernel did not acknowledge queue flags {flags:#x}")
        if catcher.result:
            raise QueueError(f"setting queue flags {flags:#x} failed: {os.strerror(catcher.result)}")
        return flags

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def dispatch(self) -> None:
        """Hand every packet waiting on the socket to the callback; returns when none is left."""
        self._nfq.run(block=False)

    def all_kernel_stats(self) -> dict[int, KernelQueueStats]:
        """Every queue of our namespace, by number (a takeover's successor shows up here too)."""
        self._proc_stats.seek(0)
        stats = map(KernelQueueStats.parse, self._proc_stats.read().splitlines())
        return {s.queue: s for s in stats if s is not None}

    def kernel_stats(self) -> KernelQueueStats | None:
        return self.all_kernel_stats().get(self.number)

    def close(self) -> None:
        self._nfq.unbind()
        self._sock.close()
        self._proc_stats.close()
