# Set-up, demo and tests. Everything here runs as root, because sessions create network
# namespaces and nftables rules. `make demo` and `make test` do all set-up on a fresh machine.

SHELL := /bin/bash

# The appliance needs Python >= 3.12 (mitmproxy 12); the local upstream (local-bigquery 0.3.2,
# tests and demo only) needs Python 3.13. Override with PYTHON=... or UPSTREAM_PYTHON=....
PYTHON ?= $(shell scripts/find-python 3.12)
UPSTREAM_PYTHON ?= $(shell scripts/find-python 3.13 3.13)
# The example agent runs as the unprivileged agent user, so its interpreter and venv must be
# readable by that user: the system Python, with the venv outside any private home directory.
AGENT_PYTHON ?= /usr/bin/python3
AGENT_VENV ?= /opt/appliance-agent-venv
AGENT_USER ?= appliance-agent
# The Node.js agent client (@google-cloud/bigquery), for e2e tests of the Node client library.
AGENT_NODE ?= /opt/appliance-agent-node

VENV := .venv
UPSTREAM_VENV := .venv-upstream
STAMP_VENV := $(VENV)/.installed
STAMP_UPSTREAM := $(UPSTREAM_VENV)/.installed
STAMP_AGENT := $(AGENT_VENV)/.installed
STAMP_AGENT_NODE := $(AGENT_NODE)/.installed
APT_PACKAGES := nftables iproute2 python3-venv

export APPLIANCE_UPSTREAM_PYTHON := $(CURDIR)/$(UPSTREAM_VENV)/bin/python
export APPLIANCE_AGENT_PYTHON := $(AGENT_VENV)/bin/python
export APPLIANCE_AGENT_NODE_PATH := $(AGENT_NODE)/node_modules

.PHONY: help system-deps venv upstream-venv agent-venv agent-node agent-user deps demo test clean

help:
	@echo "make demo   run the example agent in a recorded session against the local upstream"
	@echo "make test   run the test suite (as root)"
	@echo "make deps   only install what demo and test need"
	@echo "make install    install the appliance for production use (scripts/install.sh)"
	@echo "make uninstall  remove it again; PURGE=1 also deletes configuration, keys and store"

system-deps:
	@if ! command -v nft >/dev/null || ! dpkg -s python3-venv >/dev/null 2>&1; then \
	    if command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	    else \
	        echo "Install these packages with your package manager: $(APT_PACKAGES)" >&2; exit 1; \
	    fi; \
	fi

$(STAMP_VENV): pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.12 found; see the message above." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(STAMP_UPSTREAM): testbed/requirements-upstream.txt
	@test -n "$(UPSTREAM_PYTHON)" || { echo "No Python 3.13 found for the local upstream" \
	    "(local-bigquery 0.3.2 needs it); install python3.13 or set UPSTREAM_PYTHON." >&2; exit 1; }
	$(UPSTREAM_PYTHON) -m venv $(UPSTREAM_VENV)
	$(UPSTREAM_VENV)/bin/pip install -q --upgrade pip
	$(UPSTREAM_VENV)/bin/pip install -q -r testbed/requirements-upstream.txt
	touch $@

$(STAMP_AGENT): examples/requirements.txt
	$(AGENT_PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/pip install -q --upgrade pip
	$(AGENT_VENV)/bin/pip install -q -r examples/requirements.txt
	chmod -R a+rX $(AGENT_VENV)
	touch $@

# Skipped with a message where npm is missing; the Node client's e2e test then skips too.
$(STAMP_AGENT_NODE): examples/node/package.json
	@if command -v npm >/dev/null; then \
	    mkdir -p $(AGENT_NODE) && cp examples/node/package.json $(AGENT_NODE)/ && \
	    npm install --prefix $(AGENT_NODE) --no-audit --no-fund --omit=dev --loglevel=error && \
	    chmod -R a+rX $(AGENT_NODE) && touch $@; \
	else echo "npm not found: the Node.js agent client is not installed" >&2; fi

venv: $(STAMP_VENV)
upstream-venv: $(STAMP_UPSTREAM)
agent-venv: $(STAMP_AGENT)
agent-node: $(STAMP_AGENT_NODE)

agent-user:
	@id -u $(AGENT_USER) >/dev/null 2>&1 || \
	    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(AGENT_USER)

deps: system-deps venv upstream-venv agent-venv agent-node agent-user

demo: deps
	$(VENV)/bin/python -m testbed.demo

test: deps
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(UPSTREAM_VENV) $(AGENT_VENV)

# Production install: one venv under /opt/appliance, `appliance` on PATH, the agent user,
# /etc/appliance, the store and keys. The Vagrant VM provisions with the same script.
.PHONY: install uninstall
install:
	PYTHON="$(PYTHON)" scripts/install.sh install

uninstall:
	PURGE="$(PURGE)" scripts/install.sh uninstall

# Benchmarks: rewrites docs/benchmarks.md from one run of bench/run_all.py (about an hour).
# Not tests: neither `make test` nor CI runs them.
.PHONY: bench
bench: deps
	@command -v jq >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq; }
	@test -x $(VENV)/bin/py-spy || $(VENV)/bin/pip install -q -e '.[test,bench]'
	$(VENV)/bin/python bench/run_all.py
