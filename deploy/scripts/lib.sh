# Shared by the deploy scripts: where state lives and how to ask whether an engine answers.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# Sourced, not run. Paths are relative to the repository root (the scripts cd there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON="${PYTHON:-.venv/bin/python}"
STATE_DIR="${DF_DOCKER_STATE:-.df/docker}"
BASE_IMAGE_TAG="${DF_BASE_IMAGE_TAG:-disagfusion/base:bookworm}"
NATS_LOCAL_IMAGE="${DF_NATS_LOCAL_IMAGE:-disagfusion/nats:local}"
REDIS_LOCAL_IMAGE="${DF_REDIS_LOCAL_IMAGE:-disagfusion/redis:local}"
DOCKER_CLI_LOCAL_IMAGE="${DF_DOCKER_CLI_LOCAL_IMAGE:-disagfusion/docker-cli:local}"
PROJECT_IMAGE="${DF_IMAGE:-disagfusion:latest}"
# The classic builder needs no buildx plugin, which Debian's docker.io does not ship.
export DOCKER_BUILDKIT=0

engine_answers() { docker info >/dev/null 2>&1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }
