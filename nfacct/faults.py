"""Faults the daemon survives: counted by kind, each kind logged once.

A daemon that dies on a bad input stops the accounting of the whole host, so the loop catches
what goes wrong in one request, one packet or one write, and goes on. Nothing is swallowed
silently: `status` shows every count, and the log shows the first occurrence of each kind with
its exception, without flooding when a client or a packet repeats the fault a million times.
"""

from __future__ import annotations

import logging

log = logging.getLogger("nfacct")


class Faults:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def record(self, where: str, exc: BaseException) -> None:
        kind = f"{where}: {type(exc).__name__}"
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if n == 0:
            log.error("%s: %s (logged once; `nfacct status` counts every occurrence)", kind, exc)

    def status(self) -> dict[str, int]:
        return dict(self.counts)
