"""Chaos tests start the embedded stacks the integration tests start."""

from tests.integration.conftest import start_stack  # noqa: F401 (a fixture, shared rather than copied)
