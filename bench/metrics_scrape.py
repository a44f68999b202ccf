"""The cost of one Prometheus scrape of `nfacct run --metrics`, with 10,000 tasks and 20,000 flows:
in the daemon's loop (a snapshot of every task, what `top` shows, its fold into the (command,
user, cgroup) aggregates, a copy of what the scrape shows) and in the rendering thread (the
text). Two shapes: 100 distinct commands (a busy host: many processes of few programs) and
10,000 (every process named differently: the label-set limit, the worst case). Every task's
counters change between scrapes, so each fold does its full work.

No network namespace, no root: the engine's tables are filled directly. `make bench` runs it.

    .venv/bin/python bench/metrics_scrape.py [--tasks 10000] [--scrapes 5]
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import time

from nfacct.engine import Engine
from nfacct.faults import Faults
from nfacct.metrics import Health, Metrics
from nfacct.tables import GcConfig


def engine_with(tasks: int, commands: int) -> Engine:
    engine = Engine(config=GcConfig(max_taskinfo=tasks))
    for pid in range(1, tasks + 1):
        comm = f"cmd{pid % commands}"
        task = engine.tables.task(pid, 1000.0 + pid, comm, "cmd --flag", pid % 50, "/user.slice")
        task.counters[:] = [pid, 100 * pid] * 4
        for n in range(2):  # two flows each, as sockinfo
            key = (6, bytes([10, 0, 0, 1]), 10000 + n, bytes([10, 0, 0, 2]), pid, None)
            engine.tables.add_sock(key, 0.0).resolve(task)
    return engine


def health(engine: Engine) -> Health:
    e = engine.status()
    return Health(
        e["packets"], e["malformed"], e["unidentified_by_uid"], 0, None, 0,
        e["sockinfo"], e["sockinfo_overflow"], e["taskinfo"], e["taskinfo_overflow"], 0,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--scrapes", type=int, default=5)
    args = p.parse_args()
    head = ("commands", "series", "body", "loop p50", "max", "thread p50", "max")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 7, 9, 11, 8, 11, 8), strict=True)))
    for commands in (100, args.tasks):
        engine = engine_with(args.tasks, commands)
        with selectors.DefaultSelector() as sel:
            address = ("127.0.0.1", free_port())
            metrics = Metrics(address, engine.top, lambda e=engine: health(e), Faults(), sel)
            metrics.baseline()
            loop, thread = [], []
            for _ in range(args.scrapes):
                for task in engine.tables.tasks.values():
                    task.counters[1] += 1500
                start = time.perf_counter()
                render = metrics.prepare()
                prepared = time.perf_counter()
                body, _ = render()
                loop.append(prepared - start)
                thread.append(time.perf_counter() - prepared)
            metrics.close()
        series = sum(line.startswith(b"nfacct_") for line in body.splitlines())
        ms = [f"{statistics.median(t) * 1000:>9.1f}ms {max(t) * 1000:>6.1f}ms" for t in (loop, thread)]
        print(f"{commands:>9,} {series:>7,} {len(body) / 1e6:>7.2f}MB {ms[0]} {ms[1]}")


if __name__ == "__main__":
    main()
