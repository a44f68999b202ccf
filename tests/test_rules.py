"""The ruleset installer against the real kernel, in throwaway namespaces."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess

import pytest

from lab.hosts import PEER_V4, Counters, Lab
from nfacct.rules import DAEMON_MARK, Rules, RulesError
from nfacct.rules.base import FLOW_SETS, Namespace, render
from nfacct.rules.nft import NftBackend


def native(queue: int) -> str:
    """The native backend's ruleset for `queue`."""
    return render("nfacct.nft", QUEUE=queue, MARK=DAEMON_MARK)


@pytest.fixture
def fresh_lab():
    with Lab("nfr") as lab:
        yield lab


def ruleset(lab: Lab) -> str:
    text = lab.run(lab.acct, ["nft", "list", "ruleset"]).stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def kernel_has_nft_queue() -> bool | None:
    if not os.path.exists("/proc/config.gz"):
        return None
    with gzip.open("/proc/config.gz", "rt") as f:
        config = f.read()
    return bool(re.search(r"^CONFIG_NFT_QUEUE=[ym]$", config, re.M))


def test_backend_detection_agrees_with_the_kernel_config(fresh_lab):
    truth = kernel_has_nft_queue()
    if truth is None:
        pytest.skip("no /proc/config.gz to compare with")
    rules = Rules(fresh_lab.acct)
    assert rules.native_queue_supported() is truth
    assert ruleset(fresh_lab) == "", "detection must not change the ruleset"
    assert rules.install() == ("nft" if truth else "iptables-nft")
    assert rules.show().backend == ("nft" if truth else "iptables-nft")


def test_install_is_idempotent_and_remove_leaves_nothing(fresh_lab):
    before = ruleset(fresh_lab)
    rules = Rules(fresh_lab.acct)
    rules.install(queue=3)
    once = ruleset(fresh_lab)
    fresh_lab.run(fresh_lab.acct, ["ping", "-c", "2", "-i", "0.05", "-q", PEER_V4])
    counted = rules.queued_packets()
    rules.install(queue=3)
    assert ruleset(fresh_lab) == once
    assert rules.queued_packets() >= counted >= 4, "a second install must not reset the count"
    assert "queue num 3 bypass" in once or "queue to 3 bypass" in once
    state = rules.show()
    assert state.queue == 3 and state.backend != "none"
    rules.remove()
    assert ruleset(fresh_lab) == before
    assert rules.show().backend == "none"
    rules.remove()  # removing twice is not an error


def test_install_changes_the_queue_number_in_place(fresh_lab):
    rules = Rules(fresh_lab.acct)
    rules.install(queue=1)
    rules.install(queue=2)
    text = ruleset(fresh_lab)
    assert "queue num 2" in text and "queue num 1 " not in text
    rules.remove()


