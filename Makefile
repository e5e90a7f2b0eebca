# `make demo` and `make test` are all the set-up a fresh machine needs: each creates .venv and
# installs what is missing (the install is skipped when pyproject.toml has not changed).
BOOTSTRAP_PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-stacks test-bench test-chaos test-browser test-tls clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; anything later that asks for torch finds it satisfied
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/compose --ignore=tests/bench --ignore=tests/chaos --ignore=tests/browser \
		--ignore=tests/tls -m "not stacks"

# The stack tests that serve every family, the emulated video models or the Engram store (about
# 3 minutes), kept out of `test` so it stays under 10 minutes on 2 cores: CI runs it after `test`.
test-stacks: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration -m stacks

# The benchmarks' quick runs (each script end to end, about 4 minutes): CI runs them after `test`.
test-bench: $(STAMP)
	$(BIN)/python -m pytest -q tests/bench

# Killing processes and servers under load (supervision, a Redis restart, a NATS node dying; about
# 3 minutes): CI runs it after `test-bench`.
test-chaos: $(STAMP)
	$(BIN)/python -m pytest -q tests/chaos

# The gateway's dashboard in Debian's headless Chromium, driven by selenium (1.5-3 minutes on a loaded 2-core machine);
# installs the chromium and chromium-driver packages first when /usr/bin/chromedriver is missing.
# CI runs it after `test-chaos`.
test-browser: $(STAMP)
	test -x /usr/bin/chromedriver || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(BIN)/python -m pytest -q tests/browser

# Redis over TLS, against Debian's redis-server (the redis-server wheel is built without TLS): its
# packages are downloaded and unpacked into .venv/redis-tls, nothing is installed or started; a
# wrapper runs it with its libraries. A few seconds; CI runs it after `test-browser`.
REDIS_TLS := $(VENV)/redis-tls
$(REDIS_TLS)/redis-server:
	rm -rf $(REDIS_TLS) && mkdir -p $(REDIS_TLS)/debs
	apt-get update -qq
	cd $(REDIS_TLS)/debs && apt-get download -qq redis-server redis-tools liblzf1 libjemalloc2
	for deb in $(REDIS_TLS)/debs/*.deb; do dpkg-deb -x $$deb $(REDIS_TLS)/root; done
	libs=$$(dirname $$(find $(abspath $(REDIS_TLS))/root -name 'libjemalloc.so.2')); \
		printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$$@"\n' "$$libs" "$(abspath $(REDIS_TLS))/root/usr/bin/redis-server" > $@
	chmod +x $@

test-tls: $(STAMP) $(REDIS_TLS)/redis-server
	DF_TEST_TLS_REDIS_SERVER=$(abspath $(REDIS_TLS))/redis-server $(BIN)/python -m pytest -q tests/tls

demo: $(STAMP)
	bash examples/demo.sh

clean:
	rm -rf $(VENV) .df out

# The Docker path (docs/deploy.md): docker-setup, base-image, infra-images, wheelhouse, image,
# test-compose. test-compose installs and starts what is missing, then runs tests/compose.
include deploy/docker.mk
test-compose: $(STAMP)
