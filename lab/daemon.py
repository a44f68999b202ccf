"""A real nfacct daemon for the tests, the benchmark and the demo: the one place that starts
`nfacct run --netns NS`, waits until its control socket answers, and stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nfacct import control


class Daemon:
    """`nfacct run --netns NS` as a real process in the root namespace.

    Its control socket is DIRECTORY/control.sock and its database DIRECTORY/nfacct.db unless
    `db` names another (a restarted daemon continuing a predecessor's database). Its output is
    appended to DIRECTORY/daemon.log (`log`), or left on ours with `log=None`. `extra` are more
    `nfacct run` arguments; `env` replaces its environment (systemd's variables, in
    tests/test_systemd.py); `wrap` goes in front of its command line, and must exec it in the same
    process (setpriv) or follow it (strace -f). Returns once the daemon answers `ping`; raises
    RuntimeError if it exits first or does not answer within `timeout` seconds, and then leaves no
    process behind.
    """

    def __init__(
        self,
        netns: str,
        directory: str | os.PathLike,
        *extra: str,
        db: str | None = None,
        log: str | None = "daemon.log",
        timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.control = str(directory / "control.sock")
        self.db = db or str(directory / "nfacct.db")
        self.log = None if log is None else directory / log
        argv = [*wrap, sys.executable, "-m", "nfacct", "run", "--netns", netns, "--control", self.control]
        argv += ["--db", self.db, *extra]
        if self.log is None:
            self.proc = subprocess.Popen(argv, env=env)
        else:
            with open(self.log, "a") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_until_answering(timeout)
        except BaseException:  # including Ctrl-C while waiting: no daemon left running
            self.kill()
            raise

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = "(its output is above)" if self.log is None else self.log.read_text()
                raise RuntimeError(f"daemon exited early with status {self.proc.returncode}: {output}")
            try:
                control.request(self.control, "ping", timeout=1)
                return
            except control.ControlError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer on {self.control} within {timeout:g} s")

    def request(self, command: str, **kw) -> dict:
        """One control request, answered in-process (`nfacct.control.request`)."""
        return control.request(self.control, command, **kw)

    def cli(self, *args: str) -> str:
        """`nfacct ARGS --control CONTROL` as a process; its stdout."""
        return subprocess.run(
            [sys.executable, "-m", "nfacct", *args, "--control", self.control],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def top(self) -> list[dict]:
        return json.loads(self.cli("top", "--json", "--once"))

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json"))

    def stop(self) -> int:
        """SIGTERM (the daemon drains its queue and writes its last checkpoint); its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL if still running, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
