#!/bin/sh
# nfacct's queue ruleset for hosts without Python: installs exactly what `nfacct rules install`
# installs (nfacct/rules/), rule for rule and in the same order, from the same files (the .nft
# files next to this script), or removes it with --remove. POSIX sh, run as root.
#
# Two backends, chosen as nfacct chooses them:
# - nft: table inet nfacct (nfacct.nft), with nft's own `queue` statement;
# - iptables-nft, for kernels built without nft_queue: the flow sets and offload chains in table
#   inet nfacct (offload.nft), and the xtables NFQUEUE target in chains NFACCT_OUT and NFACCT_IN
#   of the ip and ip6 filter tables, jumped to from OUTPUT and INPUT.
# The constants below are nfacct/rules/base.py's; tests/test_install_sh.py compares the rulesets
# both install, so the two cannot drift apart unnoticed.

set -u
# root's tools, also for a `su` shell whose PATH lacks them (appended: a PATH given first wins)
PATH=$PATH:/usr/sbin:/sbin

PROG=install.sh
DAEMON_MARK=0x6e666163 # packets of the daemon's own sockets are never queued
OFFLOAD_MARK=0x10000000
FLOW_SET_SIZE=262144
COUNT_COMMENT=nfacct-queued
TABLE=nfacct
NETNS_RUN_DIR=/run/netns

usage() {
	cat <<'EOF'
usage: install.sh [--netns NS] [--queue N] [--backend auto|nft|iptables-nft] [--offload-mark BIT]
       install.sh --remove [--netns NS]

Installs nfacct's queue ruleset, exactly what `nfacct rules install` installs, from the .nft
files next to this script; idempotent. Needs root.

  --netns NS          work in network namespace NS (`ip netns list`); default: the current one
  --queue N           the NFQUEUE number, 0-65535 (default 0)
  --backend B         auto (default: nft if the kernel accepts nft's queue statement, else
                      iptables-nft), nft or iptables-nft
  --offload-mark BIT  the mark bit iptables-nft's queue rules skip (default 0x10000000)
  --remove            remove every nfacct rule, chain and table, and nothing else
  -h, --help          show this help
EOF
}

error() { printf '%s: error: %s\n' "$PROG" "$1" >&2; }
die() {
	error "$1"
	exit 1
}
bad_option() {
	error "$1"
	exit 2
}

# A value from the command line, safe on one line of a terminal: control and non-ASCII bytes
# become '?' (a namespace name may hold an escape sequence).
shown() { printf '%s' "$1" | LC_ALL=C tr -c '[:print:]' '?'; }

hex() { printf '0x%x' "$1"; }

# ---- the command line

ACTION=install
QUEUE=0
BACKEND=auto
MARK_ARG=$OFFLOAD_MARK

need_value() {
	[ "$#" -ge 2 ] || bad_option "argument $1: expected one argument"
}

while [ "$#" -gt 0 ]; do
	case $1 in
	--netns | --queue | --backend | --offload-mark)
		need_value "$@"
		option=$1 value=$2
		shift 2
		;;
	--netns=* | --queue=* | --backend=* | --offload-mark=*)
		option=${1%%=*} value=${1#*=}
		shift
		;;
	--remove)
		ACTION=remove
		shift
		continue
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) bad_option "unrecognized argument: $(shown "$1")" ;;
	esac
	case $option in
	--netns) NETNS=$value ;;
	--queue) QUEUE=$value ;;
	--backend) BACKEND=$value ;;
	--offload-mark) MARK_ARG=$value ;;
	esac
done

case $QUEUE in
'' | *[!0-9]*) bad_option "argument --queue: queue number must be an integer, not '$(shown "$QUEUE")'" ;;
esac
QUEUE=$(printf '%s' "$QUEUE" | sed 's/^0*//')
QUEUE=${QUEUE:-0}
if [ "${#QUEUE}" -gt 5 ] || [ "$QUEUE" -gt 65535 ]; then
	bad_option "argument --queue: queue number $QUEUE is out of range 0-65535"
fi

case $BACKEND in
auto | nft | iptables-nft) ;;
*) bad_option "argument --backend: invalid choice: '$(shown "$BACKEND")' (choose from 'auto', 'nft', 'iptables-nft')" ;;
esac

