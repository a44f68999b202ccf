"""`nfacct top` without `--once`: poll the daemon once per interval and show `display.top_screen`.

On a terminal: a full-screen view (rich Live on the alternate screen) and keys read one at a
time (cbreak mode: no echo, no line buffering, Ctrl-C still a signal); `q` and Ctrl-C leave,
both with the terminal as it was. A resized terminal is redrawn at once (SIGWINCH). Keys
change only how the last two polls are shown: no request is made out of turn. To a pipe or a
file: one frame per interval, for as long as it runs.

A daemon that stops answering after the first poll does not end the view: the error is shown
in the header and the poll is tried again next interval (a restart or a takeover comes back).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator

from rich.console import Console, Group
from rich.live import Live

from . import control, display
from .control import ControlError
from .display import default_console
from .topview import GROUPINGS, KEYS, Snapshot

QUIT = {"q", "Q"}
NEXT = {"g", "\t"}


@functools.cache
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def poll(path: str) -> Snapshot:
    """The daemon's `top` and `status` answers, one request each."""
    return Snapshot.from_answers(control.request(path, "top"), control.request(path, "status"))


def regroup(by: str, keys: str) -> tuple[str, bool]:
    """The grouping after `keys` were pressed, and whether one of them asked to quit."""
    for key in keys:
        if key in QUIT:
            return by, True
        if key in NEXT:
            by = GROUPINGS[(GROUPINGS.index(by) + 1) % len(GROUPINGS)]
        by = KEYS.get(key, by)
    return by, False


class Keys:
    """The terminal's keys, one at a time, and its resizes, until `restore`.

    Without a terminal on stdin there are no keys: `wait` only sleeps."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self._saved = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        # A handler, even one that does nothing, makes the kernel wake our select (set_wakeup_fd).
        self._old_winch = signal.signal(signal.SIGWINCH, lambda *_: None)
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        signal.signal(signal.SIGWINCH, self._old_winch)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wait(self, timeout: float) -> str | None:
        """Keys pressed within `timeout` seconds ("" for a resize), or None if nothing happened."""
        watched = [self._wake_r] if self.fd is None else [self.fd, self._wake_r]
        ready, _, _ = select.select(watched, [], [], max(timeout, 0.0))
        if not ready:
            return None
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        if self.fd in ready:
            data = os.read(self.fd, 64)
            if not data:  # the terminal hung up
                return "q"
            return data.decode(errors="replace")
        return ""


@contextlib.contextmanager
def keys() -> Iterator[Keys]:
    k = Keys()
    try:
        yield k
    finally:
        k.restore()


class View:
    """The last two polls and how to show them."""

    def __init__(self, path: str, interval: float, by: str) -> None:
        self.path, self.interval, self.by = path, interval, by
        self.prev: Snapshot | None = None
        self.cur = poll(path)  # a daemon that does not answer now is the caller's one-line error
        self.problem: str | None = None

    def refresh(self) -> None:
        try:
            self.prev, self.cur, self.problem = self.cur, poll(self.path), None
        except ControlError as e:  # shown, and tried again next interval
            self.problem = f"{e} (trying again every {self.interval:g}s)"

    def frame(self, width: int, height: int | None) -> Group:
        return display.top_screen(
            self.prev, self.cur, self.by, self.interval, width, height, user_name, self.problem
        )


def run(path: str, interval: float, by: str, console: Console | None = None) -> int:
    """The view until `q` or Ctrl-C (0). A daemon that does not answer the first poll raises
    ControlError; later, its errors are shown in the header."""
    console = console or default_console()
    view = View(path, interval, by)
    try:
        if not console.is_terminal:
            while True:
                console.print(view.frame(console.width, None))
                time.sleep(interval)
                view.refresh()
        due = time.monotonic() + interval
        with keys() as k, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(view.frame(console.width, console.height), refresh=True)
                pressed = k.wait(due - time.monotonic())
                if pressed:
                    view.by, leave = regroup(view.by, pressed)
                    if leave:
                        return 0
                if time.monotonic() >= due:
                    due = time.monotonic() + interval
                    view.refresh()
    except KeyboardInterrupt:
        return 0
