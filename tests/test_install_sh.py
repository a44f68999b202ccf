"""rules/install.sh, the installer for hosts without Python, against `nfacct rules install`: both
run with the same options in the two namespaces of a Lab (the script in `acct`, nfacct in
`peer`) and must leave the same ruleset, recognise each other's install and remove it."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import count_port, kernel, until
from test_rules import kernel_has_nft_queue

from lab.daemon import Daemon
from lab.hosts import PEER_V4, ROOT, Counters, Lab
from nfacct.rules import DAEMON_MARK
from nfacct.rules.base import render
from nfacct.tables import COUNTER_NAMES

SCRIPT = Path(ROOT) / "rules" / "install.sh"
NATIVE_REFUSED = "nft -f - failed: Could not process rule: No such file or directory"


def script(*args: str, env: dict | None = None, path: Path = SCRIPT) -> subprocess.CompletedProcess:
    """install.sh ARGS under dash, the strictest POSIX shell at hand."""
    return subprocess.run(["dash", str(path), *args], capture_output=True, text=True, env=env)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`nfacct rules ARGS` as a process."""
    argv = [sys.executable, "-m", "nfacct", "rules", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def listing(ns: str, env: dict | None = None) -> str:
    """`nft list ruleset` with counters masked (two namespaces never count alike)."""
    text = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True, env=env
    ).stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def queued(ns: str) -> int:
    """Packets the kernel counted on the (iptables-nft) queue rules, as `nft list` prints them."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True
    )
    return sum(int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ queue num", out.stdout))


@pytest.fixture
def lab():
    with Lab("nfi") as lab:
        yield lab


def expected_backend() -> str:
    return "nft" if kernel_has_nft_queue() else "iptables-nft"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--queue", "7"],
        ["--offload-mark", "0x800"],
        ["--backend", "iptables-nft", "--queue", "65535", "--offload-mark", "2048"],
        ["--backend", "nft", "--queue", "3"],
    ],
    ids=["defaults", "queue", "offload-mark", "iptables-nft", "nft"],
)
def test_the_script_installs_what_nfacct_installs(lab, args):
    if "nft" in args and not kernel_has_nft_queue():
        pytest.skip("this kernel has no nft_queue: test_the_native_backend_... covers it")
    said = ok(script("--netns", lab.acct, *args))
    assert said == ok(cli("install", "--netns", lab.peer, *args))
    queue = args[args.index("--queue") + 1] if "--queue" in args else "0"
    backend = args[args.index("--backend") + 1] if "--backend" in args else expected_backend()
    assert said == f"installed queue {queue} rules with backend {backend}\n"
    text = listing(lab.acct)
    assert text == listing(lab.peer)
    # what the ruleset must hold, written out here rather than taken from either installer
    assert text.count(f"queue num {queue} bypass") == (2 if backend == "nft" else 4)
    assert text.count("set out4 {") == 1 and text.count("size 262144") == 4
    assert text.count("meta mark 0x6e666163 ") == (2 if backend == "nft" else 4)
    if backend == "iptables-nft":
        bit = "0x00000800" if "--offload-mark" in args else "0x10000000"
        assert text.count(f"meta mark & {bit} == {bit} counter return") == 4
        assert text.count(f"meta mark | {bit} accept") == 4
        assert text.count("counter jump NFACCT_OUT") == 2 and text.count("counter jump NFACCT_IN") == 2


def test_the_native_backend_is_refused_as_nfacct_refuses_it(lab):
    if kernel_has_nft_queue() is not False:
        pytest.skip("this kernel has nft_queue: the native backend installs for real")
    refused = script("--netns", lab.acct, "--backend", "nft")
    assert (refused.returncode, refused.stdout, refused.stderr) == (
        1,
        "",
        f"install.sh: error: {NATIVE_REFUSED}\n",
    )
    assert (
        cli("install", "--netns", lab.peer, "--backend", "nft").stderr == f"nfacct: error: {NATIVE_REFUSED}\n"
    )
    assert listing(lab.acct) == listing(lab.peer) == ""


# nft for a kernel with nft_queue, on one without: `-c -f -` (the probe) succeeds; the queue
# statements of a script given on stdin are recorded in $NFT_LOG and installed as `accept` with a
# comment; listings show them as nft 1.0.6 prints a queue statement (`queue flags bypass to N`;
# nftables' statement.c, queue_stmt_print), in text and JSON. Everything else is the real nft.
FAKE_NFT = r"""#!/bin/sh
q='queue-\([0-9]*\)'
json='"expr": [{"queue": {"num": \1, "flags": "bypass"}}]'
case "$*" in
"-c -f -") cat >/dev/null ;;
"-f -") tee -a "$NFT_LOG" | sed 's/queue num \([0-9]*\) bypass/accept comment "queue-\1"/' | {real} -f - ;;
*)
  out=$({real} "$@") || exit
  [ -z "$out" ] || printf '%s\n' "$out" | sed -e "s/accept comment \"$q\"/queue flags bypass to \1/" \
    -e "s/\"comment\": \"$q\", \"expr\": \[{\"accept\": null}\]/$json/g" ;;
esac
"""


def test_the_native_backend_on_a_kernel_with_nft_queue(lab, tmp_path):
    """The native backend, which this kernel may not run (no nft_queue), through nft as a kernel
    with it would answer: the script sends nft the very text nfacct renders, which nft -c passes
    but for the queue statements, and both sides recognise, replace and remove each other's
    installs the same way, step by step."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text(FAKE_NFT.replace("{real}", shutil.which("nft")))
    (fake / "nft").chmod(0o755)
    side = {}
    for ns in (lab.acct, lab.peer):
        side[ns] = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "NFT_LOG": str(tmp_path / ns)}
        (tmp_path / ns).write_text("")
    offload = render("offload.nft", BIT=0x10000000, CLEAR=0xEFFFFFFF)
    steps = [  # options, the backend, what goes to nft -f - (on both sides alike)
        (["--queue", "5"], "nft", render("nfacct.nft", QUEUE=5, MARK=DAEMON_MARK)),
        (["--queue", "5"], "nft", ""),  # complete: left alone
        (["--queue", "6"], "nft", render("nfacct.nft", QUEUE=6, MARK=DAEMON_MARK)),
        (["--backend", "iptables-nft", "--queue", "6"], "iptables-nft", offload),
        (["--queue", "6"], "nft", render("nfacct.nft", QUEUE=6, MARK=DAEMON_MARK)),
    ]
    for args, backend, sent in steps:
        queue = args[-1]
        said = ok(script("--netns", lab.acct, *args, env=side[lab.acct]))
        assert said == ok(cli("install", "--netns", lab.peer, *args, env=side[lab.peer]))
        assert said == f"installed queue {queue} rules with backend {backend}\n"
        assert listing(lab.acct, side[lab.acct]) == listing(lab.peer, side[lab.peer]), args
        for ns in (lab.acct, lab.peer):
            assert (tmp_path / ns).read_text() == sent, (ns, args)
            (tmp_path / ns).write_text("")
        if backend == "nft":
            assert listing(lab.acct, side[lab.acct]).count(f"queue flags bypass to {queue}") == 2
    check = subprocess.run(
        ["ip", "netns", "exec", lab.acct, "nft", "-c", "-f", "-"],
        input=render("nfacct.nft", QUEUE=6, MARK=DAEMON_MARK),
        capture_output=True,
        text=True,
    )
    if kernel_has_nft_queue():
        assert check.returncode == 0, check.stderr
    else:
        lines = check.stderr.splitlines()
        assert [lines[i + 1].strip() for i, line in enumerate(lines) if "Error:" in line] == [
            "queue num 6 bypass"
        ] * 2, check.stderr
    # each removes the other's native install
    assert ok(script("--netns", lab.peer, "--remove", env=side[lab.peer])) == "removed nfacct rules\n"
    assert ok(cli("remove", "--netns", lab.acct, env=side[lab.acct])) == "removed nfacct rules\n"
    assert listing(lab.acct) == listing(lab.peer) == ""


def elements(lab: Lab, name: str) -> int:
    """How many elements a flow set of table inet nfacct holds, as `nft -j` lists them."""
    out = lab.run(lab.acct, ["nft", "-j", "list", "set", "inet", "nfacct", name]).stdout
    return len(json.loads(out)["nftables"][1]["set"].get("elem", []))


def install_with(tool: str, ns: str, *args: str) -> None:
    ok(script("--netns", ns, *args) if tool == "script" else cli("install", "--netns", ns, *args))


def remove_with(tool: str, ns: str) -> None:
    assert ok(script("--netns", ns, "--remove") if tool == "script" else cli("remove", "--netns", ns)) == (
        "removed nfacct rules\n"
    )


ELEMENT = "{ tcp . 10.77.0.1 . 40000 . 10.77.0.2 . 5201 }"


@pytest.mark.parametrize(
    ("first", "second"), [("script", "script"), ("script", "nfacct"), ("nfacct", "script")]
)
def test_a_second_install_changes_nothing(lab, first, second):
    """Complete rules are left alone: a rebuild would reset the counting rule and empty the sets."""
    install_with(first, lab.acct, "--queue", "3")
    if "queue num 3 bypass" not in listing(lab.acct):
        pytest.skip("the native backend: test_the_native_backend_on_a_kernel_with_nft_queue")
    lab.run(lab.acct, ["nft", "add", "element", "inet", "nfacct", "out4", ELEMENT])
    before = listing(lab.acct)
    lab.run(lab.acct, ["ping", "-c", "2", "-i", "0.05", "-q", PEER_V4])
    counted = queued(lab.acct)
    assert counted >= 4, "two pings out, two replies in"
    install_with(second, lab.acct, "--queue", "3")
    assert listing(lab.acct) == before
    assert queued(lab.acct) >= counted, "the count went on: the rules were not rebuilt"
    out4 = lab.run(lab.acct, ["nft", "list", "set", "inet", "nfacct", "out4"]).stdout
    assert "tcp . 10.77.0.1 . 40000 . 10.77.0.2 . 5201" in out4, "the flow set kept its element"
    install_with(second, lab.acct, "--queue", "4")  # another queue: replaced
    assert queued(lab.acct) < counted and "queue num 4 bypass" in listing(lab.acct)
    remove_with(second, lab.acct)


