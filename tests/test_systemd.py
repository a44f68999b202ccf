"""The systemd service: packaging/nfacct.service (and its --netns drop-in packaging/netns.conf)
as systemd reads it, the notification protocol as a real daemon speaks it, and the sandbox the
unit puts the daemon in.

systemd is not PID 1 in the container CI runs in, so no unit is started here. The sandbox is
emulated instead, each part against the real kernel: the capability bounding set,
NoNewPrivileges and ReadOnlyPaths=/proc with setpriv(1) and unshare(1) (a daemon run with
exactly the unit's capabilities, and with one less), the system call filter, address families
and MemoryDenyWriteExecute against strace(1)'s record of a daemon at work. The other mount
namespace options (ProtectSystem=, PrivateTmp=, ...) are not exercised.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import count_port, kernel, until

from lab.daemon import Daemon
from lab.hosts import PEER_V4, Lab
from nfacct import control, text
from nfacct.cli import HANDED_OVER
from nfacct.faults import Faults
from nfacct.notify import FAULT, Notifier, status_line
from nfacct.rules import Rules

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNIT, NETNS_DROPIN = PACKAGING / "nfacct.service", PACKAGING / "netns.conf"
INSTALLED = "/usr/local/bin/nfacct"  # where docs/install.md puts the command
EVIL = b"\xff\x1b\nMAINPID=1"  # a process name (comm) that would add a field to a raw STATUS=

# Sends COUNT datagrams of 100 bytes from port SPORT to the peer, says so, and waits for its stdin
# to close; names itself (comm) from $COMM first, if set.
SENDER = (
    "import os, socket, sys\n"
    "name = os.environb.get(b'COMM')\n"
    "if name:\n"
    "    open('/proc/self/comm', 'wb').write(name)\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('', int(sys.argv[1])))\n"
    "for _ in range(int(sys.argv[2])):\n"
    f"    s.sendto(b'x' * 100, ('{PEER_V4}', 9))\n"
    "print('sent', flush=True)\n"
    "sys.stdin.read()\n"
)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing (Debian: apt-get install systemd; `make setup` does)")
    return found


def setting_lines(name: str, *files: Path) -> list[list[str]]:
    """The values of each `name=` line in [Service] across a unit and its drop-ins, in order,
    as systemd merges list settings: an empty assignment drops the lines before it."""
    lines: list[list[str]] = []
    for f in files:
        section = None
        for line in f.read_text().splitlines():
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "Service" and line.startswith(f"{name}="):
                values = line.split("=", 1)[1].split()
                lines = [*lines, values] if values else []
    return lines


def settings(name: str, *files: Path) -> list[str]:
    return [value for line in setting_lines(name, *files) for value in line]


def bounding_set(*files: Path) -> set[str]:
    return {c.lower() for c in settings("CapabilityBoundingSet", *files)}


def runnable_here(source: Path, target: Path) -> None:
    """`source` with the command where this checkout has it; nothing else changes."""
    installed = Path(sys.executable).parent / "nfacct"
    body = source.read_text()
    assert body.count(INSTALLED) == 2, "the Exec lines moved: update this test"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body.replace(INSTALLED, str(installed)))


# ---- the unit file --------------------------------------------------------------------------


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True)


def test_systemd_analyze_verifies_the_unit_and_its_netns_drop_in(tmp_path):
    unit = tmp_path / "nfacct.service"
    runnable_here(UNIT, unit)
    r = verify(unit)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # The drop-in is read from nfacct.service.d beside the unit.
    runnable_here(NETNS_DROPIN, tmp_path / "nfacct.service.d" / "netns.conf")
    r = verify(unit)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # What a mistake looks like, so that the silence above means something.
    with open(tmp_path / "nfacct.service.d" / "netns.conf", "a") as f:
        f.write("NoNewPrivilege=yes\n")
    assert "Unknown key 'NoNewPrivilege'" in verify(unit).stderr


def test_the_unit_exposure_stays_low(tmp_path):
    """systemd's own review of the sandbox (0 is a perfect score, 10 none at all); 2.6 when
    written. It drops if a hardening line goes."""
    unit = tmp_path / "nfacct.service"
    runnable_here(UNIT, unit)
    cmd = [systemd_analyze(), "security", "--offline=yes", str(unit)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"Overall exposure level for nfacct.service: (\d+\.\d+)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= 2.6, r.stdout


# ---- the notification protocol, in-process ---------------------------------------------------


class Receiver:
    """A datagram socket standing in for systemd's notification socket: every message a
    daemon sends, with the time it arrived (time.monotonic). `on_ready` runs on READY=1."""

    def __init__(self, address: str, on_ready: Callable[[], object] | None = None):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.on_ready, self.ready_result = on_ready, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            now = time.monotonic()
            message = data.decode()
            if "READY=1" in message.splitlines() and self.on_ready is not None:
                try:
                    self.ready_result = self.on_ready()
                except Exception as e:
                    self.ready_result = e
            self.messages.append((now, message))

    def fields(self, name: str) -> list[tuple[float, str]]:
        """(arrival, value) of every `name=` field received."""
        return [
            (at, line.split("=", 1)[1])
            for at, message in list(self.messages)
            for line in message.splitlines()
            if line.startswith(f"{name}=")
        ]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def short_dir():
    """A directory with a short path: a socket path is at most 107 bytes, pytest's tmp_path longer."""
    path = tempfile.mkdtemp(prefix="nfn")
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_the_notifier_speaks_the_protocol(kind, short_dir):
    address = f"{short_dir}/notify" if kind == "path" else f"@nfacct-test-{os.getpid()}"
    receiver = Receiver(address)
    faults = Faults()
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}, faults.record)
    try:
        assert notifier.watchdog_period == 1.5
        notifier.ready("accounting")
        notifier.status(text.decode(EVIL))
        notifier.watchdog()
        notifier.stopping("draining")
        assert until(lambda: len(receiver.messages), 4, 5) == 4
        assert [m for _, m in receiver.messages] == [
            "READY=1\nSTATUS=accounting",
            "STATUS=\\xff\\x1b\\nMAINPID=1",  # one field: the newline is escaped
            "WATCHDOG=1",
            "STOPPING=1\nSTATUS=draining",
        ]
        assert faults.status() == {}
    finally:
        notifier.close()
        receiver.close()