def test_remove_keeps_foreign_iptables_rules(fresh_lab):
    fresh_lab.run(
        fresh_lab.acct, ["iptables-nft", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"]
    )
    rules = Rules(fresh_lab.acct)
    rules.install(backend="iptables-nft")
    rules.remove()
    text = ruleset(fresh_lab)
    assert "tcp dport 9" in text and "NFACCT" not in text


def test_native_backend_refused_cleanly_when_kernel_lacks_nft_queue(fresh_lab):
    if kernel_has_nft_queue() is not False:
        pytest.skip("this kernel has nft_queue")
    with pytest.raises(RulesError) as refused:
        Rules(fresh_lab.acct).install(backend="nft")
    # nft's own reason, not the caret line it prints under the rule
    assert str(refused.value) == "nft -f - failed: Could not process rule: No such file or directory"
    assert ruleset(fresh_lab) == ""


def test_render_native_ruleset():
    text = native(5)
    assert "queue num 5 bypass" in text
    assert "hook output" in text and "hook input" in text
    assert "meta mark 0x6e666163 accept" in text
    assert all(f"set {name} {{" in text for name in FLOW_SETS) and "@" not in text.replace(" @", "")


def test_native_ruleset_passes_nft_check_but_for_a_missing_nft_queue(fresh_lab):
    """nft -c parses the whole ruleset and asks the kernel; on a kernel without nft_queue only the
    two queue statements may be refused, so everything else the native backend installs is checked."""
    check = Namespace(fresh_lab.acct).run(["nft", "-c", "-f", "-"], check=False, stdin=native(5))
    if kernel_has_nft_queue():
        assert check.returncode == 0, check.stderr
    else:
        lines = check.stderr.splitlines()
        refused = [lines[i + 1].strip() for i, line in enumerate(lines) if "Error:" in line]
        assert refused == ["queue num 5 bypass"] * 2, check.stderr
    assert ruleset(fresh_lab) == ""


class NativeKernel(Namespace):
    """A namespace whose kernel has nft_queue, as the native backend sees it: `nft -j list ruleset`
    answers with `listed`, scripts given on stdin are recorded. Any other command fails the test."""

    def __init__(self, listed: list[dict]):
        super().__init__(None)
        self.listed = listed
        self.scripts: list[str] = []

    def run(
        self, argv: list[str], check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        if argv == ["nft", "-t", "-j", "list", "ruleset"]:
            sets = [{"set": {"family": "inet", "table": "nfacct", "name": name}} for name in FLOW_SETS]
            rules = [{"rule": rule} for rule in self.listed]
            out = json.dumps({"nftables": [{"metainfo": {}}, *sets, *rules]})
        elif argv == ["nft", "-f", "-"]:
            self.scripts.append(stdin)
            out = ""
        else:
            raise AssertionError(f"unexpected command {argv}")
        return subprocess.CompletedProcess(argv, 0, out, "")


def native_chain(chain: str, handle: int, queues: list[tuple[int, int]], packets: int = 0) -> list[dict]:
    """One chain of table inet nfacct as `nft -j` lists it (mark and counting rule as listed on
    6.18, queue rules in libnftables-json's form); `queues` are (handle, queue number) in order."""
    mark = {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": DAEMON_MARK}}
    rules = [
        (handle, {"expr": [mark, {"accept": None}]}),
        (handle + 1, {"comment": "nfacct-queued", "expr": [{"counter": {"packets": packets, "bytes": 0}}]}),
        *((h, {"expr": [{"queue": {"num": q, "flags": "bypass"}}]}) for h, q in queues),
    ]
    return [{"family": "inet", "table": "nfacct", "chain": chain, "handle": h, **rule} for h, rule in rules]


def test_native_backend_installs_and_moves_queue_rules_through_nft_scripts():
    """The native half of a takeover, which this kernel may not run for real (no nft_queue)."""
    kernel = NativeKernel(native_chain("output", 3, [(5, 4)], packets=7) + native_chain("input", 6, [(8, 4)]))
    backend = NftBackend(kernel)
    backend.install(4, 0x10000000)
    assert kernel.scripts == [native(4)], "the whole ruleset goes to nft on stdin, in one transaction"
    assert backend.queue_rules() == [("inet", "output", 5, 4), ("inet", "input", 8, 4)]
    assert backend.complete(4) and not backend.complete(5)
    assert sum(r["expr"][0]["counter"]["packets"] for r in backend.count_rules(kernel.rules())) == 7

    backend.add_queue(5)
    assert kernel.scripts[1:] == [
        "insert rule inet nfacct output position 5 queue num 5 bypass\n"
        "insert rule inet nfacct input position 8 queue num 5 bypass\n"
    ]
    kernel.listed = native_chain("output", 3, [(9, 5), (5, 4)]) + native_chain("input", 6, [(10, 5), (8, 4)])
    assert not backend.complete(5), "two queue rules in a chain: an install would rebuild"
    backend.add_queue(5)
    assert len(kernel.scripts) == 2, "already in front: nothing to do"
    backend.drop_queues(lambda queue: queue != 5)
    assert kernel.scripts[2:] == [
        "delete rule inet nfacct output handle 5\ndelete rule inet nfacct input handle 8\n"
    ]


def test_a_native_table_is_shown_counted_and_replaced_for_real(fresh_lab):
    """Without its queue statements the native table installs on any kernel: enough to run the
    native backend's listing, counting rules and removal against the real one."""
    Namespace(fresh_lab.acct).nft(native(5).replace("queue num 5 bypass", "accept"))
    rules = Rules(fresh_lab.acct)
    state = rules.show()
    assert state.backend == "nft" and "table inet nfacct" in state.ruleset and state.queue is None
    fresh_lab.run(fresh_lab.acct, ["ping", "-c", "2", "-i", "0.05", "-q", PEER_V4])
    assert rules.queued_packets() >= 4
    assert rules.install(backend="iptables-nft") == "iptables-nft"
    text = ruleset(fresh_lab)
    assert "chain output" not in text and "chain offload_output" in text and "NFACCT_OUT" in text
    rules.remove()
    assert ruleset(fresh_lab) == ""


def test_the_offload_mark_is_one_bit_of_the_operators_choice(fresh_lab):
    rules = Rules(fresh_lab.acct)
    for bad in (0, 0x30, 1 << 32, 0x40):  # 0x40 is a bit of the daemon's own mark
        with pytest.raises(RulesError, match="offload mark"):
            rules.install(backend="iptables-nft", offload_mark=bad)
    assert ruleset(fresh_lab) == "", "a refused mark changes nothing"
    rules.install(backend="iptables-nft", offload_mark=0x800)
    text = ruleset(fresh_lab)
    assert "meta mark & 0x00000800 == 0x00000800" in text and "meta mark | 0x00000800" in text
    assert "0x10000000" not in text
    rules.remove()
    assert ruleset(fresh_lab) == ""


@pytest.mark.root
def test_missing_namespace_is_a_clear_error():
    with pytest.raises(Exception, match="does not exist"):
        Rules("nfacct-no-such-ns")


def test_traffic_flows_through_installed_rules_without_a_daemon(fresh_lab):
    """bypass: with nobody bound to the queue, packets are accepted, not dropped."""
    rules = Rules(fresh_lab.acct)
    rules.install()
    counters = Counters(fresh_lab, fresh_lab.acct)
    counters.add("after-queue", "out", "tcp dport 7007")
    server = fresh_lab.role(fresh_lab.peer, "echo-server", "--port", "7007")
    try:
        server.stdout.readline()
        out = fresh_lab.run(
            fresh_lab.acct,
            [
                "timeout",
                "10",
                os.sys.executable,
                "-m",
                "lab.roles",
                "client",
                "--connect",
                PEER_V4,
                "--port",
                "7007",
                "--size",
                "10000",
                "--rounds",
                "5",
            ],
        )
        assert '"received": 50000' in out.stdout
        assert counters.read()["after-queue"][0] > 0
        if rules.show().backend == "iptables-nft":  # iptables-nft counts what its queue rule saw
            assert re.search(
                r"counter packets [1-9]\d* bytes \d+ queue num 0 bypass",
                fresh_lab.run(fresh_lab.acct, ["nft", "list", "ruleset"]).stdout,
            )
    finally:
        server.kill()
        server.wait()
        rules.remove()


def test_counting_rule_equals_the_kernels_count_of_queued_traffic(fresh_lab):
    """What `queued_packets` reads is every packet sent towards the queue, and nothing else."""
    rules = Rules(fresh_lab.acct)
    rules.install()
    counters = Counters(fresh_lab, fresh_lab.acct)
    unmarked = f"meta mark != {DAEMON_MARK:#x}"
    counters.add("all-out", "out", unmarked)
    counters.add("all-in", "in", unmarked)
    start = rules.queued_packets()  # the link's own IPv6 chatter may already have passed
    fresh_lab.run(fresh_lab.acct, ["ping", "-c", "3", "-i", "0.05", "-q", PEER_V4])
    before = rules.queued_packets() - start
    kernel = sum(packets for packets, _bytes in counters.read().values())
    after = rules.queued_packets() - start
    assert before <= kernel <= after and kernel >= 6  # equal unless a stray packet came in between
    rules.remove()
    assert rules.queued_packets() is None


def test_moving_the_queue_keeps_the_count(fresh_lab):
    rules = Rules(fresh_lab.acct)
    rules.install(queue=4)
    fresh_lab.run(fresh_lab.acct, ["ping", "-c", "2", "-i", "0.05", "-q", PEER_V4])
    counted = rules.queued_packets()
    assert counted >= 4
    rules.add_queue(5)
    assert [q for *_where, q in rules.queue_rules()] == [5, 4] * 4  # in front, the old one behind
    rules.drop_queues_except(5)
    assert rules.show().queue == 5
    text = ruleset(fresh_lab)
    assert "queue num 5" in text and "queue num 4" not in text
    assert rules.queued_packets() >= counted
    rules.remove()
    with pytest.raises(RulesError, match="no nfacct rules"):
        rules.add_queue(4)