def foreign_rules(lab: Lab, ns: str) -> None:
    """Rules of someone else's, which a removal must keep: an iptables rule, a chain policy that
    keeps ip6 filter from being empty, and an nft table of its own."""
    lab.run(ns, ["iptables-nft", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"])
    lab.run(ns, ["ip6tables-nft", "-P", "FORWARD", "DROP"])
    lab.run(ns, ["nft", "add", "table", "inet", "theirs"])
    lab.run(ns, ["nft", "add", "chain", "inet", "theirs", "out", "{ type filter hook output priority 0; }"])


def structure(ns: str) -> tuple[dict, list]:
    """The ruleset as nft's JSON has it: chains by (family, table, name), and the rules in order
    (handles and counts left out)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"], capture_output=True)
    chains, rules = {}, []
    for item in json.loads(out.stdout)["nftables"]:
        if "chain" in item:
            c = item["chain"]
            chains[c["family"], c["table"], c["name"]] = (c.get("hook"), c.get("policy"))
        if "rule" in item:
            r = item["rule"]
            expr = re.sub(r'"packets": \d+, "bytes": \d+', "", json.dumps(r["expr"]))
            rules.append((r["family"], r["table"], r["chain"], r.get("comment"), expr))
    return chains, rules


@pytest.mark.parametrize(
    ("installer", "remover"), [("script", "script"), ("nfacct", "script"), ("script", "nfacct")]
)
def test_remove_leaves_the_ruleset_as_it_was(lab, installer, remover):
    install_with(installer, lab.acct, "--queue", "2")
    assert "NFACCT_OUT" in listing(lab.acct)
    remove_with(remover, lab.acct)
    assert listing(lab.acct) == "", "the filter tables iptables-nft created are dropped when left empty"
    remove_with("script", lab.acct)  # removing what is not there is no error
    assert listing(lab.acct) == ""


@pytest.mark.parametrize(
    ("installer", "remover"), [("script", "script"), ("nfacct", "script"), ("script", "nfacct")]
)
def test_remove_keeps_what_others_installed(lab, installer, remover):
    """Every foreign rule, chain and table stays. iptables-nft leaves behind the base chains it
    made for the jumps (OUTPUT, INPUT: empty, policy accept), and nfacct's own removal does the
    same: the two must agree."""
    for ns in (lab.acct, lab.peer):
        foreign_rules(lab, ns)
    chains, rules = structure(lab.acct)
    install_with(installer, lab.acct, "--queue", "2")
    remove_with(remover, lab.acct)
    install_with("nfacct" if installer == "script" else "script", lab.peer, "--queue", "2")
    remove_with("nfacct" if remover == "script" else "script", lab.peer)
    assert listing(lab.acct) == listing(lab.peer)
    chains_after, rules_after = structure(lab.acct)
    assert rules_after == rules and len(rules) == 1
    assert {k: v for k, v in chains_after.items() if k in chains} == chains
    left = {k: v for k, v in chains_after.items() if k not in chains}
    assert set(left) <= {(f, "filter", c) for f in ("ip", "ip6") for c in ("OUTPUT", "INPUT")}
    assert all(policy == "accept" for _hook, policy in left.values())


BAD_INPUT = {  # arguments, exit status (nfacct's), the error line after "install.sh: error: "
    "unknown-option": (["--bogus"], 2, "unrecognized argument: --bogus"),
    "no-value": (["--queue"], 2, "argument --queue: expected one argument"),
    "queue-word": (["--queue", "x1"], 2, "argument --queue: queue number must be an integer, not 'x1'"),
    "queue-range": (["--queue", "65536"], 2, "argument --queue: queue number 65536 is out of range 0-65535"),
    "backend": (["--backend", "ebtables"], 2, "argument --backend: invalid choice: 'ebtables' (choose from "
                "'auto', 'nft', 'iptables-nft')"),
    "two-bits": (["--offload-mark", "0x30"], 2, "argument --offload-mark: mark bit 0x30 must be a single "
                 "bit of the 32-bit mark"),
    "33-bits": (["--offload-mark", "0x100000000"], 2, "argument --offload-mark: mark bit 0x100000000 must be "
                "a single bit of the 32-bit mark"),
    "mark-word": (["--offload-mark", "bit"], 2, "argument --offload-mark: mark bit must be a number "
                  "(0x10000000), not 'bit'"),
    "daemon-mark": (["--offload-mark", "0x40"], 1, "offload mark 0x40 overlaps the daemon's own mark "
                    "0x6e666163"),
    "no-netns": (["--netns", "nfacct-no-such-ns"], 2, "network namespace 'nfacct-no-such-ns' does not "
                 "exist (no /run/netns/nfacct-no-such-ns; see `ip netns list`)"),
    "netns-path": (["--netns", "../etc"], 2, "invalid network namespace name: '../etc'"),
    "hostile-netns": (["--netns", "a\x1b[2Jb\nc"], 2, "network namespace 'a?[2Jb?c' does not exist "
                      "(no /run/netns/a?[2Jb?c; see `ip netns list`)"),
}  # fmt: skip


@pytest.mark.parametrize(("args", "status", "error"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_the_status_nfacct_gives(lab, args, status, error):
    if "--netns" not in args:
        args = ["--netns", lab.acct, *args]
    got = script(*args)
    assert (got.returncode, got.stdout, got.stderr) == (status, "", f"install.sh: error: {error}\n")
    assert cli("install", *args).returncode == status
    assert listing(lab.acct) == "", "bad input changes nothing"


def test_without_root_it_says_so(lab, shared_dir):
    rules = shutil.copytree(SCRIPT.parent, shared_dir / "rules")  # where nobody may read it
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    as_nobody += ["dash", str(rules / SCRIPT.name)]
    got = subprocess.run([*as_nobody, "--netns", lab.acct], capture_output=True, text=True)
    assert (got.returncode, got.stderr) == (
        1,
        "install.sh: error: managing nftables rules needs root (CAP_NET_ADMIN); run with sudo\n",
    )


def test_help_and_shellcheck():
    helped = script("-h")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: install.sh [--netns NS]")
    assert shutil.which("shellcheck"), "shellcheck is missing: `make setup` installs it"
    checked = subprocess.run(["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_a_daemon_offloads_on_rules_the_script_installed(lab, tmp_path):
    assert ok(script("--netns", lab.acct)) == f"installed queue 0 rules with backend {expected_backend()}\n"
    counters = Counters(lab, lab.acct)
    count_port(counters, "tcp", 20999)
    server = lab.role(lab.peer, "echo-server", "--port", "5201")
    d = Daemon(lab.acct, tmp_path)
    try:
        server.stdout.readline()
        client = lab.role(
            lab.acct, "client", "--connect", PEER_V4, "--port", "5201", "--sport", "20999",
            "--size", "1000000", "--rounds", "5", "--pause", "0.2", "--hold",
        )  # fmt: skip
        try:
            assert until(lambda: elements(lab, "out4"), 1) == 1, (
                "the flow got its element in the script's set"
            )
            assert json.loads(client.stdout.readline())["received"] == 5 * 1_000_000
            truth = kernel(counters, "tcp", 20999)

            def totals() -> dict | None:
                task = next((t for t in d.top() if t["pid"] == client.pid), None)
                return task and {k: task[k] for k in COUNTER_NAMES}

            assert until(totals, truth) == truth
            offload = d.status()["offload"]
            assert offload["mode"] == "offload" and offload["added"] >= 1, offload
        finally:
            client.kill()
            client.wait()
        assert d.stop() == 0, d.log.read_text()
    finally:
        d.kill()
        server.kill()
        server.wait()
    assert ok(script("--netns", lab.acct, "--remove")) == "removed nfacct rules\n"
    lab.run(lab.acct, ["nft", "delete", "table", "inet", Counters.TABLE])
    assert listing(lab.acct) == ""


def test_the_wheel_ships_the_script_with_its_files_and_it_runs_from_there(lab, tmp_path):
    src = tmp_path / "src"
    for part in ("nfacct", "rules", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (Path(ROOT) / part).is_dir() else shutil.copy
        copy(Path(ROOT) / part, src / part, **({"symlinks": True} if copy is shutil.copytree else {}))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("nfacct-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        for name in ("install.sh", "flowsets.nft", "nfacct.nft", "offload.nft"):
            info = z.getinfo(f"nfacct/data/{name}")
            assert z.read(info) == (Path(ROOT) / "rules" / name).read_bytes(), name
            if name == "install.sh":
                assert (info.external_attr >> 16) & stat.S_IXUSR, "install.sh is executable in the wheel"
        z.extractall(unpacked)
    shipped = unpacked / "nfacct" / "data" / "install.sh"
    ok(script("--netns", lab.acct, "--queue", "9", path=shipped))
    ok(cli("install", "--netns", lab.peer, "--queue", "9"))
    assert listing(lab.acct) == listing(lab.peer) != ""