# The mark: hexadecimal (0x800) or decimal (2048), one bit of the 32-bit mark.
not_a_mark() { bad_option "argument --offload-mark: mark bit must be a number (0x10000000), not '$(shown "$MARK_ARG")'"; }
not_a_bit() { bad_option "argument --offload-mark: mark bit $(shown "$MARK_ARG") must be a single bit of the 32-bit mark"; }
case $MARK_ARG in
0[xX]*)
	digits=${MARK_ARG#0[xX]}
	case $digits in '' | *[!0-9a-fA-F]*) not_a_mark ;; esac
	digits=$(printf '%s' "$digits" | sed 's/^0*//')
	[ "${#digits}" -le 8 ] || not_a_bit # more would overflow the shell's arithmetic
	OFFLOAD=$((0x${digits:-0}))
	;;
0) not_a_bit ;;
[1-9]*)
	case $MARK_ARG in *[!0-9]*) not_a_mark ;; esac
	[ "${#MARK_ARG}" -le 10 ] || not_a_bit
	OFFLOAD=$((MARK_ARG))
	;;
*) not_a_mark ;;
esac
if [ "$OFFLOAD" -le 0 ] || [ "$OFFLOAD" -gt $((0xffffffff)) ] || [ $((OFFLOAD & (OFFLOAD - 1))) -ne 0 ]; then
	not_a_bit
fi

# ---- what the host must have (nfacct's Rules checks the same, in the same order)

