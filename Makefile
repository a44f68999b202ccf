# nfacct: `make demo` and `make test` set everything up themselves (Debian 12, as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# libnetfilter-queue-dev and the build tools are for the bench only (netfilterqueue in the A/B of
# the queue reader, and bench/*.c compiled by bench/modes.py); nfacct itself needs none of them.
# systemd (systemd-analyze) and strace are for tests/test_systemd.py, which checks the unit
# without starting it; shellcheck checks rules/install.sh.
APT_PACKAGES := nftables iptables libnetfilter-queue-dev libnfnetlink-dev iproute2 iputils-ping \
                build-essential python3-dev python3-venv iperf3 curl socat tmux systemd strace prometheus \
                shellcheck
STAMP := $(VENV)/.installed

.PHONY: setup demo test soak lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m lab.demo

test: setup
	$(VENV)/bin/ruff check nfacct tests bench lab
	$(VENV)/bin/pytest -v tests

# Long soaks (tests marked `soak`), minutes each: kept out of `make test`.
soak: setup
	$(VENV)/bin/pytest -v --soak -m soak tests

lint: setup
	$(VENV)/bin/ruff check nfacct tests bench lab
	$(VENV)/bin/ruff format --check nfacct tests bench lab

bench: setup
	$(PY) bench/run.py
	$(PY) bench/queue_reader.py
	$(PY) bench/setup_latency.py
	$(PY) bench/metrics_scrape.py
	$(PY) bench/modes.py
	$(PY) bench/floors.py

clean:
	rm -rf $(VENV) build *.egg-info