def test_without_notify_socket_nothing_is_sent_or_counted():
    faults = Faults()
    notifier = Notifier({"WATCHDOG_USEC": "1000000"}, faults.record)  # a watchdog without a socket
    notifier.ready("x")
    notifier.watchdog()
    assert (notifier.enabled, notifier.watchdog_period, faults.status()) == (False, None, {})


def test_the_watchdog_is_for_the_process_systemd_names():
    def period(**env: str) -> tuple[float | None, dict]:
        faults = Faults()
        notifier = Notifier({"NOTIFY_SOCKET": "@nfacct-unused", **env}, faults.record)
        notifier.close()
        return notifier.watchdog_period, faults.status()

    assert period(WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid())) == (1.5, {})
    assert period(WATCHDOG_USEC="3000000") == (1.5, {})
    assert period(WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getppid())) == (None, {})  # a parent's
    assert period() == (None, {})
    for bad in ("0", "-5", "soon"):
        assert period(WATCHDOG_USEC=bad) == (None, {f"{FAULT}: NotifyError": 1})


def test_bad_addresses_and_failed_sends_are_counted_and_logged_once(short_dir, caplog):
    caplog.set_level(logging.ERROR, logger="nfacct")
    faults = Faults()
    notifier = Notifier({"NOTIFY_SOCKET": "relative/notify"}, faults.record)
    notifier.ready("x")
    assert (notifier.enabled, faults.status()) == (False, {f"{FAULT}: NotifyError": 1})

    faults = Faults()
    notifier = Notifier({"NOTIFY_SOCKET": f"{short_dir}/nobody-listens"}, faults.record)
    try:
        for _ in range(3):
            notifier.watchdog()
        assert faults.status() == {f"{FAULT}: FileNotFoundError": 3}
        logged = [r for r in caplog.records if "FileNotFoundError" in r.getMessage()]
        assert len(logged) == 1
    finally:
        notifier.close()


def test_a_full_notification_queue_never_blocks(short_dir):
    """Nobody reads: past the receiver's queue, each message is dropped and counted at once."""
    address = f"{short_dir}/notify"
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(address)
    faults = Faults()
    notifier = Notifier({"NOTIFY_SOCKET": address}, faults.record)
    sender = threading.Thread(target=lambda: [notifier.watchdog() for _ in range(5000)], daemon=True)
    try:
        sender.start()
        sender.join(timeout=20)
        assert not sender.is_alive(), "a send blocked"
        dropped = faults.status().get(f"{FAULT}: BlockingIOError", 0)
        queued = 0
        unread.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while unread.recv(64):
                queued += 1
        assert dropped > 0 and dropped + queued == 5000
    finally:
        notifier.close()
        unread.close()


