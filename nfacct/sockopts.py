"""Options a process set on its socket, read from outside: pidfd_getfd(2) gives us a duplicate of
its descriptor, getsockopt(2) reads each option, and the duplicate is closed at once.

sock_diag tells a socket's state, queues, timers, memory and a few IP-level bits, but not the
options a program sets (SO_REUSEADDR, TCP_NODELAY, SO_LINGER, ...); /proc does not either. The
duplicate shares the owner's open file description, so anything but getsockopt on it would act
on the owner's socket: fcntl(O_NONBLOCK) would change its blocking mode, a Python socket object
might. getsockopt is therefore called through ctypes on the bare descriptor, and nothing else is.

Who may: pidfd_getfd needs ptrace access (PTRACE_MODE_ATTACH_REALCREDS) to the owner: root or
CAP_SYS_PTRACE, or the owner's own uid if the process is dumpable, and Yama (ptrace_scope 1:
descendants only, 2: CAP_SYS_PTRACE only, 3: nobody) has its say too. A refusal is an
`OptionsError` saying why; the caller falls back to what sock_diag says.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable

SYS_PIDFD_GETFD = 438  # the same on every architecture but alpha (syscall numbers unified in 5.1)
SO_COOKIE = 57  # not in Python's socket module; the cookie sock_diag reports (idiag_cookie)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]

Value = int | float | str | None


def _int(raw: bytes) -> int:
    return struct.unpack_from("=i", raw)[0]


def _seconds(raw: bytes) -> float:
    """struct timeval → seconds; 0 means no timeout."""
    sec, usec = struct.unpack_from("=qq", raw)
    return sec + usec / 1e6


def _linger(raw: bytes) -> int | None:
    """struct linger → seconds a close() lingers, or None when SO_LINGER is off."""
    onoff, seconds = struct.unpack_from("=ii", raw)
    return seconds if onoff else None


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# (C name, level, option, buffer size, decoder, which sockets: "tcp", "udp", "any", "ipv6")
OPTIONS: tuple[tuple[str, int, int, int, Callable[[bytes], Value], str], ...] = (
    ("SO_REUSEADDR", socket.SOL_SOCKET, socket.SO_REUSEADDR, 4, _int, "any"),
    ("SO_REUSEPORT", socket.SOL_SOCKET, socket.SO_REUSEPORT, 4, _int, "any"),
    ("SO_KEEPALIVE", socket.SOL_SOCKET, socket.SO_KEEPALIVE, 4, _int, "tcp"),
    ("TCP_KEEPIDLE", socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4, _int, "tcp"),
    ("TCP_KEEPINTVL", socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 4, _int, "tcp"),
    ("TCP_KEEPCNT", socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4, _int, "tcp"),
    ("TCP_USER_TIMEOUT", socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 4, _int, "tcp"),
    ("TCP_NODELAY", socket.IPPROTO_TCP, socket.TCP_NODELAY, 4, _int, "tcp"),
    ("SO_LINGER", socket.SOL_SOCKET, socket.SO_LINGER, 8, _linger, "any"),
    ("SO_RCVBUF", socket.SOL_SOCKET, socket.SO_RCVBUF, 4, _int, "any"),
    ("SO_SNDBUF", socket.SOL_SOCKET, socket.SO_SNDBUF, 4, _int, "any"),
    ("SO_RCVTIMEO", socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16, _seconds, "any"),
    ("SO_SNDTIMEO", socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16, _seconds, "any"),
    ("TCP_FASTOPEN", socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 4, _int, "tcp"),
    ("TCP_DEFER_ACCEPT", socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 4, _int, "tcp"),
    ("SO_BROADCAST", socket.SOL_SOCKET, socket.SO_BROADCAST, 4, _int, "udp"),
    ("IPV6_V6ONLY", socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 4, _int, "ipv6"),
    ("SO_BINDTODEVICE", socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16, _name, "any"),  # IFNAMSIZ
    ("SO_MARK", socket.SOL_SOCKET, socket.SO_MARK, 4, _int, "any"),
)


class OptionsError(Exception):
    """The owner's socket could not be read; the message says why, in a few words."""


def applies(which: str, proto: str, family: int) -> bool:
    return which == "any" or which == proto or (which == "ipv6" and family == socket.AF_INET6)


def _getsockopt(fd: int, level: int, option: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, level, option, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[: length.value]


def _duplicate(pid: int, fd: int) -> int:
    """A duplicate of process `pid`'s descriptor `fd` in our table (close-on-exec)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise OptionsError("process gone" if e.errno == errno.ESRCH else e.strerror) from None
    try:
        dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OptionsError(_REFUSALS.get(err, os.strerror(err)))
        return dup
    finally:
        os.close(pidfd)


_REFUSALS = {
    errno.EPERM: "pidfd_getfd refused: needs root, CAP_SYS_PTRACE or the owner's uid (and Yama's leave)",
    errno.ENOSYS: "kernel without pidfd_getfd (5.6+)",
    errno.EBADF: "descriptor closed meanwhile",
    errno.ESRCH: "process gone",
}


def read(pid: int, fd: int, cookie: int, proto: str, family: int) -> dict[str, Value]:
    """Every option of OPTIONS that applies to the socket, by C name, as process `pid`'s
    descriptor `fd` has it; `cookie` (sock_diag's) makes sure it is still the same socket.

    Raises OptionsError when the socket cannot be read (permissions, an old kernel, a socket
    closed or a descriptor reused since the listing).
    """
    dup = _duplicate(pid, fd)
    try:
        try:
            got = struct.unpack("=Q", _getsockopt(dup, socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        except OSError as e:
            raise OptionsError(f"getsockopt(SO_COOKIE): {e.strerror}") from None
        if got != cookie:
            raise OptionsError("descriptor reused by another socket meanwhile")
        values: dict[str, Value] = {}
        for name, level, option, size, decode, which in OPTIONS:
            if not applies(which, proto, family):
                continue
            try:
                values[name] = decode(_getsockopt(dup, level, option, size))
            except OSError as e:
                raise OptionsError(f"getsockopt({name}): {e.strerror}") from None
        return values
    finally:
        os.close(dup)
