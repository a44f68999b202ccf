"""systemd's notification protocol (sd_notify(3)) without libsystemd: readiness, status lines,
stopping and watchdog pings, each a datagram to $NOTIFY_SOCKET.

- Without $NOTIFY_SOCKET (not started by systemd, or not as Type=notify) every call does nothing.
- A path or an `@abstract` name; anything else is one fault, and then nothing is sent.
- The socket never blocks: a message that systemd's full queue would make us wait for is
  dropped and counted (the same loop gives packets their verdicts). Every failed send goes to
  `on_error`, the daemon's fault counter: counted each time, its kind logged once.
- The watchdog: systemd sets $WATCHDOG_USEC, and $WATCHDOG_PID to the process it watches (a
  child that inherited the variables must not ping for it). The daemon pings at half that period
  from its event loop's timers, never from a thread, so a loop that stops turning stops pinging.
- Every STATUS= text is escaped (`text.escape`): a process name is any user's bytes, and a
  newline in it would start a field of its own (`MAINPID=`, `READY=1`, ...).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from . import text
from .tables import COUNTER_NAMES

STATUS_PERIOD = 5.0  # seconds between STATUS= lines: `systemctl status` shows the latest
FAULT = "notifying systemd"
PACKETS = tuple(c for c in COUNTER_NAMES if c.endswith("packs"))
BYTES = tuple(c for c in COUNTER_NAMES if c.endswith("bytes"))


class NotifyError(Exception):
    """$NOTIFY_SOCKET or $WATCHDOG_USEC holds something we cannot use."""


def address(value: str) -> str:
    """The socket address $NOTIFY_SOCKET names: a path, or `@name` in the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    raise NotifyError(f"NOTIFY_SOCKET={value!r} is neither a path nor an @abstract name")


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when no watchdog is meant for `pid`."""
    usec = environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    meant = environ.get("WATCHDOG_PID")
    if meant is not None and meant.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        raise NotifyError(f"WATCHDOG_USEC={usec!r} is not a positive number of microseconds")
    return value / 2e6


def status_line(tasks: list[dict], unaccounted: int | None) -> str:
    """One line for `systemctl status`: the running processes' traffic, what went unaccounted,
    the top talker. `tasks` as `Engine.top()` gives them (running first, biggest first)."""
    running = [t for t in tasks if t["exit_time"] is None]
    packets = sum(t[c] for t in running for c in PACKETS)
    nbytes = sum(t[c] for t in running for c in BYTES)
    line = f"{len(running):,} processes: {packets:,} packets, {nbytes:,} bytes"
    if unaccounted is None:
        line += "; unaccounted: unknown (no counting rule)"
    else:
        line += f"; unaccounted {unaccounted:,}"
    if running:
        top = running[0]
        line += f"; top: {top['comm']} (pid {top['pid']}) {sum(top[c] for c in PACKETS):,} packets"
    return line


class Notifier:
    def __init__(self, environ: Mapping[str, str], on_error: Callable[[str, BaseException], None]):
        self._on_error = on_error
        self._sock: socket.socket | None = None
        self.watchdog_period: float | None = None
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return
        try:
            self._address = address(value)
        except NotifyError as e:
            on_error(FAULT, e)
            return
        try:
            self.watchdog_period = watchdog_period(environ, os.getpid())
        except NotifyError as e:
            on_error(FAULT, e)  # readiness and status still go; no pings systemd could not use
        kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        self._sock = socket.socket(socket.AF_UNIX, kind)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={text.escape(status)}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={text.escape(status)}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={text.escape(status)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as e:  # EAGAIN (systemd's queue is full), ENOENT, ECONNREFUSED, ...
            self._on_error(FAULT, e)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