def test_the_status_line():
    def task(pid: int, comm: str, packets: int, exit_time: float | None = None) -> dict:
        counters = dict.fromkeys(("tcpsnd", "tcprcv", "udpsnd", "udprcv"), 0)
        row = {f"{k}packs": v for k, v in counters.items()} | {f"{k}bytes": v for k, v in counters.items()}
        row.update(udpsndpacks=packets, udpsndbytes=100 * packets, tcprcvpacks=1, tcprcvbytes=60)
        return {**row, "pid": pid, "comm": comm, "exit_time": exit_time}

    tasks = [task(7, text.decode(EVIL), 1999), task(8, "b", 10), task(9, "gone", 5000, exit_time=1.0)]
    # The name as it is: the notifier escapes every STATUS= text it sends.
    assert status_line(tasks, 12) == (
        f"2 processes: 2,011 packets, 201,020 bytes; unaccounted 12; top: {text.decode(EVIL)} (pid 7)"
        " 2,000 packets"
    )
    assert status_line([], None) == "0 processes: 0 packets, 0 bytes; unaccounted: unknown (no counting rule)"


# ---- a real daemon ---------------------------------------------------------------------------


def systemd_env(notify: str, watchdog_usec: int | None = None) -> dict[str, str]:
    """What systemd gives a Type=notify service (WATCHDOG_PID is left out: Popen cannot know the
    pid beforehand, and without it the watchdog is meant for the process itself)."""
    env = {**os.environ, "NOTIFY_SOCKET": notify}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def start_sender(lab, procs, sport: int, count: int, *, comm: bytes | None = None, user: str | None = None):
    argv = [sys.executable, "-c", SENDER, str(sport), str(count)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = {**os.environ, "COMM": os.fsdecode(comm)} if comm is not None else None
    p = subprocess.Popen(lab.cmd(lab.acct, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    procs.append(p)
    assert p.stdout.readline() == b"sent\n"
    return p


def test_the_daemon_notifies_ready_status_watchdog_and_stopping(lab, rules, counters, tmp_path, port, procs):
    address = f"@nfacct-test-{os.getpid()}-{port()}"
    control_path = str(tmp_path / "control.sock")
    receiver = Receiver(address, on_ready=lambda: control.request(control_path, "ping", timeout=2))
    try:
        daemon = Daemon(lab.acct, tmp_path, env=systemd_env(address, watchdog_usec=2_000_000))
        try:
            # READY=1 came when the daemon already answered: a ping sent on its arrival, not retried.
            assert until(lambda: receiver.ready_result is not None, True, 5), receiver.messages
            assert receiver.ready_result["ok"] is True, receiver.ready_result
            assert receiver.fields("READY")[0][1] == "1"

            sport = port()
            count_port(counters, "udp", sport)
            sender = start_sender(lab, procs, sport, 25, comm=EVIL)
            # The kernel's count is behind the queue's verdicts.
            assert until(lambda: kernel(counters, "udp", sport)["udpsndpacks"], 25) == 25
            sent = kernel(counters, "udp", sport)
            escaped = "\\xff\\x1b\\nMAINPID=1"
            expected = (
                f"1 processes: 25 packets, {sent['udpsndbytes']:,} bytes; unaccounted 0;"
                f" top: {escaped} (pid {sender.pid}) 25 packets"
            )
            assert until(lambda: [s for _, s in receiver.fields("STATUS")][-1:], [expected], 15) == [expected]
            assert receiver.fields("MAINPID") == [], "a process name added a field"

            # Every second (half of WATCHDOG_USEC), never late enough for systemd to act.
            pings = [at for at, _ in receiver.fields("WATCHDOG")]
            gaps = sorted(b - a for a, b in itertools.pairwise(pings))
            assert len(gaps) >= 3, receiver.messages
            assert 0.9 <= gaps[len(gaps) // 2] <= 1.2 and gaps[0] > 0.5 and gaps[-1] < 2.0, gaps
            assert receiver.fields("STOPPING") == []
        finally:
            assert daemon.stop() == 0, daemon.log.read_text()
        stopping = receiver.fields("STOPPING")
        assert [value for _, value in stopping] == ["1"]
        assert [at for at, _ in receiver.fields("WATCHDOG") if at > stopping[0][0]] == []
    finally:
        receiver.close()


def test_a_frozen_daemon_stops_pinging_the_watchdog(lab, rules, tmp_path, short_dir, daemons):
    """What systemd's watchdog catches: SIGSTOP silences the pings, SIGCONT brings them back."""
    receiver = Receiver(f"{short_dir}/notify")
    try:
        daemon = Daemon(lab.acct, tmp_path, env=systemd_env(receiver.address, watchdog_usec=1_000_000))
        daemons.append(daemon)
        assert until(lambda: len(receiver.fields("WATCHDOG")) >= 2, True, 5), receiver.messages
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            time.sleep(2.5)  # five ping periods, two and a half watchdog timeouts
            late = [at - stopped for at, _ in receiver.fields("WATCHDOG") if at > stopped + 0.2]
            assert late == [], "pings from a stopped daemon"
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert until(lambda: any(at > resumed for at, _ in receiver.fields("WATCHDOG")), True, 1.0)
        assert daemon.stop() == 0, daemon.log.read_text()
    finally:
        receiver.close()


def test_failed_notifications_are_counted_and_the_daemon_goes_on(lab, rules, tmp_path, short_dir, daemons):
    env = systemd_env(f"{short_dir}/nobody-listens", watchdog_usec=200_000)
    daemon = Daemon(lab.acct, tmp_path, env=env)
    daemons.append(daemon)
    kind = f"{FAULT}: FileNotFoundError"
    # READY=1, then a ping every 0.1 s
    assert until(lambda: daemon.status()["faults"].get(kind, 0) >= 10, True, 10), daemon.status()["faults"]
    assert daemon.top() == []
    assert daemon.stop() == 0
    assert daemon.log.read_text().count(FAULT) == 1, daemon.log.read_text()


def test_a_daemon_that_handed_over_is_not_restarted(lab, rules, tmp_path, daemons):
    """Restart=always restarts a daemon that exits 0; one that handed over exits 3, which the
    unit counts as success and does not restart (a restart would be refused, over and over)."""
    handed_over = [str(HANDED_OVER)]
    assert settings("RestartPreventExitStatus", UNIT) == settings("SuccessExitStatus", UNIT) == handed_over
    first = Daemon(lab.acct, tmp_path)
    daemons.append(first)
    successor = Daemon(lab.acct, tmp_path, "--takeover", db=first.db)
    daemons.append(successor)
    assert first.proc.wait(timeout=15) == HANDED_OVER, first.log.read_text()

    def answers() -> bool:
        with contextlib.suppress(control.ControlError):
            return successor.request("status")["pid"] == successor.proc.pid
        return False

    assert until(answers, True), successor.log.read_text()
    assert successor.stop() == 0


# ---- the sandbox, emulated -------------------------------------------------------------------


def capabilities(pid: int) -> tuple[set[str], bool]:
    """The effective capabilities of `pid` by name, and whether it runs with NoNewPrivs."""
    names = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    bits = int(status["CapEff"], 16)
    return {f"cap_{n}" for i, n in enumerate(names.split()) if bits >> i & 1}, status["NoNewPrivs"] == "1"


def sandboxed(caps: set[str], read_only: Sequence[str] = ()) -> list[str]:
    """A command prefix that runs the command as the unit would, as far as we emulate it: these
    paths read-only in a mount namespace of its own (ReadOnlyPaths=, with unshare), this
    bounding set (root gets exactly it) and NoNewPrivileges (setpriv). The command keeps the pid."""
    keep = ",".join(f"+{c.removeprefix('cap_')}" for c in sorted(caps))
    prefix = ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all,{keep}"]
    if read_only:
        mounts = " && ".join(f"mount --bind -o ro {shlex.quote(p)} {shlex.quote(p)}" for p in read_only)
        script = f'{mounts} && exec "$@"'
        prefix = ["unshare", "--mount", "--propagation=slave", "sh", "-c", script, "sh", *prefix]
    return prefix


def unit_sandbox(caps: set[str]) -> list[str]:
    return sandboxed(caps, settings("ReadOnlyPaths", UNIT))


# Without one capability of the unit's, the senders whose owner nfacct still finds.
WITHOUT = {None: {"root", "nobody"}, "cap_sys_ptrace": set(), "cap_dac_read_search": {"root"}}


@pytest.mark.parametrize("removed", list(WITHOUT), ids=lambda r: f"without {r}" if r else "the unit's")
def test_the_unit_capabilities_are_enough_and_each_is_needed(
    removed, lab, rules, counters, tmp_path, port, procs, daemons
):
    """A sender as root and one as nobody: with the unit's capabilities (and the drop-in's
    CAP_SYS_ADMIN, which --netns needs) both are found, exactly; without CAP_SYS_PTRACE neither
    (/proc/PID/fd links of processes not ours to trace), without CAP_DAC_READ_SEARCH not
    nobody's (its /proc/PID/fd is mode 0500). Their packets then count by uid, exactly."""
    caps = bounding_set(UNIT, NETNS_DROPIN) - {removed}
    daemon = Daemon(lab.acct, tmp_path, wrap=unit_sandbox(caps))
    daemons.append(daemon)
    assert capabilities(daemon.proc.pid) == (caps, True)
    events = daemon.status()["events"]
    assert (events["process_exits"], events["socket_close"]) == ("proc connector", "sock_diag destroy events")

    senders, sent = {}, {}
    for who, user, uid in (("root", None, "0"), ("nobody", "65534", "65534")):
        sport = port()
        count_port(counters, "udp", sport)
        senders[who] = (start_sender(lab, procs, sport, 20, user=user), uid)
        assert until(lambda p=sport: kernel(counters, "udp", p)["udpsndpacks"], 20) == 20
        sent[who] = kernel(counters, "udp", sport)["udpsndpacks"]

    found = WITHOUT[removed]

    def owners() -> dict[str, int | None]:
        tasks = {t["pid"]: t["udpsndpacks"] for t in daemon.top()}
        return {who: tasks.get(p.pid) for who, (p, _) in senders.items()}

    def by_uid() -> dict[str, int]:
        buckets = daemon.status()["engine"]["unidentified_by_uid"]
        return {uid: buckets[uid]["udpsndpacks"] for uid in buckets}

    expected = {who: sent[who] if who in found else None for who in senders}
    assert until(owners, expected) == expected
    unidentified = {uid: sent[who] for who, (_, uid) in senders.items() if who not in found}
    # The lookups give up after about 4 s of retries (longer on a loaded machine: CI saw 10 s pass).
    assert until(by_uid, unidentified, 30) == unidentified
    assert daemon.stop() == 0, daemon.log.read_text()


def test_without_cap_net_admin_the_daemon_stops_with_one_line(lab, rules, tmp_path):
    caps = bounding_set(UNIT, NETNS_DROPIN) - {"cap_net_admin"}
    argv = [*unit_sandbox(caps), sys.executable, "-m", "nfacct", "run", "--netns", lab.acct]
    argv += ["--control", str(tmp_path / "control.sock"), "--db", str(tmp_path / "nfacct.db")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    last = r.stderr.splitlines()[-1]
    expected = "cannot bind NFQUEUE 0: Operation not permitted (binding a queue needs CAP_NET_ADMIN)"
    assert last == f"nfacct: error: {expected}", r.stderr
    assert os.listdir(tmp_path) == []


def syscall_filter(lines: list[list[str]]) -> set[str]:
    """The system calls SystemCallFilter= lines allow: an allow list first, then lines that add
    to it or (~) take from it."""
    assert not lines[0][0].startswith("~"), "the unit's filter starts with an allow list"
    allowed, denied = set(), set()
    for line in lines:
        if line[0].startswith("~"):
            denied |= expand_calls([line[0][1:], *line[1:]])
        else:
            allowed |= expand_calls(line)
    return allowed - denied


def expand_calls(names: list[str]) -> set[str]:
    """System calls and @groups as system calls, the groups expanded by systemd."""
    calls, seen, todo = set(), set(), list(names)
    while todo:
        name = todo.pop()
        if not name.startswith("@"):
            calls.add(name)
        elif name not in seen:
            seen.add(name)
            cmd = [systemd_analyze(), "syscall-filter", name]
            listing = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            members = (line.strip() for line in listing.splitlines()[1:])  # the first names the group
            todo += [m for m in members if m and not m.startswith("#")]
    return calls


@pytest.mark.root
def test_the_sandbox_keeps_cap_sys_ptrace_from_writing_memory():
    """CAP_SYS_PTRACE passes the kernel's check on any process's /proc/PID/mem, for writing
    too: the unit's read-only /proc is what refuses it, and its filter process_vm_writev."""
    victim = subprocess.Popen(["sleep", "60"])
    probe = [sys.executable, "-c", "import sys; open(f'/proc/{sys.argv[1]}/mem', 'r+b')", str(victim.pid)]
    try:
        opened = subprocess.run([*sandboxed(bounding_set(UNIT)), *probe], capture_output=True, text=True)
        assert opened.returncode == 0, opened.stderr
        refused = subprocess.run([*unit_sandbox(bounding_set(UNIT)), *probe], capture_output=True, text=True)
        assert refused.stderr.splitlines()[-1].endswith(f"Read-only file system: '/proc/{victim.pid}/mem'")
    finally:
        victim.kill()
        victim.wait()
    filtered = syscall_filter(setting_lines("SystemCallFilter", UNIT))
    assert {"process_vm_writev", "process_vm_readv", "ptrace"} & filtered == set()
    assert {"read", "sendmsg", "setns"} <= filtered  # what it does allow


STRACE_LINE = re.compile(r"^\d+ +(?:<\.\.\. )?(\w+)(?:\(| resumed>)(.*)$")


def traced(path: Path) -> list[tuple[str, str]]:
    """(system call, its arguments and result) from `strace -f -o PATH`."""
    return [m.groups() for line in path.read_text().splitlines() if (m := STRACE_LINE.match(line))]


def test_system_calls_stay_within_the_unit_filter(tmp_path, port, procs):
    """strace(1) records the rules install (ExecStartPre=) and a daemon's start, traffic,
    attribution, process exits, GC cycles, checkpoints, `top`, `status` and stop, children
    included (nft, ip, the guard). Every call must be in SystemCallFilter= (the unit's and
    the drop-in's @mount), every socket of RestrictAddressFamilies=, and no memory both writable
    and executable (MemoryDenyWriteExecute=). Paths not taken here are not covered."""
    if shutil.which("strace") is None:
        pytest.skip("strace is missing (Debian: apt-get install strace; `make setup` does)")
    allowed = syscall_filter(setting_lines("SystemCallFilter", UNIT, NETNS_DROPIN))
    families = set(settings("RestrictAddressFamilies", UNIT))
    pre, run = tmp_path / "install.strace", tmp_path / "run.strace"
    with Lab("nfsc") as lab:
        install = [sys.executable, "-m", "nfacct", "rules", "install", "--netns", lab.acct]
        subprocess.run(["strace", "-f", "-qq", "-o", str(pre), *install], check=True, capture_output=True)
        daemon_pid = None
        try:
            daemon = Daemon(
                lab.acct,
                tmp_path,
                "--gc-cycle=1",
                "--checkpoint-interval=1",
                wrap=["strace", "-f", "-qq", "-o", str(run)],
            )
            # strace forks the daemon: signals go to the daemon itself, not to strace.
            children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()
            daemon_pid = int(children.split()[0])
            sport = port()
            sender = start_sender(lab, procs, sport, 20)
            counted = lambda: [t["udpsndpacks"] for t in daemon.top() if t["pid"] == sender.pid]  # noqa: E731
            assert until(counted, [20]) == [20]
            sender.stdin.close()
            sender.wait()
            daemon.status()
            time.sleep(2.5)  # the exit written, two GC cycles and checkpoints
            os.kill(daemon_pid, signal.SIGTERM)
            assert daemon.proc.wait(timeout=30) == 0, daemon.log.read_text()  # strace exits as its tracee
        finally:
            if daemon_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(daemon_pid, signal.SIGKILL)
            Rules(lab.acct).remove()
    calls = traced(pre) + traced(run)
    assert len(calls) > 10_000  # the record is there (about 40,000 calls when written)
    assert sorted({name for name, _ in calls} - allowed) == []
    assert sorted({m[1] for _, args in calls if (m := re.match(r"(AF_\w+)", args))} - families) == []
    wx = [
        (name, args)
        for name, args in calls
        if name in ("mmap", "mprotect", "pkey_mprotect")
        and "PROT_EXEC" in args
        and ("PROT_WRITE" in args or name != "mmap")
    ]
    assert wx == []
