"""The accounting daemon: one event loop over the queue, the resolver's answers, the control
socket and signals. Runs in the root namespace; with `netns` its queue and sock_diag sockets
live in that namespace instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time

from netfilterqueue import Packet

from . import control
from .engine import Engine
from .queue import HOOK_LOCAL_OUT, Queue
from .resolver import Resolver
from .sockdiag import SockDiag

log = logging.getLogger("nfacct")


class Service:
    def __init__(self, netns: str | None = None, queue: int = 0, control_path: str = control.DEFAULT_CONTROL):
        self.netns = netns
        self.started = time.time()
        self.control_path = control_path
        self._running = False
        self.sockdiag = SockDiag(netns)
        self.resolver = Resolver(self.sockdiag)
        self.engine = Engine(submit=self.resolver.submit)
        try:
            self.queue = Queue(queue, self._on_packet, netns)
        except BaseException:
            self.sockdiag.close()
            raise
        try:
            self._listener = control.listen(control_path)
        except BaseException:
            self.queue.close()
            self.sockdiag.close()
            raise

    def _on_packet(self, pkt: Packet) -> None:
        # The verdict goes first: accounting never holds a packet back.
        pkt.accept()
        try:
            outgoing = pkt.hook == HOOK_LOCAL_OUT
            self.engine.account(pkt.get_payload(), outgoing, pkt.outdev if outgoing else pkt.indev)
        except Exception:
            self.engine.errors += 1

    def handle(self, cmd: str) -> dict:
        if cmd == "ping":
            return {"ok": True}
        self.engine.apply_answers(self.resolver.work())
        if cmd == "top":
            tasks = sorted(self.engine.tables.tasks.values(), key=lambda t: -sum(t.counters[1::2]))
            return {"time": time.time(), "tasks": [t.as_dict() for t in tasks]}
        if cmd == "status":
            return self.status()
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        kernel = self.queue.kernel_stats()
        queue = {"number": self.queue.number, "flags": self.queue.flags}
        if kernel is not None:
            queue.update(vars(kernel))
            # Packet ids count every packet handed to us since bind; any we did not see was
            # lost to a full socket buffer (and, with FAIL_OPEN, accepted without accounting).
            queue["missed"] = kernel.id_sequence - self.engine.packets
        return {
            "pid": os.getpid(),
            "netns": self.netns,
            "uptime": time.time() - self.started,
            "engine": self.engine.status(),
            "queue": queue,
            "resolver": {
                "in_flight": self.resolver.in_flight,
                "resolved": self.resolver.resolved,
                "gave_up": self.resolver.gave_up,
                "errors": self.resolver.errors,
                "sock_diag_requests": self.sockdiag.requests,
                "proc_scans": self.resolver.index.scans,
                "socket_index": len(self.resolver.index),
            },
        }

    def stop(self, *_args) -> None:
        self._running = False

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old_handlers = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        sel.register(self.queue.fileno(), selectors.EVENT_READ, "queue")
        sel.register(self._listener, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        self._running = True
        log.info("accounting queue %d in netns %s", self.queue.number, self.netns or "(own)")
        try:
            while self._running:
                due = self.resolver.next_due()
                for key, _ in sel.select(timeout=1.0 if due is None else min(due, 1.0)):
                    if key.data == "queue":
                        self.queue.dispatch()
                    elif key.data == "control":
                        control.serve_one(self._listener, self.handle)
                    else:
                        os.read(wake_r, 512)
                # After the batch: find the owners of the flows it brought while they still exist.
                self.engine.apply_answers(self.resolver.work())
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
            self.close()

    def close(self) -> None:
        self.queue.close()
        self.sockdiag.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