[ "$(id -u)" = 0 ] || die "managing nftables rules needs root (CAP_NET_ADMIN); run with sudo"
for tool in nft:nftables iptables-nft:iptables ip6tables-nft:iptables; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || die "${tool%%:*} not found: install the ${tool#*:} package"
done
if [ -n "${NETNS+set}" ]; then
	case $NETNS in
	'' | . | .. | */*) bad_option "invalid network namespace name: '$(shown "$NETNS")'" ;;
	esac
	[ -e "$NETNS_RUN_DIR/$NETNS" ] ||
		bad_option "network namespace '$(shown "$NETNS")' does not exist (no $NETNS_RUN_DIR/$(shown "$NETNS"); see \`ip netns list\`)"
	command -v ip >/dev/null 2>&1 || die "ip not found: install the iproute2 package"
fi

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || die "cannot find the directory of $0"
for file in flowsets.nft nfacct.nft offload.nft; do
	[ -r "$HERE/$file" ] || die "cannot read $HERE/$file: install.sh needs the .nft files it came with"
done

# ---- running commands in the namespace

in_ns() {
	if [ -n "${NETNS+set}" ]; then
		ip netns exec "$NETNS" "$@"
	else
		"$@"
	fi
}

succeeds() { in_ns "$@" >/dev/null 2>&1; }

# The line that says why a command failed: nft ends its report with the rule and a caret line
# under the culprit, so its (last) `Error:` line, without the position before it; else the last
# line the tool printed.
reason() {
	printf '%s\n' "$1" | awk -v status="$2" '
		{ sub(/^[ \t\r\v\f]+/, ""); sub(/[ \t\r\v\f]+$/, "") }
		$0 == "" { next }
		{ last = $0 }
		(i = index($0, "Error:")) > 0 { err = substr($0, i + 6); sub(/^[ \t]+/, "", err); found = 1 }
		END { if (found) print err; else if (last != "") print last; else print "exit status " status }'
}

# Run a command that must succeed (its input is ours); on failure, stop with one line naming the
# command (its first three words, as nfacct does) and the tool's own reason.
must() {
	if err=$(in_ns "$@" 2>&1 >/dev/null); then
		return 0
	else
		status=$?
	fi
	what=$1
	[ "$#" -lt 2 ] || what="$what $2"
	[ "$#" -lt 3 ] || what="$what $3"
	die "$what failed: $(reason "$err" "$status")"
}

# A ruleset file with its @NAME@ placeholders filled, as nfacct/rules/base.py render() fills
# them: @SETS@ is flowsets.nft (trailing newlines dropped), @SIZE@ the set size, and the
# NAME=VALUE pairs given. Literal replacement (awk's gsub would read `&` in the text).
render() {
	awk -v sets_file="$HERE/flowsets.nft" -v values="SIZE=$FLOW_SET_SIZE $2" '
		function replace(s, from, to,    out, i) {
			out = ""
			while ((i = index(s, from)) > 0) {
				out = out substr(s, 1, i - 1) to
				s = substr(s, i + length(from))
			}
			return out s
		}
		BEGIN {
			while ((got = (getline line < sets_file)) > 0) sets = sets line "\n"
			if (got < 0) exit 1
			sub(/\n+$/, "", sets)
		}
		{ text = text $0 "\n" }
		END {
			text = replace(text, "@SETS@", sets)
			n = split(values, pairs, " ")
			for (k = 1; k <= n; k++) {
				eq = index(pairs[k], "=")
				text = replace(text, "@" substr(pairs[k], 1, eq - 1) "@", substr(pairs[k], eq + 1))
			}
			printf "%s", text
		}' "$HERE/$1"
}

# Apply an nft script, given on stdin, as one transaction.
apply() {
	must nft -f - <<EOF
$1
EOF
}

# ---- reading what is installed, as lines: `set NAME`, `chain NAME` (table inet nfacct),
# `rule FAMILY/CHAIN` for each rule of one of a backend's chains, `count FAMILY/CHAIN` for each
# counting rule (counts and decides nothing), `queue FAMILY/CHAIN N` for each queue rule.

# table inet nfacct, from `nft -t list` (-t: without set elements, which may be 100,000 flows)
nfacct_state() {
	in_ns nft -t list table inet "$TABLE" 2>/dev/null | awk '
		function word(w) { return (" " rest " ") ~ (" " w " ") }
		$1 == "set" && $3 == "{" { print "set " $2 }
		$1 == "chain" && $3 == "{" { chain = $2; print "chain " chain; next }
		$1 == "}" && NF == 1 { chain = ""; next }
		chain != "output" && chain != "input" { next }
		$1 == "type" || $1 == "policy" || $1 == "comment" || NF == 0 { next }
		{
			rest = $0
			gsub(/"[^"]*"/, "\"\"", rest) # a comment must not read as a verdict
			gsub(/[ \t]+/, " ", rest)
			print "rule inet/" chain
			verdict = word("queue") || word("accept") || word("return") || word("drop") || word("jump") || word("goto")
			if (word("counter") && !verdict) print "count inet/" chain
			if (word("queue")) {
				n = split(rest, w, " ")
				num = 0 # nft prints `queue to 0`, older ones a bare `queue`
				for (k = 1; k < n; k++) if (w[k] == "num" || w[k] == "to") num = w[k + 1]
				print "queue inet/" chain " " num
			}
		}'
}

# the NFACCT chains, from `iptables-nft -S` (nft's JSON does not show the xt target's queue)
iptables_state() {
	for family in ip ip6; do
		for chain in NFACCT_OUT NFACCT_IN; do
			in_ns "$(tool "$family")" -w -S "$chain" 2>/dev/null | awk -v at="$family/$chain" '
				$1 != "-A" { next }
				{
					print "rule " at
					target = 0
					for (k = 3; k <= NF; k++) {
						if ($k == "-j" || $k == "-g") target = 1
						if ($k == "--queue-num" && k < NF) queue = $(k + 1)
					}
					if (!target) print "count " at
					else if ((" " $0 " ") ~ / NFQUEUE / && queue != "") print "queue " at " " queue
					queue = ""
				}'
		done
	done
}

tool() { if [ "$1" = ip ]; then echo iptables-nft; else echo ip6tables-nft; fi; }

# Whether every one of the backend's chains holds a counting rule and exactly one queue rule,
# sending to $QUEUE, with the flow sets in place: nfacct's Backend.complete.
is_complete() { # BACKEND
	if [ "$1" = nft ]; then
		chains=2 state=$(nfacct_state)
	else
		chains=4 state=$(nfacct_state; iptables_state)
	fi
	printf '%s\n' "$state" | awk -v want="$chains" -v q="$QUEUE" -v backend="$1" '
		$1 == "set" { sets[$2] = 1 }
		backend != "nft" && $2 ~ /^inet\// { next }
		$1 == "count" && !($2 in counted) { counted[$2] = 1; ncounted++ }
		$1 == "queue" {
			nqueues++
			if (!($2 in queued)) { queued[$2] = 1; nqueued++ }
			if ($3 != q) wrong = 1
		}
		END {
			ok = ("out4" in sets) && ("in4" in sets) && ("out6" in sets) && ("in6" in sets)
			ok = ok && ncounted == want && nqueues == want && nqueued == ncounted && !wrong
			for (c in queued) if (!(c in counted)) ok = 0
			exit !ok
		}'
}

# Whether the kernel accepts nft's `queue` statement, asked without changing anything (nft -c).
# The probe rule sits in a regular chain: even a check-only transaction registers a base chain's
# hooks until it aborts, and packets a running daemon has yet to give a verdict would resume at
# the wrong hook (nfacct/rules/nft.py NftBackend.supported says more).
native_queue_supported() {
	printf 'table inet nfacct_probe {\n\tchain probe {\n\t\tqueue num 0 bypass\n\t}\n}\n' |
		in_ns nft -c -f - >/dev/null 2>&1
}

# ---- the two backends

install_nft() {
	script=$(render nfacct.nft "QUEUE=$QUEUE MARK=$DAEMON_MARK") || die "cannot render $HERE/nfacct.nft"
	apply "$script"
}

remove_nft() { # the table may be the iptables-nft backend's (its flow sets): only if it has our chains
	if nfacct_state | grep -q '^rule inet/'; then
		must nft delete table inet "$TABLE"
	fi
}

install_iptables() {
	script=$(render offload.nft "BIT=$(hex "$OFFLOAD") CLEAR=$(hex $((0xffffffff & ~OFFLOAD)))") ||
		die "cannot render $HERE/offload.nft"
	apply "$script"
	bit=$(hex "$OFFLOAD")/$(hex "$OFFLOAD")
	for family in ip ip6; do
		ipt=$(tool "$family")
		for chain in NFACCT_OUT NFACCT_IN; do
			if succeeds "$ipt" -w -S "$chain"; then
				must "$ipt" -w -F "$chain"
			else
				must "$ipt" -w -N "$chain"
			fi
		done
		for chain in NFACCT_OUT NFACCT_IN; do
			must "$ipt" -w -A "$chain" -m mark --mark "$DAEMON_MARK" -j RETURN
			must "$ipt" -w -A "$chain" -m mark --mark "$bit" -j RETURN
			must "$ipt" -w -A "$chain" -m comment --comment "$COUNT_COMMENT"
			must "$ipt" -w -A "$chain" -j NFQUEUE --queue-num "$QUEUE" --queue-bypass
		done
		for hook in OUTPUT:NFACCT_OUT INPUT:NFACCT_IN; do
			if ! succeeds "$ipt" -w -C "${hook%%:*}" -j "${hook#*:}"; then
				must "$ipt" -w -I "${hook%%:*}" 1 -j "${hook#*:}"
			fi
		done
	done
}

remove_iptables() {
	for family in ip ip6; do
		ipt=$(tool "$family")
		for hook in OUTPUT:NFACCT_OUT INPUT:NFACCT_IN; do
			while succeeds "$ipt" -w -C "${hook%%:*}" -j "${hook#*:}"; do
				must "$ipt" -w -D "${hook%%:*}" -j "${hook#*:}"
			done
			if succeeds "$ipt" -w -S "${hook#*:}"; then
				must "$ipt" -w -F "${hook#*:}"
				must "$ipt" -w -X "${hook#*:}"
			fi
		done
		drop_table_if_empty "$family"
	done
	if nfacct_state | grep -q -e '^chain offload_output$' -e '^chain offload_input$'; then
		must nft delete table inet "$TABLE" # the table may be the native backend's: only with ours
	fi
}

# iptables-nft leaves its table and base chains behind: drop them if they hold no rule and no
# chain's policy is other than accept. In nft's JSON a key is `"rule": {`; the same text inside a
# string would be escaped (\"rule\").
drop_table_if_empty() { # FAMILY
	listing=$(in_ns nft -j list table "$1" filter 2>/dev/null) || return 0
	case $listing in *'"rule": {'*) return 0 ;; esac
	if printf '%s\n' "$listing" | grep -o '"policy": "[^"]*"' | grep -q -v '"policy": "accept"'; then
		return 0
	fi
	must nft delete table "$1" filter
}

# ---- main: nfacct's Rules.install and Rules.remove

if [ "$ACTION" = remove ]; then
	remove_nft
	remove_iptables
	echo "removed nfacct rules"
	exit 0
fi

[ $((OFFLOAD & DAEMON_MARK)) -eq 0 ] ||
	die "offload mark $(hex "$OFFLOAD") overlaps the daemon's own mark $DAEMON_MARK"
if [ "$BACKEND" = auto ]; then
	if native_queue_supported; then BACKEND=nft; else BACKEND=iptables-nft; fi
fi
# Complete rules are left alone: rebuilding would reset the counting rule, empty the flow sets
# and delete the queue rule under packets a running daemon has not yet given a verdict.
if ! is_complete "$BACKEND"; then
	if [ "$BACKEND" = nft ]; then
		remove_iptables
		install_nft
	else
		remove_nft
		install_iptables
	fi
fi
echo "installed queue $QUEUE rules with backend $BACKEND"
